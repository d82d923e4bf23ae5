//! The part of Flowmon's REST API the shim reads (§2.3 of the research notes), for tests, the
//! demo and labs (`samgate simulate flowmon`): an OAuth token by password grant at
//! `POST /resources/oauth/token`, then an ADS event's detail at `GET /rest/ads/event/{id}` with
//! `Authorization: bearer <token>`, whose `macAddress` Progress's FortiGate v2 script reads for
//! MAC quarantine. Token lifetimes count in an injectable [`Clock`].
//!
//! `GET /sim/state` shows what was asked; `POST /sim/faults` switches faults on and off.
//!
//! ## Assumptions: what is not confirmed on a real Flowmon
//! - Confirmed: the token call (form fields `grant_type=password`, `client_id=invea-tech`,
//!   `username`, `password`), its `access_token`, `token_type`, `expires_in`, `refresh_token`,
//!   the bearer header (the scheme's case varies in scripts, so any case is accepted), and
//!   `.macAddress` in the event detail.
//! - Every other event field (`type`, `time`, `detail`, `priority`) is a placeholder; an event
//!   whose MAC is set to `""` answers `"macAddress": null` (how Flowmon shows an unknown MAC is
//!   unconfirmed).
//! - Error bodies are OAuth2-style (`{"error": "invalid_grant", "error_description": …}`, 401
//!   `invalid_token`, 404 `not_found`); the real ones are unconfirmed.
//! - `expires_in` is [`FlowmonConfig::token_lifetime`], 3600 s by default (one script documents
//!   86400). Refresh tokens are issued but the refresh grant is not simulated.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clock::Clock;
use crate::serve::{bearer, random_token};

/// The OAuth client every Flowmon script names (INVEA-TECH was Flowmon's first name).
pub const CLIENT_ID: &str = "invea-tech";

/// How the simulated Flowmon behaves.
#[derive(Debug, Clone)]
pub struct FlowmonConfig {
    pub listen: SocketAddr,
    /// Serve HTTPS with a fresh self-signed certificate (else plain HTTP).
    pub tls: bool,
    /// REST API users with passwords (Flowmon's default is admin / admin).
    pub users: Vec<(String, String)>,
    /// ADS event id → the MAC address of its source.
    pub events: BTreeMap<String, String>,
    /// How long an access token lives (`expires_in`).
    pub token_lifetime: Duration,
    pub faults: Faults,
    /// What token lifetimes count in (wall time unless a test moves it).
    pub clock: Arc<dyn Clock>,
}

impl Default for FlowmonConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            users: vec![("admin".into(), "admin".into())],
            events: BTreeMap::new(),
            token_lifetime: Duration::from_secs(3600),
            faults: Faults::default(),
            clock: crate::clock::system(),
        }
    }
}

/// Faults on demand. Counters (`*_next`) apply to that many upcoming calls, then clear.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every `/rest` answer.
    pub latency_ms: u64,
    /// Answer the next N calls (token or `/rest`) with HTTP 500.
    pub http_500_next: u32,
}

/// A partial update of [`Faults`] (`POST /sim/faults`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsUpdate {
    pub latency_ms: Option<u64>,
    pub http_500_next: Option<u32>,
    /// Expire every access token now (callers must log in again).
    pub expire_tokens: bool,
    /// Clear every fault (before applying the rest of the update).
    pub clear: bool,
}

/// Requests and tokens kept for [`RunningFlowmon::requests`] and
/// [`RunningFlowmon::issued_tokens`] (the newest).
const KEPT_RECORDS: usize = 10_000;

struct SimState {
    config: FlowmonConfig,
    /// Access token → when it expires, unix milliseconds.
    tokens: HashMap<String, i64>,
    issued: VecDeque<String>,
    requests: VecDeque<String>,
    tokens_issued: u64,
    failed_logins: u64,
    events_served: u64,
    faults: Faults,
}

type Shared = Arc<Mutex<SimState>>;

/// A running Flowmon simulator.
pub struct RunningFlowmon {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` (or `http://`).
    pub url: String,
    /// SHA-256 fingerprint of the certificate (HTTPS only), colon-separated hex.
    pub fingerprint: Option<String>,
    state: Shared,
    served: crate::serve::Served,
}

impl RunningFlowmon {
    /// Sets (or adds) the MAC address of an event's source; `""` makes it unknown (`null`).
    pub fn set_mac(&self, event_id: &str, mac: &str) {
        let mut s = self.state.lock().expect("sim state");
        s.config.events.insert(event_id.to_owned(), mac.to_owned());
    }

    /// Every request, oldest first (the newest 10,000): `token` or `event <id>`.
    pub fn requests(&self) -> Vec<String> {
        let s = self.state.lock().expect("sim state");
        s.requests.iter().cloned().collect()
    }

    /// Every access token handed out (the newest 10,000): secrets a log must not show.
    pub fn issued_tokens(&self) -> Vec<String> {
        let s = self.state.lock().expect("sim state");
        s.issued.iter().cloned().collect()
    }

    /// Switches faults, as `POST /sim/faults` does.
    pub fn set_faults(&self, update: FaultsUpdate) -> Faults {
        apply_faults(&mut self.state.lock().expect("sim state"), update)
    }

    /// What `GET /sim/state` answers, without a request.
    pub fn state(&self) -> Value {
        snapshot(&mut self.state.lock().expect("sim state"))
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) {
        self.served.stop().await;
    }
}

/// Starts a Flowmon simulator; returns once it listens.
pub async fn start(config: FlowmonConfig) -> anyhow::Result<RunningFlowmon> {
    let state: Shared = Arc::new(Mutex::new(SimState {
        faults: config.faults.clone(),
        config: config.clone(),
        tokens: HashMap::new(),
        issued: VecDeque::new(),
        requests: VecDeque::new(),
        tokens_issued: 0,
        failed_logins: 0,
        events_served: 0,
    }));
    let app = Router::new()
        .route("/sim/state", get(sim_state))
        .route("/sim/faults", post(sim_faults))
        .route("/resources/oauth/token", post(token))
        .route("/rest/ads/event/{id}", get(event))
        .with_state(state.clone());
    let served = crate::serve::serve(config.listen, config.tls, app)?;
    Ok(RunningFlowmon {
        addr: served.addr,
        url: served.url.clone(),
        fingerprint: served.fingerprint.clone(),
        state,
        served,
    })
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn internal_error() -> Response {
    oauth_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "Internal server error (simulated fault)",
    )
}

impl SimState {
    fn record(&mut self, request: String) {
        if self.requests.len() == KEPT_RECORDS {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    fn token_is_live(&mut self, token: &str) -> bool {
        let now = self.config.clock.now_ms();
        self.tokens.retain(|_, expires| now < *expires);
        self.tokens.contains_key(token)
    }
}

/// `POST /resources/oauth/token`, form-encoded, password grant.
async fn token(State(state): State<Shared>, body: Bytes) -> Response {
    let mut s = state.lock().expect("sim state");
    s.record("token".into());
    if s.faults.http_500_next > 0 {
        s.faults.http_500_next -= 1;
        return internal_error();
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str);
    if field("grant_type") != Some("password") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Only the password grant is supported",
        );
    }
    let known = field("client_id") == Some(CLIENT_ID)
        && s.config.users.iter().any(|(u, p)| {
            Some(u.as_str()) == field("username") && Some(p.as_str()) == field("password")
        });
    if !known {
        s.failed_logins += 1;
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Invalid username and password combination",
        );
    }
    let access = random_token(32);
    let lifetime = s.config.token_lifetime;
    let expires = s.config.clock.now_ms() + lifetime.as_millis() as i64;
    s.tokens.insert(access.clone(), expires);
    if s.issued.len() == KEPT_RECORDS {
        s.issued.pop_front();
    }
    s.issued.push_back(access.clone());
    s.tokens_issued += 1;
    Json(json!({
        "access_token": access,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs(),
        "refresh_token": random_token(32),
    }))
    .into_response()
}

/// `GET /rest/ads/event/{id}`: the event's detail, with its source's MAC address.
async fn event(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let latency = state.lock().expect("sim state").faults.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut s = state.lock().expect("sim state");
    s.record(format!("event {id}"));
    if s.faults.http_500_next > 0 {
        s.faults.http_500_next -= 1;
        return internal_error();
    }
    match bearer(&headers) {
        None => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "access_denied",
                "OAuth2 authentication required",
            )
        }
        Some(token) if !s.token_is_live(token) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "The access token provided is invalid or has expired",
            )
        }
        Some(_) => {}
    }
    let Some(mac) = s.config.events.get(&id).cloned() else {
        return oauth_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("Event {id} not found"),
        );
    };
    s.events_served += 1;
    let id_value = id.parse::<u64>().map_or_else(|_| json!(id), |n| json!(n));
    let mac = if mac.is_empty() {
        Value::Null
    } else {
        json!(mac)
    };
    let time = chrono::DateTime::from_timestamp_millis(s.config.clock.now_ms())
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    Json(json!({
        "id": id_value,
        "macAddress": mac,
        "type": "SCANS",
        "time": time,
        "detail": "Port scanning (simulated event)",
        "priority": 3,
    }))
    .into_response()
}

async fn sim_state(State(state): State<Shared>) -> Json<Value> {
    Json(snapshot(&mut state.lock().expect("sim state")))
}

async fn sim_faults(State(state): State<Shared>, Json(update): Json<FaultsUpdate>) -> Json<Faults> {
    Json(apply_faults(&mut state.lock().expect("sim state"), update))
}

/// What was asked and what is held (expired tokens dropped).
fn snapshot(s: &mut SimState) -> Value {
    let now = s.config.clock.now_ms();
    s.tokens.retain(|_, expires| now < *expires);
    let users: Vec<&str> = s.config.users.iter().map(|(u, _)| u.as_str()).collect();
    json!({
        "users": users,
        "events": s.config.events,
        "tokens_issued": s.tokens_issued,
        "active_tokens": s.tokens.len(),
        "failed_logins": s.failed_logins,
        "events_served": s.events_served,
        "requests_total": s.requests.len(),
        "faults": s.faults,
    })
}

fn apply_faults(s: &mut SimState, update: FaultsUpdate) -> Faults {
    if update.clear {
        s.faults = Faults::default();
    }
    if let Some(v) = update.latency_ms {
        s.faults.latency_ms = v;
    }
    if let Some(v) = update.http_500_next {
        s.faults.http_500_next = v;
    }
    if update.expire_tokens {
        s.tokens.clear();
    }
    s.faults.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    struct Lab {
        flowmon: RunningFlowmon,
        http: reqwest::Client,
    }

    impl Lab {
        async fn start(config: FlowmonConfig) -> Self {
            Self {
                flowmon: start(config).await.expect("simulator starts"),
                http: crate::serve::test_client(),
            }
        }

        async fn login_as(&self, user: &str, password: &str, client_id: &str) -> (u16, Value) {
            let response = self
                .http
                .post(format!("{}/resources/oauth/token", self.flowmon.url))
                .form(&[
                    ("grant_type", "password"),
                    ("client_id", client_id),
                    ("username", user),
                    ("password", password),
                ])
                .send()
                .await
                .expect("an answer");
            let status = response.status().as_u16();
            (status, response.json().await.expect("JSON"))
        }

        async fn token(&self) -> String {
            let (status, body) = self.login_as("admin", "admin", CLIENT_ID).await;
            assert_eq!(status, 200, "{body}");
            body["access_token"]
                .as_str()
                .expect("access_token")
                .to_owned()
        }

        /// `GET /rest/ads/event/{id}` with this `Authorization` header.
        async fn event(&self, id: &str, authorization: Option<&str>) -> (u16, Value) {
            let mut request = self
                .http
                .get(format!("{}/rest/ads/event/{id}", self.flowmon.url));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            (status, response.json().await.expect("JSON"))
        }
    }

    fn events(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(id, mac)| (id.to_string(), mac.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_token_opens_the_event_and_its_mac() {
        let lab = Lab::start(FlowmonConfig {
            events: events(&[("42", "aa:bb:cc:dd:ee:ff")]),
            ..FlowmonConfig::default()
        })
        .await;
        let (status, body) = lab.login_as("admin", "admin", CLIENT_ID).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 3600);
        assert!(body["refresh_token"].is_string());
        let token = body["access_token"].as_str().expect("access_token");

        let (status, event) = lab.event("42", Some(&format!("bearer {token}"))).await;
        assert_eq!(status, 200, "{event}");
        assert_eq!(event["id"], 42);
        assert_eq!(event["macAddress"], "aa:bb:cc:dd:ee:ff");
        let (status, _) = lab.event("42", Some(&format!("Bearer {token}"))).await;
        assert_eq!(status, 200, "the scheme is case-insensitive");

        assert_eq!(lab.flowmon.requests(), ["token", "event 42", "event 42"]);
        assert_eq!(lab.flowmon.issued_tokens(), [token]);
        assert_eq!(lab.flowmon.state()["events_served"], 2);
        lab.flowmon.stop().await;
    }

    #[tokio::test]
    async fn wrong_credentials_or_client_are_invalid_grant() {
        let lab = Lab::start(FlowmonConfig::default()).await;
        for (user, password, client_id) in [
            ("admin", "wrong", CLIENT_ID),
            ("nobody", "admin", CLIENT_ID),
            ("admin", "admin", "someone-else"),
        ] {
            let (status, body) = lab.login_as(user, password, client_id).await;
            assert_eq!(status, 400, "{user}/{password}/{client_id}");
            assert_eq!(body["error"], "invalid_grant");
        }
        let response = lab
            .http
            .post(format!("{}/resources/oauth/token", lab.flowmon.url))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
            ])
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 400);
        assert!(lab.flowmon.issued_tokens().is_empty());
        assert_eq!(lab.flowmon.state()["failed_logins"], 3);
        lab.flowmon.stop().await;
    }

    #[tokio::test]
    async fn a_missing_wrong_or_expired_token_is_401() {
        let clock = ManualClock::at(1_700_000_000_000);
        let lab = Lab::start(FlowmonConfig {
            events: events(&[("42", "aa:bb:cc:dd:ee:ff")]),
            clock: clock.clone(),
            ..FlowmonConfig::default()
        })
        .await;
        assert_eq!(lab.event("42", None).await.0, 401);
        assert_eq!(lab.event("42", Some("bearer nope")).await.0, 401);
        let token = lab.token().await;
        assert_eq!(
            lab.event("42", Some(&format!("Basic {token}"))).await.0,
            401
        );
        let auth = format!("bearer {token}");
        clock.advance(Duration::from_secs(3599));
        assert_eq!(lab.event("42", Some(&auth)).await.0, 200);
        clock.advance(Duration::from_secs(1));
        let (status, body) = lab.event("42", Some(&auth)).await;
        assert_eq!((status, &body["error"]), (401, &json!("invalid_token")));

        let auth = format!("bearer {}", lab.token().await);
        assert_eq!(lab.event("42", Some(&auth)).await.0, 200);
        lab.flowmon.set_faults(FaultsUpdate {
            expire_tokens: true,
            ..FaultsUpdate::default()
        });
        assert_eq!(lab.event("42", Some(&auth)).await.0, 401);
        lab.flowmon.stop().await;
    }

    #[tokio::test]
    async fn an_unknown_event_is_404_until_its_mac_is_set() {
        let lab = Lab::start(FlowmonConfig::default()).await;
        let auth = format!("bearer {}", lab.token().await);
        assert_eq!(lab.event("7", Some(&auth)).await.0, 404);
        lab.flowmon.set_mac("7", "00:11:22:33:44:55");
        let (status, event) = lab.event("7", Some(&auth)).await;
        assert_eq!(
            (status, &event["macAddress"]),
            (200, &json!("00:11:22:33:44:55"))
        );
        lab.flowmon.set_mac("ev-x", "");
        let (status, event) = lab.event("ev-x", Some(&auth)).await;
        assert_eq!(status, 200);
        assert_eq!(event["id"], "ev-x", "a non-numeric id stays a string");
        assert!(event["macAddress"].is_null(), "an unknown MAC is null");
        lab.flowmon.stop().await;
    }

    #[tokio::test]
    async fn a_500_fault_answers_then_clears() {
        let lab = Lab::start(FlowmonConfig {
            events: events(&[("42", "aa:bb:cc:dd:ee:ff")]),
            ..FlowmonConfig::default()
        })
        .await;
        let auth = format!("bearer {}", lab.token().await);
        let faults: Faults = lab
            .http
            .post(format!("{}/sim/faults", lab.flowmon.url))
            .json(&json!({"http_500_next": 1}))
            .send()
            .await
            .expect("an answer")
            .json()
            .await
            .expect("faults");
        assert_eq!(faults.http_500_next, 1);
        assert_eq!(lab.event("42", Some(&auth)).await.0, 500);
        assert_eq!(lab.event("42", Some(&auth)).await.0, 200);
        let state: Value = lab
            .http
            .get(format!("{}/sim/state", lab.flowmon.url))
            .send()
            .await
            .expect("an answer")
            .json()
            .await
            .expect("state");
        assert_eq!(state["faults"]["http_500_next"], 0);
        assert_eq!(state["events"]["42"], "aa:bb:cc:dd:ee:ff");
        lab.flowmon.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_event_answers() {
        let lab = Lab::start(FlowmonConfig {
            events: events(&[("42", "aa:bb:cc:dd:ee:ff")]),
            faults: Faults {
                latency_ms: 20_000,
                ..Faults::default()
            },
            ..FlowmonConfig::default()
        })
        .await;
        let auth = format!("bearer {}", lab.token().await);
        // Paused time: the simulator's sleep advances the virtual clock, nobody waits.
        let before = tokio::time::Instant::now();
        let (status, event) = lab.event("42", Some(&auth)).await;
        assert_eq!(
            (status, &event["macAddress"]),
            (200, &json!("aa:bb:cc:dd:ee:ff"))
        );
        assert!(before.elapsed() >= Duration::from_secs(20));
        lab.flowmon.stop().await;
    }
}
