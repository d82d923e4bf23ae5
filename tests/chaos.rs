//! The chaos run: samgate's promises under faults, counted from the firewall's side.
//!
//! ADS runs go through the real `samgate shim` (tens of lines per run) into a broker of the run's
//! own, two or three `samgate run` replicas share one consumer group, and the Check Point and
//! FortiGate simulators serve HTTPS (Brno routes to a Check Point gateway and a FortiGate). While events flow, the run injects at seeded random moments: SIGKILLs
//! of replicas (each restarted a moment later), SIGTERMs, one broker restart, and firewall faults
//! (HTTP 500, HTML 502, expired sessions, slow tasks, a task that never ends, and lost answers:
//! a `run-script` carried out whose answer never arrives; on the FortiGate: 429, 500, lost
//! answers and a reboot that empties its banned list). Then it drains and counts:
//!
//! - `results_missing`: valid ADS events without a result;
//! - `duplicate_rule_sends`: rule adds a gateway received for a source it already blocked;
//! - `never_block_rules`: rule adds for a protected address;
//! - `lost_blocks`: sources reported `blocked` that a gateway of their target does not block;
//! - `secrets_in_logs`: passwords, API keys or session ids in any log, result or dead letter;
//! - `commands_unanswered`: operator commands (block, unblock, exempt, unexempt of addresses,
//!   mixed into the stream at seeded moments) without a result for each of their targets;
//! - `failed`: results `failed` (every fault is transient, so retries must get through);
//! - and the run must have proved something: at least one block `held` at the end, and at
//!   least one SIGKILL landed when kills were planned.
//!
//! One gateway is wiped mid-run (a reinstall); the replicas reconcile every 20 s and the drain
//! runs `samgate reconcile`, so `lost_blocks` holds only if reconcile repaired it. A source's
//! expected state at a gateway is its latest `blocked` or `unblocked` result there.
//!
//! and prints a last `key=value` line. Every non-zero count prints its evidence first.
//!
//! `cargo test --test chaos` runs the short version (part of `scripts/test`); `scripts/chaos`
//! runs the full one (`--full`, in release mode). Flags: `--seed N`, `--events N`,
//! `--replicas N`, `--kills N`, `--seconds N`, `--keep` (keep the work directory).
//! The exit status is non-zero when an invariant count is not zero.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{samgate_command, KillOnDrop, OwnBroker};
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use samgate_sim::checkpoint::{self as simulator, FaultsUpdate, RunningSimulator, SimulatorConfig};
use samgate_sim::fortigate::{self, FortiGateConfig, RunningFortiGate};
use serde_json::Value;

/// What a run does; `--full` is `scripts/chaos`'s default, the rest the test suite's.
#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    events: usize,
    replicas: usize,
    kills: usize,
    terms: usize,
    fault_rounds: usize,
    /// Operator commands mixed into the stream.
    commands: usize,
    feed: Duration,
    drain: Duration,
    keep: bool,
}

impl Plan {
    fn from_args() -> Result<Self, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let full = args.iter().any(|a| a == "--full");
        let mut plan = if full {
            Plan {
                seed: 0,
                events: 4000,
                replicas: 3,
                kills: 12,
                terms: 3,
                fault_rounds: 24,
                commands: 80,
                feed: Duration::from_secs(240),
                drain: Duration::from_secs(240),
                keep: false,
            }
        } else {
            Plan {
                seed: 0,
                events: 400,
                replicas: 2,
                kills: 3,
                terms: 1,
                fault_rounds: 8,
                commands: 12,
                feed: Duration::from_secs(40),
                drain: Duration::from_secs(180),
                keep: false,
            }
        };
        plan.seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut number = || -> Result<u64, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("{arg} needs a number"))
            };
            match arg.as_str() {
                "--full" => {}
                "--keep" => plan.keep = true,
                "--seed" => plan.seed = number()?,
                "--events" => plan.events = number()? as usize,
                "--replicas" => plan.replicas = number()?.clamp(1, 5) as usize,
                "--kills" => plan.kills = number()? as usize,
                "--seconds" => plan.feed = Duration::from_secs(number()?),
                // What the test harness may pass to every test binary.
                "--nocapture" | "--quiet" | "-q" | "--test-threads" => {}
                other if other.starts_with("--test-threads=") => {}
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(plan)
    }
}

/// Sites, their gateways and what is protected there.
const PRAGUE_NEVER: &str = "10.10.0.0/24";
const GLOBAL_NEVER: &str = "10.99.0.0/16";
const BRNO_COLLECTOR: &str = "10.20.0.5";

fn main() -> ExitCode {
    let plan = match Plan::from_args() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let summary = runtime.block_on(chaos(plan));
    println!("{}", summary.line());
    let broken = summary.violations();
    if broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("chaos: broken promises: {}", broken.join(", "));
        ExitCode::FAILURE
    }
}

/// The counts of the last line.
#[derive(Debug, Default)]
struct Summary {
    events: usize,
    valid: usize,
    results: usize,
    kills: usize,
    terms: usize,
    broker_restarts: usize,
    faults: usize,
    shim_runs: usize,
    shim_failures: usize,
    results_missing: usize,
    duplicate_rule_sends: usize,
    never_block_rules: usize,
    lost_blocks: usize,
    /// (gateway, source) pairs reported `blocked` and held by the gateway at the end.
    held: usize,
    failed: usize,
    secrets_in_logs: usize,
    commands: usize,
    commands_unanswered: usize,
    reconcile_ok: bool,
    seconds: u64,
    seed: u64,
    /// SIGKILLs the plan asked for (a run where none landed proved nothing about them).
    kills_planned: usize,
}

impl Summary {
    /// The invariant counts that are not zero.
    fn violations(&self) -> Vec<&'static str> {
        [
            ("results_missing", self.results_missing),
            ("duplicate_rule_sends", self.duplicate_rule_sends),
            ("never_block_rules", self.never_block_rules),
            ("lost_blocks", self.lost_blocks),
            ("secrets_in_logs", self.secrets_in_logs),
            ("shim_failures", self.shim_failures),
            ("commands_unanswered", self.commands_unanswered),
            ("reconcile_failed", usize::from(!self.reconcile_ok)),
            // Every fault is transient: a block that still failed was given up on too early.
            ("failed", self.failed),
            // A run that blocked nothing, or killed nothing, proved nothing.
            ("nothing_held", usize::from(self.held == 0)),
            (
                "no_kill_landed",
                usize::from(self.kills_planned > 0 && self.kills == 0),
            ),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, _)| name)
        .collect()
    }

    fn line(&self) -> String {
        format!(
            "events={} valid={} results={} kills={} terms={} broker_restarts={} faults={} \
             shim_runs={} shim_failures={} results_missing={} duplicate_rule_sends={} \
             never_block_rules={} lost_blocks={} held={} failed={} secrets_in_logs={} commands={} \
             commands_unanswered={} reconcile_ok={} seconds={} seed={}",
            self.events,
            self.valid,
            self.results,
            self.kills,
            self.terms,
            self.broker_restarts,
            self.faults,
            self.shim_runs,
            self.shim_failures,
            self.results_missing,
            self.duplicate_rule_sends,
            self.never_block_rules,
            self.lost_blocks,
            self.held,
            self.failed,
            self.secrets_in_logs,
            self.commands,
            self.commands_unanswered,
            self.reconcile_ok,
            self.seconds,
            self.seed
        )
    }
}

/// One ADS line the run sent, and what it should lead to.
#[derive(Debug, Clone)]
struct Sent {
    site: &'static str,
    ads_id: u64,
    source: IpAddr,
    /// Parsed by the shim into an event (malformed lines are dead letters).
    valid: bool,
}

/// The ADS lines of the whole run, in ADS runs of 10 to 40 lines.
fn ads_runs(plan: &Plan, rng: &mut StdRng) -> Vec<(&'static str, Vec<(Sent, String)>)> {
    let pool = (plan.events / 5).max(20);
    let source = |rng: &mut StdRng, site: &str| -> IpAddr {
        let roll = rng.random_range(0..100);
        match (roll, site) {
            (0..=1, _) => format!(
                "10.99.{}.{}",
                rng.random_range(0..4),
                rng.random_range(1..250)
            ),
            (2, "prague") => format!("10.10.0.{}", rng.random_range(1..250)),
            (2, _) => BRNO_COLLECTOR.to_owned(),
            (3..=12, _) => format!("2001:db8:c::{:x}", rng.random_range(1..pool / 5 + 2)),
            _ => {
                let i = rng.random_range(0..pool);
                format!("198.18.{}.{}", i / 250, i % 250 + 1)
            }
        }
        .parse()
        .unwrap()
    };
    let mut runs = Vec::new();
    let mut id = 0u64;
    while id < plan.events as u64 {
        let site = if rng.random_bool(0.6) {
            "prague"
        } else {
            "brno"
        };
        let size = rng.random_range(10..=40).min(plan.events - id as usize);
        let mut lines = Vec::new();
        for _ in 0..size {
            id += 1;
            let ip = source(rng, site);
            let roll = rng.random_range(0..100);
            let (method, priority) = match roll {
                0..=4 => ("DOS", "High"),
                5..=8 => ("SCANS", "Low"),
                9..=30 => ("SSHDICT", "Critical"),
                _ => ("SCANS", "High"),
            };
            let malformed = roll == 99;
            let line = if malformed {
                format!("{id}\tmalformed line")
            } else {
                ads_line(id, method, priority, ip)
            };
            let sent = Sent {
                site,
                ads_id: id,
                source: ip,
                valid: !malformed,
            };
            lines.push((sent, line));
        }
        runs.push((site, lines));
    }
    runs
}

/// An ADS standard (15-field) line.
fn ads_line(id: u64, method: &str, priority: &str, source: IpAddr) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        " ",
        method,
        "Port scanning",
        "Security",
        priority,
        "chaos",
        " ",
        "TCP",
        &source.to_string(),
        " ",
        " ",
        " ",
        " ",
    ]
    .join("\t")
}

/// What the injector does, at which moment of the feed.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(usize),
    Restart(usize),
    Term(usize),
    BrokerRestart,
    Http500,
    Html502,
    ExpireSessions,
    SlowTasks,
    NormalTasks,
    StuckTask,
    LostAnswer,
    ShowTaskErrors,
    /// A gateway loses every rule (a reinstall): reconcile must bring them back.
    WipeGateway,
    /// The FortiGate answers 429 (rate limited) to its next calls.
    FortiRateLimit,
    /// The FortiGate answers 500 to its next calls.
    Forti500,
    /// The FortiGate carries out its next call and loses the answer.
    FortiLostAnswer,
    /// The FortiGate reboots: its banned list is gone (banned-ip-persistency disabled).
    FortiReboot,
    /// The i-th operator command goes onto the events topic.
    Operator(usize),
}

/// The operator commands of the run: manual blocks of addresses no ADS event names (some
/// unblocked later, some with an exemption), exemptions of ADS sources (some ended later), and
/// blocks of protected addresses (which must be refused). Prague routes to one target, Brno to
/// two (a Check Point gateway and a FortiGate): a command has a result per target.
fn operator_commands(plan: &Plan, rng: &mut StdRng) -> Vec<samgate::command::Command> {
    use samgate::command::{Action, Command};
    let mut commands = Vec::new();
    let mut blocked: Vec<(&'static str, IpAddr)> = Vec::new();
    let mut exempted: Vec<(&'static str, IpAddr)> = Vec::new();
    let pool = (plan.events / 5).max(20);
    for i in 0..plan.commands {
        let site = if rng.random_bool(0.5) {
            "prague"
        } else {
            "brno"
        };
        let mut c = Command::new(Action::Block);
        c.actor = Some("chaos".into());
        let roll = rng.random_range(0..10);
        match roll {
            5..=6 if !blocked.is_empty() => {
                let (site, ip) = blocked.remove(rng.random_range(0..blocked.len()));
                c.action = Action::Unblock;
                c.site = Some(site.into());
                c.ip = Some(ip);
                if rng.random_bool(0.5) {
                    c.exempt_for_s = Some(3600);
                }
            }
            7 => {
                let n = rng.random_range(0..pool);
                let ip = format!("198.18.{}.{}", n / 250, n % 250 + 1)
                    .parse()
                    .unwrap();
                c.action = Action::Exempt;
                c.site = Some(site.into());
                c.ip = Some(ip);
                c.exempt_for_s = Some(3600);
                exempted.push((site, ip));
            }
            8 if !exempted.is_empty() => {
                let (site, ip) = exempted.remove(rng.random_range(0..exempted.len()));
                c.action = Action::Unexempt;
                c.site = Some(site.into());
                c.ip = Some(ip);
            }
            9 => {
                c.site = Some(site.into());
                c.ip = Some(format!("10.99.7.{}", i % 250 + 1).parse().unwrap());
            }
            _ => {
                let ip: IpAddr = format!("203.0.113.{}", i % 250 + 1).parse().unwrap();
                c.site = Some(site.into());
                c.ip = Some(ip);
                blocked.push((site, ip));
            }
        }
        commands.push(c);
    }
    commands
}

/// Each command's results: one per target (unblock with an exemption: one more).
fn command_results_expected(c: &samgate::command::Command) -> usize {
    use samgate::command::Action;
    let targets = match c.action {
        Action::Block | Action::Unblock => site_targets(c.site.as_deref().unwrap_or("")),
        _ => 1,
    };
    targets + usize::from(c.exempt_for_s.is_some() && c.action == Action::Unblock)
}

/// How many targets a site routes to (as `replica_config` says).
fn site_targets(site: &str) -> usize {
    match site {
        "brno" => 2,
        _ => 1,
    }
}

/// The FortiGate's name, which results give as its "gateway".
const FORTIGATE: &str = "fg-brno";

fn schedule(plan: &Plan, rng: &mut StdRng) -> Vec<(Duration, Fault)> {
    let span = plan.feed.as_secs_f64();
    let at = |rng: &mut StdRng, from: f64, to: f64| {
        Duration::from_secs_f64(span * rng.random_range(from..to))
    };
    let mut plan_faults = Vec::new();
    plan_faults.push((at(rng, 0.4, 0.6), Fault::WipeGateway));
    plan_faults.push((at(rng, 0.3, 0.7), Fault::FortiReboot));
    // Commands in their own order (an unblock after its block), spread over the feed.
    let mut times: Vec<Duration> = (0..plan.commands).map(|_| at(rng, 0.02, 0.95)).collect();
    times.sort();
    for (i, t) in times.into_iter().enumerate() {
        plan_faults.push((t, Fault::Operator(i)));
    }
    for _ in 0..plan.kills {
        let replica = rng.random_range(0..plan.replicas);
        let t = at(rng, 0.05, 0.9);
        let back = t + Duration::from_millis(rng.random_range(300..3000));
        plan_faults.push((t, Fault::Kill(replica)));
        plan_faults.push((back, Fault::Restart(replica)));
    }
    for _ in 0..plan.terms {
        let replica = rng.random_range(0..plan.replicas);
        let t = at(rng, 0.05, 0.9);
        plan_faults.push((t, Fault::Term(replica)));
        plan_faults.push((t + Duration::from_secs(1), Fault::Restart(replica)));
    }
    plan_faults.push((at(rng, 0.3, 0.7), Fault::BrokerRestart));
    let firewall = [
        Fault::Http500,
        Fault::Html502,
        Fault::ExpireSessions,
        Fault::SlowTasks,
        Fault::StuckTask,
        Fault::LostAnswer,
        Fault::FortiRateLimit,
        Fault::LostAnswer,
        Fault::Forti500,
        Fault::ShowTaskErrors,
        Fault::FortiLostAnswer,
    ];
    for round in 0..plan.fault_rounds {
        let fault = firewall[round % firewall.len()];
        let t = at(rng, 0.05, 0.95);
        plan_faults.push((t, fault));
        if let Fault::SlowTasks = fault {
            plan_faults.push((t + Duration::from_secs(5), Fault::NormalTasks));
        }
    }
    plan_faults.sort_by_key(|(t, _)| *t);
    plan_faults
}

/// One `samgate run` replica: a config, and the process of its current incarnation.
struct Replica {
    name: String,
    config: PathBuf,
    dir: PathBuf,
    process: Option<KillOnDrop>,
    incarnation: u32,
}

impl Replica {
    fn start(&mut self) {
        if self.process.is_some() {
            return;
        }
        self.incarnation += 1;
        let log = self
            .dir
            .join(format!("{}-{}.log", self.name, self.incarnation));
        let log = std::fs::File::create(log).unwrap();
        let child = samgate_command()
            .args(["run", "--config", self.config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("samgate run starts");
        self.process = Some(KillOnDrop(child));
    }

    fn kill(&mut self) -> bool {
        let Some(mut process) = self.process.take() else {
            return false;
        };
        let _ = process.kill();
        let _ = process.wait();
        true
    }

    /// SIGTERM, then wait for the exit (a minute at most, then SIGKILL). Returns how it went.
    fn term(&mut self) -> Option<String> {
        let mut process = self.process.take()?;
        let pid = process.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = process.try_wait() {
                return Some(format!(
                    "{} exited {status} {:.1}s after SIGTERM",
                    self.name,
                    started.elapsed().as_secs_f64()
                ));
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = process.kill();
                return Some(format!("{} did not stop within 60 s of SIGTERM", self.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[derive(Clone)]
struct Topics {
    events: String,
    results: String,
    dlq: String,
    state: String,
}

#[allow(clippy::too_many_arguments)]
fn replica_config(
    dir: &Path,
    name: &str,
    broker: &str,
    topics: &Topics,
    group: &str,
    sim: &RunningSimulator,
    fg: &RunningFortiGate,
    user: &str,
    password: &str,
) -> PathBuf {
    let text = format!(
        r#"
[kafka]
brokers = "{broker}"
partitions = 6
[kafka.topics]
events = "{events}"
results = "{results}"
dlq = "{dlq}"
state = "{state}"
[run]
group_id = "{group}"
http_listen = "127.0.0.1:0"
batch_max_delay = "100ms"
batch_max_rules = 50
shutdown_timeout = "10s"
retry_initial = "200ms"
retry_max = "3s"
retry_deadline = "90s"
[reconcile]
interval = "20s"
[policy]
never_block = ["{GLOBAL_NEVER}"]
[checkpoint.servers.hq]
url = "{url}"
user = "{user}"
password = "{password}"
request_timeout = "5s"
task_timeout = "5s"
[checkpoint.servers.hq.tls]
fingerprint_sha256 = "{fp}"
[fortigate.devices.{FORTIGATE}]
url = "{fg_url}"
token = "{fg_token}"
request_timeout = "5s"
[fortigate.devices.{FORTIGATE}.tls]
fingerprint_sha256 = "{fg_fp}"
[targets.brno-fg]
kind = "fortigate"
device = "{FORTIGATE}"
[targets.edge]
server = "hq"
gateways = ["gw-1", "gw-2"]
mode = "fw_sam"
[targets.branch]
server = "hq"
gateways = ["gw-3"]
mode = "fw_samp"
[sites.prague]
targets = ["edge"]
never_block = ["{PRAGUE_NEVER}"]
[sites.brno]
targets = ["branch", "brno-fg"]
collectors = ["{BRNO_COLLECTOR}"]
"#,
        events = topics.events,
        results = topics.results,
        dlq = topics.dlq,
        state = topics.state,
        url = sim.url,
        fp = sim.fingerprint.as_deref().unwrap(),
        fg_url = fg.url,
        fg_token = fg.token,
        fg_fp = fg.fingerprint.as_deref().unwrap(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the shim once, as ADS does, with `lines` on stdin (or `--flush-spool` when `None`).
/// Returns whether it exited 0; its stderr goes to `log`.
fn shim_run(
    broker: &str,
    topics: &Topics,
    site: &str,
    spool: &Path,
    lines: Option<&[String]>,
    log: &Path,
) -> bool {
    let mut args = vec![
        "shim".to_owned(),
        "--site".into(),
        site.into(),
        "--brokers".into(),
        broker.into(),
        "--topic".into(),
        topics.events.clone(),
        "--dlq-topic".into(),
        topics.dlq.clone(),
        "--spool-dir".into(),
        spool.to_str().unwrap().into(),
        "--delivery-timeout".into(),
        "5s".into(),
    ];
    if lines.is_none() {
        args.push("--flush-spool".into());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = samgate_command()
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the shim starts");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(lines) = lines {
        let _ = stdin.write_all((lines.join("\n") + "\n").as_bytes());
    }
    drop(stdin);
    child.wait().map(|s| s.success()).unwrap_or(false)
}

/// Reads every result of `topic` as it arrives, in a thread of its own.
fn collect(broker: String, topic: String) -> Arc<Mutex<Vec<Value>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker)
            .set("group.id", common::unique("chaos-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        loop {
            if let Ok(m) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                if let Some(t) = m.topics().first().filter(|t| !t.partitions().is_empty()) {
                    for p in t.partitions() {
                        list.add_partition_offset(&topic, p.id(), Offset::Beginning)
                            .unwrap();
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        consumer.assign(&list).unwrap();
        loop {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                if let Ok(v) = serde_json::from_slice(m.payload().unwrap_or_default()) {
                    sink.lock().unwrap().push(v);
                }
            }
            if Arc::strong_count(&sink) == 1 {
                return;
            }
        }
    });
    out
}

async fn chaos(plan: Plan) -> Summary {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut summary = Summary {
        seed: plan.seed,
        kills_planned: plan.kills,
        ..Summary::default()
    };
    eprintln!("chaos: {plan:?}");
    let work = tempfile::Builder::new()
        .prefix("samgate-chaos-")
        .tempdir()
        .unwrap();
    let dir = work.path().to_owned();

    let broker = OwnBroker::start();
    let address = broker.address();
    let passwords: Vec<(String, String)> = (0..plan.replicas)
        .map(|i| {
            (
                format!("chaos-{i}"),
                format!("pw-{}-{}", plan.seed, common::unique("x")),
            )
        })
        .collect();
    let sim = simulator::start(SimulatorConfig {
        users: passwords.clone(),
        gateways: vec!["gw-1".into(), "gw-2".into(), "gw-3".into()],
        task_duration: Duration::from_millis(300),
        kept_scripts: 100_000,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let fg = fortigate::start(FortiGateConfig {
        token: format!("fg-{}-{}", plan.seed, common::unique("token")),
        ..FortiGateConfig::default()
    })
    .await
    .unwrap();
    let topics = Topics {
        events: "chaos.events".into(),
        results: "chaos.results".into(),
        dlq: "chaos.dlq".into(),
        state: "chaos.state".into(),
    };
    let group = "chaos";
    let mut replicas: Vec<Replica> = passwords
        .iter()
        .enumerate()
        .map(|(i, (user, password))| Replica {
            name: format!("replica-{i}"),
            config: replica_config(
                &dir,
                &format!("replica-{i}"),
                &address,
                &topics,
                group,
                &sim,
                &fg,
                user,
                password,
            ),
            dir: dir.clone(),
            process: None,
            incarnation: 0,
        })
        .collect();
    for r in &mut replicas {
        r.start();
    }
    let results = collect(address.clone(), topics.results.clone());
    let dead_letters = collect(address.clone(), topics.dlq.clone());

    // Feed in one thread, inject in this one.
    let runs = ads_runs(&plan, &mut rng);
    let sent: Vec<Sent> = runs
        .iter()
        .flat_map(|(_, lines)| lines.iter().map(|(s, _)| s.clone()))
        .collect();
    summary.events = sent.len();
    summary.valid = sent.iter().filter(|s| s.valid).count();
    let spool = |site: &str| dir.join(format!("spool-{site}"));
    let feeder = {
        let (address, dir, feed) = (address.clone(), dir.clone(), plan.feed);
        let topics = topics.clone();
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            let pause = feed.div_f64(runs.len().max(1) as f64);
            let begun = Instant::now();
            for (i, (site, lines)) in runs.into_iter().enumerate() {
                let due = begun + pause.mul_f64(i as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let text: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
                let ok = shim_run(
                    &address,
                    &topics,
                    site,
                    &dir.join(format!("spool-{site}")),
                    Some(&text),
                    &dir.join("shim.log"),
                );
                outcomes.push(ok);
            }
            outcomes
        })
    };
    let faults = schedule(&plan, &mut rng);
    let commands = operator_commands(&plan, &mut rng);
    summary.commands = commands.len();
    let operator: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .create()
        .unwrap();
    let begun = Instant::now();
    for (at, fault) in faults {
        if let Some(wait) = (begun + at).checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        eprintln!("chaos: {:>6.1}s {fault:?}", begun.elapsed().as_secs_f64());
        let update = |u: FaultsUpdate| {
            sim.set_faults(u);
        };
        match fault {
            Fault::Kill(i) => summary.kills += usize::from(replicas[i].kill()),
            Fault::Restart(i) => replicas[i].start(),
            Fault::Term(i) => {
                if let Some(how) = replicas[i].term() {
                    summary.terms += 1;
                    eprintln!("chaos: {how}");
                }
            }
            Fault::BrokerRestart => {
                broker.restart();
                summary.broker_restarts += 1;
            }
            Fault::Http500 => update(FaultsUpdate {
                http_500_next: Some(2),
                ..Default::default()
            }),
            Fault::Html502 => update(FaultsUpdate {
                html_502_next: Some(2),
                ..Default::default()
            }),
            Fault::ExpireSessions => update(FaultsUpdate {
                expire_sessions: true,
                ..Default::default()
            }),
            Fault::SlowTasks => update(FaultsUpdate {
                task_duration_ms: Some(Some(3000)),
                ..Default::default()
            }),
            Fault::NormalTasks => update(FaultsUpdate {
                task_duration_ms: Some(None),
                ..Default::default()
            }),
            Fault::StuckTask => update(FaultsUpdate {
                stuck_tasks_next: Some(1),
                ..Default::default()
            }),
            Fault::LostAnswer => update(FaultsUpdate {
                lost_answers_next: Some(1),
                ..Default::default()
            }),
            // More than a wait asks again after (three), so some sends are left unfollowed.
            Fault::ShowTaskErrors => update(FaultsUpdate {
                show_task_errors_next: Some(6),
                ..Default::default()
            }),
            Fault::WipeGateway => update(FaultsUpdate {
                wipe_gateway: Some("gw-2".into()),
                ..Default::default()
            }),
            Fault::FortiRateLimit => {
                fg.set_faults(fortigate::FaultsUpdate {
                    http_429_next: Some(1),
                    ..Default::default()
                });
            }
            Fault::Forti500 => {
                fg.set_faults(fortigate::FaultsUpdate {
                    http_500_next: Some(2),
                    ..Default::default()
                });
            }
            Fault::FortiLostAnswer => {
                fg.set_faults(fortigate::FaultsUpdate {
                    lost_answers_next: Some(1),
                    ..Default::default()
                });
            }
            Fault::FortiReboot => fg.reboot(),
            Fault::Operator(i) => {
                use rdkafka::producer::{BaseRecord, Producer};
                let c = &commands[i];
                let payload = serde_json::to_string(c).unwrap();
                let key = c.key();
                operator
                    .send(BaseRecord::to(&topics.events).key(&key).payload(&payload))
                    .map_err(|(e, _)| e)
                    .unwrap();
                let _ = operator.flush(Duration::from_secs(30));
                continue;
            }
        }
        if !matches!(fault, Fault::Kill(_) | Fault::Restart(_) | Fault::Term(_)) {
            summary.faults += 1;
        }
    }
    let outcomes = tokio::task::spawn_blocking(move || feeder.join().unwrap())
        .await
        .unwrap();
    summary.shim_runs = outcomes.len();
    summary.shim_failures = outcomes.iter().filter(|ok| !**ok).count();

    // Drain: every replica up, no faults, every spool delivered; then wait for the results.
    eprintln!("chaos: {:>6.1}s draining", begun.elapsed().as_secs_f64());
    for r in &mut replicas {
        r.start();
    }
    sim.set_faults(FaultsUpdate {
        clear: true,
        ..Default::default()
    });
    fg.set_faults(fortigate::FaultsUpdate {
        clear: true,
        ..Default::default()
    });
    for site in ["prague", "brno"] {
        let ok = shim_run(
            &address,
            &topics,
            site,
            &spool(site),
            None,
            &dir.join("shim.log"),
        );
        summary.shim_runs += 1;
        summary.shim_failures += usize::from(!ok);
    }
    let valid: BTreeMap<(String, u64), &Sent> = sent
        .iter()
        .filter(|s| s.valid)
        .map(|s| ((s.site.to_owned(), s.ads_id), s))
        .collect();
    let drain_until = Instant::now() + plan.drain;
    // Per command id, the targets (or exemption) answered.
    let command_answers = |results: &[Value]| -> BTreeMap<String, BTreeSet<String>> {
        let mut answers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in results.iter().filter(|r| r["origin"] == "manual") {
            if let Some(id) = r["event_ids"][0].as_str() {
                let what = r["target"]
                    .as_str()
                    .unwrap_or(r["outcome"].as_str().unwrap_or("-"));
                answers
                    .entry(id.to_owned())
                    .or_default()
                    .insert(what.to_owned());
            }
        }
        answers
    };
    let unanswered = |results: &[Value]| -> Vec<&samgate::command::Command> {
        let answers = command_answers(results);
        commands
            .iter()
            .filter(|c| answers.get(&c.id).map_or(0, BTreeSet::len) < command_results_expected(c))
            .collect()
    };
    let answered = loop {
        let answered: BTreeSet<(String, u64)> = results
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| {
                let id = r["ads_event_id"].as_str()?.parse().ok()?;
                Some((r["site"].as_str()?.to_owned(), id))
            })
            .collect();
        let commands_done = unanswered(&results.lock().unwrap()).is_empty();
        if (valid.keys().all(|k| answered.contains(k)) && commands_done)
            || Instant::now() > drain_until
        {
            break answered;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // A gateway was wiped: reconcile on demand (the periodic one may have run already), as an
    // operator would, until a reconcile finds nothing missing (its repairs take a moment).
    let config = replicas[0].config.clone();
    for round in 1..=12 {
        let config = config.clone();
        let out = tokio::task::spawn_blocking(move || {
            samgate_command()
                .args(["reconcile", "--json", "--config"])
                .arg(&config)
                .args(["--timeout", "120s"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let missing: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|r| r["missing"].as_u64())
            .sum();
        eprintln!(
            "chaos: samgate reconcile (round {round}): exit {}, {missing} missing{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        summary.reconcile_ok = out.status.success() && missing == 0;
        if summary.reconcile_ok {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // Work that is still retrying somewhere would send late: give it a moment to show.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut shutdowns = Vec::new();
    for r in &mut replicas {
        shutdowns.extend(r.term());
    }
    for how in &shutdowns {
        eprintln!("chaos: {how}");
    }
    let results: Vec<Value> = std::mem::take(&mut *results.lock().unwrap());
    summary.results = results.len();
    summary.failed = results.iter().filter(|r| r["outcome"] == "failed").count();

    let logs = Logs::read(&dir);
    let history = sim.history();
    let state = sim.state();

    // commands_unanswered
    let silent = unanswered(&results);
    summary.commands_unanswered = silent.len();
    for c in silent.iter().take(5) {
        eprintln!(
            "EVIDENCE commands_unanswered: {} {:?} at {:?} ({})",
            c.action.as_str(),
            c.ip,
            c.site,
            c.id
        );
    }

    // results_missing
    let missing: Vec<&&Sent> = valid
        .iter()
        .filter(|(k, _)| !answered.contains(k))
        .map(|(_, s)| s)
        .collect();
    summary.results_missing = missing.len();
    for s in missing.iter().take(5) {
        eprintln!(
            "EVIDENCE results_missing: {} ADS event {} from {}",
            s.site, s.ads_id, s.source
        );
        logs.about(s.source);
    }

    // duplicate_rule_sends and never_block_rules, from what the gateways received
    let protected = |gateway: &str| -> Vec<IpNet> {
        let mut nets: Vec<IpNet> = vec![
            GLOBAL_NEVER.parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ];
        if gateway == "gw-3" || gateway == FORTIGATE {
            nets.push(format!("{BRNO_COLLECTOR}/32").parse().unwrap());
        } else {
            nets.push(PRAGUE_NEVER.parse().unwrap());
        }
        nets
    };
    let mut shown = 0;
    for (gateway, adds) in &history {
        for add in adds {
            let Some(source) = add.source else { continue };
            if add.while_active {
                summary.duplicate_rule_sends += 1;
                if shown < 5 {
                    shown += 1;
                    eprintln!(
                        "EVIDENCE duplicate_rule_sends: {gateway} got {} for {source} at {} while a rule for it was active",
                        add.command, add.at_ms
                    );
                    scripts_about(&state, source);
                    logs.about(source);
                }
            }
            if protected(gateway).iter().any(|n| n.contains(&source)) {
                summary.never_block_rules += 1;
                eprintln!(
                    "EVIDENCE never_block_rules: {gateway} got {} for protected {source}",
                    add.command
                );
                logs.about(source);
            }
        }
    }

    // The FortiGate's bans, as its "gateway" received them.
    for add in fg.history() {
        if add.while_banned {
            summary.duplicate_rule_sends += 1;
            if shown < 5 {
                shown += 1;
                eprintln!(
                    "EVIDENCE duplicate_rule_sends: {FORTIGATE} got {} for {} at {} while it was banned",
                    add.via, add.ip, add.at_ms
                );
                logs.about(add.ip);
            }
        }
        if protected(FORTIGATE).iter().any(|n| n.contains(&add.ip)) {
            summary.never_block_rules += 1;
            eprintln!(
                "EVIDENCE never_block_rules: {FORTIGATE} banned protected {}",
                add.ip
            );
            logs.about(add.ip);
        }
    }

    // lost_blocks: every source whose latest result at a gateway is `blocked` (not a later
    // `unblocked`) is blocked there
    let mut blocked_now = sim.blocked_sources();
    blocked_now.insert(FORTIGATE.to_owned(), fg.banned("root"));
    let mut latest: BTreeMap<(String, IpAddr), (String, bool)> = BTreeMap::new();
    for r in results
        .iter()
        .filter(|r| r["outcome"] == "blocked" || r["outcome"] == "unblocked")
    {
        let ip: IpAddr = r["ip"].as_str().unwrap().parse().unwrap();
        let at = r["decided_at"].as_str().unwrap_or("").to_owned();
        for gw in r["gateways"].as_array().into_iter().flatten() {
            let gw = gw.as_str().unwrap().to_owned();
            let entry = latest.entry((gw, ip)).or_insert((String::new(), false));
            if at >= entry.0 {
                *entry = (at.clone(), r["outcome"] == "blocked");
            }
        }
    }
    let mut lost = BTreeSet::new();
    for ((gw, ip), (_, expected)) in latest {
        if !expected {
            continue;
        }
        if blocked_now.get(&gw).is_some_and(|set| set.contains(&ip)) {
            summary.held += 1;
        } else {
            lost.insert((gw, ip));
        }
    }
    summary.lost_blocks = lost.len();
    for (gw, ip) in lost.iter().take(5) {
        eprintln!("EVIDENCE lost_blocks: {ip} reported blocked, but {gw} does not block it");
        scripts_about(&state, *ip);
        logs.about(*ip);
    }

    // secrets_in_logs
    let mut secrets: Vec<String> = passwords.iter().map(|(_, p)| p.clone()).collect();
    secrets.push(sim.api_key.clone());
    secrets.push(fg.token.clone());
    secrets.extend(sim.issued_session_ids());
    let dead_letters: Vec<Value> = std::mem::take(&mut *dead_letters.lock().unwrap());
    let messages = [("results", &results), ("dead letters", &dead_letters)].map(|(name, topic)| {
        let text: Vec<String> = topic.iter().map(Value::to_string).collect();
        (PathBuf::from(name), text.join("\n"))
    });
    for (place, text) in logs.files.iter().chain(&messages) {
        for secret in &secrets {
            if text.contains(secret.as_str()) {
                summary.secrets_in_logs += 1;
                eprintln!(
                    "EVIDENCE secrets_in_logs: {} shows a secret ({}…)",
                    place.display(),
                    &secret[..4.min(secret.len())]
                );
            }
        }
    }

    summary.seconds = started.elapsed().as_secs();
    if !summary.violations().is_empty() || plan.keep {
        let kept = work.keep();
        eprintln!("chaos: logs and configs kept in {}", kept.display());
    }
    drop(broker);
    sim.stop().await;
    fg.stop().await;
    summary
}

/// The scripts that carried a rule for `source`, with when they arrived.
fn scripts_about(state: &Value, source: IpAddr) {
    let needle = format!(" {source} ");
    let alt = format!(" {source}\n");
    for script in state["scripts"].as_array().into_iter().flatten() {
        let text = script["script"].as_str().unwrap_or("");
        let text_nl = format!("{text}\n");
        if text_nl.contains(&needle) || text_nl.contains(&alt) {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(&source.to_string()))
                .take(2)
                .collect();
            eprintln!(
                "  script at {} ms to {}: {:?}",
                script["at_ms"], script["targets"], lines
            );
        }
    }
}

/// Every log of the run: replicas (one file per incarnation) and shim runs.
struct Logs {
    files: Vec<(PathBuf, String)>,
}

impl Logs {
    fn read(dir: &Path) -> Self {
        let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| {
                let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
                (p, text)
            })
            .collect();
        files.sort();
        Self { files }
    }

    /// The replica log lines that mention `ip`, and the warnings and errors around them.
    fn about(&self, ip: IpAddr) {
        let needle = format!("ip={ip}");
        let mut shown = 0;
        for (path, text) in &self.files {
            let name = path.file_name().unwrap().to_string_lossy();
            for line in text.lines().filter(|l| {
                l.split_whitespace().any(|w| w == needle) || l.contains(&format!("{ip} "))
            }) {
                if shown == 40 {
                    eprintln!("  …");
                    return;
                }
                shown += 1;
                eprintln!("  {name}: {line}");
            }
        }
    }
}
