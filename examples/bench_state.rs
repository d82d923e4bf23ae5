//! `scripts/bench state`: the block state of many tracked blocks, rebuilt from the state topic by
//! `samgate run`'s own code (`pipeline::rebuild`), as a replica does when it is assigned every
//! partition. Prints figures; asserts nothing about time.
//!
//! Usage: bench_state produce BROKERS TOPIC [BLOCKS] [PARTITIONS]
//!        bench_state rebuild BROKERS TOPIC [PARTITIONS]
//! Two runs, so the rebuild's memory is measured in a process that produced nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use samgate::checkpoint::sam::RuleKey;
use samgate::config::Config;
use samgate::pipeline::dedupe::{BlockRecord, BlockState, STATE_SCHEMA};
use samgate::pipeline::{rebuild, Control, Shared};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// This process's resident and peak resident memory, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn produce(brokers: &str, topic: &str, blocks: u64, partitions: i32) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "50")
        .set("batch.num.messages", "10000")
        .set("compression.type", "zstd")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let now = Utc::now();
    for i in 0..blocks {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&i.to_be_bytes());
        key[8..].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes());
        let record = BlockRecord {
            schema: STATE_SCHEMA.into(),
            key: RuleKey::from_bytes(key),
            site: format!("site-{}", i % 20),
            ip: std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
            target: format!("edge-{}", i % 20),
            level: (i % 4) as u32,
            blocked_at: now,
            expires_at: now + chrono::Duration::days(7),
            event_id: format!("{:032x}", i),
            pending: false,
            writer: Some("bench".into()),
            origin: Default::default(),
            actor: None,
            expired: false,
        };
        let payload = serde_json::to_string(&record).unwrap();
        let key = record.key.to_string();
        let partition = (i % partitions as u64) as i32;
        loop {
            let sent = producer.send(
                BaseRecord::to(topic)
                    .key(&key)
                    .payload(&payload)
                    .partition(partition),
            );
            match sent {
                Ok(()) => break,
                Err((e, _))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(600)).expect("flushed");
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "produced={blocks} seconds={seconds:.1} records_per_s={:.0}",
        blocks as f64 / seconds
    );
}

async fn rebuild_all(brokers: &str, topic: &str, partitions: i32) {
    let text = format!(
        "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\nstate = \"{topic}\"\n[run]\ngroup_id = \"bench-state\"\nmax_tracked_blocks = 100000000\n"
    );
    let config = Config::from_toml(&text).unwrap().validate().unwrap();
    let (rss_before, _) = memory_mib();
    let shared = Arc::new(Shared {
        producer: samgate::kafka::producer(&config.kafka, Duration::from_secs(5)).unwrap(),
        metrics: Arc::new(samgate::metrics::Metrics::new()),
        tracker: Default::default(),
        state: Mutex::new(BlockState::new(
            config.run.max_tracked_blocks,
            config.policy.escalation_window,
        )),
        ownership: Default::default(),
        stopping: Default::default(),
        replica: "bench".into(),
        events_partitions: partitions,
        config,
    });
    let all: Vec<i32> = (0..partitions).collect();
    let claims = shared.ownership.assign(&all);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    tokio::spawn(rebuild::load(shared.clone(), claims, tx));
    let mut loaded = 0;
    while loaded < partitions {
        match rx.recv().await {
            Some(Control::Loaded(claim, part, _)) => {
                shared.ownership.loaded(claim);
                shared.state.lock().unwrap().absorb(part);
                loaded += 1;
            }
            Some(_) => {}
            None => panic!("the loader ended before every partition was read"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let state = shared.state.lock().unwrap();
    let (rss, peak) = memory_mib();
    println!(
        "tracked={} active={} rebuild_seconds={seconds:.1} records_per_s={:.0} rss_mib={rss:.1} peak_rss_mib={peak:.1} rss_before_mib={rss_before:.1}",
        state.len(),
        state.active(Utc::now()),
        state.len() as f64 / seconds,
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(2).expect("BROKERS").clone();
    let topic = args.get(3).expect("TOPIC").clone();
    match args.get(1).map(String::as_str) {
        Some("produce") => {
            let partitions = arg(&args, 5, 12);
            let text = format!("[kafka]\nbrokers = \"{brokers}\"\n");
            let config = Config::from_toml(&text).unwrap();
            samgate::kafka::ensure_state_topic(
                &config.kafka,
                &topic,
                partitions,
                Duration::from_secs(30),
            )
            .await
            .expect("state topic");
            produce(&brokers, &topic, arg(&args, 4, 1_000_000), partitions)
        }
        Some("rebuild") => rebuild_all(&brokers, &topic, arg(&args, 4, 12)).await,
        _ => eprintln!("usage: bench_state produce|rebuild BROKERS TOPIC [...]"),
    }
}
