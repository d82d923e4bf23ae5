//! A rule's life on the gateways of its target, as pure code: the state machine, the verdicts
//! read from task lists, and the retry policy. `pipeline::enforce` only moves data through them.
//!
//! ```text
//!            send                 task output: exit 0
//!  Unsent ─────────► (sent) ───────────────────────────► Confirmed
//!    ▲                  │ answer lost, task unfinished,
//!    │                  │ output cut, 5xx after sending …
//!    │ verify: absent   ▼
//!    └────────────── Unknown ──── verify: in place ─────► Confirmed
//! ```
//!
//! Per gateway. An outcome that is not known is settled by asking the gateway (`fw samp get` by
//! samgate's comment, or `fw sam -M` matched to samgate's own rule), never by sending again: a
//! rule is only ever sent to a gateway where it is known not to be (a listing taken while an
//! earlier send may still be queued on the server proves nothing: `checkpoint::unsettled`). A
//! gateway that confirmed is never sent to again, whatever the others answer.

use std::collections::HashMap;
use std::time::Duration;

use super::decide::Code;
use crate::checkpoint::sam::{self, SamAction, SamMode, SamRule};
use crate::checkpoint::{ApiError, ErrorClass, Task, TaskRef};
use crate::enforcer::Failed;

/// Where a rule stands on one gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnGateway {
    /// Known not to be there: may be sent.
    Unsent,
    /// May or may not be there: ask before anything else.
    Unknown,
    Confirmed,
}

/// What to do next for a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// In place on every gateway.
    Done,
    /// Ask these gateways whether the rule is there.
    Verify(Vec<String>),
    /// Send the rule to these gateways.
    Send(Vec<String>),
}

/// What one gateway's task said about one rule of a block script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Confirmed,
    /// The command ran and failed: the rule is not there.
    Refused(String),
    /// Nobody knows (no task, an unfinished task, no outcome line).
    Unknown(String),
}

/// What one gateway's task said about one rule of a verify script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    InPlace,
    Absent,
    Unknown(String),
}

/// Whether a failed call may have reached the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Refused before anything ran (no connection, a login limit, a JSON error answer).
    NotSent,
    /// The request may have been carried out (a lost answer, a timeout, a proxy's 502).
    MaybeSent,
}

/// Whether a failed Check Point `run-script` call may have run the script.
pub fn delivery(error: &ApiError) -> Delivery {
    match error {
        ApiError::LoginLimited { .. } => Delivery::NotSent,
        ApiError::Transport {
            maybe_delivered, ..
        } => {
            if *maybe_delivered {
                Delivery::MaybeSent
            } else {
                Delivery::NotSent
            }
        }
        // The API itself answered with an error: a 4xx refused the request; a 5xx may have come
        // after the script was handed to the gateways.
        ApiError::Api { status, .. } if *status < 500 => Delivery::NotSent,
        ApiError::NotJson { status: 403, .. } => Delivery::NotSent,
        ApiError::Api { .. }
        | ApiError::NotJson { .. }
        | ApiError::TaskTimeout { .. }
        | ApiError::Protocol { .. } => Delivery::MaybeSent,
    }
}

/// One rule's progress over its target's gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    gateways: Vec<(String, OnGateway)>,
    /// Firewall calls made for this rule (sends and verifications).
    pub attempts: u32,
    /// The last reason the rule is not done, for results and logs.
    pub last_problem: Option<String>,
    /// A removal (an unblock): *done* means absent, and the rule is removed where it is found.
    removing: bool,
    /// A removal found the rule on some gateway.
    pub found: bool,
    /// Cancels a removal sent (a rule still listed after one is trouble: it backs off).
    pub cancels: u32,
}

impl Progress {
    /// A rule for `gateways`; `verify_first` when a previous owner may have sent it.
    pub fn new(gateways: &[String], verify_first: bool) -> Self {
        let start = if verify_first {
            OnGateway::Unknown
        } else {
            OnGateway::Unsent
        };
        Self {
            gateways: gateways.iter().map(|g| (g.clone(), start)).collect(),
            attempts: 0,
            last_problem: None,
            removing: false,
            found: false,
            cancels: 0,
        }
    }

    /// A removal from `gateways` (an unblock), the block state machine turned around: each
    /// gateway is asked first; where the rule is found it is cancelled (*send*), and a cancel is
    /// believed only when the gateway, asked again, no longer lists the rule (*confirmed* means
    /// absent). The exit status of a cancel is not documented, so it decides nothing.
    ///
    /// ```text
    ///  Unknown ──verify: absent──► Confirmed (gone)
    ///     ▲  └──verify: in place──► Unsent ──cancel──┐
    ///     └──────────────────────────────────────────┘
    /// ```
    pub fn removal(gateways: &[String]) -> Self {
        Self {
            removing: true,
            ..Self::new(gateways, true)
        }
    }

    /// A rule listed on `present` and not on the other gateways (reconcile re-asserts it where it
    /// is missing). Those are asked once more before anything is sent: another re-assert of the
    /// same rule may have landed since the listing.
    pub fn missing_from(gateways: &[String], present: &[String]) -> Self {
        let mut p = Self::new(gateways, true);
        for g in present {
            p.set(g, OnGateway::Confirmed);
        }
        p
    }

    pub fn is_removal(&self) -> bool {
        self.removing
    }

    /// Unknown gateways are asked first; only then is the rule sent where it is known absent.
    pub fn next(&self) -> Step {
        let with = |state: OnGateway| -> Vec<String> {
            self.gateways
                .iter()
                .filter(|(_, s)| *s == state)
                .map(|(g, _)| g.clone())
                .collect()
        };
        let unknown = with(OnGateway::Unknown);
        if !unknown.is_empty() {
            return Step::Verify(unknown);
        }
        let unsent = with(OnGateway::Unsent);
        if !unsent.is_empty() {
            return Step::Send(unsent);
        }
        Step::Done
    }

    /// The rule may be on some gateway (so it must not be forgotten as "never sent").
    pub fn maybe_in_place(&self) -> bool {
        self.gateways.iter().any(|(_, s)| *s != OnGateway::Unsent)
    }

    /// Whether anything was ever found or sent (a verified-only rule was never sent by us).
    pub fn state_of(&self, gateway: &str) -> Option<OnGateway> {
        self.gateways
            .iter()
            .find(|(g, _)| g == gateway)
            .map(|(_, s)| *s)
    }

    fn set(&mut self, gateway: &str, state: OnGateway) {
        if let Some((_, s)) = self.gateways.iter_mut().find(|(g, _)| g == gateway) {
            // A confirmed gateway stays confirmed: nothing can make it un-sent.
            if *s != OnGateway::Confirmed {
                *s = state;
            }
        }
    }

    /// What the block script's tasks said, per gateway.
    pub fn after_send(&mut self, verdicts: &[(String, Sent)]) {
        self.attempts += 1;
        if self.removing {
            self.cancels += 1;
            // Whatever a cancel said, only a listing tells that the rule is gone.
            for (gateway, verdict) in verdicts {
                if let Sent::Refused(why) | Sent::Unknown(why) = verdict {
                    self.last_problem = Some(format!("gateway {gateway}: {why}"));
                }
                self.set(gateway, OnGateway::Unknown);
            }
            return;
        }
        for (gateway, verdict) in verdicts {
            let state = match verdict {
                Sent::Confirmed => OnGateway::Confirmed,
                Sent::Refused(why) => {
                    self.last_problem = Some(format!("gateway {gateway}: {why}"));
                    OnGateway::Unsent
                }
                Sent::Unknown(why) => {
                    self.last_problem = Some(format!("gateway {gateway}: {why}"));
                    OnGateway::Unknown
                }
            };
            self.set(gateway, state);
        }
    }

    /// What the verify script's tasks said, per gateway.
    pub fn after_verify(&mut self, verdicts: &[(String, Presence)]) {
        self.attempts += 1;
        for (gateway, verdict) in verdicts {
            match (verdict, self.removing) {
                (Presence::InPlace, false) => self.set(gateway, OnGateway::Confirmed),
                (Presence::Absent, false) => self.set(gateway, OnGateway::Unsent),
                (Presence::InPlace, true) => {
                    self.found = true;
                    self.set(gateway, OnGateway::Unsent);
                }
                (Presence::Absent, true) => self.set(gateway, OnGateway::Confirmed),
                (Presence::Unknown(why), _) => {
                    self.last_problem = Some(format!("gateway {gateway}: {why}"));
                }
            }
        }
    }

    /// A call for `gateways` failed as a whole. A send that may have been delivered (its answer
    /// lost, its tasks not followed to the end) leaves the rule unknown there; a verification
    /// that failed changes nothing.
    pub fn after_error(&mut self, step: &Step, failed: &Failed) {
        self.attempts += 1;
        self.last_problem = Some(failed.error.to_string());
        if let (Step::Send(gateways), Delivery::MaybeSent) = (step, failed.delivery) {
            for gateway in gateways {
                self.set(gateway, OnGateway::Unknown);
            }
        }
    }
}

/// Retry settings (`[run]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub deadline: Duration,
}

/// After a try that left a rule unfinished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Try the rule's next step after this delay.
    Retry(Duration),
    /// Give up: report `failed` with this code.
    Fail(Code),
}

/// `initial · 2^(attempts-1)`, capped at `max`, times `jitter` (0.75 to 1.25), waited at least
/// as long as a rate limit asks; past the deadline, or for errors retrying cannot mend, fail.
pub fn retry_action(
    class: ErrorClass,
    attempts: u32,
    elapsed: Duration,
    policy: &RetryPolicy,
    jitter: f64,
) -> Next {
    let backoff = policy
        .initial
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
        .min(policy.max)
        .mul_f64(jitter.clamp(0.75, 1.25));
    let delay = match class {
        ErrorClass::Retryable => backoff,
        ErrorClass::RateLimited(at_least) => backoff.max(at_least),
        ErrorClass::Auth => return Next::Fail(Code::Auth),
        ErrorClass::Permanent => return Next::Fail(Code::Permanent),
    };
    if elapsed + delay >= policy.deadline {
        return Next::Fail(Code::RetriesExhausted);
    }
    Next::Retry(delay)
}

/// Each gateway's task, by the run-script answer's task list.
fn task_by_gateway<'a>(refs: &[TaskRef], tasks: &'a [Task]) -> HashMap<String, &'a Task> {
    refs.iter()
        .filter_map(|r| {
            let task = tasks.iter().find(|t| t.task_id == r.task_id)?;
            Some((r.target.clone(), task))
        })
        .collect()
}

fn output_of(task: &Task) -> &str {
    task.details.first().map_or("", |d| d.output.as_str())
}

fn error_line(task: &Task) -> String {
    let detail = task.details.first();
    let error = detail.map_or("", |d| d.error.trim());
    let line = error.lines().next().unwrap_or("");
    if line.is_empty() {
        format!("task {}", task.status.as_str())
    } else {
        format!("task {}: {line}", task.status.as_str())
    }
}

/// Per rule, per gateway (in `gateways` order): what a block script's tasks say. A gateway
/// without a task, a task not finished, or a rule without its outcome line is `Unknown`: garbage
/// never counts as success.
pub fn send_verdicts(
    refs: &[TaskRef],
    tasks: &[Task],
    gateways: &[String],
    rules: usize,
) -> Vec<Vec<(String, Sent)>> {
    let by_gateway = task_by_gateway(refs, tasks);
    let outcomes: HashMap<&str, Vec<Option<i32>>> = by_gateway
        .iter()
        .map(|(g, t)| (g.as_str(), sam::parse_outcomes(output_of(t), rules)))
        .collect();
    (0..rules)
        .map(|i| {
            gateways
                .iter()
                .map(|gateway| {
                    let verdict = match by_gateway.get(gateway) {
                        None => Sent::Unknown("no task for this gateway".into()),
                        Some(task) if !task.status.is_terminal() => {
                            Sent::Unknown("task still in progress".into())
                        }
                        Some(task) => match outcomes[gateway.as_str()][i] {
                            Some(0) => Sent::Confirmed,
                            Some(status) => Sent::Refused(format!(
                                "exit status {status} ({})",
                                error_line(task)
                            )),
                            None => Sent::Unknown(format!(
                                "no outcome line for the rule ({})",
                                error_line(task)
                            )),
                        },
                    };
                    (gateway.clone(), verdict)
                })
                .collect()
        })
        .collect()
}

/// Per rule, per gateway (in `gateways` order): what a `fw samp batch` script's tasks say, read
/// from the listings before and after the batch ([`sam::samp_batch_script`]): a uid with the
/// rule's key that only the second lists is confirmed; the key with only older uids, or absent
/// from a whole listing, is refused (this send did not land, so it may be sent again); no task,
/// an unfinished task or a listing that failed, was cut or cannot be read is unknown.
pub fn samp_batch_verdicts(
    refs: &[TaskRef],
    tasks: &[Task],
    gateways: &[String],
    rules: &[SamRule],
) -> Vec<Vec<(String, Sent)>> {
    let by_gateway = task_by_gateway(refs, tasks);
    let readbacks: HashMap<&str, sam::BatchReadback> = by_gateway
        .iter()
        .map(|(g, t)| (g.as_str(), sam::samp_batch_readback(output_of(t))))
        .collect();
    rules
        .iter()
        .map(|rule| {
            gateways
                .iter()
                .map(|gateway| {
                    let landed = readbacks
                        .get(gateway.as_str())
                        .zip(rule.key)
                        .and_then(|(r, key)| r.landed(key, rule.criteria.is_ipv6()));
                    let verdict = match (by_gateway.get(gateway), landed, rule.key) {
                        (None, _, _) => Sent::Unknown("no task for this gateway".into()),
                        (Some(task), _, _) if !task.status.is_terminal() => {
                            Sent::Unknown("task still in progress".into())
                        }
                        (Some(_), Some(sam::Landed::New), _) => Sent::Confirmed,
                        (Some(task), Some(sam::Landed::OnlyOlder), _) => Sent::Refused(format!(
                            "only an older rule with this key is listed after fw samp batch: this send did not land ({})",
                            error_line(task)
                        )),
                        (Some(task), Some(sam::Landed::Absent), _) => Sent::Refused(format!(
                            "not listed after fw samp batch ({})",
                            error_line(task)
                        )),
                        (Some(_), _, None) => {
                            Sent::Unknown("the rule carries no samgate key to read back".into())
                        }
                        (Some(task), _, _) => Sent::Unknown(format!(
                            "the listings around fw samp batch failed, were cut or cannot be read ({})",
                            error_line(task)
                        )),
                    };
                    (gateway.clone(), verdict)
                })
                .collect()
        })
        .collect()
}

/// Per rule, per gateway: what a verify script's tasks say. A failed query, or a listing with a
/// line samgate cannot read, is `Unknown`, never "absent".
pub fn verify_verdicts(
    refs: &[TaskRef],
    tasks: &[Task],
    gateways: &[String],
    rules: &[SamRule],
    mode: SamMode,
) -> Vec<Vec<(String, Presence)>> {
    let by_gateway = task_by_gateway(refs, tasks);
    let sections: HashMap<&str, Vec<Option<(i32, String)>>> = by_gateway
        .iter()
        .map(|(g, t)| (g.as_str(), sam::split_sections(output_of(t), rules.len())))
        .collect();
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            gateways
                .iter()
                .map(|gateway| {
                    let verdict = match by_gateway.get(gateway) {
                        None => Presence::Unknown("no task for this gateway".into()),
                        Some(task) if !task.status.is_terminal() => {
                            Presence::Unknown("task still in progress".into())
                        }
                        Some(task) => match &sections[gateway.as_str()][i] {
                            Some((0, listing)) => match lists(rule, mode, listing) {
                                Ok(true) => Presence::InPlace,
                                Ok(false) => Presence::Absent,
                                Err(unreadable) => Presence::Unknown(format!(
                                    "the query's listing has {unreadable}"
                                )),
                            },
                            Some((status, _)) => Presence::Unknown(format!(
                                "the query failed with exit status {status} ({})",
                                error_line(task)
                            )),
                            None => Presence::Unknown(format!(
                                "no outcome line for the query ({})",
                                error_line(task)
                            )),
                        },
                    };
                    (gateway.clone(), verdict)
                })
                .collect()
        })
        .collect()
}

/// Per gateway: its task's output, or why there is none to read (no task, not finished).
pub fn task_outputs(refs: &[TaskRef], tasks: &[Task]) -> HashMap<String, Result<String, String>> {
    task_by_gateway(refs, tasks)
        .into_iter()
        .map(|(gateway, task)| {
            let output = match task.status.is_terminal() {
                true => Ok(output_of(task).to_owned()),
                false => Err("task still in progress".to_owned()),
            };
            (gateway, output)
        })
        .collect()
}

/// Per rule, per gateway: the uids of the `fw samp` rules carrying the rule's key, read from a
/// verify script's tasks (what an unblock deletes in `fw_samp` mode).
pub fn listed_uids(
    refs: &[TaskRef],
    tasks: &[Task],
    rules: &[SamRule],
) -> Vec<HashMap<String, Vec<sam::SampUid>>> {
    let by_gateway = task_by_gateway(refs, tasks);
    let mut uids = vec![HashMap::new(); rules.len()];
    for (gateway, task) in by_gateway {
        let sections = sam::split_sections(output_of(task), rules.len());
        for (i, section) in sections.into_iter().enumerate() {
            let Some((0, listing)) = section else {
                continue;
            };
            // An unreadable listing names no uids: its verdict is unknown, nothing is deleted.
            let Ok(entries) = sam::parse_samp_get(&listing) else {
                continue;
            };
            let found: Vec<sam::SampUid> = entries
                .into_iter()
                .filter(|e| rules[i].key.is_some() && e.samgate_key() == rules[i].key)
                .map(|e| e.uid)
                .collect();
            uids[i].insert(gateway.clone(), found);
        }
    }
    uids
}

/// Whether a listing shows samgate's own rule: `fw samp get` by samgate's comment (the key), or
/// a `fw sam -M` line with the rule's criteria, action, close flag and log type.
fn lists(rule: &SamRule, mode: SamMode, listing: &str) -> Result<bool, sam::Unreadable> {
    Ok(match mode {
        SamMode::FwSamp => sam::parse_samp_get(listing)?
            .iter()
            .any(|entry| rule.key.is_some() && entry.samgate_key() == rule.key),
        SamMode::FwSam => sam::parse_sam_monitor(listing)?
            .iter()
            .any(|entry| sam::monitor_entry_is(entry, rule)),
    })
}

/// The action word `fw sam -M` prints for an action.
pub fn action_word(action: SamAction) -> &'static str {
    match action {
        SamAction::Drop => "drop",
        SamAction::Reject => "reject",
        SamAction::Notify => "notify",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::sam::{Criteria, LogType, RuleKey};
    use crate::checkpoint::{TaskDetail, TaskStatus};

    fn gws(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn task(id: &str, status: TaskStatus, output: &str) -> Task {
        Task {
            task_id: id.into(),
            name: String::new(),
            status,
            progress: 100,
            details: vec![TaskDetail {
                gateway: None,
                status_code: None,
                description: None,
                output: output.into(),
                error: String::new(),
            }],
        }
    }

    fn refs(pairs: &[(&str, &str)]) -> Vec<TaskRef> {
        pairs
            .iter()
            .map(|(t, g)| TaskRef {
                task_id: t.to_string(),
                target: g.to_string(),
            })
            .collect()
    }

    /// A failed call, as the Check Point enforcer reports it.
    fn failed(e: ApiError) -> Failed {
        Failed {
            delivery: delivery(&e),
            error: e.into(),
        }
    }

    fn transport(maybe_delivered: bool) -> ApiError {
        ApiError::Transport {
            server: "hq".into(),
            detail: "x".into(),
            timeout: false,
            tls: false,
            maybe_delivered,
        }
    }

    #[test]
    fn a_removal_asks_first_cancels_where_found_and_believes_only_a_listing() {
        let gateways = gws(&["gw-1", "gw-2"]);
        let mut p = Progress::removal(&gateways);
        assert!(p.is_removal());
        assert_eq!(p.next(), Step::Verify(gateways.clone()), "asked first");
        p.after_verify(&[
            ("gw-1".into(), Presence::InPlace),
            ("gw-2".into(), Presence::Absent),
        ]);
        assert!(p.found);
        assert_eq!(
            p.next(),
            Step::Send(gws(&["gw-1"])),
            "cancelled where found"
        );
        // Whatever the cancel's exit status says, the gateway is asked again.
        p.after_send(&[("gw-1".into(), Sent::Confirmed)]);
        assert_eq!(p.cancels, 1);
        assert_eq!(p.next(), Step::Verify(gws(&["gw-1"])));
        p.after_verify(&[("gw-1".into(), Presence::Unknown("cut".into()))]);
        assert_eq!(
            p.next(),
            Step::Verify(gws(&["gw-1"])),
            "an unknown listing is asked again"
        );
        p.after_verify(&[("gw-1".into(), Presence::Absent)]);
        assert_eq!(p.next(), Step::Done, "gone from every gateway");
        // A re-assert sends nowhere before asking the gateways that lost the rule.
        let p = Progress::missing_from(&gateways, &gws(&["gw-2"]));
        assert_eq!(p.next(), Step::Verify(gws(&["gw-1"])));
    }

    #[test]
    fn the_state_machine_never_sends_where_the_rule_may_be() {
        let gateways = gws(&["gw-1", "gw-2"]);
        let mut p = Progress::new(&gateways, false);
        assert_eq!(p.next(), Step::Send(gateways.clone()));
        // gw-1 confirmed, gw-2's outcome line is missing: ask gw-2, never resend to gw-1.
        p.after_send(&[
            ("gw-1".into(), Sent::Confirmed),
            ("gw-2".into(), Sent::Unknown("cut".into())),
        ]);
        assert_eq!(p.next(), Step::Verify(gws(&["gw-2"])));
        p.after_verify(&[("gw-2".into(), Presence::Unknown("query failed".into()))]);
        assert_eq!(
            p.next(),
            Step::Verify(gws(&["gw-2"])),
            "a failed question is asked again"
        );
        p.after_verify(&[("gw-2".into(), Presence::Absent)]);
        assert_eq!(p.next(), Step::Send(gws(&["gw-2"])));
        p.after_send(&[("gw-2".into(), Sent::Confirmed)]);
        assert_eq!(p.next(), Step::Done);
        assert_eq!(p.attempts, 4);

        // A lost answer: the send may have happened on both.
        let mut p = Progress::new(&gateways, false);
        let step = p.next();
        p.after_error(&step, &failed(transport(true)));
        assert_eq!(p.next(), Step::Verify(gateways.clone()));
        p.after_verify(&[
            ("gw-1".into(), Presence::InPlace),
            ("gw-2".into(), Presence::Absent),
        ]);
        assert_eq!(p.next(), Step::Send(gws(&["gw-2"])));
        assert!(p.maybe_in_place());

        // Refused before sending: resend, nothing to ask.
        let mut p = Progress::new(&gateways, false);
        let step = p.next();
        p.after_error(&step, &failed(transport(false)));
        assert_eq!(p.next(), Step::Send(gateways.clone()));
        assert!(!p.maybe_in_place());

        // A previous owner's rule: ask first.
        let p = Progress::new(&gateways, true);
        assert_eq!(p.next(), Step::Verify(gateways.clone()));
        assert!(p.maybe_in_place());
    }

    #[test]
    fn failed_calls_are_sorted_by_whether_they_may_have_run() {
        let api = |status: u16| ApiError::Api {
            server: "hq".into(),
            command: "run-script".into(),
            status,
            code: "c".into(),
            message: "m".into(),
        };
        let not_json = |status: u16| ApiError::NotJson {
            server: "hq".into(),
            command: "run-script".into(),
            status,
            hint: "h",
        };
        let cases = [
            (transport(false), Delivery::NotSent),
            (transport(true), Delivery::MaybeSent),
            (api(400), Delivery::NotSent),
            (api(404), Delivery::NotSent),
            (api(500), Delivery::MaybeSent),
            (not_json(403), Delivery::NotSent),
            (not_json(502), Delivery::MaybeSent),
            (
                ApiError::LoginLimited {
                    server: "hq".into(),
                    per_minute: 3,
                    retry_after: Duration::from_secs(1),
                },
                Delivery::NotSent,
            ),
            (
                ApiError::TaskTimeout {
                    server: "hq".into(),
                    task_id: "t".into(),
                    waited: Duration::from_secs(1),
                },
                Delivery::MaybeSent,
            ),
            (
                ApiError::Protocol {
                    server: "hq".into(),
                    command: "run-script".into(),
                    missing: "tasks",
                },
                Delivery::MaybeSent,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(delivery(&error), expected, "{error}");
        }
    }

    #[test]
    fn retries_back_off_respect_rate_limits_and_end_at_the_deadline() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            deadline: Duration::from_secs(300),
        };
        let s = Duration::from_secs;
        let cases = [
            (ErrorClass::Retryable, 1, s(0), 1.0, Next::Retry(s(1))),
            (ErrorClass::Retryable, 3, s(0), 1.0, Next::Retry(s(4))),
            (ErrorClass::Retryable, 3, s(0), 1.25, Next::Retry(s(5))),
            (ErrorClass::Retryable, 30, s(0), 1.0, Next::Retry(s(60))),
            (
                ErrorClass::Retryable,
                1,
                s(299),
                1.0,
                Next::Fail(Code::RetriesExhausted),
            ),
            (
                ErrorClass::RateLimited(s(20)),
                1,
                s(0),
                1.0,
                Next::Retry(s(20)),
            ),
            (ErrorClass::Auth, 1, s(0), 1.0, Next::Fail(Code::Auth)),
            (
                ErrorClass::Permanent,
                1,
                s(0),
                1.0,
                Next::Fail(Code::Permanent),
            ),
        ];
        for (class, attempts, elapsed, jitter, expected) in cases {
            assert_eq!(
                retry_action(class, attempts, elapsed, &policy, jitter),
                expected,
                "{class:?} attempt {attempts} at {elapsed:?}"
            );
        }
    }

    #[test]
    fn send_verdicts_read_each_rule_on_each_gateway_and_treat_garbage_as_unknown() {
        let gateways = gws(&["gw-1", "gw-2", "gw-3"]);
        let out = "samgate-rule 0 0\nsamgate-rule 1 4\n";
        let tasks = [
            task("a", TaskStatus::Succeeded, out),
            task("b", TaskStatus::InProgress, ""),
        ];
        // gw-3 got no task at all (fewer tasks than gateways).
        let verdicts = send_verdicts(&refs(&[("a", "gw-1"), ("b", "gw-2")]), &tasks, &gateways, 3);
        let words: Vec<Vec<&str>> = verdicts
            .iter()
            .map(|per_gw| {
                per_gw
                    .iter()
                    .map(|(_, v)| match v {
                        Sent::Confirmed => "ok",
                        Sent::Refused(_) => "refused",
                        Sent::Unknown(_) => "unknown",
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            words,
            vec![
                vec!["ok", "unknown", "unknown"],
                vec!["refused", "unknown", "unknown"],
                vec!["unknown", "unknown", "unknown"], // no outcome line for rule 2
            ]
        );
        // Zero tasks: nothing is confirmed.
        let none = send_verdicts(&[], &[], &gateways, 1);
        assert!(none[0].iter().all(|(_, v)| matches!(v, Sent::Unknown(_))));
    }

    fn rule(ip: &str, key: u8) -> SamRule {
        SamRule {
            action: SamAction::Drop,
            close_connections: true,
            criteria: Criteria::Src(ip.parse().unwrap()),
            timeout_secs: Some(3600),
            log: LogType::Log,
            key: Some(RuleKey::from_bytes([key; 16])),
        }
    }

    #[test]
    fn a_samp_batch_confirms_only_the_rules_this_send_made() {
        let gateways = gws(&["gw-1", "gw-2"]);
        let rules = [
            rule("192.0.2.1", 1),
            rule("192.0.2.2", 2),
            rule("192.0.2.3", 3),
        ];
        let line = |key: u8, uid: u32| {
            let key = RuleKey::from_bytes([key; 16]);
            format!(
                "uid=<5ac3965f,00000000,3403a8c0,{uid:08x}> action=drop comment=samgate:{key}\n"
            )
        };
        // Rule 2's address was blocked before and its rule is still there; its line failed.
        let output = format!(
            "{}samgate-rule 0 0\nsamgate-rule 1 0\nsamgate-rule 2 1\nsamgate-rule 3 0\n{}{}samgate-rule 4 0\nsamgate-rule 5 0\n",
            line(2, 5),
            line(1, 6),
            line(2, 5),
        );
        let tasks = [
            task("a", TaskStatus::Failed, &output),
            task("b", TaskStatus::Succeeded, "samgate-rule 0 0\n"),
        ];
        let v = samp_batch_verdicts(
            &refs(&[("a", "gw-1"), ("b", "gw-2")]),
            &tasks,
            &gateways,
            &rules,
        );
        let kind = |s: &Sent| match s {
            Sent::Confirmed => "confirmed",
            Sent::Refused(_) => "refused",
            Sent::Unknown(_) => "unknown",
        };
        let table: Vec<Vec<&str>> = v
            .iter()
            .map(|r| r.iter().map(|(_, s)| kind(s)).collect())
            .collect();
        assert_eq!(
            table,
            vec![
                vec!["confirmed", "unknown"],
                vec!["refused", "unknown"], // an older rule proves nothing of this send
                vec!["refused", "unknown"],
            ],
            "{v:?}"
        );
    }

    #[test]
    fn verify_verdicts_find_samgates_own_rule_and_never_read_failure_as_absence() {
        let gateways = gws(&["gw-1"]);
        let rules = [
            rule("192.0.2.1", 1),
            rule("192.0.2.2", 2),
            rule("192.0.2.3", 3),
            rule("192.0.2.4", 4),
        ];
        let key1 = RuleKey::from_bytes([1; 16]);
        let key9 = RuleKey::from_bytes([9; 16]);
        let samp = format!(
            "uid=<5ac3965f,00000000,3403a8c0,00003312> action=drop comment=samgate:{key1} src_ip_addr=192.0.2.1\n\
             samgate-rule 0 0\n\
             uid=<5ac3965f,00000000,3403a8c0,00003313> action=drop comment=samgate:{key9} src_ip_addr=192.0.2.2\n\
             samgate-rule 1 0\n\
             samgate-rule 2 1\n\
             No matching rules\n\
             samgate-rule 3 0\n"
        );
        let tasks = [task("a", TaskStatus::Succeeded, &samp)];
        let v = verify_verdicts(
            &refs(&[("a", "gw-1")]),
            &tasks,
            &gateways,
            &rules,
            SamMode::FwSamp,
        );
        assert_eq!(v[0][0].1, Presence::InPlace);
        assert_eq!(
            v[1][0].1,
            Presence::Absent,
            "another key's rule is not ours"
        );
        assert!(
            matches!(v[2][0].1, Presence::Unknown(_)),
            "a failed query is not an absence"
        );
        assert_eq!(
            v[3][0].1,
            Presence::Unknown(
                "the query's listing has a line samgate cannot read: \"No matching rules\"".into()
            ),
            "nor is a listing samgate cannot read"
        );
        let uids = listed_uids(&refs(&[("a", "gw-1")]), &tasks, &rules);
        assert_eq!(uids[0]["gw-1"].len(), 1);
        assert!(uids[1]["gw-1"].is_empty());
        assert!(
            !uids[3].contains_key("gw-1"),
            "an unreadable listing names nothing to delete"
        );

        let sam = "src,drop|close|long_noalert,1763640000,192.0.2.1\nsamgate-rule 0 0\n\
                   src,reject|long_noalert,1763640000,192.0.2.2\nsamgate-rule 1 0\n\
                   samgate-rule 2 1\nno SAM rules\nsamgate-rule 3 0\n";
        let tasks = [task("a", TaskStatus::Succeeded, sam)];
        let v = verify_verdicts(
            &refs(&[("a", "gw-1")]),
            &tasks,
            &gateways,
            &rules,
            SamMode::FwSam,
        );
        assert_eq!(v[0][0].1, Presence::InPlace);
        assert_eq!(
            v[1][0].1,
            Presence::Absent,
            "a different action is not our rule"
        );
        assert!(matches!(v[2][0].1, Presence::Unknown(_)), "a failed query");
        assert!(
            matches!(v[3][0].1, Presence::Unknown(_)),
            "an unreadable line"
        );
        let v = verify_verdicts(&[], &[], &gateways, &rules, SamMode::FwSam);
        assert!(
            v.iter().all(|r| matches!(r[0].1, Presence::Unknown(_))),
            "an empty task list proves nothing"
        );
    }
}
