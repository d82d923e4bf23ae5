//! FortiGate enforcement end to end: the pipeline (`run()` in this process) on the real broker,
//! ADS lines through the real shim binary, the operator commands as the binary, and the
//! FortiGate, Check Point and Flowmon simulators over HTTPS with pinned certificates.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use samgate_sim::checkpoint::{self as cpsim, RunningSimulator, SimulatorConfig};
use samgate_sim::flowmon::{self as flowmonsim, FlowmonConfig, RunningFlowmon};
use samgate_sim::fortigate::{self as fgsim, FortiGateConfig, RunningFortiGate, Stitch};
use serde_json::Value;

struct Lab {
    cp: RunningSimulator,
    fg: RunningFortiGate,
    config_file: tempfile::NamedTempFile,
    events: String,
    results: String,
    dlq: String,
    pipeline: Pipeline,
}

/// Site `prague` routes to `edge` (Check Point, gw-1) and `branch` (FortiGate `fg`, in
/// `fortigate_mode`); `extra` is appended to the configuration.
async fn lab(fortigate_mode: &str, extra: &str) -> Lab {
    let cp = cpsim::start(SimulatorConfig {
        task_duration: Duration::from_millis(100),
        gateways: vec!["gw-1".into()],
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let fg = fgsim::start(FortiGateConfig {
        stitches: vec![
            Stitch {
                name: "Flowmon ADS".into(),
                ban_seconds: Some(3600),
            },
            // A stitch that only notifies: no IP Ban, nothing on the banned list.
            Stitch {
                name: "Notify".into(),
                ban_seconds: None,
            },
        ],
        ..FortiGateConfig::default()
    })
    .await
    .unwrap();
    let (events, results, dlq, state) = (
        unique("events"),
        unique("results"),
        unique("dlq"),
        unique("state"),
    );
    let text = format!(
        r#"
{kafka}[run]
group_id = "{group}"
http_listen = "127.0.0.1:0"
batch_max_delay = "1s"
retry_initial = "200ms"
retry_max = "400ms"
retry_deadline = "40s"
shutdown_timeout = "5s"
[checkpoint.servers.hq]
url = "{cp_url}"
user = "admin"
password = "admin123"
[checkpoint.servers.hq.tls]
fingerprint_sha256 = "{cp_fp}"
[fortigate.devices.fg]
url = "{fg_url}"
token = "{token}"
vdom = "root"
[fortigate.devices.fg.tls]
fingerprint_sha256 = "{fg_fp}"
[targets.edge]
server = "hq"
gateways = ["gw-1"]
[targets.branch]
kind = "fortigate"
device = "fg"
{fortigate_mode}
[sites.prague]
targets = ["edge", "branch"]
{extra}
"#,
        kafka = kafka_toml(&events, &results, &dlq, &state),
        group = unique("group"),
        cp_url = cp.url,
        cp_fp = cp.fingerprint.as_deref().unwrap(),
        fg_url = fg.url,
        fg_fp = fg.fingerprint.as_deref().unwrap(),
        token = fg.token,
    );
    let mut config_file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut config_file, text.as_bytes()).unwrap();
    let pipeline = Pipeline::start(config_file.path()).await;
    Lab {
        cp,
        fg,
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
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            samgate(&args, b"")
        })
        .await
        .unwrap()
    }

    /// Feeds ADS lines to the shim binary, with `config` (a file) when given.
    async fn shim(&self, lines: &[String], config: Option<&std::path::Path>) {
        let spool = tempfile::tempdir().unwrap();
        let mut args = vec![
            "shim".to_string(),
            "--site".into(),
            "prague".into(),
            "--brokers".into(),
            brokers(),
            "--topic".into(),
            self.events.clone(),
            "--dlq-topic".into(),
            self.dlq.clone(),
            "--spool-dir".into(),
            spool.path().to_str().unwrap().into(),
        ];
        if let Some(config) = config {
            args.push("--config".into());
            args.push(config.to_str().unwrap().into());
        }
        let input = lines.join("\n") + "\n";
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            samgate(&args, input.as_bytes())
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }

    fn banned(&self) -> BTreeSet<IpAddr> {
        self.fg.banned("root")
    }

    fn on_check_point(&self) -> BTreeSet<IpAddr> {
        self.cp.blocked_sources()["gw-1"].clone()
    }

    fn calls(&self, endpoint: &str) -> u64 {
        self.fg.state()["calls"][endpoint].as_u64().unwrap_or(0)
    }

    async fn stop(self) {
        self.pipeline.stop().await;
        self.cp.stop().await;
        self.fg.stop().await;
    }
}

fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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

fn ips(v: &[String]) -> BTreeSet<IpAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

/// Waits until `done`, for at most `within`.
async fn until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn code_counts(results: &[Received]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r.value["target"].as_str().unwrap_or("").to_owned(),
                r.value["outcome"].as_str().unwrap().to_owned(),
                r.value["mode"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_on_check_point_and_fortigate_blocks_on_both_with_one_add_users_call() {
    let lab = lab("", "").await;
    let sources: Vec<String> = (1..=20).map(|i| format!("198.51.100.{i}")).collect();
    let lines: Vec<String> = (0..20u32)
        .map(|i| ads(100 + i, &sources[i as usize]))
        .collect();
    lab.shim(&lines, None).await;

    let results = read_topic(&lab.results, 40);
    assert_eq!(results.len(), 40, "one result per event and target");
    assert_eq!(
        code_counts(&results),
        vec![
            ("branch".into(), "blocked".into(), "banned_ip".into()),
            ("edge".into(), "blocked".into(), "fw_sam".into()),
        ]
    );
    for r in &results {
        assert_schema("samgate.result.v1.json", &r.value);
    }
    let fortigate: Vec<&Received> = results
        .iter()
        .filter(|r| r.value["target"] == "branch")
        .collect();
    assert!(fortigate[0].value["command"]
        .as_str()
        .unwrap()
        .starts_with("POST /api/v2/monitor/user/banned/add_users"));
    assert_eq!(lab.banned(), ips(&sources));
    assert_eq!(lab.on_check_point(), ips(&sources));
    // Twenty new addresses, one batch: one add_users call, and each address sent once.
    assert_eq!(lab.calls("add_users"), 1, "{:#}", lab.fg.state());
    assert_eq!(lab.fg.history().len(), 20);
    // The token never travelled in a URL (the simulator refuses that, as FortiOS 7.4.5+
    // does), and nothing was refused.
    assert!(lab.fg.refusals().is_empty(), "{:?}", lab.fg.refusals());
    // Expiry: the policy's first step (1h) on the device.
    let expiry = lab.fg.history()[0].expiry;
    assert_eq!(expiry, 3600);

    // The same sources again: duplicates, no call.
    lab.shim(&lines[..5], None).await;
    let again = read_topic(&lab.results, 50);
    let duplicates = again
        .iter()
        .filter(|r| r.value["outcome"] == "duplicate")
        .count();
    assert_eq!(duplicates, 10);
    assert_eq!(lab.calls("add_users"), 1);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unblock_exempt_and_a_reboot_repaired_by_reconcile_on_fortigate() {
    let lab = lab("", "").await;
    let ip = "203.0.113.30";
    let out = lab
        .cli(&[
            "block", "--site", "prague", ip, "--actor", "tester", "--json",
        ])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(lab.banned().contains(&ip.parse().unwrap()));

    // Unblock with an exemption: gone from the FortiGate and the Check Point gateway.
    let out = lab
        .cli(&[
            "unblock",
            "--site",
            "prague",
            ip,
            "--exempt-for",
            "1h",
            "--actor",
            "tester",
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let results = json_lines(&out);
    let unblocked: Vec<&Value> = results
        .iter()
        .filter(|r| r["outcome"] == "unblocked")
        .collect();
    assert_eq!(unblocked.len(), 2, "{results:#?}");
    assert!(unblocked
        .iter()
        .any(|r| r["target"] == "branch" && r["code"] == "removed"));
    assert!(!lab.banned().contains(&ip.parse().unwrap()));
    assert!(!lab.on_check_point().contains(&ip.parse().unwrap()));
    assert_eq!(lab.calls("clear_users"), 1);

    // The next detection is exempted at both targets: nothing is banned again.
    lab.shim(&[ads(7, ip)], None).await;
    // Results so far: 2 blocked, 1 exemption, 2 unblocked; then the detection's 2.
    let exempted: Vec<Received> = read_topic(&lab.results, 7)
        .into_iter()
        .filter(|r| r.value["outcome"] == "exempted" && r.value["target"].is_string())
        .collect();
    assert_eq!(exempted.len(), 2, "{exempted:#?}");
    assert!(!lab.banned().contains(&ip.parse().unwrap()));

    // Two more blocks, then a reboot empties the banned list (banned-ip-persistency disabled).
    let sources = ["203.0.113.31".to_string(), "203.0.113.32".to_string()];
    lab.shim(&[ads(8, &sources[0]), ads(9, &sources[1])], None)
        .await;
    until(Duration::from_secs(30), "the bans", || {
        ips(&sources).is_subset(&lab.banned())
    })
    .await;
    lab.fg.reboot();
    assert!(lab.banned().is_empty());

    let out = lab
        .cli(&["reconcile", "--target", "branch", "--json"])
        .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let reports = json_lines(&out);
    let missing: u64 = reports.iter().map(|r| r["missing"].as_u64().unwrap()).sum();
    assert_eq!(missing, 2, "{reports:#?}");
    let drift = "samgate_drift_rules{kind=\"missing\",target=\"branch\"}";
    assert_eq!(lab.pipeline.metric(drift).await, Some(2.0));
    until(Duration::from_secs(30), "the re-asserted bans", || {
        ips(&sources).is_subset(&lab.banned())
    })
    .await;
    // Each address was sent twice in all: once, then once more after the reboot.
    for source in &sources {
        let adds = lab
            .fg
            .history()
            .iter()
            .filter(|a| a.ip.to_string() == *source)
            .count();
        assert_eq!(adds, 2, "{source}");
    }
    // The Check Point gateway kept its rules: its reconcile finds nothing missing.
    let out = lab.cli(&["reconcile", "--target", "edge", "--json"]).await;
    let missing: u64 = json_lines(&out)
        .iter()
        .map(|r| r["missing"].as_u64().unwrap())
        .sum();
    assert_eq!(missing, 0);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fortigate_429_backs_off_before_the_ban_lands() {
    let lab = lab("", "").await;
    lab.fg.set_faults(fgsim::FaultsUpdate {
        http_429_next: Some(1),
        ..Default::default()
    });
    let sent = Instant::now();
    lab.shim(&[ads(1, "192.0.2.44")], None).await;
    let results = read_topic(&lab.results, 2);
    let branch = results
        .iter()
        .find(|r| r.value["target"] == "branch")
        .expect("a FortiGate result");
    assert_eq!(branch.value["outcome"], "blocked", "{:#}", branch.value);
    assert_eq!(branch.value["attempts"], 2, "{:#}", branch.value);
    assert_eq!(lab.calls("add_users"), 2);
    // A rate-limited call waits at least FortiGate's back-off, however short run.retry_max is.
    assert!(
        sent.elapsed() >= samgate::fortigate::RATE_LIMIT_DELAY,
        "retried after {:?}",
        sent.elapsed()
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_mode_calls_the_stitch_with_the_mac_flowmon_knows() {
    // The site's probes see 192.0.2.0/25 at layer 2: beyond it, the MAC is a router's.
    let lab = lab(
        "mode = \"webhook\"\nstitch = \"Flowmon ADS\"",
        "mac_networks = [\"192.0.2.0/25\"]",
    )
    .await;
    let flowmon: RunningFlowmon = flowmonsim::start(FlowmonConfig {
        users: vec![("flowmon-api".into(), "Api-Passw0rd".into())],
        ..FlowmonConfig::default()
    })
    .await
    .unwrap();
    flowmon.set_mac("501", "00:1A:2b:3c:4d:5e");
    flowmon.set_mac("503", "00:00:5e:00:53:01");
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("flowmon-api");
    std::fs::write(&credentials, "flowmon-api\nApi-Passw0rd\n").unwrap();
    let shim_config = dir.path().join("shim.toml");
    std::fs::write(
        &shim_config,
        format!(
            r#"
[shim.flowmon_api]
url = "{url}"
credentials_file = "{credentials}"
[shim.flowmon_api.tls]
fingerprint_sha256 = "{fp}"
"#,
            url = flowmon.url,
            credentials = credentials.display(),
            fp = flowmon.fingerprint.as_deref().unwrap(),
        ),
    )
    .unwrap();
    // Event 501 has a MAC in Flowmon; event 502 has none: it is quarantined by address alone;
    // event 503's source is beyond the router, so its MAC (the router's) is not passed on.
    lab.shim(
        &[
            ads(501, "192.0.2.61"),
            ads(502, "192.0.2.62"),
            ads(503, "198.51.100.63"),
        ],
        Some(&shim_config),
    )
    .await;
    let events = read_topic(&lab.events, 3);
    let macs: Vec<&Value> = events.iter().map(|e| &e.value["source_mac"]).collect();
    assert!(
        macs.contains(&&Value::from("00:1a:2b:3c:4d:5e")),
        "{macs:?}"
    );
    for e in &events {
        assert_schema("samgate.event.v1.json", &e.value);
    }

    assert!(
        macs.contains(&&Value::from("00:00:5e:00:53:01")),
        "the event carries what Flowmon knows: {macs:?}"
    );

    let results = read_topic(&lab.results, 6);
    let branch: Vec<&Received> = results
        .iter()
        .filter(|r| r.value["target"] == "branch")
        .collect();
    assert_eq!(branch.len(), 3);
    for r in &branch {
        assert_eq!(r.value["outcome"], "blocked", "{:#}", r.value);
        assert_eq!(r.value["mode"], "webhook");
    }
    let mut calls: Vec<(String, Value, Value)> = lab
        .fg
        .webhook_calls()
        .into_iter()
        .map(|c| (c.name, c.body["srcip"].clone(), c.body["mac"].clone()))
        .collect();
    calls.sort_by_key(|c| c.1.to_string());
    assert_eq!(
        calls,
        vec![
            (
                "Flowmon ADS".into(),
                "192.0.2.61".into(),
                "00:1a:2b:3c:4d:5e".into()
            ),
            ("Flowmon ADS".into(), "192.0.2.62".into(), Value::Null),
            ("Flowmon ADS".into(), "198.51.100.63".into(), Value::Null),
        ]
    );
    // The stitch's IP Ban put them on the banned list, which is how samgate verifies them.
    assert_eq!(
        lab.banned(),
        ips(&[
            "192.0.2.61".into(),
            "192.0.2.62".into(),
            "198.51.100.63".into()
        ])
    );
    assert!(flowmon.requests().iter().any(|r| r == "event 501"));
    // The Flowmon password and token never reach a message.
    let token = flowmon.issued_tokens();
    for e in &events {
        let text = e.value.to_string();
        assert!(!text.contains("Api-Passw0rd"));
        assert!(token.iter().all(|t| !text.contains(t.as_str())));
    }
    flowmon.stop().await;
    lab.stop().await;
}

/// A stitch's 200 says only that it was triggered: a stitch without an IP Ban action never puts
/// the address on the banned list, so the block is never confirmed and ends `failed`, not
/// `blocked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stitch_that_bans_nothing_never_confirms_a_block() {
    let lab = lab("mode = \"webhook\"\nstitch = \"Notify\"", "").await;
    lab.shim(&[ads(601, "192.0.2.71")], None).await;
    let results = read_topic_within(&lab.results, 2, Duration::from_secs(120));
    let branch: Vec<&Received> = results
        .iter()
        .filter(|r| r.value["target"] == "branch")
        .collect();
    assert_eq!(branch.len(), 1, "{results:#?}");
    assert_eq!(
        (
            branch[0].value["outcome"].as_str(),
            branch[0].value["code"].as_str()
        ),
        (Some("failed"), Some("retries_exhausted")),
        "{:#}",
        branch[0].value
    );
    assert!(
        !lab.fg.webhook_calls().is_empty(),
        "the stitch was triggered"
    );
    assert!(lab.banned().is_empty());
    lab.stop().await;
}
