//! `samgate shim` end to end: the built binary, run as Flowmon ADS runs it (parameters, stdin),
//! against the real broker that `scripts/test` starts.

mod common;

use common::*;

const SITE: &str = "prague";

fn ads_standard(id: u32, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        "2026-11-20 10:11:00",
        "SCANS",
        "Port scanning",
        "Security",
        "High",
        "TCP SYN scan of 1200 ports; $(reboot) `id`",
        "22,23,80",
        "TCP",
        source,
        " ",
        "10.0.0.1, 10.0.0.2",
        "edge",
        " ",
    ]
    .join("\t")
}

fn ads_extended(id: u32, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:13:02",
        "1763633460",
        "SSHDICT",
        "General",
        "TA0006 Credential Access",
        "SSH attack",
        "Security",
        "Critical",
        "attempts: 800",
        "22",
        "TCP",
        source,
        " ",
        "10.0.0.5",
        "dc",
        "alice",
    ]
    .join("\t")
}

fn ids(id: u32, source: &str) -> String {
    [
        &id.to_string(),
        "2026-11-20 10:00:00",
        "2026-11-20 10:05:00",
        source,
        "51515",
        "10.0.0.9",
        "445",
        "TCP",
        "2024217",
        "ET EXPLOIT SMB",
        "192.0.2.10",
        "eth1",
        "Attempted Administrator Privilege Gain",
        "1",
    ]
    .join("\t")
}

fn shim_args<'a>(brokers: &'a str, spool: &'a str, topic: &'a str, dlq: &'a str) -> Vec<&'a str> {
    // Exactly as ADS passes custom-script parameters: `--name 'value'`, empty values included,
    // and a parameter samgate does not know.
    vec![
        "shim",
        "--brokers",
        brokers,
        "--site",
        SITE,
        "--topic",
        topic,
        "--dlq-topic",
        dlq,
        "--spool-dir",
        spool,
        "--log-file",
        "",
        "--fw",
        "192.0.2.1",
        "--delivery-timeout",
        "3s",
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_line_becomes_an_event_or_a_dead_letter() {
    let brokers = brokers();
    let (topic, dlq) = (unique("events"), unique("dlq"));
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_str().unwrap();
    let trimmed = ads_standard(4, "192.0.2.44");
    let trimmed = trimmed.trim_end_matches([' ', '\t']);
    let input = [
        ads_standard(1, "198.51.100.7"),
        ads_extended(2, "2001:db8::66"),
        ids(3, "203.0.113.50"),
        trimmed.to_string(),
        r#"{"id":5,"timestamp":"2026-11-20 10:13:02","type":"RDPDICT","typeDesc":"RDP attack","severity":"MEDIUM","source":"198.51.100.9","targets":"10.1.1.1","detail":"x","perspective":"Security","netFlowSource":"core","userIdentity":""}"#.to_string(),
        String::new(), // blank: not an event, not an error
        "only\tthree\tfields".to_string(),
        ads_standard(7, "not-an-ip"),
    ]
    .join("\r\n");

    // The shim creates both topics itself (kafka.create_topics defaults to true).
    let out = samgate(
        &shim_args(&brokers, spool_dir, &topic, &dlq),
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ignoring unknown parameter --fw"),
        "{}",
        stderr(&out)
    );

    let events = read_topic(&topic, 5);
    let keys: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "192.0.2.44",
            "198.51.100.7",
            "198.51.100.9",
            "2001:db8::66",
            "203.0.113.50",
        ]
    );
    for event in &events {
        assert_schema("samgate.event.v1.json", &event.value);
        let v = &event.value;
        assert_eq!(v["site"], SITE);
        assert_eq!(v["flowmon"]["source"].as_str().unwrap(), event.key);
    }
    let by_source = |ip: &str| {
        events
            .iter()
            .find(|e| e.value["flowmon"]["source"] == ip)
            .unwrap()
            .value
            .clone()
    };
    let scan = by_source("198.51.100.7");
    assert_eq!(scan["flowmon"]["format"], "ads_standard");
    assert_eq!(scan["flowmon"]["method"], "SCANS");
    assert_eq!(scan["flowmon"]["priority"], "high");
    assert_eq!(
        scan["flowmon"]["targets"],
        serde_json::json!(["10.0.0.1", "10.0.0.2"])
    );
    assert_eq!(
        scan["raw"],
        ads_standard(1, "198.51.100.7"),
        "raw line kept, CR stripped"
    );
    let ssh = by_source("2001:db8::66");
    assert_eq!(ssh["flowmon"]["format"], "ads_extended");
    assert_eq!(ssh["flowmon"]["subtype"], "General");
    assert_eq!(ssh["flowmon"]["priority"], "critical");
    assert_eq!(by_source("203.0.113.50")["flowmon"]["format"], "ids");
    assert_eq!(by_source("192.0.2.44")["flowmon"]["format"], "ads_standard");
    assert_eq!(by_source("198.51.100.9")["flowmon"]["format"], "ads_json");

    let dead = read_topic(&dlq, 2);
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert_schema("samgate.dlq.v1.json", &d.value);
        assert_eq!(d.key, SITE);
        assert_eq!(d.value["stage"], "shim");
    }
    let mut errors: Vec<(u64, &str)> = dead
        .iter()
        .map(|d| {
            (
                d.value["line"].as_u64().unwrap(),
                d.value["error"].as_str().unwrap(),
            )
        })
        .collect();
    errors.sort();
    assert_eq!(errors, [(7, "field_count"), (8, "invalid_source")]);
    assert!(
        spooled(spool.path()).is_empty(),
        "delivered messages leave the spool"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_down_spools_then_the_next_run_delivers_spool_first() {
    let (topic, dlq) = (unique("events"), unique("dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_str().unwrap();

    let first: Vec<String> = (1..=3).map(|i| ads_standard(i, "198.51.100.1")).collect();
    let dead = dead_broker();
    let out = samgate(
        &shim_args(&dead, spool_dir, &topic, &dlq),
        first.join("\n").as_bytes(),
    );
    assert!(
        out.status.success(),
        "spooling is success: {}",
        stderr(&out)
    );
    let waiting = spooled(spool.path());
    assert_eq!(waiting.len(), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("stay spooled"), "{}", stderr(&out));

    let second: Vec<String> = (4..=5).map(|i| ads_standard(i, "198.51.100.1")).collect();
    let out = samgate(
        &shim_args(&brokers(), spool_dir, &topic, &dlq),
        second.join("\n").as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = read_topic(&topic, 5);
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e.value["flowmon"]["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5"],
        "spool first, in order, none twice"
    );
    assert!(spooled(spool.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn flush_spool_delivers_on_demand_without_reading_stdin() {
    let (topic, dlq) = (unique("events"), unique("dlq"));
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_str().unwrap();
    let dead = dead_broker();
    let out = samgate(
        &shim_args(&dead, spool_dir, &topic, &dlq),
        format!("{}\nbad line\n", ads_standard(1, "192.0.2.9")).as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(spooled(spool.path()).len(), 2);

    let brokers = brokers();
    let mut args = shim_args(&brokers, spool_dir, &topic, &dlq);
    args.extend(["--flush-spool", "true"]);
    let out = samgate(&args, ads_standard(2, "192.0.2.9").as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let events = read_topic(&topic, 1);
    assert_eq!(events.len(), 1, "stdin is not read by --flush-spool");
    assert_eq!(events[0].value["flowmon"]["event_id"], "1");
    assert_eq!(read_topic(&dlq, 1).len(), 1);
    assert!(spooled(spool.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_topic_is_named_and_nothing_is_lost() {
    let spool = tempfile::tempdir().unwrap();
    let config = spool.path().join("samgate.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\ncreate_topics = false\n",
            brokers()
        ),
    )
    .unwrap();
    let spool_dir = spool.path().join("spool");
    let topic = unique("absent");
    let out = samgate(
        &[
            "shim",
            "--config",
            config.to_str().unwrap(),
            "--site",
            SITE,
            "--topic",
            &topic,
            "--spool-dir",
            spool_dir.to_str().unwrap(),
        ],
        ads_standard(1, "192.0.2.1").as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("topic \\\"{topic}\\\" does not exist"))
            || stderr(&out).contains(&format!("topic \"{topic}\" does not exist")),
        "{}",
        stderr(&out)
    );
    assert_eq!(spooled(&spool_dir).len(), 1);
}

#[test]
fn bad_configuration_refuses_to_start_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("samgate.toml");
    std::fs::write(&config, "[shim]\ndelivery_timeout = \"10m\"\n").unwrap();
    let out = samgate(
        &["shim", "--config", config.to_str().unwrap(), "--site", SITE],
        b"",
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("shim.delivery_timeout"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");

    let out = samgate(&["shim", "--spool-dir", dir.path().to_str().unwrap()], b"");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--site"), "{}", stderr(&out));

    let out = samgate(&["check-config", "--config", "/nonexistent.toml"], b"");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_empty_run_succeeds_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // ADS may run the script with no events; nothing to deliver means no Kafka needed.
    let dead = dead_broker();
    let out = samgate(
        &[
            "shim",
            "--site",
            SITE,
            "--brokers",
            &dead,
            "--spool-dir",
            dir.path().to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(spooled(dir.path()).is_empty());
}

/// ADS loses a run the shim does not keep: a broken configuration (even in a section the shim
/// does not use), with Kafka down too, still keeps every line, and the next good run delivers
/// each exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_configuration_and_a_dead_broker_lose_nothing() {
    let (topic, dlq) = (unique("events"), unique("dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_dir = spool.to_str().unwrap();
    let config = dir.path().join("samgate.toml");
    let dead = dead_broker();
    let with_config = |brokers: &str, text: &str| {
        std::fs::write(&config, text).unwrap();
        let mut args = shim_args(brokers, spool_dir, &topic, &dlq);
        args.extend(["--config", config.to_str().unwrap()]);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let run = |args: &[String], ids: std::ops::RangeInclusive<u32>| {
        let input: Vec<String> = ids.map(|i| ads_standard(i, "198.51.100.7")).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        samgate(&args, input.join("\n").as_bytes())
    };

    // A mistake in the shim's own section: refused with a one-line reason, input kept raw.
    let out = run(&with_config(&dead, "[shim]\nmax_line_bytes = 10\n"), 1..=3);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("shim.max_line_bytes") && err.contains("spooled"),
        "{err}"
    );
    let reasons: Vec<&str> = err.lines().filter(|l| l.starts_with("samgate: ")).collect();
    assert_eq!(reasons.len(), 1, "one-line reason: {err}");
    assert_eq!(spooled_raw_lines(&spool), 3);

    // An invalid TOML file and a bad log filter: still kept.
    let mut args = with_config(&dead, "this is not TOML [");
    args.splice(0..0, ["--log".to_string(), "no such level ((".to_string()]);
    let out = run(&args, 4..=5);
    assert!(!out.status.success());
    assert_eq!(spooled_raw_lines(&spool), 5, "{}", stderr(&out));

    // A mistake in a section only `samgate run` reads does not stop the shim; Kafka is down,
    // so everything waits, now as messages.
    let out = run(
        &with_config(&dead, "[run]\nmax_in_flight = \"lots\"\n"),
        6..=6,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(spooled_raw_lines(&spool), 0);
    assert_eq!(spooled(&spool).len(), 6);

    let out = run(&with_config(&brokers(), ""), 7..=7);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids: Vec<String> = read_topic(&topic, 7)
        .iter()
        .map(|e| e.value["flowmon"]["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5", "6", "7"],
        "in order, none twice"
    );
    assert!(spooled(&spool).is_empty());
    assert_eq!(spooled_raw_lines(&spool), 0);
}

/// A spool on a full disk: the bytes already written move to the fallback spool, and the run
/// delivers everything. (Needs a small tmpfs: mounted when the test runs as root.)
#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_disk_moves_the_input_to_the_fallback() {
    let (topic, dlq) = (unique("events"), unique("dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            full.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "this test needs to mount a 64 KiB tmpfs (run as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.clone());
    let fallback = dir.path().join("fallback");

    // About 400 KiB of input: the tmpfs fills in the middle of it.
    let input: Vec<String> = (1..=1500)
        .map(|i| ads_standard(i, "198.51.100.8"))
        .collect();
    let brokers = brokers();
    let mut args = shim_args(&brokers, full.to_str().unwrap(), &topic, &dlq);
    let at = args
        .iter()
        .position(|a| *a == "--delivery-timeout")
        .unwrap();
    args[at + 1] = "20s";
    args.extend(["--fallback-spool-dir", fallback.to_str().unwrap()]);
    let out = samgate(&args, input.join("\n").as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("moved on to the next"),
        "{}",
        stderr(&out)
    );
    let events = read_topic(&topic, 1500);
    let ids: Vec<u32> = events
        .iter()
        .map(|e| {
            e.value["flowmon"]["event_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        ids,
        (1..=1500).collect::<Vec<_>>(),
        "every line, in order, once"
    );
    let left: Vec<_> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter().all(|n| n == "spool.lock"),
        "the full disk is left clean: {left:?}"
    );
    assert!(spooled(&fallback).is_empty());
}

/// A message Kafka refuses for good (here: larger than the producer's `message.max.bytes`) goes
/// to the dead-letter topic with the reason and its size, and leaves the spool.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_kafka_refuses_goes_to_the_dead_letter_topic() {
    let (topic, dlq) = (unique("events"), unique("dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("samgate.toml");
    std::fs::write(
        &config,
        "[kafka.properties]\n\"message.max.bytes\" = \"6000\"\n",
    )
    .unwrap();
    let spool = dir.path().join("spool");
    let brokers = brokers();
    let mut args = shim_args(&brokers, spool.to_str().unwrap(), &topic, &dlq);
    args.extend(["--config", config.to_str().unwrap()]);
    let mut big = ads_standard(2, "198.51.100.9");
    big = big.replace("TCP SYN scan", &"TCP SYN scan ".repeat(1000));
    let input = [ads_standard(1, "198.51.100.9"), big].join("\n");
    let out = samgate(&args, input.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_topic(&topic, 1).len(), 1);
    let dead = read_topic(&dlq, 1);
    assert_eq!(dead.len(), 1);
    let dead = &dead[0].value;
    assert_eq!(dead["error"], "kafka_refused", "{dead}");
    assert!(dead["raw_len"].as_u64().unwrap() > 6000, "{dead}");
    assert_eq!(dead["raw_truncated"], true, "{dead}");
    assert!(
        spooled(&spool).is_empty(),
        "the refused message left the spool"
    );
}

/// A scan of a large network names thousands of targets: the event is cut to fit (its target
/// list, with a count of what was left out), never dead-lettered, and keeps its source.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_with_thousands_of_targets_is_cut_to_fit_and_kept() {
    let (topic, dlq) = (unique("events"), unique("dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let spool = tempfile::tempdir().unwrap();
    let targets: Vec<String> = (0..20_000)
        .map(|i| format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256))
        .collect();
    let line = ads_standard(1, "198.51.100.10").replace("10.0.0.1, 10.0.0.2", &targets.join(", "));
    assert!(line.len() > 64 * 1024, "longer than max_line_bytes");
    let out = samgate(
        &shim_args(&brokers(), spool.path().to_str().unwrap(), &topic, &dlq),
        line.as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = read_topic(&topic, 1);
    let event = &events[0].value;
    assert_eq!(event["flowmon"]["source"], "198.51.100.10");
    let kept = event["flowmon"]["targets"].as_array().unwrap().len();
    let omitted = event["cut"]["targets_omitted"].as_u64().unwrap() as usize;
    assert!(kept > 100 && kept + omitted == 20_000, "{kept} + {omitted}");
    assert!(serde_json::to_vec(event).unwrap().len() <= 64 * 1024);
    // The shim has exited: whatever it dead-lettered is on the topic already.
    assert!(
        read_topic_within(&dlq, 0, std::time::Duration::from_secs(2)).is_empty(),
        "never dead-lettered"
    );
}
