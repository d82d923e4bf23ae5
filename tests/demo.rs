//! `samgate demo` as a newcomer runs it: the built binary, nothing else started. It must show a
//! blocked, a duplicate, a filtered and a suppressed decision, serve `/metrics` while it runs,
//! and end with a summary that matches the rules on the simulated gateways.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `GET /metrics` over a plain socket.
fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("metrics listener");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn the_demo_shows_each_kind_of_decision_and_sums_them_up() {
    let mut child = common::samgate_command()
        .args(["demo", "--duration", "8s", "--interval", "1s"])
        .args(["--listen", "127.0.0.1:0", "--feed-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("samgate demo runs");
    let rx = common::line_channel(child.stdout.take().unwrap());

    let started = Instant::now();
    let (mut lines, mut metrics_addr, mut metrics) = (Vec::<String>::new(), None, None);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(address) = common::demo_metrics_address(&line) {
                    metrics_addr = Some(address);
                }
                // Scrape while the demo runs, once something was blocked.
                if metrics.is_none() && line.split_whitespace().nth(4) == Some("blocked") {
                    metrics = Some(scrape(metrics_addr.as_deref().expect("metrics address")));
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the demo did not end:\n{}", lines.join("\n"));
        }
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let output = lines.join("\n");
    assert!(status.success(), "{output}\n{stderr}");

    // The live table: one row per decision, the outcome in the fifth column.
    let header = lines
        .iter()
        .position(|l| l.starts_with("time "))
        .expect("table header");
    let summary = lines
        .iter()
        .position(|l| l.starts_with("summary:"))
        .expect("summary");
    let mut rows: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut operator: Vec<(&str, &str)> = Vec::new();
    let mut blocks_at: BTreeMap<&str, usize> = BTreeMap::new();
    let mut listed_by_results: Vec<&str> = Vec::new();
    for row in &lines[header + 1..summary] {
        match row.split_whitespace().collect::<Vec<_>>()[..] {
            [_, _, source, "operator", outcome, ..] => operator.push((source, outcome)),
            [_, _, source, _method, "blocked", "estate", ..] => {
                rows.entry("blocked").or_default().push(source);
                listed_by_results.push(source);
            }
            [_, site, source, _method, outcome, ..] => {
                rows.entry(outcome).or_default().push(source);
                if outcome == "blocked" {
                    *blocks_at.entry(site).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    // The operator's unblock with an exemption: the exemption's result and a removal per
    // target of Prague (its gateway and the feed), and the address's next detection exempted.
    operator.sort();
    assert_eq!(
        operator,
        [
            ("198.51.100.23", "exempted"),
            ("198.51.100.23", "unblocked"),
            ("198.51.100.23", "unblocked")
        ],
        "{output}"
    );
    assert!(
        rows.get("exempted")
            .is_some_and(|s| s.contains(&"198.51.100.23")),
        "the unblocked address's next detection is exempted:\n{output}"
    );
    for outcome in ["blocked", "duplicate", "filtered", "suppressed"] {
        assert!(rows.contains_key(outcome), "no {outcome} row:\n{output}");
    }
    assert!(!rows.contains_key("failed"), "{output}");
    assert!(
        rows["suppressed"].iter().all(|s| *s == "10.10.0.53"),
        "only the protected server is suppressed:\n{output}"
    );
    assert!(
        rows["blocked"].contains(&"2001:db8:bad::17"),
        "the IPv6 source is blocked:\n{output}"
    );

    // The summary agrees with the table and with the gateways.
    let results = rows.values().map(Vec::len).sum::<usize>();
    let sent_line = &lines[summary];
    assert!(
        sent_line.ends_with(&format!(", {results} results (one per target)")),
        "{sent_line} vs {results} rows"
    );
    let words: Vec<&str> = sent_line.split_whitespace().collect();
    let (sent, decided): (usize, usize) = (words[1].parse().unwrap(), words[5].parse().unwrap());
    assert_eq!(sent, decided, "every event sent has all of its results");
    let blocked = rows["blocked"].len();
    let outcomes = lines
        .iter()
        .find(|l| l.trim_start().starts_with("outcomes"))
        .unwrap();
    assert!(
        outcomes.contains(&format!("blocked {blocked} ")),
        "{outcomes}"
    );
    let rules: usize = lines[summary..]
        .iter()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words.get(2) == Some(&"rule(s):")).then(|| words[1].parse::<usize>().unwrap())
        })
        .sum();
    // Prague's blocks go to one gateway, Brno's to two, Ostrava's to its FortiGate; the
    // unblocked one is gone.
    let at = |site: &str| blocks_at.get(site).copied().unwrap_or(0);
    assert!(
        at("ostrava") > 0,
        "the FortiGate site blocks too:\n{output}"
    );
    assert_eq!(
        rules,
        at("prague") - 1 + 2 * at("brno") + at("ostrava"),
        "{output}"
    );
    assert!(output.contains("logins 1"), "one login: {output}");

    // The feed, as the demo fetched it at the end: only addresses whose block on the feed was
    // reported, never the protected server nor the unblocked (and exempted) address.
    let feed = lines[summary..]
        .iter()
        .find_map(|l| l.trim().strip_prefix("feed         estate: "))
        .unwrap_or_else(|| panic!("no feed line:\n{output}"));
    let (count, listed) = feed.split_once(" address(es) listed: ").expect("feed line");
    let listed: Vec<&str> = listed.split(", ").filter(|s| !s.is_empty()).collect();
    assert_eq!(count.parse::<usize>().unwrap(), listed.len(), "{feed}");
    assert!(!listed.is_empty(), "the feed lists the blocks:\n{output}");
    for ip in &listed {
        assert!(
            listed_by_results.contains(ip),
            "{ip} listed, never blocked on it:\n{output}"
        );
    }
    for never in ["10.10.0.53", "198.51.100.23"] {
        assert!(!listed.contains(&never), "{never} is listed:\n{output}");
    }

    let metrics = metrics.expect("scraped /metrics while the demo ran");
    assert!(
        metrics.contains("samgate_decisions_total{outcome=\"blocked\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("samgate_firewall_logins_total"),
        "{metrics}"
    );
}
