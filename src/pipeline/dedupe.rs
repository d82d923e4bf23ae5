//! Dedupe: what is blocked right now, per idempotency key, so a repeat detection costs no
//! firewall call; and what was blocked recently, so a repeat offender's next block is longer.
//!
//! The state is owned per events partition (one partition, one owner per site and IP). Every
//! enforced block is written to the compacted state topic, to the same partition number as the
//! event, keyed by idempotency key; a replica that is assigned a partition reads that state
//! partition to its end before it takes any event from it.
//!
//! Memory: one entry per key blocked within `policy.escalation_window` (about 200 bytes each),
//! at most `run.max_tracked_blocks`; past that, entries whose block has expired go first
//! (oldest first), then the oldest active ones (which can only cost a redundant block).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::checkpoint::sam::RuleKey;

/// Schema id of state records.
pub const STATE_SCHEMA: &str = "samgate.state.v1";

/// One enforced block, as kept in memory and on the state topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub schema: String,
    pub key: RuleKey,
    pub site: String,
    pub ip: IpAddr,
    pub target: String,
    /// 0 for a first block, +1 for each repeat within the escalation window.
    pub level: u32,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub blocked_at: DateTime<Utc>,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
    /// The event whose decision made this block.
    pub event_id: String,
    /// Written before the firewall call: the block may or may not be in place. A replica that
    /// finds a pending record (after a crash) asks the gateway before blocking again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// What the state says about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Blocked until `expires_at`: a repeat is a duplicate.
    Active(BlockRecord),
    /// A block for this key is being enforced right now.
    Pending,
    /// A block for this key was being enforced when its previous owner stopped: it may be in
    /// place. Verify on the gateway before blocking.
    Unconfirmed(BlockRecord),
    /// Blocked before, expired, within the escalation window: block at `level`.
    Repeat { level: u32 },
    /// Never blocked (or long ago): block at level 0.
    New,
}

/// Blocks by idempotency key, tagged with the events partition that owns them.
#[derive(Debug)]
pub struct BlockState {
    records: HashMap<RuleKey, (i32, BlockRecord)>,
    pending: HashMap<RuleKey, i32>,
    unconfirmed: HashMap<RuleKey, (i32, BlockRecord)>,
    max: usize,
    window: Duration,
}

impl BlockState {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            records: HashMap::new(),
            pending: HashMap::new(),
            unconfirmed: HashMap::new(),
            max,
            window,
        }
    }

    pub fn check(&self, key: &RuleKey, now: DateTime<Utc>) -> Check {
        if self.pending.contains_key(key) {
            return Check::Pending;
        }
        if let Some((_, r)) = self.unconfirmed.get(key) {
            return Check::Unconfirmed(r.clone());
        }
        match self.records.get(key) {
            Some((_, r)) if r.expires_at > now => Check::Active(r.clone()),
            Some((_, r)) if self.remembered(r, now) => Check::Repeat { level: r.level + 1 },
            _ => Check::New,
        }
    }

    fn remembered(&self, record: &BlockRecord, now: DateTime<Utc>) -> bool {
        let window = chrono::Duration::from_std(self.window).unwrap_or(chrono::Duration::MAX);
        record.blocked_at + window > now
    }

    /// A block for `key` is on its way to the firewall.
    pub fn begin(&mut self, key: RuleKey, partition: i32) {
        self.unconfirmed.remove(&key);
        self.pending.insert(key, partition);
    }

    /// The block did not happen (failed, or its partition was revoked).
    pub fn abort(&mut self, key: &RuleKey) {
        self.pending.remove(key);
    }

    /// The block is enforced (or was loaded from the state topic).
    pub fn record(&mut self, partition: i32, record: BlockRecord, now: DateTime<Utc>) {
        if record.pending {
            // Only ever loaded from the state topic: a block whose outcome nobody saw.
            if !self.pending.contains_key(&record.key) && record.expires_at > now {
                self.unconfirmed.insert(record.key, (partition, record));
            }
            return;
        }
        self.unconfirmed.remove(&record.key);
        self.pending.remove(&record.key);
        if !self.remembered(&record, now) {
            self.records.remove(&record.key);
            return;
        }
        self.records.insert(record.key, (partition, record));
        if self.records.len() > self.max {
            self.evict(now);
        }
    }

    /// Forgets a key (a tombstone on the state topic).
    pub fn remove(&mut self, key: &RuleKey) {
        self.records.remove(key);
        self.unconfirmed.remove(key);
    }

    /// Drops everything a revoked partition owned.
    pub fn drop_partition(&mut self, partition: i32) {
        self.records.retain(|_, (p, _)| *p != partition);
        self.pending.retain(|_, p| *p != partition);
        self.unconfirmed.retain(|_, (p, _)| *p != partition);
    }

    /// Blocks active now.
    pub fn active(&self, now: DateTime<Utc>) -> usize {
        self.records
            .values()
            .filter(|(_, r)| r.expires_at > now)
            .count()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn evict(&mut self, now: DateTime<Utc>) {
        let target = self.max - self.max / 10; // free 10 % at once, not one per insert
        let mut by_age: Vec<(bool, DateTime<Utc>, RuleKey)> = self
            .records
            .values()
            .map(|(_, r)| (r.expires_at > now, r.blocked_at, r.key))
            .collect();
        by_age.sort(); // expired (false) first, then oldest
        let excess = self.records.len().saturating_sub(target);
        for (_, _, key) in by_age.into_iter().take(excess) {
            self.records.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> RuleKey {
        RuleKey::from_bytes([n; 16])
    }

    fn record(n: u8, blocked: DateTime<Utc>, hours: i64, level: u32) -> BlockRecord {
        BlockRecord {
            schema: STATE_SCHEMA.into(),
            key: key(n),
            site: "s".into(),
            ip: "192.0.2.1".parse().unwrap(),
            target: "t".into(),
            level,
            blocked_at: blocked,
            expires_at: blocked + chrono::Duration::hours(hours),
            event_id: "e".into(),
            pending: false,
        }
    }

    #[test]
    fn active_pending_repeat_and_new() {
        let now = Utc::now();
        let mut s = BlockState::new(100, Duration::from_secs(30 * 86400));
        assert_eq!(s.check(&key(1), now), Check::New);
        s.begin(key(1), 0);
        assert_eq!(s.check(&key(1), now), Check::Pending);
        s.record(0, record(1, now, 1, 0), now);
        assert!(matches!(s.check(&key(1), now), Check::Active(_)));
        let later = now + chrono::Duration::hours(2);
        assert_eq!(s.check(&key(1), later), Check::Repeat { level: 1 });
        let much_later = now + chrono::Duration::days(31);
        assert_eq!(
            s.check(&key(1), much_later),
            Check::New,
            "outside the window"
        );
        s.begin(key(2), 0);
        s.abort(&key(2));
        assert_eq!(s.check(&key(2), now), Check::New);
    }

    #[test]
    fn a_pending_record_from_the_state_topic_asks_for_verification() {
        let now = Utc::now();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        let mut pending = record(1, now, 1, 2);
        pending.pending = true;
        s.record(0, pending.clone(), now);
        assert_eq!(s.check(&key(1), now), Check::Unconfirmed(pending));
        s.record(0, record(1, now, 1, 2), now);
        assert!(
            matches!(s.check(&key(1), now), Check::Active(_)),
            "confirmed"
        );
    }

    #[test]
    fn partitions_own_their_keys() {
        let now = Utc::now();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.record(0, record(1, now, 1, 0), now);
        s.record(1, record(2, now, 1, 0), now);
        s.drop_partition(0);
        assert_eq!(s.check(&key(1), now), Check::New);
        assert!(matches!(s.check(&key(2), now), Check::Active(_)));
    }

    #[test]
    fn memory_is_bounded_and_expired_blocks_go_first() {
        let now = Utc::now();
        let mut s = BlockState::new(10, Duration::from_secs(30 * 86400));
        s.record(0, record(200, now - chrono::Duration::hours(5), 1, 0), now); // expired
        for n in 0..12u8 {
            s.record(0, record(n, now, 1, 0), now);
        }
        assert!(s.len() <= 10);
        assert_eq!(
            s.check(&key(200), now),
            Check::New,
            "the expired one was evicted first"
        );
        assert!(
            matches!(s.check(&key(11), now), Check::Active(_)),
            "the newest is kept"
        );
    }

    #[test]
    fn records_outside_the_window_are_not_kept() {
        let now = Utc::now();
        let mut s = BlockState::new(10, Duration::from_secs(3600));
        s.record(0, record(1, now - chrono::Duration::hours(3), 1, 0), now);
        assert!(s.is_empty());
    }
}
