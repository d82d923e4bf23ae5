//! A Check Point management server and its gateways, faithful enough for tests, the demo,
//! benchmarks and labs (`samgate simulate checkpoint`). It follows §7 of the protocol reference:
//! versioned `/web_api` paths, login by password or API key with a per-admin login limit, idle
//! session expiry and a session cap, `run-script` as tasks that progress over time, `show-task`
//! with base64 output, the documented error bodies, and faults on demand. Scripts run on
//! [`gateway::Gateway`]s, which interpret `fw sam` and `fw samp` for real.
//!
//! `GET /sim/state` shows everything the firewall was asked and what it holds; `POST /sim/faults`
//! switches faults on and off at runtime.

pub mod gateway;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::serve::{html, random_token};
use gateway::Gateway;

/// API versions this simulator understands in URLs (the official table, R80 to R82).
pub const API_VERSIONS: &[&str] = &[
    "1", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.6.1", "1.7", "1.7.1", "1.8", "1.8.1", "1.9",
    "1.9.1", "2", "2.0.1",
];

/// How the simulated management server behaves.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub listen: SocketAddr,
    /// Serve HTTPS with a fresh self-signed certificate (else plain HTTP).
    pub tls: bool,
    /// Administrators with passwords.
    pub users: Vec<(String, String)>,
    /// The API key accepted at login (an API-key administrator named `api-admin`).
    pub api_key: String,
    pub gateways: Vec<String>,
    /// What `login` announces as `api-server-version`.
    pub api_version: String,
    /// Most concurrent sessions (the real server allows 100).
    pub max_sessions: usize,
    /// Logins per minute per (administrator, domain); R81+ allows 3.
    pub logins_per_minute: u32,
    /// HTTP status of an `err_too_many_requests` answer (unconfirmed on real servers).
    pub login_limit_status: u16,
    /// How long a run-script task stays `in progress`: the model's base. With
    /// [`FirewallModel::flat`] (the default for tests) that is all; `samgate simulate` and the
    /// benchmarks add a cost per process (`FirewallModel::honest`).
    pub task_duration: Duration,
    /// What a gateway's work costs on top of `task_duration`.
    pub model: FirewallModel,
    /// Scripts kept for `/sim/state` (the newest).
    pub kept_scripts: usize,
    pub faults: Faults,
    /// What rule timeouts and script records count in (wall time unless a test moves it).
    pub clock: Arc<dyn Clock>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            users: vec![("admin".into(), "admin123".into())],
            api_key: random_token(24),
            gateways: vec!["gw-1".into(), "gw-2".into()],
            api_version: "1.8".into(),
            max_sessions: 100,
            logins_per_minute: 3,
            login_limit_status: 429,
            task_duration: Duration::from_millis(1000),
            model: FirewallModel::flat(),
            kept_scripts: 1000,
            faults: Faults::default(),
            clock: crate::clock::system(),
        }
    }
}

/// How long a gateway takes for a script, beyond the task's base (`task_duration`: the API and
/// the agent that hands the script over). On a real gateway each `fw sam` / `fw samp` in a
/// script is a process of its own, which is why Check Point's bulk-block script (sk103154)
/// feeds `fw samp batch` instead. The figures of [`honest`](Self::honest) are assumptions
/// (docs/checkpoint.md): no public source measures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallModel {
    /// Per `fw` / `fw6` process the script starts.
    pub per_process: Duration,
    /// Per line a `fw samp batch` process reads.
    pub per_batch_line: Duration,
    /// How many scripts a gateway works on at once (its cores for SAM work); a script beyond
    /// them waits for one to finish. 0: no limit.
    pub gateway_cores: u32,
}

impl FirewallModel {
    /// Every script takes just the base: what the tests use, where time is not the point.
    pub const fn flat() -> Self {
        Self {
            per_process: Duration::ZERO,
            per_batch_line: Duration::ZERO,
            gateway_cores: 0,
        }
    }

    /// The documented assumption: 40 ms per process, 0.5 ms per batch line, two scripts at
    /// once per gateway.
    pub const fn honest() -> Self {
        Self {
            per_process: Duration::from_millis(40),
            per_batch_line: Duration::from_micros(500),
            gateway_cores: 2,
        }
    }

    /// The gateway's own work for `outcome` (what its cores are busy with).
    pub fn work(&self, outcome: &gateway::ScriptOutcome) -> Duration {
        self.per_process * outcome.processes + self.per_batch_line * outcome.batch_lines
    }
}

/// When a gateway's cores are free again (unix milliseconds, one entry per core).
#[derive(Debug, Clone, Default)]
pub struct Cores {
    free_at: Vec<i64>,
}

impl Cores {
    /// Schedules a script handed over at `handed_ms` that takes `work` on the first core free:
    /// returns when it is done. Without a core limit every script starts at once.
    pub fn schedule(&mut self, cores: u32, handed_ms: i64, work: Duration) -> i64 {
        let work = work.as_millis() as i64;
        if cores == 0 {
            return handed_ms + work;
        }
        self.free_at.resize(cores as usize, i64::MIN);
        let core = (0..self.free_at.len())
            .min_by_key(|&i| self.free_at[i])
            .expect("at least one core");
        let done = self.free_at[core].max(handed_ms) + work;
        self.free_at[core] = done;
        done
    }
}

/// Faults on demand. Counters (`*_next`) apply to that many upcoming API calls, then clear.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every API answer.
    pub latency_ms: u64,
    /// Answer the next N calls with an nginx-style HTML 502.
    pub html_502_next: u32,
    /// Answer the next N calls with an HTML 403 (API access not allowed from this address).
    pub html_403_next: u32,
    /// Answer the next N calls with HTTP 500 `generic_internal_error`.
    pub http_500_next: u32,
    /// Make every run-script task end with this status (`failed`, `partially succeeded`, …);
    /// the script runs as usual.
    pub task_status: Option<String>,
    /// Gateways the server cannot reach: scripts do not run there, their tasks fail with no
    /// output.
    pub unreachable_gateways: Vec<String>,
    /// The next N `run-script` calls run nothing and answer with an empty task list.
    pub no_tasks_next: u32,
    /// Gateways that answer as unknown targets (404 `generic_err_object_not_found`).
    pub unknown_targets: Vec<String>,
    /// The next N `run-script` calls are accepted, then their answer is lost (the connection
    /// is cut mid-response); their scripts run a task's base time later, as a server that queued
    /// them would: the caller cannot know whether, or when, the rules are in place.
    pub lost_answers_next: u32,
    /// Answer the next N `show-task` calls with an nginx-style HTML 502.
    pub show_task_errors_next: u32,
    /// The next N `run-script` calls are carried out, but their tasks never leave `in progress`
    /// (the caller's task timeout fires).
    pub stuck_tasks_next: u32,
    /// How long tasks take from now on, overriding `task_duration` (slow gateways).
    pub task_duration_ms: Option<u64>,
    /// The next N `run-script` answers name no `target` and list their tasks in reverse order,
    /// and those tasks' details name no gateway (as in the one published capture): only the
    /// task's name (`<target> - <script-name>`) says whose it is.
    pub unnamed_tasks_next: u32,
    /// A line every `fw samp get` and `fw sam -M` prints before its rules (a listing format
    /// samgate does not know).
    pub listing_preamble: Option<String>,
}

/// A partial update of [`Faults`] (`POST /sim/faults`); `expire_sessions` drops every session.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsUpdate {
    pub latency_ms: Option<u64>,
    pub html_502_next: Option<u32>,
    pub html_403_next: Option<u32>,
    pub http_500_next: Option<u32>,
    pub task_status: Option<Option<String>>,
    pub unreachable_gateways: Option<Vec<String>>,
    pub no_tasks_next: Option<u32>,
    pub unknown_targets: Option<Vec<String>>,
    pub lost_answers_next: Option<u32>,
    pub show_task_errors_next: Option<u32>,
    pub stuck_tasks_next: Option<u32>,
    pub task_duration_ms: Option<Option<u64>>,
    pub unnamed_tasks_next: Option<u32>,
    pub listing_preamble: Option<Option<String>>,
    pub logins_per_minute: Option<u32>,
    pub expire_sessions: bool,
    /// Drop every rule of this gateway (a reinstall, a wiped table).
    pub wipe_gateway: Option<String>,
    /// Clear every fault.
    pub clear: bool,
}

#[derive(Debug)]
struct SimSession {
    uid: String,
    admin: String,
    timeout: Duration,
    last_seen: Instant,
}

#[derive(Debug)]
struct SimTask {
    target: String,
    gateway_uid: String,
    created: Instant,
    duration: Duration,
    outcome: gateway::ScriptOutcome,
    status_override: Option<String>,
    /// Never finishes (a task-timeout fault).
    stuck: bool,
    /// Its details name no gateway (the unnamed-tasks fault).
    unnamed: bool,
    /// The `script-name` it ran under.
    script_name: String,
    transaction: u64,
}

#[derive(Debug, Serialize)]
struct ScriptRecord {
    /// Unix seconds.
    at: i64,
    /// Unix milliseconds.
    at_ms: i64,
    name: String,
    targets: Vec<String>,
    script: String,
}

#[derive(Debug, Serialize)]
struct SimGateway {
    uid: String,
    #[serde(flatten)]
    tables: Gateway,
    #[serde(skip)]
    cores: Cores,
}

struct SimState {
    config: SimulatorConfig,
    sessions: HashMap<String, SimSession>,
    login_log: HashMap<String, VecDeque<Instant>>,
    tasks: HashMap<String, SimTask>,
    gateways: BTreeMap<String, SimGateway>,
    logins: u64,
    failed_logins: u64,
    rate_limited_logins: u64,
    calls: BTreeMap<String, u64>,
    scripts: VecDeque<ScriptRecord>,
    scripts_total: u64,
    faults: Faults,
    /// Every session id handed out (newest last, bounded), so tests can look for them in logs.
    issued_sids: VecDeque<String>,
    /// Scripts accepted whose answer was lost, waiting for their time to run.
    deferred: Vec<Deferred>,
}

/// A script that runs on `target` at `due`.
#[derive(Debug)]
struct Deferred {
    due: Instant,
    target: String,
    script: String,
}

impl SimState {
    /// Runs the deferred scripts whose time came, in order.
    fn run_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let now = Instant::now();
        self.deferred.sort_by_key(|d| d.due);
        let ready = self.deferred.partition_point(|d| d.due <= now);
        for d in self.deferred.drain(..ready).collect::<Vec<_>>() {
            let at = self.config.clock.now_ms();
            if let Some(gw) = self.gateways.get_mut(&d.target) {
                gw.tables.run_script(&d.script, at);
            }
        }
    }
}

/// Locks the simulator's state, after running the deferred scripts whose time came: whatever
/// reads or changes the gateways sees them.
fn lock(state: &Shared) -> std::sync::MutexGuard<'_, SimState> {
    let mut s = state.lock().expect("sim state");
    s.run_deferred();
    s
}

/// Session ids kept for [`RunningSimulator::issued_session_ids`].
const KEPT_SIDS: usize = 10_000;

type Shared = Arc<Mutex<SimState>>;

/// A running simulator.
pub struct RunningSimulator {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` (or `http://`).
    pub url: String,
    /// SHA-256 fingerprint of the certificate (HTTPS only), colon-separated hex.
    pub fingerprint: Option<String>,
    pub api_key: String,
    state: Shared,
    served: crate::serve::Served,
}

impl RunningSimulator {
    /// What `GET /sim/state` answers, without a request.
    pub fn state(&self) -> Value {
        snapshot(&mut lock(&self.state))
    }

    /// Every rule add each gateway received, oldest first (`GET /sim/history`).
    pub fn history(&self) -> BTreeMap<String, Vec<gateway::RuleAdd>> {
        history(&lock(&self.state))
    }

    /// The source addresses each gateway blocks right now (drop or reject rules).
    pub fn blocked_sources(
        &self,
    ) -> BTreeMap<String, std::collections::BTreeSet<std::net::IpAddr>> {
        let mut s = lock(&self.state);
        let now = s.config.clock.now_ms();
        s.gateways
            .iter_mut()
            .map(|(name, gw)| {
                gw.tables.expire(now);
                (name.clone(), gateway::blocked_sources(&gw.tables))
            })
            .collect()
    }

    /// Every session id this server handed out (the newest 10,000): secrets a log must not show.
    pub fn issued_session_ids(&self) -> Vec<String> {
        let s = lock(&self.state);
        s.issued_sids.iter().cloned().collect()
    }

    /// Switches faults, as `POST /sim/faults` does.
    pub fn set_faults(&self, update: FaultsUpdate) -> Faults {
        apply_faults(&mut lock(&self.state), update)
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) {
        self.served.stop().await;
    }
}

/// Starts a simulator; returns once it listens.
pub async fn start(config: SimulatorConfig) -> anyhow::Result<RunningSimulator> {
    let gateways = config
        .gateways
        .iter()
        .map(|name| {
            let uid = uuid_like(&format!("gateway/{name}"));
            (
                name.clone(),
                SimGateway {
                    uid,
                    tables: Gateway::default(),
                    cores: Cores::default(),
                },
            )
        })
        .collect();
    let state: Shared = Arc::new(Mutex::new(SimState {
        faults: config.faults.clone(),
        config: config.clone(),
        sessions: HashMap::new(),
        login_log: HashMap::new(),
        tasks: HashMap::new(),
        gateways,
        logins: 0,
        failed_logins: 0,
        rate_limited_logins: 0,
        calls: BTreeMap::new(),
        scripts: VecDeque::new(),
        scripts_total: 0,
        issued_sids: VecDeque::new(),
        deferred: Vec::new(),
    }));
    let app = Router::new()
        .route("/sim/state", get(sim_state))
        .route("/sim/faults", post(sim_faults))
        .route("/sim/history", get(sim_history))
        .route("/{*path}", post(api))
        .with_state(state.clone());
    let served = crate::serve::serve(config.listen, config.tls, app)?;
    Ok(RunningSimulator {
        addr: served.addr,
        url: served.url.clone(),
        fingerprint: served.fingerprint.clone(),
        api_key: config.api_key,
        state,
        served,
    })
}

fn posix(t: SystemTime) -> Value {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let iso = chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%dT%H:%M%z")
        .to_string();
    json!({"posix": ms, "iso-8601": iso})
}

fn uuid_like(seed: &str) -> String {
    let h = Sha256::digest(format!("{seed}/{}", random_token(8)).as_bytes());
    let hex: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn error(status: u16, code: &str, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
        .into_response()
}

async fn sim_state(State(state): State<Shared>) -> Json<Value> {
    Json(snapshot(&mut lock(&state)))
}

/// Everything the firewall was asked and what it holds (rules past their expiry dropped).
fn snapshot(s: &mut SimState) -> Value {
    let now = s.config.clock.now_ms();
    for gw in s.gateways.values_mut() {
        gw.tables.expire(now);
    }
    let live = Instant::now();
    s.sessions
        .retain(|_, sess| live.duration_since(sess.last_seen) < sess.timeout);
    json!({
        "api_version": s.config.api_version,
        "gateways": s.gateways,
        "logins": s.logins,
        "failed_logins": s.failed_logins,
        "rate_limited_logins": s.rate_limited_logins,
        "active_sessions": s.sessions.len(),
        "calls": s.calls,
        "scripts_total": s.scripts_total,
        "scripts": s.scripts,
        "tasks_total": s.tasks.len(),
        "faults": s.faults,
        "logins_per_minute": s.config.logins_per_minute,
        "task_base_ms": s.config.task_duration.as_millis() as u64,
        "model": s.config.model,
    })
}

fn history(s: &SimState) -> BTreeMap<String, Vec<gateway::RuleAdd>> {
    s.gateways
        .iter()
        .map(|(name, gw)| (name.clone(), gw.tables.adds.iter().cloned().collect()))
        .collect()
}

/// Every rule add per gateway, with whether an active rule already blocked its source.
async fn sim_history(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"gateways": history(&lock(&state))}))
}

async fn sim_faults(State(state): State<Shared>, Json(update): Json<FaultsUpdate>) -> Response {
    let mut s = lock(&state);
    if let Some(name) = &update.wipe_gateway {
        if !s.gateways.contains_key(name) {
            return error(
                404,
                "generic_err_object_not_found",
                format!("no gateway {name}"),
            );
        }
    }
    Json(apply_faults(&mut s, update)).into_response()
}

fn apply_faults(s: &mut SimState, update: FaultsUpdate) -> Faults {
    if update.clear {
        s.faults = Faults::default();
    }
    let f = &mut s.faults;
    if let Some(v) = update.latency_ms {
        f.latency_ms = v;
    }
    if let Some(v) = update.html_502_next {
        f.html_502_next = v;
    }
    if let Some(v) = update.html_403_next {
        f.html_403_next = v;
    }
    if let Some(v) = update.http_500_next {
        f.http_500_next = v;
    }
    if let Some(v) = update.task_status {
        f.task_status = v;
    }
    if let Some(v) = update.unknown_targets {
        f.unknown_targets = v;
    }
    if let Some(v) = update.unreachable_gateways {
        f.unreachable_gateways = v;
    }
    if let Some(v) = update.no_tasks_next {
        f.no_tasks_next = v;
    }
    if let Some(v) = update.lost_answers_next {
        f.lost_answers_next = v;
    }
    if let Some(v) = update.show_task_errors_next {
        f.show_task_errors_next = v;
    }
    if let Some(v) = update.stuck_tasks_next {
        f.stuck_tasks_next = v;
    }
    if let Some(v) = update.task_duration_ms {
        f.task_duration_ms = v;
    }
    if let Some(v) = update.unnamed_tasks_next {
        f.unnamed_tasks_next = v;
    }
    if let Some(v) = update.listing_preamble {
        f.listing_preamble = v;
    }
    if let Some(v) = update.logins_per_minute {
        s.config.logins_per_minute = v;
    }
    if update.expire_sessions {
        s.sessions.clear();
    }
    if let Some(gw) = update
        .wipe_gateway
        .and_then(|name| s.gateways.get_mut(&name))
    {
        gw.tables.wipe();
    }
    s.faults.clone()
}

/// Every `POST …/web_api[/vX]/<command>`.
async fn api(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = lock(&state).faults.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut s = lock(&state);
    if s.faults.html_502_next > 0 {
        s.faults.html_502_next -= 1;
        return html(StatusCode::BAD_GATEWAY, "502 Bad Gateway");
    }
    if s.faults.html_403_next > 0 {
        s.faults.html_403_next -= 1;
        return html(StatusCode::FORBIDDEN, "403 Forbidden");
    }
    if s.faults.http_500_next > 0 {
        s.faults.http_500_next -= 1;
        return error(
            500,
            "generic_internal_error",
            "Internal error. Please try again later.",
        );
    }
    // [<cloud-id>/]web_api[/v<version>]/<command>
    let segments: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Some(at) = segments.iter().position(|p| *p == "web_api") else {
        return error(
            404,
            "generic_err_command_not_found",
            format!("Unknown path /{path}"),
        );
    };
    let (version, command) = match &segments[at + 1..] {
        [command] => (None, *command),
        [version, command] if version.starts_with('v') => (Some(&version[1..]), *command),
        _ => {
            return error(
                404,
                "generic_err_command_not_found",
                format!("Unknown path /{path}"),
            )
        }
    };
    if let Some(v) = version {
        if !API_VERSIONS.contains(&v) {
            return error(
                400,
                "err_unknown_api_version",
                format!("Unknown API version: {v}"),
            );
        }
    }
    let request: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return error(
                    400,
                    "generic_err_invalid_syntax",
                    "Invalid syntax: the request body must be a JSON object",
                )
            }
        }
    };
    const COMMANDS: &[&str] = &[
        "login",
        "logout",
        "keepalive",
        "discard",
        "run-script",
        "show-task",
        "show-session",
        "show-api-versions",
        "show-gateways-and-servers",
        "publish",
    ];
    if !COMMANDS.contains(&command) {
        return error(
            404,
            "generic_err_command_not_found",
            format!("Command not found: {command}"),
        );
    }
    *s.calls.entry(command.to_owned()).or_default() += 1;
    if command == "show-task" && s.faults.show_task_errors_next > 0 {
        s.faults.show_task_errors_next -= 1;
        return html(StatusCode::BAD_GATEWAY, "502 Bad Gateway");
    }
    if command == "login" {
        return login(&mut s, &request);
    }
    let sid = match headers.get("x-chkp-sid").and_then(|v| v.to_str().ok()) {
        Some(sid) => sid.to_owned(),
        None => {
            return error(
                400,
                "generic_err_missing_required_header",
                "Missing header: [X-chkp-sid]",
            )
        }
    };
    let now = Instant::now();
    let fresh = match s.sessions.get_mut(&sid) {
        Some(session) if now.duration_since(session.last_seen) < session.timeout => {
            session.last_seen = now;
            true
        }
        _ => false,
    };
    if !fresh {
        s.sessions.remove(&sid);
        return error(401, "generic_err_wrong_session_id", "Wrong session id [***]. Session may be expired. Please check session id and resend the request");
    }
    match command {
        "keepalive" => Json(json!({"message": "OK"})).into_response(),
        "logout" => {
            s.sessions.remove(&sid);
            Json(json!({"message": "OK"})).into_response()
        }
        "discard" => {
            Json(json!({"message": "OK", "number-of-discarded-changes": 0})).into_response()
        }
        "publish" => Json(json!({"task-id": uuid_like("publish")})).into_response(),
        "show-session" => {
            let session = &s.sessions[&sid];
            Json(json!({"uid": session.uid, "type": "session", "user-name": session.admin,
                "domain": {"name": "SMC User", "domain-type": "domain", "uid": "41e821a0-3720-11e3-aa6e-0800200c9fde"},
                "expired-session": false, "state": "open"})).into_response()
        }
        "show-api-versions" => Json(
            json!({"current-version": s.config.api_version, "supported-versions": API_VERSIONS}),
        )
        .into_response(),
        "show-gateways-and-servers" => {
            let objects: Vec<Value> = s
                .gateways
                .iter()
                .map(|(name, gw)| {
                    json!({"uid": gw.uid, "name": name, "type": "simple-gateway",
                "domain": {"name": "SMC User", "domain-type": "domain"}})
                })
                .collect();
            let total = objects.len();
            Json(json!({"objects": objects, "from": 1, "to": total, "total": total}))
                .into_response()
        }
        "run-script" => {
            let lose = s.faults.lost_answers_next > 0;
            let answer = run_script(&mut s, &request, lose);
            if answer.status().is_success() && lose {
                s.faults.lost_answers_next -= 1;
                return cut_connection();
            }
            answer
        }
        "show-task" => show_task(&s, &request),
        _ => error(
            404,
            "generic_err_command_not_found",
            format!("Command not found: {command}"),
        ),
    }
}

/// A 200 whose body never arrives: the connection is cut after the headers.
fn cut_connection() -> Response {
    let body = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("answer lost (simulated fault)"))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(axum::body::Body::from_stream(body))
        .expect("a valid response")
}

fn login(s: &mut SimState, request: &Value) -> Response {
    let admin = match (
        request["user"].as_str(),
        request["password"].as_str(),
        request["api-key"].as_str(),
    ) {
        (Some(user), Some(password), None)
            if s.config
                .users
                .iter()
                .any(|(u, p)| u == user && p == password) =>
        {
            user.to_owned()
        }
        (None, None, Some(key)) if key == s.config.api_key => "api-admin".to_owned(),
        _ => {
            s.failed_logins += 1;
            return error(400, "err_login_failed", "Authentication to server failed.");
        }
    };
    let domain = request["domain"].as_str().unwrap_or("SMC User").to_owned();
    let now = Instant::now();
    let per_minute = s.config.logins_per_minute as usize;
    let log = s.login_log.entry(format!("{admin}/{domain}")).or_default();
    while log
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        log.pop_front();
    }
    if log.len() >= per_minute {
        s.rate_limited_logins += 1;
        return error(
            s.config.login_limit_status,
            "err_too_many_requests",
            "Too many requests in a given amount of time",
        );
    }
    let timeout = match request.get("session-timeout") {
        None => 600,
        Some(t) => match t.as_u64() {
            Some(t) if (10..=3600).contains(&t) => t,
            _ => return error(
                400,
                "generic_err_invalid_parameter",
                "Invalid parameter for [session-timeout]. The value must be between 10 and 3600",
            ),
        },
    };
    s.sessions
        .retain(|_, sess| now.duration_since(sess.last_seen) < sess.timeout);
    if s.sessions.len() >= s.config.max_sessions {
        return error(
            400,
            "err_login_failed_more_than_one_opened_session",
            "Maximum number of concurrent sessions reached",
        );
    }
    log.push_back(now);
    s.logins += 1;
    let sid = random_token(32);
    if s.issued_sids.len() == KEPT_SIDS {
        s.issued_sids.pop_front();
    }
    s.issued_sids.push_back(sid.clone());
    let uid = uuid_like("session");
    s.sessions.insert(
        sid.clone(),
        SimSession {
            uid: uid.clone(),
            admin,
            timeout: Duration::from_secs(timeout),
            last_seen: now,
        },
    );
    Json(json!({
        "uid": uid,
        "sid": sid,
        "url": format!("https://127.0.0.1/web_api"),
        "session-timeout": timeout,
        "last-login-was-at": posix(SystemTime::now()),
        "read-only": false,
        "api-server-version": s.config.api_version,
    }))
    .into_response()
}

/// `run-script`; `deferred`: its answer will be lost, and its script runs a task's base time
/// later (no task is kept: nobody will ever ask for it).
fn run_script(s: &mut SimState, request: &Value, deferred: bool) -> Response {
    let script = match (
        request["script"].as_str(),
        request["script-base64"].as_str(),
    ) {
        (Some(script), _) => script.to_owned(),
        (None, Some(encoded)) => match base64::engine::general_purpose::STANDARD.decode(encoded) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => {
                return error(
                    400,
                    "generic_err_invalid_parameter",
                    "Invalid parameter for [script-base64]",
                )
            }
        },
        (None, None) => {
            return error(
                400,
                "generic_err_missing_required_parameters",
                "Missing parameter: [script]",
            )
        }
    };
    let targets: Vec<String> = match &request["targets"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if targets.is_empty() {
        return error(
            400,
            "generic_err_missing_required_parameters",
            "Missing parameter: [targets]",
        );
    }
    for target in &targets {
        if !s.gateways.contains_key(target) || s.faults.unknown_targets.contains(target) {
            return error(
                404,
                "generic_err_object_not_found",
                format!("Requested object [{target}] not found"),
            );
        }
    }
    let name = request["script-name"].as_str().unwrap_or("").to_owned();
    s.scripts_total += 1;
    s.scripts.push_back(ScriptRecord {
        at: s.config.clock.now_secs(),
        at_ms: s.config.clock.now_ms(),
        name: name.clone(),
        targets: targets.clone(),
        script: script.clone(),
    });
    while s.scripts.len() > s.config.kept_scripts {
        s.scripts.pop_front();
    }
    if s.faults.no_tasks_next > 0 {
        s.faults.no_tasks_next -= 1;
        return Json(json!({"tasks": []})).into_response();
    }
    let now = s.config.clock.now_ms();
    let stuck = s.faults.stuck_tasks_next > 0;
    s.faults.stuck_tasks_next = s.faults.stuck_tasks_next.saturating_sub(1);
    let unnamed = s.faults.unnamed_tasks_next > 0;
    s.faults.unnamed_tasks_next = s.faults.unnamed_tasks_next.saturating_sub(1);
    let duration = s
        .faults
        .task_duration_ms
        .map_or(s.config.task_duration, Duration::from_millis);
    let preamble = s.faults.listing_preamble.clone();
    let mut tasks = Vec::new();
    for target in targets {
        if deferred {
            if s.faults.unreachable_gateways.contains(&target) {
                continue; // its task would fail: the script never runs there
            }
            s.deferred.push(Deferred {
                due: Instant::now() + duration,
                target,
                script: script.clone(),
            });
            continue;
        }
        let unreachable = s.faults.unreachable_gateways.contains(&target);
        let gw = s.gateways.get_mut(&target).expect("checked above");
        let outcome = if unreachable {
            gateway::ScriptOutcome {
                stdout: String::new(),
                stderr: format!("Gateway {target} is not reachable\n"),
                exit: 1,
                ..Default::default()
            }
        } else {
            gw.tables.listing_preamble = preamble.clone();
            gw.tables.run_script(&script, now)
        };
        // The base (the API, the agent's handover) first, then the gateway's work on a core.
        let model = s.config.model;
        let handed = now + duration.as_millis() as i64;
        let done = gw
            .cores
            .schedule(model.gateway_cores, handed, model.work(&outcome));
        let gateway_uid = gw.uid.clone();
        let task_id = uuid_like("task");
        let transaction = s.scripts_total;
        s.tasks.insert(
            task_id.clone(),
            SimTask {
                target: target.clone(),
                gateway_uid,
                created: Instant::now(),
                duration: Duration::from_millis((done - now).max(0) as u64),
                outcome,
                status_override: s.faults.task_status.clone(),
                stuck,
                unnamed,
                script_name: name.clone(),
                transaction,
            },
        );
        tasks.push(match unnamed {
            true => json!({"task-id": task_id}),
            false => json!({"target": target, "task-id": task_id}),
        });
    }
    if unnamed {
        tasks.reverse();
    }
    Json(json!({"tasks": tasks})).into_response()
}

fn show_task(s: &SimState, request: &Value) -> Response {
    let ids: Vec<String> = match &request["task-id"] {
        Value::String(id) => vec![id.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        _ => {
            return error(
                400,
                "generic_err_missing_required_parameters",
                "Missing parameter: [task-id]",
            )
        }
    };
    let full = request["details-level"].as_str() == Some("full");
    let mut tasks = Vec::new();
    for id in ids {
        let Some(task) = s.tasks.get(&id) else {
            return error(
                404,
                "generic_err_object_not_found",
                format!("Requested object [{id}] not found"),
            );
        };
        let elapsed = task.created.elapsed();
        let done = elapsed >= task.duration && !task.stuck;
        let progress = if done {
            100
        } else {
            (elapsed.as_millis() * 100 / task.duration.as_millis().max(1)).min(99) as u64
        };
        let status = if !done {
            "in progress".to_owned()
        } else if let Some(status) = &task.status_override {
            status.clone()
        } else if task.outcome.exit == 0 {
            "succeeded".to_owned()
        } else {
            "failed".to_owned()
        };
        let name = format!("{} - {}", task.target, task.script_name);
        let mut value = json!({"task-id": id, "task-name": name, "name": name, "status": status,
            "progress-percentage": progress, "suppressed": false, "type": "CdmTaskNotification",
            "comments": if done { "Completed" } else { "" }});
        if full {
            let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
            let (message, err) = if done {
                (b64(&task.outcome.stdout), b64(&task.outcome.stderr))
            } else {
                (String::new(), String::new())
            };
            let code = if !done {
                "in progress"
            } else if status == "succeeded" {
                "succeeded"
            } else {
                "failed"
            };
            let description = if done && task.outcome.exit != 0 {
                format!("Script exited with code {}", task.outcome.exit)
            } else {
                String::new()
            };
            value["task-details"] = json!([{
                "statusCode": code, "statusDescription": description,
                "responseMessage": message, "responseError": err,
                "gatewayId": task.gateway_uid,
                "gatewayName": if task.unnamed { "" } else { task.target.as_str() },
                "transactionId": task.transaction, "name": null, "display-name": "", "color": "black",
            }]);
        }
        tasks.push(value);
    }
    Json(json!({"tasks": tasks})).into_response()
}
