//! Crash and rebalance: `samgate run` as real processes in one consumer group, killed and
//! stopped mid-stream, against the real broker and the Check Point simulator.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use samgate_sim::checkpoint::{self as simulator, RunningSimulator, SimulatorConfig};
use serde_json::Value;

fn write_config(
    brokers: &str,
    dir: &Path,
    sim: &RunningSimulator,
    topics: &[String; 4],
    group: &str,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
partitions = 6
[kafka.topics]
events = "{}"
results = "{}"
dlq = "{}"
state = "{}"
[run]
group_id = "{group}"
http_listen = "127.0.0.1:0"
batch_max_delay = "50ms"
shutdown_timeout = "10s"
{extra}
[checkpoint.servers.hq]
url = "{url}"
user = "admin"
password = "admin123"
[checkpoint.servers.hq.tls]
fingerprint_sha256 = "{fp}"
[targets.edge]
server = "hq"
gateways = ["gw-1"]
[sites.prague]
targets = ["edge"]
"#,
        topics[0],
        topics[1],
        topics[2],
        topics[3],
        url = sim.url,
        fp = sim.fingerprint.as_deref().unwrap(),
    );
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_run(config: &Path, log: &Path) -> KillOnDrop {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_samgate"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// Stops a replica with SIGTERM and waits for it to exit 0 (its log beside the others in `logs`).
fn terminate(child: KillOnDrop, logs: &Path) {
    assert!(stop(child, logs).success(), "graceful stop exits 0");
}

/// Sends a replica SIGTERM and waits for it to exit.
fn stop(mut child: KillOnDrop, logs: &Path) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "samgate run did not stop on SIGTERM; its logs:\n{}",
                logs_of(logs)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `topic` holds `at_least` messages; on timeout, fails with the replicas' logs.
fn wait_for(topic: &str, at_least: usize, logs: &Path) -> Vec<Received> {
    let got = read_topic_within(topic, at_least, Duration::from_secs(180));
    if got.len() < at_least {
        panic!(
            "{topic}: {} of {at_least} messages\n{}",
            got.len(),
            logs_of(logs)
        );
    }
    got
}

/// The replicas' logs in `logs`, without the result lines.
fn logs_of(logs: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(logs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(&path).unwrap();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("outcome=")).collect();
            text.push_str(&format!("--- {}\n{}\n", path.display(), tail.join("\n")));
        }
    }
    text
}

/// Waits until the gateways hold `at_least` rules (read from the simulator in this process, so
/// the wait ends right after a batch lands, long before the stream is done).
async fn wait_for_rules(sim: &simulator::RunningSimulator, at_least: usize) {
    let started = Instant::now();
    while sim.history().values().map(Vec::len).sum::<usize>() < at_least {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "samgate run did not start enforcing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ads(id: u32, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        " ",
        "SCANS",
        "Port scanning",
        "Security",
        "High",
        " ",
        " ",
        "TCP",
        source,
        " ",
        " ",
        " ",
        " ",
    ]
    .join("\t")
}

/// Feeds lines through the shim, as ADS does: many events per record batch, so a replica that
/// stopped resumes in the middle of one.
fn feed(topics: &[String; 4], lines: &[String]) {
    feed_to(&brokers(), topics, lines);
}

fn feed_to(brokers: &str, topics: &[String; 4], lines: &[String]) {
    let spool = tempfile::tempdir().unwrap();
    let out = samgate(
        &[
            "shim",
            "--site",
            "prague",
            "--brokers",
            brokers,
            "--topic",
            &topics[0],
            "--dlq-topic",
            &topics[2],
            "--spool-dir",
            spool.path().join("spool").to_str().unwrap(),
        ],
        (lines.join("\n") + "\n").as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Rules each address got on gw-1, counted by the gateway; a rule that arrived while another for
/// the same address was active fails the test, with the scripts that carried it.
async fn blocks_sent(sim: &RunningSimulator) -> BTreeMap<String, usize> {
    let mut sent = BTreeMap::new();
    let mut twice = Vec::new();
    for add in &sim.history()["gw-1"] {
        let ip = add.source.expect("single-address rules").to_string();
        *sent.entry(ip.clone()).or_insert(0) += 1;
        if add.while_active {
            twice.push(ip);
        }
    }
    if !twice.is_empty() {
        let state: Value = sim_state(&sim.url).await;
        for script in state["scripts"].as_array().unwrap() {
            let text = script["script"].as_str().unwrap();
            for ip in twice
                .iter()
                .filter(|ip| text.contains(&format!("src {ip}")))
            {
                eprintln!("{ip}: {} at {} ms", script["name"], script["at_ms"]);
            }
        }
        panic!("rules sent while one was active: {twice:?}");
    }
    sent
}

fn event_ids(topic: &str, count: usize) -> BTreeSet<String> {
    read_topic(topic, count)
        .into_iter()
        .map(|m| m.value["id"].as_str().unwrap().to_owned())
        .collect()
}

fn answered(results: &[Received]) -> BTreeSet<String> {
    results
        .iter()
        .flat_map(|r| {
            r.value["event_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_owned())
        })
        .collect()
}

fn topics() -> [String; 4] {
    [
        unique("events"),
        unique("results"),
        unique("dlq"),
        unique("state"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_answers_every_event_and_sends_no_rule_twice() {
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_millis(400),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let topics = topics();
    // Small batches, one at a time: the stream takes long enough to be killed in the middle.
    let config = write_config(
        &brokers(),
        dir.path(),
        &sim,
        &topics,
        &unique("group"),
        "batch_max_rules = 10\nserver_concurrency = 1\n",
    );
    let lines: Vec<String> = (0..400u32)
        .map(|i| ads(i, &format!("198.18.0.{}", i % 200 + 1)))
        .collect();
    feed(&topics, &lines);

    let first = spawn_run(&config, &dir.path().join("first.log"));
    wait_for_rules(&sim, 10).await;
    let mut first = first;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let before = read_topic(&topics[1], 400).len();
    let committed_at_kill = {
        use rdkafka::consumer::Consumer;
        let group = std::fs::read_to_string(&config)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("group_id"))
            .unwrap()
            .split('"')
            .nth(1)
            .unwrap()
            .to_owned();
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..12 {
            tpl.add_partition(&topics[0], p);
        }
        format!(
            "{:?}",
            c.committed_offsets(tpl, Duration::from_secs(10)).map(|t| t
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect::<Vec<_>>())
        )
    };
    assert!(before < 400, "killed mid-stream ({before} results so far)");

    let second = spawn_run(&config, &dir.path().join("second.log"));
    let all_events = event_ids(&topics[0], 400);
    assert_eq!(all_events.len(), 400);
    // Redelivered events may be answered twice; wait until every event is answered.
    let started = Instant::now();
    let results = loop {
        let results = wait_for(&topics[1], 400, dir.path());
        let answered = answered(&results);
        let missing: Vec<_> = all_events.difference(&answered).collect();
        if missing.is_empty() {
            break results;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let events = read_topic(&topics[0], 400);
            let where_: Vec<String> = events
                .iter()
                .filter(|e| {
                    missing
                        .iter()
                        .any(|m| *m == e.value["id"].as_str().unwrap())
                })
                .map(|e| {
                    format!(
                        "p{} @{} {} ip {}",
                        e.partition,
                        e.offset,
                        e.value["flowmon"]["event_id"],
                        e.value["flowmon"]["source"]
                    )
                })
                .collect();
            eprintln!("COMMITTED AT KILL {committed_at_kill}");
            let ips: Vec<String> = events
                .iter()
                .filter(|e| {
                    missing
                        .iter()
                        .any(|m| *m == e.value["id"].as_str().unwrap())
                })
                .map(|e| format!("ip={}", e.value["flowmon"]["source"].as_str().unwrap()))
                .collect();
            for (name, log) in [
                (
                    "first",
                    std::fs::read_to_string(dir.path().join("first.log")).unwrap(),
                ),
                (
                    "second",
                    std::fs::read_to_string(dir.path().join("second.log")).unwrap(),
                ),
            ] {
                for line in log
                    .lines()
                    .filter(|l| ips.iter().any(|ip| l.contains(&format!("{ip} "))))
                {
                    eprintln!("IPLOG {name}: {line}");
                }
                for line in log.lines().filter(|l| {
                    l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("verified")
                        || l.contains("panic")
                }) {
                    eprintln!("WARNLOG {name}: {line}");
                }
            }
            let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
            let first_log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
            let interesting: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("outcome=\"duplicate\""))
                .collect();
            let first_interesting: Vec<&str> = first_log
                .lines()
                .filter(|l| {
                    !l.contains("outcome=\"blocked\"") && !l.contains("outcome=\"duplicate\"")
                })
                .collect();
            panic!(
                "events without a result: {where_:?}\n--- first\n{}\n--- second\n{}",
                first_interesting.join("\n"),
                interesting.join("\n")
            );
        }
    };
    terminate(second, dir.path());

    let sent = blocks_sent(&sim).await;
    assert_eq!(sent.len(), 200, "every source blocked");
    assert!(sent.values().all(|n| *n == 1), "{sent:?}");
    let blocked = results
        .iter()
        .filter(|r| r.value["outcome"] == "blocked")
        .count();
    assert!(blocked >= 200, "{blocked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_takes_over_partitions_does_not_block_again() {
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_millis(100),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let topics = topics();
    let group = unique("group");
    let config = write_config(&brokers(), dir.path(), &sim, &topics, &group, "");
    let a = spawn_run(&config, &dir.path().join("a.log"));
    let b = spawn_run(&config, &dir.path().join("b.log"));
    // Both replicas own partitions before any event arrives.
    let started = Instant::now();
    loop {
        let a_log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        let b_log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
        if a_log.contains("partitions assigned") && b_log.contains("partitions assigned") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the group never split its partitions:\n{a_log}\n---\n{b_log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let first: Vec<String> = (0..200u32)
        .map(|i| ads(i, &format!("198.18.1.{}", i + 1)))
        .collect();
    feed(&topics, &first);
    wait_for(&topics[1], 200, dir.path());
    terminate(a, dir.path());

    let repeats: Vec<String> = (0..200u32)
        .map(|i| ads(1000 + i, &format!("198.18.1.{}", i + 1)))
        .collect();
    feed(&topics, &repeats);
    let results = wait_for(&topics[1], 400, dir.path());
    let repeat_outcomes: BTreeMap<String, usize> = results
        .iter()
        .filter(|r| {
            r.value["ads_event_id"]
                .as_str()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                >= 1000
        })
        .fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.value["outcome"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
            m
        });
    if repeat_outcomes != BTreeMap::from([("duplicate".to_string(), 200)]) {
        let log = |name: &str| {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap()
                .lines()
                .filter(|l| !l.contains("outcome=\"duplicate\""))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "repeats after the takeover: {repeat_outcomes:?} (all should be duplicates)\n--- a\n{}\n--- b\n{}",
            log("a.log"),
            log("b.log")
        );
    }
    let sent = blocks_sent(&sim).await;
    assert_eq!(sent.len(), 200);
    assert!(
        sent.values().all(|n| *n == 1),
        "re-blocked after the rebalance"
    );
    terminate(b, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_firewall_does_not_cost_the_group_membership() {
    // Tasks take 4 s, at most 2 events are in flight, and the group evicts a member that does
    // not poll for 3 s: consumption waits for the firewall longer than that, again and again,
    // and must do so without leaving the group.
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_secs(4),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let topics = topics();
    let config = write_config(
        &brokers(),
        dir.path(),
        &sim,
        &topics,
        &unique("group"),
        "max_in_flight = 2\nbatch_max_rules = 2\nserver_concurrency = 1\n\
         [kafka.properties]\n\"max.poll.interval.ms\" = \"3000\"\n\"session.timeout.ms\" = \"3000\"\n\
         \"heartbeat.interval.ms\" = \"500\"\n",
    );
    let lines: Vec<String> = (0..16u32)
        .map(|i| ads(i, &format!("198.18.2.{}", i + 1)))
        .collect();
    feed(&topics, &lines);
    let replica = spawn_run(&config, &dir.path().join("slow.log"));
    let results = wait_for(&topics[1], 16, dir.path());
    assert_eq!(answered(&results).len(), 16);
    terminate(replica, dir.path());
    let log = std::fs::read_to_string(dir.path().join("slow.log")).unwrap();
    let running = log.split("shutting down").next().unwrap();
    let assigned = running.matches("partitions assigned").count();
    assert!(
        assigned == 1 && !running.contains("revoked") && !running.contains("poll interval"),
        "the replica left its group while backed up:\n{log}"
    );
    let sent = blocks_sent(&sim).await;
    assert_eq!(sent.len(), 16);
    assert!(sent.values().all(|n| *n == 1), "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_replica_whose_broker_is_gone() {
    // Kafka goes away (an outage, a broker restarted elsewhere) and the replica is told to stop:
    // it must still stop, not wait for a coordinator that never answers. What it could not
    // commit is consumed again by the next owner, which the state topic makes safe.
    let broker = OwnBroker::start();
    let sim = simulator::start(SimulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let topics = topics();
    let config = write_config(
        &broker.address(),
        dir.path(),
        &sim,
        &topics,
        &unique("group"),
        "",
    );
    let replica = spawn_run(&config, &dir.path().join("orphan.log"));
    let lines: Vec<String> = (0..8u32)
        .map(|i| ads(i, &format!("198.18.3.{}", i + 1)))
        .collect();
    feed_to(&broker.address(), &topics, &lines);
    wait_for_rules(&sim, 8).await;
    broker.stop();
    let status = stop(replica, dir.path());
    let log = std::fs::read_to_string(dir.path().join("orphan.log")).unwrap();
    assert!(
        !status.success() && log.contains("exiting without them"),
        "{status}: a stop without Kafka says what it left undone\n{log}"
    );
}
