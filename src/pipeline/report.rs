//! Report: one `samgate.result.v1` message per decision on the results topic, keyed by the
//! idempotency key (or the address for decisions with no target), plus dead letters. Schema:
//! `docs/schemas/samgate.result.v1.json`. [`ResultMessage::decided`] is the one place a decision
//! becomes a result; [`ResultMessage::settle`] finishes an enforced one.

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::decide::{Code, Decision, Enforce};
use super::dedupe::{Origin, TrackedBlock};
use super::policy::Mode;
use crate::checkpoint::sam::SamMode;
use crate::command::Command;
use crate::event::{rfc3339_millis, Event};

/// Schema id of result messages.
pub const RESULT_SCHEMA: &str = "samgate.result.v1";

/// What happened to one event at one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::EnumIter)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The rule is on every gateway of the target.
    Blocked,
    /// A block for the same key is already active (or being made): no firewall call.
    Duplicate,
    /// The address is in a never-block network: no rule.
    Suppressed,
    /// No rule may name the address (loopback, multicast, a management server, …).
    NotBlockable,
    /// The policy does not act on this event.
    Filtered,
    /// Dry-run mode: the rule that would have been sent.
    DryRun,
    /// The firewall did not take the rule within the retry deadline.
    Failed,
    /// An operator exempted the address (or an exemption stopped an automatic block).
    Exempted,
    /// The rule is gone from every gateway of the target.
    Unblocked,
    /// An exemption ended.
    Released,
    /// A block's time ran out.
    Expired,
    /// A gateway holds a rule with samgate's tag that no block explains.
    Orphaned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Duplicate => "duplicate",
            Self::Suppressed => "suppressed",
            Self::NotBlockable => "not_blockable",
            Self::Filtered => "filtered",
            Self::DryRun => "dry_run",
            Self::Failed => "failed",
            Self::Exempted => "exempted",
            Self::Unblocked => "unblocked",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Orphaned => "orphaned",
        }
    }
}

/// The block a duplicate refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveBlock {
    /// `None` while the block is still being enforced.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub blocked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
    pub level: Option<u32>,
}

/// One result message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub schema: String,
    pub outcome: Outcome,
    /// A short stable code (`method_not_allowed`, `never_block`, `active_block`, `enforced`, …).
    pub code: Code,
    /// A human sentence.
    pub reason: String,
    /// The idempotency key (32 hex digits), absent for decisions with no target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    pub site: String,
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub gateways: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mode: Option<String>,
    /// The exact command sent (or that would be sent) for this rule.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_s: Option<u64>,
    /// Escalation level: 0 for a first block, +1 per repeat within the window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub level: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_at: Option<String>,
    /// The never-block network that suppressed the block.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub suppressed_by: Option<String>,
    /// For duplicates: the block already in place.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub active_block: Option<ActiveBlock>,
    /// samgate event ids (`samgate.event.v1` `id`).
    pub event_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ads_event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    pub priority: String,
    /// Firewall attempts made (0 when no call was needed).
    pub attempts: u32,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub task_ids: Vec<String>,
    /// When ADS detected the event (if its timestamp was recognised).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detected_at: Option<String>,
    /// When the shim read the event.
    pub received_at: String,
    #[serde(with = "rfc3339_millis")]
    pub decided_at: DateTime<Utc>,
    /// When the gateways confirmed the rule.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enforced_at: Option<String>,
    /// What asked for this: a detection, an operator, reconcile, expiry.
    #[serde(default)]
    pub origin: Origin,
    /// The operator (manual decisions).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub actor: Option<String>,
    /// The operator's reason (manual decisions).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
    /// For `exempted`: when the exemption ends.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exempt_until: Option<String>,
}

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl ResultMessage {
    /// A result for `event` with everything the event itself tells.
    pub fn for_event(event: &Event, outcome: Outcome, code: Code, reason: String) -> Self {
        let f = &event.flowmon;
        Self {
            schema: RESULT_SCHEMA.to_owned(),
            outcome,
            code,
            reason,
            key: None,
            site: event.site.clone(),
            ip: f.source.to_canonical(),
            target: None,
            server: None,
            gateways: Vec::new(),
            action: None,
            mode: None,
            command: None,
            duration_s: None,
            level: None,
            expires_at: None,
            suppressed_by: None,
            active_block: None,
            event_ids: vec![event.id.clone()],
            ads_event_id: f.event_id.clone(),
            method: f.method.clone(),
            priority: f.priority.as_str().to_owned(),
            attempts: 0,
            task_ids: Vec::new(),
            detected_at: f.detected_at.as_ref().and_then(|t| t.utc).map(timestamp),
            received_at: timestamp(event.received_at),
            decided_at: Utc::now(),
            enforced_at: None,
            origin: Origin::Automatic,
            actor: None,
            note: None,
            exempt_until: None,
        }
    }

    /// A result for an operator `command` (its id stands in `event_ids`).
    pub fn for_command(command: &Command, outcome: Outcome, code: Code, reason: String) -> Self {
        let now = Utc::now();
        Self {
            schema: RESULT_SCHEMA.to_owned(),
            outcome,
            code,
            reason,
            key: None,
            site: command.site.clone().unwrap_or_default(),
            ip: command
                .ip
                .map_or(IpAddr::from([0, 0, 0, 0]), |ip| ip.to_canonical()),
            target: None,
            server: None,
            gateways: Vec::new(),
            action: None,
            mode: None,
            command: None,
            duration_s: None,
            level: None,
            expires_at: None,
            suppressed_by: None,
            active_block: None,
            event_ids: vec![command.id.clone()],
            ads_event_id: None,
            method: None,
            priority: "unknown".into(),
            attempts: 0,
            task_ids: Vec::new(),
            detected_at: None,
            received_at: timestamp(command.issued_at),
            decided_at: now,
            enforced_at: None,
            origin: Origin::Manual,
            actor: command.actor.clone(),
            note: command.reason.clone(),
            exempt_until: None,
        }
    }

    /// A result of samgate's own (expiry, reconcile) about a block's subject at `target`.
    pub fn for_block(
        subject: &super::dedupe::Subject,
        target: &super::policy::Target,
        key: crate::checkpoint::sam::RuleKey,
        origin: Origin,
        outcome: Outcome,
        code: Code,
        reason: String,
    ) -> Self {
        let now = Utc::now();
        let mut r = Self {
            schema: RESULT_SCHEMA.to_owned(),
            outcome,
            code,
            reason,
            key: None,
            site: subject.site.clone(),
            ip: subject.ip,
            target: None,
            server: None,
            gateways: Vec::new(),
            action: None,
            mode: None,
            command: None,
            duration_s: None,
            level: None,
            expires_at: None,
            suppressed_by: None,
            active_block: None,
            event_ids: Vec::new(),
            ads_event_id: None,
            method: None,
            priority: "unknown".into(),
            attempts: 0,
            task_ids: Vec::new(),
            detected_at: None,
            received_at: timestamp(now),
            decided_at: now,
            enforced_at: None,
            origin,
            actor: None,
            note: None,
            exempt_until: None,
        };
        r.target_fields(target, key);
        r
    }

    /// The result of `decision` for `event`. For an `Enforce` decision, what is known before the
    /// firewall is asked; [`Self::settle`] completes it.
    pub fn decided(event: &Event, decision: &Decision) -> Self {
        let base = Self::for_event(event, Outcome::Filtered, Code::UnknownSite, String::new());
        base.with_decision(decision)
    }

    /// The result of `decision` for an operator's `command`.
    pub fn commanded(command: &Command, decision: &Decision) -> Self {
        let base = Self::for_command(command, Outcome::Filtered, Code::UnknownSite, String::new());
        base.with_decision(decision)
    }

    /// `self` (with what the event or command tells) completed by `decision`.
    fn with_decision(self, decision: &Decision) -> Self {
        let for_event = |outcome: Outcome, code: Code, reason: String| Self {
            outcome,
            code,
            reason,
            ..self.clone()
        };
        let source = self.ip;
        match decision {
            Decision::Filtered { code, detail } => {
                for_event(Outcome::Filtered, *code, detail.clone())
            }
            Decision::Duplicate { target, key, block } => {
                let mut r = for_event(Outcome::Duplicate, Code::ActiveBlock, String::new());
                r.target_fields(target, *key);
                r.refer_to(block.as_ref());
                r
            }
            Decision::Suppressed {
                target,
                key,
                level,
                duration,
                network,
            } => {
                let reason = format!("{source} is in never-block network {network}");
                let mut r = for_event(Outcome::Suppressed, Code::NeverBlock, reason);
                r.target_fields(target, *key);
                r.level = Some(*level);
                r.duration_s = Some(duration.as_secs());
                r.suppressed_by = Some(network.to_string());
                r
            }
            Decision::NotBlockable {
                target,
                key,
                code,
                detail,
            } => {
                let mut r = for_event(Outcome::NotBlockable, *code, detail.clone());
                r.target_fields(target, *key);
                r
            }
            Decision::DryRun(enforce) => {
                let reason = format!(
                    "dry run: would block for {}",
                    humantime::format_duration(enforce.duration)
                );
                let mut r = for_event(Outcome::DryRun, Code::DryRun, reason);
                r.enforce_fields(enforce);
                r
            }
            Decision::Enforce(enforce) => {
                let mut r = for_event(Outcome::Blocked, Code::Enforced, String::new());
                r.enforce_fields(enforce);
                r
            }
            Decision::Exempted { target, key, until } => {
                let reason = format!(
                    "{source} is exempted at site {} until {} (by an operator)",
                    self.site,
                    timestamp(*until)
                );
                let mut r = for_event(Outcome::Exempted, Code::Exempted, reason);
                r.target_fields(target, *key);
                r.exempt_until = Some(timestamp(*until));
                r
            }
            Decision::Unblock(unblock) => {
                let mut r = for_event(Outcome::Unblocked, Code::Removed, String::new());
                r.target_fields(&unblock.target, unblock.key);
                r.command = Some(match &unblock.target.mode {
                    Mode::Sam(SamMode::FwSam) => unblock.rule.fw_sam_cancel(),
                    Mode::Sam(SamMode::FwSamp) => {
                        "fw samp del '<uid>' (uids from fw samp get by samgate's comment)".into()
                    }
                    Mode::Forti(_) => crate::fortigate::enforcer::describe_unban(&unblock.rule),
                    Mode::Feed => crate::feed::enforcer::describe_removal(&unblock.rule),
                });
                r
            }
            Decision::Exempt { until } => {
                let reason = format!(
                    "{source} exempted at site {} until {}: no automatic block until then",
                    self.site,
                    timestamp(*until)
                );
                let mut r = for_event(Outcome::Exempted, Code::Exempted, reason);
                r.exempt_until = Some(timestamp(*until));
                r
            }
            Decision::Release => for_event(
                Outcome::Released,
                Code::Released,
                format!("the exemption of {source} at site {} ended", self.site),
            ),
        }
    }

    pub fn target_fields(
        &mut self,
        target: &super::policy::Target,
        key: crate::checkpoint::sam::RuleKey,
    ) {
        self.key = Some(key.to_string());
        self.target = Some(target.name.clone());
        self.server = Some(target.server.clone());
        self.gateways = target.gateways.clone();
        self.action = Some(target.action_name().into());
        self.mode = Some(target.mode.name().into());
    }

    pub fn enforce_fields(&mut self, enforce: &Enforce) {
        self.target_fields(&enforce.target, enforce.key);
        if enforce.origin != Origin::Automatic {
            self.origin = enforce.origin;
        }
        self.level = Some(enforce.level);
        self.duration_s = Some(enforce.duration.as_secs());
        self.command = Some(match &enforce.target.mode {
            Mode::Sam(SamMode::FwSam) => enforce.rule.fw_sam(),
            Mode::Sam(SamMode::FwSamp) => enforce.rule.fw_samp_add().unwrap_or_default(),
            Mode::Forti(mode) => crate::fortigate::enforcer::describe_ban(mode, enforce),
            Mode::Feed => crate::feed::enforcer::describe_listing(enforce),
        });
    }

    /// A duplicate's reference to the block in place (`None`: still being enforced).
    fn refer_to(&mut self, block: Option<&TrackedBlock>) {
        match block {
            Some(b) => {
                self.reason = format!("already blocked until {}", timestamp(b.expires_at));
                self.expires_at = Some(timestamp(b.expires_at));
                self.level = Some(b.level);
                self.active_block = Some(ActiveBlock {
                    blocked_at: Some(timestamp(b.blocked_at)),
                    expires_at: Some(timestamp(b.expires_at)),
                    event_id: b.event_id.clone(),
                    level: Some(b.level),
                });
            }
            None => {
                self.code = Code::BeingEnforced;
                self.reason = "a block for this source is being enforced".into();
                self.active_block = Some(ActiveBlock {
                    blocked_at: None,
                    expires_at: None,
                    event_id: None,
                    level: None,
                });
            }
        }
    }

    /// Completes an enforced rule's result: `blocked` (enforced or verified) or `failed`.
    pub fn settle(&mut self, settled: Settled) {
        match settled {
            Settled::Blocked {
                verified,
                attempts,
                block,
                duration,
            } => {
                self.outcome = Outcome::Blocked;
                let gateways = self.gateways.join(", ");
                (self.code, self.reason) = if self.origin == Origin::Reconcile {
                    (
                        Code::Reasserted,
                        format!("a gateway of {gateways} had lost the rule of an active block: sent again until {}", timestamp(block.expires_at)),
                    )
                } else if verified {
                    (
                        Code::Verified,
                        format!("blocked on {gateways} (found in place; not sent again)"),
                    )
                } else {
                    (
                        Code::Enforced,
                        format!(
                            "blocked on {gateways} for {}",
                            humantime::format_duration(duration)
                        ),
                    )
                };
                self.attempts = attempts;
                self.expires_at = Some(timestamp(block.expires_at));
                self.enforced_at = Some(timestamp(Utc::now()));
            }
            Settled::Unblocked { found, attempts } => {
                self.outcome = Outcome::Unblocked;
                self.attempts = attempts;
                let gateways = self.gateways.join(", ");
                (self.code, self.reason) = if found {
                    (
                        if self.origin == Origin::Reconcile {
                            Code::OrphanRemoved
                        } else {
                            Code::Removed
                        },
                        format!("removed from {gateways}"),
                    )
                } else {
                    (
                        Code::NotInPlace,
                        format!("no rule on {gateways}: nothing to remove"),
                    )
                };
                self.enforced_at = Some(timestamp(Utc::now()));
            }
            Settled::Failed {
                code,
                attempts,
                problem,
            } => {
                self.outcome = Outcome::Failed;
                self.code = code;
                self.attempts = attempts;
                self.reason = format!("not enforced after {attempts} attempt(s): {problem}");
            }
        }
    }

    /// The Kafka key: the idempotency key, else the address.
    pub fn kafka_key(&self) -> String {
        self.key
            .clone()
            .unwrap_or_else(|| crate::event::event_key(self.ip))
    }

    /// When detection happened (ADS time, else the shim's receipt).
    pub fn detected(&self) -> Option<DateTime<Utc>> {
        self.detected_at
            .as_deref()
            .or(Some(self.received_at.as_str()))
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    }
}

/// How an enforced rule ended.
#[derive(Debug, Clone)]
pub enum Settled {
    Blocked {
        /// Found in place, not sent by this replica.
        verified: bool,
        attempts: u32,
        block: TrackedBlock,
        duration: Duration,
    },
    /// The rule is gone from every gateway (`found`: some gateway held it).
    Unblocked { found: bool, attempts: u32 },
    Failed {
        code: Code,
        attempts: u32,
        problem: String,
    },
}

/// Why a message was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Shutting down while Kafka did not answer: the event goes back to its partition's next owner.
    #[error("stopping before Kafka acknowledged the message")]
    Stopping,
    /// Kafka refused the message for good (too large, not authorised, …).
    #[error("Kafka refused the message for good: {0}")]
    Refused(KafkaError),
}

/// Errors that retrying cannot mend: the message or the permissions are wrong.
fn refused_for_good(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | MessageBatchTooLarge
                | InvalidRecord
                | InvalidMessage
                | InvalidTopic
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | PolicyViolation
                | InvalidRequiredAcks
        )
    )
}

/// Writes `payload` to `topic` until Kafka acknowledges it; returns its offset. Results gate
/// offsets, so a passing failure is retried, loudly, until `stop`; a refusal for good is returned
/// at once.
pub async fn write(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
    partition: Option<i32>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<i64, WriteError> {
    let written = write_while_current(producer, topic, key, payload, partition, stop, &|| true);
    Ok(written.await?.expect("always current"))
}

/// [`write`], while `current()` says the record still describes its key (asked before every
/// attempt): `None` when it no longer does and was not written.
pub async fn write_while_current(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
    partition: Option<i32>,
    stop: &tokio_util::sync::CancellationToken,
    current: &(dyn Fn() -> bool + Sync),
) -> Result<Option<i64>, WriteError> {
    write_record(
        producer,
        topic,
        key,
        Some(payload),
        partition,
        stop,
        current,
    )
    .await
}

/// [`write_while_current`] of a tombstone (no payload): compaction forgets the key. `current`
/// says the key is still forgotten: a retry that landed after a new block's record would make
/// compaction forget that block.
pub async fn write_tombstone(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    partition: i32,
    stop: &tokio_util::sync::CancellationToken,
    current: &(dyn Fn() -> bool + Sync),
) -> Result<Option<i64>, WriteError> {
    write_record(producer, topic, key, None, Some(partition), stop, current).await
}

async fn write_record(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: Option<&str>,
    partition: Option<i32>,
    stop: &tokio_util::sync::CancellationToken,
    current: &(dyn Fn() -> bool + Sync),
) -> Result<Option<i64>, WriteError> {
    let mut delay = Duration::from_millis(100);
    loop {
        if !current() {
            return Ok(None);
        }
        let mut record = FutureRecord::<str, str>::to(topic).key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(delivery) => return Ok(Some(delivery.offset)),
            Err((e, _)) if refused_for_good(&e) => return Err(WriteError::Refused(e)),
            Err((e, _)) => {
                warn!(topic, error = %e, "cannot write to Kafka; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Err(WriteError::Stopping),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One structured line per decision.
pub fn log_decision(result: &ResultMessage) {
    info!(
        outcome = result.outcome.as_str(),
        code = result.code.as_str(),
        site = result.site,
        ip = %result.ip,
        target = result.target.as_deref().unwrap_or("-"),
        method = result.method.as_deref().unwrap_or("-"),
        expires_at = result.expires_at.as_deref().unwrap_or("-"),
        attempts = result.attempts,
        "{}", result.reason
    );
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    /// The schema consumers validate against lists exactly the outcomes and codes samgate writes.
    #[test]
    fn the_result_schema_lists_every_outcome_and_code() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/schemas/samgate.result.v1.json"))
                .unwrap();
        let listed = |field: &str| -> Vec<String> {
            schema["properties"][field]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let outcomes: Vec<String> = Outcome::iter().map(|o| o.as_str().to_owned()).collect();
        let codes: Vec<String> = Code::iter().map(|c| c.as_str().to_owned()).collect();
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(sorted(listed("outcome")), sorted(outcomes));
        assert_eq!(sorted(listed("code")), sorted(codes));
    }
}
