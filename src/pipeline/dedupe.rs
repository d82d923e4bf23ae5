//! Dedupe: what is blocked right now, per idempotency key, so a repeat detection costs no
//! firewall call; and what was blocked recently, so a repeat offender's next block is longer.
//!
//! The state is owned per events partition (one partition, one owner per site and IP). Every
//! block is written to the compacted state topic, to the same partition number as the event,
//! keyed by idempotency key: a *pending* record before the rule is sent (write-ahead), an
//! *active* one when the gateways confirmed it. A replica assigned a partition reads that state
//! partition to its end before it takes any event from it; a pending record without an active
//! one after it means the previous owner may have sent the rule: the key is *unconfirmed*, and
//! the gateways are asked before anything is sent.
//!
//! Memory: one fixed-size entry per key (about 60 bytes with the map's overhead), at most
//! `run.max_tracked_blocks`. Past that, history whose block has expired goes first, oldest first;
//! an active, in-flight or unconfirmed block is never dropped. When only those are left, a new
//! key is refused ([`Full`]), which the pipeline reports as a `failed` result (`state_full`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::checkpoint::sam::RuleKey;

/// Schema id of state records.
pub const STATE_SCHEMA: &str = "samgate.state.v1";

/// One block as written to the state topic.
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
    /// Written before the firewall call: the block may or may not be in place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// The replica that wrote the record (`pipeline::ownership::replica_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl BlockRecord {
    pub fn tracked(&self) -> TrackedBlock {
        TrackedBlock {
            level: self.level,
            blocked_at: self.blocked_at,
            expires_at: self.expires_at,
            event_id: Some(self.event_id.clone()).filter(|e| !e.is_empty()),
        }
    }
}

/// A block as decisions and results see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedBlock {
    pub level: u32,
    pub blocked_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The samgate event that made it.
    pub event_id: Option<String>,
}

/// What the state says about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Blocked until `expires_at`: a repeat is a duplicate.
    Active(TrackedBlock),
    /// A block for this key is being enforced right now.
    Pending,
    /// A block for this key may be in place (its sender stopped before it could tell): ask the
    /// gateways before blocking.
    Unconfirmed(TrackedBlock),
    /// Blocked before, expired, within the escalation window: block at `level`.
    Repeat { level: u32 },
    /// Never blocked (or long ago): block at level 0.
    New,
}

/// Refused: every tracked key is an active, in-flight or unconfirmed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// The fields describe a block that was confirmed (active until `expires_ms`).
    Settled,
    /// A block for this key is on its way to the firewall; the fields are the last settled one.
    InFlight,
    /// The fields describe a block that may or may not be in place.
    Unconfirmed,
}

/// One key in memory: fixed size, no heap.
#[derive(Debug, Clone, Copy)]
struct Entry {
    partition: i32,
    status: Status,
    /// Whether the fields hold a block at all (an in-flight first block has none yet).
    known: bool,
    /// While in flight here, another replica wrote a record for this key: ask the gateways
    /// before sending.
    contested: bool,
    level: u32,
    blocked_ms: i64,
    expires_ms: i64,
    /// The event id's 16 bytes (samgate ids are 32 hex digits); all zero when unknown.
    event: [u8; 16],
}

impl Entry {
    fn block(&self) -> TrackedBlock {
        let at = |ms: i64| Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
        TrackedBlock {
            level: self.level,
            blocked_at: at(self.blocked_ms),
            expires_at: at(self.expires_ms),
            event_id: (self.event != [0; 16]).then(|| hex(&self.event)),
        }
    }

    fn set_block(&mut self, block: &TrackedBlock) {
        self.known = true;
        self.level = block.level;
        self.blocked_ms = block.blocked_at.timestamp_millis();
        self.expires_ms = block.expires_at.timestamp_millis();
        self.event = block
            .event_id
            .as_deref()
            .and_then(|id| RuleKey::parse(id).map(|k| k.bytes()))
            .unwrap_or([0; 16]);
    }
}

fn hex(bytes: &[u8; 16]) -> String {
    RuleKey::from_bytes(*bytes).to_string()
}

/// Blocks by idempotency key, tagged with the events partition that owns them.
#[derive(Debug)]
pub struct BlockState {
    entries: HashMap<RuleKey, Entry>,
    max: usize,
    window_ms: i64,
}

impl BlockState {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            max,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
        }
    }

    pub fn check(&self, key: &RuleKey, now: DateTime<Utc>) -> Check {
        let now = now.timestamp_millis();
        let Some(entry) = self.entries.get(key) else {
            return Check::New;
        };
        match entry.status {
            Status::InFlight => Check::Pending,
            Status::Unconfirmed if entry.expires_ms > now => Check::Unconfirmed(entry.block()),
            _ if !entry.known => Check::New,
            Status::Settled if entry.expires_ms > now => Check::Active(entry.block()),
            _ if entry.blocked_ms.saturating_add(self.window_ms) > now => Check::Repeat {
                level: entry.level + 1,
            },
            _ => Check::New,
        }
    }

    /// A block for `key` is on its way to the firewall. A new key is refused when only blocks
    /// that must not be forgotten are tracked.
    pub fn begin(&mut self, key: RuleKey, partition: i32, now: DateTime<Utc>) -> Result<(), Full> {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.status = Status::InFlight;
            entry.contested = false;
            entry.partition = partition;
            return Ok(());
        }
        if self.entries.len() >= self.max && self.evict(now) == 0 {
            return Err(Full);
        }
        self.entries.insert(
            key,
            Entry {
                partition,
                status: Status::InFlight,
                known: false,
                contested: false,
                level: 0,
                blocked_ms: 0,
                expires_ms: 0,
                event: [0; 16],
            },
        );
        Ok(())
    }

    /// The block was not sent anywhere (dropped, or refused for good): back to what was known.
    pub fn abort(&mut self, key: &RuleKey) {
        let forget = match self.entries.get_mut(key) {
            Some(entry) if entry.status == Status::InFlight => {
                entry.status = Status::Settled;
                !entry.known
            }
            _ => false,
        };
        if forget {
            self.entries.remove(key);
        }
    }

    /// The block may be in place and nobody knows: the next decision asks the gateways first.
    pub fn unconfirm(&mut self, key: RuleKey, partition: i32, block: &TrackedBlock) {
        let entry = self.entries.entry(key).or_insert(Entry {
            partition,
            status: Status::Unconfirmed,
            known: true,
            contested: false,
            level: 0,
            blocked_ms: 0,
            expires_ms: 0,
            event: [0; 16],
        });
        entry.status = Status::Unconfirmed;
        entry.partition = partition;
        entry.set_block(block);
    }

    /// The block is confirmed on every gateway.
    pub fn confirm(&mut self, key: RuleKey, partition: i32, block: &TrackedBlock) {
        let entry = self.entries.entry(key).or_insert(Entry {
            partition,
            status: Status::Settled,
            known: true,
            contested: false,
            level: 0,
            blocked_ms: 0,
            expires_ms: 0,
            event: [0; 16],
        });
        entry.status = Status::Settled;
        entry.partition = partition;
        entry.set_block(block);
    }

    /// A record read from the state topic (later records of a key replace earlier ones).
    /// Loading never refuses: the topic holds blocks that are in place.
    pub fn load(&mut self, partition: i32, record: &BlockRecord, now: DateTime<Utc>) {
        let block = record.tracked();
        let past_window = block
            .blocked_at
            .timestamp_millis()
            .saturating_add(self.window_ms)
            <= now.timestamp_millis();
        if record.pending {
            self.unconfirm(record.key, partition, &block);
        } else if past_window && block.expires_at <= now {
            self.entries.remove(&record.key);
        } else {
            self.confirm(record.key, partition, &block);
        }
    }

    /// Takes over the entries of a partition's freshly read state.
    pub fn absorb(&mut self, part: BlockState) {
        self.entries.extend(part.entries);
    }

    /// A record another replica wrote, read while we own its partition. A key in flight here
    /// is marked contested (the rule may be on its way from both); any other is taken as read.
    pub fn foreign(&mut self, partition: i32, record: &BlockRecord, now: DateTime<Utc>) {
        match self.entries.get_mut(&record.key) {
            Some(entry) if entry.status == Status::InFlight => entry.contested = true,
            _ => self.load(partition, record, now),
        }
    }

    /// Whether another replica wrote a record for `key` while it was in flight here (clears the
    /// mark).
    pub fn take_contested(&mut self, key: &RuleKey) -> bool {
        self.entries
            .get_mut(key)
            .is_some_and(|e| std::mem::take(&mut e.contested))
    }

    /// Forgets a key (a tombstone on the state topic).
    pub fn remove(&mut self, key: &RuleKey) {
        self.entries.remove(key);
    }

    /// Drops everything a revoked partition owned.
    pub fn drop_partition(&mut self, partition: i32) {
        self.entries.retain(|_, e| e.partition != partition);
    }

    /// Blocks active now.
    pub fn active(&self, now: DateTime<Utc>) -> usize {
        let now = now.timestamp_millis();
        self.entries
            .values()
            .filter(|e| e.known && e.status == Status::Settled && e.expires_ms > now)
            .count()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frees a tenth of the bound from expired history, oldest first. Returns how many went.
    fn evict(&mut self, now: DateTime<Utc>) -> usize {
        let now = now.timestamp_millis();
        let mut expired: Vec<(i64, RuleKey)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.status == Status::Settled && e.expires_ms <= now)
            .map(|(k, e)| (e.blocked_ms, *k))
            .collect();
        let room = (self.max / 10).max(1);
        if expired.len() > room {
            expired.select_nth_unstable(room - 1);
            expired.truncate(room);
        }
        for (_, key) in &expired {
            self.entries.remove(key);
        }
        expired.len()
    }
}

impl super::decide::BlockView for BlockState {
    fn check(&self, key: &RuleKey, now: DateTime<Utc>) -> Check {
        BlockState::check(self, key, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Now, to the millisecond (what the state keeps).
    fn now_ms() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(Utc::now().timestamp_millis())
            .unwrap()
    }

    fn key(n: u8) -> RuleKey {
        RuleKey::from_bytes([n; 16])
    }

    fn block(blocked: DateTime<Utc>, hours: i64, level: u32) -> TrackedBlock {
        TrackedBlock {
            level,
            blocked_at: blocked,
            expires_at: blocked + chrono::Duration::hours(hours),
            event_id: Some("0123456789abcdef0123456789abcdef".into()),
        }
    }

    fn record(n: u8, block: &TrackedBlock, pending: bool) -> BlockRecord {
        BlockRecord {
            schema: STATE_SCHEMA.into(),
            key: key(n),
            site: "s".into(),
            ip: "192.0.2.1".parse().unwrap(),
            target: "t".into(),
            level: block.level,
            blocked_at: block.blocked_at,
            expires_at: block.expires_at,
            event_id: block.event_id.clone().unwrap_or_default(),
            pending,
            writer: None,
        }
    }

    #[test]
    fn a_key_goes_from_new_to_pending_to_active_to_repeat() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(30 * 86400));
        assert_eq!(s.check(&key(1), now), Check::New);
        s.begin(key(1), 0, now).unwrap();
        assert_eq!(s.check(&key(1), now), Check::Pending);
        let b = block(now, 1, 0);
        s.confirm(key(1), 0, &b);
        assert_eq!(s.check(&key(1), now), Check::Active(b.clone()));
        let later = now + chrono::Duration::hours(2);
        assert_eq!(s.check(&key(1), later), Check::Repeat { level: 1 });
        s.begin(key(1), 0, later).unwrap();
        s.abort(&key(1));
        assert_eq!(
            s.check(&key(1), later),
            Check::Repeat { level: 1 },
            "an abort keeps the history for escalation"
        );
        let much_later = now + chrono::Duration::days(31);
        assert_eq!(
            s.check(&key(1), much_later),
            Check::New,
            "outside the window"
        );
        s.begin(key(2), 0, now).unwrap();
        s.abort(&key(2));
        assert_eq!(s.check(&key(2), now), Check::New);
        assert_eq!(s.len(), 1, "an aborted first block leaves nothing behind");
    }

    #[test]
    fn a_block_whose_fate_is_unknown_stays_unconfirmed_until_settled() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.begin(key(1), 0, now).unwrap();
        let b = block(now, 1, 2);
        s.unconfirm(key(1), 0, &b);
        assert_eq!(s.check(&key(1), now), Check::Unconfirmed(b.clone()));
        let expired = now + chrono::Duration::hours(2);
        assert_eq!(
            s.check(&key(1), expired),
            Check::Repeat { level: 3 },
            "once it would have expired, it is gone either way"
        );
        s.confirm(key(1), 0, &b);
        assert_eq!(s.check(&key(1), now), Check::Active(b));
    }

    #[test]
    fn records_from_the_state_topic_rebuild_the_state() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        let b = block(now, 1, 2);
        s.load(0, &record(1, &b, true), now);
        assert_eq!(s.check(&key(1), now), Check::Unconfirmed(b.clone()));
        s.load(0, &record(1, &b, false), now);
        assert_eq!(s.check(&key(1), now), Check::Active(b.clone()));
        let old = block(now - chrono::Duration::hours(30), 1, 0);
        s.load(0, &record(2, &old, false), now);
        assert_eq!(
            s.check(&key(2), now),
            Check::New,
            "outside the window: not kept"
        );
        assert_eq!(s.len(), 1);
        s.remove(&key(1));
        assert!(s.is_empty());
    }

    #[test]
    fn partitions_own_their_keys() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.confirm(key(1), 0, &block(now, 1, 0));
        s.confirm(key(2), 1, &block(now, 1, 0));
        s.drop_partition(0);
        assert_eq!(s.check(&key(1), now), Check::New);
        assert!(matches!(s.check(&key(2), now), Check::Active(_)));
    }

    #[test]
    fn memory_is_bounded_and_only_expired_history_is_evicted() {
        let now = now_ms();
        let mut s = BlockState::new(10, Duration::from_secs(30 * 86400));
        for n in 0..5u8 {
            let b = block(now - chrono::Duration::hours(5 + i64::from(n)), 1, 0);
            s.confirm(key(100 + n), 0, &b); // expired history
        }
        for n in 0..5u8 {
            s.confirm(key(n), 0, &block(now, 1, 0)); // active
        }
        assert_eq!(s.len(), 10);
        s.begin(key(50), 0, now).unwrap();
        assert_eq!(
            s.check(&key(104), now),
            Check::New,
            "the oldest expired history went first"
        );
        assert!(matches!(s.check(&key(103), now), Check::Repeat { .. }));
        for n in 0..5u8 {
            assert!(matches!(s.check(&key(n), now), Check::Active(_)));
        }
        // Fill with blocks that must be kept: a new key is refused, nothing is dropped.
        let mut s = BlockState::new(3, Duration::from_secs(86400));
        s.confirm(key(1), 0, &block(now, 1, 0));
        s.begin(key(2), 0, now).unwrap();
        s.unconfirm(key(3), 0, &block(now, 1, 0));
        assert_eq!(s.begin(key(4), 0, now), Err(Full));
        assert_eq!(s.len(), 3);
        s.begin(key(1), 0, now).unwrap(); // a tracked key is not new tracking
    }

    #[test]
    fn another_writers_record_contests_a_block_in_flight() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.begin(key(1), 0, now).unwrap();
        let b = block(now, 1, 0);
        s.foreign(0, &record(1, &b, true), now);
        assert_eq!(
            s.check(&key(1), now),
            Check::Pending,
            "still ours in flight"
        );
        assert!(s.take_contested(&key(1)));
        assert!(!s.take_contested(&key(1)), "taken once");
        s.foreign(0, &record(2, &b, false), now);
        assert_eq!(
            s.check(&key(2), now),
            Check::Active(b),
            "any other key: as read"
        );
    }

    #[test]
    fn an_entry_is_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 48,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }
}
