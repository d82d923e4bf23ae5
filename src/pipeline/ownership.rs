//! Ownership fencing: which partitions this replica owns, since when, and which of their rules
//! are being sent right now.
//!
//! Every assignment of a partition gets a new *generation*. Work carries the generation of the
//! assignment it was taken under; once the partition is revoked (or assigned again), that work is
//! stale: it is dropped before it reaches a firewall, and its results are not written (the new
//! owner answers the redelivered events). A send that already started cannot be called back, so
//! the revoke waits for it (bounded, [`Ownership::wait_idle`]) before the partition goes: the new
//! owner then finds the rule's pending record and asks the gateways before sending anything.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The state-topic key of claim records (one per partition, kept by compaction).
pub const CLAIM_KEY: &str = "claim";

/// Schema id of claim records.
pub const CLAIM_SCHEMA: &str = "samgate.claim.v1";

/// "This replica owns this partition from now on", written to the partition of the state topic
/// once its state is loaded. A replica that reads a newer claim than its own for a partition it
/// still works on was replaced without being told (a zombie, or a broker that assigned the
/// partition twice): it stops sending for that partition at once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClaimRecord {
    pub schema: String,
    pub partition: i32,
    /// The claiming replica ([`replica_id`]).
    pub replica: String,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub claimed_at: chrono::DateTime<chrono::Utc>,
}

/// A name for this process, unique among replicas: host, process id, start time.
pub fn replica_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{}/{}/{nanos:x}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    )
}

/// A partition as owned under one assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claim {
    pub partition: i32,
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Owned {
    generation: HashMap<i32, u64>,
    next: u64,
    /// Partitions whose block state is still being read (not consumed yet).
    loading: HashSet<i32>,
    /// Rules on their way to a firewall, per partition.
    sending: HashMap<i32, usize>,
}

/// The partitions this replica owns.
#[derive(Debug, Default)]
pub struct Ownership {
    owned: Mutex<Owned>,
    idle: Condvar,
}

impl Ownership {
    /// `partitions` are ours from now on, under new generations; their state is to be loaded.
    pub fn assign(&self, partitions: &[i32]) -> Vec<Claim> {
        let mut o = self.owned.lock().expect("ownership");
        partitions
            .iter()
            .map(|&partition| {
                o.next += 1;
                let generation = o.next;
                o.generation.insert(partition, generation);
                o.loading.insert(partition);
                Claim {
                    partition,
                    generation,
                }
            })
            .collect()
    }

    /// `partitions` are no longer ours: their work is stale from now on.
    pub fn revoke(&self, partitions: &[i32]) {
        let mut o = self.owned.lock().expect("ownership");
        for p in partitions {
            o.generation.remove(p);
            o.loading.remove(p);
        }
    }

    /// The current claim on `partition`, if we own it.
    pub fn claim(&self, partition: i32) -> Option<Claim> {
        let o = self.owned.lock().expect("ownership");
        o.generation.get(&partition).map(|&generation| Claim {
            partition,
            generation,
        })
    }

    pub fn is_current(&self, claim: Claim) -> bool {
        let o = self.owned.lock().expect("ownership");
        o.generation.get(&claim.partition) == Some(&claim.generation)
    }

    /// The claim's state is loaded: its partition may be consumed. False if it went meanwhile.
    pub fn loaded(&self, claim: Claim) -> bool {
        let mut o = self.owned.lock().expect("ownership");
        if o.generation.get(&claim.partition) != Some(&claim.generation) {
            return false;
        }
        o.loading.remove(&claim.partition);
        true
    }

    /// Whether `partition` is owned and its state loaded.
    pub fn ready(&self, partition: i32) -> bool {
        let o = self.owned.lock().expect("ownership");
        o.generation.contains_key(&partition) && !o.loading.contains(&partition)
    }

    /// Partitions owned whose state is still loading.
    pub fn loading(&self) -> Vec<i32> {
        let o = self.owned.lock().expect("ownership");
        let mut loading: Vec<i32> = o.loading.iter().copied().collect();
        loading.sort_unstable();
        loading
    }

    /// Starts sending rules of `claims`: which of them are still current (only those may be
    /// sent), and a guard that a revoke waits for until it is dropped.
    pub fn begin_send(&self, claims: &[Claim]) -> (SendGuard<'_>, Vec<bool>) {
        let mut o = self.owned.lock().expect("ownership");
        let current: Vec<bool> = claims
            .iter()
            .map(|c| o.generation.get(&c.partition) == Some(&c.generation))
            .collect();
        let mut partitions: Vec<i32> = claims
            .iter()
            .zip(&current)
            .filter(|(_, current)| **current)
            .map(|(c, _)| c.partition)
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        for p in &partitions {
            *o.sending.entry(*p).or_default() += 1;
        }
        (
            SendGuard {
                ownership: self,
                partitions,
            },
            current,
        )
    }

    /// Waits until no rule of `partitions` is being sent, at most `timeout`. Returns how many
    /// sends were still running when it gave up (0 when idle).
    pub fn wait_idle(&self, partitions: &[i32], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut o = self.owned.lock().expect("ownership");
        loop {
            let busy: usize = partitions
                .iter()
                .map(|p| o.sending.get(p).copied().unwrap_or(0))
                .sum();
            let left = deadline.saturating_duration_since(Instant::now());
            if busy == 0 || left.is_zero() {
                return busy;
            }
            o = self.idle.wait_timeout(o, left).expect("ownership").0;
        }
    }
}

/// Held while rules are on their way to a firewall.
#[derive(Debug)]
pub struct SendGuard<'a> {
    ownership: &'a Ownership,
    partitions: Vec<i32>,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        let mut o = self.ownership.owned.lock().expect("ownership");
        for p in &self.partitions {
            if let Some(n) = o.sending.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    o.sending.remove(p);
                }
            }
        }
        self.ownership.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn work_of_an_older_assignment_is_stale() {
        let o = Ownership::default();
        let first = o.assign(&[0, 1]);
        assert!(!o.ready(0), "loading until its state is read");
        assert!(o.loaded(first[0]));
        assert!(o.ready(0));
        assert_eq!(o.loading(), vec![1]);
        o.revoke(&[0]);
        assert!(!o.is_current(first[0]));
        let again = o.assign(&[0]);
        assert!(
            !o.is_current(first[0]),
            "a new assignment is a new generation"
        );
        assert!(o.is_current(again[0]));
        assert!(
            !o.loaded(first[0]),
            "an old load does not open the new assignment"
        );
        let (_guard, current) = o.begin_send(&[first[0], again[0], first[1]]);
        assert_eq!(current, vec![false, true, true]);
    }

    #[test]
    fn a_revoke_waits_for_sends_in_progress_and_gives_up_at_its_limit() {
        let o = Arc::new(Ownership::default());
        let claims = o.assign(&[3]);
        let (guard, current) = o.begin_send(&claims);
        assert_eq!(current, vec![true]);
        assert_eq!(
            o.wait_idle(&[3], Duration::from_millis(20)),
            1,
            "gave up, one busy"
        );
        assert_eq!(
            o.wait_idle(&[4], Duration::from_secs(5)),
            0,
            "other partitions are idle"
        );
        let waiter = {
            let o = o.clone();
            std::thread::spawn(move || o.wait_idle(&[3], Duration::from_secs(3600)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "waits while the send is in progress");
        drop(guard);
        // Only the send's end wakes it (a missed wake-up would hang here for an hour).
        assert_eq!(waiter.join().unwrap(), 0, "woken when the send ended");
    }
}
