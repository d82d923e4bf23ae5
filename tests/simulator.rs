//! The Check Point simulator as a firewall: what scripts do to its gateways, seen through
//! `/sim/state`, and the `samgate simulate checkpoint` binary itself.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use samgate::checkpoint::client::Polling;
use samgate::checkpoint::{ManagementClient, RunScript, TaskStatus};
use samgate_sim::checkpoint::{self as simulator, RunningSimulator, SimulatorConfig};
use serde_json::{json, Value};

async fn start() -> (RunningSimulator, ManagementClient) {
    let sim = simulator::start(SimulatorConfig {
        task_duration: Duration::from_millis(100),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let config = common::management_server(&sim, "admin", "admin123");
    let client = ManagementClient::new("sim", &config)
        .unwrap()
        .with_polling(Polling {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(100),
        });
    (sim, client)
}

async fn run(client: &ManagementClient, target: &str, script: &str) -> samgate::checkpoint::Task {
    let targets = vec![target.to_string()];
    client
        .run_script_to_end(&RunScript {
            name: "test",
            script,
            targets: &targets,
            comments: "",
        })
        .await
        .unwrap()
        .remove(0)
}

async fn gateway(sim: &RunningSimulator, name: &str) -> Value {
    common::sim_state(&sim.url).await["gateways"][name].clone()
}

#[tokio::test]
async fn a_block_lands_on_its_gateway_and_leaves_on_cancel_or_timeout() {
    let (sim, client) = start().await;
    let task = run(
        &client,
        "gw-2",
        "fw sam -t 3 -l nolog -J src 203.0.113.9\nfw sam -l nolog -J src 203.0.113.10",
    )
    .await;
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert_eq!(task.details[0].output, "", "fw sam is silent on success");
    assert!(
        gateway(&sim, "gw-1").await["sam"]
            .as_array()
            .unwrap()
            .is_empty(),
        "only the target gateway"
    );
    let rules = gateway(&sim, "gw-2").await["sam"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rules.len(), 2);

    // Expiry is real time, counted from the millisecond the rule was added (the timed rule lives
    // three seconds, far longer than the 100 ms task and the read above): wait until its
    // rounded-up expiry has passed.
    let expires = rules.iter().find_map(|r| r["expires"].as_i64()).unwrap();
    while chrono::Utc::now().timestamp() < expires {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rules = gateway(&sim, "gw-2").await["sam"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["criteria"], json!(["src", "203.0.113.10"]));

    let task = run(&client, "gw-2", "fw sam -l nolog -C -J src 203.0.113.10").await;
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert!(gateway(&sim, "gw-2").await["sam"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_malformed_or_foreign_script_fails_its_task_like_a_gateway() {
    let (sim, client) = start().await;
    let task = run(&client, "gw-1", "fw sam -J src 10.0.0.300").await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.details[0].error.contains("invalid IP address"),
        "{:?}",
        task.details[0]
    );
    assert!(task.details[0].error.contains("Usage: fw sam"));
    let task = run(&client, "gw-1", "cat /etc/shadow").await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(task.details[0].error.contains("command not found"));
    assert!(gateway(&sim, "gw-1").await["sam"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn the_binary_serves_the_documented_defaults() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_samgate"))
        .args([
            "simulate",
            "checkpoint",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "--api-key",
            "k3y",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("simulator prints its address").unwrap();
        if let Some(rest) = line.trim().strip_prefix("web_api") {
            break rest.trim().to_owned();
        }
    };
    let http = reqwest::Client::new();
    let login: Value = http
        .post(format!("{url}/login"))
        .json(&json!({"user": "admin", "password": "admin123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = login["sid"].as_str().expect("a session id").to_owned();
    let gateways: Value = http
        .post(format!(
            "{url}/v{}/show-gateways-and-servers",
            login["api-server-version"].as_str().unwrap()
        ))
        .header("X-chkp-sid", &sid)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = gateways["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gw-1", "gw-2"]);
    let by_key: Value = http
        .post(format!("{url}/login"))
        .json(&json!({"api-key": "k3y"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(by_key["sid"].is_string(), "{by_key}");
    let missing = http
        .post(format!("{url}/keepalive"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 400);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["message"], "Missing header: [X-chkp-sid]");
    let unknown = http
        .post(format!("{url}/v1.8/no-such-command"))
        .header("X-chkp-sid", &sid)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    child.kill().unwrap();
    child.wait().unwrap();
}
