//! `samgate shim`: what Flowmon ADS runs. Reads events from stdin to EOF, publishes each to the
//! events topic (bad lines to the dead-letter topic), and never loses one: everything read is
//! first written durably to the [spool](crate::spool), then delivered, oldest first, within a
//! bounded time; whatever Kafka did not acknowledge stays spooled for the next run.

use std::collections::{HashSet, VecDeque};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tracing::{debug, error, info, warn};

use crate::config::KafkaConfig;
use crate::event::{DeadLetter, DeadLetterStage, Event};
use crate::flowmon::LineReader;
use crate::kafka;
use crate::spool::{segment_records, Spool, SpoolLock, SpoolRecord};

/// Everything one shim run needs, already validated.
#[derive(Debug, Clone)]
pub struct ShimOptions {
    pub kafka: KafkaConfig,
    pub site: String,
    /// Host name of this collector, recorded in every event.
    pub collector: String,
    pub events_topic: String,
    pub dlq_topic: String,
    pub spool_dir: PathBuf,
    pub delivery_timeout: Duration,
    pub max_line_bytes: usize,
}

/// What a run did. `spooled` is what still waits in the spool when the run ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShimReport {
    /// Lines read from stdin (blank lines included).
    pub lines: u64,
    pub events: u64,
    pub dead_letters: u64,
    /// Messages Kafka acknowledged in this run (spooled ones from earlier runs included).
    pub delivered: u64,
    /// Messages left in the spool for a later run.
    pub spooled: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot read stdin: {0}")]
    Input(#[source] std::io::Error),
    #[error("cannot write the spool at {dir}: {source}")]
    Spool {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
}

/// Reads `input` to EOF into a spool segment, then delivers the spool.
pub async fn run<R>(options: &ShimOptions, input: R) -> Result<ShimReport, ShimError>
where
    R: BufRead + Send + 'static,
{
    let spool = open_spool(&options.spool_dir)?;
    let mut report = {
        let spool = spool.clone();
        let options = options.clone();
        tokio::task::spawn_blocking(move || write_input(&options, &spool, input))
            .await
            .expect("input task panicked")?
    };
    let delivery = deliver_spool(options, &spool).await?;
    report.delivered = delivery.delivered;
    report.spooled = delivery.spooled;
    Ok(report)
}

/// `samgate shim --flush-spool`: delivers what earlier runs left, reads no input.
pub async fn flush_spool(options: &ShimOptions) -> Result<ShimReport, ShimError> {
    let spool = open_spool(&options.spool_dir)?;
    deliver_spool(options, &spool).await
}

fn open_spool(dir: &Path) -> Result<Spool, ShimError> {
    Spool::open(dir).map_err(|source| ShimError::Spool {
        dir: dir.to_owned(),
        source,
    })
}

/// Parses every line into an event or a dead letter and writes them, in input order, to a new
/// durable spool segment.
fn write_input<R: BufRead>(
    options: &ShimOptions,
    spool: &Spool,
    input: R,
) -> Result<ShimReport, ShimError> {
    let spool_err = |source| ShimError::Spool {
        dir: spool.dir().to_owned(),
        source,
    };
    let mut segment = spool.begin_segment().map_err(spool_err)?;
    let mut reader = LineReader::new(input, options.max_line_bytes);
    let mut report = ShimReport::default();
    while let Some(line) = reader.next_line().map_err(ShimError::Input)? {
        report.lines += 1;
        let received_at = Utc::now();
        let record = match line.parse(options.max_line_bytes) {
            Ok(None) => continue,
            Ok(Some(parsed)) => {
                report.events += 1;
                let event = Event::new(
                    &options.site,
                    &options.collector,
                    received_at,
                    &line,
                    parsed,
                );
                SpoolRecord {
                    topic: options.events_topic.clone(),
                    key: event.key(),
                    value: serde_json::to_string(&event).expect("events serialize"),
                }
            }
            Err(error) => {
                report.dead_letters += 1;
                warn!(line = line.number, error = error.code(), reason = %error, "line is not a Flowmon event; sending it to the dead-letter topic");
                let mut dead = DeadLetter::new(
                    DeadLetterStage::Shim,
                    error.code(),
                    error.to_string(),
                    &line.bytes,
                    line.len,
                );
                dead.site = Some(options.site.clone());
                dead.collector = Some(options.collector.clone());
                dead.line = Some(line.number);
                SpoolRecord {
                    topic: options.dlq_topic.clone(),
                    key: options.site.clone(),
                    value: serde_json::to_string(&dead).expect("dead letters serialize"),
                }
            }
        };
        segment.push(&record).map_err(spool_err)?;
    }
    segment.commit().map_err(spool_err)?;
    Ok(report)
}

/// Delivers every spooled segment, oldest first, within `delivery_timeout`.
async fn deliver_spool(options: &ShimOptions, spool: &Spool) -> Result<ShimReport, ShimError> {
    let deadline = Instant::now() + options.delivery_timeout;
    let spool_err = |source| ShimError::Spool {
        dir: spool.dir().to_owned(),
        source,
    };
    let lock = {
        let spool = spool.clone();
        let wait = options.delivery_timeout;
        tokio::task::spawn_blocking(move || spool.lock(wait))
            .await
            .expect("lock task panicked")
            .map_err(spool_err)?
    };
    let Some(lock) = lock else {
        info!("another shim run is delivering the spool; it will deliver this run's events too");
        return Ok(ShimReport::default());
    };
    let segments = spool.segments(&lock).map_err(spool_err)?;
    if segments.is_empty() {
        return Ok(ShimReport::default());
    }
    let pending = spool.pending(&lock).map_err(spool_err)? as u64;

    let topics = [options.events_topic.as_str(), options.dlq_topic.as_str()];
    if let Err(e) = kafka::ensure_topics(&options.kafka, &topics, remaining(deadline)).await {
        error!(error = %e, spooled = pending, spool = %spool.dir().display(), "Kafka is not usable; events stay spooled for the next run");
        return Ok(ShimReport {
            spooled: pending,
            ..ShimReport::default()
        });
    }
    let producer = kafka::producer(&options.kafka, remaining(deadline))?;

    let mut report = ShimReport::default();
    let mut in_flight: VecDeque<(usize, usize, DeliveryFuture)> = VecDeque::new();
    let mut failed: Vec<HashSet<usize>> = vec![HashSet::new(); segments.len()];
    for (s, segment) in segments.iter().enumerate() {
        for (r, record) in segment_records(segment).map_err(spool_err)?.enumerate() {
            let record = record.map_err(spool_err)?;
            let future = send(&producer, &record, &mut in_flight, &mut failed, &mut report).await;
            match future {
                Some(future) => in_flight.push_back((s, r, future)),
                None => {
                    failed[s].insert(r);
                }
            }
        }
    }
    while let Some((s, r, future)) = in_flight.pop_front() {
        settle_delivery(s, r, future.await, &mut failed, &mut report);
    }
    settle_segments(spool, &lock, &segments, &failed, &mut report).map_err(spool_err)?;
    Ok(report)
}

/// Hands one record to the producer; when its queue is full, waits for the oldest delivery.
async fn send(
    producer: &FutureProducer,
    record: &SpoolRecord,
    in_flight: &mut VecDeque<(usize, usize, DeliveryFuture)>,
    failed: &mut [HashSet<usize>],
    report: &mut ShimReport,
) -> Option<DeliveryFuture> {
    loop {
        let message = FutureRecord::to(&record.topic)
            .key(&record.key)
            .payload(&record.value);
        match producer.send_result(message) {
            Ok(future) => return Some(future),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                match in_flight.pop_front() {
                    Some((s, r, future)) => settle_delivery(s, r, future.await, failed, report),
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            Err((e, _)) => {
                warn!(topic = record.topic, error = %e, "cannot enqueue a message; it stays spooled");
                return None;
            }
        }
    }
}

fn settle_delivery<Canceled>(
    segment: usize,
    record: usize,
    result: Result<OwnedDeliveryResult, Canceled>,
    failed: &mut [HashSet<usize>],
    report: &mut ShimReport,
) {
    match result {
        Ok(Ok(_)) => report.delivered += 1,
        Ok(Err((e, _))) => {
            debug!(error = %e, "delivery failed");
            failed[segment].insert(record);
        }
        Err(_) => {
            failed[segment].insert(record);
        }
    }
}

/// Removes what was delivered from each segment; keeps the rest.
fn settle_segments(
    spool: &Spool,
    lock: &SpoolLock,
    segments: &[PathBuf],
    failed: &[HashSet<usize>],
    report: &mut ShimReport,
) -> std::io::Result<()> {
    for (segment, failed) in segments.iter().zip(failed) {
        let remaining: Vec<SpoolRecord> = if failed.is_empty() {
            Vec::new()
        } else {
            segment_records(segment)?
                .enumerate()
                .filter(|(i, _)| failed.contains(i))
                .map(|(_, r)| r)
                .collect::<std::io::Result<_>>()?
        };
        report.spooled += remaining.len() as u64;
        spool.settle(lock, segment, &remaining)?;
    }
    if report.spooled > 0 {
        error!(spooled = report.spooled, delivered = report.delivered, spool = %spool.dir().display(), "Kafka did not acknowledge every message in time; the rest stays spooled for the next run");
    }
    Ok(())
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    //! Fast, in-process: librdkafka's mock cluster stands in for Kafka. The end-to-end tests in
    //! `tests/shim.rs` run the binary against a real broker.
    use super::*;
    use rdkafka::mocking::MockCluster;

    fn options(brokers: String, spool: &Path) -> ShimOptions {
        ShimOptions {
            kafka: KafkaConfig {
                brokers,
                ..KafkaConfig::default()
            },
            site: "lab".into(),
            collector: "test-host".into(),
            events_topic: "events".into(),
            dlq_topic: "dlq".into(),
            spool_dir: spool.to_owned(),
            delivery_timeout: Duration::from_secs(2),
            max_line_bytes: 4096,
        }
    }

    fn lines(n: u32) -> Vec<u8> {
        (0..n)
            .map(|i| {
                let mut f = vec![" "; 15];
                let id = i.to_string();
                let ip = format!("10.9.{}.{}", i / 250, i % 250 + 1);
                f[0] = &id;
                f[3] = "SCANS";
                f[10] = &ip;
                f.join("\t") + "\n"
            })
            .collect::<String>()
            .into_bytes()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn delivers_everything_and_spools_while_the_cluster_is_down() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("events", 3, 1).unwrap();
        cluster.create_topic("dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let options = options(cluster.bootstrap_servers(), dir.path());

        let mut input = lines(500);
        input.extend_from_slice(b"not an event\n");
        let report = run(&options, std::io::Cursor::new(input)).await.unwrap();
        assert_eq!(
            (
                report.lines,
                report.events,
                report.dead_letters,
                report.delivered,
                report.spooled
            ),
            (501, 500, 1, 501, 0)
        );

        cluster.broker_down(1).unwrap();
        let report = run(&options, std::io::Cursor::new(lines(20)))
            .await
            .unwrap();
        assert_eq!((report.delivered, report.spooled), (0, 20), "{report:?}");

        cluster.broker_up(1).unwrap();
        let report = flush_spool(&options).await.unwrap();
        assert_eq!((report.lines, report.delivered, report.spooled), (0, 20, 0));
    }
}
