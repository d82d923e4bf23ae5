//! `samgate run` end to end: Flowmon lines through the real `samgate shim`, the real broker, the
//! pipeline's `run()`, and the Check Point simulator over HTTPS.

mod common;

use std::time::Duration;

use common::*;
use samgate::config::Config;
use samgate_sim::checkpoint::{self as simulator, RunningSimulator, SimulatorConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Topics {
    events: String,
    results: String,
    dlq: String,
    state: String,
}

fn topics() -> Topics {
    Topics {
        events: unique("events"),
        results: unique("results"),
        dlq: unique("dlq"),
        state: unique("state"),
    }
}

async fn sim() -> RunningSimulator {
    simulator::start(SimulatorConfig {
        task_duration: Duration::from_millis(200),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap()
}

fn server_toml(name: &str, sim: &RunningSimulator) -> String {
    format!(
        "[checkpoint.servers.{name}]\nurl = \"{}\"\nuser = \"admin\"\npassword = \"admin123\"\n[checkpoint.servers.{name}.tls]\nfingerprint_sha256 = \"{}\"\n",
        sim.url,
        sim.fingerprint.as_deref().unwrap()
    )
}

fn config(t: &Topics, extra: &str) -> Config {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
partitions = 3
[kafka.topics]
events = "{events}"
results = "{results}"
dlq = "{dlq}"
state = "{state}"
[run]
group_id = "{group}"
http_listen = "127.0.0.1:0"
batch_max_delay = "100ms"
retry_initial = "200ms"
retry_max = "400ms"
retry_deadline = "2s"
shutdown_timeout = "5s"
[policy]
never_block = ["10.99.0.0/16"]
{extra}
"#,
        brokers = brokers(),
        events = t.events,
        results = t.results,
        dlq = t.dlq,
        state = t.state,
        group = unique("group"),
    );
    Config::from_toml(&text).unwrap().validate().unwrap()
}

/// Starts the pipeline in this process; returns its HTTP address and a stop handle.
async fn start(config: Config) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            samgate::pipeline::run(config, cancel, move |addr| {
                let _ = tx.send(addr);
            })
            .await
            .expect("pipeline runs");
        }
    });
    let addr = rx.await.expect("pipeline listens");
    (format!("http://{addr}"), cancel, task)
}

fn ads(id: u32, method: &str, priority: &str, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        "2026-11-20 10:11:00",
        method,
        "desc",
        "Security",
        priority,
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

fn ads_extended(id: u32, method: &str, priority: &str, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        "2026-11-20 10:11:00",
        method,
        "General",
        "T1110",
        "desc",
        "Security",
        priority,
        "detail",
        "22",
        "TCP",
        source,
        " ",
        "10.0.0.5",
        "dc",
        " ",
    ]
    .join("\t")
}

fn shim(site: &str, events_topic: &str, dlq: &str, lines: &[String]) {
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
            events_topic,
            "--dlq-topic",
            dlq,
            "--spool-dir",
            spool.path().to_str().unwrap(),
        ],
        (lines.join("\n") + "\n").as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

async fn sim_state(sim: &RunningSimulator) -> Value {
    common::sim_state(&sim.url).await
}

fn sam_rules(state: &Value, gateway: &str) -> Vec<Value> {
    state["gateways"][gateway]["sam"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn by_ip<'a>(results: &'a [Received], ip: &str) -> Vec<&'a Value> {
    results
        .iter()
        .map(|r| &r.value)
        .filter(|v| v["ip"] == ip)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_with_the_right_rule_or_none() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(
        &t,
        &format!(
            "{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n",
            server_toml("hq", &sim)
        ),
    );
    let (http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[
            ads(1, "SCANS", "High", "198.51.100.7"),
            ads(2, "SCANS", "High", "198.51.100.7"),
            ads(3, "SCANS", "High", "10.99.0.5"),
            ads(4, "DOS", "Critical", "198.51.100.8"),
            ads(5, "SCANS", "Low", "198.51.100.9"),
            ads_extended(6, "SSHDICT", "High", "2001:db8::66"),
        ],
    );
    let results = read_topic(&t.results, 6);
    assert_eq!(results.len(), 6, "one result per decision: {results:#?}");
    for r in &results {
        assert_schema("samgate.result.v1.json", &r.value);
    }
    let outcome = |ip: &str| {
        by_ip(&results, ip)
            .iter()
            .map(|v| v["outcome"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut first = outcome("198.51.100.7");
    first.sort();
    assert_eq!(first, ["blocked", "duplicate"]);
    assert_eq!(outcome("10.99.0.5"), ["suppressed"]);
    assert_eq!(
        by_ip(&results, "10.99.0.5")[0]["suppressed_by"],
        "10.99.0.0/16"
    );
    assert_eq!(outcome("198.51.100.8"), ["filtered"]);
    assert_eq!(
        by_ip(&results, "198.51.100.8")[0]["code"],
        "method_not_allowed"
    );
    assert_eq!(outcome("198.51.100.9"), ["filtered"]);
    assert_eq!(
        by_ip(&results, "198.51.100.9")[0]["code"],
        "priority_below_minimum"
    );
    assert_eq!(outcome("2001:db8::66"), ["blocked"]);

    let blocked = by_ip(&results, "198.51.100.7")
        .into_iter()
        .find(|v| v["outcome"] == "blocked")
        .unwrap();
    assert_eq!(blocked["gateways"], json!(["gw-1"]));
    assert_eq!(blocked["duration_s"], 3600);
    assert!(blocked["expires_at"].is_string() && blocked["enforced_at"].is_string());
    assert_eq!(blocked["attempts"], 1);
    let key = blocked["key"].as_str().unwrap();
    assert!(
        results
            .iter()
            .filter(|r| r.value["ip"] == "198.51.100.7")
            .all(|r| r.key == key),
        "keyed by idempotency key"
    );

    let state = sim_state(&sim).await;
    let rules = sam_rules(&state, "gw-1");
    let mut criteria: Vec<String> = rules
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["family"].as_str().unwrap(),
                r["criteria"][1].as_str().unwrap()
            )
        })
        .collect();
    criteria.sort();
    assert_eq!(
        criteria,
        ["fw 198.51.100.7", "fw6 2001:db8::66"],
        "one rule each, nothing for the others"
    );
    assert!(sam_rules(&state, "gw-2").is_empty());
    assert_eq!(state["logins"], 1);

    // The metrics catalogue, with the counts of this run.
    let metrics = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "samgate_events_consumed_total",
        "samgate_decisions_total",
        "samgate_firewall_api_requests_total",
        "samgate_firewall_api_request_duration_seconds",
        "samgate_firewall_logins_total",
        "samgate_batch_rules",
        "samgate_detection_to_enforcement_seconds",
        "samgate_active_blocks",
        "samgate_enforcement_queue_depth",
        "samgate_consumer_lag_messages",
        "samgate_build_info",
        "samgate_dead_letters_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    // Known series exist at zero, so the alerts see their first increase.
    assert!(metrics.contains("samgate_decisions_total{outcome=\"failed\"} 0"));
    assert!(metrics.contains("samgate_dead_letters_total{stage=\"enforce\"} 0"));
    assert!(
        metrics.contains("samgate_decisions_total{outcome=\"blocked\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("samgate_decisions_total{outcome=\"filtered\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("samgate_decisions_total{outcome=\"suppressed\"} 1"));
    assert!(metrics.contains("samgate_decisions_total{outcome=\"duplicate\"} 1"));
    assert!(
        metrics
            .contains("samgate_events_consumed_total{format=\"ads_standard\",site=\"prague\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains("samgate_firewall_logins_total{server=\"hq\"} 1"));
    assert!(!metrics.contains("198.51.100.7"), "no IP in a label");
    assert_eq!(
        reqwest::get(format!("{http}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{http}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(
        sim_state(&sim).await["active_sessions"],
        0,
        "logged out on shutdown"
    );
}

/// Two sites route to one target: the same address detected at both is one rule on the gateway
/// (its key names the target and the address, not the site); each detection has its result,
/// naming its own site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_on_one_target_make_one_rule() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(
        &t,
        &format!("{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n[sites.brno]\ntargets = [\"edge\"]\n", server_toml("hq", &sim)),
    );
    create_topic(&t.events, 6).await;
    let ip = "198.51.100.31";
    shim("prague", &t.events, &t.dlq, &[ads(1, "SCANS", "High", ip)]);
    shim("brno", &t.events, &t.dlq, &[ads(2, "SCANS", "High", ip)]);
    let (_http, cancel, task) = start(cfg).await;
    let results = read_topic(&t.results, 2);
    let mut seen: Vec<(String, String)> = results
        .iter()
        .map(|r| {
            let v = &r.value;
            (
                v["site"].as_str().unwrap().to_owned(),
                v["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let outcomes: Vec<&str> = seen.iter().map(|(_, o)| o.as_str()).collect();
    let mut sorted = outcomes.clone();
    sorted.sort();
    assert_eq!(sorted, ["blocked", "duplicate"], "{seen:?}");
    assert_eq!(
        seen.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["brno", "prague"]
    );
    assert_eq!(results[0].key, results[1].key, "one idempotency key");
    assert_eq!(adds_for(&sim, ip)["gw-1"], 1, "one rule on the gateway");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_keeps_failing_yields_failed_and_a_dead_letter() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(
        &t,
        &format!("{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n", server_toml("hq", &sim)),
    );
    sim_faults(&sim.url, json!({"unreachable_gateways": ["gw-1"]})).await;
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.30")],
    );
    let results = read_topic(&t.results, 1);
    assert_eq!(results.len(), 1);
    let r = &results[0].value;
    assert_eq!(r["outcome"], "failed");
    assert!(
        r["attempts"].as_u64().unwrap() >= 2,
        "retried before giving up: {r}"
    );
    assert_schema("samgate.result.v1.json", r);
    let dead = read_topic(&t.dlq, 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value["stage"], "enforce");
    assert_schema("samgate.dlq.v1.json", &dead[0].value);
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_with_the_same_private_ip_block_on_their_own_firewalls() {
    let (hq, branch) = (sim().await, sim().await);
    let t = topics();
    let cfg = config(
        &t,
        &format!(
            "{}{}\n[targets.hq-edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[targets.branch-edge]\nserver = \"branch\"\ngateways = [\"gw-2\"]\n[sites.prague]\ntargets = [\"hq-edge\"]\n[sites.brno]\ntargets = [\"branch-edge\"]\n",
            server_toml("hq", &hq),
            server_toml("branch", &branch)
        ),
    );
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "10.0.0.5")],
    );
    shim(
        "brno",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "10.0.0.5")],
    );
    let results = read_topic(&t.results, 2);
    assert_eq!(results.len(), 2);
    assert!(
        results.iter().all(|r| r.value["outcome"] == "blocked"),
        "{results:#?}"
    );
    assert_ne!(
        results[0].key, results[1].key,
        "different sites, different keys"
    );
    let (hq_state, branch_state) = (sim_state(&hq).await, sim_state(&branch).await);
    assert_eq!(sam_rules(&hq_state, "gw-1").len(), 1);
    assert!(sam_rules(&hq_state, "gw-2").is_empty());
    assert_eq!(sam_rules(&branch_state, "gw-2").len(), 1);
    assert!(sam_rules(&branch_state, "gw-1").is_empty());
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_expiry_escalates() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(
        &t,
        &format!(
            "durations = [\"2s\", \"1h\"]\ncritical_skips_a_step = false\n{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n",
            server_toml("hq", &sim)
        ),
    );
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.40")],
    );
    let first = read_topic(&t.results, 1);
    assert_eq!(first[0].value["outcome"], "blocked");
    assert_eq!(first[0].value["level"], 0);
    assert_eq!(first[0].value["duration_s"], 2);
    let expires =
        chrono::DateTime::parse_from_rfc3339(first[0].value["expires_at"].as_str().unwrap())
            .unwrap();
    while chrono::Utc::now() <= expires {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(2, "SCANS", "High", "198.51.100.40")],
    );
    let both = read_topic(&t.results, 2);
    let second = both
        .iter()
        .find(|r| r.value["ads_event_id"] == "2")
        .unwrap();
    assert_eq!(second.value["outcome"], "blocked");
    assert_eq!(second.value["level"], 1);
    assert_eq!(second.value["duration_s"], 3600);
    let rules = sam_rules(&sim_state(&sim).await, "gw-1");
    assert_eq!(
        rules.len(),
        1,
        "the expired rule is gone, the escalated one is there"
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_blocks_cost_one_login_and_few_calls() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(
        &t,
        &format!("{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\", \"gw-2\"]\n[sites.prague]\ntargets = [\"edge\"]\n", server_toml("hq", &sim)),
    );
    let (_http, cancel, task) = start(cfg).await;
    let lines: Vec<String> = (0..1000u32)
        .map(|i| {
            ads(
                i,
                "SCANS",
                "High",
                &format!("198.18.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    shim("prague", &t.events, &t.dlq, &lines);
    let results = read_topic(&t.results, 1000);
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| r.value["outcome"] == "blocked"));
    let state = sim_state(&sim).await;
    assert_eq!(state["logins"], 1);
    assert_eq!(sam_rules(&state, "gw-1").len(), 1000);
    assert_eq!(sam_rules(&state, "gw-2").len(), 1000);
    let run_scripts = state["calls"]["run-script"].as_u64().unwrap();
    assert!(
        run_scripts <= 100,
        "batched: {run_scripts} run-script calls for 1000 rules"
    );
    cancel.cancel();
    task.await.unwrap();
}

/// Repeats need no firewall, so none waits for one: while every block is held up by gateways
/// that take ten minutes a task, the repeats of those addresses (and of the others) are all
/// decided, as duplicates, and their offsets finished. Only `run.max_in_flight` pending blocks
/// would stop consumption (the memory bound); here 30 blocks are pending of 100 allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_decided_while_their_blocks_wait_for_a_slow_firewall() {
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_secs(600),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let t = topics();
    let mut cfg = config(
        &t,
        &format!(
            "{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n",
            server_toml("hq", &sim)
        ),
    );
    cfg.run.max_in_flight = 100;
    cfg.run.batch_max_rules = 10;
    let (_http, cancel, task) = start(cfg).await;
    // 30 new addresses first, then 300 repeats of them, in one ADS run.
    let source = |i: u32| format!("198.18.7.{}", i % 30 + 1);
    let lines: Vec<String> = (0..330u32)
        .map(|i| ads(i, "SCANS", "High", &source(i)))
        .collect();
    shim("prague", &t.events, &t.dlq, &lines);
    let results = read_topic_within(&t.results, 300, Duration::from_secs(120));
    let outcomes: std::collections::BTreeMap<String, usize> =
        results.iter().fold(Default::default(), |mut m, r| {
            *m.entry(r.value["outcome"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            m
        });
    assert_eq!(
        outcomes,
        [("duplicate".to_owned(), 300)].into(),
        "every repeat decided while the blocks wait"
    );
    assert!(results
        .iter()
        .all(|r| r.value["reason"] == "a block for this source is being enforced"));
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_go_to_the_dead_letter_topic_and_consumption_goes_on() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(
        &t,
        &format!("{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n", server_toml("hq", &sim)),
    );
    create_topic(&t.events, 3).await;
    produce(&t.events, "x", b"this is not an event");
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.50")],
    );
    let results = read_topic(&t.results, 1);
    assert_eq!(results[0].value["outcome"], "blocked");
    let dead = read_topic(&t.dlq, 1);
    assert_eq!(dead[0].value["stage"], "decode");
    assert_eq!(dead[0].value["raw"], "this is not an event");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_decides_and_reports_the_command_without_calling_the_firewall() {
    let sim = sim().await;
    let t = topics();
    let mut cfg = config(
        &t,
        &format!("{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n", server_toml("hq", &sim)),
    );
    cfg.run.dry_run = true;
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.60")],
    );
    let results = read_topic(&t.results, 1);
    let r = &results[0].value;
    assert_eq!(r["outcome"], "dry_run");
    assert_eq!(r["attempts"], 0);
    assert!(
        r["command"]
            .as_str()
            .unwrap()
            .ends_with("-J src 198.51.100.60"),
        "{r}"
    );
    assert_schema("samgate.result.v1.json", r);
    let state = sim_state(&sim).await;
    assert!(sam_rules(&state, "gw-1").is_empty());
    assert_eq!(
        state["calls"]["run-script"],
        Value::Null,
        "no firewall call"
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replicas_block_is_asked_about_again_not_sent_blind() {
    let sim = sim().await;
    let t = topics();
    create_topic(&t.events, 1).await; // one partition: the state record's partition is 0
    let cfg = config(
        &t,
        &format!("{}\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n", server_toml("hq", &sim)),
    );

    // A replica blocks an address and stops.
    let (_http, cancel, task) = start(cfg.clone()).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.80")],
    );
    let first = read_topic(&t.results, 1);
    assert_eq!(first[0].value["outcome"], "blocked");
    cancel.cancel();
    task.await.unwrap();

    // As if it had died between sending the rule and recording it: the last word on the state
    // topic is its write-ahead "pending" record.
    let records = read_topic(&t.state, 2);
    let done = records.last().unwrap();
    assert_ne!(
        done.value["pending"], true,
        "recorded as done: {}",
        done.value
    );
    let mut pending = done.value.clone();
    pending["pending"] = true.into();
    produce(&t.state, &done.key, pending.to_string().as_bytes());

    // The next owner cannot reach the management server at first: it must ask again, not send
    // the rule blind (it is on the gateway already).
    sim_faults(&sim.url, json!({"http_500_next": 1})).await;
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(2, "SCANS", "High", "198.51.100.80")],
    );
    let results = read_topic(&t.results, 2);
    let second = results
        .iter()
        .find(|r| r.value["ads_event_id"] == "2")
        .unwrap();
    assert_eq!(second.value["outcome"], "blocked", "{}", second.value);
    assert_eq!(second.value["code"], "verified", "{}", second.value);
    assert_eq!(second.value["attempts"], 2, "asked twice: {}", second.value);
    let state = sim_state(&sim).await;
    let adds = state["scripts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "samgate block")
        .count();
    assert_eq!(adds, 1, "the rule was sent once, by the first replica");
    assert_eq!(sam_rules(&state, "gw-1").len(), 1);
    cancel.cancel();
    task.await.unwrap();
}

// ---- Faults the enforcement core must come through: nothing sent twice, nothing lost, nothing
// ---- protected. Each counts what the gateways received (the simulator's history of adds).

/// A site `prague` routed to one target on `gateways` of `sim`.
fn one_target(sim: &RunningSimulator, gateways: &[&str]) -> String {
    format!(
        "{}\n[targets.edge]\nserver = \"hq\"\ngateways = {gateways:?}\n[sites.prague]\ntargets = [\"edge\"]\n",
        server_toml("hq", sim)
    )
}

/// How many rules for `ip` each gateway received, failing if one came while another was active.
fn adds_for(sim: &RunningSimulator, ip: &str) -> std::collections::BTreeMap<String, usize> {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    sim.history()
        .into_iter()
        .map(|(gateway, adds)| {
            let mine: Vec<_> = adds.iter().filter(|a| a.source == Some(ip)).collect();
            assert!(
                mine.iter().all(|a| !a.while_active),
                "{gateway} got a rule for {ip} while one was active: {mine:?}"
            );
            (gateway, mine.len())
        })
        .collect()
}

fn result_of<'a>(results: &'a [Received], ads_id: &str) -> &'a Value {
    &results
        .iter()
        .find(|r| r.value["ads_event_id"] == ads_id)
        .unwrap_or_else(|| panic!("no result for ADS event {ads_id}"))
        .value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_settled_by_asking_the_gateways_not_by_resending() {
    let sim = sim().await;
    let t = topics();
    let mut cfg = config(&t, &one_target(&sim, &["gw-1", "gw-2"]));
    cfg.run.retry_deadline = Duration::from_secs(60);
    let (_http, cancel, task) = start(cfg).await;

    // The run-script is accepted, its answer never arrives, and its script runs 1.5 s later
    // (queued on the server): the listings before then must not make samgate send again.
    sim_faults(
        &sim.url,
        json!({"lost_answers_next": 1, "task_duration_ms": 1500}),
    )
    .await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.41")],
    );
    let r = result_of(&read_topic(&t.results, 1), "1").clone();
    assert_eq!(
        (r["outcome"].as_str(), r["code"].as_str()),
        (Some("blocked"), Some("enforced")),
        "{r}"
    );
    let attempts = r["attempts"].as_u64().unwrap();
    assert!(attempts >= 2, "sent once, then asked until it showed: {r}");
    sim.set_faults(simulator::FaultsUpdate {
        task_duration_ms: Some(None),
        ..Default::default()
    });

    // The run-script is accepted, and following its tasks keeps failing: the send's own wait
    // (its first look and three more), then samgate's question whether that send's tasks
    // ended, before it asks the gateways.
    sim_faults(&sim.url, json!({"show_task_errors_next": 5})).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(2, "SCANS", "High", "198.51.100.42")],
    );
    let r = result_of(&read_topic(&t.results, 2), "2").clone();
    assert_eq!(r["outcome"], "blocked", "{r}");
    assert_eq!(r["attempts"], 2, "sent once, then asked: {r}");

    // Two failed looks in a row are only passing: the wait asks again, and the send stands.
    sim_faults(&sim.url, json!({"show_task_errors_next": 2})).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(4, "SCANS", "High", "198.51.100.44")],
    );
    let r = result_of(&read_topic(&t.results, 3), "4").clone();
    assert_eq!(r["outcome"], "blocked", "{r}");
    assert_eq!(r["attempts"], 1, "sent once, followed to its end: {r}");

    // An answer with no tasks at all proves nothing: the rule is asked about, then sent.
    sim_faults(&sim.url, json!({"no_tasks_next": 1})).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(3, "SCANS", "High", "198.51.100.43")],
    );
    let r = result_of(&read_topic(&t.results, 4), "3").clone();
    assert_eq!(r["outcome"], "blocked", "{r}");

    for ip in [
        "198.51.100.41",
        "198.51.100.42",
        "198.51.100.43",
        "198.51.100.44",
    ] {
        let adds = adds_for(&sim, ip);
        assert_eq!(adds["gw-1"], 1, "{ip}: {adds:?}");
        assert_eq!(adds["gw-2"], 1, "{ip}: {adds:?}");
    }
    let blocked = sim.blocked_sources();
    for gw in ["gw-1", "gw-2"] {
        assert!(
            blocked[gw].contains(&"198.51.100.43".parse().unwrap()),
            "the rule is really there"
        );
    }
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_fails_is_retried_alone() {
    let sim = sim().await;
    let t = topics();
    let mut cfg = config(&t, &one_target(&sim, &["gw-1", "gw-2"]));
    cfg.run.retry_deadline = Duration::from_secs(120);
    sim_faults(&sim.url, json!({"unreachable_gateways": ["gw-2"]})).await;
    let (_http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.44")],
    );
    // gw-1 takes the rule at once; gw-2 is asked again and again while it cannot be reached.
    let started = std::time::Instant::now();
    while sim.history()["gw-1"].is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "gw-1 never got the rule"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // gw-2 asked again at least twice (the first send, then two rounds for gw-2 alone).
    while sim_state(&sim).await["calls"]["run-script"]
        .as_u64()
        .unwrap_or(0)
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "gw-2 never retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sim_faults(&sim.url, json!({"unreachable_gateways": []})).await;
    let r = result_of(&read_topic(&t.results, 1), "1").clone();
    assert_eq!(r["outcome"], "blocked", "{r}");
    assert!(r["attempts"].as_u64().unwrap() >= 3, "{r}");
    let adds = adds_for(&sim, "198.51.100.44");
    assert_eq!(
        (adds["gw-1"], adds["gw-2"]),
        (1, 1),
        "each gateway got the rule once: {adds:?}"
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_leaves_unfinished_blocks_to_the_next_owner_not_failed() {
    let sim = sim().await;
    let t = topics();
    let mut cfg = config(&t, &one_target(&sim, &["gw-1"]));
    cfg.run.retry_deadline = Duration::from_secs(120);
    sim_faults(&sim.url, json!({"unreachable_gateways": ["gw-1"]})).await;
    let (_http, cancel, task) = start(cfg.clone()).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.45")],
    );
    let started = std::time::Instant::now();
    while sim_state(&sim).await["calls"]["run-script"]
        .as_u64()
        .unwrap_or(0)
        < 2
    {
        assert!(started.elapsed() < Duration::from_secs(60), "never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    assert!(
        read_topic_within(&t.results, 0, Duration::from_secs(3)).is_empty(),
        "no result at shutdown"
    );
    assert!(
        read_topic_within(&t.dlq, 0, Duration::from_secs(1)).is_empty(),
        "no dead letter at shutdown"
    );

    sim_faults(&sim.url, json!({"unreachable_gateways": []})).await;
    let (_http, cancel, task) = start(cfg).await;
    let results = read_topic(&t.results, 1);
    assert_eq!(results.len(), 1, "one result, from the next owner");
    assert_eq!(
        results[0].value["outcome"], "blocked",
        "{}",
        results[0].value
    );
    assert_eq!(adds_for(&sim, "198.51.100.45")["gw-1"], 1);
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_that_may_be_in_place_is_asked_about_even_after_it_failed() {
    let sim = sim().await;
    let t = topics();
    create_topic(&t.events, 1).await; // one partition: the state record's partition is 0
    let cfg = config(&t, &one_target(&sim, &["gw-1"]));
    let ip = "198.51.100.46";

    // A replica blocks the address, then its last word on the state topic is made "pending",
    // as if it died between sending the rule and recording it.
    let (_http, cancel, task) = start(cfg.clone()).await;
    shim("prague", &t.events, &t.dlq, &[ads(1, "SCANS", "High", ip)]);
    assert_eq!(read_topic(&t.results, 1)[0].value["outcome"], "blocked");
    cancel.cancel();
    task.await.unwrap();
    let done = read_topic(&t.state, 2).last().unwrap().clone();
    let mut pending = done.value.clone();
    pending["pending"] = true.into();
    produce(&t.state, &done.key, pending.to_string().as_bytes());

    // The next owner cannot ask the gateway until its retry deadline: failed.
    sim_faults(&sim.url, json!({"unreachable_gateways": ["gw-1"]})).await;
    let (_http, cancel, task) = start(cfg).await;
    shim("prague", &t.events, &t.dlq, &[ads(2, "SCANS", "High", ip)]);
    let r = result_of(&read_topic(&t.results, 2), "2").clone();
    assert_eq!(r["outcome"], "failed", "{r}");

    // The next detection still asks first: the rule is found, not sent blind.
    sim_faults(&sim.url, json!({"unreachable_gateways": []})).await;
    shim("prague", &t.events, &t.dlq, &[ads(3, "SCANS", "High", ip)]);
    let r = result_of(&read_topic(&t.results, 3), "3").clone();
    assert_eq!(
        (r["outcome"].as_str(), r["code"].as_str()),
        (Some("blocked"), Some("verified")),
        "{r}"
    );
    assert_eq!(
        adds_for(&sim, ip)["gw-1"],
        1,
        "sent once, by the first replica"
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_and_special_addresses_are_never_blocked_whoever_produced_the_event() {
    let sim = sim().await;
    let t = topics();
    let cfg = config(&t, &one_target(&sim, &["gw-1"]));
    create_topic(&t.events, 3).await;
    // Another producer than the shim writes an IPv4-mapped IPv6 source: it is its IPv4 address.
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.47")],
    );
    let original = read_topic(&t.events, 1)[0].clone();
    for (id, source) in [
        ("2", "::ffff:10.99.0.5"),
        ("3", "224.0.0.5"),
        ("4", "::ffff:169.254.1.1"),
    ] {
        let mut event = original.value.clone();
        event["flowmon"]["source"] = source.into();
        event["flowmon"]["event_id"] = id.into();
        event["id"] = format!("{id:0>32}").into();
        produce(&t.events, source, event.to_string().as_bytes());
    }
    let (_http, cancel, task) = start(cfg).await;
    let results = read_topic(&t.results, 4);
    assert_eq!(result_of(&results, "1")["outcome"], "blocked");
    let mapped = result_of(&results, "2");
    assert_eq!(mapped["outcome"], "suppressed", "{mapped}");
    assert_eq!(mapped["ip"], "10.99.0.5", "reported as the IPv4 address");
    for id in ["3", "4"] {
        let r = result_of(&results, id);
        assert_eq!(
            (r["outcome"].as_str(), r["code"].as_str()),
            (Some("not_blockable"), Some("special_address")),
            "{r}"
        );
        assert_schema("samgate.result.v1.json", r);
    }
    let blocked = sim.blocked_sources();
    assert_eq!(blocked["gw-1"].len(), 1, "{blocked:?}");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_server_whose_address_is_unknown_refuses_the_start() {
    let t = topics();
    let text = format!(
        "[kafka]\nbrokers = \"{}\"\n[run]\nhttp_listen = \"127.0.0.1:0\"\n[checkpoint.servers.hq]\nurl = \"https://samgate-no-such-host.invalid\"\napi_key = \"k\"\n[targets.edge]\nserver = \"hq\"\ngateways = [\"gw-1\"]\n[sites.prague]\ntargets = [\"edge\"]\n[kafka.topics]\nevents = \"{}\"\nresults = \"{}\"\ndlq = \"{}\"\nstate = \"{}\"\n",
        brokers(), t.events, t.results, t.dlq, t.state
    );
    let cfg = Config::from_toml(&text).unwrap().validate().unwrap();
    let error = samgate::pipeline::run(cfg, CancellationToken::new(), |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("checkpoint.servers.hq") && error.contains("cannot resolve"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_state_cannot_be_read_is_not_consumed() {
    use samgate::pipeline::{rebuild, Shared};
    // The state topic cannot be read (here: no broker answers); deleting a topic on this broker
    // crashes librdkafka's metadata cache (docs/kafka-broker.md).
    let t = topics();
    let mut cfg = config(&t, "");
    cfg.kafka.brokers = dead_broker();
    let shared = std::sync::Arc::new(Shared {
        producer: samgate::kafka::producer(&cfg.kafka, Duration::from_secs(1)).unwrap(),
        metrics: std::sync::Arc::new(samgate::metrics::Metrics::new()),
        tracker: Default::default(),
        state: std::sync::Mutex::new(samgate::pipeline::dedupe::BlockState::new(
            1000,
            Duration::from_secs(3600),
        )),
        ownership: Default::default(),
        stopping: CancellationToken::new(),
        replica: "test".into(),
        events_partitions: 3,
        config: cfg,
    });
    let claims = shared.ownership.assign(&[0, 1]);
    let (tx, mut loaded) = tokio::sync::mpsc::unbounded_channel();
    let loader = tokio::spawn(rebuild::load(shared.clone(), claims, tx));
    let started = std::time::Instant::now();
    while shared.metrics.state_load_failures.get() == 0 {
        assert!(
            loaded.try_recv().is_err(),
            "nothing was read, so nothing is loaded"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the failure is never counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        loaded.try_recv().is_err(),
        "nothing was read, so nothing is loaded"
    );
    assert_eq!(
        shared.ownership.loading(),
        vec![0, 1],
        "not consumed, and said so"
    );
    assert!(!shared.ownership.ready(0) && !shared.ownership.ready(1));
    assert_eq!(shared.metrics.state_loading.get(), 2);
    // The reads go on until the partitions are revoked; then the loader ends.
    shared.ownership.revoke(&[0, 1]);
    tokio::time::timeout(Duration::from_secs(60), loader)
        .await
        .expect("the loader ends once the partitions are gone")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_another_replica_claims_is_fenced_then_claimed_afresh() {
    let sim = sim().await;
    let t = topics();
    create_topic(&t.events, 1).await;
    let cfg = config(&t, &one_target(&sim, &["gw-1"]));
    let (http, cancel, task) = start(cfg).await;
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(1, "SCANS", "High", "198.51.100.50")],
    );
    assert_eq!(read_topic(&t.results, 1)[0].value["outcome"], "blocked");

    // Another replica claims partition 0 (a zombie's view: the group never told us).
    let claim = json!({"schema": "samgate.claim.v1", "partition": 0, "replica": "another/1/1",
                       "claimed_at": "2026-11-29T12:00:00.000Z"});
    produce(&t.state, "claim", claim.to_string().as_bytes());
    let started = std::time::Instant::now();
    loop {
        let metrics = reqwest::get(format!("{http}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("samgate_fenced_partitions_total 1") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never fenced:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The replica left the group and joined it again: the group assigns the partition afresh
    // (here, to the only member), and its new claim, later than the other one, lets it work on
    // the partition again. Had it stayed fenced, nobody would consume the partition once the
    // claimer went away (as here: "another" never consumes anything).
    shim(
        "prague",
        &t.events,
        &t.dlq,
        &[ads(2, "SCANS", "High", "198.51.100.51")],
    );
    let results = read_topic_within(&t.results, 2, Duration::from_secs(60));
    assert_eq!(results.len(), 2, "{results:#?}");
    let second = results
        .iter()
        .find(|r| r.value["ip"] == "198.51.100.51")
        .expect("the next event is answered");
    assert_eq!(second.value["outcome"], "blocked");
    assert_eq!(adds_for(&sim, "198.51.100.51")["gw-1"], 1, "sent once");
    assert_eq!(adds_for(&sim, "198.51.100.50")["gw-1"], 1, "not sent again");
    cancel.cancel();
    task.await.unwrap();
}
