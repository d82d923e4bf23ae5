//! `samgate run`: the enforcement pipeline. Read this file top to bottom in the order data flows:
//! consume → decode → decide → (batch → enforce, in `enforce`) → report → commit.
//!
//! **When an offset becomes durable.** An event's offset is *finished* when the result message of
//! every decision it caused has been acknowledged by Kafka (for a block: after the state record,
//! then the result). Per partition, the committable position is the lowest offset still in
//! flight, or one past the highest finished; commits happen every second (async), and
//! synchronously on revoke and on shutdown. So a commit never covers an event without a durable
//! result, and a crash redelivers at most the events after the last commit, whose repeats the
//! idempotency key absorbs.
//!
//! **Ownership.** Each assignment of a partition is a [`Claim`] with its own generation. A
//! partition is consumed only once its block state is rebuilt and our claim on it is written to
//! the state topic (until then it is paused), and the work of a revoked claim never reaches a
//! firewall nor writes a result (`ownership`). A newer claim by another replica fences the
//! partition here too, whatever the group says (`tail`).
//!
//! **Backpressure.** At most `run.max_in_flight` events are between consumption and their
//! result (one semaphore permit each). When none is left, the message at hand is parked; if no
//! permit comes back within a second, every partition is paused and the consumer keeps polling,
//! so the replica keeps its group membership however slow the firewall. (A pause costs a refetch:
//! librdkafka drops what it prefetched for paused partitions.)

pub mod adaptive;
pub mod decide;
pub mod dedupe;
pub mod enforce;
pub mod lifecycle;
pub mod offsets;
pub mod ownership;
pub mod policy;
pub mod rebuild;
pub mod report;
pub mod rule;
pub mod tail;

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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::checkpoint::enforcer::CheckPointEnforcer;
use crate::checkpoint::ManagementClient;
use crate::command::{Action as CommandAction, Command, COMMAND_SCHEMA};
use crate::config::Config;
use crate::enforcer::Enforcer;
use crate::event::{DeadLetter, DeadLetterStage, Event, EVENT_SCHEMA};
use crate::fortigate::enforcer::FortiGateEnforcer;
use crate::fortigate::FortiClient;
use crate::http::Readiness;
use crate::metrics::Metrics;
use decide::{Code, Decision};
use dedupe::BlockState;
use enforce::{Batcher, ServerLimits, Work};
use offsets::OffsetTracker;
use ownership::{Claim, Ownership};
use policy::{Mode, Policy, Target};
use report::{ResultMessage, Settled, WriteError};

/// What every stage shares.
pub struct Shared {
    pub config: Config,
    pub producer: FutureProducer,
    pub metrics: Arc<Metrics>,
    pub tracker: Mutex<OffsetTracker>,
    pub state: Mutex<BlockState>,
    pub ownership: Ownership,
    /// Cancelled when shutdown begins: retries stop, writes stop waiting for Kafka.
    pub stopping: CancellationToken,
    /// This process among the replicas (`ownership::replica_id`): the writer of its records.
    pub replica: String,
    /// Partitions of the events topic (an address's partition is computed from its key).
    pub events_partitions: i32,
}

/// Messages from the rebalance callbacks and the state readers to the consume loop.
pub enum Control {
    /// Partitions assigned (and paused): read their state.
    Assigned(Vec<Claim>),
    /// A partition's state is read up to an offset: take it over, then claim the partition.
    Loaded(Claim, BlockState, i64),
    /// Our claim is written (at the second offset); consume the partition, watching its state
    /// from the first.
    Claimed(Claim, i64, i64),
    /// Another replica claimed the partition after us: stop working on it.
    Fenced(i32, String),
}

/// Runs the pipeline until `cancel`. Returns the HTTP listener's address through `on_listen`.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::default();
    let listen = config.run.http_listen;
    let (http_addr, http_task) =
        crate::http::serve(listen, metrics.clone(), ready.clone(), cancel.child_token())
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
    on_listen(http_addr);
    info!(%http_addr, "serving /metrics, /healthz, /readyz");

    let (firewalls, server_addresses) = connect_firewalls(&config, &metrics).await?;
    let policy = Policy::new(&config, &server_addresses);
    metrics.zero_known_series(
        config.sites.keys().map(String::as_str),
        firewalls.checkpoint.keys().map(String::as_str),
        config.targets.keys().map(String::as_str),
    );
    let events_partitions = ensure_topics(&config).await?;
    let shared = Arc::new(Shared {
        events_partitions,
        producer: crate::kafka::producer(&config.kafka, Duration::from_secs(30))?,
        metrics,
        tracker: Mutex::new(OffsetTracker::default()),
        state: Mutex::new(BlockState::new(
            config.run.max_tracked_blocks,
            config.policy.escalation_window,
        )),
        ownership: Ownership::default(),
        stopping: CancellationToken::new(),
        replica: ownership::replica_id(),
        config,
    });
    let (queues, batchers, targets) = start_batchers(&shared, &policy, &firewalls);
    let (reconcile, requests) = mpsc::unbounded_channel();
    let weak = queues
        .iter()
        .map(|(n, q)| (n.clone(), q.downgrade()))
        .collect();
    let in_flight = Arc::new(Semaphore::new(shared.config.run.max_in_flight));
    let reconciler = tokio::spawn(lifecycle::run(
        shared.clone(),
        policy.clone(),
        in_flight.clone(),
        targets,
        weak,
        requests,
    ));
    let keepalive = CancellationToken::new();
    let keepalives = start_keepalives(&firewalls.checkpoint, &keepalive);

    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (watch, watcher) = tail::start(shared.clone(), control_tx.clone());
    let consumer = subscribe(&shared, &ready, control_tx.clone(), watch.clone())?;
    let mut pipeline = Pipeline {
        watch,
        in_flight,
        shared,
        policy,
        queues,
        consumer,
        control_tx,
        control_rx,
        ready,
        parked: None,
        backpressured: false,
        reconcile,
        ticks: 0,
        rejoin_at: None,
        assigned_at: tokio::time::Instant::now(),
    };
    pipeline.consume(&cancel).await;
    pipeline.shut_down(batchers).await;
    let _ = reconciler.await;
    // The consumer (and the watch's senders) went with the pipeline: the watch thread ends, and
    // its Kafka reader with it, before `run` returns (a caller may stop the brokers next).
    let joined = tokio::task::spawn_blocking(move || watcher.join());
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        warn!("the state watch did not end within 5 s; stopping without it");
    }
    keepalive.cancel(); // after the batches: each client then logs out
    for k in keepalives {
        let _ = k.await;
    }
    let _ = http_task.await;
    info!("stopped");
    Ok(())
}

/// The firewalls' clients: one (one session) per Check Point management server, one per
/// FortiGate device.
struct Firewalls {
    checkpoint: BTreeMap<String, Arc<ManagementClient>>,
    fortigate: BTreeMap<String, Arc<FortiClient>>,
    /// Feed targets: each its own "server" (nothing to connect to).
    feeds: Vec<String>,
}

impl Firewalls {
    /// The enforcer of `target`.
    fn enforcer(&self, target: &Target, shared: &Arc<Shared>) -> Arc<dyn Enforcer> {
        match &target.mode {
            Mode::Feed => Arc::new(crate::feed::enforcer::FeedEnforcer::new(shared.clone())),
            Mode::Sam(mode) => Arc::new(CheckPointEnforcer::new(
                self.checkpoint[&target.server].clone(),
                *mode,
                target.action,
            )),
            Mode::Forti(mode) => Arc::new(FortiGateEnforcer {
                client: self.fortigate[&target.server].clone(),
                mode: mode.clone(),
            }),
        }
    }

    /// Every server and device by name: what courtesy limits apply to.
    fn names(&self) -> impl Iterator<Item = &String> {
        self.checkpoint
            .keys()
            .chain(self.fortigate.keys())
            .chain(self.feeds.iter())
    }
}

/// A client per management server and FortiGate, and their own addresses, which no rule may
/// name. One whose address cannot be found refuses the start: it could be blocked.
async fn connect_firewalls(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Firewalls, Vec<(String, IpAddr)>)> {
    let mut firewalls = Firewalls {
        checkpoint: BTreeMap::new(),
        fortigate: BTreeMap::new(),
        feeds: (config.targets.iter())
            .filter(|(_, t)| t.kind == crate::config::TargetKind::Feed)
            .map(|(name, _)| name.clone())
            .collect(),
    };
    for (name, server) in &config.checkpoint.servers {
        let client = ManagementClient::new(name, server)
            .map_err(|e| anyhow::anyhow!(e))?
            .with_metrics(metrics.clone());
        firewalls.checkpoint.insert(name.clone(), Arc::new(client));
    }
    for (name, device) in &config.fortigate.devices {
        let client = FortiClient::new(name, device)
            .map_err(|e| anyhow::anyhow!(e))?
            .with_metrics(metrics.clone());
        firewalls.fortigate.insert(name.clone(), Arc::new(client));
    }
    Ok((firewalls, server_addresses(config).await?))
}

/// The management servers' and FortiGates' own addresses, by name (no rule may name them).
pub async fn server_addresses(config: &Config) -> anyhow::Result<Vec<(String, IpAddr)>> {
    let servers =
        (config.checkpoint.servers.iter()).map(|(n, s)| (n, "checkpoint.servers", &s.url));
    let devices = (config.fortigate.devices.iter()).map(|(n, d)| (n, "fortigate.devices", &d.url));
    let mut addresses = Vec::new();
    for (name, section, url) in servers.chain(devices) {
        for ip in resolve(&format!("{section}.{name}"), url).await? {
            addresses.push((name.clone(), ip));
        }
    }
    Ok(addresses)
}

/// The addresses of a firewall URL's host (`field` names its config), tried for up to 30
/// seconds.
async fn resolve(field: &str, url: &str) -> anyhow::Result<Vec<IpAddr>> {
    let parsed = url::Url::parse(url).with_context(|| format!("{field}.url: bad url"))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let host = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => return Ok(vec![IpAddr::V4(ip)]),
        Some(url::Host::Ipv6(ip)) => return Ok(vec![IpAddr::V6(ip)]),
        Some(url::Host::Domain(host)) => host.to_owned(),
        None => anyhow::bail!("{field}.url: the url has no host"),
    };
    let mut delay = Duration::from_millis(500);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => return Ok(addrs.map(|a| a.ip().to_canonical()).collect()),
            Err(e) if tokio::time::Instant::now() + delay > deadline => anyhow::bail!(
                "{field}: cannot resolve {host} ({e}); samgate must know a firewall's own \
                 address to never block it: fix DNS or use its IP address"
            ),
            Err(e) => {
                warn!(server = field, host, error = %e, "cannot resolve a firewall's address yet; trying again")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Creates what is missing (as `kafka.create_topics` allows); returns the events topic's
/// partition count.
pub async fn ensure_topics(config: &Config) -> anyhow::Result<i32> {
    let topics = &config.kafka.topics;
    let timeout = Duration::from_secs(30);
    crate::kafka::ensure_topics(
        &config.kafka,
        &[&topics.events, &topics.results, &topics.dlq],
        timeout,
    )
    .await?;
    let partitions = crate::kafka::partition_count(&config.kafka, &topics.events, timeout).await?;
    crate::kafka::ensure_state_topic(&config.kafka, &topics.state, partitions, timeout).await?;
    Ok(partitions)
}

/// One batcher per target, with per-server courtesy limits; their queues are as deep as
/// `max_in_flight`, which bounds them already (one rule per event and target).
#[allow(clippy::type_complexity)]
fn start_batchers(
    shared: &Arc<Shared>,
    policy: &Policy,
    firewalls: &Firewalls,
) -> (
    BTreeMap<String, mpsc::Sender<Work>>,
    JoinSet<()>,
    BTreeMap<String, Arc<Batcher>>,
) {
    let run = &shared.config.run;
    let limits: BTreeMap<&String, Arc<ServerLimits>> = firewalls
        .names()
        .map(|name| {
            let limits = ServerLimits::new(name, run, shared.metrics.clone());
            (name, Arc::new(limits))
        })
        .collect();
    let mut queues = BTreeMap::new();
    let mut batchers = JoinSet::new();
    let mut by_target = BTreeMap::new();
    for name in shared.config.targets.keys() {
        let target = Arc::new(policy.target(name).expect("validated target").clone());
        let (tx, rx) = mpsc::channel(run.max_in_flight);
        queues.insert(name.clone(), tx);
        let batcher = Arc::new(Batcher {
            enforcer: firewalls.enforcer(&target, shared),
            limits: limits[&target.server].clone(),
            shared: shared.clone(),
            target,
        });
        by_target.insert(name.clone(), batcher.clone());
        batchers.spawn(batcher.run(rx));
    }
    (queues, batchers, by_target)
}

fn start_keepalives(
    clients: &BTreeMap<String, Arc<ManagementClient>>,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    clients
        .values()
        .map(|c| {
            let (c, token) = (c.clone(), cancel.clone());
            tokio::spawn(async move { c.run_keepalive(token).await })
        })
        .collect()
}

fn subscribe(
    shared: &Arc<Shared>,
    ready: &Readiness,
    control: mpsc::UnboundedSender<Control>,
    watch: std::sync::mpsc::Sender<tail::Watch>,
) -> anyhow::Result<StreamConsumer<PipelineContext>> {
    let config = &shared.config;
    // A pause (backpressure) drops what librdkafka prefetched for the paused partitions, and
    // the broker serves it again on resume; too little prefetch starves the loop instead. The
    // high-level consumer has one queue for all its partitions: 16 MiB of it (librdkafka's
    // default is 64) is what the storm benchmark measured best (docs/perf/README.md).
    // kafka.properties may set it otherwise.
    //
    // max.poll.interval.ms is also the rebalance timeout: how long the group waits for a member
    // to rejoin. A replica killed during a rebalance held the test broker's group for librdkafka's
    // default five minutes (docs/kafka-broker.md); this loop polls all the time (even paused),
    // and a revoke waits at most `run.shutdown_timeout`, so a minute (or that wait plus 30 s) is
    // plenty.
    let poll_interval = poll_interval(config).as_millis().to_string();
    let defaults = [
        ("queued.max.messages.kbytes", "16384"),
        ("fetch.wait.max.ms", "100"),
        ("max.poll.interval.ms", poll_interval.as_str()),
    ];
    let consumer: StreamConsumer<PipelineContext> =
        crate::kafka::with_defaults(&config.kafka, &defaults)
            .set("group.id", &config.run.group_id)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            .create_with_context(PipelineContext {
                shared: shared.clone(),
                ready: ready.clone(),
                control,
                watch: Mutex::new(watch),
            })
            .context("cannot create the Kafka consumer")?;
    consumer.subscribe(&[&config.kafka.topics.events])?;
    info!(
        group = config.run.group_id,
        topic = config.kafka.topics.events,
        dry_run = config.run.dry_run,
        "consuming"
    );
    Ok(consumer)
}

/// The consume loop and what it owns.
struct Pipeline {
    shared: Arc<Shared>,
    policy: Policy,
    queues: BTreeMap<String, mpsc::Sender<Work>>,
    consumer: StreamConsumer<PipelineContext>,
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: mpsc::UnboundedReceiver<Control>,
    /// Tells `tail` which state partitions to watch.
    watch: std::sync::mpsc::Sender<tail::Watch>,
    ready: Readiness,
    /// One permit per event between consumption and its result.
    in_flight: Arc<Semaphore>,
    /// The message taken when no permit was left; the consumer delivers no other until it goes.
    parked: Option<Parked>,
    /// Every partition is paused (the parked message waited [`PAUSE_AFTER`]) until a tenth of
    /// the permits are back.
    backpressured: bool,
    /// The reconcile loop's inbox (`reconcile` commands).
    reconcile: lifecycle::Requests,
    /// Seconds ticked (the expiry sweep runs every [`lifecycle::SWEEP_EVERY`]).
    ticks: u64,
    /// When the replica left the group to join it again (after a fence), until it has.
    rejoin_at: Option<tokio::time::Instant>,
    /// When partitions were last assigned here (or the loop started).
    assigned_at: tokio::time::Instant,
}

/// A message that waits for a permit, under the claim it was consumed under.
struct Parked {
    claim: Claim,
    offset: i64,
    payload: Vec<u8>,
    since: tokio::time::Instant,
}

/// How long a parked message waits for a permit before every partition is paused. Pausing makes
/// librdkafka drop the messages it prefetched (fetched again on resume), so a short wait does not
/// pause; a long one does, and the consumer goes on polling to keep its group membership.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

impl Pipeline {
    async fn consume(&mut self, cancel: &CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let room = (self.shared.config.run.max_in_flight / 10).max(1) as u32;
        loop {
            let permits = self.in_flight.clone();
            let wanted = if self.backpressured { room } else { 1 };
            let pause_at = self.parked.as_ref().map(|p| p.since + PAUSE_AFTER);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(control) = self.control_rx.recv() => self.on_control(control),
                _ = tick.tick() => self.tick(),
                Ok(permits) = permits.acquire_many_owned(wanted), if self.parked.is_some() => {
                    self.unpark(permits).await;
                }
                _ = sleep_until_some(pause_at), if !self.backpressured => {
                    self.pause_all();
                    self.backpressured = true;
                }
                // Polling goes on while paused: it keeps the group membership.
                message = self.consumer.recv(), if self.parked.is_none() || self.backpressured => {
                    match message {
                        Ok(m) => {
                            let (partition, offset) = (m.partition(), m.offset());
                            let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                            drop(m);
                            self.take(partition, offset, payload).await;
                        }
                        Err(e) => warn!(error = %e, "Kafka consumer error"),
                    }
                }
            }
        }
    }

    /// One message: taken only from a partition that is ready, and started once a permit is
    /// free (until then it is parked).
    async fn take(&mut self, partition: i32, offset: i64, payload: Vec<u8>) {
        let claim = self.shared.ownership.claim(partition);
        let Some(claim) = claim.filter(|_| self.shared.ownership.ready(partition)) else {
            return self.rewind(partition, offset);
        };
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => self.start(claim, offset, payload, permit).await,
            // Paused partitions deliver nothing, so this is rare: a second message waits in
            // its partition.
            Err(_) if self.parked.is_some() => self.rewind(partition, offset),
            Err(_) => {
                let since = tokio::time::Instant::now();
                self.parked = Some(Parked {
                    claim,
                    offset,
                    payload,
                    since,
                });
            }
        }
    }

    /// Permits are back: the parked message starts (unless its partition moved meanwhile: its
    /// next owner reads it from the committed offset), and paused partitions resume.
    async fn unpark(&mut self, mut permits: OwnedSemaphorePermit) {
        let parked = self
            .parked
            .take()
            .expect("unpark only with a parked message");
        let permit = permits.split(1).expect("at least one permit");
        drop(permits);
        if std::mem::take(&mut self.backpressured) {
            self.resume_ready();
        }
        let partition = parked.claim.partition;
        if self.shared.ownership.claim(partition) == Some(parked.claim)
            && self.shared.ownership.ready(partition)
        {
            self.start(parked.claim, parked.offset, parked.payload, permit)
                .await;
        }
    }

    /// Decodes a message holding its permit, then decides (or dead-letters it).
    async fn start(
        &mut self,
        claim: Claim,
        offset: i64,
        payload: Vec<u8>,
        permit: OwnedSemaphorePermit,
    ) {
        self.shared
            .tracker
            .lock()
            .expect("tracker")
            .begin(claim, offset);
        let completion = |decisions| {
            Arc::new(Completion {
                claim,
                offset: Some(offset),
                remaining: AtomicUsize::new(decisions),
                _permit: Some(permit),
            })
        };
        match decode(&payload) {
            Ok(Input::Event(event)) => self.decide(*event, completion).await,
            Ok(Input::Command(command)) => self.command(command, claim, &payload, completion).await,
            Err(reason) => dead_letter(&self.shared, completion(1), &payload, reason),
        }
    }

    /// An operator command: decided like an event, with the same safety checks; each decision
    /// handed on the same way.
    async fn command(
        &mut self,
        command: Command,
        claim: Claim,
        payload: &[u8],
        completion: impl FnOnce(usize) -> Arc<Completion>,
    ) {
        let shared = self.shared.clone();
        shared
            .metrics
            .commands
            .with_label_values(&[command.action.as_str()])
            .inc();
        if command.action == CommandAction::Reconcile {
            let completion = completion(1);
            return self.reconcile_on_demand(command, completion);
        }
        // A command on another partition than its address's would act on state the address's
        // owner never reads (a producer that did not key it by address): refused.
        let ip = command.ip.expect("checked");
        let home =
            crate::kafka::partition_for(&crate::event::event_key(ip), shared.events_partitions);
        let partitioner_set = shared.config.kafka.properties.contains_key("partitioner");
        if !partitioner_set && claim.partition != home {
            let reason = format!(
                "a {} command for {ip} on partition {}, not on its address's partition {home}: key samgate.command.v1 messages by address",
                command.action.as_str(),
                claim.partition
            );
            return dead_letter(&shared, completion(1), payload, reason);
        }
        info!(
            action = command.action.as_str(),
            site = command.site.as_deref().unwrap_or("-"),
            ip = ?command.ip,
            actor = command.actor.as_deref().unwrap_or("-"),
            id = command.id,
            "operator command"
        );
        let now = Utc::now();
        let decisions = {
            let state = shared.state.lock().expect("state");
            decide::decide_command(
                &command,
                &self.policy,
                &*state,
                shared.config.run.dry_run,
                now,
            )
        };
        let completion = completion(decisions.len().max(1));
        if decisions.is_empty() {
            completion.done(&shared);
            return;
        }
        let site = command.site.clone().unwrap_or_default();
        for decision in decisions {
            let result = ResultMessage::commanded(&command, &decision);
            self.hand_on(decision, result, &completion, &site, ip, &command, now)
                .await;
        }
    }

    /// Decide, then hand each decision on: enforcement to its target's batcher, the rest
    /// straight to its result.
    async fn decide(&mut self, event: Event, completion: impl FnOnce(usize) -> Arc<Completion>) {
        let shared = &self.shared;
        let site = match shared.config.sites.contains_key(&event.site) {
            true => event.site.as_str(),
            false => "unknown",
        };
        let format = event.flowmon.format.as_str();
        shared
            .metrics
            .events_consumed
            .with_label_values(&[site, format])
            .inc();
        let now = Utc::now();
        let decisions = {
            let state = shared.state.lock().expect("state");
            decide::decide(
                &event,
                &self.policy,
                &*state,
                shared.config.run.dry_run,
                now,
            )
        };
        let completion = completion(decisions.len());
        for decision in decisions {
            let result = ResultMessage::decided(&event, &decision);
            let source = event.flowmon.source;
            self.hand_on_event(decision, result, &completion, source, now)
                .await;
        }
    }

    /// One decision of an event: enforcement to its target's batcher, the rest straight to its
    /// result.
    async fn hand_on_event(
        &mut self,
        decision: Decision,
        mut result: ResultMessage,
        completion: &Arc<Completion>,
        source: IpAddr,
        now: chrono::DateTime<Utc>,
    ) {
        let shared = &self.shared;
        let Decision::Enforce(enforce) = decision else {
            return spawn_finish(shared, completion, result);
        };
        let claim = completion.claim;
        let subject = dedupe::Subject {
            site: result.site.clone(),
            ip: source,
            target: enforce.target.name.clone(),
        };
        if shared
            .state
            .lock()
            .expect("state")
            .begin(enforce.key, claim.partition, &subject, now)
            .is_err()
        {
            shared.metrics.state_full.inc();
            error!(max = shared.config.run.max_tracked_blocks, "block state full of active blocks: a new block is refused (raise run.max_tracked_blocks)");
            result.settle(Settled::Failed {
                code: Code::StateFull,
                attempts: 0,
                problem: "run.max_tracked_blocks active blocks are tracked already".into(),
            });
            return spawn_finish(shared, completion, result);
        }
        let queue = &self.queues[&enforce.target.name];
        let work = Work::new(completion.clone(), enforce, result);
        if queue.send(work).await.is_err() {
            error!("a target's batcher is gone; its rule is let go and its event redelivered");
        }
    }

    /// One decision of an operator command: a block as for an event; an unblock to the target's
    /// batcher as a removal; an exemption (or its end) into the state at once, then to the state
    /// topic, then its result.
    #[allow(clippy::too_many_arguments)]
    async fn hand_on(
        &mut self,
        decision: Decision,
        result: ResultMessage,
        completion: &Arc<Completion>,
        site: &str,
        ip: IpAddr,
        command: &Command,
        now: chrono::DateTime<Utc>,
    ) {
        let shared = self.shared.clone();
        let partition = completion.claim.partition;
        match decision {
            Decision::Unblock(_) if shared.config.run.dry_run => {
                let mut result = result;
                result.outcome = report::Outcome::DryRun;
                result.code = Code::DryRun;
                result.reason = format!(
                    "dry run: would remove the rule from {}",
                    result.gateways.join(", ")
                );
                spawn_finish(&shared, completion, result);
            }
            Decision::Unblock(unblock) => {
                let enforce = decide::Enforce {
                    target: unblock.target.clone(),
                    key: unblock.key,
                    rule: unblock.rule,
                    level: 0,
                    duration: Duration::ZERO,
                    verify_first: None,
                    origin: unblock.origin,
                    mac: None,
                };
                shared
                    .state
                    .lock()
                    .expect("state")
                    .set_removing(&unblock.key, true);
                let queue = &self.queues[&unblock.target.name];
                let work = Work::removal(completion.clone(), enforce, result);
                if queue.send(work).await.is_err() {
                    error!("a target's batcher is gone; the unblock is let go and redelivered");
                }
            }
            Decision::Exempt { until } => {
                shared
                    .state
                    .lock()
                    .expect("state")
                    .exempt(site, ip, partition, until);
                let record = dedupe::ExemptionRecord {
                    schema: dedupe::EXEMPTION_SCHEMA.into(),
                    site: site.to_owned(),
                    ip,
                    since: now,
                    until,
                    reason: command.reason.clone(),
                    actor: command.actor.clone(),
                    command_id: command.id.clone(),
                    writer: Some(shared.replica.clone()),
                };
                let payload = serde_json::to_string(&record).expect("records serialize");
                let key = dedupe::exemption_key(site, ip);
                let completion = completion.clone();
                tokio::spawn(async move {
                    let topic = &shared.config.kafka.topics.state;
                    let stop = &shared.stopping;
                    match report::write(
                        &shared.producer,
                        topic,
                        &key,
                        &payload,
                        Some(partition),
                        stop,
                    )
                    .await
                    {
                        Ok(_) => {}
                        Err(WriteError::Stopping) => return,
                        Err(e) => {
                            error!(error = %e, key, "an exemption record was refused; it holds until a restart")
                        }
                    }
                    finish(&shared, &completion, result).await;
                });
            }
            Decision::Release => {
                let had = shared.state.lock().expect("state").release(site, ip, now);
                let mut result = result;
                if !had {
                    result.code = Code::NotExempted;
                    result.reason = format!("{ip} was not exempted at site {site}");
                }
                let key = dedupe::exemption_key(site, ip);
                let completion = completion.clone();
                let site = site.to_owned();
                tokio::spawn(async move {
                    let topic = &shared.config.kafka.topics.state;
                    // Not over a new exemption of the address made meanwhile.
                    let still_released = || {
                        let state = shared.state.lock().expect("state");
                        state.exemption(&site, ip, Utc::now()).is_none()
                    };
                    match report::write_tombstone(
                        &shared.producer,
                        topic,
                        &key,
                        partition,
                        &shared.stopping,
                        &still_released,
                    )
                    .await
                    {
                        Ok(_) => {}
                        Err(WriteError::Stopping) => return,
                        Err(e) => error!(error = %e, key, "an exemption's tombstone was refused"),
                    }
                    finish(&shared, &completion, result).await;
                });
            }
            decision => {
                self.hand_on_event(decision, result, completion, ip, now)
                    .await
            }
        }
    }

    /// A `reconcile` command: reconcile now (see `lifecycle`).
    fn reconcile_on_demand(&mut self, command: Command, completion: Arc<Completion>) {
        lifecycle::request_reconcile(&self.reconcile, command, completion, &self.shared);
    }

    /// Leaves a message for later: its partition goes back to it, paused.
    fn rewind(&self, partition: i32, offset: i64) {
        let topic = &self.shared.config.kafka.topics.events;
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        let _ = self.consumer.pause(&list);
        if let Err(e) = self
            .consumer
            .seek(topic, partition, Offset::Offset(offset), Duration::ZERO)
        {
            warn!(partition, offset, error = %e, "cannot rewind a partition; its message is redelivered after the next rebalance");
        }
    }

    fn pause_all(&self) {
        if let Ok(assigned) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assigned);
        }
    }

    /// Resumes every owned partition whose state is loaded.
    fn resume_ready(&self) {
        let topic = &self.shared.config.kafka.topics.events;
        let Ok(assigned) = self.consumer.assignment() else {
            return;
        };
        let mut list = TopicPartitionList::new();
        for e in assigned.elements_for_topic(topic) {
            if self.shared.ownership.ready(e.partition()) {
                list.add_partition(topic, e.partition());
            }
        }
        if list.count() > 0 {
            let _ = self.consumer.resume(&list);
        }
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Assigned(claims) => {
                self.assigned_at = tokio::time::Instant::now();
                let (shared, tx) = (self.shared.clone(), self.control_tx.clone());
                tokio::spawn(rebuild::load(shared, claims, tx));
            }
            Control::Loaded(claim, part, next) => {
                if !self.shared.ownership.is_current(claim) {
                    return; // revoked meanwhile
                }
                let blocks = part.len();
                self.shared.state.lock().expect("state").absorb(part);
                info!(
                    partition = claim.partition,
                    blocks, "partition's block state rebuilt; claiming it"
                );
                let (shared, tx) = (self.shared.clone(), self.control_tx.clone());
                tokio::spawn(write_claim(shared, claim, next, tx));
            }
            Control::Claimed(claim, next, own_claim) => {
                if !self.shared.ownership.loaded(claim) {
                    return; // revoked meanwhile
                }
                let partition = claim.partition;
                let _ = self.watch.send(tail::Watch::From {
                    partition,
                    offset: next,
                    own_claim,
                });
                info!(partition, "partition claimed; consuming it");
                if !self.backpressured {
                    self.resume_ready();
                }
            }
            Control::Fenced(partition, by) => self.fence(partition, &by),
        }
        let loading = self.shared.ownership.loading().len();
        self.shared.metrics.state_loading.set(loading as i64);
        self.ready
            .set(loading == 0 && !self.shared.stopping.is_cancelled());
    }

    /// Another replica claimed `partition` after us: whatever the group says, its work here is
    /// stale from now on, and the partition waits until the group assigns it again.
    fn fence(&mut self, partition: i32, by: &str) {
        let shared = &self.shared;
        if shared.ownership.claim(partition).is_none() {
            return;
        }
        warn!(partition, by, "another replica claimed this partition: fencing our work on it (a zombie replica, or a partition assigned twice)");
        shared.metrics.fenced_partitions.inc();
        shared.ownership.revoke(&[partition]);
        let topic = &shared.config.kafka.topics.events;
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        let _ = self.consumer.pause(&list);
        shared.tracker.lock().expect("tracker").forget(partition);
        shared
            .state
            .lock()
            .expect("state")
            .drop_partition(partition);
        self.rejoin();
    }

    /// Leaves the consumer group, to join it again once every partition is revoked here
    /// ([`Self::tick`]). After a fence the group still counts the partition as ours (it never
    /// revoked it), so nobody would consume it if the replica that claimed it went away (the chaos
    /// run saw exactly that: a double assignment, then the other replica stopped, and the
    /// partition stood still). Subscribing again at once is no change to librdkafka (the
    /// cooperative assignor even hands the partition back as still ours): the replica leaves,
    /// and joins afresh once its assignment is empty; whoever gets the partition claims it anew.
    fn rejoin(&mut self) {
        if self.rejoin_at.is_some() {
            return;
        }
        warn!("leaving the consumer group, to join it again, so that its partitions are assigned afresh");
        self.consumer.unsubscribe();
        self.rejoin_at = Some(tokio::time::Instant::now());
    }

    /// A replica without a single partition for two rebalance timeouts leaves the group and joins
    /// it again. The chaos run saw the test broker's group stall for good when a member was
    /// killed just after a broker restart: the live members stayed subscribed and were never
    /// assigned anything. A replica that simply has no partition (more replicas than partitions)
    /// rejoins at that pace too, which costs the group one rebalance without moves.
    fn unstick(&mut self) {
        let stalled = 2 * poll_interval(&self.shared.config);
        let empty = self.consumer.assignment().map_or(true, |a| a.count() == 0);
        if !empty || self.rejoin_at.is_some() || self.assigned_at.elapsed() < stalled {
            return;
        }
        warn!(
            waited = ?stalled,
            "no partition assigned for two rebalance timeouts; leaving the group to join it again"
        );
        self.assigned_at = tokio::time::Instant::now();
        self.rejoin();
    }

    /// Joins the group again after [`Self::rejoin`], once every partition is revoked here (or
    /// after 10 s in any case).
    fn join_again(&mut self) {
        let Some(left) = self.rejoin_at else {
            return;
        };
        let empty = self.consumer.assignment().map_or(true, |a| a.count() == 0);
        if !empty && left.elapsed() < Duration::from_secs(10) {
            return;
        }
        self.rejoin_at = None;
        let topic = &self.shared.config.kafka.topics.events;
        info!("joining the consumer group again");
        if let Err(e) = self.consumer.subscribe(&[topic]) {
            error!(error = %e, "cannot subscribe to the events topic again");
        }
    }

    /// Every second: commit what moved, refresh the gauges; every few seconds, report the blocks
    /// and exemptions that ended.
    fn tick(&mut self) {
        commit(&self.consumer, &self.shared, CommitMode::Async);
        self.join_again();
        self.unstick();
        self.ticks += 1;
        if self.ticks % lifecycle::SWEEP_EVERY.as_secs() == 0 {
            lifecycle::sweep(&self.shared, &self.policy);
        }
        let state = self.shared.state.lock().expect("state");
        self.shared
            .metrics
            .active_blocks
            .set(state.active(Utc::now()) as i64);
        self.shared.metrics.tracked_blocks.set(state.len() as i64);
        drop(state);
        let in_flight = self.shared.config.run.max_in_flight - self.in_flight.available_permits();
        self.shared.metrics.in_flight.set(in_flight as i64);
    }

    /// One bounded drain: stop taking events and retrying, let sends in progress end and their
    /// results be written, commit, and leave the group. Events without a result by
    /// `run.shutdown_timeout` go back to the partitions' next owners (never as `failed`).
    async fn shut_down(mut self, mut batchers: JoinSet<()>) {
        info!("shutting down: finishing in-flight work");
        self.ready.set(false);
        self.shared.stopping.cancel();
        self.pause_all();
        self.queues.clear(); // the batchers end once their running batches end
        let deadline = tokio::time::Instant::now() + self.shared.config.run.shutdown_timeout;
        let all = self.shared.config.run.max_in_flight as u32;
        let drained =
            tokio::time::timeout_at(deadline, self.in_flight.clone().acquire_many_owned(all));
        if drained.await.is_err() {
            let left = all as usize - self.in_flight.available_permits();
            warn!(
                left,
                "events still in flight at the shutdown deadline; they will be redelivered"
            );
        }
        commit(&self.consumer, &self.shared, CommitMode::Sync);
        let batches_done = async { while batchers.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, batches_done)
            .await
            .is_err()
        {
            warn!("firewall calls still running at the shutdown deadline; stopping them");
            batchers.abort_all();
        }
    }
}

/// The consumer's `max.poll.interval.ms`, which is also its rebalance timeout: the revoke's wait
/// (`run.shutdown_timeout`) plus 30 s, at least a minute.
fn poll_interval(config: &Config) -> Duration {
    (config.run.shutdown_timeout + Duration::from_secs(30)).max(Duration::from_secs(60))
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
pub(crate) async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long a new claim stands before the partition is consumed: long enough for the previous
/// owner's state watcher (a 200 ms fetch wait) to see it and fence its work.
const CLAIM_GRACE: Duration = Duration::from_millis(500);

/// Writes our claim on a loaded partition (retrying until it is written, revoked or stopping).
async fn write_claim(
    shared: Arc<Shared>,
    claim: Claim,
    next: i64,
    control: mpsc::UnboundedSender<Control>,
) {
    let record = ownership::ClaimRecord {
        schema: ownership::CLAIM_SCHEMA.into(),
        partition: claim.partition,
        replica: shared.replica.clone(),
        claimed_at: Utc::now(),
    };
    let payload = serde_json::to_string(&record).expect("claims serialize");
    let topic = &shared.config.kafka.topics.state;
    // Only while the partition is still ours: a claim retried after a revoke could land after
    // its new owner's and fence it.
    let ours = || shared.ownership.is_current(claim);
    let written = report::write_while_current(
        &shared.producer,
        topic,
        ownership::CLAIM_KEY,
        &payload,
        Some(claim.partition),
        &shared.stopping,
        &ours,
    );
    match written.await {
        Ok(None) => {} // the partition went meanwhile
        Ok(Some(offset)) => {
            // A replica that still works on the partition (unaware it lost it) watches the state
            // topic within milliseconds: give it the time to see the claim and stop.
            tokio::time::sleep(CLAIM_GRACE).await;
            let _ = control.send(Control::Claimed(claim, next, offset));
        }
        Err(WriteError::Stopping) => {}
        Err(e) => {
            error!(partition = claim.partition, error = %e, "cannot claim a partition; it is not consumed")
        }
    }
}

/// Counts the decisions of one event still without an acknowledged result; holds the event's
/// in-flight permit.
pub struct Completion {
    pub claim: Claim,
    /// The event's offset; `None` for samgate's own work (expiry, reconcile), which no offset
    /// waits for.
    pub offset: Option<i64>,
    remaining: AtomicUsize,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Completion {
    /// Work of samgate's own under `claim` (results that answer no event).
    pub fn own(claim: Claim, results: usize) -> Arc<Self> {
        Arc::new(Self {
            claim,
            offset: None,
            remaining: AtomicUsize::new(results),
            _permit: None,
        })
    }

    /// [`Self::own`], holding one of the pipeline's in-flight permits until it is done.
    pub fn own_holding(claim: Claim, results: usize, permit: OwnedSemaphorePermit) -> Arc<Self> {
        Arc::new(Self {
            claim,
            offset: None,
            remaining: AtomicUsize::new(results),
            _permit: Some(permit),
        })
    }

    /// One of the event's results is durable; after the last, its offset is finished.
    pub(crate) fn done(&self, shared: &Shared) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(offset) = self.offset {
                shared
                    .tracker
                    .lock()
                    .expect("tracker")
                    .finish(self.claim, offset);
            }
        }
    }
}

/// What the events topic carries.
enum Input {
    Event(Box<Event>),
    Command(Command),
}

/// Decode: anything that is not a `samgate.event.v1` or a valid `samgate.command.v1` is a dead
/// letter. Addresses are made canonical here, where they enter the pipeline (`::ffff:10.0.0.5`
/// is 10.0.0.5).
fn decode(payload: &[u8]) -> Result<Input, String> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        schema: std::borrow::Cow<'a, str>,
    }
    let schema = serde_json::from_slice::<Head>(payload).map(|h| h.schema.into_owned());
    match schema.as_deref() {
        Ok(COMMAND_SCHEMA) => {
            let command = serde_json::from_slice::<Command>(payload)
                .map_err(|e| format!("not a valid samgate.command.v1 message: {e}"))?;
            command
                .checked()
                .map(Input::Command)
                .map_err(|e| format!("invalid samgate.command.v1 message: {e}"))
        }
        _ => match serde_json::from_slice::<Event>(payload) {
            Ok(mut e) if e.schema == EVENT_SCHEMA => {
                e.flowmon.source = e.flowmon.source.to_canonical();
                Ok(Input::Event(Box::new(e)))
            }
            Ok(e) => Err(format!("unknown schema {:?}", e.schema)),
            Err(e) => Err(format!("not a samgate.event.v1 message: {e}")),
        },
    }
}

fn dead_letter(shared: &Arc<Shared>, completion: Arc<Completion>, payload: &[u8], reason: String) {
    let (partition, offset) = (completion.claim.partition, completion.offset.unwrap_or(-1));
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
    let key = format!("{}/{partition}/{offset}", shared.config.kafka.topics.events);
    let shared = shared.clone();
    tokio::spawn(async move {
        if write_dead_letter(&shared, &key, dead).await {
            completion.done(&shared);
        }
    });
}

/// Writes a dead letter until Kafka acknowledges it; false only when stopping (its input goes
/// back to the partition's next owner). A refusal for good is tried once more with the input
/// cut to [`SHORT_DEAD_LETTER`] bytes (the topic's size limit may be small); refused again (not
/// authorised, say), the input is skipped, loudly: an error naming it, and
/// `samgate_dead_letters_refused_total`.
pub(crate) async fn write_dead_letter(shared: &Shared, key: &str, mut dead: DeadLetter) -> bool {
    let topic = &shared.config.kafka.topics.dlq;
    let stage = dead.stage.as_str();
    loop {
        let json = serde_json::to_string(&dead).expect("dead letters serialize");
        match report::write(&shared.producer, topic, key, &json, None, &shared.stopping).await {
            Ok(_) => {
                shared
                    .metrics
                    .dead_letters
                    .with_label_values(&[stage])
                    .inc();
                return true;
            }
            Err(WriteError::Stopping) => return false,
            Err(e) if dead.raw.len() > SHORT_DEAD_LETTER => {
                warn!(error = %e, key, stage, "a dead letter was refused; writing it again with its input cut short");
                dead = dead.shortened(SHORT_DEAD_LETTER);
            }
            Err(e) => {
                error!(error = %e, key, stage, reason = dead.reason, "the dead-letter topic refused a dead letter; its input is skipped");
                shared
                    .metrics
                    .dead_letters_refused
                    .with_label_values(&[stage])
                    .inc();
                return true;
            }
        }
    }
}

/// How much of the input a dead letter keeps when the whole one was refused.
const SHORT_DEAD_LETTER: usize = 1024;

/// Report: writes `result`, and finishes the event's offset once its last result is durable.
/// The result of a revoked claim is not written: its next owner answers the event. Returns
/// whether the result was written.
pub async fn finish(
    shared: &Arc<Shared>,
    completion: &Arc<Completion>,
    result: ResultMessage,
) -> bool {
    if !shared.ownership.is_current(completion.claim) {
        shared.metrics.fenced.inc();
        return false;
    }
    let payload = serde_json::to_string(&result).expect("results serialize");
    let topic = &shared.config.kafka.topics.results;
    match report::write(
        &shared.producer,
        topic,
        &result.kafka_key(),
        &payload,
        None,
        &shared.stopping,
    )
    .await
    {
        Ok(_) => {
            let outcome = result.outcome.as_str();
            shared.metrics.decisions.with_label_values(&[outcome]).inc();
            report::log_decision(&result);
            completion.done(shared);
            true
        }
        Err(WriteError::Stopping) => false,
        Err(e) => {
            shared
                .metrics
                .kafka_write_failures
                .with_label_values(&[topic])
                .inc();
            error!(error = %e, ip = %result.ip, outcome = result.outcome.as_str(), "a result was refused for good; its event is finished without it");
            completion.done(shared);
            false
        }
    }
}

fn spawn_finish(shared: &Arc<Shared>, completion: &Arc<Completion>, result: ResultMessage) {
    let (shared, completion) = (shared.clone(), completion.clone());
    tokio::spawn(async move {
        finish(&shared, &completion, result).await;
    });
}

/// Commits every partition's committable position that moved (marked committed once Kafka
/// confirms, in [`PipelineContext::commit_callback`]).
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
    if let Err(e) = consumer.commit(&list, mode) {
        warn!(error = %e, "offset commit failed; will retry");
    }
}

/// Rebalance, commit and statistics hooks, called on the consumer's polling thread.
pub struct PipelineContext {
    shared: Arc<Shared>,
    ready: Readiness,
    control: mpsc::UnboundedSender<Control>,
    watch: Mutex<std::sync::mpsc::Sender<tail::Watch>>,
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

impl PipelineContext {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        let topic = &self.shared.config.kafka.topics.events;
        list.elements_for_topic(topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

impl ConsumerContext for PipelineContext {
    /// Revoke: fence the partitions (their queued and retrying work is stale from now on), wait
    /// (bounded) for their sends in progress, commit what is finished, and forget their state.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions = self.partitions(list);
        if partitions.is_empty() {
            return;
        }
        let shared = &self.shared;
        shared.ownership.revoke(&partitions);
        let watch = self.watch.lock().expect("watch");
        for p in &partitions {
            let _ = watch.send(tail::Watch::Stop(*p));
        }
        drop(watch);
        info!(
            ?partitions,
            "partitions revoked; waiting for their sends in progress"
        );
        blocking(|| {
            let busy = shared
                .ownership
                .wait_idle(&partitions, shared.config.run.shutdown_timeout);
            if busy > 0 {
                warn!(?partitions, busy, "sends still running when the partitions went: the next owner may verify before they land");
            }
            let topic = &shared.config.kafka.topics.events;
            let mut commits = TopicPartitionList::new();
            let mut tracker = shared.tracker.lock().expect("tracker");
            for p in &partitions {
                if let Some(position) = tracker.committable(*p) {
                    let _ = commits.add_partition_offset(topic, *p, Offset::Offset(position));
                }
                tracker.forget(*p);
            }
            drop(tracker);
            if commits.count() > 0 {
                if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                    warn!(error = %e, "commit on revoke failed");
                }
            }
            let mut state = shared.state.lock().expect("state");
            for p in &partitions {
                state.drop_partition(*p);
            }
        });
    }

    /// Assign: new claims, paused until their block state is read (by the consume loop).
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = self.partitions(list);
                if !partitions.is_empty() {
                    let _ = consumer.pause(list);
                    let claims = self.shared.ownership.assign(&partitions);
                    info!(
                        ?partitions,
                        "partitions assigned; reading their block state"
                    );
                    let _ = self.control.send(Control::Assigned(claims));
                }
                let loading = self.shared.ownership.loading().is_empty();
                self.ready
                    .set(loading && !self.shared.stopping.is_cancelled());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }

    /// A commit is marked done only when Kafka confirmed it.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if result.is_err() {
            return;
        }
        let topic = &self.shared.config.kafka.topics.events;
        let mut tracker = self.shared.tracker.lock().expect("tracker");
        for e in offsets.elements_for_topic(topic) {
            if let Offset::Offset(position) = e.offset() {
                tracker.mark_committed(e.partition(), position);
            }
        }
    }
}
