//! Rebuilding a partition's block state from the state topic, failing closed: a partition whose
//! state cannot be read is not consumed (it stays paused, readiness is false, a metric and an
//! error line name it) and the read is tried again with backoff, for as long as we own it. Each
//! partition is handed over with the offset its reading stopped at, where `pipeline::tail` goes
//! on watching it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::dedupe::{parse_exemption_key, BlockRecord, BlockState, ExemptionRecord};
use super::ownership::{Claim, ClaimRecord, CLAIM_KEY};
use super::{Control, Shared};
use crate::checkpoint::sam::RuleKey;

/// How long a read may go without a message or the partition's end before it is given up (and
/// tried again).
const STALL: Duration = Duration::from_secs(30);

/// Loads the state of `claims` (one assignment) until each is loaded or no longer ours; each
/// partition is handed over ([`Control::Loaded`]) as soon as its end is reached.
pub async fn load(
    shared: Arc<Shared>,
    claims: Vec<Claim>,
    control: mpsc::UnboundedSender<Control>,
) {
    let mut left = claims;
    let mut delay = Duration::from_secs(1);
    loop {
        left.retain(|c| shared.ownership.is_current(*c));
        if left.is_empty() || shared.stopping.is_cancelled() {
            return;
        }
        shared
            .metrics
            .state_loading
            .set(shared.ownership.loading().len() as i64);
        let (reader, claims, tx) = (shared.clone(), left.clone(), control.clone());
        let outcome = tokio::task::spawn_blocking(move || read(&reader, &claims, &tx)).await;
        left = match outcome {
            Ok(Ok(())) => return,
            Ok(Err((unread, reason))) => {
                let partitions: Vec<i32> = unread.iter().map(|c| c.partition).collect();
                error!(?partitions, reason, retry_in = ?delay, "cannot read the block state of these partitions; they are not consumed until it can be");
                unread
            }
            Err(e) => {
                error!(error = %e, "the state reader failed; trying again");
                left
            }
        };
        shared.metrics.state_load_failures.inc();
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// One partition being read: its claim, what was read so far, the next offset.
type Part = (Claim, BlockState, i64);

/// Reads the state partitions of `claims` to their current end. Returns the claims it could not
/// finish, with the reason.
fn read(
    shared: &Shared,
    claims: &[Claim],
    control: &mpsc::UnboundedSender<Control>,
) -> Result<(), (Vec<Claim>, String)> {
    let config = &shared.config;
    let reader: BaseConsumer = crate::kafka::base_config(&config.kafka)
        .set("group.id", format!("{}-state-loader", config.run.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        // Prefetch is per partition (64 MiB each by default): reading a dozen partitions at once
        // would hold more prefetched records than the state they build.
        .set("queued.max.messages.kbytes", "4096")
        .create()
        .map_err(|e| (claims.to_vec(), e.to_string()))?;
    let mut parts =
        start(shared, &reader, claims, control).map_err(|e| (claims.to_vec(), e.to_string()))?;
    let now = Utc::now();
    let mut last_progress = Instant::now();
    while !parts.is_empty() {
        if last_progress.elapsed() > STALL || shared.stopping.is_cancelled() {
            let unread = parts.values().map(|(c, _, _)| *c).collect();
            return Err((unread, format!("no progress for {STALL:?}")));
        }
        let message = match reader.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                if let Some((claim, part, next)) = parts.remove(&p) {
                    let _ = control.send(Control::Loaded(claim, part, next));
                }
                continue;
            }
            // A passing error (a broker restart, a timeout) is not the end: librdkafka goes on.
            Some(Err(e)) => {
                warn!(error = %e, "reading the state topic; going on");
                continue;
            }
            Some(Ok(message)) => message,
        };
        last_progress = Instant::now();
        if let Some((_, part, next)) = parts.get_mut(&message.partition()) {
            *next = message.offset() + 1;
            match decode(&message) {
                StateMessage::Block(record) => part.load(message.partition(), &record, now),
                StateMessage::Tombstone(key) => part.remove(&key),
                StateMessage::Exemption(record) => {
                    part.load_exemption(message.partition(), &record)
                }
                StateMessage::ExemptionEnded(site, ip) => {
                    part.release(&site, ip, now);
                }
                StateMessage::Claim(_) | StateMessage::Other => {}
            }
        }
    }
    Ok(())
}

/// Points `reader` at the start of each claim's state partition. An empty one is loaded at once;
/// the others are returned, to be read to their end (the consumer's "partition EOF", not the
/// listed high watermark: tansu lists the last batch's base offset + 1).
fn start(
    shared: &Shared,
    reader: &BaseConsumer,
    claims: &[Claim],
    control: &mpsc::UnboundedSender<Control>,
) -> rdkafka::error::KafkaResult<BTreeMap<i32, Part>> {
    let topic = &shared.config.kafka.topics.state;
    let window = shared.config.policy.escalation_window;
    let mut parts = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for claim in claims {
        let (low, high) =
            reader.fetch_watermarks(topic, claim.partition, Duration::from_secs(10))?;
        let part = BlockState::new(usize::MAX, window);
        if high <= low {
            let _ = control.send(Control::Loaded(*claim, part, high.max(low)));
            continue;
        }
        parts.insert(claim.partition, (*claim, part, low));
        list.add_partition_offset(topic, claim.partition, Offset::Offset(low))?;
    }
    if !parts.is_empty() {
        reader.assign(&list)?;
    }
    Ok(parts)
}

/// What a state-topic message is.
pub enum StateMessage {
    Block(BlockRecord),
    /// A key's tombstone: the key is forgotten.
    Tombstone(RuleKey),
    Claim(ClaimRecord),
    Exemption(ExemptionRecord),
    /// An exemption's tombstone: the exemption ended.
    ExemptionEnded(String, std::net::IpAddr),
    /// Not something samgate wrote (logged and skipped).
    Other,
}

pub fn decode(message: &impl Message) -> StateMessage {
    let raw_key = message.key().and_then(|k| std::str::from_utf8(k).ok());
    if raw_key == Some(CLAIM_KEY) {
        return message
            .payload()
            .and_then(|p| serde_json::from_slice(p).ok())
            .map_or(StateMessage::Other, StateMessage::Claim);
    }
    if let Some((site, ip)) = raw_key.and_then(parse_exemption_key) {
        return match message.payload() {
            None => StateMessage::ExemptionEnded(site, ip),
            Some(p) => match serde_json::from_slice(p) {
                Ok(record) => StateMessage::Exemption(record),
                Err(e) => {
                    warn!(partition = message.partition(), offset = message.offset(), error = %e, "skipping an undecodable exemption record");
                    StateMessage::Other
                }
            },
        };
    }
    match (raw_key.and_then(RuleKey::parse), message.payload()) {
        (Some(key), None) => StateMessage::Tombstone(key),
        (_, Some(payload)) => match serde_json::from_slice::<BlockRecord>(payload) {
            Ok(record) => StateMessage::Block(record),
            Err(e) => {
                warn!(partition = message.partition(), offset = message.offset(), error = %e, "skipping an undecodable state record");
                StateMessage::Other
            }
        },
        _ => StateMessage::Other,
    }
}
