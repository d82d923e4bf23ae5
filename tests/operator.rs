//! Operators in control, end to end: the `samgate block | unblock | exempt | unexempt | blocks |
//! explain | reconcile` binary against a pipeline (`run()` in this process) on the real broker
//! and the Check Point simulator over HTTPS; expiry and reconcile as the pipeline does them.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use samgate_sim::checkpoint::{self as simulator, FaultsUpdate, RunningSimulator, SimulatorConfig};
use serde_json::Value;

struct Lab {
    sim: RunningSimulator,
    config_file: tempfile::NamedTempFile,
    events: String,
    results: String,
    dlq: String,
    pipeline: Pipeline,
}

/// Two sites: prague routes to `edge` (fw_samp, gw-1 and gw-2) and `branch` (fw_sam, gw-3);
/// brno routes to `branch` only. `policy` is added to the `[policy]` section.
async fn lab(policy: &str) -> Lab {
    lab_with(policy, None).await
}

/// As [`lab`], with the state topic made beforehand with `state_partitions` (the events topic
/// has 3; an operator may give the state topic more).
async fn lab_with(policy: &str, state_partitions: Option<i32>) -> Lab {
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_millis(100),
        gateways: vec!["gw-1".into(), "gw-2".into(), "gw-3".into()],
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let (events, results, dlq, state) = (
        unique("events"),
        unique("results"),
        unique("dlq"),
        unique("state"),
    );
    if let Some(partitions) = state_partitions {
        create_topic(&state, partitions).await;
    }
    let text = format!(
        r#"
{kafka}[run]
group_id = "{group}"
http_listen = "127.0.0.1:0"
batch_max_delay = "50ms"
retry_initial = "200ms"
retry_max = "400ms"
retry_deadline = "10s"
shutdown_timeout = "5s"
[policy]
never_block = ["10.99.0.0/16"]
{policy}
[checkpoint.servers.hq]
url = "{url}"
user = "admin"
password = "admin123"
[checkpoint.servers.hq.tls]
fingerprint_sha256 = "{fingerprint}"
[targets.edge]
server = "hq"
gateways = ["gw-1", "gw-2"]
mode = "fw_samp"
[targets.branch]
server = "hq"
gateways = ["gw-3"]
[sites.prague]
targets = ["edge", "branch"]
[sites.brno]
targets = ["branch"]
"#,
        kafka = kafka_toml(&events, &results, &dlq, &state),
        group = unique("group"),
        url = sim.url,
        fingerprint = sim.fingerprint.as_deref().unwrap(),
    );
    let mut config_file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut config_file, text.as_bytes()).unwrap();
    let pipeline = Pipeline::start(config_file.path()).await;
    Lab {
        sim,
        config_file,
        events,
        results,
        dlq,
        pipeline,
    }
}

impl Lab {
    /// Runs `samgate <args> --config <file>` (off the async workers).
    async fn cli(&self, args: &[&str]) -> Output {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push("--config".into());
        args.push(self.config_file.path().to_str().unwrap().into());
        if ["block", "unblock", "exempt", "unexempt"].contains(&args[0].as_str()) {
            args.push("--actor".into());
            args.push("tester".into());
        }
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            samgate(&args, b"")
        })
        .await
        .unwrap()
    }

    /// What each gateway holds (sources blocked now).
    fn held(&self) -> std::collections::BTreeMap<String, BTreeSet<IpAddr>> {
        self.sim.blocked_sources()
    }

    fn holds(&self, gateway: &str, ip: &str) -> bool {
        self.held()[gateway].contains(&ip.parse::<IpAddr>().unwrap())
    }

    async fn stop(self) {
        self.pipeline.stop().await;
        self.sim.stop().await;
    }
}

/// Table rows (after the header) as their cells.
fn rows(out: &Output) -> Vec<Vec<String>> {
    stdout(out)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// (target, outcome, code) per row of a results table.
fn outcomes(out: &Output) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = rows(out)
        .into_iter()
        .map(|r| (r[2].clone(), r[3].clone(), r[4].clone()))
        .collect();
    v.sort();
    v
}

fn shim(lab: &Lab, site: &str, lines: &[String]) {
    let spool = tempfile::tempdir().unwrap();
    let brokers = brokers();
    let out = samgate(
        &[
            "shim",
            "--site",
            site,
            "--brokers",
            &brokers,
            "--topic",
            &lab.events,
            "--dlq-topic",
            &lab.dlq,
            "--spool-dir",
            spool.path().to_str().unwrap(),
        ],
        (lines.join("\n") + "\n").as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

fn ads(id: u32, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        "2026-11-20 10:11:00",
        "SCANS",
        "desc",
        "Security",
        "High",
        "detail",
        " ",
        "TCP",
        source,
        " ",
        "10.0.0.1",
        "edge",
        " ",
    ]
    .join("\t")
}

fn triple(target: &str, outcome: &str, code: &str) -> (String, String, String) {
    (target.into(), outcome.into(), code.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_unblock_exempt_and_explain_through_the_pipeline() {
    // The state topic has more partitions than the events topic: state records go to their
    // event's partition number, and `explain` must look there.
    let lab = lab_with("", Some(5)).await;
    let ip = "198.51.100.20";
    assert_ne!(
        samgate::kafka::partition_for(ip, 3),
        samgate::kafka::partition_for(ip, 5),
        "an address whose partition differs between the two counts"
    );

    // A manual block reaches every gateway of every target of the site, with a result each.
    let out = lab
        .cli(&["block", "--site", "prague", ip, "--reason", "phishing host"])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        outcomes(&out),
        vec![
            triple("branch", "blocked", "enforced"),
            triple("edge", "blocked", "enforced")
        ]
    );
    for gw in ["gw-1", "gw-2", "gw-3"] {
        assert!(lab.holds(gw, ip), "{gw}: {:?}", lab.held());
    }

    // `blocks` reads the state topic: both targets, manual, by the actor.
    let out = lab.cli(&["blocks"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<Vec<String>> = rows(&out).into_iter().filter(|r| r[1] == ip).collect();
    assert_eq!(listed.len(), 2, "{}", stdout(&out));
    for row in &listed {
        assert_eq!(row[3], "active");
        assert_eq!(row[7..9], ["manual", "(tester)"], "{row:?}");
    }

    // A never-block address is refused for an operator too, with a result saying why.
    let out = lab.cli(&["block", "--site", "prague", "10.99.0.7"]).await;
    assert!(!out.status.success());
    assert_eq!(
        outcomes(&out),
        vec![
            triple("branch", "suppressed", "never_block"),
            triple("edge", "suppressed", "never_block")
        ]
    );
    assert!(stderr(&out).contains("suppressed"), "{}", stderr(&out));
    assert!(lab
        .held()
        .values()
        .all(|ips| !ips.contains(&"10.99.0.7".parse().unwrap())));

    // Unblock with an exemption: gone from every gateway, and the next detection is exempted.
    let out = lab
        .cli(&[
            "unblock",
            "--site",
            "prague",
            ip,
            "--exempt-for",
            "1h",
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let results: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &results {
        assert_schema("samgate.result.v1.json", r);
        assert_eq!(r["origin"], "manual");
        assert_eq!(r["actor"], "tester");
    }
    let mut seen: Vec<(String, String)> = results
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().into(),
                r["code"].as_str().unwrap().into(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("exempted".into(), "exempted".into()),
            ("unblocked".into(), "removed".into()),
            ("unblocked".into(), "removed".into())
        ]
    );
    for gw in ["gw-1", "gw-2", "gw-3"] {
        assert!(!lab.holds(gw, ip), "{gw} still holds it");
    }
    shim(&lab, "prague", &[ads(1, ip)]);
    let detection: Vec<Received> = read_topic(&lab.results, 7)
        .into_iter()
        .filter(|r| r.value["ip"] == ip && r.value["origin"] == "automatic")
        .collect();
    assert_eq!(detection.len(), 2, "{detection:#?}");
    assert!(detection.iter().all(|r| r.value["outcome"] == "exempted"));
    assert!(lab
        .held()
        .values()
        .all(|ips| !ips.contains(&ip.parse().unwrap())));

    // `explain` says so: no block, the exemption, what a detection would do, the last results.
    let out = lab.cli(&["explain", "--site", "prague", ip]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("edge: none") && text.contains("branch: none"),
        "{text}"
    );
    assert!(text.contains("exempted until"), "{text}");
    assert!(text.contains("exempted at edge (exempted)"), "{text}");
    assert!(text.contains("unblocked (removed)"), "{text}");
    assert!(text.contains("blocked (enforced)"), "{text}");

    // The exemption ends on request; then a detection blocks again.
    let out = lab.cli(&["unexempt", "--site", "prague", ip]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(outcomes(&out), vec![triple("-", "released", "released")]);
    let out = lab
        .cli(&["explain", "--site", "prague", ip, "--json"])
        .await;
    let e: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(e["exempt_until"].is_null());
    assert!(
        e["would"][0]
            .as_str()
            .unwrap()
            .starts_with("blocked at edge"),
        "{e}"
    );

    // `--site all`: one command per site, in order (brno first); the shared target's rule is
    // made once, and prague's block of it is a duplicate.
    let other = "198.51.100.30";
    let out = lab
        .cli(&["block", "--site", "all", other, "--duration", "10m"])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let mut sites: Vec<(String, String, String)> = rows(&out)
        .into_iter()
        .map(|r| (r[0].clone(), r[2].clone(), r[3].clone()))
        .collect();
    sites.sort();
    assert_eq!(
        sites,
        vec![
            ("brno".into(), "branch".into(), "blocked".into()),
            ("prague".into(), "branch".into(), "duplicate".into()),
            ("prague".into(), "edge".into(), "blocked".into()),
        ]
    );
    let out = lab.cli(&["unblock", "--site", "all", other]).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(lab
        .held()
        .values()
        .all(|ips| !ips.contains(&other.parse().unwrap())));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_block_is_reported_then_forgotten_after_the_window() {
    let lab = lab("escalation_window = \"12s\"").await;
    let ip = "198.51.100.50";
    let out = lab
        .cli(&["block", "--site", "brno", ip, "--duration", "2s"])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    // The rule reached the gateway (it may already have run out: 2 s is short on a busy machine).
    let ip_addr: IpAddr = ip.parse().unwrap();
    assert!(
        lab.sim.history()["gw-3"]
            .iter()
            .any(|add| add.source == Some(ip_addr)),
        "no rule was added for {ip}"
    );

    // The owner reports the expiry once (its sweep runs every 5 s) and keeps the history.
    let started = Instant::now();
    let expired = loop {
        let found: Vec<Received> = read_topic_within(&lab.results, 2, Duration::from_secs(3))
            .into_iter()
            .filter(|r| r.value["outcome"] == "expired")
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no expired result"
        );
    };
    assert_eq!(expired.len(), 1, "{expired:#?}");
    let e = &expired[0].value;
    assert_schema("samgate.result.v1.json", e);
    assert_eq!(
        (e["code"].as_str(), e["origin"].as_str()),
        (Some("expired"), Some("expiry"))
    );
    assert_eq!(e["target"], "branch");
    assert!(
        !lab.holds("gw-3", ip),
        "the gateway dropped the rule itself (-t)"
    );
    let out = lab.cli(&["blocks"]).await;
    assert!(rows(&out).iter().all(|r| r[1] != ip), "{}", stdout(&out));
    let out = lab.cli(&["blocks", "--all"]).await;
    let history: Vec<Vec<String>> = rows(&out).into_iter().filter(|r| r[1] == ip).collect();
    assert_eq!(history.len(), 1, "{}", stdout(&out));
    assert_eq!(history[0][3], "expired");

    // Past the escalation window, a tombstone: the state topic forgets it.
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let out = lab.cli(&["blocks", "--all"]).await;
        if rows(&out).iter().all(|r| r[1] != ip) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "{}",
            stdout(&out)
        );
    }
    let again = read_topic_within(&lab.results, 4, Duration::from_secs(3));
    assert_eq!(
        again
            .iter()
            .filter(|r| r.value["outcome"] == "expired")
            .count(),
        1,
        "reported once"
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unblock_is_never_confirmed_from_a_listing_samgate_cannot_read() {
    let lab = lab("").await;
    let ip = "198.51.100.30";
    let out = lab.cli(&["block", "--site", "prague", ip]).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    // The gateways now print a line samgate does not know before every listing: read as "no
    // rule", it would confirm the unblocks while every rule is still in place.
    lab.sim.set_faults(FaultsUpdate {
        listing_preamble: Some(Some("SAM rules currently enforced:".into())),
        ..FaultsUpdate::default()
    });
    let out = lab
        .cli(&["unblock", "--site", "prague", ip, "--json"])
        .await;
    assert!(!out.status.success(), "{}", stdout(&out));
    let results: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 2, "{results:#?}");
    for r in &results {
        assert_ne!(r["outcome"], "unblocked", "{r:#}");
        assert!(
            r["reason"]
                .as_str()
                .is_some_and(|d| d.contains("a line samgate cannot read")),
            "{r:#}"
        );
    }
    for gw in ["gw-1", "gw-2", "gw-3"] {
        assert!(lab.holds(gw, ip), "{gw} lost the rule: {:?}", lab.held());
    }
    // Once the listings read again, the same unblock goes through.
    lab.sim.set_faults(FaultsUpdate {
        listing_preamble: Some(None),
        ..FaultsUpdate::default()
    });
    let out = lab.cli(&["unblock", "--site", "prague", ip]).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    for gw in ["gw-1", "gw-2", "gw-3"] {
        assert!(!lab.holds(gw, ip), "{gw} still holds it");
    }
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_brings_back_what_a_wiped_gateway_lost() {
    let lab = lab("").await;
    let ips = ["198.51.100.41", "198.51.100.42"];
    shim(&lab, "prague", &[ads(1, ips[0]), ads(2, ips[1])]);
    let started = Instant::now();
    while !ips
        .iter()
        .all(|ip| lab.holds("gw-2", ip) && lab.holds("gw-3", ip))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            lab.held()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.sim.set_faults(FaultsUpdate {
        wipe_gateway: Some("gw-2".into()),
        ..FaultsUpdate::default()
    });
    lab.sim.set_faults(FaultsUpdate {
        wipe_gateway: Some("gw-3".into()),
        ..FaultsUpdate::default()
    });
    assert!(ips.iter().all(|ip| !lab.holds("gw-2", ip)));

    let out = lab.cli(&["reconcile", "--json"]).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let reports: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let missing = |target: &str| -> u64 {
        reports
            .iter()
            .filter(|r| r["target"] == target)
            .map(|r| r["missing"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(missing("edge"), 2, "{reports:#?}");
    assert_eq!(missing("branch"), 2, "{reports:#?}");
    for r in &reports {
        assert_schema("samgate.reconcile.v1.json", r);
    }
    assert_eq!(
        lab.pipeline
            .metric("samgate_drift_rules{kind=\"missing\",target=\"edge\"}")
            .await,
        Some(2.0)
    );
    let started = Instant::now();
    while !ips
        .iter()
        .all(|ip| lab.holds("gw-2", ip) && lab.holds("gw-3", ip))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            lab.held()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reasserted: Vec<Received> = read_topic(&lab.results, 8)
        .into_iter()
        .filter(|r| r.value["code"] == "reasserted")
        .collect();
    assert_eq!(reasserted.len(), 4, "{reasserted:#?}");
    for r in &reasserted {
        assert_schema("samgate.result.v1.json", &r.value);
    }
    // Only the wiped gateways were sent the rules again.
    let history = lab.sim.history();
    for ip in ips {
        let adds = |gw: &str| {
            history[gw]
                .iter()
                .filter(|a| a.source == Some(ip.parse().unwrap()))
                .count()
        };
        assert_eq!(
            (adds("gw-1"), adds("gw-2"), adds("gw-3")),
            (1, 2, 2),
            "{ip}"
        );
    }

    // The next reconcile finds nothing: the gauge goes back down.
    let out = lab.cli(&["reconcile", "--target", "edge"]).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        lab.pipeline
            .metric("samgate_drift_rules{kind=\"missing\",target=\"edge\"}")
            .await,
        Some(0.0)
    );
    lab.stop().await;
}

/// `samgate explain` and reconcile compute an address's partition as librdkafka's default
/// partitioner does; the broker must agree.
#[test]
fn the_computed_partition_is_the_one_the_producer_picks() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::ClientConfig;
    let topic = unique("partitions");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(create_topic(&topic, 7));
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let keys: Vec<String> = (0..50).map(|i| format!("198.51.100.{i}")).collect();
    for key in &keys {
        producer
            .send(BaseRecord::to(&topic).key(key).payload("{}"))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let received = read_topic(&topic, keys.len());
    assert_eq!(received.len(), keys.len());
    let spread: BTreeSet<i32> = received.iter().map(|r| r.partition).collect();
    assert!(spread.len() > 3, "the keys spread over partitions");
    for r in received {
        assert_eq!(
            samgate::kafka::partition_for(&r.key, 7),
            r.partition,
            "{}",
            r.key
        );
    }
}

/// `samgate create-topics` makes every topic `samgate run` needs, the state topic included,
/// whatever `kafka.create_topics` says.
#[test]
fn create_topics_makes_all_four() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;
    let names = [
        unique("events"),
        unique("results"),
        unique("dlq"),
        unique("state"),
    ];
    let kafka = kafka_toml(&names[0], &names[1], &names[2], &names[3]).replacen(
        "partitions = 3\n",
        "partitions = 3\ncreate_topics = false\n",
        1,
    );
    let text = format!(
        "{kafka}[checkpoint.servers.hq]\nurl = \"https://192.0.2.250\"\napi_key = \"k\"\n\
         [targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n"
    );
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    let out = samgate(
        &["create-topics", "--config", file.path().to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}\n{text}", stderr(&out));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    for name in &names {
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().len());
        assert_eq!(partitions, Some(3), "{name}");
    }
}
