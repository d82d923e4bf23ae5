//! `scripts/bench pipeline`: a detection storm through the real broker, the real shim and the
//! pipeline into the Check Point simulator with realistic API latency (or, with
//! `BENCH_FIREWALL=fortigate`, into the FortiGate simulator's banned-IP list: `scripts/bench
//! pipeline --fortigate`). The Check Point simulator runs the honest firewall model (a cost per
//! gateway process and batch line, two scripts at once per gateway) unless `BENCH_MODEL=flat`
//! (every task the base); the targets are `fw_samp` (the mode for throughput) unless
//! `BENCH_MODE=fw_sam`; the summary says which.
//! Prints figures; asserts nothing about time.
//!
//! Usage: bench_pipeline BROKERS SAMGATE_BINARY [EVENTS] [SOURCES] [SITES] [LATENCY_MS] [TASK_MS]
//!        [BATCH_MAX_RULES] [SERVER_CONCURRENCY]
//! (TASK_MS applies to Check Point only: a FortiGate call has no task.)
//! `BENCH_TIMELINE=1` prints each result's arrival time and outcome to stderr.
//! BROKERS `mock` runs the storm on librdkafka's mock cluster in this process instead (`scripts/bench
//! pipeline --mock-broker`): a broker whose cost is per batch of records, not per record as
//! tansu's, to show where samgate's own bound is (it keeps everything in memory and is no
//! production broker; its CPU is its thread's).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use samgate::config::Config;
use samgate_sim::checkpoint::{self as simulator, Faults, SimulatorConfig};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Reads `topic` from the start until `count` messages, handing each payload to `on_message`;
/// returns the seconds it took and the seconds until the first message. Panics when fewer
/// than `count` arrive within `limit`.
fn drain(
    brokers: &str,
    topic: &str,
    count: usize,
    limit: Duration,
    mut on_message: impl FnMut(&[u8]),
) -> (f64, f64) {
    // The fetch settings `samgate run` uses, so the raw rate is the same consumer's.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .expect("consumer");
    let started = Instant::now();
    let mut partitions = 0;
    while partitions == 0 {
        if let Ok(m) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            partitions = m.topics().first().map_or(0, |t| t.partitions().len());
        }
        if partitions == 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut list = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let (mut seen, mut first) = (0, None);
    while seen < count && started.elapsed() < limit {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(|| started.elapsed().as_secs_f64());
            on_message(m.payload().unwrap_or_default());
            seen += 1;
        }
    }
    // A rate over messages not seen would be a figure not measured.
    assert_eq!(
        seen, count,
        "{topic}: only {seen} of {count} messages within {limit:?}"
    );
    let total = started.elapsed().as_secs_f64();
    (total, first.unwrap_or(total))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(
        !sorted.is_empty(),
        "no samples: nothing to take a percentile of"
    );
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU time (user + system) of process `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) from a `/proc/.../stat` file, in seconds.
fn cpu_seconds_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Partitions of each topic on the mock cluster.
const MOCK_PARTITIONS: i32 = 64;

/// CPU time of this process's threads named `name`, in seconds.
fn thread_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .map(|t| {
            let pid = t.file_name().to_string_lossy().parse().unwrap_or(0);
            cpu_seconds_of(&format!("/proc/self/task/{pid}/stat"))
        })
        .sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut brokers = args.get(1).expect("BROKERS").clone();
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let topic = |name: &str| format!("bench-{name}-{tag}");
    // librdkafka's mock cluster has no CreateTopics: the topics are made here. It keeps at most
    // 5 MiB per partition (`rdkafka_mock.c`, `max_size`) and drops the oldest beyond, so the
    // storm's topics get 64 partitions (under 3 MiB each) rather than the default 12.
    let mock = match brokers.as_str() {
        "mock" => {
            let mock = rdkafka::mocking::MockCluster::new(1)?;
            for name in ["events", "results", "dlq", "state"] {
                mock.create_topic(&topic(name), MOCK_PARTITIONS, 1)?;
            }
            brokers = mock.bootstrap_servers();
            Some(mock)
        }
        _ => None,
    };
    let broker_cpu = |pid: Option<u32>| match (&mock, pid) {
        (Some(_), _) => thread_cpu_seconds("rdk:mock"),
        (None, Some(pid)) => cpu_seconds(pid),
        (None, None) => 0.0,
    };
    let samgate = args.get(2).expect("SAMGATE_BINARY").clone();
    let events: usize = arg(&args, 3, 200_000);
    let sources: usize = arg(&args, 4, 20_000);
    let sites: usize = arg(&args, 5, 3);
    let latency_ms: u64 = arg(&args, 6, 20);
    let task_ms: u64 = arg(&args, 7, 1000);
    let fortigate = std::env::var("BENCH_FIREWALL").is_ok_and(|f| f == "fortigate");
    let fg = samgate_sim::fortigate::start(samgate_sim::fortigate::FortiGateConfig {
        faults: samgate_sim::fortigate::Faults {
            latency_ms,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;

    // The firewall model (docs/checkpoint.md): honest unless `BENCH_MODEL=flat`.
    let model = match std::env::var("BENCH_MODEL").as_deref() {
        Ok("flat") => simulator::FirewallModel::flat(),
        _ => simulator::FirewallModel::honest(),
    };
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_millis(task_ms),
        model,
        faults: Faults {
            latency_ms,
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    })
    .await?;
    let (events_topic, results_topic) = (topic("events"), topic("results"));

    // The storm: `sources` distinct addresses per site, most events repeats.
    let dir = tempfile::tempdir()?;
    let mut feed_seconds = 0.0;
    for s in 0..sites {
        let mut text = String::new();
        for i in (s..events).step_by(sites) {
            let n = i % sources;
            let ip = format!("10.{}.{}.{}", n / 65536, n / 256 % 256, n % 256);
            text.push_str(&format!(
                "{i}\t2026-11-20 10:13:02\t \tSCANS\tPort scanning\tSecurity\tHigh\tstorm\t \tTCP\t{ip}\t \t \tedge\t \n"
            ));
        }
        let input = dir.path().join(format!("site{s}.tsv"));
        std::fs::write(&input, text)?;
        let started = Instant::now();
        let status = std::process::Command::new(&samgate)
            .args([
                "shim",
                "--site",
                &format!("site{s}"),
                "--brokers",
                &brokers,
                "--topic",
                &events_topic,
            ])
            .args([
                "--dlq-topic",
                &topic("dlq"),
                "--delivery-timeout",
                "120s",
                "--log",
                "warn",
            ])
            .args([
                "--spool-dir",
                dir.path().join(format!("spool{s}")).to_str().unwrap(),
            ])
            .stdin(std::fs::File::open(&input)?)
            .status()?;
        anyhow::ensure!(status.success(), "shim failed");
        feed_seconds += started.elapsed().as_secs_f64();
    }

    let (raw_seconds, _) = drain(
        &brokers,
        &events_topic,
        events,
        Duration::from_secs(600),
        |_| {},
    );
    let raw_consume_per_s = events as f64 / raw_seconds;

    // Optional batch size and concurrency per server; the configuration's defaults otherwise.
    let mut run_extra = String::new();
    if let Some(rules) = args.get(8) {
        run_extra.push_str(&format!("batch_max_rules = {rules}\n"));
    }
    if let Some(concurrency) = args.get(9) {
        run_extra.push_str(&format!("server_concurrency = {concurrency}\n"));
    }
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut toml = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\nevents = \"{events_topic}\"\nresults = \"{results_topic}\"\ndlq = \"{}\"\nstate = \"{}\"\n[run]\ngroup_id = \"bench-{tag}\"\nhttp_listen = \"127.0.0.1:{metrics_port}\"\n{run_extra}[checkpoint.servers.hq]\nurl = \"{}\"\nuser = \"admin\"\npassword = \"admin123\"\n[checkpoint.servers.hq.tls]\nfingerprint_sha256 = \"{}\"\n[fortigate.devices.fg]\nurl = \"{}\"\ntoken = \"{}\"\n[fortigate.devices.fg.tls]\nfingerprint_sha256 = \"{}\"\n",
        topic("dlq"),
        topic("state"),
        sim.url,
        sim.fingerprint.as_deref().unwrap(),
        fg.url,
        fg.token,
        fg.fingerprint.as_deref().unwrap(),
    );
    // The Check Point targets' mode: fw_samp unless `BENCH_MODE` says otherwise.
    let sam_mode = std::env::var("BENCH_MODE").unwrap_or_else(|_| "fw_samp".into());
    let target = match fortigate {
        true => "kind = \"fortigate\"\ndevice = \"fg\"".to_owned(),
        false => format!("server = \"hq\"\ngateways = [\"gw-1\"]\nmode = \"{sam_mode}\""),
    };
    for s in 0..sites {
        toml.push_str(&format!(
            "[targets.t{s}]\n{target}\n[sites.site{s}]\ntargets = [\"t{s}\"]\n"
        ));
    }
    // BENCH_TOML: more configuration, appended (for experiments: `[kafka.properties]`, ...).
    toml.push_str(&std::env::var("BENCH_TOML").unwrap_or_default());
    Config::from_toml(&toml)?.validate()?; // fail here, not in the child, on a bad setting
    let config_path = dir.path().join("samgate.toml");
    std::fs::write(&config_path, &toml)?;

    // `samgate run` in its own process, so its peak memory is its own.
    let broker_pid: Option<u32> = std::env::var("BENCH_BROKER_PID")
        .ok()
        .and_then(|p| p.parse().ok());
    let broker_cpu_before = broker_cpu(broker_pid);
    let started = Instant::now();
    let run_started = chrono::Utc::now();
    let mut pipeline = std::process::Command::new(&samgate)
        .args([
            "run",
            "--config",
            config_path.to_str().unwrap(),
            "--log",
            "warn",
        ])
        .spawn()?;
    if std::env::var_os("BENCH_TIMELINE").is_some() {
        // Every 5 s: what is in flight and how far behind the consumer is.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Ok(text) =
                    reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await
                else {
                    continue;
                };
                let text = text.text().await.unwrap_or_default();
                let pick = |name: &str| {
                    text.lines()
                        .find(|l| l.starts_with(name))
                        .and_then(|l| l.rsplit(' ').next())
                        .unwrap_or("-")
                        .to_owned()
                };
                eprintln!(
                    "M {:.0} in_flight={} lag={} tracked={} concurrency={} batch={}",
                    started.elapsed().as_secs_f64(),
                    pick("samgate_enforcement_queue_depth"),
                    pick("samgate_consumer_lag_messages"),
                    pick("samgate_tracked_blocks"),
                    pick("samgate_server_concurrency{"),
                    pick("samgate_server_batch_rules{")
                );
            }
        });
    }
    let mut blocked = 0usize;
    let mut latencies = Vec::new();
    // Repeats (duplicates need no firewall): when each was decided, in seconds since `samgate
    // run` started (the whole storm waits in the topic by then).
    let mut repeats = Vec::new();
    let mut answered = BTreeSet::new();
    let (_, first_result_s) = tokio::task::block_in_place(|| {
        drain(
            &brokers,
            &results_topic,
            events,
            Duration::from_secs(1800),
            |payload| {
                let v: serde_json::Value = serde_json::from_slice(payload).expect("result JSON");
                if std::env::var_os("BENCH_TIMELINE").is_some() {
                    eprintln!("T {:.1} {}", started.elapsed().as_secs_f64(), v["outcome"]);
                }
                for id in v["event_ids"].as_array().into_iter().flatten() {
                    answered.insert(id.as_str().unwrap_or_default().to_owned());
                }
                if v["outcome"] == "duplicate" {
                    let t = |k: &str| {
                        chrono::DateTime::parse_from_rfc3339(v[k].as_str().unwrap_or_default()).ok()
                    };
                    if let Some(decided) = t("decided_at") {
                        repeats
                            .push((decided.to_utc() - run_started).num_milliseconds() as f64 / 1e3);
                    }
                }
                if v["outcome"] == "blocked" {
                    blocked += 1;
                    let t = |k: &str| {
                        chrono::DateTime::parse_from_rfc3339(v[k].as_str().unwrap_or_default()).ok()
                    };
                    if let (Some(received), Some(enforced)) = (t("received_at"), t("enforced_at")) {
                        latencies.push((enforced - received).num_milliseconds() as f64);
                    }
                }
            },
        )
    });
    let decided_seconds = started.elapsed().as_secs_f64();
    let stages = batch_stages(metrics_port).await.unwrap_or_default();
    let limits = adaptive_limits(metrics_port).await.unwrap_or_default();
    let rss_mib = peak_rss_mib(pipeline.id());
    let cpu_s = cpu_seconds(pipeline.id());
    let broker_cpu_s = broker_cpu(broker_pid) - broker_cpu_before;
    std::process::Command::new("kill")
        .args(["-TERM", &pipeline.id().to_string()])
        .status()?;
    anyhow::ensure!(pipeline.wait()?.success(), "samgate run failed");

    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    repeats.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let state_url = match fortigate {
        true => &fg.url,
        false => &sim.url,
    };
    let state: serde_json::Value = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()?
        .get(format!("{state_url}/sim/state"))
        .send()
        .await?
        .json()
        .await?;
    let api_calls: u64 = state["calls"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap_or(0))
        .sum();
    let blocks_per_s = blocked as f64 / decided_seconds;
    let firewall = match fortigate {
        true => "FortiGate banned-IP list".to_owned(),
        false => format!(
            "Check Point ({sam_mode}), firewall model: task {task_ms} ms + {:?} per fw process + {:?} per fw samp batch line, {} scripts at once per gateway",
            model.per_process, model.per_batch_line, model.gateway_cores
        ),
    };
    println!(
        "pipeline: {events} events ({sources} sources x {sites} sites) fed in {feed_seconds:.1} s; results for {} events in {decided_seconds:.1} s (first after {first_result_s:.1} s; samgate run used {cpu_s:.1} s of CPU, the broker {broker_cpu_s:.1} s); {blocked} blocked; {firewall}, API latency {latency_ms} ms",
        answered.len()
    );
    println!("api calls: {:?}", state["calls"]);
    println!("batch stages (samgate_batch_stage_seconds, sum over batches): {stages}");
    println!("adaptive limits at the end (batches at once / rules per batch, by server): {limits}");
    let broker = match &mock {
        Some(_) => format!("librdkafka's mock cluster ({MOCK_PARTITIONS} partitions per topic)"),
        None => "tansu (SQLite)".to_owned(),
    };
    println!("broker: {broker}");
    println!(
        "firewall={} events_per_s={:.0} raw_consume_per_s={raw_consume_per_s:.0} blocks_per_s={blocks_per_s:.0} api_calls_per_blocked_ip={:.4} logins={} p50_ms={:.0} p99_ms={:.0} repeats_decided_p50_s={:.1} repeats_decided_p99_s={:.1} rss_mib={:.1}",
        if fortigate { "fortigate" } else { "checkpoint" },
        events as f64 / decided_seconds,
        api_calls as f64 / blocked.max(1) as f64,
        state["logins"].as_u64().unwrap_or(0),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&repeats, 0.5),
        percentile(&repeats, 0.99),
        rss_mib
    );
    sim.stop().await;
    fg.stop().await;
    Ok(())
}

/// The adaptive limits per server now, from `/metrics`.
async fn adaptive_limits(port: u16) -> anyhow::Result<String> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let value = |name: &str, server: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{server=\"{server}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("-")
            .to_owned()
    };
    let servers: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("samgate_server_concurrency{server=\""))
        .filter_map(|r| r.split('"').next())
        .collect();
    Ok(servers
        .iter()
        .map(|s| {
            let (c, b) = (
                value("samgate_server_concurrency", s),
                value("samgate_server_batch_rules", s),
            );
            format!("{s}={c}/{b}")
        })
        .collect::<Vec<_>>()
        .join(" "))
}

/// Where the batches' time went: each stage's total seconds and count, from `/metrics`.
async fn batch_stages(port: u16) -> anyhow::Result<String> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let mut parts = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("samgate_batch_stage_seconds_sum{") else {
            continue;
        };
        let stage = rest
            .split("stage=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        let seconds: f64 = rest
            .rsplit(' ')
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0.0);
        let count = text
            .lines()
            .find(|l| {
                l.starts_with("samgate_batch_stage_seconds_count{")
                    && l.contains(&format!("stage=\"{}\"", stage.unwrap_or("")))
            })
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("0")
            .to_owned();
        parts.push(format!("{}={seconds:.1}s/{count}", stage.unwrap_or("?")));
    }
    Ok(parts.join(" "))
}
