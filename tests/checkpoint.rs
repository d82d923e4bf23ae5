//! The Management API client against the Check Point simulator over real HTTPS sockets.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use samgate::checkpoint::client::{settle_targets, Polling};
use samgate::checkpoint::sam::{
    self, Criteria, LogType, Operation, RuleKey, SamAction, SamMode, SamRule,
};
use samgate::checkpoint::{
    classify, ApiError, ErrorClass, ManagementClient, RunScript, TaskStatus,
};
use samgate::config::ManagementServerConfig;
use samgate::secret::Secret;
use samgate_sim::checkpoint::{self as simulator, RunningSimulator, SimulatorConfig};
use serde_json::{json, Value};

const PASSWORD: &str = "s3cret-Passw0rd!";

async fn simulator(tweak: impl FnOnce(&mut SimulatorConfig)) -> RunningSimulator {
    let mut config = SimulatorConfig {
        users: vec![("samgate".into(), PASSWORD.into())],
        task_duration: Duration::from_millis(200),
        ..SimulatorConfig::default()
    };
    tweak(&mut config);
    simulator::start(config).await.expect("simulator starts")
}

fn server_config(sim: &RunningSimulator) -> ManagementServerConfig {
    common::management_server(sim, "samgate", PASSWORD)
}

fn client(config: &ManagementServerConfig) -> ManagementClient {
    ManagementClient::new("mgmt", config)
        .unwrap()
        .with_polling(Polling {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        })
}

async fn state(sim: &RunningSimulator) -> Value {
    common::sim_state(&sim.url).await
}

async fn faults(sim: &RunningSimulator, body: Value) {
    common::sim_faults(&sim.url, body).await
}

fn rule(ip: &str) -> SamRule {
    SamRule {
        action: SamAction::Drop,
        close_connections: true,
        criteria: Criteria::Src(ip.parse().unwrap()),
        timeout_secs: Some(3600),
        log: LogType::Log,
        key: RuleKey::parse("0123456789abcdef0123456789abcdef"),
    }
}

async fn block(
    client: &ManagementClient,
    rules: &[SamRule],
    mode: SamMode,
) -> Result<Vec<samgate::checkpoint::Task>, ApiError> {
    let script = sam::batch_script(rules, mode, Operation::Block).unwrap();
    let targets = vec!["gw-1".to_string()];
    client
        .run_script_to_end(&RunScript {
            name: "samgate",
            script: &script,
            targets: &targets,
            comments: "test",
        })
        .await
}

#[tokio::test]
async fn many_run_scripts_share_one_session_and_rules_reach_the_gateway() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    for i in 1..=5 {
        let tasks = block(&client, &[rule(&format!("192.0.2.{i}"))], SamMode::FwSam)
            .await
            .unwrap();
        assert_eq!(tasks[0].status, TaskStatus::Succeeded);
        assert_eq!(
            sam::parse_outcomes(&tasks[0].details[0].output, 1),
            vec![Some(0)]
        );
    }
    let s = state(&sim).await;
    assert_eq!(s["logins"], 1, "exactly one login");
    assert_eq!(client.logins(), 1);
    assert_eq!(s["calls"]["run-script"], 5);
    let rules = s["gateways"]["gw-1"]["sam"].as_array().unwrap();
    assert_eq!(rules.len(), 5);
    assert_eq!(rules[0]["criteria"], json!(["src", "192.0.2.1"]));
    assert_eq!(rules[0]["tags"]["originator"], "samgate");
    client.logout().await;
    assert_eq!(state(&sim).await["active_sessions"], 0);
}

#[tokio::test]
async fn api_key_login_and_a_pinned_api_version() {
    let sim = simulator(|_| {}).await;
    let mut config = server_config(&sim);
    config.user = None;
    config.password = None;
    config.api_key = Some(Secret::new(sim.api_key.clone()));
    config.api_version = Some("1.7.1".into());
    let client = client(&config);
    let answer = client.call("show-api-versions", &json!({})).await.unwrap();
    assert_eq!(answer["current-version"], "1.8");
    assert_eq!(client.logins(), 1);

    config.api_version = Some("9.9".into());
    let err = ManagementClient::new("mgmt", &config)
        .unwrap()
        .call("keepalive", &json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("err_unknown_api_version"), "{err}");
    assert_eq!(classify(&err), ErrorClass::Permanent);

    config.api_key = Some(Secret::new("wrong"));
    config.api_version = None;
    let err = ManagementClient::new("mgmt", &config)
        .unwrap()
        .call("keepalive", &json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("err_login_failed"));
    assert_eq!(classify(&err), ErrorClass::Auth);
}

#[tokio::test]
async fn a_lost_session_costs_exactly_one_login_and_one_retry() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    client.call("keepalive", &json!({})).await.unwrap();
    faults(&sim, json!({"expire_sessions": true})).await;
    client.call("keepalive", &json!({})).await.unwrap();
    let s = state(&sim).await;
    assert_eq!(s["logins"], 2);
    assert_eq!(
        s["calls"]["keepalive"], 3,
        "one call, one rejected, one retried"
    );
}

#[tokio::test]
async fn an_idle_session_expires_and_is_replaced_by_one_login() {
    let sim = simulator(|_| {}).await;
    let mut config = server_config(&sim);
    config.session_timeout = Duration::from_secs(10); // the server's minimum
    let client = client(&config);
    client.call("keepalive", &json!({})).await.unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await; // let the session idle out on the server
    client.call("keepalive", &json!({})).await.unwrap();
    client.call("keepalive", &json!({})).await.unwrap();
    assert_eq!(state(&sim).await["logins"], 2);
}

#[tokio::test]
async fn a_burst_of_session_failures_never_exceeds_the_login_budget() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    let mut limited = 0;
    for _ in 0..10 {
        faults(&sim, json!({"expire_sessions": true})).await;
        match client.call("keepalive", &json!({})).await {
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(classify(&e), ErrorClass::RateLimited(_)), "{e}");
                limited += 1;
            }
        }
    }
    let s = state(&sim).await;
    assert_eq!(s["logins"], 3, "never more than 3 logins a minute");
    assert_eq!(
        s["rate_limited_logins"], 0,
        "the client stopped itself before the server had to"
    );
    assert_eq!(limited, 7);
}

#[tokio::test]
async fn the_servers_login_limit_is_respected_and_backed_off() {
    let sim = simulator(|c| c.logins_per_minute = 1).await;
    let client = client(&server_config(&sim));
    client.call("keepalive", &json!({})).await.unwrap();
    faults(&sim, json!({"expire_sessions": true})).await;
    let err = client.call("keepalive", &json!({})).await.unwrap_err();
    assert!(err.is_too_many_requests(), "{err}");
    assert!(matches!(classify(&err), ErrorClass::RateLimited(d) if d >= Duration::from_secs(1)));
    // The client now backs off by itself instead of asking again.
    let again = client.call("keepalive", &json!({})).await.unwrap_err();
    assert!(matches!(again, ApiError::LoginLimited { .. }), "{again}");
    assert_eq!(state(&sim).await["rate_limited_logins"], 1);
}

#[tokio::test]
async fn tasks_are_polled_to_every_terminal_status() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    for (fault, expected) in [
        (Value::Null, TaskStatus::Succeeded),
        (json!("failed"), TaskStatus::Failed),
        (json!("partially succeeded"), TaskStatus::PartiallySucceeded),
        (
            json!("succeeded with warnings"),
            TaskStatus::SucceededWithWarnings,
        ),
    ] {
        faults(&sim, json!({"task_status": fault})).await;
        let tasks = block(&client, &[rule("192.0.2.50")], SamMode::FwSam)
            .await
            .unwrap();
        assert_eq!(tasks[0].status, expected);
        assert_eq!(tasks[0].progress, 100);
    }
    assert!(state(&sim).await["calls"]["show-task"].as_u64().unwrap() >= 4);
}

#[tokio::test]
async fn a_task_that_never_finishes_times_out() {
    let sim = simulator(|c| c.task_duration = Duration::from_secs(3600)).await;
    let mut config = server_config(&sim);
    config.task_timeout = Duration::from_millis(600);
    let err = block(&client(&config), &[rule("192.0.2.51")], SamMode::FwSam)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::TaskTimeout { .. }), "{err}");
    assert_eq!(classify(&err), ErrorClass::Retryable);
}

#[tokio::test]
async fn per_rule_outcomes_come_back_from_one_batch() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    let mut rules = vec![rule("192.0.2.1"), rule("192.0.2.2"), rule("2001:db8::3")];
    let tasks = block(&client, &rules, SamMode::FwSam).await.unwrap();
    assert_eq!(
        sam::parse_outcomes(&tasks[0].details[0].output, 3),
        vec![Some(0), Some(0), Some(0)]
    );
    // fw samp: persistent, tagged rules, then a flush.
    rules.truncate(2);
    let tasks = block(&client, &rules, SamMode::FwSamp).await.unwrap();
    assert_eq!(
        sam::parse_outcomes(&tasks[0].details[0].output, 2),
        vec![Some(0), Some(0)]
    );
    let s = state(&sim).await;
    assert_eq!(s["gateways"]["gw-1"]["sam"].as_array().unwrap().len(), 3);
    let samp = s["gateways"]["gw-1"]["samp"].as_array().unwrap();
    assert_eq!(samp.len(), 2);
    assert_eq!(
        samp[0]["comment"],
        "samgate:0123456789abcdef0123456789abcdef"
    );
}

#[tokio::test]
async fn html_answers_become_clear_errors() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    client.call("keepalive", &json!({})).await.unwrap();
    faults(&sim, json!({"html_502_next": 1})).await;
    let err = client.call("keepalive", &json!({})).await.unwrap_err();
    assert!(
        matches!(err, ApiError::NotJson { status: 502, .. }),
        "{err}"
    );
    assert_eq!(classify(&err), ErrorClass::Retryable);
    faults(&sim, json!({"html_403_next": 1})).await;
    let err = client.call("keepalive", &json!({})).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("API access not allowed from this address?"),
        "{err}"
    );
    assert_eq!(classify(&err), ErrorClass::Permanent);
    faults(&sim, json!({"http_500_next": 1})).await;
    let err = client.call("keepalive", &json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some("generic_internal_error"));
    assert_eq!(classify(&err), ErrorClass::Retryable);
    // Faults switch off again: the next call works, on the same session.
    client.call("keepalive", &json!({})).await.unwrap();
    assert_eq!(client.logins(), 1);
}

#[tokio::test]
async fn an_unknown_target_is_a_permanent_error() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    let targets = vec!["gw-9".to_string()];
    let err = client
        .run_script(&RunScript {
            name: "x",
            script: "fw sam -D",
            targets: &targets,
            comments: "",
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("generic_err_object_not_found"), "{err}");
    assert_eq!(classify(&err), ErrorClass::Permanent);
    faults(&sim, json!({"unknown_targets": ["gw-1"]})).await;
    assert!(block(&client, &[rule("192.0.2.1")], SamMode::FwSam)
        .await
        .is_err());
    faults(&sim, json!({"clear": true})).await;
    assert!(block(&client, &[rule("192.0.2.1")], SamMode::FwSam)
        .await
        .is_ok());
}

#[tokio::test]
async fn tasks_the_answer_does_not_name_are_told_apart_by_their_names_not_their_order() {
    let sim = simulator(|_| {}).await;
    let client = client(&server_config(&sim));
    // gw-2 cannot be reached; the answer names no target and lists gw-2's task first.
    faults(
        &sim,
        json!({"unreachable_gateways": ["gw-2"], "unnamed_tasks_next": 1}),
    )
    .await;
    let targets = vec!["gw-1".to_string(), "gw-2".to_string()];
    let script = sam::batch_script(&[rule("192.0.2.1")], SamMode::FwSam, Operation::Block).unwrap();
    let mut refs = client
        .run_script(&RunScript {
            name: "samgate block",
            script: &script,
            targets: &targets,
            comments: "",
        })
        .await
        .unwrap();
    assert!(
        refs.iter().all(|r| r.target.is_empty()),
        "two targets and no names: the order says nothing"
    );
    let ids: Vec<String> = refs.iter().map(|r| r.task_id.clone()).collect();
    let tasks = client.wait_tasks(&ids).await.unwrap();
    settle_targets(&mut refs, &tasks, "samgate block", &targets);
    let status_of = |gateway: &str| {
        let r = refs.iter().find(|r| r.target == gateway).expect(gateway);
        let task = tasks.iter().find(|t| t.task_id == r.task_id).unwrap();
        task.status.clone()
    };
    assert_eq!(status_of("gw-1"), TaskStatus::Succeeded);
    assert_eq!(status_of("gw-2"), TaskStatus::Failed);
}

#[tokio::test]
async fn the_pinned_fingerprint_fails_closed_and_names_both_values() {
    let sim = simulator(|_| {}).await;
    let other = simulator(|_| {}).await;
    let mut config = server_config(&sim);
    config.tls.fingerprint_sha256 = other.fingerprint.clone();
    let err = client(&config)
        .call("keepalive", &json!({}))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ApiError::Transport { tls: true, .. }),
        "{text}"
    );
    assert_eq!(classify(&err), ErrorClass::Permanent);
    assert!(
        text.contains(other.fingerprint.as_deref().unwrap()),
        "expected value named: {text}"
    );
    assert!(
        text.contains(sim.fingerprint.as_deref().unwrap()),
        "presented value named: {text}"
    );
    assert_eq!(
        state(&sim).await["calls"]["login"],
        Value::Null,
        "no credentials were sent"
    );

    // Lower case without colons is the same pin.
    config.tls.fingerprint_sha256 = sim
        .fingerprint
        .as_ref()
        .map(|f| f.replace(':', "").to_lowercase());
    client(&config).call("keepalive", &json!({})).await.unwrap();

    // Default CA verification refuses a self-signed certificate.
    config.tls.fingerprint_sha256 = None;
    let err = client(&config)
        .call("keepalive", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Transport { tls: true, .. }),
        "{err}"
    );
}

/// A log writer the test can read back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What constructing a client for `url` logs at WARN.
fn warnings_for(url: &str) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let config = common::management_server_at(url, "samgate", PASSWORD);
    tracing::subscriber::with_default(subscriber, || {
        ManagementClient::new("mgmt", &config).unwrap();
    });
    let logs = captured.0.lock().unwrap().clone();
    String::from_utf8(logs).unwrap()
}

#[test]
fn a_plain_http_management_url_is_warned_about() {
    let plain = warnings_for("http://127.0.0.1:8443");
    assert!(plain.contains("plain HTTP"), "{plain}");
    assert!(
        plain.contains("server=\"mgmt\""),
        "names the server: {plain}"
    );
    assert!(!plain.contains(PASSWORD));
    let tls = warnings_for("https://127.0.0.1:8443");
    assert!(!tls.contains("plain HTTP"), "{tls}");
}

#[test]
fn logs_and_errors_never_contain_a_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let mut shown = Vec::new();
    let api_key = tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let sim = simulator(|_| {}).await;
            let config = server_config(&sim);
            let client = client(&config);
            shown.push(format!("{client:?} {config:?}"));
            block(&client, &[rule("192.0.2.1")], SamMode::FwSam)
                .await
                .unwrap();
            faults(&sim, json!({"expire_sessions": true})).await;
            client.call("keepalive", &json!({})).await.unwrap();
            faults(&sim, json!({"http_500_next": 1})).await;
            shown.push(
                client
                    .call("keepalive", &json!({}))
                    .await
                    .unwrap_err()
                    .to_string(),
            );
            let mut key_config = config.clone();
            key_config.user = None;
            key_config.password = None;
            key_config.api_key = Some(Secret::new(sim.api_key.clone()));
            let key_client = ManagementClient::new("mgmt", &key_config).unwrap();
            key_client.call("keepalive", &json!({})).await.unwrap();
            shown.push(format!("{key_config:?}"));
            key_client.logout().await;
            client.logout().await;
            sim.api_key.clone()
        })
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("logged in"), "the capture works: {logs}");
    let everything = format!("{logs}\n{}", shown.join("\n"));
    assert!(!everything.contains(PASSWORD), "password leaked");
    assert!(!everything.contains(&api_key), "API key leaked");
    // Session ids are 43-character URL-safe tokens; none may appear.
    let sid_like = everything
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .find(|w| w.len() == 43);
    assert_eq!(sid_like, None, "a session id leaked");
}

#[tokio::test]
async fn keepalive_holds_the_session_and_shutdown_logs_out() {
    let sim = simulator(|_| {}).await;
    let mut config = server_config(&sim);
    config.session_timeout = Duration::from_secs(10); // the server's minimum
    let client = Arc::new(client(&config));
    client.call("keepalive", &json!({})).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let keeper = tokio::spawn({
        let client = client.clone();
        let cancel = cancel.clone();
        async move { client.run_keepalive(cancel).await }
    });
    // Longer than the idle timeout, with no calls of our own.
    tokio::time::sleep(Duration::from_secs(12)).await;
    client.call("keepalive", &json!({})).await.unwrap();
    let s = state(&sim).await;
    assert_eq!(s["logins"], 1, "the session never idled out");
    assert!(s["calls"]["keepalive"].as_u64().unwrap() >= 3);
    cancel.cancel();
    keeper.await.unwrap();
    let s = state(&sim).await;
    assert_eq!(s["calls"]["logout"], 1);
    assert_eq!(s["active_sessions"], 0);
}

/// Each mode's unblock takes as many tokens of the server's rate limit as it makes calls:
/// `fw sam -C` reaches every gateway in one run-script, `fw samp del` names each gateway's own
/// uids in a run-script of its own.
#[tokio::test]
async fn an_unblock_takes_a_rate_limit_token_per_server_call() {
    use samgate::checkpoint::enforcer::CheckPointEnforcer;
    use samgate::enforcer::{Enforcer, Removal};
    use samgate::pipeline::decide::Enforce;
    use samgate::pipeline::dedupe::Origin;
    use samgate::pipeline::policy::{idempotency_key, Policy};

    let gateways: Vec<String> = ["gw-1", "gw-2", "gw-3"].map(String::from).to_vec();
    for (mode, sam_mode, calls) in [
        ("fw_sam", SamMode::FwSam, 1),
        ("fw_samp", SamMode::FwSamp, 3),
    ] {
        let sim = simulator(|c| c.gateways = gateways.clone()).await;
        let config = samgate::config::Config::from_toml(&format!(
            r#"
            [checkpoint.servers.hq]
            url = "https://192.0.2.250"
            api_key = "k"
            [targets.edge]
            server = "hq"
            gateways = ["gw-1", "gw-2", "gw-3"]
            mode = "{mode}"
            [sites.s]
            targets = ["edge"]
            "#
        ))
        .unwrap()
        .validate()
        .unwrap();
        let target = Arc::new(Policy::new(&config, &[]).target("edge").unwrap().clone());
        let enforces: Vec<Enforce> = ["198.51.100.1", "2001:db8::2"]
            .into_iter()
            .map(|ip| {
                let ip = ip.parse().unwrap();
                let key = idempotency_key(&target, ip);
                Enforce {
                    target: target.clone(),
                    key,
                    rule: target.rule(ip, Duration::from_secs(3600), key),
                    level: 0,
                    duration: Duration::from_secs(3600),
                    verify_first: None,
                    origin: Origin::Manual,
                    mac: None,
                }
            })
            .collect();
        let all: Vec<&Enforce> = enforces.iter().collect();
        let enforcer = CheckPointEnforcer::new(
            Arc::new(client(&server_config(&sim))),
            sam_mode,
            SamAction::Drop,
        );
        enforcer.block(&all, &gateways).await.unwrap();
        let found = enforcer.verify(&all, &gateways).await.unwrap().handles;
        let removals: Vec<Removal> = enforces
            .iter()
            .zip(&found)
            .map(|(enforce, found)| Removal { enforce, found })
            .collect();
        let before = state(&sim).await["calls"]["run-script"].as_u64().unwrap();
        enforcer.unblock(&removals, &gateways).await.unwrap();
        let s = state(&sim).await;
        let made = s["calls"]["run-script"].as_u64().unwrap() - before;
        assert_eq!(made, calls, "{mode}: run-scripts of one unblock");
        assert_eq!(
            u64::from(enforcer.unblock_calls(gateways.len())),
            made,
            "{mode}: tokens taken"
        );
        for gateway in &gateways {
            let held = |table: &str| s["gateways"][gateway][table].as_array().map_or(0, Vec::len);
            assert_eq!(
                (held("sam"), held("samp")),
                (0, 0),
                "{mode}: {gateway} {s:#}"
            );
        }
    }
}
