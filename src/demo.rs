//! `samgate demo`: the whole of samgate on one machine with nothing installed. librdkafka's
//! in-process mock cluster stands in for Kafka, the `samgate-sim` simulators for Check Point and
//! a FortiGate, and a generator writes realistic ADS lines for three sites (scanners and brute-forcers that come
//! back, a DOS victim, a low-priority event, a protected server, an IPv6 source). The lines go
//! through the real shim ([`crate::shim::run`]) into the real pipeline ([`crate::pipeline::run`]);
//! the demo prints every result as it arrives and a summary at the end. After the second round an
//! operator unblocks one of Prague's blocks as a false positive, with a one-hour exemption
//! (`samgate unblock --exempt-for 1h`, through the pipeline): its rule leaves the gateway and the
//! address's next detection is `exempted`.
//!
//! Every site's blocks are also published as the block-list feed `estate` ([`crate::feed::run`],
//! as `samgate feed` serves it), which a data-centre firewall without SAM pulls: the demo polls
//! it as that gateway would (a bearer token, `If-None-Match`) and prints what it lists at the end.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::Message;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::report::ResultMessage;
use crate::shim::ShimOptions;
use samgate_sim::checkpoint::{self as simulator, Faults, SimulatorConfig};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long (else on Ctrl-C).
    pub duration: Option<Duration>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// Where the feed (and its own `/metrics`) is served.
    pub feed_listen: SocketAddr,
    /// Time between two rounds of ADS events.
    pub interval: Duration,
}

/// The demo's configuration: two sites routed to their own gateways on one Check Point management
/// server, a branch office behind a FortiGate, and a feed of every site's blocks. `{brokers}`,
/// `{listen}`, `{feed_listen}`, `{url}`, `{fingerprint}`, `{fg_url}`, `{fg_token}` and
/// `{fg_fingerprint}` are filled in at start.
const CONFIG: &str = r#"
[kafka]
brokers = "{brokers}"
partitions = 3

[run]
group_id = "samgate-demo"
http_listen = "{listen}"
batch_max_delay = "200ms"

[feed]
listen = "{feed_listen}"

[checkpoint.servers.hq]
url = "{url}"
user = "admin"
password = "admin123"
[checkpoint.servers.hq.tls]
fingerprint_sha256 = "{fingerprint}"

[fortigate.devices.ostrava]
url = "{fg_url}"
token = "{fg_token}"
[fortigate.devices.ostrava.tls]
fingerprint_sha256 = "{fg_fingerprint}"

[sites.prague]
targets = ["prague-edge", "estate"]
never_block = ["10.10.0.0/24"]   # Prague's server network
collectors = ["10.10.1.5"]

[sites.brno]
targets = ["brno-edge", "estate"]

[targets.prague-edge]
server = "hq"
gateways = ["prague-gw"]
mode = "fw_samp"

[targets.brno-edge]
server = "hq"
gateways = ["brno-gw-1", "brno-gw-2"]
mode = "fw_sam"

[sites.ostrava]
targets = ["ostrava-fg", "estate"]

[targets.ostrava-fg]
kind = "fortigate"
device = "ostrava"
mode = "banned_ip"

[targets.estate]
kind = "feed"
token = "demo-feed-token"
[targets.estate.pollers]
dc-firewall = "127.0.0.1"
"#;

/// The demo feed's name and the token its poller sends.
const FEED: &str = "estate";
const FEED_TOKEN: &str = "demo-feed-token";

/// One ADS detection the generator repeats.
struct Actor {
    site: &'static str,
    source: &'static str,
    method: &'static str,
    priority: &'static str,
    detail: &'static str,
    /// Appears every `every` rounds.
    every: u64,
}

const ACTORS: &[Actor] = &[
    Actor {
        site: "prague",
        source: "203.0.113.10",
        method: "SCANS",
        priority: "High",
        detail: "TCP SYN scan of 1200 ports",
        every: 1,
    },
    Actor {
        site: "prague",
        source: "198.51.100.23",
        method: "SSHDICT",
        priority: "Critical",
        detail: "812 SSH login attempts",
        every: 2,
    },
    Actor {
        site: "prague",
        source: "10.10.0.53",
        method: "SCANS",
        priority: "High",
        detail: "DNS server sweeping its clients",
        every: 3,
    },
    Actor {
        site: "prague",
        source: "10.20.0.5",
        method: "DOS",
        priority: "High",
        detail: "SYN flood towards 10.20.0.5",
        every: 2,
    },
    Actor {
        site: "brno",
        source: "203.0.113.10",
        method: "SCANS",
        priority: "High",
        detail: "TCP SYN scan of 800 ports",
        every: 1,
    },
    Actor {
        site: "brno",
        source: "2001:db8:bad::17",
        method: "RDPDICT",
        priority: "High",
        detail: "RDP password guessing",
        every: 2,
    },
    Actor {
        site: "ostrava",
        source: "203.0.113.77",
        method: "BPATTERNS",
        priority: "High",
        detail: "botnet beacon every 60 s",
        every: 1,
    },
    Actor {
        site: "brno",
        source: "10.0.5.9",
        method: "SCANS",
        priority: "Low",
        detail: "slow ping sweep",
        every: 3,
    },
];

/// One ADS standard line (15 tab-separated fields; `docs/flowmon.md`).
fn ads_line(id: u64, method: &str, priority: &str, detail: &str, source: &str) -> String {
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
    [
        &id.to_string(),
        &now,
        &now,
        method,
        "Attack",
        "Security",
        priority,
        detail,
        " ",
        "TCP",
        source,
        " ",
        "192.0.2.80",
        "edge",
        " ",
    ]
    .join("\t")
        + "\n"
}

/// The ADS lines of round `round`, per site. Each round also brings one new scanner per site.
fn round_lines(round: u64, next_id: &mut u64) -> BTreeMap<&'static str, String> {
    let mut lines: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut push = |site: &'static str, method, priority, detail, source: &str| {
        *next_id += 1;
        lines
            .entry(site)
            .or_default()
            .push_str(&ads_line(*next_id, method, priority, detail, source));
    };
    for a in ACTORS.iter().filter(|a| round % a.every == 0) {
        push(a.site, a.method, a.priority, a.detail, a.source);
    }
    let n = round % 250 + 1;
    push(
        "prague",
        "DICTATTACK",
        "High",
        "HTTP login guessing",
        &format!("192.0.2.{n}"),
    );
    push(
        "brno",
        "SCANS",
        "Medium",
        "UDP scan",
        &format!("198.18.0.{n}"),
    );
    push(
        "ostrava",
        "SSHDICT",
        "High",
        "SSH password guessing",
        &format!("100.64.7.{n}"),
    );
    lines
}

/// Runs the demo until `cancel` or `options.duration`.
pub async fn run(options: DemoOptions, cancel: CancellationToken) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka")?;
    let brokers = cluster.bootstrap_servers();
    let sim = simulator::start(SimulatorConfig {
        gateways: vec!["prague-gw".into(), "brno-gw-1".into(), "brno-gw-2".into()],
        task_duration: Duration::from_millis(500),
        faults: Faults {
            latency_ms: 20,
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    })
    .await?;
    let fortigate = samgate_sim::fortigate::start(samgate_sim::fortigate::FortiGateConfig {
        faults: samgate_sim::fortigate::Faults {
            latency_ms: 20,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let config = Config::from_toml(
        &CONFIG
            .replace("{brokers}", &brokers)
            .replace("{fg_url}", &fortigate.url)
            .replace("{fg_token}", &fortigate.token)
            .replace(
                "{fg_fingerprint}",
                fortigate.fingerprint.as_deref().unwrap_or_default(),
            )
            .replace("{listen}", &options.listen.to_string())
            .replace("{feed_listen}", &options.feed_listen.to_string())
            .replace("{url}", &sim.url)
            .replace(
                "{fingerprint}",
                sim.fingerprint.as_deref().unwrap_or_default(),
            ),
    )?
    .validate()?;
    let topics = config.kafka.topics.clone();
    for topic in [&topics.events, &topics.results, &topics.state] {
        cluster.create_topic(topic, config.kafka.partitions, 1)?;
    }
    cluster.create_topic(&topics.dlq, 1, 1)?;

    // The pipeline, as `samgate run` runs it.
    let (listening_tx, listening_rx) = tokio::sync::oneshot::channel();
    let pipeline_cancel = CancellationToken::new();
    let pipeline = tokio::spawn({
        let (config, cancel) = (config.clone(), pipeline_cancel.clone());
        async move {
            crate::pipeline::run(config, cancel, |addr| {
                let _ = listening_tx.send(addr);
            })
            .await
        }
    });
    let metrics_addr = listening_rx
        .await
        .context("the pipeline stopped before it listened")?;

    // The feed, as `samgate feed` serves it, and the data-centre firewall that pulls it.
    let (feed_listening_tx, feed_listening_rx) = tokio::sync::oneshot::channel();
    let feed_cancel = CancellationToken::new();
    let feed = tokio::spawn({
        let (config, cancel) = (config.clone(), feed_cancel.clone());
        async move {
            crate::feed::run(config, cancel, |addr| {
                let _ = feed_listening_tx.send(addr);
            })
            .await
        }
    });
    let feed_addr = feed_listening_rx
        .await
        .context("the feed server stopped before it listened")?;
    let feed_url = format!("http://{feed_addr}/feeds/{FEED}");
    let poller = tokio::spawn(poll_feed(
        feed_url.clone(),
        options.interval,
        feed_cancel.clone(),
    ));

    println!("samgate demo: Flowmon ADS at three sites → Kafka (in-process) → samgate run → Check Point and FortiGate (simulated)");
    println!("  sites        prague → prague-gw (fw samp) · brno → brno-gw-1, brno-gw-2 (fw sam) · ostrava → FortiGate ostrava (banned IP list)");
    println!("               and every site → the feed estate (a block list that gateways pull)");
    println!("  never block  10.10.0.0/24 at prague, the collectors, the management server, the FortiGate");
    println!("  metrics      http://{metrics_addr}/metrics");
    println!("  feed         {feed_url} (every site's blocks; token {FEED_TOKEN}), pulled by dc-firewall");
    println!("  feed metrics http://{feed_addr}/metrics");
    println!(
        "  simulators   Check Point {} (admin / admin123) · FortiGate {}",
        sim.url, fortigate.url
    );
    println!(
        "  stop         {}",
        match options.duration {
            Some(d) => format!("after {}, or Ctrl-C", humantime::format_duration(d)),
            None => "Ctrl-C".into(),
        }
    );
    println!();
    println!(
        "{:<8}  {:<7}  {:<18}  {:<10}  {:<10}  {:<19}  {:<14}  reason",
        "time", "site", "source", "method", "outcome", "gateways", "expires"
    );

    // The viewer: every result, as downstream consumers see it.
    let viewer: StreamConsumer = crate::kafka::base_config(&config.kafka)
        .set("group.id", "samgate-demo-viewer")
        .set("auto.offset.reset", "earliest")
        .create()?;
    viewer.subscribe(&[&topics.results])?;

    let spool = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let generator = tokio::spawn(generate(
        config.clone(),
        spool.path().to_owned(),
        options.interval,
        stop.clone(),
    ));
    let mut table = Table::new(&config);

    // Live: print results until Ctrl-C or the duration.
    let deadline = async {
        match options.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = &mut deadline => break,
            message = viewer.recv() => table.show(message?.payload()),
        }
    }

    // Stop the ADS side, then wait (bounded) for every result of every event already sent.
    stop.cancel();
    let (sent, commanded) = generator.await.context("the generator failed")??;
    let drain = tokio::time::Instant::now() + Duration::from_secs(10);
    // The operator's unblock (sent after round 2) has the exemption's result and one removal
    // per target of the site.
    let manual = match commanded {
        true => 1 + table.targets.get("prague").copied().unwrap_or(0) as u64,
        false => 0,
    };
    while table.decided < sent || table.manual < manual {
        tokio::select! {
            _ = tokio::time::sleep_until(drain) => break,
            message = viewer.recv() => table.show(message?.payload()),
        }
    }
    pipeline_cancel.cancel();
    pipeline.await.context("the pipeline panicked")??;
    // The feed is rebuilt a moment after the last state record; then one last fetch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = fetch_feed(&reqwest::Client::new(), &feed_url, None).await;
    feed_cancel.cancel();
    let polls = poller.await.context("the feed poller panicked")?;
    feed.await.context("the feed server panicked")??;
    print_summary(sent, &table, &sim.state(), &fortigate.state());
    print_feed(listed, &polls);
    sim.stop().await;
    fortigate.stop().await;
    drop(viewer); // every Kafka client goes before the in-process cluster does
    drop(cluster);
    Ok(())
}

/// What the demo's poller saw of the feed.
#[derive(Debug, Default)]
struct Polls {
    full: u64,
    not_modified: u64,
    failed: u64,
}

/// One fetch of the feed.
enum Fetched {
    Full { body: String, etag: Option<String> },
    NotModified,
}

/// Fetches the feed (a 503 while it loads, or any other failure, is an error).
async fn fetch_feed(
    client: &reqwest::Client,
    url: &str,
    etag: Option<&str>,
) -> anyhow::Result<Fetched> {
    let mut request = client.get(url).bearer_auth(FEED_TOKEN);
    if let Some(etag) = etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    let response = request.send().await?;
    if response.status() == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::NotModified);
    }
    let response = response.error_for_status()?;
    let etag = (response.headers().get(reqwest::header::ETAG))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await?;
    Ok(Fetched::Full { body, etag })
}

/// Pulls the feed every `interval`, as a gateway's feed object does (a real one every few
/// minutes), sending the last `ETag` so that an unchanged feed costs a 304.
async fn poll_feed(url: String, interval: Duration, stop: CancellationToken) -> Polls {
    let client = reqwest::Client::new();
    let (mut polls, mut etag) = (Polls::default(), None::<String>);
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return polls,
            _ = tick.tick() => {}
        }
        match fetch_feed(&client, &url, etag.as_deref()).await {
            Ok(Fetched::Full { etag: tag, .. }) => (polls.full, etag) = (polls.full + 1, tag),
            Ok(Fetched::NotModified) => polls.not_modified += 1,
            Err(_) => polls.failed += 1, // 503 while the feed loads
        }
    }
}

/// Feeds a round of ADS lines per site through the shim every `interval` (and the operator's
/// unblock after round 2); returns the number of events published when `stop` fires, and
/// whether the unblock was sent.
async fn generate(
    config: Config,
    spool: std::path::PathBuf,
    interval: Duration,
    stop: CancellationToken,
) -> anyhow::Result<(u64, bool)> {
    let (mut round, mut next_id, mut sent) = (0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(interval);
    let operator = crate::kafka::producer(&config.kafka, Duration::from_secs(5))?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok((sent, round >= 2)),
            _ = tick.tick() => {}
        }
        round += 1;
        // Each site's ADS runs its own shim, at the same time as the others.
        let runs =
            round_lines(round, &mut next_id)
                .into_iter()
                .map(|(site, lines)| {
                    let options = ShimOptions {
                        kafka: config.kafka.clone(),
                        site: site.to_owned(),
                        collector: format!("ads-{site}"),
                        events_topic: config.kafka.topics.events.clone(),
                        dlq_topic: config.kafka.topics.dlq.clone(),
                        spool_dirs: vec![spool.join(site)],
                        delivery_timeout: Duration::from_secs(5),
                        max_line_bytes: config.shim.max_line_bytes,
                        flowmon_api: None,
                    };
                    async move {
                        crate::shim::run(&options, std::io::Cursor::new(lines.into_bytes())).await
                    }
                });
        for report in futures_util::future::join_all(runs).await {
            sent += report.events;
        }
        if round == 2 {
            // What `samgate unblock --site prague 198.51.100.23 --exempt-for 1h` sends.
            let mut command = crate::command::Command::new(crate::command::Action::Unblock);
            command.site = Some("prague".into());
            command.ip = Some(UNBLOCKED.parse().expect("an address"));
            command.exempt_for_s = Some(3600);
            command.actor = Some("demo".into());
            command.reason = Some("false positive: our own password auditor".into());
            let payload = serde_json::to_string(&command).expect("commands serialize");
            let key = command.key();
            let record = rdkafka::producer::FutureRecord::to(&config.kafka.topics.events)
                .key(&key)
                .payload(&payload);
            operator
                .send(record, Duration::from_secs(5))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("cannot send the demo's unblock: {e}"))?;
        }
    }
}

/// The address the demo's operator unblocks (and exempts) after the second round.
const UNBLOCKED: &str = "198.51.100.23";

/// The live table and its counts.
struct Table {
    /// Targets per site: a detection that is not filtered has one result per target.
    targets: BTreeMap<String, usize>,
    /// Results so far per ADS event id, until the event has all of its results.
    waiting: std::collections::HashMap<String, usize>,
    /// ADS events with all of their results.
    decided: u64,
    /// Results of ADS events.
    results: u64,
    /// Results of operator commands.
    manual: u64,
    outcomes: BTreeMap<&'static str, u64>,
}

impl Table {
    fn new(config: &Config) -> Self {
        Self {
            targets: (config.sites.iter())
                .map(|(name, site)| (name.clone(), site.targets.len()))
                .collect(),
            waiting: Default::default(),
            decided: 0,
            results: 0,
            manual: 0,
            outcomes: BTreeMap::new(),
        }
    }

    fn show(&mut self, payload: Option<&[u8]>) {
        let Some(result) = payload.and_then(|p| serde_json::from_slice::<ResultMessage>(p).ok())
        else {
            return;
        };
        let manual = result.origin == crate::pipeline::dedupe::Origin::Manual;
        match manual {
            true => self.manual += 1,
            false => self.results += 1,
        }
        if !manual {
            let all = match result.target {
                None => 1, // filtered: one result for the event
                Some(_) => self.targets.get(&result.site).copied().unwrap_or(1),
            };
            for id in &result.event_ids {
                let seen = self.waiting.entry(id.clone()).or_default();
                *seen += 1;
                if *seen == all {
                    self.waiting.remove(id);
                    self.decided += 1;
                }
            }
        }
        *self.outcomes.entry(result.outcome.as_str()).or_default() += 1;
        let clock = |t: &str| t.get(11..19).unwrap_or("-").to_owned();
        let expires = match (&result.expires_at, result.duration_s) {
            (Some(at), Some(d)) => format!(
                "{} ({})",
                clock(at),
                humantime::format_duration(Duration::from_secs(d))
            ),
            (Some(at), None) => clock(at),
            _ => match &result.exempt_until {
                Some(until) => format!("until {}", clock(until)),
                None => "-".into(),
            },
        };
        let mut reason = result.reason.clone();
        if reason.chars().count() > 60 {
            reason = reason.chars().take(59).collect::<String>() + "…";
        }
        println!(
            "{:<8}  {:<7}  {:<18}  {:<10}  {:<10}  {:<19}  {:<14}  {}",
            clock(&crate::pipeline::report::timestamp(result.decided_at)),
            result.site,
            result.ip.to_string(),
            match manual {
                true => "operator",
                false => result.method.as_deref().unwrap_or("-"),
            },
            result.outcome.as_str(),
            if result.gateways.is_empty() {
                "-".to_owned()
            } else {
                result.gateways.join(",")
            },
            expires,
            reason
        );
        let _ = std::io::stdout().flush();
    }
}

fn print_feed(listed: anyhow::Result<Fetched>, polls: &Polls) {
    let body = match listed {
        Ok(Fetched::Full { body, .. }) => body,
        Ok(Fetched::NotModified) => String::new(), // never: the last fetch sends no ETag
        Err(e) => {
            println!("  feed         {FEED}: cannot fetch it at the end: {e:#}");
            return;
        }
    };
    let ips: Vec<&str> = body.lines().collect();
    println!(
        "  feed         {FEED}: {} address(es) listed: {}",
        ips.len(),
        ips.join(", ")
    );
    println!(
        "               dc-firewall pulled it {} time(s): {} full, {} not modified (304), {} before it was ready",
        polls.full + polls.not_modified + polls.failed,
        polls.full,
        polls.not_modified,
        polls.failed
    );
}

fn print_summary(sent: u64, table: &Table, state: &Value, fortigate: &Value) {
    println!();
    println!(
        "summary: {sent} ADS events sent, {} decided, {} results (one per target)",
        table.decided, table.results
    );
    println!(
        "  operator     1 unblock with a 1h exemption ({UNBLOCKED} at prague), {} result(s)",
        table.manual
    );
    let outcomes: Vec<String> = [
        "blocked",
        "duplicate",
        "filtered",
        "suppressed",
        "exempted",
        "unblocked",
        "failed",
    ]
    .iter()
    .map(|o| format!("{o} {}", table.outcomes.get(o).copied().unwrap_or(0)))
    .collect();
    println!("  outcomes     {}", outcomes.join(" · "));
    let calls = state["calls"].as_object().cloned().unwrap_or_default();
    let total: u64 = calls.values().filter_map(Value::as_u64).sum();
    let detail: Vec<String> = calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "  API calls    {total} ({}); logins {}",
        detail.join(", "),
        state["logins"]
    );
    println!("  rules on the gateways");
    for (name, gateway) in state["gateways"].as_object().into_iter().flatten() {
        let mut sources: Vec<String> = Vec::new();
        for rule in gateway["sam"].as_array().into_iter().flatten() {
            let words: Vec<&str> = rule["criteria"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            sources.push(format!("fw sam {}", words.join(" ")));
        }
        for rule in gateway["samp"].as_array().into_iter().flatten() {
            let filter = &rule["filter"];
            let source = filter["src_ip_addr"]
                .as_str()
                .or(filter["source"].as_str())
                .unwrap_or("?")
                .trim_start_matches("range:");
            sources.push(format!("fw samp {source}"));
        }
        println!(
            "    {name:<10} {} rule(s): {}",
            sources.len(),
            sources.join(", ")
        );
    }
    let calls = fortigate["calls"].as_object().cloned().unwrap_or_default();
    let detail: Vec<String> = calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  FortiGate    API calls: {}", detail.join(", "));
    for (vdom, bans) in fortigate["banned"].as_object().into_iter().flatten() {
        let ips: Vec<String> = bans
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["ip_address"].as_str())
            .map(|ip| format!("ban {ip}"))
            .collect();
        println!(
            "    {:<10} {} rule(s): {}",
            format!("fg/{vdom}"),
            ips.len(),
            ips.join(", ")
        );
    }
}
