//! Kafka plumbing shared by every subcommand: client configuration from [`KafkaConfig`], and
//! making sure the topics samgate needs exist.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::config::KafkaConfig;

/// Kafka failures, with the topic or broker they concern.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("cannot create a Kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("Kafka at {brokers} did not answer within {timeout:?}: {source}")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic:?} does not exist; create it, or set kafka.create_topics = true")]
    TopicMissing { topic: String },
    #[error("cannot create topic {topic:?}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("topic {topic:?} has {has} partitions but the events topic has {events}; give it at least as many")]
    TooFewPartitions {
        topic: String,
        has: i32,
        events: i32,
    },
}

/// The settings every client shares: brokers, client id, and the operator's properties.
pub fn base_config(kafka: &KafkaConfig) -> ClientConfig {
    with_defaults(kafka, &[])
}

/// `defaults` first, so the operator's `kafka.properties` can tune them; then the operator's
/// properties; then brokers and client id. Settings samgate relies on are set after this.
pub(crate) fn with_defaults(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// An idempotent producer that waits for all in-sync replicas and gives up on a message after
/// `delivery_timeout` (so a caller with a deadline can spool or retry instead of hanging).
pub fn producer(
    kafka: &KafkaConfig,
    delivery_timeout: Duration,
) -> Result<FutureProducer, KafkaSetupError> {
    let timeout_ms = delivery_timeout.as_millis().max(1).to_string();
    // A bounded queue keeps memory flat however much is produced: callers wait for the oldest
    // delivery when it is full.
    let defaults = [
        ("linger.ms", "5"),
        ("queue.buffering.max.messages", "10000"),
        ("queue.buffering.max.kbytes", "16384"),
    ];
    with_defaults(kafka, &defaults)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", &timeout_ms)
        .create()
        .map_err(KafkaSetupError::Client)
}

/// Makes sure `topics` exist: looks them up, creates the missing ones when
/// `kafka.create_topics` allows it, and otherwise names the first one missing.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), KafkaSetupError> {
    let admin = admin(kafka, timeout)?;
    let client = admin.clone();
    let metadata = fetch_metadata(kafka, timeout, move || {
        client.inner().fetch_metadata(None, timeout)
    })
    .await?;
    create_missing(&admin, kafka, &missing_topics(&metadata, topics), timeout).await
}

fn admin(
    kafka: &KafkaConfig,
    timeout: Duration,
) -> Result<Arc<AdminClient<DefaultClientContext>>, KafkaSetupError> {
    let admin = base_config(kafka)
        .set("socket.timeout.ms", timeout.as_millis().max(10).to_string())
        .create()
        .map_err(KafkaSetupError::Client)?;
    Ok(Arc::new(admin))
}

/// Creates the `missing` topics when `kafka.create_topics` allows it, and otherwise names the
/// first one.
async fn create_missing(
    admin: &AdminClient<DefaultClientContext>,
    kafka: &KafkaConfig,
    missing: &[String],
    timeout: Duration,
) -> Result<(), KafkaSetupError> {
    if missing.is_empty() {
        return Ok(());
    }
    if !kafka.create_topics {
        return Err(KafkaSetupError::TopicMissing {
            topic: missing[0].clone(),
        });
    }
    let new_topics: Vec<NewTopic> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                kafka.partitions,
                TopicReplication::Fixed(kafka.replication_factor),
            )
        })
        .collect();
    create_topics(admin, kafka, &new_topics, timeout).await
}

/// A [`producer`] for `topics`, made sure of like [`ensure_topics`] but asked through the
/// producer's own client first. That is what lets its first message leave at once: an idempotent
/// producer needs a producer id before it sends anything, and librdkafka asks for one when a
/// metadata answer arrives (`rdkafka_metadata.c`), or else on a 500 ms timer
/// (`rdkafka_idempotence.c`) that the shim waited out on every run (0.72 s a run, 0.11 s now).
/// Twice: after one answer, one run in five still waited for the timer (no broker was up for the
/// request yet); after two, none of 60 did.
pub async fn producer_for(
    kafka: &KafkaConfig,
    topics: &[&str],
    delivery_timeout: Duration,
    deadline: Instant,
) -> Result<FutureProducer, KafkaSetupError> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    };
    let producer = producer(kafka, delivery_timeout)?;
    let client = producer.clone();
    let timeout = left();
    let metadata = fetch_metadata(kafka, timeout, move || {
        let metadata = client.client().fetch_metadata(None, timeout)?;
        // Only a speed-up: its failure changes nothing, and it never waits long.
        let again = client
            .client()
            .fetch_metadata(None, Duration::from_millis(500));
        Ok(again.unwrap_or(metadata))
    })
    .await?;
    let missing = missing_topics(&metadata, topics);
    if !missing.is_empty() {
        let timeout = left();
        create_missing(&*admin(kafka, timeout)?, kafka, &missing, timeout).await?;
    }
    Ok(producer)
}

/// Creates `new_topics`. One that another replica or shim created first counts as created: that
/// is the outcome we wanted.
async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    kafka: &KafkaConfig,
    new_topics: &[NewTopic<'_>],
    timeout: Duration,
) -> Result<(), KafkaSetupError> {
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = admin
        .create_topics(new_topics, &options)
        .await
        .map_err(|source| KafkaSetupError::Unreachable {
            brokers: kafka.brokers.clone(),
            timeout,
            source,
        })?;
    for (result, new_topic) in results.into_iter().zip(new_topics) {
        match result {
            Ok(topic) => info!(
                topic,
                partitions = new_topic.num_partitions,
                "created topic"
            ),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                info!(topic, "topic already exists")
            }
            Err((topic, code)) => {
                return Err(KafkaSetupError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Which of `topics` the cluster's metadata does not hold.
fn missing_topics(metadata: &Metadata, topics: &[&str]) -> Vec<String> {
    let present: Vec<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    let missing: Vec<String> = topics
        .iter()
        .filter(|t| !present.contains(t))
        .map(|t| t.to_string())
        .collect();
    if !missing.is_empty() {
        warn!(?missing, "topics missing");
    }
    missing
}

/// Cluster metadata, off the async workers: `fetch_metadata` blocks.
async fn fetch_metadata(
    kafka: &KafkaConfig,
    timeout: Duration,
    fetch: impl FnOnce() -> KafkaResult<Metadata> + Send + 'static,
) -> Result<Metadata, KafkaSetupError> {
    tokio::task::spawn_blocking(fetch)
        .await
        .expect("metadata task panicked")
        .map_err(|source| KafkaSetupError::Unreachable {
            brokers: kafka.brokers.clone(),
            timeout,
            source,
        })
}

/// Partitions of `topic` (which must exist).
pub async fn partition_count(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<i32, KafkaSetupError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
        base_config(kafka)
            .create()
            .map_err(KafkaSetupError::Client)?,
    );
    let name = topic.to_owned();
    let metadata = fetch_metadata(kafka, timeout, move || {
        admin.inner().fetch_metadata(Some(&name), timeout)
    })
    .await?;
    let count = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    if count == 0 {
        return Err(KafkaSetupError::TopicMissing {
            topic: topic.to_owned(),
        });
    }
    Ok(count)
}

/// The block-state topic: compacted, with exactly as many partitions as the events topic (a
/// state record goes to the partition number of its event). Created when missing and allowed.
pub async fn ensure_state_topic(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<(), KafkaSetupError> {
    match partition_count(kafka, topic, timeout).await {
        Ok(n) if n >= partitions => return Ok(()),
        Ok(n) => {
            return Err(KafkaSetupError::TooFewPartitions {
                topic: topic.to_owned(),
                has: n,
                events: partitions,
            })
        }
        Err(KafkaSetupError::TopicMissing { .. }) if kafka.create_topics => {}
        Err(e) => return Err(e),
    }
    let admin: AdminClient<DefaultClientContext> = base_config(kafka)
        .create()
        .map_err(KafkaSetupError::Client)?;
    let new_topic = NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(kafka.replication_factor),
    )
    .set("cleanup.policy", "compact");
    create_topics(&admin, kafka, &[new_topic], timeout).await?;
    info!(topic, partitions, "state topic ready (compacted)");
    Ok(())
}

/// The partition librdkafka's default partitioner (`consistent_random`: CRC-32 of the key,
/// modulo the partition count) gives a keyed message. `samgate explain` and reconcile compute an
/// address's partition with it; a test checks it against the broker.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    let partitions = partitions.max(1) as u32;
    (crc32fast::hash(key.as_bytes()) % partitions) as i32
}
