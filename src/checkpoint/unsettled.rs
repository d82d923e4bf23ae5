//! Block sends that may still be queued on the management server: their `run-script` answer
//! was lost, or their tasks were still running at `task_timeout`. Until such a send ran, a
//! listing that does not show its rules proves nothing (the script may run a moment later), and
//! sending the rules again could add them twice. Pure: the enforcer asks the server about the
//! tasks it can name and says which ended.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::sam::RuleKey;

/// How much longer than `task_timeout` a send whose tasks are known is followed: a task the
/// server still reports unfinished by then is taken as never to run.
const FOLLOW_TASKS_FOR: u32 = 2;

/// The sends not known to have run, oldest first.
#[derive(Debug, Default)]
pub struct Unsettled {
    sends: Vec<Send>,
}

#[derive(Debug)]
struct Send {
    gateways: HashSet<String>,
    keys: HashSet<RuleKey>,
    /// The send's tasks, when the server named them; none after a lost answer.
    tasks: Vec<String>,
    at: Instant,
}

impl Unsettled {
    /// A send of `keys` to `gateways` at `at` may still run; `tasks` are its task ids, if known.
    pub fn record(
        &mut self,
        gateways: &[String],
        keys: impl IntoIterator<Item = RuleKey>,
        tasks: Vec<String>,
        at: Instant,
    ) {
        let keys: HashSet<RuleKey> = keys.into_iter().collect();
        if keys.is_empty() || gateways.is_empty() {
            return;
        }
        self.sends.push(Send {
            gateways: gateways.iter().cloned().collect(),
            keys,
            tasks,
            at,
        });
    }

    /// The task ids worth asking the server about.
    pub fn tasks(&self) -> Vec<String> {
        self.sends.iter().flat_map(|s| s.tasks.clone()).collect()
    }

    /// Forgets the sends known to have run by `now`: every task of theirs `ended`, or (a lost
    /// answer, which names no task) `task_timeout` passed since the send; and a send whose
    /// tasks have not ended after [`FOLLOW_TASKS_FOR`] times `task_timeout`.
    pub fn settle(&mut self, now: Instant, task_timeout: Duration, ended: &HashSet<String>) {
        self.sends.retain(|s| {
            let age = now.saturating_duration_since(s.at);
            if s.tasks.is_empty() {
                age < task_timeout
            } else {
                !s.tasks.iter().all(|t| ended.contains(t))
                    && age < task_timeout.saturating_mul(FOLLOW_TASKS_FOR)
            }
        });
    }

    /// Whether an earlier send of `key` to `gateway` may still land.
    pub fn may_land(&self, gateway: &str, key: &RuleKey) -> bool {
        self.sends
            .iter()
            .any(|s| s.keys.contains(key) && s.gateways.contains(gateway))
    }

    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> RuleKey {
        RuleKey::from_bytes([n; 16])
    }

    #[test]
    fn a_lost_answer_holds_until_the_task_timeout_and_only_its_own_rules() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(120);
        let mut u = Unsettled::default();
        u.record(&["gw-1".into(), "gw-2".into()], [key(1)], vec![], t0);
        assert!(u.may_land("gw-1", &key(1)));
        assert!(u.may_land("gw-2", &key(1)));
        assert!(!u.may_land("gw-3", &key(1)), "not sent there");
        assert!(!u.may_land("gw-1", &key(2)), "not in that send");
        assert!(u.tasks().is_empty(), "a lost answer names no task");
        u.settle(t0 + Duration::from_secs(119), timeout, &HashSet::new());
        assert!(u.may_land("gw-1", &key(1)));
        u.settle(t0 + timeout, timeout, &HashSet::new());
        assert!(!u.may_land("gw-1", &key(1)));
        assert!(u.is_empty());
    }

    #[test]
    fn a_send_whose_tasks_are_known_holds_until_every_task_ended() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut u = Unsettled::default();
        u.record(
            &["gw-1".into()],
            [key(1), key(2)],
            vec!["a".into(), "b".into()],
            t0,
        );
        assert_eq!(u.tasks(), ["a", "b"]);
        let a: HashSet<String> = ["a".to_owned()].into();
        u.settle(t0 + Duration::from_secs(7), timeout, &a);
        assert!(
            u.may_land("gw-1", &key(2)),
            "b still runs, past the task timeout"
        );
        let both: HashSet<String> = ["a".to_owned(), "b".to_owned()].into();
        u.settle(t0 + Duration::from_secs(7), timeout, &both);
        assert!(u.is_empty(), "both ended");
        u.record(&["gw-1".into()], [key(3)], vec!["c".into()], t0);
        u.settle(t0 + timeout * FOLLOW_TASKS_FOR, timeout, &HashSet::new());
        assert!(
            u.is_empty(),
            "a task that never ends is not waited for forever"
        );
    }

    #[test]
    fn a_send_without_rules_or_gateways_is_not_kept() {
        let mut u = Unsettled::default();
        u.record(&["gw-1".into()], [], vec![], Instant::now());
        u.record(&[], [key(1)], vec![], Instant::now());
        assert!(u.is_empty());
    }
}
