//! Configuration: one TOML file, overridden by `SAMGATE_<SECTION>__<FIELD>` environment variables,
//! checked by [`Config::validate`] before anything starts.
//!
//! Command-line flags (each also readable from a `SAMGATE_<FLAG>` variable, single underscore) are
//! applied on top by the subcommand that owns them. `samgate.example.toml` documents every field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Json, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Every setting samgate reads. Each section has defaults that work on one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka connection, topics and client properties.
    pub kafka: KafkaConfig,
    /// `samgate shim`, the program Flowmon ADS runs.
    pub shim: ShimConfig,
    /// Check Point management servers samgate acts through.
    pub checkpoint: CheckpointConfig,
    /// FortiGate devices samgate acts through.
    pub fortigate: FortigateConfig,
    /// `samgate run`: the consumer group, batching, retries and the HTTP listener.
    pub run: RunConfig,
    /// What is acted on, and for how long.
    pub policy: PolicyConfig,
    /// Sites (Flowmon installations) and where their blocks go.
    pub sites: BTreeMap<String, SiteConfig>,
    /// Enforcement targets: a management server, its gateways, and how rules look.
    pub targets: BTreeMap<String, TargetConfig>,
    /// Comparing the gateways with the blocks samgate holds.
    pub reconcile: ReconcileConfig,
    /// `samgate feed`: the block-list feeds that gateways fetch (targets of `kind = "feed"`).
    pub feed: FeedConfig,
}

/// `samgate feed`: serves each feed target's addresses, built from the whole state topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedConfig {
    /// Where `GET /feeds/<target>` (and `/metrics`, `/healthz`, `/readyz`) are served.
    pub listen: std::net::SocketAddr,
    /// Serve HTTPS with this certificate and key (PEM files); plain HTTP without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<FeedTlsConfig>,
    /// How long a change waits before the feeds are rebuilt (changes within it are built at
    /// once): a storm of state records costs one rebuild per delay, not one per record.
    #[serde(with = "humantime_serde")]
    pub rebuild_delay: Duration,
    /// Take a client's address from `X-Forwarded-For`: its last address, the one the proxy or
    /// ingress in front of the feeds appended; off: the connection's peer address.
    pub trust_forwarded_for: bool,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9465".parse().expect("address"),
            tls: None,
            rebuild_delay: Duration::from_millis(200),
            trust_forwarded_for: false,
        }
    }
}

/// The feed server's certificate (its chain, leaf first) and private key, PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Reconcile: each replica lists its targets' gateways, re-asserts the rules of active blocks
/// they lost, and reports rules with samgate's tag that no block explains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Time between two reconciles (jittered by ±10 %); `0s` turns the loop off
    /// (`samgate reconcile` still works).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Remove rules with samgate's tag that no block explains (`fw_samp` targets; `fw sam -M`
    /// lines carry no tag). Off: they are only reported (`orphaned`).
    pub remove_orphans: bool,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(600),
            remove_orphans: false,
        }
    }
}

/// A duration written as text (`"1h"`, `"7d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HumanDuration(#[serde(with = "humantime_serde")] pub Duration);

/// `samgate run`: the consumer group, batching, retries and the HTTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Consumer group of every `samgate run` replica.
    pub group_id: String,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub http_listen: std::net::SocketAddr,
    /// Decide and report, but never call a firewall (outcome `dry_run`).
    pub dry_run: bool,
    /// Most events between consumption and their result (the backpressure bound).
    pub max_in_flight: usize,
    /// Most rules in one batch (one run-script, one `add_users`).
    pub batch_max_rules: usize,
    /// Longest a rule waits for its batch to fill.
    #[serde(with = "humantime_serde")]
    pub batch_max_delay: Duration,
    /// Most concurrent batches per server (a management server, a FortiGate).
    pub server_concurrency: usize,
    /// Batches at once and rules per batch follow each server's answers (AIMD, within
    /// `server_concurrency` and `batch_max_rules`); false pins them at those values.
    pub adaptive: bool,
    /// API calls per second per management server.
    pub server_calls_per_second: u32,
    /// First retry delay of a failed rule (doubles, with jitter).
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// After this long a rule that still fails is reported `failed` (and dead-lettered).
    #[serde(with = "humantime_serde")]
    pub retry_deadline: Duration,
    /// On SIGTERM/SIGINT or revoke, how long in-flight work may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Most blocks remembered for dedupe and escalation (oldest expired first out).
    pub max_tracked_blocks: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            group_id: "samgate".into(),
            http_listen: std::net::SocketAddr::from(([0, 0, 0, 0], 9464)),
            dry_run: false,
            max_in_flight: 10_000,
            batch_max_rules: 500,
            batch_max_delay: Duration::from_millis(250),
            server_concurrency: 16,
            adaptive: true,
            server_calls_per_second: 20,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            retry_deadline: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            max_tracked_blocks: 1_000_000,
        }
    }
}

/// What is acted on, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// ADS methods acted on, as `METHOD` or `METHOD/Subtype`. The default is the set Flowmon
    /// recommends for blocking; DOS, SRVNA, REFLECTDOS, BROKENSEN, NATDET… are left out on
    /// purpose: their "source" is a victim or infrastructure.
    pub methods: Vec<String>,
    /// Act on Flowmon IDS (signature) events too.
    pub ids_events: bool,
    /// Lowest priority acted on.
    pub min_priority: crate::flowmon::Priority,
    /// Act on events without a priority (ADS "Initiate response" by an analyst).
    pub act_on_unknown_priority: bool,
    /// Perspectives acted on; empty means any.
    pub perspectives: Vec<String>,
    /// Networks never blocked, at any site (a `suppressed` result). The collectors' addresses
    /// are always added.
    pub never_block: Vec<ipnet::IpNet>,
    /// More ranges no rule may ever name (a `not_blockable` result), beside those that always
    /// are: [`SPECIAL_RANGES`] (unspecified, loopback, link-local, multicast, reserved), the
    /// management servers' and FortiGates' own addresses, and 255.255.255.255.
    pub not_blockable: Vec<ipnet::IpNet>,
    /// Block durations: the first block of a source takes the first step, each repeat within
    /// `escalation_window` the next one, up to the last.
    pub durations: Vec<HumanDuration>,
    /// Critical events start one step up the ladder.
    pub critical_skips_a_step: bool,
    /// How long a block is remembered for escalation after it was made.
    #[serde(with = "humantime_serde")]
    pub escalation_window: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let hours = |h: u64| HumanDuration(Duration::from_secs(h * 3600));
        Self {
            methods: [
                "SCANS",
                "RANDOMDOMAIN",
                "BPATTERNS",
                "DICTATTACK",
                "SSHDICT",
                "RDPDICT",
                "BLACKLIST/BotnetActivities",
                "BLACKLIST/MalwareDomains",
                "BLACKLIST/BotnetDomains",
            ]
            .map(String::from)
            .to_vec(),
            ids_events: false,
            min_priority: crate::flowmon::Priority::Medium,
            act_on_unknown_priority: false,
            perspectives: Vec::new(),
            never_block: Vec::new(),
            not_blockable: Vec::new(),
            durations: vec![hours(1), hours(6), hours(24), hours(24 * 7)],
            critical_skips_a_step: true,
            escalation_window: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Addresses that never name one attacking host: not blockable whatever `policy.not_blockable`
/// adds (a list that replaced them would make loopback blockable by an oversight).
pub const SPECIAL_RANGES: &[&str] = &[
    "0.0.0.0/8",      // "this network", unspecified
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, and the broadcast address
    "::/128",         // unspecified
    "::1/128",        // loopback
    "fe80::/10",      // link-local
    "ff00::/8",       // multicast
];

/// A site: one Flowmon installation (or several collectors of one network).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Targets (names under `[targets]`) that enforce this site's blocks.
    pub targets: Vec<String>,
    /// Networks never blocked for this site (in addition to `policy.never_block`).
    #[serde(default)]
    pub never_block: Vec<ipnet::IpNet>,
    /// Addresses of this site's Flowmon collectors: never blocked.
    #[serde(default)]
    pub collectors: Vec<std::net::IpAddr>,
    /// Networks whose hosts this site's probes see at layer 2 (no router between): only a
    /// source in one of them has its MAC address passed on (a FortiGate stitch quarantines
    /// it). Beyond a router the MAC Flowmon saw is the router's own. Empty: no MAC is passed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac_networks: Vec<ipnet::IpNet>,
}

/// Where and how a block is enforced: a Check Point management server and its gateways, or a
/// FortiGate. Fields of the other kind are refused by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `checkpoint` (the default), `fortigate`, or `feed` (published for gateways to fetch).
    #[serde(default)]
    pub kind: TargetKind,
    /// Check Point: a server under `[checkpoint.servers]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Check Point: gateway (or cluster member) names the rule goes to, in one run-script.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// FortiGate: a device under `[fortigate.devices]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// How rules are issued. Check Point: `fw_sam` (default; immediate, everywhere) or
    /// `fw_samp` (R80.20+, persistent, named). FortiGate: `banned_ip` (default; the banned-IP
    /// list, many addresses per call) or `webhook` (an automation stitch, one call per address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TargetMode>,
    /// Check Point: `drop` (default), `reject` or `notify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<crate::checkpoint::sam::SamAction>,
    /// Check Point: also close the source's open connections (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_connections: Option<bool>,
    /// Check Point: `none`, `log` (default) or `alert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<crate::checkpoint::sam::LogType>,
    /// Check Point: `src` (default) blocks what the source initiates; `any` also connections to
    /// it (fw_sam only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criteria: Option<CriteriaKind>,
    /// FortiGate `webhook` mode: the automation stitch's name (its Incoming Webhook trigger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stitch: Option<String>,
    /// Feed: the user a gateway fetches it as (HTTP basic authentication, with `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Feed: the basic-authentication password (`SAMGATE_TARGETS__<T>__PASSWORD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Feed: a bearer token a client may present instead (`SAMGATE_TARGETS__<T>__TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Feed: the gateways expected to fetch it, by name, with the address they fetch from:
    /// each gets `samgate_feed_last_poll_timestamp_seconds{feed, poller}`, which an alert
    /// watches (a client not listed counts as `other`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pollers: BTreeMap<String, std::net::IpAddr>,
}

/// Which firewall a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    #[default]
    Checkpoint,
    Fortigate,
    /// A block list that gateways fetch (`samgate feed` serves it); nothing is pushed.
    Feed,
}

/// How a target's rules are issued (see [`TargetConfig::mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetMode {
    FwSam,
    FwSamp,
    BannedIp,
    Webhook,
}

/// How the event source becomes a rule's criteria.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CriteriaKind {
    Src,
    Any,
}

/// Check Point management servers samgate acts through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Management servers by name (the name is used in logs, metrics and routing).
    pub servers: BTreeMap<String, ManagementServerConfig>,
}

/// One Check Point management server (or one domain of a Multi-Domain Server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementServerConfig {
    /// `https://host[:port]`, with `/<cloud-mgmt-id>` appended for Smart-1 Cloud.
    pub url: String,
    /// API administrator name (with `password`); or use `api_key`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// API key of an administrator with API-key authentication (R80.40+).
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Domain name or UID on a Multi-Domain Server; omit on a single management server.
    #[serde(default)]
    pub domain: Option<String>,
    /// Idle time after which the server drops the session (10s to 1h); samgate keeps it alive.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Pin the API version in every URL (e.g. "1.8"); default: what the server announces at login.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Logins the server allows per minute for this administrator. R81+ allows 3 per
    /// administrator and domain.
    #[serde(default = "default_logins_per_minute")]
    pub logins_per_minute: u32,
    /// How many `samgate run` replicas log in as this administrator. The server's limit is per
    /// administrator, not per replica, so each replica keeps to `logins_per_minute /
    /// login_share`. Best: one administrator (or API key) per replica, and 1 here.
    #[serde(default = "default_login_share")]
    pub login_share: u32,
    /// Longest wait for one HTTP answer.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait for a run-script task to finish.
    #[serde(default = "default_task_timeout", with = "humantime_serde")]
    pub task_timeout: Duration,
    /// How the server's certificate is checked.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Accept an `http://` URL (labs only: credentials and session ids then cross the network
    /// in clear; samgate warns at every start). Off: an `http://` URL refuses to start.
    #[serde(default)]
    pub allow_plaintext: bool,
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_login_share() -> u32 {
    1
}

fn default_logins_per_minute() -> u32 {
    3
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_task_timeout() -> Duration {
    Duration::from_secs(120)
}

/// FortiGate devices samgate acts through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FortigateConfig {
    /// Devices by name (the name is used in logs, metrics and targets).
    pub devices: BTreeMap<String, FortigateDeviceConfig>,
}

/// One FortiGate (or one VDOM of it), reached through its REST API (`docs/fortigate.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FortigateDeviceConfig {
    /// `https://host[:port]` of the FortiGate's administrative interface.
    pub url: String,
    /// The REST API administrator's key. Sent only as `Authorization: Bearer`, never in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// The VDOM the bans go to (`?vdom=`); omit on a FortiGate without VDOMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdom: Option<String>,
    /// Longest wait for one HTTP answer.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How the device's certificate is checked (a FortiGate's own certificate is self-signed:
    /// pin it, or trust the CA that issued the one you installed).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Accept an `http://` URL (labs only: the token then crosses the network in clear).
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// Certificate checking. Default: verify against the system's public CAs (plus `ca_file`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Extra CA certificate (PEM), e.g. the management server's internal CA.
    pub ca_file: Option<PathBuf>,
    /// Accept exactly the certificate with this SHA-256 fingerprint (hex; colons and case
    /// ignored), instead of CA verification. Fails closed on any other certificate.
    pub fingerprint_sha256: Option<String>,
    /// Accept any certificate. For labs only; samgate warns at every start.
    pub insecure_skip_verify: bool,
}

impl TlsConfig {
    /// The pinned fingerprint as 64 lower-case hex digits, if one is set and well-formed.
    pub fn normalized_fingerprint(&self) -> Option<String> {
        self.fingerprint_sha256
            .as_deref()
            .map(normalize_fingerprint)
    }
}

/// Removes colons and spaces and lower-cases a hex fingerprint.
pub fn normalize_fingerprint(text: &str) -> String {
    text.chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Kafka connection, topics and client properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// `client.id` of every samgate client (shows in broker logs and quotas).
    pub client_id: String,
    /// Topic names.
    pub topics: TopicsConfig,
    /// Create missing topics at start with the settings below. Turn off where topics are managed
    /// elsewhere (then a missing topic is reported by name).
    pub create_topics: bool,
    /// Partitions of topics samgate creates. Partitions bound the number of useful `samgate run`
    /// replicas; 12 divides evenly among 1, 2, 3, 4 and 6 replicas.
    pub partitions: i32,
    /// Replication factor of topics samgate creates; -1 takes the broker's default.
    pub replication_factor: i32,
    /// Any librdkafka property (`security.protocol`, `sasl.mechanism`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.location`, …), passed through unchanged. Values are never logged.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            client_id: "samgate".into(),
            topics: TopicsConfig::default(),
            create_topics: true,
            partitions: 12,
            replication_factor: -1,
            properties: BTreeMap::new(),
        }
    }
}

/// Topic names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Flowmon events, keyed by source address.
    pub events: String,
    /// One result message per decision, keyed by idempotency key.
    pub results: String,
    /// Inputs samgate could not use, with the reason.
    pub dlq: String,
    /// Active blocks, compacted, keyed by idempotency key; partitioned like `events`.
    pub state: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            events: "samgate.events".into(),
            results: "samgate.results".into(),
            dlq: "samgate.dlq".into(),
            state: "samgate.state".into(),
        }
    }
}

/// `samgate shim`, the program Flowmon ADS runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// The site this collector belongs to (letters, digits, `.`, `_`, `-`). Usually passed by ADS
    /// as `--site`.
    pub site: Option<String>,
    /// Where undelivered messages wait for the next run. Must be on local disk; on a Flowmon
    /// appliance `/data/components/apps/` is writable by scripts.
    pub spool_dir: PathBuf,
    /// Where input goes when `spool_dir` cannot take it (a full or read-only disk): best on
    /// another file system. On a Flowmon appliance `spool_dir` is on the `/data` partition and
    /// the default fallback on the system one. Empty: no fallback.
    pub fallback_spool_dir: PathBuf,
    /// How long one run may spend delivering to Kafka before it spools what is left and exits.
    /// ADS waits for the script, so keep this well under a minute.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// The largest event message in bytes: a larger event is cut to fit (its raw line, then its
    /// target list, then its detail; never its source), keeping well under Kafka's 1 MB limit.
    pub max_line_bytes: usize,
    /// Also write logs to this file (appended), e.g. `/data/components/apps/log/samgate.log`.
    pub log_file: Option<PathBuf>,
    /// Look up each ADS event's source MAC address in Flowmon's REST API before publishing
    /// (for a FortiGate stitch's access-layer quarantine). Off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flowmon_api: Option<FlowmonApiConfig>,
}

/// Flowmon's REST API on the appliance the shim runs on (`GET /rest/ads/event/{id}` →
/// `macAddress`). A lookup that fails or runs out of time leaves the event without a MAC: no
/// event is ever held back or lost for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowmonApiConfig {
    /// The appliance's own web interface.
    #[serde(default = "default_flowmon_url")]
    pub url: String,
    /// A file (readable by the ADS user only) holding the REST user's name on its first line and
    /// its password on the second. Never an ADS parameter: those show in the process list.
    pub credentials_file: PathBuf,
    /// Longest time one run spends on lookups (within `delivery_timeout`).
    #[serde(default = "default_flowmon_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Lookups in flight at once.
    #[serde(default = "default_flowmon_concurrency")]
    pub concurrency: usize,
    /// How the appliance's certificate is checked (its own is self-signed: pin it).
    #[serde(default)]
    pub tls: TlsConfig,
}

fn default_flowmon_url() -> String {
    "https://localhost".into()
}
fn default_flowmon_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_flowmon_concurrency() -> usize {
    4
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            site: None,
            spool_dir: "/data/components/apps/samgate/spool".into(),
            fallback_spool_dir: "/var/tmp/samgate/spool".into(),
            delivery_timeout: Duration::from_secs(10),
            max_line_bytes: 64 * 1024,
            log_file: None,
            flowmon_api: None,
        }
    }
}

/// Why a configuration was refused. Every variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(Box<figment::Error>),
    #[error("config field `{field}`: {problem}; {fix}")]
    Invalid {
        field: &'static str,
        problem: String,
        fix: &'static str,
    },
}

fn invalid(field: &'static str, problem: impl Into<String>, fix: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
        fix,
    }
}

/// librdkafka properties samgate sets itself; overriding them would break its guarantees.
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("client.id", "set kafka.client_id instead"),
    ("enable.idempotence", "samgate always produces idempotently"),
    ("acks", "samgate always waits for all in-sync replicas"),
    (
        "group.id",
        "set the consumer group of `samgate run` instead",
    ),
    (
        "enable.auto.commit",
        "samgate commits offsets only after results are acknowledged",
    ),
    (
        "enable.auto.offset.store",
        "samgate stores offsets only after results are acknowledged",
    ),
];

impl Config {
    /// Loads defaults, then the file (if given), then `SAMGATE_<SECTION>__<FIELD>` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(path)?
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))
    }

    /// Defaults, the file, the environment: not yet extracted.
    pub(crate) fn figment(path: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            // figment ignores a missing file; a typo in --config must not silently mean defaults.
            std::fs::metadata(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            // JSON for generated files (the Helm chart renders its `config` value with toJson:
            // helm's toToml writes integers as floats); TOML otherwise.
            figment = if path.extension().is_some_and(|e| e == "json") {
                figment.merge(Json::file(path))
            } else {
                figment.merge(Toml::file(path))
            };
        }
        figment = figment
            .merge(
                Env::prefixed("SAMGATE_")
                    .filter(|key| key.as_str().contains("__") && !is_secret_key(key.as_str()))
                    .split("__"),
            )
            .merge(SecretEnv(std::env::vars().collect()));
        Ok(figment)
    }

    /// Parses a TOML document (no environment), for tests and `config check`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))
    }

    /// What the operator's commands need checked: Kafka, sites, targets, policy; not the
    /// management servers' credentials, which an operator's copy of the file may leave out.
    pub fn validate_for_operator(self) -> Result<Self, ConfigError> {
        validate_kafka(&self.kafka)?;
        for (name, device) in &self.fortigate.devices {
            validate_device(name, device, false)?;
        }
        self.validate_run()?;
        Ok(self)
    }

    /// Checks every field; the error names the field and the fix.
    pub fn validate(self) -> Result<Self, ConfigError> {
        validate_kafka(&self.kafka)?;
        validate_shim(&self.shim)?;
        for (name, server) in &self.checkpoint.servers {
            validate_server(name, server)?;
        }
        for (name, device) in &self.fortigate.devices {
            validate_device(name, device, true)?;
        }
        self.validate_run()?;
        Ok(self)
    }
}

/// Whether `SAMGATE_<…>__<FIELD>` names a secret (`password`, `api_key`, `token`), which is read as the
/// text it is, never as a number.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.ends_with("__password") || key.ends_with("__api_key") || key.ends_with("__token")
}

/// Secrets from `SAMGATE_…__PASSWORD` and `SAMGATE_…__API_KEY` variables, as the strings they
/// are: the generic environment provider would read `007` as the number 7, and a numeric value
/// as a number that a string field refuses (showing it in the error).
struct SecretEnv(Vec<(String, String)>);

impl figment::Provider for SecretEnv {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("SAMGATE_ environment variables (secrets)")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        fn nest(dict: &mut Dict, path: &[String], value: Value) {
            match path {
                [] => {}
                [last] => {
                    dict.insert(last.clone(), value);
                }
                [first, rest @ ..] => {
                    let entry = dict
                        .entry(first.clone())
                        .or_insert_with(|| Value::from(Dict::new()));
                    if let Value::Dict(_, inner) = entry {
                        nest(inner, rest, value);
                    }
                }
            }
        }
        let mut dict = Dict::new();
        for (key, value) in &self.0 {
            let Some(path) = key.strip_prefix("SAMGATE_").filter(|p| is_secret_key(p)) else {
                continue;
            };
            let path: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            nest(&mut dict, &path, Value::from(value.clone()));
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// The shim's view: only the `[kafka]` and `[shim]` sections are read (and, with
/// [`validate_shim_view`], checked), so a mistake in a section the shim does not use never
/// stops it.
pub fn load_shim(path: Option<&Path>) -> Result<(KafkaConfig, ShimConfig), ConfigError> {
    let figment = Config::figment(path)?;
    let parse = |e| ConfigError::Parse(Box::new(e));
    let kafka: KafkaConfig = figment.extract_inner("kafka").map_err(parse)?;
    let shim: ShimConfig = figment.extract_inner("shim").map_err(parse)?;
    Ok((kafka, shim))
}

/// Checks the shim's view of the configuration (flags applied).
pub fn validate_shim_view(kafka: &KafkaConfig, shim: &ShimConfig) -> Result<(), ConfigError> {
    validate_kafka(kafka)?;
    validate_shim(shim)
}

fn validate_kafka(k: &KafkaConfig) -> Result<(), ConfigError> {
    validate_brokers(&k.brokers)?;
    if k.client_id.trim().is_empty() {
        return Err(invalid(
            "kafka.client_id",
            "is empty",
            "set a name, e.g. \"samgate\"",
        ));
    }
    let topics = [
        ("kafka.topics.events", &k.topics.events),
        ("kafka.topics.results", &k.topics.results),
        ("kafka.topics.dlq", &k.topics.dlq),
        ("kafka.topics.state", &k.topics.state),
    ];
    for (field, name) in topics {
        validate_topic(field, name)?;
    }
    for (i, (field, name)) in topics.iter().enumerate() {
        if let Some((other, _)) = topics[..i].iter().find(|(_, n)| n == name) {
            return Err(ConfigError::Invalid {
                field,
                problem: format!("topic {name:?} is also {other}"),
                fix: "give each topic its own name",
            });
        }
    }
    if !(1..=10_000).contains(&k.partitions) {
        return Err(invalid(
            "kafka.partitions",
            format!("{} is out of range", k.partitions),
            "use 1 to 10000",
        ));
    }
    if k.replication_factor == 0 || k.replication_factor < -1 {
        return Err(invalid(
            "kafka.replication_factor",
            format!("{} is not a replication factor", k.replication_factor),
            "use -1 (broker default) or a positive number",
        ));
    }
    for (key, value) in &k.properties {
        if let Some((_, fix)) = OWNED_PROPERTIES.iter().find(|(owned, _)| owned == key) {
            return Err(ConfigError::Invalid {
                field: "kafka.properties",
                problem: format!("`{key}` is set by samgate"),
                fix,
            });
        }
        // Checked here, where the error can leave the value out: librdkafka's own error (when
        // a client is made) shows it, and it may be a password under a mistyped key.
        let mut one = rdkafka::ClientConfig::new();
        one.set(key, value);
        if let Err(e) = one.create_native_config() {
            let problem = match e {
                rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description,
                other => other.to_string(),
            };
            let problem = if value.is_empty() {
                problem
            } else {
                problem.replace(value.as_str(), "***")
            };
            return Err(invalid(
                "kafka.properties",
                format!("`{key}`: {problem}"),
                "use a property of librdkafka's CONFIGURATION.md with a value it accepts",
            ));
        }
    }
    Ok(())
}

fn validate_shim(s: &ShimConfig) -> Result<(), ConfigError> {
    if let Some(site) = &s.site {
        validate_site("shim.site", site)?;
    }
    if s.spool_dir.as_os_str().is_empty() {
        return Err(invalid(
            "shim.spool_dir",
            "is empty",
            "set a directory on local disk",
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&s.delivery_timeout) {
        return Err(invalid(
            "shim.delivery_timeout",
            format!(
                "{} is out of range",
                humantime::format_duration(s.delivery_timeout)
            ),
            "use 1s to 5m (ADS waits for the shim; 10s is a good value)",
        ));
    }
    if !(1024..=256 * 1024).contains(&s.max_line_bytes) {
        return Err(invalid(
            "shim.max_line_bytes",
            format!("{} is out of range", s.max_line_bytes),
            "use 1024 to 262144 (an event must fit a Kafka message)",
        ));
    }
    if let Some(api) = &s.flowmon_api {
        validate_flowmon_api(api, s.delivery_timeout)?;
    }
    Ok(())
}

/// Whether a URL names a user or a password (`https://user:pass@host`), which would reach
/// every log line and error that shows the URL.
fn carries_credentials(url: &url::Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

fn validate_flowmon_api(api: &FlowmonApiConfig, delivery: Duration) -> Result<(), ConfigError> {
    match url::Url::parse(&api.url) {
        Ok(u) if carries_credentials(&u) => {
            return Err(invalid(
                "shim.flowmon_api.url",
                "carries a user or password in the URL (not shown): URLs reach logs and errors",
                "use https://localhost, with the REST user in shim.flowmon_api.credentials_file",
            ))
        }
        Ok(u) if u.scheme() == "https" && u.query().is_none() => {}
        _ => {
            return Err(invalid(
                "shim.flowmon_api.url",
                format!("{:?} is not an https:// URL", api.url),
                "use https://localhost (the appliance's own REST API)",
            ))
        }
    }
    if api.credentials_file.as_os_str().is_empty() {
        return Err(invalid(
            "shim.flowmon_api.credentials_file",
            "is empty",
            "name a file with the REST user on its first line and the password on its second",
        ));
    }
    if api.timeout.is_zero() || api.timeout >= delivery {
        return Err(invalid(
            "shim.flowmon_api.timeout",
            format!(
                "{} does not leave time to deliver (shim.delivery_timeout is {})",
                humantime::format_duration(api.timeout),
                humantime::format_duration(delivery)
            ),
            "keep it above 0 and well under shim.delivery_timeout, e.g. \"2s\"",
        ));
    }
    if !(1..=64).contains(&api.concurrency) {
        return Err(invalid(
            "shim.flowmon_api.concurrency",
            format!("{} is out of range", api.concurrency),
            "use 1 to 64",
        ));
    }
    validate_tls(
        [
            "shim.flowmon_api.tls.fingerprint_sha256",
            "shim.flowmon_api.tls.insecure_skip_verify",
        ],
        &|problem| format!("Flowmon REST API: {problem}"),
        &api.tls,
    )
}

impl Config {
    fn validate_run(&self) -> Result<(), ConfigError> {
        let interval = self.reconcile.interval;
        if !interval.is_zero() && interval < Duration::from_secs(10) {
            return Err(invalid(
                "reconcile.interval",
                format!(
                    "{} lists every gateway too often",
                    humantime::format_duration(interval)
                ),
                "use at least \"10s\" (the default is \"10m\"), or \"0s\" to turn the loop off",
            ));
        }
        let r = &self.run;
        if r.group_id.trim().is_empty() {
            return Err(invalid(
                "run.group_id",
                "is empty",
                "set a consumer group name",
            ));
        }
        for (field, value, min, max) in [
            ("run.max_in_flight", r.max_in_flight, 1, 1_000_000),
            ("run.batch_max_rules", r.batch_max_rules, 1, 5_000),
            ("run.server_concurrency", r.server_concurrency, 1, 64),
            (
                "run.max_tracked_blocks",
                r.max_tracked_blocks,
                1_000,
                100_000_000,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid {
                    field,
                    problem: format!("{value} is out of range"),
                    fix: "see samgate.example.toml for the allowed range",
                });
            }
        }
        if r.server_calls_per_second == 0 {
            return Err(invalid(
                "run.server_calls_per_second",
                "is 0",
                "use a positive number",
            ));
        }
        if r.retry_initial.is_zero() || r.retry_max < r.retry_initial {
            return Err(invalid(
                "run.retry_max",
                "is below run.retry_initial",
                "make retry_max >= retry_initial > 0",
            ));
        }
        let p = &self.policy;
        if p.durations.is_empty() || p.durations.iter().any(|d| d.0.is_zero()) {
            return Err(invalid(
                "policy.durations",
                "is empty or has a zero step",
                "list positive durations, e.g. [\"1h\", \"6h\", \"24h\", \"7d\"]",
            ));
        }
        if p.durations.windows(2).any(|w| w[1].0 < w[0].0) {
            return Err(invalid(
                "policy.durations",
                "is not ascending",
                "order the steps from shortest to longest",
            ));
        }
        if p.durations
            .iter()
            .any(|d| d.0.as_secs() > crate::command::MAX_SECONDS)
        {
            return Err(invalid(
                "policy.durations",
                "has a step too long for a rule's timeout",
                "keep steps under 68 years",
            ));
        }
        for m in &p.methods {
            if m.is_empty()
                || !m
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_')
            {
                return Err(invalid(
                    "policy.methods",
                    format!("{m:?} is not METHOD or METHOD/Subtype"),
                    "use ADS method codes such as \"SCANS\" or \"BLACKLIST/BotnetDomains\"",
                ));
            }
        }
        for (site, config) in &self.sites {
            validate_site("sites", site)?;
            if config.targets.is_empty() {
                return Err(invalid(
                    "sites.targets",
                    format!("site {site:?} has no targets"),
                    "name at least one [targets.<name>]",
                ));
            }
            for target in &config.targets {
                if !self.targets.contains_key(target) {
                    return Err(invalid(
                        "sites.targets",
                        format!("site {site:?} names unknown target {target:?}"),
                        "define it under [targets]",
                    ));
                }
            }
        }
        for name in self.fortigate.devices.keys() {
            if self.checkpoint.servers.contains_key(name) {
                return Err(invalid(
                    "fortigate.devices",
                    format!("{name:?} is also a [checkpoint.servers] name"),
                    "give each server and device its own name (metrics and limits are by name)",
                ));
            }
        }
        for (name, target) in &self.targets {
            self.validate_target(name, target)?;
        }
        let delay = self.feed.rebuild_delay;
        if delay < Duration::from_millis(10) || delay > Duration::from_secs(10) {
            return Err(invalid(
                "feed.rebuild_delay",
                format!("{} is out of range", humantime::format_duration(delay)),
                "use between \"10ms\" and \"10s\" (the default is \"200ms\")",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// A target names what its kind needs, and nothing of the other kind.
    fn validate_target(&self, name: &str, t: &TargetConfig) -> Result<(), ConfigError> {
        let named = |problem: &str| format!("target {name:?}: {problem}");
        let refuse = |field: &'static str, problem: &str, fix: &'static str| {
            Err(invalid(field, named(problem), fix))
        };
        if t.kind != TargetKind::Feed {
            for (field, set) in [
                ("targets.username", t.username.is_some()),
                ("targets.password", t.password.is_some()),
                ("targets.token", t.token.is_some()),
                ("targets.pollers", !t.pollers.is_empty()),
            ] {
                if set {
                    return refuse(
                        field,
                        "is a feed setting, and this target is pushed to",
                        "remove it, or set kind = \"feed\"",
                    );
                }
            }
        }
        match t.kind {
            TargetKind::Feed => {
                // The name is the feed's URL path segment, and its limits' and metrics' name.
                // No '.': `/feeds/<name>.txt` and `.csv` pick the format.
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
                {
                    return refuse(
                        "targets",
                        "is a feed, whose name is its URL (/feeds/<name>, <name>.txt, <name>.csv)",
                        "name it with letters, digits, '_' and '-' only",
                    );
                }
                if self.checkpoint.servers.contains_key(name)
                    || self.fortigate.devices.contains_key(name)
                {
                    return refuse(
                        "targets",
                        "has the name of a server or device",
                        "give the feed its own name (limits and metrics are by name)",
                    );
                }
                for (field, set) in [
                    ("targets.server", t.server.is_some()),
                    ("targets.gateways", !t.gateways.is_empty()),
                    ("targets.device", t.device.is_some()),
                    ("targets.mode", t.mode.is_some()),
                    ("targets.action", t.action.is_some()),
                    ("targets.close_connections", t.close_connections.is_some()),
                    ("targets.log", t.log.is_some()),
                    ("targets.criteria", t.criteria.is_some()),
                    ("targets.stitch", t.stitch.is_some()),
                ] {
                    if set {
                        return refuse(
                            field,
                            "is a feed, which gateways fetch (this is a setting of a pushed target)",
                            "remove it (a feed takes username and password, token, and pollers)",
                        );
                    }
                }
                match (&t.username, &t.password) {
                    (Some(_), Some(p)) if p.expose().trim().is_empty() => return refuse(
                        "targets.password",
                        "is empty, which would leave the feed behind its user name alone",
                        "set a password (SAMGATE_TARGETS__<NAME>__PASSWORD), or remove username",
                    ),
                    (Some(u), Some(_)) if !u.is_empty() && !u.contains(':') => {}
                    (Some(_), Some(_)) => {
                        return refuse(
                            "targets.username",
                            "is empty or holds ':', which basic authentication cannot carry",
                            "use a plain user name",
                        )
                    }
                    (Some(_), None) => {
                        return refuse(
                            "targets.password",
                            "has a username and no password",
                            "set password (SAMGATE_TARGETS__<NAME>__PASSWORD), or remove username",
                        )
                    }
                    (None, Some(_)) => {
                        return refuse(
                            "targets.username",
                            "has a password and no username",
                            "set username, or remove password",
                        )
                    }
                    (None, None) => {}
                }
                if t.token
                    .as_ref()
                    .is_some_and(|t| t.expose().trim().is_empty())
                {
                    return refuse("targets.token", "is empty", "set a token, or remove it");
                }
                let mut addresses = std::collections::BTreeMap::new();
                for (poller, ip) in &t.pollers {
                    if let Some(other) = addresses.insert(ip.to_canonical(), poller) {
                        return refuse(
                            "targets.pollers",
                            &format!("pollers {other:?} and {poller:?} have one address, {ip}"),
                            "give each poller its own address (gateways behind one NAT address are one poller)",
                        );
                    }
                }
                for poller in t.pollers.keys() {
                    if poller.is_empty()
                        || poller == "other"
                        || !poller
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    {
                        return refuse(
                            "targets.pollers",
                            &format!("poller {poller:?} is not a metric label value"),
                            "name pollers with letters, digits, '.', '_' and '-' ('other' is taken)",
                        );
                    }
                }
            }
            TargetKind::Checkpoint => {
                let Some(server) = &t.server else {
                    return refuse(
                        "targets.server",
                        "names no server",
                        "set server = \"<a [checkpoint.servers] name>\" (or kind = \"fortigate\" with a device)",
                    );
                };
                if !self.checkpoint.servers.contains_key(server) {
                    return refuse(
                        "targets.server",
                        &format!("names unknown server {server:?}"),
                        "define it under [checkpoint.servers]",
                    );
                }
                if t.gateways.is_empty() {
                    return refuse(
                        "targets.gateways",
                        "has no gateways",
                        "list the gateway object names",
                    );
                }
                for (field, set) in [
                    ("targets.device", t.device.is_some()),
                    ("targets.stitch", t.stitch.is_some()),
                ] {
                    if set {
                        return refuse(
                            field,
                            "is a Check Point target, which takes no device or stitch",
                            "remove it, or set kind = \"fortigate\"",
                        );
                    }
                }
                let mode = t.mode.unwrap_or(TargetMode::FwSam);
                if !matches!(mode, TargetMode::FwSam | TargetMode::FwSamp) {
                    return refuse(
                        "targets.mode",
                        "is a Check Point target: its mode is fw_sam or fw_samp",
                        "use mode = \"fw_sam\" or \"fw_samp\" (banned_ip and webhook are FortiGate modes)",
                    );
                }
                if mode == TargetMode::FwSamp && t.criteria == Some(CriteriaKind::Any) {
                    return refuse(
                        "targets.criteria",
                        "fw_samp rules cannot match `any`",
                        "use criteria = \"src\" or mode = \"fw_sam\"",
                    );
                }
            }
            TargetKind::Fortigate => {
                let Some(device) = &t.device else {
                    return refuse(
                        "targets.device",
                        "is a FortiGate target and names no device",
                        "set device = \"<a [fortigate.devices] name>\"",
                    );
                };
                if !self.fortigate.devices.contains_key(device) {
                    return refuse(
                        "targets.device",
                        &format!("names unknown device {device:?}"),
                        "define it under [fortigate.devices]",
                    );
                }
                for (field, set) in [
                    ("targets.server", t.server.is_some()),
                    ("targets.gateways", !t.gateways.is_empty()),
                    ("targets.action", t.action.is_some()),
                    ("targets.close_connections", t.close_connections.is_some()),
                    ("targets.log", t.log.is_some()),
                    ("targets.criteria", t.criteria.is_some()),
                ] {
                    if set {
                        return refuse(
                            field,
                            "is a FortiGate target, which bans a source address (this is a Check Point setting)",
                            "remove it (a FortiGate target takes device, mode and, for webhook, stitch)",
                        );
                    }
                }
                match (t.mode.unwrap_or(TargetMode::BannedIp), &t.stitch) {
                    (TargetMode::BannedIp, None) => {}
                    (TargetMode::BannedIp, Some(_)) => {
                        return refuse(
                            "targets.stitch",
                            "names a stitch, which only mode = \"webhook\" calls",
                            "set mode = \"webhook\", or remove stitch",
                        )
                    }
                    (TargetMode::Webhook, Some(stitch)) if plain_stitch(stitch) => {}
                    (TargetMode::Webhook, Some(_)) => {
                        return refuse(
                            "targets.stitch",
                            "is not a stitch name",
                            "use the automation stitch's name: letters, digits, spaces, '.', '_' and '-' (at most 35)",
                        )
                    }
                    (TargetMode::Webhook, None) => {
                        return refuse(
                            "targets.stitch",
                            "is a webhook target and names no stitch",
                            "set stitch = \"<the automation stitch's name>\", e.g. \"FlowmonADS\"",
                        )
                    }
                    (TargetMode::FwSam | TargetMode::FwSamp, _) => {
                        return refuse(
                            "targets.mode",
                            "is a FortiGate target: its mode is banned_ip or webhook",
                            "use mode = \"banned_ip\" or \"webhook\" (fw_sam and fw_samp are Check Point modes)",
                        )
                    }
                }
            }
        }
        Ok(())
    }
}

/// A stitch name as FortiOS takes it (35 characters; spaces are sent as `%20`).
fn plain_stitch(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= 35
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" ._-".contains(&b))
}

fn validate_device(
    name: &str,
    d: &FortigateDeviceConfig,
    needs_token: bool,
) -> Result<(), ConfigError> {
    let named = |problem: String| format!("device {name:?}: {problem}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid(
            "fortigate.devices",
            named("is not a plain name".into()),
            "use letters, digits, '.', '_' and '-'",
        ));
    }
    match url::Url::parse(&d.url) {
        Ok(u) if carries_credentials(&u) => {
            return Err(invalid(
                "fortigate.devices.url",
                named("carries a user or password in the URL (not shown): URLs reach logs and errors".into()),
                "use https://host[:port], and set token = \"...\"",
            ))
        }
        Ok(u) if u.query_pairs().any(|(k, _)| k == "access_token") => {
            return Err(invalid(
                "fortigate.devices.url",
                named("carries access_token in the URL: URLs reach logs and proxies, and FortiOS 7.4.5+ refuses it".into()),
                "remove it from the URL and set token = \"...\" (sent as Authorization: Bearer)",
            ))
        }
        Ok(u) if u.query().is_some() || u.path() != "/" => {
            return Err(invalid(
                "fortigate.devices.url",
                named(format!("{:?} has a path or query", d.url)),
                "use https://host[:port] (samgate adds /api/v2/… and ?vdom=)",
            ))
        }
        Ok(u) if u.scheme() == "https" => {}
        Ok(u) if u.scheme() == "http" && !d.allow_plaintext => {
            return Err(invalid(
                "fortigate.devices.url",
                named(format!(
                    "{:?} is plain http://: the API token would cross the network unencrypted",
                    d.url
                )),
                "use https:// (in a lab only, set allow_plaintext = true for this device)",
            ))
        }
        Ok(u) if u.scheme() == "http" => {}
        _ => {
            return Err(invalid(
                "fortigate.devices.url",
                named(format!("{:?} is not an https:// URL", d.url)),
                "use https://host[:port]",
            ))
        }
    }
    if needs_token
        && d.token
            .as_ref()
            .is_none_or(|t| t.expose().trim().is_empty())
    {
        return Err(invalid(
            "fortigate.devices.token",
            named("has no token".into()),
            "create a REST API administrator on the FortiGate and set its key here (or in SAMGATE_FORTIGATE__DEVICES__<NAME>__TOKEN)",
        ));
    }
    if let Some(vdom) = &d.vdom {
        if vdom.is_empty()
            || vdom.len() > 31
            || !vdom
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            return Err(invalid(
                "fortigate.devices.vdom",
                named(format!("{vdom:?} is not a VDOM name")),
                "use the VDOM's name (letters, digits, '_' and '-'), or leave vdom unset",
            ));
        }
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&d.request_timeout) {
        return Err(invalid(
            "fortigate.devices.request_timeout",
            named(format!(
                "{} is out of range",
                humantime::format_duration(d.request_timeout)
            )),
            "use 1s to 5m",
        ));
    }
    validate_tls(
        [
            "fortigate.devices.tls.fingerprint_sha256",
            "fortigate.devices.tls.insecure_skip_verify",
        ],
        &named,
        &d.tls,
    )
}

/// Checks a `tls` section; `fields` name its `fingerprint_sha256` and `insecure_skip_verify`,
/// `named` says whose it is.
fn validate_tls(
    fields: [&'static str; 2],
    named: &dyn Fn(String) -> String,
    tls: &TlsConfig,
) -> Result<(), ConfigError> {
    if let Some(fp) = tls.normalized_fingerprint() {
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                fields[0],
                named("is not a SHA-256 fingerprint".into()),
                "use 64 hex digits (colons allowed), as `samgate simulate` or openssl x509 -fingerprint -sha256 prints it",
            ));
        }
        if tls.insecure_skip_verify {
            return Err(invalid(
                fields[1],
                named("contradicts fingerprint_sha256".into()),
                "keep the fingerprint and drop insecure_skip_verify",
            ));
        }
    }
    Ok(())
}

fn validate_server(name: &str, s: &ManagementServerConfig) -> Result<(), ConfigError> {
    let field = "checkpoint.servers";
    let named = |problem: String| format!("server {name:?}: {problem}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid(
            field,
            named("is not a plain name".into()),
            "use letters, digits, '.', '_' and '-'",
        ));
    }
    match url::Url::parse(&s.url) {
        Ok(u) if carries_credentials(&u) => {
            return Err(invalid(
                "checkpoint.servers.url",
                named("carries a user or password in the URL (not shown): URLs reach logs and errors".into()),
                "use https://host[:port], and set user and password (or api_key) as their own keys",
            ))
        }
        Ok(u) if u.scheme() == "https" => {}
        Ok(u) if u.scheme() == "http" && !s.allow_plaintext => {
            return Err(invalid(
                "checkpoint.servers.url",
                named(format!(
                    "{:?} is plain http://: the password and every session id would cross the network unencrypted",
                    s.url
                )),
                "use https:// (in a lab only, set allow_plaintext = true for this server)",
            ))
        }
        Ok(u) if u.scheme() == "http" => {}
        _ => {
            return Err(invalid(
                "checkpoint.servers.url",
                named(format!("{:?} is not an https:// URL", s.url)),
                "use https://host[:port]",
            ))
        }
    }
    match (&s.user, &s.password, &s.api_key) {
        (Some(_), Some(_), None) | (None, None, Some(_)) => {}
        _ => {
            return Err(invalid(
                "checkpoint.servers.api_key",
                named("needs either user and password, or api_key".into()),
                "set user + password, or api_key (not both)",
            ))
        }
    }
    for (field, value, (min_s, max_s), fix) in [
        (
            "checkpoint.servers.session_timeout",
            s.session_timeout,
            (10, 3600),
            "use 10s to 1h (the server's own limits)",
        ),
        (
            "checkpoint.servers.request_timeout",
            s.request_timeout,
            (1, 300),
            "use 1s to 5m",
        ),
        (
            "checkpoint.servers.task_timeout",
            s.task_timeout,
            (1, 3600),
            "use 1s to 1h (how long a gateway may take to run a script; it also bounds how long a send whose answer was lost is waited for)",
        ),
    ] {
        if !(Duration::from_secs(min_s)..=Duration::from_secs(max_s)).contains(&value) {
            return Err(invalid(
                field,
                named(format!(
                    "{} is out of range",
                    humantime::format_duration(value)
                )),
                fix,
            ));
        }
    }
    if !(1..=60).contains(&s.logins_per_minute) {
        return Err(invalid(
            "checkpoint.servers.logins_per_minute",
            named(format!("{} is out of range", s.logins_per_minute)),
            "use 1 to 60 (R81+ allows 3)",
        ));
    }
    if s.login_share == 0 || s.login_share > s.logins_per_minute {
        return Err(invalid(
            "checkpoint.servers.login_share",
            named(format!(
                "{} replicas cannot share {} logins per minute",
                s.login_share, s.logins_per_minute
            )),
            "give each replica an administrator (or API key) of its own, or run at most logins_per_minute replicas per administrator",
        ));
    }
    validate_tls(
        [
            "checkpoint.servers.tls.fingerprint_sha256",
            "checkpoint.servers.tls.insecure_skip_verify",
        ],
        &named,
        &s.tls,
    )?;
    if let Some(v) = &s.api_version {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(invalid(
                "checkpoint.servers.api_version",
                named(format!("{v:?} is not an API version")),
                "use a version such as \"1.8\" or leave it unset",
            ));
        }
    }
    Ok(())
}

fn validate_brokers(brokers: &str) -> Result<(), ConfigError> {
    let fix = "use host:port[,host:port…], e.g. \"kafka-0:9092,kafka-1:9092\"";
    if brokers.trim().is_empty() {
        return Err(invalid("kafka.brokers", "is empty", fix));
    }
    for broker in brokers.split(',').map(str::trim) {
        let port = broker
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        match port {
            Some((host, Ok(port))) if !host.is_empty() && port != 0 => {}
            _ => {
                return Err(invalid(
                    "kafka.brokers",
                    format!("{broker:?} is not host:port"),
                    fix,
                ))
            }
        }
    }
    Ok(())
}

/// Kafka's own rule: 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
fn validate_topic(field: &'static str, name: &str) -> Result<(), ConfigError> {
    let legal = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if name.is_empty() || name.len() > 249 || !legal || name == "." || name == ".." {
        return Err(invalid(
            field,
            format!("{name:?} is not a legal Kafka topic name"),
            "use 1-249 characters of letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

/// Site names go into messages and metric labels: keep them plain.
pub fn validate_site(field: &'static str, site: &str) -> Result<(), ConfigError> {
    let legal = site
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if site.is_empty() || site.len() > 64 || !legal {
        return Err(invalid(
            field,
            format!("{site:?} is not a site name"),
            "use 1-64 characters of letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_name_the_standard_topics() {
        let c = Config::default().validate().unwrap();
        assert_eq!(c.kafka.topics.events, "samgate.events");
        assert_eq!(c.kafka.topics.results, "samgate.results");
        assert_eq!(c.kafka.topics.dlq, "samgate.dlq");
    }

    #[test]
    fn a_json_file_is_read_as_json_with_the_same_checks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("samgate.json");
        std::fs::write(
            &file,
            r#"{"kafka": {"partitions": 6}, "run": {"batch_max_rules": 2000}}"#,
        )
        .unwrap();
        let config = Config::load(Some(&file)).unwrap().validate().unwrap();
        assert_eq!(
            (config.kafka.partitions, config.run.batch_max_rules),
            (6, 2000)
        );
        std::fs::write(&file, r#"{"run": {"batch_max_rulez": 2000}}"#).unwrap();
        let error = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(error.contains("batch_max_rulez"), "{error}");
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let text = include_str!("../samgate.example.toml");
        let config = Config::from_toml(text).unwrap().validate().unwrap();
        assert_eq!(
            config.policy,
            PolicyConfig::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn the_operators_commands_need_no_firewall_credentials() {
        let text = "[checkpoint.servers.hq]\nurl = \"https://192.0.2.1\"\n[targets.t]\nserver = \"hq\"\ngateways = [\"gw\"]\n[sites.s]\ntargets = [\"t\"]\n";
        let config = Config::from_toml(text).unwrap();
        assert_eq!(
            field_of(config.clone().validate().unwrap_err()),
            "checkpoint.servers.api_key"
        );
        assert!(config.validate_for_operator().is_ok());
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = Config::from_toml("[kafka]\nbrokerz = \"x:1\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("brokerz"), "{text}");
    }

    #[test]
    fn durations_are_typed() {
        let c = Config::from_toml("[shim]\ndelivery_timeout = \"2s 500ms\"\n").unwrap();
        assert_eq!(c.shim.delivery_timeout, Duration::from_millis(2500));
        let err = Config::from_toml("[shim]\ndelivery_timeout = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("delivery_timeout"), "{err}");
    }

    #[test]
    fn validate_names_each_bad_field() {
        let cases: Vec<(&str, &str)> = vec![
            ("[kafka]\nbrokers = \"\"", "kafka.brokers"),
            ("[kafka]\nbrokers = \"kafka\"", "kafka.brokers"),
            ("[kafka]\nbrokers = \"a:9092,b:0\"", "kafka.brokers"),
            (
                "[kafka.topics]\nevents = \"bad topic\"",
                "kafka.topics.events",
            ),
            (
                "[kafka.topics]\ndlq = \"samgate.events\"",
                "kafka.topics.dlq",
            ),
            ("[kafka]\npartitions = 0", "kafka.partitions"),
            (
                "[kafka]\nreplication_factor = 0",
                "kafka.replication_factor",
            ),
            (
                "[kafka.properties]\n\"enable.idempotence\" = \"false\"",
                "kafka.properties",
            ),
            ("[shim]\nsite = \"a/b\"", "shim.site"),
            (
                "[shim]\ndelivery_timeout = \"10m\"",
                "shim.delivery_timeout",
            ),
            ("[shim]\nmax_line_bytes = 10", "shim.max_line_bytes"),
            ("[reconcile]\ninterval = \"1s\"", "reconcile.interval"),
            ("[checkpoint.servers.a]\nurl = \"ftp://x\"\napi_key = \"k\"", "checkpoint.servers.url"),
            ("[checkpoint.servers.a]\nurl = \"http://x\"\napi_key = \"k\"", "checkpoint.servers.url"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"", "checkpoint.servers.api_key"),
            ("[checkpoint.servers.a]\nurl = \"https://admin:pw@x\"\napi_key = \"k\"", "checkpoint.servers.url"),
            ("[fortigate.devices.a]\nurl = \"https://admin@x\"\ntoken = \"t\"", "fortigate.devices.url"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\nuser = \"u\"\npassword = \"p\"\napi_key = \"k\"", "checkpoint.servers.api_key"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\napi_key = \"k\"\nlogins_per_minute = 0", "checkpoint.servers.logins_per_minute"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\napi_key = \"k\"\nlogin_share = 4", "checkpoint.servers.login_share"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\napi_key = \"k\"\nsession_timeout = \"2h\"", "checkpoint.servers.session_timeout"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\napi_key = \"k\"\ntask_timeout = \"0s\"", "checkpoint.servers.task_timeout"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\napi_key = \"k\"\nrequest_timeout = \"1h\"", "checkpoint.servers.request_timeout"),
            ("[checkpoint.servers.a]\nurl = \"https://x\"\napi_key = \"k\"\n[checkpoint.servers.a.tls]\nfingerprint_sha256 = \"AB:CD\"", "checkpoint.servers.tls.fingerprint_sha256"),
        ];
        for (toml, field) in cases {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            let text = err.to_string();
            assert_eq!(field_of(err), field, "{toml}");
            assert!(text.contains(field), "{text}");
            assert!(!text.contains("admin:pw"), "a URL's password shown: {text}");
        }
    }

    #[test]
    fn feed_targets_name_each_wrong_field() {
        let cp = "[checkpoint.servers.hq]\nurl = \"https://192.0.2.1\"\napi_key = \"k\"\n";
        let ok = format!("{cp}[targets.blocklist]\nkind = \"feed\"\nusername = \"gw\"\npassword = \"p\"\ntoken = \"t\"\n[targets.blocklist.pollers]\nprague-gw = \"192.0.2.10\"\n[sites.s]\ntargets = [\"blocklist\"]\n[feed]\nlisten = \"127.0.0.1:0\"\n");
        let config = Config::from_toml(&ok).unwrap().validate().unwrap();
        assert_eq!(config.targets["blocklist"].kind, TargetKind::Feed);
        let feed = |body: &str| format!("{cp}[targets.f]\nkind = \"feed\"\n{body}\n");
        let cases: Vec<(String, &str)> = vec![
            (feed("server = \"hq\""), "targets.server"),
            (feed("gateways = [\"gw\"]"), "targets.gateways"),
            (feed("device = \"fg\""), "targets.device"),
            (feed("mode = \"fw_samp\""), "targets.mode"),
            (feed("action = \"reject\""), "targets.action"),
            (feed("stitch = \"s\""), "targets.stitch"),
            (feed("username = \"gw\""), "targets.password"),
            (feed("password = \"p\""), "targets.username"),
            (feed("username = \"g:w\"\npassword = \"p\""), "targets.username"),
            (feed("username = \"gw\"\npassword = \" \""), "targets.password"),
            (feed("token = \" \""), "targets.token"),
            (feed("[targets.f.pollers]\nother = \"192.0.2.1\""), "targets.pollers"),
            (feed("[targets.f.pollers]\n\"a b\" = \"192.0.2.1\""), "targets.pollers"),
            (format!("{cp}[targets.\"a/b\"]\nkind = \"feed\"\n"), "targets"),
            (format!("{cp}[targets.hq]\nkind = \"feed\"\n"), "targets"),
            (format!("{cp}[targets.\"edge.txt\"]\nkind = \"feed\"\n"), "targets"),
            (feed("[targets.f.pollers]\na = \"192.0.2.1\"\nb = \"::ffff:192.0.2.1\""), "targets.pollers"),
            // Feed settings on a pushed target.
            (format!("{cp}[targets.t]\nserver = \"hq\"\ngateways = [\"gw\"]\ntoken = \"t\"\n"), "targets.token"),
            (format!("{cp}[targets.t]\nserver = \"hq\"\ngateways = [\"gw\"]\n[targets.t.pollers]\na = \"192.0.2.1\"\n"), "targets.pollers"),
            (format!("{cp}[feed]\nrebuild_delay = \"1ms\"\n"), "feed.rebuild_delay"),
        ];
        for (toml, field) in cases {
            let err = Config::from_toml(&toml).unwrap().validate().unwrap_err();
            let text = err.to_string();
            assert_eq!(field_of(err), field, "{toml}\n{text}");
            assert!(text.contains(field), "{text}");
        }
    }

    #[test]
    fn fortigate_targets_and_devices_name_each_wrong_field() {
        let cp = "[checkpoint.servers.hq]\nurl = \"https://192.0.2.1\"\napi_key = \"k\"\n";
        let fg = "[fortigate.devices.fg]\nurl = \"https://192.0.2.2\"\ntoken = \"t\"\n";
        let ok = format!("{cp}{fg}[targets.b]\nkind = \"fortigate\"\ndevice = \"fg\"\n[targets.w]\nkind = \"fortigate\"\ndevice = \"fg\"\nmode = \"webhook\"\nstitch = \"Flowmon ADS\"\n[targets.c]\nserver = \"hq\"\ngateways = [\"gw\"]\n[sites.s]\ntargets = [\"b\", \"c\", \"w\"]\n");
        Config::from_toml(&ok).unwrap().validate().unwrap();
        let target = |body: &str| format!("{cp}{fg}[targets.t]\n{body}\n");
        let cases: Vec<(String, &str)> = vec![
            (target("kind = \"fortigate\""), "targets.device"),
            (target("kind = \"fortigate\"\ndevice = \"nope\""), "targets.device"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nserver = \"hq\""), "targets.server"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\ngateways = [\"gw\"]"), "targets.gateways"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\naction = \"reject\""), "targets.action"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nlog = \"alert\""), "targets.log"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\ncriteria = \"any\""), "targets.criteria"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nclose_connections = true"), "targets.close_connections"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nmode = \"fw_samp\""), "targets.mode"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nmode = \"webhook\""), "targets.stitch"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nmode = \"webhook\"\nstitch = \"a;b\""), "targets.stitch"),
            (target("kind = \"fortigate\"\ndevice = \"fg\"\nstitch = \"s\""), "targets.stitch"),
            (target("gateways = [\"gw\"]"), "targets.server"),
            (target("server = \"hq\"\ngateways = [\"gw\"]\ndevice = \"fg\""), "targets.device"),
            (target("server = \"hq\"\ngateways = [\"gw\"]\nmode = \"banned_ip\""), "targets.mode"),
            (target("server = \"hq\""), "targets.gateways"),
            (format!("{fg}[fortigate.devices.b]\nurl = \"https://x/?access_token=abc\"\ntoken = \"t\""), "fortigate.devices.url"),
            ("[fortigate.devices.b]\nurl = \"http://x\"\ntoken = \"t\"".into(), "fortigate.devices.url"),
            ("[fortigate.devices.b]\nurl = \"https://x/api/v2\"\ntoken = \"t\"".into(), "fortigate.devices.url"),
            ("[fortigate.devices.b]\nurl = \"https://x\"".into(), "fortigate.devices.token"),
            ("[fortigate.devices.b]\nurl = \"https://x\"\ntoken = \"t\"\nvdom = \"a b\"".into(), "fortigate.devices.vdom"),
            ("[fortigate.devices.b]\nurl = \"https://x\"\ntoken = \"t\"\nrequest_timeout = \"0s\"".into(), "fortigate.devices.request_timeout"),
            ("[fortigate.devices.b]\nurl = \"https://x\"\ntoken = \"t\"\n[fortigate.devices.b.tls]\nfingerprint_sha256 = \"AB\"".into(), "fortigate.devices.tls.fingerprint_sha256"),
            (format!("{cp}[fortigate.devices.hq]\nurl = \"https://x\"\ntoken = \"t\""), "fortigate.devices"),
            ("[shim.flowmon_api]\nurl = \"http://localhost\"\ncredentials_file = \"/c\"".into(), "shim.flowmon_api.url"),
            ("[shim.flowmon_api]\ncredentials_file = \"\"".into(), "shim.flowmon_api.credentials_file"),
            ("[shim.flowmon_api]\ncredentials_file = \"/c\"\ntimeout = \"20s\"".into(), "shim.flowmon_api.timeout"),
            ("[shim.flowmon_api]\ncredentials_file = \"/c\"\nconcurrency = 0".into(), "shim.flowmon_api.concurrency"),
        ];
        for (toml, field) in cases {
            let err = Config::from_toml(&toml).unwrap().validate().unwrap_err();
            let text = err.to_string();
            assert_eq!(field_of(err), field, "{toml}\n{text}");
            assert!(text.contains(field), "{text}");
        }
        // An operator's copy of the file may leave the token out.
        let no_token = format!("{cp}[fortigate.devices.fg]\nurl = \"https://192.0.2.2\"\n");
        let config = Config::from_toml(&no_token).unwrap();
        config.clone().validate_for_operator().unwrap();
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "fortigate.devices.token"
        );
    }

    #[test]
    fn a_fortigate_token_is_read_from_the_environment_as_text_and_never_printed() {
        assert!(is_secret_key("FORTIGATE__DEVICES__FG__TOKEN"));
        let config = Config::from_toml(
            "[fortigate.devices.fg]\nurl = \"https://192.0.2.2\"\ntoken = \"Sup3rSecretToken\"\n",
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("Sup3rSecretToken"));
    }

    #[test]
    fn a_management_server_validates_and_its_secrets_never_print() {
        let c = Config::from_toml(
            "[checkpoint.servers.hq]\nurl = \"https://mgmt.example.net\"\nuser = \"samgate\"\npassword = \"hunter2\"\n[checkpoint.servers.hq.tls]\nfingerprint_sha256 = \"ab:CD:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89\"\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        let hq = &c.checkpoint.servers["hq"];
        assert_eq!(hq.logins_per_minute, 3);
        assert_eq!(hq.session_timeout, Duration::from_secs(600));
        assert_eq!(
            hq.tls.normalized_fingerprint().unwrap(),
            "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));
    }

    #[test]
    fn plain_http_needs_an_explicit_lab_switch() {
        let server = "[checkpoint.servers.lab]\nurl = \"http://192.0.2.9\"\napi_key = \"k\"\n";
        let err = Config::from_toml(server)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plain http://") && err.contains("allow_plaintext"),
            "{err}"
        );
        let lab = format!("{server}allow_plaintext = true\n");
        assert!(Config::from_toml(&lab).unwrap().validate().is_ok());
    }

    #[test]
    fn secrets_from_the_environment_are_their_text_and_never_printed() {
        let server = "[checkpoint.servers.hq]\nurl = \"https://192.0.2.9\"\nuser = \"samgate\"\n";
        let env = SecretEnv(vec![
            (
                "SAMGATE_CHECKPOINT__SERVERS__HQ__PASSWORD".into(),
                "007123".into(),
            ),
            (
                "SAMGATE_CHECKPOINT__SERVERS__EDGE__API_KEY".into(),
                "4242".into(),
            ),
            ("SAMGATE_RUN__MAX_IN_FLIGHT".into(), "5".into()), // not a secret: ignored here
        ]);
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&format!(
                "{server}[checkpoint.servers.edge]\nurl = \"https://192.0.2.10\"\n"
            )))
            .merge(env)
            .extract()
            .unwrap();
        let config = config.validate().unwrap();
        let servers = &config.checkpoint.servers;
        assert_eq!(servers["hq"].password.as_ref().unwrap().expose(), "007123");
        assert_eq!(servers["edge"].api_key.as_ref().unwrap().expose(), "4242");
        assert_eq!(config.run.max_in_flight, RunConfig::default().max_in_flight);
        assert!(is_secret_key("CHECKPOINT__SERVERS__HQ__PASSWORD"));
        assert!(!is_secret_key("CHECKPOINT__SERVERS__HQ__USER"));

        // A secret in a file that is a number is its text too; one that is not a string or a
        // number is refused, and the error does not show it.
        let numeric = Config::from_toml(&format!("{server}password = 123456\n")).unwrap();
        assert_eq!(
            numeric.checkpoint.servers["hq"]
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "123456"
        );
        let err = Config::from_toml(&format!("{server}password = [\"hunter2\"]\n")).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }

    #[test]
    fn arbitrary_librdkafka_properties_pass_through() {
        let c = Config::from_toml(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
    }

    #[test]
    fn a_property_librdkafka_refuses_is_named_without_its_value() {
        for (toml, shown) in [
            // A mistyped key: its value may be the password it was meant for.
            ("\"sasl.pasword\" = \"Tr0ub4dor-3\"", "`sasl.pasword`"),
            ("\"acks\" = \"Tr0ub4dor-3\"", "`acks`"),
        ] {
            let err = Config::from_toml(&format!("[kafka.properties]\n{toml}\n"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("kafka.properties") && err.contains(shown),
                "{err}"
            );
            assert!(!err.contains("Tr0ub4dor"), "the value leaked: {err}");
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_defaults() {
        let err = Config::load(Some(Path::new("/nonexistent/samgate.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
