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
//! Memory: one fixed-size entry per key (a 16-byte key and at most 80 bytes; about 100 with
//! the map's overhead), at most
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
    /// Who asked for the block: a detection, an operator, reconcile.
    #[serde(default)]
    pub origin: Origin,
    /// The operator, for a manual block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The block ended and its `expired` result is written (the record stays, for escalation,
    /// until the escalation window passes; then a tombstone).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
}

/// Who or what made a decision.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Origin {
    /// A detection (an ADS event).
    #[default]
    Automatic,
    /// An operator command.
    Manual,
    /// The reconcile loop (a rule found missing, or orphaned).
    Reconcile,
    /// The block's time ran out.
    Expiry,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Where a block applies: the site that asked for it, the address, the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub site: String,
    pub ip: IpAddr,
    pub target: String,
}

/// Schema id of exemption records on the state topic.
pub const EXEMPTION_SCHEMA: &str = "samgate.exemption.v1";

/// An exemption as written to the state topic (key [`exemption_key`]): the address is not
/// blocked automatically at the site until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExemptionRecord {
    pub schema: String,
    pub site: String,
    pub ip: IpAddr,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub since: DateTime<Utc>,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub until: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The command that made it.
    pub command_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// The state-topic key of an exemption: `exempt/<site>/<ip>`.
pub fn exemption_key(site: &str, ip: IpAddr) -> String {
    format!("{EXEMPTION_PREFIX}{site}/{ip}")
}

/// The prefix of exemption keys.
pub const EXEMPTION_PREFIX: &str = "exempt/";

/// The site and address of an exemption key.
pub fn parse_exemption_key(key: &str) -> Option<(String, IpAddr)> {
    let rest = key.strip_prefix(EXEMPTION_PREFIX)?;
    let (site, ip) = rest.rsplit_once('/')?;
    Some((site.to_owned(), ip.parse().ok()?))
}

impl BlockRecord {
    pub fn tracked(&self) -> TrackedBlock {
        TrackedBlock {
            level: self.level,
            blocked_at: self.blocked_at,
            expires_at: self.expires_at,
            event_id: Some(self.event_id.clone()).filter(|e| !e.is_empty()),
            origin: self.origin,
            actor: self.actor.clone(),
        }
    }
}

/// A block as decisions and results see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedBlock {
    pub level: u32,
    pub blocked_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The samgate event (or operator command) that made it.
    pub event_id: Option<String>,
    /// Who asked for it.
    pub origin: Origin,
    /// The operator, for a manual block.
    pub actor: Option<String>,
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
    /// The block's `expired` result is written.
    expiry_reported: bool,
    /// An unblock is removing the rule: reconcile must not re-assert it.
    removing: bool,
    /// Reconcile is re-asserting the rule: a later reconcile must not queue it again.
    reasserting: bool,
    /// The block was unconfirmed when the send in flight began: what an abort goes back to.
    unconfirmed_before: bool,
    level: u32,
    blocked_ms: i64,
    expires_ms: i64,
    /// The event id's 16 bytes (samgate ids are 32 hex digits); all zero when unknown.
    event: [u8; 16],
    ip: IpAddr,
    /// Index of the (site, target) pair in [`BlockState::names`].
    names: u32,
    origin: Origin,
    /// 1 + the index of the operator in [`BlockState::actors`]; 0 for none.
    actor: u32,
}

impl Entry {
    fn block(&self, actors: &[String]) -> TrackedBlock {
        let at = |ms: i64| Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
        TrackedBlock {
            level: self.level,
            blocked_at: at(self.blocked_ms),
            expires_at: at(self.expires_ms),
            event_id: (self.event != [0; 16]).then(|| hex(&self.event)),
            origin: self.origin,
            actor: (self.actor as usize)
                .checked_sub(1)
                .and_then(|i| actors.get(i).cloned()),
        }
    }

    fn set_block(&mut self, block: &TrackedBlock) {
        if !self.known || block.expires_at.timestamp_millis() != self.expires_ms {
            self.expiry_reported = false;
        }
        self.known = true;
        self.origin = block.origin;
        self.level = block.level;
        self.blocked_ms = block.blocked_at.timestamp_millis();
        self.expires_ms = block.expires_at.timestamp_millis();
        self.event = block
            .event_id
            .as_deref()
            .and_then(|id| RuleKey::parse(id).map(|k| k.bytes()))
            .unwrap_or([0; 16]);
    }

    fn active(&self, now_ms: i64) -> bool {
        self.known && self.status == Status::Settled && self.expires_ms > now_ms
    }
}

fn hex(bytes: &[u8; 16]) -> String {
    RuleKey::from_bytes(*bytes).to_string()
}

/// One exemption in memory: its partition and end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exempt {
    partition: i32,
    until_ms: i64,
}

/// A block whose time ran out, to be reported `expired` (see [`BlockState::sweep`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub key: RuleKey,
    pub partition: i32,
    pub subject: Subject,
    pub block: TrackedBlock,
}

/// What [`BlockState::sweep`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Blocks that expired since the last sweep: an `expired` result each.
    pub expired: Vec<Ended>,
    /// Expired blocks past the escalation window, forgotten: a tombstone each.
    pub forgotten: Vec<(RuleKey, i32)>,
    /// Exemptions that ended, forgotten: a tombstone and a `released` result each.
    pub exemptions_ended: Vec<(String, IpAddr, i32)>,
}

/// Blocks by idempotency key, tagged with the events partition that owns them; and exemptions
/// by site and address.
#[derive(Debug)]
pub struct BlockState {
    entries: HashMap<RuleKey, Entry>,
    exemptions: HashMap<(String, IpAddr), Exempt>,
    /// Interned (site, target) pairs: entries hold an index.
    names: Vec<(String, String)>,
    name_index: HashMap<(String, String), u32>,
    /// Interned operators (manual blocks are few).
    actors: Vec<String>,
    max: usize,
    window_ms: i64,
}

impl BlockState {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            exemptions: HashMap::new(),
            names: Vec::new(),
            name_index: HashMap::new(),
            actors: Vec::new(),
            max,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn intern(&mut self, site: &str, target: &str) -> u32 {
        let pair = (site.to_owned(), target.to_owned());
        if let Some(i) = self.name_index.get(&pair) {
            return *i;
        }
        let i = self.names.len() as u32;
        self.names.push(pair.clone());
        self.name_index.insert(pair, i);
        i
    }

    fn new_entry(&mut self, partition: i32, status: Status, subject: &Subject) -> Entry {
        Entry {
            partition,
            status,
            known: false,
            contested: false,
            expiry_reported: false,
            removing: false,
            reasserting: false,
            unconfirmed_before: false,
            level: 0,
            blocked_ms: 0,
            expires_ms: 0,
            event: [0; 16],
            ip: subject.ip,
            names: self.intern(&subject.site, &subject.target),
            origin: Origin::Automatic,
            actor: 0,
        }
    }

    fn subject(&self, entry: &Entry) -> Subject {
        let (site, target) = self.names[entry.names as usize].clone();
        Subject {
            site,
            ip: entry.ip,
            target,
        }
    }

    pub fn check(&self, key: &RuleKey, now: DateTime<Utc>) -> Check {
        let now = now.timestamp_millis();
        let Some(entry) = self.entries.get(key) else {
            return Check::New;
        };
        match entry.status {
            Status::InFlight => Check::Pending,
            Status::Unconfirmed if entry.expires_ms > now => {
                Check::Unconfirmed(entry.block(&self.actors))
            }
            _ if !entry.known => Check::New,
            Status::Settled if entry.expires_ms > now => Check::Active(entry.block(&self.actors)),
            _ if entry.blocked_ms.saturating_add(self.window_ms) > now => Check::Repeat {
                level: entry.level + 1,
            },
            _ => Check::New,
        }
    }

    /// A block for `key` is on its way to the firewall. A new key is refused when only blocks
    /// that must not be forgotten are tracked.
    pub fn begin(
        &mut self,
        key: RuleKey,
        partition: i32,
        subject: &Subject,
        now: DateTime<Utc>,
    ) -> Result<(), Full> {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.unconfirmed_before = entry.status == Status::Unconfirmed;
            entry.status = Status::InFlight;
            entry.contested = false;
            entry.removing = false;
            entry.partition = partition;
            return Ok(());
        }
        if self.entries.len() >= self.max && self.evict(now) == 0 {
            return Err(Full);
        }
        let entry = self.new_entry(partition, Status::InFlight, subject);
        self.entries.insert(key, entry);
        Ok(())
    }

    /// The block was not sent anywhere (dropped, or refused for good): back to what was known.
    /// A block that was unconfirmed stays unconfirmed (its fate is still to be asked), never
    /// taken for a settled, active one.
    pub fn abort(&mut self, key: &RuleKey) {
        let forget = match self.entries.get_mut(key) {
            Some(entry) if entry.status == Status::InFlight => {
                entry.status = match entry.unconfirmed_before {
                    true => Status::Unconfirmed,
                    false => Status::Settled,
                };
                !entry.known
            }
            _ => false,
        };
        if forget {
            self.entries.remove(key);
        }
    }

    fn set(
        &mut self,
        key: RuleKey,
        partition: i32,
        subject: &Subject,
        status: Status,
        block: &TrackedBlock,
    ) -> &mut Entry {
        if !self.entries.contains_key(&key) {
            let entry = self.new_entry(partition, status, subject);
            self.entries.insert(key, entry);
        }
        let actor = match &block.actor {
            Some(a) => match self.actors.iter().position(|x| x == a) {
                Some(i) => i as u32 + 1,
                None => {
                    self.actors.push(a.clone());
                    self.actors.len() as u32
                }
            },
            None => 0,
        };
        let entry = self.entries.get_mut(&key).expect("inserted");
        entry.status = status;
        entry.partition = partition;
        entry.contested = false;
        entry.set_block(block);
        entry.actor = actor;
        entry
    }

    /// The block may be in place and nobody knows: the next decision asks the gateways first.
    pub fn unconfirm(
        &mut self,
        key: RuleKey,
        partition: i32,
        subject: &Subject,
        block: &TrackedBlock,
    ) {
        self.set(key, partition, subject, Status::Unconfirmed, block);
    }

    /// The block is confirmed on every gateway.
    pub fn confirm(
        &mut self,
        key: RuleKey,
        partition: i32,
        subject: &Subject,
        block: &TrackedBlock,
    ) {
        self.set(key, partition, subject, Status::Settled, block);
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
        let subject = Subject {
            site: record.site.clone(),
            ip: record.ip,
            target: record.target.clone(),
        };
        if record.pending {
            self.unconfirm(record.key, partition, &subject, &block);
        } else if past_window && block.expires_at <= now {
            self.entries.remove(&record.key);
        } else {
            let entry = self.set(record.key, partition, &subject, Status::Settled, &block);
            entry.expiry_reported = record.expired;
        }
    }

    /// Takes over the entries of a partition's freshly read state.
    pub fn absorb(&mut self, part: BlockState) {
        for (key, entry) in part.entries {
            let (site, target) = &part.names[entry.names as usize];
            let names = self.intern(site, target);
            let actor = match (entry.actor as usize).checked_sub(1) {
                Some(i) => {
                    let a = &part.actors[i];
                    match self.actors.iter().position(|x| x == a) {
                        Some(j) => j as u32 + 1,
                        None => {
                            self.actors.push(a.clone());
                            self.actors.len() as u32
                        }
                    }
                }
                None => 0,
            };
            self.entries.insert(
                key,
                Entry {
                    names,
                    actor,
                    ..entry
                },
            );
        }
        self.exemptions.extend(part.exemptions);
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

    /// Forgets a key (a tombstone on the state topic, or an unblock).
    pub fn remove(&mut self, key: &RuleKey) {
        self.entries.remove(key);
    }

    /// Forgets a key unless a block for it is in flight (an unblock that ended while a new
    /// block began). Returns whether it was forgotten.
    pub fn remove_unless_in_flight(&mut self, key: &RuleKey) -> bool {
        match self.entries.get(key) {
            Some(e) if e.status == Status::InFlight => false,
            _ => {
                self.entries.remove(key);
                true
            }
        }
    }

    /// An unblock of `key` is under way (`true`) or ended without removing it (`false`): while
    /// it is, reconcile does not count the block as one the gateways must hold.
    pub fn set_removing(&mut self, key: &RuleKey, removing: bool) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.removing = removing;
        }
    }

    /// Reconcile queued (`true`) or ended (`false`) a re-assert of `key`: while one is under
    /// way, reconcile does not queue another (two would both find the rule absent, and both send).
    pub fn set_reasserting(&mut self, key: &RuleKey, reasserting: bool) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.reasserting = reasserting;
        }
    }

    /// Whether a re-assert of `key` is under way.
    pub fn reasserting(&self, key: &RuleKey) -> bool {
        self.entries.get(key).is_some_and(|e| e.reasserting)
    }

    /// Whether a block of `key` is being enforced now: first sent (pending) or re-asserted by
    /// reconcile. An unblock waits for it: removed before it landed, the rule would stay.
    pub fn block_in_flight(&self, key: &RuleKey, now: DateTime<Utc>) -> bool {
        self.check(key, now) == Check::Pending || self.reasserting(key)
    }

    /// The address is exempted at the site until `until`.
    pub fn exempt(&mut self, site: &str, ip: IpAddr, partition: i32, until: DateTime<Utc>) {
        self.exemptions.insert(
            (site.to_owned(), ip),
            Exempt {
                partition,
                until_ms: until.timestamp_millis(),
            },
        );
    }

    /// Ends an exemption; returns whether there was one in force.
    pub fn release(&mut self, site: &str, ip: IpAddr, now: DateTime<Utc>) -> bool {
        self.exemptions
            .remove(&(site.to_owned(), ip))
            .is_some_and(|e| e.until_ms > now.timestamp_millis())
    }

    /// The end of the address's exemption at the site, if one is in force.
    pub fn exemption(&self, site: &str, ip: IpAddr, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.exemptions
            .get(&(site.to_owned(), ip))
            .filter(|e| e.until_ms > now.timestamp_millis())
            .and_then(|e| Utc.timestamp_millis_opt(e.until_ms).single())
    }

    /// An exemption record read from the state topic.
    pub fn load_exemption(&mut self, partition: i32, record: &ExemptionRecord) {
        self.exempt(&record.site, record.ip, partition, record.until);
    }

    /// Drops everything a revoked partition owned.
    pub fn drop_partition(&mut self, partition: i32) {
        self.entries.retain(|_, e| e.partition != partition);
        self.exemptions.retain(|_, e| e.partition != partition);
    }

    /// Blocks active now.
    pub fn active(&self, now: DateTime<Utc>) -> usize {
        let now = now.timestamp_millis();
        self.entries.values().filter(|e| e.active(now)).count()
    }

    /// The blocks active at `target` that stay active past `until` (what the target's gateways
    /// must hold), with their keys, partitions and subjects.
    pub fn active_at(&self, target: &str, until: DateTime<Utc>) -> Vec<Ended> {
        let until = until.timestamp_millis();
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.active(until) && !e.removing && self.names[e.names as usize].1 == target
            })
            .map(|(key, e)| Ended {
                key: *key,
                partition: e.partition,
                subject: self.subject(e),
                block: e.block(&self.actors),
            })
            .collect()
    }

    /// Whether `key` is still the active block `expires_at` says, not being removed: what a
    /// re-assert checks before it goes out.
    pub fn expects(&self, key: &RuleKey, expires_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.entries.get(key).is_some_and(|e| {
            e.active(now.timestamp_millis())
                && !e.removing
                && e.expires_ms == expires_at.timestamp_millis()
        })
    }

    /// Whether `key` is still the settled block that ended at `expires_at` (no new block of
    /// the key began since the sweep reported it): what its `expired` record may describe.
    pub fn still_ended(&self, key: &RuleKey, expires_at: DateTime<Utc>) -> bool {
        self.entries.get(key).is_some_and(|e| {
            e.known && e.status == Status::Settled && e.expires_ms == expires_at.timestamp_millis()
        })
    }

    /// Whether `key` has an entry at all (a tombstone for it would forget a block).
    pub fn knows(&self, key: &RuleKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether `key` is tracked in any status (a rule with its tag is explained).
    pub fn tracks(&self, key: &RuleKey, now: DateTime<Utc>) -> bool {
        let now = now.timestamp_millis();
        self.entries
            .get(key)
            .is_some_and(|e| e.status != Status::Settled || e.expires_ms > now)
    }

    /// Marks what ended by `now` in the partitions `owned` says are consumed here: blocks that
    /// expired (reported once), history past the escalation window (forgotten), exemptions that
    /// ended (forgotten).
    pub fn sweep(&mut self, now: DateTime<Utc>, owned: impl Fn(i32) -> bool) -> Sweep {
        let now = now.timestamp_millis();
        let mut sweep = Sweep::default();
        let mut ended = Vec::new();
        for (key, e) in &mut self.entries {
            if e.status == Status::Unconfirmed && e.expires_ms <= now && owned(e.partition) {
                // Its fate was never settled, and its time has run out wherever it landed
                // (`-t`): nothing is left to ask, and an entry no one asks about again would
                // hold memory (and its pending record) for good.
                sweep.forgotten.push((*key, e.partition));
                continue;
            }
            if !e.known || e.status != Status::Settled || e.expires_ms > now || !owned(e.partition)
            {
                continue;
            }
            if e.blocked_ms.saturating_add(self.window_ms) <= now && e.expiry_reported {
                sweep.forgotten.push((*key, e.partition));
            } else if !e.expiry_reported {
                e.expiry_reported = true;
                ended.push(*key);
            }
        }
        for (key, _) in &sweep.forgotten {
            self.entries.remove(key);
        }
        for key in ended {
            let e = self.entries[&key];
            sweep.expired.push(Ended {
                key,
                partition: e.partition,
                subject: self.subject(&e),
                block: e.block(&self.actors),
            });
        }
        self.exemptions.retain(|(site, ip), e| {
            let keep = e.until_ms > now || !owned(e.partition);
            if !keep {
                sweep
                    .exemptions_ended
                    .push((site.clone(), *ip, e.partition));
            }
            keep
        });
        sweep
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

    fn exemption(&self, site: &str, ip: IpAddr, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        BlockState::exemption(self, site, ip, now)
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
            origin: Origin::Automatic,
            actor: None,
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
            origin: block.origin,
            actor: block.actor.clone(),
            expired: false,
        }
    }

    fn subject() -> Subject {
        Subject {
            site: "s".into(),
            ip: "192.0.2.1".parse().unwrap(),
            target: "t".into(),
        }
    }

    #[test]
    fn a_key_goes_from_new_to_pending_to_active_to_repeat() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(30 * 86400));
        assert_eq!(s.check(&key(1), now), Check::New);
        assert!(!s.block_in_flight(&key(1), now));
        s.begin(key(1), 0, &subject(), now).unwrap();
        assert_eq!(s.check(&key(1), now), Check::Pending);
        assert!(
            s.block_in_flight(&key(1), now),
            "an unblock waits for the first send"
        );
        let b = block(now, 1, 0);
        s.confirm(key(1), 0, &subject(), &b);
        assert_eq!(s.check(&key(1), now), Check::Active(b.clone()));
        assert!(!s.block_in_flight(&key(1), now));
        let later = now + chrono::Duration::hours(2);
        assert_eq!(s.check(&key(1), later), Check::Repeat { level: 1 });
        s.begin(key(1), 0, &subject(), later).unwrap();
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
        s.begin(key(2), 0, &subject(), now).unwrap();
        s.abort(&key(2));
        assert_eq!(s.check(&key(2), now), Check::New);
        assert_eq!(s.len(), 1, "an aborted first block leaves nothing behind");
    }

    #[test]
    fn a_block_whose_fate_is_unknown_stays_unconfirmed_until_settled() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.begin(key(1), 0, &subject(), now).unwrap();
        let b = block(now, 1, 2);
        s.unconfirm(key(1), 0, &subject(), &b);
        assert_eq!(s.check(&key(1), now), Check::Unconfirmed(b.clone()));
        let expired = now + chrono::Duration::hours(2);
        assert_eq!(
            s.check(&key(1), expired),
            Check::Repeat { level: 3 },
            "once it would have expired, it is gone either way"
        );
        // A send that then fails before reaching any gateway leaves it unconfirmed, never
        // taken for the active block its old record describes.
        s.begin(key(1), 0, &subject(), now).unwrap();
        s.abort(&key(1));
        assert_eq!(s.check(&key(1), now), Check::Unconfirmed(b.clone()));
        // Past its expiry, a sweep forgets it (nothing is left to ask).
        let sweep = s.sweep(expired, |_| true);
        assert_eq!(sweep.forgotten, vec![(key(1), 0)]);
        assert!(s.is_empty());
        s.unconfirm(key(1), 0, &subject(), &b);
        s.confirm(key(1), 0, &subject(), &b);
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
        s.confirm(key(1), 0, &subject(), &block(now, 1, 0));
        s.confirm(key(2), 1, &subject(), &block(now, 1, 0));
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
            s.confirm(key(100 + n), 0, &subject(), &b); // expired history
        }
        for n in 0..5u8 {
            s.confirm(key(n), 0, &subject(), &block(now, 1, 0)); // active
        }
        assert_eq!(s.len(), 10);
        s.begin(key(50), 0, &subject(), now).unwrap();
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
        s.confirm(key(1), 0, &subject(), &block(now, 1, 0));
        s.begin(key(2), 0, &subject(), now).unwrap();
        s.unconfirm(key(3), 0, &subject(), &block(now, 1, 0));
        assert_eq!(s.begin(key(4), 0, &subject(), now), Err(Full));
        assert_eq!(s.len(), 3);
        s.begin(key(1), 0, &subject(), now).unwrap(); // a tracked key is not new tracking
    }

    #[test]
    fn another_writers_record_contests_a_block_in_flight() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.begin(key(1), 0, &subject(), now).unwrap();
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
            std::mem::size_of::<Entry>() <= 80,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn reconcile_expects_active_blocks_of_a_target_except_those_being_removed() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        s.confirm(key(1), 0, &subject(), &block(now, 1, 0));
        s.confirm(key(2), 0, &subject(), &block(now, 1, 0));
        s.confirm(
            key(3),
            0,
            &subject(),
            &block(now - chrono::Duration::hours(2), 1, 0),
        );
        let other = Subject {
            target: "other".into(),
            ..subject()
        };
        s.confirm(key(4), 0, &other, &block(now, 1, 0));
        let keys = |s: &BlockState| {
            let mut k: Vec<RuleKey> = s.active_at("t", now).into_iter().map(|e| e.key).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&s), vec![key(1), key(2)], "active, at this target");
        s.set_removing(&key(2), true);
        assert_eq!(keys(&s), vec![key(1)]);
        s.set_removing(&key(2), false);
        assert_eq!(keys(&s), vec![key(1), key(2)]);
        assert!(
            !s.block_in_flight(&key(1), now),
            "settled, nothing on its way"
        );
        s.set_reasserting(&key(1), true);
        assert!(s.reasserting(&key(1)));
        assert!(
            s.block_in_flight(&key(1), now),
            "an unblock waits for the re-assert"
        );
        assert_eq!(
            keys(&s),
            vec![key(1), key(2)],
            "still expected while re-asserted"
        );
        s.set_reasserting(&key(1), false);
        assert!(
            s.active_at("t", now + chrono::Duration::hours(2))
                .is_empty(),
            "ending before then"
        );
    }

    #[test]
    fn a_sweep_reports_each_expiry_once_then_forgets_it_after_the_window() {
        let now = now_ms();
        let mut s = BlockState::new(100, Duration::from_secs(10 * 3600));
        s.confirm(key(1), 3, &subject(), &block(now, 1, 0));
        assert_eq!(
            s.sweep(now, |_| true),
            Sweep::default(),
            "active: nothing to do"
        );
        let after = now + chrono::Duration::hours(2);
        assert_eq!(
            s.sweep(after, |_| false),
            Sweep::default(),
            "a partition not consumed here (still loading) reports nothing, and marks nothing"
        );
        let sweep = s.sweep(after, |_| true);
        assert_eq!(sweep.expired.len(), 1);
        assert_eq!(sweep.expired[0].subject, subject());
        assert_eq!(sweep.expired[0].partition, 3);
        assert!(sweep.forgotten.is_empty());
        let ended = sweep.expired[0].block.expires_at;
        assert!(
            s.still_ended(&key(1), ended),
            "its expired record may follow"
        );
        assert_eq!(s.sweep(after, |_| true), Sweep::default(), "reported once");
        assert_eq!(
            s.check(&key(1), after),
            Check::Repeat { level: 1 },
            "kept for escalation"
        );
        // A new block of the key began while the expiry's result was being written: the old
        // block's `expired` record must not follow the new block's records.
        s.begin(key(1), 3, &subject(), after).unwrap();
        assert!(!s.still_ended(&key(1), ended));
        s.abort(&key(1));
        assert!(
            s.still_ended(&key(1), ended),
            "aborted: the old block stands"
        );
        let sweep = s.sweep(now + chrono::Duration::hours(11), |_| true);
        assert_eq!(sweep.forgotten, vec![(key(1), 3)]);
        assert!(s.is_empty());
        // A record already reported expired (read back after a restart) is not reported again.
        let mut r = record(2, &block(now - chrono::Duration::hours(3), 1, 0), false);
        r.expired = true;
        s.load(1, &r, now);
        assert!(s.sweep(now, |_| true).expired.is_empty());
    }

    #[test]
    fn exemptions_hold_until_their_end_per_site_and_go_with_their_partition() {
        let now = now_ms();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let mut s = BlockState::new(100, Duration::from_secs(86400));
        let until = now + chrono::Duration::hours(1);
        s.exempt("brno", ip, 2, until);
        assert_eq!(s.exemption("brno", ip, now), Some(until));
        assert_eq!(s.exemption("prague", ip, now), None, "per site");
        assert_eq!(s.exemption("brno", ip, until), None, "ended");
        let sweep = s.sweep(until, |_| true);
        assert_eq!(sweep.exemptions_ended, vec![("brno".into(), ip, 2)]);
        s.exempt("brno", ip, 2, until);
        assert!(s.release("brno", ip, now));
        assert!(!s.release("brno", ip, now), "released once");
        s.exempt("brno", ip, 2, until);
        s.drop_partition(2);
        assert_eq!(s.exemption("brno", ip, now), None);
    }
}
