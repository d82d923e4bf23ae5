//! `samgate shim`: what Flowmon ADS runs. Its first act is to copy stdin, to its end and before
//! reading any configuration, into the [spool](crate::spool) (`cli` calls [`spool::capture`]);
//! only then does it read the configuration, turn the spooled input into events (bad lines into
//! dead letters) and deliver everything spooled, oldest first, within `shim.delivery_timeout`.
//! A broken configuration, a dead broker or a full disk therefore never costs an ADS run: what
//! Kafka did not acknowledge stays spooled for the next run.

use std::collections::VecDeque;
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::FlowmonApiConfig;
use crate::config::KafkaConfig;
use crate::event::{DeadLetter, DeadLetterStage, Event, MacAddr};
use crate::flowmon::{InputFormat, LineReader};
use crate::kafka;
use crate::spool::{self, segment_records, RawHeader, Spool, SpoolLock, SpoolRecord};

/// The longest line read at all: a longer one is dead-lettered unread. Lines up to this size are
/// parsed, and an event over `max_line_bytes` is cut to fit (see [`Event::fit`]).
pub const READ_LINE_LIMIT: usize = 16 * 1024 * 1024;

/// How much of a message Kafka refused its dead letter keeps: the refusal may be for size.
const REFUSED_RAW_LIMIT: usize = 4 * 1024;

/// Everything one shim run needs, already validated.
#[derive(Debug, Clone)]
pub struct ShimOptions {
    pub kafka: KafkaConfig,
    /// The site of input whose run did not name one.
    pub site: String,
    /// Host name of this collector, recorded in every event.
    pub collector: String,
    pub events_topic: String,
    pub dlq_topic: String,
    /// The spool, then the fallback spool (if any).
    pub spool_dirs: Vec<PathBuf>,
    pub delivery_timeout: Duration,
    /// The largest event message: longer ones are cut to fit.
    pub max_line_bytes: usize,
    /// Look up source MACs in Flowmon's REST API (`shim.flowmon_api`).
    pub flowmon_api: Option<FlowmonApiConfig>,
}

/// What a run did. `spooled` is what still waits in the spool when the run ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShimReport {
    /// Lines this run turned into messages (its own input, and input earlier runs left raw).
    pub lines: u64,
    pub events: u64,
    pub dead_letters: u64,
    /// Events cut to fit a message (their targets, raw line or detail shortened).
    pub cut: u64,
    /// Messages Kafka acknowledged in this run (spooled ones from earlier runs included).
    pub delivered: u64,
    /// Messages Kafka refused for good, sent to the dead-letter topic instead.
    pub refused: u64,
    /// Messages left in the spool for a later run.
    pub spooled: u64,
    /// Messages no spool could keep and Kafka did not acknowledge: lost.
    pub lost: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot use the spool at {dir}: {source}")]
    Spool {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn spool_err(dir: &Path) -> impl Fn(std::io::Error) -> ShimError + '_ {
    move |source| ShimError::Spool {
        dir: dir.to_owned(),
        source,
    }
}

/// Delivers `memory` (input no spool could keep: its undelivered messages are lost, and
/// counted), then turns spooled input into messages and delivers the spool, oldest first, all
/// within `delivery_timeout`. A spool that fails is said so and left for a later run; it never
/// holds back the rest.
pub async fn deliver(options: &ShimOptions, memory: Option<(RawHeader, Vec<u8>)>) -> ShimReport {
    let deadline = Instant::now() + options.delivery_timeout;
    let mut report = ShimReport::default();
    let mut delivery = Delivery::new(options, deadline);
    // First: it is the only copy (and the newest input; the spool's order is kept on disk).
    if let Some((header, bytes)) = memory {
        delivery.memory(&header, &bytes, &mut report).await;
    }
    let held = lock_spools(options, deadline).await;
    let mut attempted = HashSet::new();
    // Segments written meanwhile by concurrent runs are picked up while time remains.
    while Instant::now() < deadline {
        let mut segments = Vec::new();
        for (spool, lock) in &held {
            convert_raw(options, spool, lock, &mut report, deadline).await;
            match spool.segments(lock) {
                Ok(listed) => {
                    segments.extend(listed.into_iter().filter(|s| !attempted.contains(s)))
                }
                Err(e) => {
                    error!(spool = %spool.dir().display(), error = %e, "cannot list the spool; what it holds waits for a later run")
                }
            }
        }
        if segments.is_empty() {
            break;
        }
        segments.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        attempted.extend(segments.iter().cloned());
        if !delivery.ready(&mut report).await {
            report.spooled += count_records(&segments);
            return report;
        }
        for segment in &segments {
            let spool = held
                .iter()
                .find(|(s, _)| segment.parent() == Some(s.dir()))
                .expect("a segment of a held spool");
            if let Err(e) = delivery.segment(spool, segment, &mut report).await {
                // Whatever it holds stays (sent again by a later run: bounded duplicates).
                error!(segment = %segment.display(), error = %e, "cannot deliver this spool segment; it stays for a later run");
                report.spooled += count_records(std::slice::from_ref(segment));
            }
        }
    }
    let unattempted: Vec<PathBuf> = held
        .iter()
        .flat_map(|(spool, lock)| spool.segments(lock).unwrap_or_default())
        .filter(|s| !attempted.contains(s))
        .collect();
    report.spooled += count_records(&unattempted);
    if report.spooled > 0 {
        error!(spooled = report.spooled, delivered = report.delivered, "Kafka did not acknowledge every message in time; the rest stays spooled for the next run");
    }
    report
}

/// The lock of every spool directory that exists (the fallback only once it was needed). A
/// directory that cannot be opened or locked (a read-only disk, say) is left for a later run,
/// said so, and the others are delivered.
async fn lock_spools(options: &ShimOptions, deadline: Instant) -> Vec<(Spool, SpoolLock)> {
    let mut held = Vec::new();
    for (i, dir) in options.spool_dirs.iter().enumerate() {
        if i > 0 && !dir.exists() {
            continue;
        }
        let wait = deadline.saturating_duration_since(Instant::now()) / 2;
        let open = dir.clone();
        let locked = tokio::task::spawn_blocking(move || {
            let spool = Spool::open(&open)?;
            let Some(lock) = spool.lock(wait)? else {
                return Ok(None);
            };
            spool.remove_stale(&lock)?;
            Ok::<_, std::io::Error>(Some((spool, lock)))
        })
        .await
        .expect("lock task panicked");
        match locked {
            Ok(Some(held_spool)) => held.push(held_spool),
            Ok(None) => {
                info!(spool = %dir.display(), "another shim run is delivering this spool; it will deliver this run's input too")
            }
            Err(e) => {
                error!(spool = %dir.display(), error = %e, "cannot use this spool directory; what it holds waits for a later run")
            }
        }
    }
    held
}

/// Converts every raw segment of `spool` into a message segment (one that cannot be converted
/// stays raw, said so).
async fn convert_raw(
    options: &ShimOptions,
    spool: &Spool,
    lock: &SpoolLock,
    report: &mut ShimReport,
    deadline: Instant,
) {
    let raws = match spool.raw_segments(lock) {
        Ok(raws) => raws,
        Err(e) => {
            error!(spool = %spool.dir().display(), error = %e, "cannot list the spool's input; it waits for a later run");
            return;
        }
    };
    for raw in raws {
        // The input is safe in the spool already: a lookup that fails or is slow costs only
        // the MAC addresses, within its share of the deadline.
        let macs = match &options.flowmon_api {
            Some(api) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let ids = ads_event_ids(&raw);
                crate::flowmon_api::source_macs(api, &ids, crate::flowmon_api::budget(api, left))
                    .await
            }
            None => HashMap::new(),
        };
        let converted = spool.convert(lock, &raw, |header, input, writer| {
            for record in messages(options, header, input, report, &macs) {
                writer.push(&record?)?;
            }
            Ok(())
        });
        if let Err(e) = converted {
            error!(segment = %raw.display(), error = %e, "cannot convert spooled input; it stays spooled");
        }
    }
}

/// The ADS event ids of a raw segment's lines (what Flowmon's REST API knows MACs by), at most
/// [`MAX_LOOKUPS`]; IDS events have ids of another kind and are left out.
fn ads_event_ids(raw: &Path) -> Vec<String> {
    let Ok(file) = std::fs::File::open(raw) else {
        return Vec::new();
    };
    let mut input = std::io::BufReader::new(file);
    let mut header = String::new();
    if input.read_line(&mut header).is_err() {
        return Vec::new();
    }
    let mut reader = LineReader::new(&mut input, READ_LINE_LIMIT);
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    while let Ok(Some(line)) = reader.next_line() {
        let Ok(Some(event)) = line.parse(READ_LINE_LIMIT) else {
            continue;
        };
        let ads = !matches!(event.format, InputFormat::Ids | InputFormat::IdsJson);
        if let Some(id) = event.event_id.filter(|_| ads) {
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        if ids.len() >= MAX_LOOKUPS {
            break;
        }
    }
    ids
}

/// The most MAC lookups one raw segment gets (a storm of distinct events gets its first ones).
const MAX_LOOKUPS: usize = 1000;

/// The messages of one run's input: an event per line (with its source's MAC when `macs` knows
/// its ADS event id), a dead letter per bad line.
fn messages<'a>(
    options: &'a ShimOptions,
    header: &'a RawHeader,
    input: &'a mut dyn BufRead,
    report: &'a mut ShimReport,
    macs: &'a HashMap<String, MacAddr>,
) -> impl Iterator<Item = std::io::Result<SpoolRecord>> + 'a {
    let site = header.site.clone().unwrap_or_else(|| options.site.clone());
    let events_topic = header
        .events_topic
        .clone()
        .unwrap_or_else(|| options.events_topic.clone());
    let dlq_topic = header
        .dlq_topic
        .clone()
        .unwrap_or_else(|| options.dlq_topic.clone());
    let mut reader = LineReader::new(input, READ_LINE_LIMIT);
    std::iter::from_fn(move || loop {
        let line = match reader.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        report.lines += 1;
        let parsed = line.parse(READ_LINE_LIMIT).and_then(|parsed| {
            let Some(parsed) = parsed else {
                return Ok(None);
            };
            let mut event = Event::new(&site, &header.collector, header.received_at, &line, parsed);
            event.source_mac =
                (event.flowmon.event_id.as_ref()).and_then(|id| macs.get(id).copied());
            event.fit(options.max_line_bytes).map(Some)
        });
        let record = match parsed {
            Ok(None) => continue,
            Ok(Some((event, cut))) => {
                report.events += 1;
                report.cut += u64::from(cut);
                SpoolRecord {
                    topic: events_topic.clone(),
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
                dead.site = Some(site.clone());
                dead.collector = Some(header.collector.clone());
                dead.line = Some(line.number);
                SpoolRecord {
                    topic: dlq_topic.clone(),
                    key: site.clone(),
                    value: serde_json::to_string(&dead).expect("dead letters serialize"),
                }
            }
        };
        return Some(Ok(record));
    })
}

/// Counts the records of `segments` (for the report), by their lines.
fn count_records(segments: &[PathBuf]) -> u64 {
    segments
        .iter()
        .filter_map(|s| std::fs::File::open(s).ok())
        .map(|file| std::io::BufReader::new(file).split(b'\n').count() as u64)
        .sum()
}

/// Kafka errors that no retry will cure, because the message itself is wrong: the record goes
/// to the dead-letter topic instead. A missing permission is not one of them (an operator
/// grants it, and the spool delivers): the record stays spooled.
pub fn refused_for_good(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
    )
}

/// The code of a refusal no retry will cure, if `e` is one.
fn refusal(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code().filter(|c| refused_for_good(*c))
}

/// One run's producer and what it sends.
struct Delivery<'a> {
    options: &'a ShimOptions,
    deadline: Instant,
    producer: Option<FutureProducer>,
}

/// A record in flight: its index in the segment, and its delivery.
type InFlight = (usize, DeliveryFuture);

impl<'a> Delivery<'a> {
    fn new(options: &'a ShimOptions, deadline: Instant) -> Self {
        Self {
            options,
            deadline,
            producer: None,
        }
    }

    fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// Makes the producer (once). `false` when Kafka is not usable: everything stays spooled.
    async fn ready(&mut self, report: &mut ShimReport) -> bool {
        if self.producer.is_some() {
            return true;
        }
        let o = self.options;
        let topics = [o.events_topic.as_str(), o.dlq_topic.as_str()];
        // The topic check's time is taken from the deadline the deliveries have.
        match kafka::producer_for(
            &o.kafka,
            &topics,
            self.remaining(),
            self.deadline.into_std(),
        )
        .await
        {
            Ok(producer) => {
                self.producer = Some(producer);
                true
            }
            Err(e) => {
                error!(error = %e, delivered = report.delivered, "Kafka is not usable; events stay spooled for the next run");
                false
            }
        }
    }

    /// Delivers one segment; keeps in it what was not acknowledged.
    async fn segment(
        &mut self,
        (spool, lock): &(Spool, SpoolLock),
        segment: &Path,
        report: &mut ShimReport,
    ) -> Result<(), ShimError> {
        let err = spool_err(spool.dir());
        // Streamed, not loaded: memory stays flat however large the segment. A record is read
        // again only to dead-letter it or to keep it.
        let records = segment_records(segment).map_err(&err)?;
        let fetch = |i: usize| segment_records(segment).ok()?.nth(i)?.ok();
        let kept = self.send_all(records, fetch, report).await;
        let remaining: Vec<SpoolRecord> = match kept.is_empty() {
            true => Vec::new(),
            false => segment_records(segment)
                .map_err(&err)?
                .enumerate()
                .filter(|(i, _)| kept.binary_search(i).is_ok())
                .map(|(_, r)| r)
                .collect::<std::io::Result<_>>()
                .map_err(&err)?,
        };
        report.spooled += remaining.len() as u64;
        spool.settle(lock, segment, &remaining).map_err(&err)
    }

    /// Delivers input that only memory holds; what is not acknowledged is lost, and said so.
    async fn memory(&mut self, header: &RawHeader, bytes: &[u8], report: &mut ShimReport) {
        let mut input: &[u8] = bytes;
        // Input only memory holds gets no MAC lookups: its time goes to delivering it.
        let none = HashMap::new();
        let records: Vec<SpoolRecord> = messages(self.options, header, &mut input, report, &none)
            .collect::<std::io::Result<_>>()
            .expect("reading memory cannot fail");
        let lost = if self.ready(report).await {
            let fetch = |i: usize| records.get(i).cloned();
            self.send_all(records.iter().cloned().map(Ok), fetch, report)
                .await
                .len()
        } else {
            records.len()
        };
        if lost > 0 {
            report.lost += lost as u64;
            error!(lost, "no spool directory could keep this run's input and Kafka did not take all of it: these events are lost");
        }
    }

    /// Sends `records` (a refused one to the dead-letter topic instead); returns the indices of
    /// those not acknowledged before the deadline.
    async fn send_all(
        &self,
        records: impl Iterator<Item = std::io::Result<SpoolRecord>>,
        fetch: impl Fn(usize) -> Option<SpoolRecord>,
        report: &mut ShimReport,
    ) -> Vec<usize> {
        let producer = self.producer.as_ref().expect("ready before sending");
        let mut kept = Vec::new();
        let mut refused = Vec::new();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        for (i, record) in records.enumerate() {
            let record = match record {
                Ok(record) if Instant::now() < self.deadline => record,
                _ => {
                    kept.push(i);
                    continue;
                }
            };
            match self
                .enqueue(
                    producer,
                    &record,
                    &mut in_flight,
                    &mut kept,
                    &mut refused,
                    report,
                )
                .await
            {
                Ok(future) => in_flight.push_back((i, future)),
                Err(Some(code)) => refused.push((i, code)),
                Err(None) => kept.push(i),
            }
        }
        while let Some((i, future)) = in_flight.pop_front() {
            self.settle(i, future, &mut kept, &mut refused, report)
                .await;
        }
        for (i, code) in refused {
            let Some(record) = fetch(i) else {
                kept.push(i);
                continue;
            };
            if !self.dead_letter(producer, &record, code).await {
                kept.push(i);
            } else {
                report.refused += 1;
            }
        }
        kept.sort_unstable();
        kept
    }

    /// Hands one record to the producer; when its queue is full, waits for the oldest delivery.
    /// `Err(Some(code))`: refused for good; `Err(None)`: not now.
    async fn enqueue(
        &self,
        producer: &FutureProducer,
        record: &SpoolRecord,
        in_flight: &mut VecDeque<InFlight>,
        kept: &mut Vec<usize>,
        refused: &mut Vec<(usize, RDKafkaErrorCode)>,
        report: &mut ShimReport,
    ) -> Result<DeliveryFuture, Option<RDKafkaErrorCode>> {
        loop {
            let message = FutureRecord::to(&record.topic)
                .key(&record.key)
                .payload(&record.value);
            match producer.send_result(message) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match in_flight.pop_front() {
                        Some((i, future)) => self.settle(i, future, kept, refused, report).await,
                        // Full of what an earlier segment left to librdkafka (or of nothing a
                        // message this large fits in): wait, but never past the deadline.
                        None if Instant::now() >= self.deadline => return Err(None),
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => {
                    let code = refusal(&e);
                    if code.is_none() {
                        warn!(topic = record.topic, error = %e, "cannot enqueue a message; it stays spooled");
                    }
                    return Err(code);
                }
            }
        }
    }

    async fn settle(
        &self,
        i: usize,
        future: DeliveryFuture,
        kept: &mut Vec<usize>,
        refused: &mut Vec<(usize, RDKafkaErrorCode)>,
        report: &mut ShimReport,
    ) {
        match tokio::time::timeout_at(self.deadline, future).await {
            Ok(Ok(Ok(_))) => report.delivered += 1,
            Ok(Ok(Err((e, _)))) => match refusal(&e) {
                Some(code) => refused.push((i, code)),
                None => kept.push(i),
            },
            Ok(Err(_)) | Err(_) => kept.push(i),
        }
    }

    /// A record Kafka refused for good, as a dead letter (its value cut to fit). `false` when
    /// the dead letter was not acknowledged either: the record stays spooled.
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        record: &SpoolRecord,
        code: RDKafkaErrorCode,
    ) -> bool {
        let reason = format!(
            "Kafka refused the {} byte message for topic {:?}: {code}",
            record.value.len(),
            record.topic
        );
        error!(topic = record.topic, bytes = record.value.len(), error = %code, "Kafka refused a message for good; sending it to the dead-letter topic");
        let dead = if record.topic == self.options.dlq_topic {
            // A dead letter refused: once more with its input cut short (a bad line keeps up
            // to 64 KiB, more as JSON). Refused again, it stays spooled: the topic needs a fix.
            match serde_json::from_str::<DeadLetter>(&record.value) {
                Ok(dead) if dead.raw.len() > REFUSED_RAW_LIMIT / 4 => {
                    dead.shortened(REFUSED_RAW_LIMIT / 4)
                }
                _ => return false,
            }
        } else {
            let value = record.value.as_bytes();
            DeadLetter::new(
                DeadLetterStage::Shim,
                "kafka_refused",
                reason,
                &value[..value.len().min(REFUSED_RAW_LIMIT)],
                value.len(),
            )
        };
        let value = serde_json::to_string(&dead).expect("dead letters serialize");
        let message = FutureRecord::to(&self.options.dlq_topic)
            .key(&record.key)
            .payload(&value);
        match producer.send_result(message) {
            Ok(future) => matches!(
                tokio::time::timeout_at(self.deadline, future).await,
                Ok(Ok(Ok(_)))
            ),
            Err(_) => false,
        }
    }
}

/// A whole run in one call, for callers with the input in hand (the demo, tests): capture into
/// the spool, then deliver.
pub async fn run<R>(options: &ShimOptions, input: R) -> ShimReport
where
    R: std::io::Read + Send + 'static,
{
    let header = RawHeader {
        received_at: chrono::Utc::now(),
        collector: options.collector.clone(),
        site: None,
        events_topic: None,
        dlq_topic: None,
    };
    let dirs = options.spool_dirs.clone();
    let head = header.clone();
    let (captured, _, _) = tokio::task::spawn_blocking(move || spool::capture(&dirs, &head, input))
        .await
        .expect("capture task panicked");
    let memory = match captured {
        spool::Captured::InMemory(bytes) => Some((header, bytes)),
        _ => None,
    };
    deliver(options, memory).await
}

/// `samgate shim --flush-spool`: delivers what earlier runs left, reads no input.
pub async fn flush_spool(options: &ShimOptions) -> ShimReport {
    deliver(options, None).await
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
            spool_dirs: vec![spool.to_owned()],
            delivery_timeout: Duration::from_secs(2),
            max_line_bytes: 4096,
            flowmon_api: None,
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
        let report = run(&options, std::io::Cursor::new(input)).await;
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
        let report = run(&options, std::io::Cursor::new(lines(20))).await;
        assert_eq!((report.delivered, report.spooled), (0, 20), "{report:?}");

        cluster.broker_up(1).unwrap();
        let report = flush_spool(&options).await;
        assert_eq!((report.lines, report.delivered, report.spooled), (0, 20, 0));
    }

    /// Input no spool could keep goes first, whole (the header is not a line), whatever
    /// the spool holds; an unreadable spool segment does not hold back the next one.
    #[tokio::test(flavor = "multi_thread")]
    async fn memory_input_goes_first_and_a_bad_segment_holds_nothing_back() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("events", 1, 1).unwrap();
        cluster.create_topic("dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let options = options(cluster.bootstrap_servers(), dir.path());
        // Two spooled segments: the first has an undecodable line, then one of the second's.
        cluster.broker_down(1).unwrap();
        run(&options, std::io::Cursor::new(lines(3))).await;
        run(&options, std::io::Cursor::new(lines(2))).await;
        cluster.broker_up(1).unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let segments = {
            let lock = spool.lock(Duration::ZERO).unwrap().unwrap();
            spool.segments(&lock).unwrap()
        };
        assert_eq!(segments.len(), 2);
        let mut first = std::fs::read(&segments[0]).unwrap();
        first.extend_from_slice(b"\xff\xfe not a record\n");
        std::fs::write(&segments[0], first).unwrap();

        let header = RawHeader {
            received_at: chrono::Utc::now(),
            collector: "test-host".into(),
            site: None,
            events_topic: None,
            dlq_topic: None,
        };
        let report = deliver(&options, Some((header, lines(4)))).await;
        assert_eq!(
            (
                report.lines,
                report.events,
                report.dead_letters,
                report.lost
            ),
            (4, 4, 0, 0),
            "the memory input, its header not read as a line: {report:?}"
        );
        assert_eq!(
            (report.delivered, report.spooled),
            (4 + 3 + 2, 0),
            "{report:?}"
        );
    }

    /// A spool directory that cannot be used at all (here a file stands where it should be)
    /// does not stop the run: the input goes to the fallback, and the fallback is delivered.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_unusable_spool_does_not_hold_back_the_fallback() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("events", 1, 1).unwrap();
        cluster.create_topic("dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, "").unwrap();
        let mut options = options(cluster.bootstrap_servers(), &blocked.join("spool"));
        let fallback = dir.path().join("fallback");
        options.spool_dirs.push(fallback.clone());
        let report = run(&options, std::io::Cursor::new(lines(5))).await;
        assert_eq!(
            (report.events, report.delivered, report.spooled, report.lost),
            (5, 5, 0, 0)
        );
    }

    #[test]
    fn only_refusals_no_retry_cures_are_for_good() {
        use RDKafkaErrorCode as C;
        for (code, for_good) in [
            (C::MessageSizeTooLarge, true),
            (C::TopicAuthorizationFailed, false), // granted later, the spool delivers
            (C::InvalidRecord, true),
            (C::MessageTimedOut, false),
            (C::BrokerTransportFailure, false),
            (C::NotLeaderForPartition, false),
            (C::UnknownTopicOrPartition, false),
        ] {
            assert_eq!(refused_for_good(code), for_good, "{code:?}");
        }
    }
}
