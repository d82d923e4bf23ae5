//! `scripts/bench vendor` and `scripts/bench latency`: samgate against the Check Point simulator
//! under the honest firewall model, through the real broker, the real shim and the pipeline.
//! Prints figures; asserts nothing about time.
//!
//! - `vendor BROKERS SAMGATE [EVENTS] [VENDOR_SECONDS]`: the vendor script's behaviour (per
//!   event: login, one `run-script` with one `fw sam`, discard, logout, under the server's
//!   3 logins a minute) for `VENDOR_SECONDS`, then samgate on the same simulator and the same
//!   `EVENTS` (distinct sources, all at once); both in blocks per minute, and the ratio.
//! - `latency BROKERS SAMGATE [SECONDS] [EVENTS_PER_S] [NEW_PERCENT]`: a steady load, a shim run
//!   every second, `NEW_PERCENT` of the events from new sources (the rest repeats); detection
//!   (the shim reading the line) to the rule confirmed on the gateway, in milliseconds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use samgate_sim::checkpoint::{
    self as simulator, FirewallModel, RunningSimulator, SimulatorConfig,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const TASK_BASE: Duration = Duration::from_millis(1000);
/// samgate's target mode: `fw_samp` (one `fw samp batch` per batch) unless `BENCH_MODE` says
/// `fw_sam` (one process per rule).
fn mode() -> String {
    std::env::var("BENCH_MODE").unwrap_or_else(|_| "fw_samp".into())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn ip(n: usize) -> String {
    format!("10.{}.{}.{}", n / 65536 % 256, n / 256 % 256, n % 256)
}

fn ads_line(id: usize, source: &str) -> String {
    format!("{id}\t2026-11-20 10:13:02\t \tSCANS\tPort scanning\tSecurity\tHigh\tscan\t \tTCP\t{source}\t \t \tedge\t \n")
}

struct Lab {
    brokers: String,
    samgate: String,
    sim: RunningSimulator,
    tag: u128,
    dir: tempfile::TempDir,
}

impl Lab {
    async fn start(brokers: String, samgate: String) -> anyhow::Result<Self> {
        let sim = simulator::start(SimulatorConfig {
            task_duration: TASK_BASE,
            model: FirewallModel::honest(),
            gateways: vec!["gw-1".into()],
            faults: simulator::Faults {
                latency_ms: 20,
                ..Default::default()
            },
            ..SimulatorConfig::default()
        })
        .await?;
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        Ok(Self {
            brokers,
            samgate,
            sim,
            tag,
            dir: tempfile::tempdir()?,
        })
    }

    fn topic(&self, name: &str) -> String {
        format!("bench-{name}-{}", self.tag)
    }

    fn model(&self) -> String {
        let m = FirewallModel::honest();
        format!(
            "firewall model: task {TASK_BASE:?} + {:?} per fw process + {:?} per fw samp batch line, {} scripts at once per gateway, API latency 20 ms; samgate target mode {}",
            m.per_process, m.per_batch_line, m.gateway_cores, mode()
        )
    }

    /// One ADS run through the shim binary.
    fn shim(&self, lines: &str) -> anyhow::Result<()> {
        let input = self.dir.path().join("run.tsv");
        std::fs::write(&input, lines)?;
        let status = std::process::Command::new(&self.samgate)
            .args(["shim", "--site", "bench", "--brokers", &self.brokers])
            .args([
                "--topic",
                &self.topic("events"),
                "--dlq-topic",
                &self.topic("dlq"),
            ])
            .args(["--delivery-timeout", "60s", "--log", "warn", "--spool-dir"])
            .arg(self.dir.path().join("spool"))
            .stdin(std::fs::File::open(&input)?)
            .status()?;
        anyhow::ensure!(status.success(), "shim failed");
        Ok(())
    }

    /// `samgate run` in this process (default settings), until the returned token is cancelled.
    async fn pipeline(&self) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
        let mode = mode();
        let toml = format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\nevents = \"{}\"\nresults = \"{}\"\ndlq = \"{}\"\nstate = \"{}\"\n[run]\ngroup_id = \"bench-{}\"\nhttp_listen = \"127.0.0.1:0\"\n[checkpoint.servers.hq]\nurl = \"{}\"\nuser = \"admin\"\npassword = \"admin123\"\n[checkpoint.servers.hq.tls]\nfingerprint_sha256 = \"{}\"\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\nmode = \"{mode}\"\n[sites.bench]\ntargets = [\"edge\"]\n",
            self.brokers,
            self.topic("events"),
            self.topic("results"),
            self.topic("dlq"),
            self.topic("state"),
            self.tag,
            self.sim.url,
            self.sim.fingerprint.as_deref().unwrap_or_default()
        );
        let config = samgate::config::Config::from_toml(&toml)?.validate()?;
        let cancel = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                if let Err(e) = samgate::pipeline::run(config, cancel, |addr| {
                    let _ = tx.send(addr);
                })
                .await
                {
                    eprintln!("pipeline: {e:#}");
                }
            }
        });
        rx.await?;
        Ok((cancel, task))
    }

    /// One event, and its result: the clock starts once the pipeline consumes (the test broker
    /// can take a rebalance timeout, a minute, before a new group's first real assignment).
    async fn warm_up(&self, results: &Mutex<Vec<Value>>) -> anyhow::Result<()> {
        self.shim(&ads_line(usize::MAX / 2, "172.31.255.254"))?;
        wait_for(results, 1, Duration::from_secs(300))
            .await
            .map_err(|e| e.context("the pipeline never answered"))?;
        results.lock().unwrap().clear();
        Ok(())
    }

    /// Every result, as it arrives (a reader thread of its own).
    fn results(&self) -> Arc<Mutex<Vec<Value>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (brokers, topic, into) = (self.brokers.clone(), self.topic("results"), seen.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("reader-{topic}"))
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
            let partitions = loop {
                let found = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                    .unwrap_or(0);
                if found > 0 {
                    break found;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let mut list = TopicPartitionList::new();
            for p in 0..partitions as i32 {
                list.add_partition_offset(&topic, p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&list).unwrap();
            loop {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    if let Ok(v) = serde_json::from_slice(m.payload().unwrap_or_default()) {
                        into.lock().unwrap().push(v);
                    }
                }
            }
        });
        seen
    }
}

/// Waits until `count` results arrived (or `limit`); returns the seconds waited.
/// Waits for `count` results; the seconds it took. An error when they do not come within
/// `limit` (a figure over results not seen would not be measured).
async fn wait_for(
    results: &Mutex<Vec<Value>>,
    count: usize,
    limit: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let seen = || results.lock().unwrap().len();
    while seen() < count && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(
        seen() >= count,
        "only {} of {count} results within {limit:?}",
        seen()
    );
    Ok(started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(
        !sorted.is_empty(),
        "no samples: nothing to take a percentile of"
    );
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The vendor script, per event, as fast as the server lets it, for `seconds`.
async fn vendor(lab: &Lab, events: usize, seconds: u64) -> anyhow::Result<(usize, usize, f64)> {
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true) // the vendor script runs curl -k
        .build()?;
    let api = |command: &str| format!("{}/web_api/{command}", lab.sim.url);
    let started = Instant::now();
    let (mut tried, mut refused) = (0, 0);
    while started.elapsed() < Duration::from_secs(seconds) && tried < events {
        let source = ip(tried);
        tried += 1;
        let login = http
            .post(api("login"))
            .json(&json!({"user": "admin", "password": "admin123"}))
            .send()
            .await?;
        if !login.status().is_success() {
            refused += 1; // this event's block is lost: the script exits
            continue;
        }
        let sid = login.json::<Value>().await?["sid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let call = |command: &str, body: Value| {
            http.post(api(command))
                .header("X-chkp-sid", sid.clone())
                .json(&body)
                .send()
        };
        let script = format!("fw sam -s localhost -f All -t 3600 -J src {source}");
        call(
            "run-script",
            json!({"script-name": "flowmon", "script": script, "targets": ["gw-1"]}),
        )
        .await?;
        call("discard", json!({})).await?;
        call("logout", json!({})).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((tried, refused, elapsed))
}

async fn bench_vendor(lab: Lab, events: usize, seconds: u64) -> anyhow::Result<()> {
    let (tried, refused, vendor_s) = vendor(&lab, events, seconds).await?;
    tokio::time::sleep(TASK_BASE * 2).await; // let the vendor's tasks finish
    let vendor_blocks = lab.sim.blocked_sources()["gw-1"].len();
    let vendor_per_min = vendor_blocks as f64 / (vendor_s / 60.0);

    // samgate: the same events (the same sources), all at once, on the same simulator.
    lab.sim.set_faults(simulator::FaultsUpdate {
        wipe_gateway: Some("gw-1".into()),
        ..Default::default()
    });
    let results = lab.results();
    let (cancel, task) = lab.pipeline().await?;
    lab.warm_up(&results).await?;
    let lines: String = (0..events).map(|i| ads_line(i, &ip(i))).collect();
    let started = Instant::now();
    lab.shim(&lines)?;
    let first_s =
        started.elapsed().as_secs_f64() + wait_for(&results, 1, Duration::from_secs(600)).await?;
    wait_for(&results, events, Duration::from_secs(1800)).await?;
    let samgate_s = started.elapsed().as_secs_f64();
    let scripts = lab.sim.state()["scripts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "samgate block")
        .count()
        - 1; // less the warm-up's
    let blocked = results
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "blocked")
        .count();
    let held = lab.sim.blocked_sources()["gw-1"].len() - 1; // less the warm-up's
    let logins = lab.sim.state()["logins"].as_u64().unwrap_or(0);
    cancel.cancel();
    task.await?;
    let samgate_per_min = blocked as f64 / (samgate_s / 60.0);
    println!("vendor: {}", lab.model());
    println!(
        "vendor script: {tried} events in {vendor_s:.0} s, {refused} refused at login (3 a minute), {vendor_blocks} rules on the gateway"
    );
    println!(
        "samgate: {events} events in {samgate_s:.1} s (first result after {first_s:.1} s), {blocked} blocked in {scripts} run-scripts, {held} rules on the gateway, {logins} logins in all"
    );
    println!(
        "vendor_blocks_per_min={vendor_per_min:.1} samgate_blocks_per_min={samgate_per_min:.0} ratio={:.0}",
        samgate_per_min / vendor_per_min.max(f64::MIN_POSITIVE)
    );
    lab.sim.stop().await;
    Ok(())
}

async fn bench_latency(
    lab: Lab,
    seconds: u64,
    rate: usize,
    new_percent: usize,
) -> anyhow::Result<()> {
    let results = lab.results();
    let (cancel, task) = lab.pipeline().await?;
    lab.warm_up(&results).await?;
    let (mut sent, mut sources) = (0usize, 0usize);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let mut lines = String::new();
        for i in 0..rate {
            let new = i * 100 < rate * new_percent;
            let source = match (new, sources) {
                (true, _) | (false, 0) => {
                    sources += 1;
                    sources - 1
                }
                (false, n) => (sent * 7 + i) % n,
            };
            lines.push_str(&ads_line(sent + i, &ip(source)));
        }
        sent += rate;
        let lab = &lab;
        tokio::task::block_in_place(|| lab.shim(&lines))?;
    }
    wait_for(&results, sent, Duration::from_secs(120)).await?;
    cancel.cancel();
    task.await?;
    // Per block: shim read → enforced, and its two parts: shim read → decided (the shim's run,
    // Kafka, consumption) and decided → enforced (batching, write-ahead, the firewall's task).
    let spans: Vec<(f64, f64, f64)> = results
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "blocked")
        .filter_map(|r| {
            let t = |k: &str| chrono::DateTime::parse_from_rfc3339(r[k].as_str()?).ok();
            let (read, decided, enforced) =
                (t("received_at")?, t("decided_at")?, t("enforced_at")?);
            let ms = |d: chrono::TimeDelta| d.num_milliseconds() as f64;
            Some((
                ms(enforced - read),
                ms(decided - read),
                ms(enforced - decided),
            ))
        })
        .collect();
    let sorted = |pick: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = spans.iter().map(pick).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    let latencies = sorted(|s| s.0);
    let (to_decided, to_enforced) = (sorted(|s| s.1), sorted(|s| s.2));
    println!(
        "latency parts: read → decided p50 {:.0} ms, p99 {:.0} ms; decided → enforced p50 {:.0} ms, p99 {:.0} ms",
        percentile(&to_decided, 0.5),
        percentile(&to_decided, 0.99),
        percentile(&to_enforced, 0.5),
        percentile(&to_enforced, 0.99)
    );
    let answered = results.lock().unwrap().len();
    println!("latency: {}", lab.model());
    println!(
        "latency: {sent} events over {seconds} s ({rate}/s, {new_percent} % new sources: {sources} sources), {answered} results, {} blocked; default settings (batch_max_delay 250 ms)",
        latencies.len()
    );
    println!(
        "p50_ms={:.0} p99_ms={:.0} max_ms={:.0} blocked={} events={sent}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0),
        latencies.len()
    );
    lab.sim.stop().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let brokers = args.get(2).expect("BROKERS").clone();
    let samgate = args.get(3).expect("SAMGATE_BINARY").clone();
    let lab = Lab::start(brokers, samgate).await?;
    match mode.as_str() {
        "vendor" => bench_vendor(lab, arg(&args, 4, 20_000), arg(&args, 5, 120)).await,
        "latency" => {
            bench_latency(
                lab,
                arg(&args, 4, 180),
                arg(&args, 5, 50),
                arg(&args, 6, 10),
            )
            .await
        }
        other => anyhow::bail!("unknown mode {other:?}: vendor or latency"),
    }
}
