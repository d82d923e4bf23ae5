//! `scripts/bench feed`: a feed of many blocks served by `samgate feed` (its own process):
//! how long it takes to read the state topic and build the feed, how large the feed is, how
//! many requests a second it answers when a poller's copy is current (304) and when it must
//! send the whole list (200), how soon a new block is in it, and its memory. Prints figures;
//! asserts nothing about time.
//!
//! Usage: bench_feed BROKERS SAMGATE_BINARY [BLOCKS] [PARTITIONS] [SECONDS_PER_LOAD]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use samgate::checkpoint::sam::RuleKey;
use samgate::pipeline::dedupe::{BlockRecord, STATE_SCHEMA};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Resident and peak resident memory of process `pid`, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
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

fn record(i: u64) -> BlockRecord {
    let now = Utc::now();
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&i.to_be_bytes());
    key[8..].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes());
    BlockRecord {
        schema: STATE_SCHEMA.into(),
        key: RuleKey::from_bytes(key),
        site: format!("site-{}", i % 20),
        // Distinct addresses: 10.0.0.0 upwards, then IPv6 for one in ten.
        ip: match i % 10 {
            9 => std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128).into(),
            _ => std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
        },
        target: "blocklist".into(),
        level: 0,
        blocked_at: now,
        expires_at: now + chrono::Duration::days(7),
        event_id: format!("{i:032x}"),
        pending: false,
        writer: Some("bench".into()),
        origin: Default::default(),
        actor: None,
        expired: false,
    }
}

fn produce(
    producer: &BaseProducer,
    topic: &str,
    records: impl Iterator<Item = (u64, BlockRecord)>,
    partitions: i32,
) {
    for (i, record) in records {
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
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(600)).expect("flush");
}

/// Requests a second from `clients` concurrent clients for `seconds`, each request made by
/// `request`; returns (requests per second, statuses seen).
async fn load<F, Fut>(clients: usize, seconds: u64, expected: u16, request: F) -> (f64, Vec<u16>)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u16> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (done, request) = (done.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while Instant::now() < until {
                let status = request().await;
                if !statuses.contains(&status) {
                    statuses.push(status);
                }
                if status == expected {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        for s in t.await.unwrap() {
            if !statuses.contains(&s) {
                statuses.push(s);
            }
        }
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (rate, statuses)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).expect("BROKERS").clone();
    let samgate = args.get(2).expect("SAMGATE_BINARY").clone();
    let blocks: u64 = arg(&args, 3, 1_000_000);
    let partitions: i32 = arg(&args, 4, 12);
    let seconds: u64 = arg(&args, 5, 10);
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let topic = format!("bench-feed-state-{tag}");

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                partitions,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "50")
        .set("batch.num.messages", "10000")
        .set("compression.type", "zstd")
        .set("queue.buffering.max.messages", "200000")
        .create()?;
    let produced = Instant::now();
    produce(
        &producer,
        &topic,
        (0..blocks).map(|i| (i, record(i))),
        partitions,
    );
    let produce_s = produced.elapsed().as_secs_f64();
    eprintln!("feed: {blocks} block records on {partitions} partitions in {produce_s:.1} s");

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("samgate.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\nstate = \"{topic}\"\n[targets.blocklist]\nkind = \"feed\"\n[sites.s]\ntargets = [\"blocklist\"]\n[feed]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    )?;
    let started = Instant::now();
    let mut server = std::process::Command::new(&samgate)
        .args([
            "feed",
            "--config",
            config.to_str().unwrap(),
            "--log",
            "warn",
        ])
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "feed never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_s = started.elapsed().as_secs_f64();
    let (rss_ready, _) = memory_mib(server.id());

    let text = client.get(format!("{base}/feeds/blocklist")).send().await?;
    let etag = text.headers()["etag"].to_str()?.to_owned();
    let text = text.bytes().await?;
    let lines = text.iter().filter(|b| **b == b'\n').count();
    anyhow::ensure!(lines as u64 == blocks, "the feed lists {lines} of {blocks}");
    let csv = client
        .get(format!("{base}/feeds/blocklist.csv"))
        .send()
        .await?
        .bytes()
        .await?;

    let clients = 8;
    let url = format!("{base}/feeds/blocklist");
    let (not_modified_per_s, statuses_304) = {
        let (client, url, etag) = (client.clone(), url.clone(), etag.clone());
        load(clients, seconds, 304, move || {
            let (client, url, etag) = (client.clone(), url.clone(), etag.clone());
            async move {
                let r = client.get(&url).header("if-none-match", etag).send().await;
                r.map_or(0, |r| r.status().as_u16())
            }
        })
        .await
    };
    let (full_per_s, statuses_200) = {
        let (client, url) = (client.clone(), url.clone());
        load(clients, seconds, 200, move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                match client.get(&url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        status
                    }
                    Err(_) => 0,
                }
            }
        })
        .await
    };

    // A rate counts only the answers it is named for; anything else is a broken run.
    anyhow::ensure!(
        statuses_304 == [304],
        "conditional GETs answered {statuses_304:?}"
    );
    anyhow::ensure!(statuses_200 == [200], "full GETs answered {statuses_200:?}");

    // One more block: how soon a poller sees a new list.
    let changed = Instant::now();
    produce(
        &producer,
        &topic,
        std::iter::once((blocks, record(blocks))),
        partitions,
    );
    let change_ms = loop {
        let r = client
            .get(&url)
            .header("if-none-match", &etag)
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::OK {
            break changed.elapsed().as_millis();
        }
        anyhow::ensure!(
            changed.elapsed() < Duration::from_secs(120),
            "the change never showed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (rss, peak) = memory_mib(server.id());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();

    println!(
        "feed: {blocks} blocks ({partitions} partitions) read and built in {ready_s:.1} s; text {} bytes, csv {} bytes; {clients} clients for {seconds} s each: 304 statuses {statuses_304:?}, full statuses {statuses_200:?}; the client runs on the same two cores",
        text.len(),
        csv.len()
    );
    println!(
        "entries={lines} build_s={ready_s:.1} text_bytes={} csv_bytes={} not_modified_per_s={not_modified_per_s:.0} full_per_s={full_per_s:.1} change_to_feed_ms={change_ms} rss_ready_mib={rss_ready:.1} rss_mib={rss:.1} peak_rss_mib={peak:.1}",
        text.len(),
        csv.len()
    );
    Ok(())
}
