//! A courteous Check Point Management API client: one session per (server, domain), reused and
//! kept alive; one re-login and one retry when the session is lost; never more logins than the
//! configured budget per minute; `run-script` tasks polled with bounded backoff to a deadline.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::{classify, ApiError, ErrorClass};
use super::tls;
use crate::config::ManagementServerConfig;
use crate::secret::Secret;

/// How the client logs in.
#[derive(Debug, Clone)]
pub enum Credentials {
    Password { user: String, password: Secret },
    ApiKey(Secret),
}

/// A live session. The sid is a [`Secret`]: it travels only in the `X-chkp-sid` header.
#[derive(Debug)]
struct Session {
    sid: Secret,
    /// API version for URLs: the configured pin, else what the server announced at login.
    api_version: Option<String>,
    generation: u64,
    last_used: Mutex<Instant>,
}

impl Session {
    fn touch(&self) {
        *self.last_used.lock().expect("session clock") = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.last_used.lock().expect("session clock").elapsed()
    }
}

/// At most `per_minute` logins in any 60-second window (a sliding log: the server counts the
/// same way, so a token bucket's burst could exceed it).
#[derive(Debug)]
struct LoginWindow {
    per_minute: u32,
    recent: VecDeque<Instant>,
    /// Set when the server itself said "too many requests": no login before then.
    blocked_until: Option<Instant>,
}

const WINDOW: Duration = Duration::from_secs(60);

/// The first of `task_ids` not known to have ended: still running, or left out of the answer
/// (a task the answer does not name has not ended as far as samgate knows).
fn first_unended<'a>(task_ids: &'a [String], tasks: &'a [Task]) -> Option<&'a str> {
    tasks
        .iter()
        .find(|t| !t.status.is_terminal())
        .map(|t| t.task_id.as_str())
        .or_else(|| {
            task_ids
                .iter()
                .find(|id| !tasks.iter().any(|t| &t.task_id == *id))
                .map(String::as_str)
        })
}

/// Failed `show-task` polls in a row a wait asks again after (the Python SDK retries five).
const SHOW_TASK_RETRIES: u32 = 3;

impl LoginWindow {
    fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.recent.pop_front();
        }
        if let Some(until) = self.blocked_until {
            if now < until {
                return Err(until - now);
            }
            self.blocked_until = None;
        }
        if self.recent.len() >= self.per_minute as usize {
            let oldest = *self.recent.front().expect("window is full");
            return Err(WINDOW - now.duration_since(oldest));
        }
        self.recent.push_back(now);
        Ok(())
    }
}

/// `run-script`'s answer: one task per target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub task_id: String,
    /// Empty until known (see [`settle_targets`]): a task no gateway is sure of is no gateway's.
    pub target: String,
}

/// Names the gateway of each task whose `run-script` answer did not: from the finished task's
/// `gatewayName`, or its name, which Check Point forms as `<target> - <script-name>`. Only a
/// gateway the script was sent to, and claimed by no other task, is taken; a task still
/// unnamed after this counts for no gateway (its gateway's outcome stays unknown).
pub fn settle_targets(refs: &mut [TaskRef], tasks: &[Task], script_name: &str, targets: &[String]) {
    let suffix = format!(" - {script_name}");
    let claims: Vec<Option<String>> = refs
        .iter()
        .map(|r| {
            if !r.target.is_empty() {
                return Some(r.target.clone());
            }
            let task = tasks.iter().find(|t| t.task_id == r.task_id)?;
            let named = [
                task.details.first().and_then(|d| d.gateway.as_deref()),
                task.name.strip_suffix(&suffix),
            ];
            named
                .into_iter()
                .flatten()
                .find(|g| targets.iter().any(|t| t == g))
                .map(str::to_owned)
        })
        .collect();
    for (r, claim) in refs.iter_mut().zip(&claims) {
        if let Some(gateway) = claim.as_ref().filter(|_| r.target.is_empty()) {
            if claims
                .iter()
                .filter(|c| c.as_ref() == Some(gateway))
                .count()
                == 1
            {
                r.target = gateway.clone();
            }
        }
    }
}

/// A task's status (`show-task`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    InProgress,
    Succeeded,
    SucceededWithWarnings,
    PartiallySucceeded,
    Failed,
    Other(String),
}

impl TaskStatus {
    /// Both of the reference's value lists: `show-task`'s `status` (`in progress`, …) and the
    /// `tasks` enumeration (`in_progress`, `pending`, …). A task not yet started is running too:
    /// taking it for finished would verify before the script ran.
    fn parse(text: &str) -> Self {
        match text {
            "in progress" | "in_progress" | "pending" => Self::InProgress,
            "succeeded" => Self::Succeeded,
            "succeeded with warnings" => Self::SucceededWithWarnings,
            "partially succeeded" => Self::PartiallySucceeded,
            "failed" => Self::Failed,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn is_terminal(&self) -> bool {
        !matches!(self, Self::InProgress)
    }

    pub fn is_success(&self) -> bool {
        matches!(self, Self::Succeeded | Self::SucceededWithWarnings)
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::InProgress => "in progress",
            Self::Succeeded => "succeeded",
            Self::SucceededWithWarnings => "succeeded with warnings",
            Self::PartiallySucceeded => "partially succeeded",
            Self::Failed => "failed",
            Self::Other(s) => s,
        }
    }
}

/// One gateway's part of a task, with the script's output decoded from base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDetail {
    pub gateway: Option<String>,
    pub status_code: Option<String>,
    pub description: Option<String>,
    /// The script's standard output (`responseMessage`, decoded).
    pub output: String,
    /// The script's error output (`responseError`, decoded).
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub task_id: String,
    /// `task-name`: `<target> - <script-name>`.
    pub name: String,
    pub status: TaskStatus,
    pub progress: u8,
    pub details: Vec<TaskDetail>,
}

/// A script to run on gateways.
#[derive(Debug, Clone)]
pub struct RunScript<'a> {
    pub name: &'a str,
    pub script: &'a str,
    pub targets: &'a [String],
    pub comments: &'a str,
}

/// Polling of `show-task`: first wait, then doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
        }
    }
}

/// When to ask about a task first. Gateways take about the same time for similar scripts, so
/// the first `show-task` waits for the duration seen last (instead of polling from 200 ms up),
/// which saves calls and notices completion sooner. The estimate is the midpoint between the
/// last "still running" and the first "done"; a task already done at the first look makes the
/// next first look 10 % earlier, so the estimate follows gateways that speed up.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskTiming {
    typical: Option<Duration>,
}

impl TaskTiming {
    /// How long to wait before the first `show-task`.
    /// Never longer than five of the longest polling steps, so one slow task cannot make
    /// the next ones wait long.
    pub fn first_wait(&self, polling: &Polling) -> Duration {
        self.typical
            .unwrap_or(polling.initial)
            .clamp(polling.initial, polling.max * 5)
    }

    /// Tasks polled `polls` times were done at `done_at` (since the run-script), the look before
    /// that at `previous_at`.
    pub fn observe(&mut self, polls: u32, previous_at: Duration, done_at: Duration) {
        self.typical = Some(if polls <= 1 {
            done_at.mul_f64(0.9)
        } else {
            (previous_at + done_at) / 2
        });
    }
}

/// A client for one management server (one domain).
pub struct ManagementClient {
    name: String,
    url: String,
    http: reqwest::Client,
    credentials: Credentials,
    domain: Option<String>,
    session_timeout: Duration,
    pinned_version: Option<String>,
    task_timeout: Duration,
    polling: Polling,
    task_timing: Mutex<TaskTiming>,
    session: Mutex<Option<Arc<Session>>>,
    /// Serialises logins: concurrent callers wait for one login instead of each doing one.
    login_gate: tokio::sync::Mutex<()>,
    logins: Mutex<LoginWindow>,
    login_count: AtomicU64,
    generation: AtomicU64,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for ManagementClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementClient")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ManagementClient {
    /// A client for the server configured as `name`. Does not connect yet.
    pub fn new(name: &str, config: &ManagementServerConfig) -> Result<Self, String> {
        let credentials = match (&config.user, &config.password, &config.api_key) {
            (Some(user), Some(password), None) => Credentials::Password {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(key)) => Credentials::ApiKey(key.clone()),
            _ => return Err(format!("server {name}: needs user + password or api_key")),
        };
        let http = tls::http_client(name, &config.tls, config.request_timeout)?;
        if config.url.starts_with("http://") {
            tracing::warn!(
                server = name,
                "plain HTTP to this management server: its credentials and session ids cross the network unencrypted (simulators and labs only; use https://)"
            );
        }
        Ok(Self {
            name: name.to_owned(),
            url: config.url.trim_end_matches('/').to_owned(),
            http,
            credentials,
            domain: config.domain.clone(),
            session_timeout: config.session_timeout,
            pinned_version: config.api_version.clone(),
            task_timeout: config.task_timeout,
            polling: Polling::default(),
            task_timing: Mutex::new(TaskTiming::default()),
            session: Mutex::new(None),
            login_gate: tokio::sync::Mutex::new(()),
            logins: Mutex::new(LoginWindow {
                // The server counts per administrator: replicas sharing one split its budget.
                per_minute: config.logins_per_minute / config.login_share.max(1),
                recent: VecDeque::new(),
                blocked_until: None,
            }),
            login_count: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            metrics: None,
        })
    }

    /// Records requests, latency and logins in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Overrides how `show-task` is polled.
    pub fn with_polling(mut self, polling: Polling) -> Self {
        self.polling = polling;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The longest wait for a run-script task to finish.
    pub fn task_timeout(&self) -> Duration {
        self.task_timeout
    }

    /// Successful logins so far.
    pub fn logins(&self) -> u64 {
        self.login_count.load(Ordering::Relaxed)
    }

    /// Calls `command` with `body` on the current session, logging in first if needed. A lost
    /// session (HTTP 401, `generic_err_wrong_session_id`) costs one new login and one retry.
    pub async fn call(&self, command: &str, body: &Value) -> Result<Value, ApiError> {
        let session = self.session().await?;
        match self.post(Some(&session), command, body).await {
            Err(e) if e.is_session_lost() => {
                warn!(
                    server = self.name,
                    command, "session lost; logging in again and retrying once"
                );
                self.forget(session.generation);
                let session = self.session().await?;
                self.post(Some(&session), command, body).await
            }
            other => other,
        }
    }

    /// `run-script`: one task per target.
    pub async fn run_script(&self, request: &RunScript<'_>) -> Result<Vec<TaskRef>, ApiError> {
        let body = json!({
            "script-name": request.name,
            "script": request.script,
            "targets": request.targets,
            "comments": request.comments,
        });
        let answer = self.call("run-script", &body).await?;
        let tasks = answer["tasks"]
            .as_array()
            .ok_or_else(|| self.protocol("run-script", "tasks"))?;
        tasks
            .iter()
            .map(|t| {
                let task_id = t["task-id"]
                    .as_str()
                    .ok_or_else(|| self.protocol("run-script", "task-id"))?;
                // `target` is likely but unconfirmed in real answers. Without it one target is
                // unambiguous; of several, the answer's order is not promised to be the
                // request's, so the target is read from the finished task ([`settle_targets`]).
                let target = t["target"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| match request.targets {
                        [only] if tasks.len() == 1 => Some(only.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                Ok(TaskRef {
                    task_id: task_id.to_owned(),
                    target,
                })
            })
            .collect()
    }

    /// `show-task` with `details-level: full` for several tasks at once.
    pub async fn show_tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, ApiError> {
        let body = json!({"task-id": task_ids, "details-level": "full"});
        let answer = self.call("show-task", &body).await?;
        let tasks = answer["tasks"]
            .as_array()
            .ok_or_else(|| self.protocol("show-task", "tasks"))?;
        Ok(tasks.iter().map(parse_task).collect())
    }

    /// `run-script`, then waits for its tasks (one per target) to end.
    pub async fn run_script_to_end(&self, request: &RunScript<'_>) -> Result<Vec<Task>, ApiError> {
        let tasks = self.run_script(request).await?;
        let ids: Vec<String> = tasks.into_iter().map(|t| t.task_id).collect();
        self.wait_tasks(&ids).await
    }

    /// Polls until every task is terminal, with backoff, for at most the configured task timeout.
    pub async fn wait_tasks(&self, task_ids: &[String]) -> Result<Vec<Task>, ApiError> {
        let started = Instant::now();
        let deadline = started + self.task_timeout;
        let first = self
            .task_timing
            .lock()
            .expect("timing")
            .first_wait(&self.polling);
        tokio::time::sleep(first.min(self.task_timeout)).await;
        let (mut polls, mut previous_at, mut delay) = (0, Duration::ZERO, self.polling.initial);
        let mut failures = 0;
        loop {
            let asked_at = started.elapsed();
            let tasks = match self.show_tasks(task_ids).await {
                Ok(tasks) => tasks,
                // A passing failure of one poll (a 502, a timeout) is asked again, a few
                // times, within the deadline: ending the wait would leave every rule unknown.
                Err(e)
                    if failures < SHOW_TASK_RETRIES
                        && Instant::now() < deadline
                        && matches!(classify(&e), ErrorClass::Retryable) =>
                {
                    failures += 1;
                    warn!(server = self.name, error = %e, "show-task failed; asking again");
                    tokio::time::sleep(
                        delay.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            failures = 0;
            polls += 1;
            if let Some(pending) = first_unended(task_ids, &tasks) {
                if Instant::now() >= deadline {
                    return Err(ApiError::TaskTimeout {
                        server: self.name.clone(),
                        task_id: pending.to_owned(),
                        waited: started.elapsed(),
                    });
                }
                previous_at = asked_at;
                tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                delay = (delay * 2).min(self.polling.max);
                continue;
            }
            let mut timing = self.task_timing.lock().expect("timing");
            timing.observe(polls, previous_at, asked_at);
            return Ok(tasks);
        }
    }

    /// `keepalive` if the session has been idle for a third of its timeout.
    /// Only a session still fresh is kept alive: keeping alive never logs in (with credentials
    /// gone wrong, that would be a failed login every tick for as long as samgate idles; the
    /// next call that needs a session logs in).
    pub async fn keepalive_if_idle(&self) -> Result<(), ApiError> {
        let Some(session) = self.fresh_session() else {
            let stale = self.session.lock().expect("session").clone();
            if let Some(stale) = stale {
                self.forget(stale.generation);
            }
            return Ok(());
        };
        if session.idle() >= self.session_timeout / 3 {
            self.call("keepalive", &json!({})).await?;
            debug!(server = self.name, "session kept alive");
        }
        Ok(())
    }

    /// Keeps the session alive until `cancel`, then logs out.
    pub async fn run_keepalive(&self, cancel: CancellationToken) {
        let every = (self.session_timeout / 6).max(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = self.keepalive_if_idle().await {
                        warn!(server = self.name, error = %e, "keepalive failed");
                    }
                }
            }
        }
        self.logout().await;
    }

    /// Ends the session (if any). Errors are logged, not returned: this runs on shutdown.
    pub async fn logout(&self) {
        let session = self.session.lock().expect("session").take();
        if let Some(session) = session {
            match self.post(Some(&session), "logout", &json!({})).await {
                Ok(_) => info!(server = self.name, "logged out"),
                Err(e) => warn!(server = self.name, error = %e, "logout failed"),
            }
        }
    }

    /// The current session if it is still fresh; else a new one (one login, serialised).
    async fn session(&self) -> Result<Arc<Session>, ApiError> {
        if let Some(session) = self.fresh_session() {
            return Ok(session);
        }
        let _gate = self.login_gate.lock().await;
        if let Some(session) = self.fresh_session() {
            return Ok(session);
        }
        self.login().await
    }

    /// A session idle for (almost) its timeout has expired on the server: do not use it.
    fn fresh_session(&self) -> Option<Arc<Session>> {
        let margin = (self.session_timeout / 10).min(Duration::from_secs(5));
        let session = self.session.lock().expect("session").clone()?;
        (session.idle() + margin < self.session_timeout).then_some(session)
    }

    fn forget(&self, generation: u64) {
        let mut current = self.session.lock().expect("session");
        if current.as_ref().is_some_and(|s| s.generation == generation) {
            *current = None;
        }
    }

    async fn login(&self) -> Result<Arc<Session>, ApiError> {
        let now = Instant::now();
        let allowed = self.logins.lock().expect("login window").try_take(now);
        if let Err(retry_after) = allowed {
            return Err(ApiError::LoginLimited {
                server: self.name.clone(),
                per_minute: self.logins.lock().expect("login window").per_minute,
                retry_after,
            });
        }
        let mut body = Map::new();
        match &self.credentials {
            Credentials::Password { user, password } => {
                body.insert("user".into(), json!(user));
                body.insert("password".into(), json!(password.expose()));
            }
            Credentials::ApiKey(key) => {
                body.insert("api-key".into(), json!(key.expose()));
            }
        }
        if let Some(domain) = &self.domain {
            body.insert("domain".into(), json!(domain));
        }
        body.insert(
            "session-timeout".into(),
            json!(self.session_timeout.as_secs()),
        );
        body.insert("session-name".into(), json!("samgate"));
        body.insert("continue-last-session".into(), json!(false));
        let answer = match self.post(None, "login", &Value::Object(body)).await {
            Ok(answer) => answer,
            Err(e) => {
                if e.is_too_many_requests() {
                    let until = Instant::now() + super::error::SERVER_RATE_LIMIT_DELAY;
                    self.logins.lock().expect("login window").blocked_until = Some(until);
                }
                return Err(e);
            }
        };
        let sid = answer["sid"]
            .as_str()
            .ok_or_else(|| self.protocol("login", "sid"))?;
        let api_version = self
            .pinned_version
            .clone()
            .or_else(|| answer["api-server-version"].as_str().map(str::to_owned));
        let session = Arc::new(Session {
            sid: Secret::new(sid),
            api_version: api_version.clone(),
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            last_used: Mutex::new(Instant::now()),
        });
        self.login_count.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.logins.with_label_values(&[&self.name]).inc();
        }
        info!(
            server = self.name,
            api_version = api_version.as_deref().unwrap_or("latest"),
            "logged in"
        );
        *self.session.lock().expect("session") = Some(session.clone());
        Ok(session)
    }

    fn endpoint(&self, version: Option<&str>, command: &str) -> String {
        match version {
            Some(v) => format!("{}/web_api/v{v}/{command}", self.url),
            None => format!("{}/web_api/{command}", self.url),
        }
    }

    async fn post(
        &self,
        session: Option<&Session>,
        command: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let started = std::time::Instant::now();
        let result = self.post_unmeasured(session, command, body).await;
        if let Some(m) = &self.metrics {
            let status = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            m.api_requests
                .with_label_values(&[&self.name, command, status])
                .inc();
            m.api_latency
                .with_label_values(&[&self.name, command])
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn post_unmeasured(
        &self,
        session: Option<&Session>,
        command: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let version = match session {
            Some(s) => s.api_version.as_deref(),
            None => self.pinned_version.as_deref(),
        };
        let mut request = self.http.post(self.endpoint(version, command)).json(body);
        if let Some(session) = session {
            request = request.header("X-chkp-sid", session.sid.expose());
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        let parsed = serde_json::from_slice::<Value>(&bytes);
        if let Some(session) = session {
            if (200..300).contains(&status) {
                session.touch();
            }
        }
        match parsed {
            Ok(value) if (200..300).contains(&status) => Ok(value),
            Ok(Value::Object(error)) => Err(ApiError::Api {
                server: self.name.clone(),
                command: command.to_owned(),
                status,
                code: error
                    .get("code")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("http_{status}")),
                message: crate::secret::scrub(&error_message(&error)),
            }),
            _ => Err(ApiError::NotJson {
                server: self.name.clone(),
                command: command.to_owned(),
                status,
                hint: match status {
                    403 => "API access not allowed from this address? Allow samgate's address in the management API settings (by default the API accepts only local calls)",
                    502..=504 => "the API server may be (re)starting; try again later",
                    200..=299 => "is this URL a Check Point management API?",
                    _ => "something in front of the management API answered",
                },
            }),
        }
    }

    fn transport(&self, error: reqwest::Error) -> ApiError {
        let detail = tls::error_chain(&error);
        let tls = tls::refused_certificate(&detail);
        ApiError::Transport {
            server: self.name.clone(),
            timeout: error.is_timeout(),
            maybe_delivered: !tls && !error.is_connect(),
            tls,
            detail,
        }
    }

    fn protocol(&self, command: &str, missing: &'static str) -> ApiError {
        ApiError::Protocol {
            server: self.name.clone(),
            command: command.to_owned(),
            missing,
        }
    }
}

/// `message`, plus the texts of `errors` / `blocking-errors` / `warnings` when present (they may
/// be objects with `message` or plain strings).
fn error_message(error: &Map<String, Value>) -> String {
    let mut message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("(no message)")
        .to_owned();
    for key in ["blocking-errors", "errors", "warnings"] {
        for item in error
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = item
                .get("message")
                .and_then(Value::as_str)
                .or_else(|| item.as_str());
            if let Some(text) = text {
                message.push_str("; ");
                message.push_str(text);
            }
        }
    }
    message
}

fn decode_base64(value: &Value) -> String {
    let text = value.as_str().unwrap_or_default();
    match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => text.to_owned(),
    }
}

fn parse_task(task: &Value) -> Task {
    let details = task["task-details"]
        .as_array()
        .map(|details| {
            details
                .iter()
                .map(|d| TaskDetail {
                    gateway: d["gatewayName"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                    status_code: d["statusCode"].as_str().map(str::to_owned),
                    description: d["statusDescription"].as_str().map(crate::secret::scrub),
                    output: decode_base64(&d["responseMessage"]),
                    error: crate::secret::scrub(&decode_base64(&d["responseError"])),
                })
                .collect()
        })
        .unwrap_or_default();
    Task {
        task_id: task["task-id"].as_str().unwrap_or_default().to_owned(),
        name: task["task-name"].as_str().unwrap_or_default().to_owned(),
        status: TaskStatus::parse(task["status"].as_str().unwrap_or("failed")),
        progress: task["progress-percentage"].as_u64().unwrap_or(0).min(100) as u8,
        details,
    }
}

#[cfg(test)]
mod tests {
    use super::{settle_targets, Task, TaskDetail, TaskRef, TaskStatus};

    #[test]
    fn a_task_the_answer_did_not_name_is_named_by_its_gateway_or_its_name_or_by_none() {
        let task = |id: &str, name: &str, gateway: Option<&str>| Task {
            task_id: id.into(),
            name: name.into(),
            status: TaskStatus::Succeeded,
            progress: 100,
            details: vec![TaskDetail {
                gateway: gateway.map(str::to_owned),
                status_code: None,
                description: None,
                output: String::new(),
                error: String::new(),
            }],
        };
        let targets = vec!["gw-1".to_string(), "gw-2".to_string(), "gw-3".to_string()];
        // (what the run-script answer said, the finished task, the gateway settled on)
        let table = [
            ("gw-2", task("a", "gw-1 - samgate block", None), "gw-2"),
            ("", task("a", "gw-2 - samgate block", None), "gw-2"),
            ("", task("a", "gw-1 - samgate block", Some("gw-3")), "gw-3"),
            ("", task("a", "gw-2 - another script", None), ""),
            ("", task("a", "gw-9 - samgate block", None), ""),
            ("", task("a", "", Some("gw-9")), ""),
            ("", task("a", "gw-1 - samgate block", Some("gw-9")), "gw-1"),
            ("", task("b", "gw-2 - samgate block", None), ""),
        ];
        for (answered, finished, expected) in table {
            let mut refs = vec![TaskRef {
                task_id: "a".into(),
                target: answered.into(),
            }];
            settle_targets(
                &mut refs,
                std::slice::from_ref(&finished),
                "samgate block",
                &targets,
            );
            assert_eq!(refs[0].target, expected, "{answered:?} {finished:?}");
        }
        // Two tasks naming one gateway: neither is taken for it.
        let mut refs = vec![
            TaskRef {
                task_id: "a".into(),
                target: String::new(),
            },
            TaskRef {
                task_id: "b".into(),
                target: String::new(),
            },
        ];
        let tasks = [
            task("a", "gw-1 - samgate block", None),
            task("b", "gw-1 - samgate block", None),
        ];
        settle_targets(&mut refs, &tasks, "samgate block", &targets);
        assert_eq!((refs[0].target.as_str(), refs[1].target.as_str()), ("", ""));
    }

    #[test]
    fn only_a_refused_certificate_is_a_tls_configuration_error() {
        let cases = [
            ("invalid peer certificate: UnknownIssuer", true),
            ("certificate fingerprint mismatch: expected AB:CD, presented EF:01", true),
            ("client error (SendRequest): connection error: peer closed connection without sending TLS close_notify", false),
            ("tls handshake eof", false),
            ("connection refused", false),
            ("operation timed out", false),
        ];
        for (detail, expected) in cases {
            assert_eq!(
                super::tls::refused_certificate(detail),
                expected,
                "{detail}"
            );
        }
    }

    #[test]
    fn the_first_look_at_a_task_learns_how_long_tasks_take() {
        let polling = Polling::default();
        let ms = Duration::from_millis;
        let mut timing = TaskTiming::default();
        assert_eq!(timing.first_wait(&polling), ms(200), "nothing seen yet");
        // Looked at 200 ms, 600 ms (running), 1,400 ms (done): it took about 1 s.
        timing.observe(3, ms(600), ms(1400));
        assert_eq!(timing.first_wait(&polling), ms(1000));
        // Done at the first look: look 10 % earlier next time.
        timing.observe(1, Duration::ZERO, ms(1000));
        assert_eq!(timing.first_wait(&polling), ms(900));
        // A slow gateway raises the estimate, within bounds.
        timing.observe(2, ms(30_000), ms(31_000));
        assert_eq!(timing.first_wait(&polling), polling.max * 5);
        timing.observe(1, Duration::ZERO, ms(10));
        assert_eq!(
            timing.first_wait(&polling),
            ms(200),
            "never below the first step"
        );
    }

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_login_window_never_allows_more_than_its_budget_in_any_minute() {
        let mut window = LoginWindow {
            per_minute: 3,
            recent: VecDeque::new(),
            blocked_until: None,
        };
        let start = Instant::now();
        let mut granted = Vec::new();
        for step in 0..600u64 {
            // Ask every second for ten minutes.
            let now = start + Duration::from_secs(step);
            if window.try_take(now).is_ok() {
                granted.push(step);
            }
        }
        for (i, t) in granted.iter().enumerate() {
            let in_window = granted[i..].iter().take_while(|u| **u < t + 60).count();
            assert!(in_window <= 3, "more than 3 logins in the minute from {t}s");
        }
        assert_eq!(granted.len(), 30, "3 per minute for 10 minutes");
        let now = start + Duration::from_secs(600);
        window.blocked_until = Some(now + Duration::from_secs(20));
        window.recent.clear();
        assert_eq!(window.try_take(now), Err(Duration::from_secs(20)));
    }

    #[test]
    fn task_statuses_of_both_reference_lists() {
        let cases = [
            ("in progress", TaskStatus::InProgress, false, false),
            ("in_progress", TaskStatus::InProgress, false, false),
            ("pending", TaskStatus::InProgress, false, false),
            ("succeeded", TaskStatus::Succeeded, true, true),
            (
                "succeeded with warnings",
                TaskStatus::SucceededWithWarnings,
                true,
                true,
            ),
            (
                "partially succeeded",
                TaskStatus::PartiallySucceeded,
                true,
                false,
            ),
            ("failed", TaskStatus::Failed, true, false),
            (
                "timed_out",
                TaskStatus::Other("timed_out".into()),
                true,
                false,
            ),
            ("aborted", TaskStatus::Other("aborted".into()), true, false),
        ];
        for (text, status, terminal, success) in cases {
            let parsed = TaskStatus::parse(text);
            assert_eq!(parsed, status, "{text}");
            assert_eq!(
                (parsed.is_terminal(), parsed.is_success()),
                (terminal, success),
                "{text}"
            );
        }
    }

    #[test]
    fn a_task_is_ended_only_when_the_answer_says_so() {
        let task = |id: &str, status: &str| {
            parse_task(&json!({"task-id": id, "status": status, "task-details": []}))
        };
        let ids: Vec<String> = ["t1", "t2"].map(String::from).to_vec();
        let done = [task("t1", "succeeded"), task("t2", "failed")];
        assert_eq!(first_unended(&ids, &done), None);
        let running = [task("t1", "succeeded"), task("t2", "in progress")];
        assert_eq!(first_unended(&ids, &running), Some("t2"));
        let left_out = [task("t1", "succeeded")];
        assert_eq!(first_unended(&ids, &left_out), Some("t2"));
        assert_eq!(first_unended(&ids, &[]), Some("t1"));
    }

    #[test]
    fn task_details_are_decoded() {
        let task = json!({"task-id": "t1", "status": "partially succeeded", "progress-percentage": 100,
            "task-details": [{"statusCode": "failed", "statusDescription": "x", "gatewayName": "gw-1",
            "responseMessage": "c2FtZ2F0ZS1ydWxlIDAgMAo=", "responseError": ""}]});
        let t = parse_task(&task);
        assert_eq!(t.status, TaskStatus::PartiallySucceeded);
        assert_eq!(t.details[0].output, "samgate-rule 0 0\n");
        assert_eq!(t.details[0].gateway.as_deref(), Some("gw-1"));
    }

    #[test]
    fn error_messages_include_the_error_list() {
        let body = json!({"code": "err_validation_failed", "message": "Validation failed",
            "errors": [{"message": "More than one object named 'x'"}], "warnings": ["plain"]});
        let Value::Object(map) = body else {
            unreachable!()
        };
        assert_eq!(
            error_message(&map),
            "Validation failed; More than one object named 'x'; plain"
        );
    }
}
