//! `samgate run`: the enforcement pipeline. Read this file top to bottom in the order data flows:
//! consume → decode → policy → dedupe → (never-block, last) → batch → enforce → report → commit.
//!
//! **When an offset becomes durable.** An event's offset is *finished* when the result message of
//! every decision it caused has been acknowledged by Kafka (for a block: after the state record,
//! then the result). Per partition, the committable position is the lowest offset still in
//! flight, or one past the highest finished; commits happen every second (async), and
//! synchronously on revoke and on shutdown. So a commit never covers an event without a durable
//! result, and a crash redelivers at most the events after the last commit, whose repeats the
//! idempotency key absorbs.

pub mod dedupe;
pub mod enforce;
pub mod offsets;
pub mod policy;
pub mod report;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::checkpoint::ManagementClient;
use crate::config::Config;
use crate::event::{DeadLetter, DeadLetterStage, Event, EVENT_SCHEMA};
use crate::http::Readiness;
use crate::metrics::Metrics;
use dedupe::{BlockRecord, BlockState, Check};
use enforce::{ServerLimits, Work};
use offsets::OffsetTracker;
use policy::{idempotency_key, Policy};
use report::{ActiveBlock, Outcome, ResultMessage};

/// What every stage shares.
pub struct Shared {
    pub config: Config,
    pub producer: FutureProducer,
    pub metrics: Arc<Metrics>,
    pub tracker: Mutex<OffsetTracker>,
    pub state: Mutex<BlockState>,
    pub cancel: CancellationToken,
}

/// Counts the decisions of one event still without an acknowledged result.
pub struct Completion {
    pub partition: i32,
    pub offset: i64,
    remaining: AtomicUsize,
}

/// Writes `result`, and finishes the event's offset once its last result is acknowledged.
pub async fn finish(shared: &Arc<Shared>, completion: &Arc<Completion>, result: ResultMessage) {
    let payload = serde_json::to_string(&result).expect("results serialize");
    let written = report::produce_acked(
        &shared.producer,
        &shared.config.kafka.topics.results,
        &result.kafka_key(),
        &payload,
        None,
        &shared.cancel,
    )
    .await;
    if !written {
        return; // shutting down: the event is redelivered to whoever owns its partition next
    }
    shared
        .metrics
        .decisions
        .with_label_values(&[result.outcome.as_str()])
        .inc();
    report::log_decision(&result);
    if completion.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        let mut tracker = shared.tracker.lock().expect("tracker");
        tracker.finish(completion.partition, completion.offset);
        shared.metrics.in_flight.set(tracker.in_flight() as i64);
    }
}

fn spawn_finish(shared: &Arc<Shared>, completion: &Arc<Completion>, result: ResultMessage) {
    let (shared, completion) = (shared.clone(), completion.clone());
    tokio::spawn(async move { finish(&shared, &completion, result).await });
}

/// Runs the pipeline until `cancel`. Returns the HTTP listener's address through `on_listen`.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::default();
    let (http_addr, http_task) = crate::http::serve(
        config.run.http_listen,
        metrics.clone(),
        ready.clone(),
        cancel.child_token(),
    )
    .await
    .with_context(|| format!("cannot listen on {}", config.run.http_listen))?;
    on_listen(http_addr);
    info!(%http_addr, "serving /metrics, /healthz, /readyz");

    // Management servers: one client (one session) each; their addresses are never blocked.
    let mut clients = BTreeMap::new();
    let mut server_addresses: Vec<IpAddr> = Vec::new();
    for (name, server) in &config.checkpoint.servers {
        let client = ManagementClient::new(name, server)
            .map_err(|e| anyhow::anyhow!(e))?
            .with_metrics(metrics.clone());
        clients.insert(name.clone(), Arc::new(client));
        server_addresses.extend(resolve(&server.url).await);
    }
    let policy = Policy::new(&config, &server_addresses);
    metrics.zero_known_series(
        config.sites.keys().map(String::as_str),
        config.checkpoint.servers.keys().map(String::as_str),
    );

    let topics = &config.kafka.topics;
    crate::kafka::ensure_topics(
        &config.kafka,
        &[&topics.events, &topics.results, &topics.dlq],
        Duration::from_secs(30),
    )
    .await?;
    let partitions =
        crate::kafka::partition_count(&config.kafka, &topics.events, Duration::from_secs(30))
            .await?;
    crate::kafka::ensure_state_topic(
        &config.kafka,
        &topics.state,
        partitions,
        Duration::from_secs(30),
    )
    .await?;

    let shared = Arc::new(Shared {
        producer: crate::kafka::producer(&config.kafka, Duration::from_secs(30))?,
        metrics: metrics.clone(),
        tracker: Mutex::new(OffsetTracker::default()),
        state: Mutex::new(BlockState::new(
            config.run.max_tracked_blocks,
            config.policy.escalation_window,
        )),
        cancel: cancel.clone(),
        config,
    });
    let config = &shared.config;

    // One batcher per target, with per-server courtesy limits.
    let limits: BTreeMap<String, Arc<ServerLimits>> = clients
        .keys()
        .map(|name| {
            (
                name.clone(),
                Arc::new(ServerLimits::new(
                    config.run.server_concurrency,
                    config.run.server_calls_per_second,
                )),
            )
        })
        .collect();
    let mut queues: BTreeMap<String, mpsc::Sender<Work>> = BTreeMap::new();
    let mut enforcers = Vec::new();
    for (name, target_config) in &config.targets {
        // As deep as `max_in_flight` (which bounds memory already), so one busy target cannot
        // stall the consume loop for the others while there is room in flight.
        let (tx, rx) = mpsc::channel(config.run.max_in_flight);
        queues.insert(name.clone(), tx);
        let target = Arc::new(policy.target(name).expect("validated target").clone());
        enforcers.push(tokio::spawn(enforce::run_target(
            target,
            clients[&target_config.server].clone(),
            limits[&target_config.server].clone(),
            rx,
            shared.clone(),
        )));
    }
    let keepalive_cancel = CancellationToken::new();
    let keepalives: Vec<_> = clients
        .values()
        .map(|c| {
            let (c, token) = (c.clone(), keepalive_cancel.clone());
            tokio::spawn(async move { c.run_keepalive(token).await })
        })
        .collect();

    let consumer: StreamConsumer<PipelineContext> = crate::kafka::base_config(&config.kafka)
        .set("group.id", &config.run.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        .create_with_context(PipelineContext {
            shared: shared.clone(),
            ready: ready.clone(),
        })
        .context("cannot create the Kafka consumer")?;
    consumer.subscribe(&[&config.kafka.topics.events])?;
    info!(
        group = config.run.group_id,
        topic = config.kafka.topics.events,
        dry_run = config.run.dry_run,
        "consuming"
    );

    let mut commit_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // Backpressure: the one place consumption waits for enforcement to catch up.
        while shared.tracker.lock().expect("tracker").in_flight() >= config.run.max_in_flight
            && !cancel.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = commit_tick.tick() => {
                commit(&consumer, &shared, CommitMode::Async);
                let active = shared.state.lock().expect("state").active(Utc::now());
                shared.metrics.active_blocks.set(active as i64);
            }
            message = consumer.recv() => match message {
                Ok(m) => {
                    let (partition, offset, payload) = (m.partition(), m.offset(), m.payload().map(<[u8]>::to_vec));
                    drop(m);
                    handle(&shared, &policy, &queues, partition, offset, payload).await;
                }
                Err(e) => warn!(error = %e, "Kafka consumer error"),
            },
        }
    }

    // Shutdown: stop taking input, let in-flight work finish (bounded), commit, log out.
    info!("shutting down: finishing in-flight work");
    ready.set(false);
    drop(queues);
    let deadline = tokio::time::Instant::now() + config.run.shutdown_timeout;
    while shared.tracker.lock().expect("tracker").in_flight() > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.tracker.lock().expect("tracker").in_flight();
    if left > 0 {
        warn!(
            left,
            "events still in flight at the shutdown deadline; they will be redelivered"
        );
    }
    commit(&consumer, &shared, CommitMode::Sync);
    keepalive_cancel.cancel();
    for k in keepalives {
        let _ = k.await;
    }
    for e in enforcers {
        e.abort();
    }
    drop(consumer);
    let _ = http_task.await;
    info!("stopped");
    Ok(())
}

/// Decode, decide, dedupe, and hand blocks to their target's batcher.
async fn handle(
    shared: &Arc<Shared>,
    policy: &Policy,
    queues: &BTreeMap<String, mpsc::Sender<Work>>,
    partition: i32,
    offset: i64,
    payload: Option<Vec<u8>>,
) {
    shared
        .tracker
        .lock()
        .expect("tracker")
        .begin(partition, offset);
    let payload = payload.unwrap_or_default();

    // Decode: anything that is not a samgate.event.v1 goes to the dead-letter topic.
    let event = match serde_json::from_slice::<Event>(&payload) {
        Ok(e) if e.schema == EVENT_SCHEMA => e,
        Ok(e) => {
            return dead_letter(
                shared,
                partition,
                offset,
                &payload,
                format!("unknown schema {:?}", e.schema),
            )
            .await
        }
        Err(e) => {
            return dead_letter(
                shared,
                partition,
                offset,
                &payload,
                format!("not a samgate.event.v1 message: {e}"),
            )
            .await
        }
    };
    let site_label = if shared.config.sites.contains_key(&event.site) {
        event.site.as_str()
    } else {
        "unknown"
    };
    shared
        .metrics
        .events_consumed
        .with_label_values(&[site_label, event.flowmon.format.as_str()])
        .inc();

    // Policy: which targets, or why none.
    let targets = match policy.route(&event) {
        Ok(targets) => targets,
        Err(filtered) => {
            let completion = completion(partition, offset, 1);
            let result =
                ResultMessage::for_event(&event, Outcome::Filtered, filtered.code, filtered.detail);
            return spawn_finish(shared, &completion, result);
        }
    };
    let completion = completion(partition, offset, targets.len());
    let source = event.flowmon.source;
    let now = Utc::now();
    for target in targets {
        let key = idempotency_key(&event.site, target, source);
        let mut result = ResultMessage::for_event(&event, Outcome::Blocked, "", String::new());
        result.key = Some(key.to_string());
        result.target = Some(target.name.clone());
        result.server = Some(target.server.clone());
        result.gateways = target.gateways.clone();
        result.action = Some(target.action_name().into());
        result.mode = Some(match target.mode {
            crate::checkpoint::sam::SamMode::FwSam => "fw_sam".into(),
            crate::checkpoint::sam::SamMode::FwSamp => "fw_samp".into(),
        });

        // Dedupe: an active (or pending) block for this key means no firewall call.
        let check = shared.state.lock().expect("state").check(&key, now);
        let mut verify = None;
        let level = match check {
            Check::Active(block) => {
                duplicate(&mut result, Some(&block));
                spawn_finish(shared, &completion, result);
                continue;
            }
            Check::Pending => {
                duplicate(&mut result, None);
                spawn_finish(shared, &completion, result);
                continue;
            }
            Check::Unconfirmed(record) => {
                let level = record.level;
                verify = Some(record);
                level
            }
            Check::Repeat { level } => level,
            Check::New => 0,
        };
        let duration = policy.duration(event.flowmon.priority, level);
        result.level = Some(level);
        result.duration_s = Some(duration.as_secs());

        // Safety last: the never-block check sits immediately before the command is built.
        if let Some(network) = policy.never_block(&event.site, source) {
            result.outcome = Outcome::Suppressed;
            result.code = "never_block".into();
            result.reason = format!("{source} is in never-block network {network}");
            result.suppressed_by = Some(network.to_string());
            spawn_finish(shared, &completion, result);
            continue;
        }
        let rule = target.rule(source, duration, key);
        result.command = Some(match target.mode {
            crate::checkpoint::sam::SamMode::FwSam => rule.fw_sam(),
            crate::checkpoint::sam::SamMode::FwSamp => rule.fw_samp_add().unwrap_or_default(),
        });
        if shared.config.run.dry_run {
            result.outcome = Outcome::DryRun;
            result.code = "dry_run".into();
            result.reason = format!(
                "dry run: would block for {}",
                humantime::format_duration(duration)
            );
            spawn_finish(shared, &completion, result);
            continue;
        }
        shared.state.lock().expect("state").begin(key, partition);
        let work = Work {
            completion: completion.clone(),
            key,
            rule,
            level,
            duration,
            result,
            first_attempt: tokio::time::Instant::now(),
            attempts: 0,
            next_try: tokio::time::Instant::now(),
            verify,
        };
        // A full queue makes this wait: consumption pauses, memory does not grow.
        if let Err(mpsc::error::SendError(work)) = queues[&target.name].send(work).await {
            shared.state.lock().expect("state").abort(&work.key);
        }
    }
    // (`active_blocks` counts every record, so it is refreshed on the commit tick, not here.)
    let in_flight = shared.tracker.lock().expect("tracker").in_flight();
    shared.metrics.in_flight.set(in_flight as i64);
}

fn completion(partition: i32, offset: i64, decisions: usize) -> Arc<Completion> {
    Arc::new(Completion {
        partition,
        offset,
        remaining: AtomicUsize::new(decisions),
    })
}

fn duplicate(result: &mut ResultMessage, block: Option<&BlockRecord>) {
    result.outcome = Outcome::Duplicate;
    result.code = "active_block".into();
    match block {
        Some(b) => {
            result.reason = format!("already blocked until {}", report::timestamp(b.expires_at));
            result.expires_at = Some(report::timestamp(b.expires_at));
            result.level = Some(b.level);
            result.active_block = Some(ActiveBlock {
                blocked_at: Some(report::timestamp(b.blocked_at)),
                expires_at: Some(report::timestamp(b.expires_at)),
                event_id: Some(b.event_id.clone()),
                level: Some(b.level),
            });
        }
        None => {
            result.reason = "a block for this source is being enforced".into();
            result.active_block = Some(ActiveBlock {
                blocked_at: None,
                expires_at: None,
                event_id: None,
                level: None,
            });
        }
    }
}

async fn dead_letter(
    shared: &Arc<Shared>,
    partition: i32,
    offset: i64,
    payload: &[u8],
    reason: String,
) {
    warn!(
        partition,
        offset, reason, "undecodable message; sending it to the dead-letter topic"
    );
    let dead = DeadLetter::new(
        DeadLetterStage::Decode,
        "invalid_event",
        reason,
        payload,
        payload.len(),
    );
    let json = serde_json::to_string(&dead).expect("dead letters serialize");
    let key = format!("{}/{partition}/{offset}", shared.config.kafka.topics.events);
    let shared = shared.clone();
    tokio::spawn(async move {
        if report::produce_acked(
            &shared.producer,
            &shared.config.kafka.topics.dlq,
            &key,
            &json,
            None,
            &shared.cancel,
        )
        .await
        {
            shared
                .metrics
                .dead_letters
                .with_label_values(&[DeadLetterStage::Decode.as_str()])
                .inc();
            shared
                .tracker
                .lock()
                .expect("tracker")
                .finish(partition, offset);
        }
    });
}

/// Commits every partition's committable position that moved.
fn commit<C: Consumer<PipelineContext>>(consumer: &C, shared: &Shared, mode: CommitMode) {
    let pending = shared.tracker.lock().expect("tracker").pending_commits();
    if pending.is_empty() {
        return;
    }
    let topic = &shared.config.kafka.topics.events;
    let mut list = TopicPartitionList::new();
    for (partition, position) in &pending {
        let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*position));
    }
    match consumer.commit(&list, mode) {
        Ok(()) => {
            let mut tracker = shared.tracker.lock().expect("tracker");
            for (partition, position) in pending {
                tracker.mark_committed(partition, position);
            }
        }
        Err(e) => warn!(error = %e, "offset commit failed; will retry"),
    }
}

/// The addresses of a management server URL's host (never blocked).
async fn resolve(url: &str) -> Vec<IpAddr> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    let port = parsed.port_or_known_default().unwrap_or(443);
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(host)) => match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => addrs.map(|a| a.ip()).collect(),
            Err(e) => {
                warn!(host, error = %e, "cannot resolve a management server; its address is not in the never-block list");
                Vec::new()
            }
        },
        None => Vec::new(),
    }
}

/// Rebalance and statistics hooks.
pub struct PipelineContext {
    shared: Arc<Shared>,
    ready: Readiness,
}

impl ClientContext for PipelineContext {
    fn stats(&self, statistics: Statistics) {
        let topic = &self.shared.config.kafka.topics.events;
        if let Some(t) = statistics.topics.get(topic) {
            let lag: i64 = t
                .partitions
                .values()
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(|p| p.consumer_lag)
                .sum();
            self.shared.metrics.consumer_lag.set(lag);
        }
    }
}

/// Runs blocking work from a rebalance callback without starving the async runtime.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl ConsumerContext for PipelineContext {
    /// Revoke: wait (bounded) for the partitions' in-flight events, commit them synchronously,
    /// and forget their state. Unfinished events go back to the group.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let shared = &self.shared;
        let topic = &shared.config.kafka.topics.events;
        let partitions: Vec<i32> = list
            .elements_for_topic(topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() {
            return;
        }
        info!(
            ?partitions,
            "partitions revoked; finishing their in-flight events"
        );
        blocking(|| {
            let deadline = std::time::Instant::now() + shared.config.run.shutdown_timeout;
            while std::time::Instant::now() < deadline {
                let busy = {
                    let t = shared.tracker.lock().expect("tracker");
                    partitions.iter().any(|p| t.in_flight_on(*p) > 0)
                };
                if !busy {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut commits = TopicPartitionList::new();
            {
                let t = shared.tracker.lock().expect("tracker");
                for p in &partitions {
                    if let Some(position) = t.committable(*p) {
                        let _ = commits.add_partition_offset(topic, *p, Offset::Offset(position));
                    }
                }
            }
            if commits.count() > 0 {
                if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                    warn!(error = %e, "commit on revoke failed");
                }
            }
            let mut t = shared.tracker.lock().expect("tracker");
            let mut state = shared.state.lock().expect("state");
            for p in &partitions {
                t.forget(*p);
                state.drop_partition(*p);
            }
        });
    }

    /// Assign: rebuild the partitions' block state from the state topic before any of their
    /// events is taken.
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let topic = &self.shared.config.kafka.topics.events;
                let partitions: Vec<i32> = list
                    .elements_for_topic(topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                if !partitions.is_empty() {
                    blocking(|| match load_state(&self.shared, &partitions) {
                        Ok(n) => info!(
                            ?partitions,
                            blocks = n,
                            "partitions assigned; block state rebuilt"
                        ),
                        Err(e) => {
                            error!(?partitions, error = %e, "cannot rebuild block state; repeats may be blocked again")
                        }
                    });
                }
                self.ready.set(true);
            }
            Rebalance::Revoke(_) => self.ready.set(true),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// Reads the state topic's `partitions` to their current end into the block state.
fn load_state(shared: &Shared, partitions: &[i32]) -> anyhow::Result<usize> {
    let topic = &shared.config.kafka.topics.state;
    let reader: BaseConsumer = crate::kafka::base_config(&shared.config.kafka)
        .set(
            "group.id",
            format!("{}-state-loader", shared.config.run.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let timeout = Duration::from_secs(30);
    // Partitions still to read. The end of each is the consumer's "partition EOF", not the
    // listed high watermark: tansu 0.6 lists the last *batch's* base offset + 1 there, which
    // would stop the rebuild before the records of a multi-record batch.
    let mut unread = std::collections::BTreeSet::new();
    let mut list = TopicPartitionList::new();
    for &p in partitions {
        let (low, high) = reader.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            unread.insert(p);
            list.add_partition_offset(topic, p, Offset::Offset(low))?;
        }
    }
    if unread.is_empty() {
        return Ok(0);
    }
    reader.assign(&list)?;
    let now = Utc::now();
    let mut loaded = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !unread.is_empty() && std::time::Instant::now() < deadline {
        let message = match reader.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                unread.remove(&p);
                continue;
            }
            // A transient error (a broker hiccup, a timeout) is not the end of the rebuild:
            // librdkafka goes on fetching; only the deadline gives up.
            Some(Err(e)) => {
                warn!(error = %e, "reading the state topic; going on");
                continue;
            }
            Some(Ok(message)) => message,
        };
        let p = message.partition();
        let key = message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(crate::checkpoint::sam::RuleKey::parse);
        let mut state = shared.state.lock().expect("state");
        match (key, message.payload()) {
            (Some(key), None) => state.remove(&key),
            (_, Some(payload)) => match serde_json::from_slice::<BlockRecord>(payload) {
                Ok(record) => {
                    state.record(p, record, now);
                    loaded += 1;
                }
                Err(e) => {
                    warn!(partition = p, offset = message.offset(), error = %e, "skipping undecodable state record")
                }
            },
            _ => {}
        }
    }
    if !unread.is_empty() {
        anyhow::bail!("state partitions {unread:?} not read to their end in time");
    }
    Ok(loaded)
}
