//! Which offsets may be committed: per partition, the lowest offset still in flight (or one past
//! the highest finished when nothing is). An offset is finished only when its result message was
//! acknowledged by Kafka, so a commit never covers an event without a durable result. Offsets are
//! tracked per assignment ([`Claim`]): an event finished under an older assignment of the
//! partition moves nothing.

use std::collections::{BTreeSet, HashMap};

use super::ownership::Claim;

#[derive(Debug, Default)]
struct PartitionOffsets {
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// One past the highest offset begun.
    next: Option<i64>,
    /// The last offset position committed (to skip redundant commits).
    committed: Option<i64>,
}

/// Offsets per partition of one topic.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

impl OffsetTracker {
    /// An event at `offset` was taken under `claim`.
    pub fn begin(&mut self, claim: Claim, offset: i64) {
        let p = self.partitions.entry(claim.partition).or_default();
        if p.generation != claim.generation {
            *p = PartitionOffsets {
                generation: claim.generation,
                ..PartitionOffsets::default()
            };
        }
        p.in_flight.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Its result is durable.
    pub fn finish(&mut self, claim: Claim, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&claim.partition) {
            if p.generation == claim.generation {
                p.in_flight.remove(&offset);
            }
        }
    }

    /// Events taken but not finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }

    /// Events in flight on `partition`.
    pub fn in_flight_on(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.in_flight.len())
    }

    /// The position to commit for `partition` (the next offset to read), if any progress.
    pub fn committable(&self, partition: i32) -> Option<i64> {
        let p = self.partitions.get(&partition)?;
        p.in_flight.first().copied().or(p.next)
    }

    /// Positions that moved since the last [`Self::mark_committed`].
    pub fn pending_commits(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(&partition, p)| {
                let position = p.in_flight.first().copied().or(p.next)?;
                (p.committed != Some(position)).then_some((partition, position))
            })
            .collect();
        out.sort();
        out
    }

    pub fn mark_committed(&mut self, partition: i32, position: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.committed = Some(position);
        }
    }

    /// Forgets a revoked partition: its unfinished events go back to the group.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(partition: i32) -> Claim {
        Claim {
            partition,
            generation: 1,
        }
    }

    #[test]
    fn commits_advance_only_over_an_unbroken_run_of_finished_offsets() {
        let mut t = OffsetTracker::default();
        let p0 = claim(0);
        for o in 10..15 {
            t.begin(p0, o);
        }
        assert_eq!(t.committable(0), Some(10));
        t.finish(p0, 11);
        t.finish(p0, 12);
        assert_eq!(t.committable(0), Some(10), "10 is still in flight");
        t.finish(p0, 10);
        assert_eq!(t.committable(0), Some(13));
        t.finish(p0, 14);
        assert_eq!(t.committable(0), Some(13));
        t.finish(p0, 13);
        assert_eq!(t.committable(0), Some(15), "one past the last finished");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_commits_are_not_repeated() {
        let mut t = OffsetTracker::default();
        t.begin(claim(0), 5);
        t.begin(claim(1), 7);
        t.finish(claim(1), 7);
        assert_eq!(t.pending_commits(), vec![(0, 5), (1, 8)]);
        t.mark_committed(0, 5);
        t.mark_committed(1, 8);
        assert!(t.pending_commits().is_empty());
        t.finish(claim(0), 5);
        assert_eq!(t.pending_commits(), vec![(0, 6)]);
        t.forget(0);
        assert_eq!(t.committable(0), None);
        assert_eq!(t.in_flight_on(1), 0);
    }

    #[test]
    fn an_older_assignment_moves_nothing() {
        let mut t = OffsetTracker::default();
        let old = claim(0);
        let new = Claim {
            partition: 0,
            generation: 2,
        };
        t.begin(old, 5);
        t.forget(0);
        t.begin(new, 5);
        t.begin(new, 6);
        t.finish(old, 5);
        assert_eq!(t.committable(0), Some(5), "the old finish does not count");
        t.finish(new, 5);
        assert_eq!(t.committable(0), Some(6));
    }
}
