//! Helpers for end-to-end tests: the real broker started by `scripts/test`, unique names, the
//! built `samgate` binary, and JSON Schema checks.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// The broker `scripts/test` (or `scripts/local-kafka start`) runs.
pub fn brokers() -> String {
    std::env::var("SAMGATE_TEST_BROKERS").expect(
        "SAMGATE_TEST_BROKERS is not set: run the tests with scripts/test, or start a broker with \
         scripts/local-kafka start and set SAMGATE_TEST_BROKERS=127.0.0.1:9092",
    )
}

/// A name no other test (or earlier run against the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback address nothing listens on (bound, then released).
pub fn dead_broker() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap();
    results[0].as_ref().expect("topic created");
}

/// A received message: partition, key and value as text.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: serde_json::Value,
}

/// Reads `topic` from the beginning of every partition until `expected` messages arrived, then
/// keeps reading briefly to catch extras (duplicates are a failure the caller checks for).
pub fn read_topic(topic: &str, expected: usize) -> Vec<Received> {
    read_topic_within(topic, expected, Duration::from_secs(60))
}

/// [`read_topic`] with a deadline of one's own.
pub fn read_topic_within(topic: &str, expected: usize, within: Duration) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // The topic may not exist yet (a pipeline that is starting creates it): wait for it.
    let mut assignment = TopicPartitionList::new();
    let started = Instant::now();
    while assignment.count() == 0 {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        for p in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        assert!(
            started.elapsed() < within.max(Duration::from_secs(30)),
            "topic {topic} has no partitions"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut quiet_until: Option<Instant> = None;
    while Instant::now() < deadline {
        if let Some(q) = quiet_until {
            if Instant::now() > q {
                break;
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap();
                let value = serde_json::from_slice(m.payload().unwrap_or_default())
                    .expect("every message is JSON");
                out.push(Received {
                    partition: m.partition(),
                    offset: m.offset(),
                    key,
                    value,
                });
                if out.len() >= expected && quiet_until.is_none() {
                    quiet_until = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            Some(Err(e)) => panic!("consume error on {topic}: {e}"),
            None if expected == 0 && quiet_until.is_none() => {
                quiet_until = Some(Instant::now() + Duration::from_secs(2))
            }
            None => {}
        }
    }
    out
}

/// Runs the built `samgate` binary with `args`, `stdin` as its input and no inherited
/// `SAMGATE_*` variables; fails the test if it runs for more than two minutes (a hang).
pub fn samgate(args: &[&str], stdin: &[u8]) -> Output {
    let mut command = samgate_command();
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("samgate runs");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("samgate {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.join().unwrap();
    child.wait_with_output().unwrap()
}

/// The built `samgate` binary, without the `SAMGATE_*` variables of the test's environment.
pub fn samgate_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_samgate"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SAMGATE_") {
            command.env_remove(key);
        }
    }
    // No test shares the machine-wide default fallback spool; a test that wants one names it.
    command.env("SAMGATE_SHIM__FALLBACK_SPOOL_DIR", "");
    command
}

/// Lines of input waiting in raw spool segments (not yet turned into messages), all runs.
pub fn spooled_raw_lines(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "raw")
                && !p.file_name().unwrap().to_string_lossy().starts_with('.')
        })
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            text.lines()
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .count()
        })
        .sum()
}

/// A program of the environment `scripts/deploy-tools` installs (Helm's SDK, the Kubernetes and
/// Compose schemas, promtool, prometheus).
pub fn deploy_tool(program: &str) -> Command {
    let bin = std::env::var("SAMGATE_DEPLOY_TOOLS").expect(
        "SAMGATE_DEPLOY_TOOLS is not set: run the tests with scripts/test, or set it to the \
         directory that `scripts/deploy-tools` prints",
    );
    Command::new(Path::new(&bin).join(program))
}

/// A child process that is killed when dropped: a failing test must not leave it running.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The lines `output` (a child's stdout) prints, as they come, until it closes.
pub fn line_channel(
    output: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The address in `samgate demo`'s `metrics http://ADDRESS/metrics` line.
pub fn demo_metrics_address(line: &str) -> Option<String> {
    line.trim()
        .strip_prefix("metrics")?
        .trim()
        .strip_prefix("http://")?
        .strip_suffix("/metrics")
        .map(str::to_owned)
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Records waiting in a spool directory (complete segments only).
pub fn spooled(dir: &Path) -> Vec<serde_json::Value> {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    segments.retain(|p: &std::path::PathBuf| {
        p.extension().is_some_and(|e| e == "jsonl")
            && !p.file_name().unwrap().to_string_lossy().starts_with('.')
    });
    segments.sort();
    segments
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A file of the repository, by its path from the top.
pub fn repo_path(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Validates `value` against a schema in `docs/schemas/`, with formats checked.
pub fn assert_schema(schema_file: &str, value: &serde_json::Value) {
    let path = repo_path("docs/schemas").join(schema_file);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{schema_file}: {errors:?}\n{value:#}");
}

/// Produces one raw message and waits for its acknowledgement.
pub fn produce(topic: &str, key: &str, payload: &[u8]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    producer
        .send(BaseRecord::to(topic).key(key).payload(payload))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The Check Point simulator's `/sim/state` (its certificate is self-signed).
pub async fn sim_state(url: &str) -> serde_json::Value {
    insecure()
        .get(format!("{url}/sim/state"))
        .send()
        .await
        .expect("simulator answers")
        .json()
        .await
        .expect("state is JSON")
}

/// Switches simulator faults (`POST /sim/faults`).
pub async fn sim_faults(url: &str, body: serde_json::Value) {
    let response = insecure()
        .post(format!("{url}/sim/faults"))
        .json(&body)
        .send()
        .await
        .expect("simulator answers");
    assert!(
        response.status().is_success(),
        "faults refused: {}",
        response.text().await.unwrap_or_default()
    );
}

/// An HTTP client for the simulator's admin endpoints only.
fn insecure() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

/// A management-server configuration for `sim`, logging in as `user` and pinned to the
/// simulator's certificate.
pub fn management_server(
    sim: &samgate_sim::checkpoint::RunningSimulator,
    user: &str,
    password: &str,
) -> samgate::config::ManagementServerConfig {
    let mut config = management_server_at(&sim.url, user, password);
    config.tls.fingerprint_sha256 = sim.fingerprint.clone();
    config
}

/// A management server at `url`, logged into with `user` and `password`; TLS as configured by
/// default (CA verification).
pub fn management_server_at(
    url: &str,
    user: &str,
    password: &str,
) -> samgate::config::ManagementServerConfig {
    samgate::config::ManagementServerConfig {
        url: url.into(),
        user: Some(user.into()),
        password: Some(samgate::secret::Secret::new(password)),
        api_key: None,
        domain: None,
        session_timeout: Duration::from_secs(600),
        api_version: None,
        logins_per_minute: 3,
        login_share: 1,
        request_timeout: Duration::from_secs(10),
        task_timeout: Duration::from_secs(20),
        tls: samgate::config::TlsConfig::default(),
        allow_plaintext: false,
    }
}

/// A broker of one's own (`scripts/local-kafka` on a free port, data in a temporary directory),
/// for tests that restart it. Stopped, and its data removed, when dropped.
pub struct OwnBroker {
    pub port: u16,
    data: tempfile::TempDir,
}

impl OwnBroker {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let broker = Self {
            port,
            data: tempfile::tempdir().unwrap(),
        };
        broker.script("start");
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker and starts it again on the same data.
    pub fn restart(&self) {
        self.script("restart");
    }

    pub fn stop(&self) {
        self.script("stop");
    }

    fn script(&self, command: &str) {
        let out = Command::new(repo_path("scripts/local-kafka"))
            .arg(command)
            .env("SAMGATE_KAFKA_PORT", self.port.to_string())
            .env("SAMGATE_KAFKA_DATA", self.data.path())
            .output()
            .expect("scripts/local-kafka runs");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "scripts/local-kafka {command}: {said}"
        );
        eprint!("{said}");
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new(repo_path("scripts/local-kafka"))
            .arg("stop")
            .env("SAMGATE_KAFKA_PORT", self.port.to_string())
            .env("SAMGATE_KAFKA_DATA", self.data.path())
            .output();
    }
}

/// A pipeline (`pipeline::run()`) in this process, on a configuration file, once ready.
pub struct Pipeline {
    /// `http://…` of its `/metrics`, `/healthz`, `/readyz` listener.
    pub http: String,
    pub cancel: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Pipeline {
    /// Loads and validates `file`, runs the pipeline on it and waits for `/readyz`.
    pub async fn start(file: &Path) -> Self {
        let config = samgate::config::Config::load(Some(file))
            .unwrap()
            .validate()
            .unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
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
        let http = format!("http://{}", rx.await.unwrap());
        let started = Instant::now();
        loop {
            let ready = reqwest::get(format!("{http}/readyz")).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "never ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Self { http, cancel, task }
    }

    /// The value of one `/metrics` series (its name with labels, as exported).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Stops it and waits for its drain.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

/// The `[kafka]` and `[kafka.topics]` sections of a test's configuration: the test broker,
/// three partitions, these topics.
pub fn kafka_toml(events: &str, results: &str, dlq: &str, state: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\npartitions = 3\n[kafka.topics]\nevents = \"{events}\"\nresults = \"{results}\"\ndlq = \"{dlq}\"\nstate = \"{state}\"\n",
        brokers()
    )
}
