//! Report: one `samgate.result.v1` message per decision on the results topic, keyed by the
//! idempotency key (or `<site>/<ip>` for decisions with no target), plus dead letters. Schema:
//! `docs/schemas/samgate.result.v1.json`.

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

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
    /// The policy does not act on this event.
    Filtered,
    /// Dry-run mode: the rule that would have been sent.
    DryRun,
    /// The firewall did not take the rule within the retry deadline.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Duplicate => "duplicate",
            Self::Suppressed => "suppressed",
            Self::Filtered => "filtered",
            Self::DryRun => "dry_run",
            Self::Failed => "failed",
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
    pub code: String,
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
}

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl ResultMessage {
    /// A result for `event` with everything the event itself tells.
    pub fn for_event(event: &Event, outcome: Outcome, code: &str, reason: String) -> Self {
        let f = &event.flowmon;
        Self {
            schema: RESULT_SCHEMA.to_owned(),
            outcome,
            code: code.to_owned(),
            reason,
            key: None,
            site: event.site.clone(),
            ip: f.source,
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
        }
    }

    /// The Kafka key: the idempotency key, else `<site>/<ip>`.
    pub fn kafka_key(&self) -> String {
        self.key
            .clone()
            .unwrap_or_else(|| crate::event::event_key(&self.site, self.ip))
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

/// Writes `payload` to `topic` until Kafka acknowledges it. Results gate offsets, so giving up
/// would either lose a result or stall a partition: retry, loudly, until shutdown.
pub async fn produce_acked(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
    partition: Option<i32>,
    cancel: &tokio_util::sync::CancellationToken,
) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return true,
            Err((e, _)) => {
                warn!(topic, error = %e, "cannot write to Kafka; retrying");
                if cancel.is_cancelled() {
                    return false;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One structured line per decision.
pub fn log_decision(result: &ResultMessage) {
    info!(
        outcome = result.outcome.as_str(),
        code = result.code,
        site = result.site,
        ip = %result.ip,
        target = result.target.as_deref().unwrap_or("-"),
        method = result.method.as_deref().unwrap_or("-"),
        expires_at = result.expires_at.as_deref().unwrap_or("-"),
        attempts = result.attempts,
        "{}", result.reason
    );
}
