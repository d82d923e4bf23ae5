//! The dashboard and the alert rules on a real Prometheus (from `scripts/deploy-tools`) that
//! scrapes a running samgate (the demo's pipeline and its feed server): every dashboard query
//! returns series, every alert rule evaluates without error, and nothing fires while all is
//! well.

mod common;

use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `samgate demo`, running until the test ends; the addresses of its two /metrics (the
/// pipeline's and the feed server's).
fn start_demo() -> (common::KillOnDrop, [String; 2], mpsc::Receiver<String>) {
    let mut child = common::samgate_command()
        .args(["demo", "--duration", "10m", "--interval", "1s"])
        .args(["--listen", "127.0.0.1:0", "--feed-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("samgate demo runs");
    let rx = common::line_channel(child.stdout.take().unwrap());
    let demo = common::KillOnDrop(child);
    let (mut pipeline, mut feed) = (None, None);
    while pipeline.is_none() || feed.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the demo prints its metrics addresses");
        if let Some(address) = common::demo_metrics_address(&line) {
            pipeline = Some(address);
        }
        if let Some(rest) = line.trim().strip_prefix("feed metrics") {
            feed = common::demo_metrics_address(&format!("metrics {}", rest.trim()));
        }
    }
    (demo, [pipeline.unwrap(), feed.unwrap()], rx)
}

/// Prometheus scraping `targets` every second with samgate's alert rules; its base URL.
fn start_prometheus(dir: &std::path::Path, targets: &[String]) -> (common::KillOnDrop, String) {
    let rules = common::repo_path("helm/samgate/files/alerts.yaml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: samgate\n    static_configs:\n      - targets: {targets:?}\n",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = common::deploy_tool("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus runs");
    (common::KillOnDrop(child), format!("http://{listen}"))
}

async fn api(client: &reqwest::Client, url: &str, query: &[(&str, &str)]) -> Option<Value> {
    let response = client.get(url).query(query).send().await.ok()?;
    let body: Value = response.json().await.ok()?;
    assert_eq!(body["status"], "success", "{url} {query:?}: {body}");
    Some(body["data"].clone())
}

/// Every PromQL expression of the dashboard, with its panel's title, as Grafana would send it
/// (`$__rate_interval` at four scrape intervals).
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(common::repo_path("helm/samgate/files/dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "4s");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_work_on_prometheus_scraping_samgate() {
    let dir = tempfile::tempdir().unwrap();
    let (_demo, metrics, demo_lines) = start_demo();
    let (_prometheus, prometheus) = start_prometheus(dir.path(), &metrics);
    let client = reqwest::Client::new();
    let query_url = format!("{prometheus}/api/v1/query");
    let rules_url = format!("{prometheus}/api/v1/rules");

    let mut queries = dashboard_queries();
    assert!(queries.len() >= 15, "{} dashboard queries", queries.len());
    let started = Instant::now();
    let mut rules_ok = false;
    // Wait (no timing is asserted: the deadline only ends a run that would never pass) until
    // every dashboard query has returned series and every alert rule has been evaluated.
    while !(queries.is_empty() && rules_ok) {
        while demo_lines.try_recv().is_ok() {} // keep the demo's output flowing
        if started.elapsed() > Duration::from_secs(180) {
            let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap();
            panic!("queries still without series: {queries:#?}\nprometheus log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut pending = Vec::new();
        for (title, expr) in queries {
            match api(&client, &query_url, &[("query", &expr)]).await {
                Some(data) if !data["result"].as_array().unwrap().is_empty() => {}
                _ => pending.push((title, expr)),
            }
        }
        queries = pending;
        if let Some(data) = api(&client, &rules_url, &[("type", "alert")]).await {
            let rules: Vec<&Value> = data["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap())
                .collect();
            assert_eq!(rules.len(), 11, "{data}");
            for rule in &rules {
                assert_ne!(rule["health"], "err", "{rule}");
            }
            rules_ok = rules.iter().all(|r| r["health"] == "ok");
        }
    }

    // What the demo did shows: blocks and a login, and no alert fires on a healthy run.
    let scalar = |data: Value| -> f64 {
        data["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let blocked = api(
        &client,
        &query_url,
        &[(
            "query",
            r#"sum(samgate_decisions_total{outcome="blocked"})"#,
        )],
    )
    .await
    .unwrap();
    assert!(scalar(blocked) > 0.0);
    let logins = api(
        &client,
        &query_url,
        &[("query", "sum(samgate_firewall_logins_total)")],
    )
    .await
    .unwrap();
    assert_eq!(scalar(logins), 1.0);
    let alerts = api(&client, &query_url, &[("query", "ALERTS")])
        .await
        .unwrap();
    assert_eq!(alerts["result"], serde_json::json!([]), "{alerts}");
}
