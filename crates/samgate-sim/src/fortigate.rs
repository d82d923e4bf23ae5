//! A FortiGate's REST API, the part samgate quarantines through (§3 of the research notes), for
//! tests, the demo and labs (`samgate simulate fortigate`): a REST API administrator's token
//! (`Authorization: Bearer`, the URL form refused as FortiOS 7.4.5+ does), trusted hosts, the
//! banned-IP list per VDOM with expiry read from an injectable [`Clock`], the automation-stitch
//! incoming webhook, FortiOS's monitor envelope, a reboot that keeps what
//! `banned-ip-persistency` keeps, and faults on demand.
//!
//! `GET /sim/state` shows everything the firewall was asked and what it holds; `POST /sim/faults`
//! switches faults on and off (and reboots). Neither needs the token.
//!
//! ## Assumptions: what is not confirmed on a real FortiOS
//!
//! The endpoints, the request bodies, `expiry` in seconds with 0 = indefinite, the `results` of
//! the list (`ip_address`, `source`, `created`, `expires`), the 401 for a token in the URL, the
//! status codes and the webhook's answer are confirmed by the notes. The rest is this
//! simulator's choice, so a client must not depend on it:
//! - **Error bodies**: every error is the monitor envelope with `"status": "error"`, the HTTP
//!   status in `http_status`, an `error` number (-651 invalid value, -3 not found, -1 anything
//!   else) and a `message`. Real bodies (and whether a 401 has a body at all) are unconfirmed.
//! - **Success `results`** of `add_users`, `clear_users` and `clear_all`: `{}`.
//! - **`expiry` omitted**: treated as 0 (indefinite) and counted in `/sim/state` as
//!   `expiry_omitted`; the real default is unknown, so clients must always send it.
//! - **Re-adding a banned address** refreshes it: the new expiry replaces the old one, counted
//!   from now (even when shorter); `created` stays the first ban's. [`BanAdd::while_banned`]
//!   marks such adds.
//! - **Limits**: at most [`FortiGateConfig::max_addresses_per_call`] addresses per call (default
//!   1000), beyond that 413; the real limit is unknown. An `expiry` must fit in a `u32`.
//! - **Validation**: one address that does not parse as IPv4/IPv6 (no surrounding spaces, no
//!   prefix length) refuses the whole call with 424 and changes nothing; a body that is not a
//!   JSON object is 400.
//! - **`source`** of every ban, by API or by stitch, is `admin`.
//! - **VDOMs**: without `?vdom=` a call acts on the first configured VDOM; an unknown one is 404.
//!   Stitches are global here (on FortiOS they belong to a VDOM); a stitch's ban goes into the
//!   call's VDOM. `?global=1` is not simulated.
//! - **Auth order**: a token in the URL is refused first (when not allowed), then a missing or
//!   wrong token, then a client outside the trusted hosts (trusted hosts belong to the
//!   administrator the token names). All are 401.
//! - **The webhook**: a body that is not JSON is recorded as a JSON string; a ban stitch whose
//!   `srcip` is missing or does not parse answers 424 (real FortiOS may answer 200 and let the
//!   action fail in its log). A stitch's IP Ban lasts its configured `ban_seconds`; how long a
//!   real one lasts is unconfirmed.
//! - **After a reboot** with persistency `all`, a timed ban keeps its wall-clock expiry.
//! - **Faults**: `unreachable` answers 503 with `connection: close` and carries nothing out (a
//!   stand-in for a network failure: retryable, nothing happened); HTML 502 is nginx-style
//!   (something in front of the FortiGate), the 429 and 500 are envelopes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clock::Clock;
use crate::serve::{bearer, html, random_token};

/// What of the banned-IP list survives a reboot (`config firewall global / set
/// banned-ip-persistency`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Persistency {
    /// Nothing: FortiOS's default.
    #[default]
    Disabled,
    /// Only indefinite bans (`expiry` 0).
    PermanentOnly,
    /// Every ban.
    All,
}

impl FromStr for Persistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disabled" => Ok(Self::Disabled),
            "permanent-only" => Ok(Self::PermanentOnly),
            "all" => Ok(Self::All),
            other => Err(format!(
                "unknown banned-ip-persistency {other:?}: use disabled, permanent-only or all"
            )),
        }
    }
}

impl fmt::Display for Persistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disabled => "disabled",
            Self::PermanentOnly => "permanent-only",
            Self::All => "all",
        })
    }
}

/// An automation stitch with an Incoming Webhook trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stitch {
    /// The stitch's name, the last segment of its webhook URL.
    pub name: String,
    /// With `Some`, the stitch's action is IP Ban of the body's `srcip` for that many seconds
    /// (0 = indefinite); with `None` the call is only recorded (a notification stitch).
    pub ban_seconds: Option<u32>,
}

/// How the simulated FortiGate behaves.
#[derive(Debug, Clone)]
pub struct FortiGateConfig {
    pub listen: SocketAddr,
    /// Serve HTTPS with a fresh self-signed certificate (else plain HTTP).
    pub tls: bool,
    /// The REST API administrator's key.
    pub token: String,
    /// Where that administrator may call from; FortiOS requires at least one.
    pub trusted_hosts: Vec<IpNet>,
    /// VDOMs, each with its own banned list; the first is the one used without `?vdom=`.
    pub vdoms: Vec<String>,
    /// What envelopes announce as `version`.
    pub version: String,
    /// What envelopes announce as `build`.
    pub build: u32,
    /// What envelopes announce as `serial`.
    pub serial: String,
    /// Accept `?access_token=` (`set rest-api-key-url-query enable`); FortiOS 7.4.5+ refuses it
    /// by default with 401, even when the token is right.
    pub allow_token_in_url: bool,
    /// What a reboot keeps.
    pub banned_ip_persistency: Persistency,
    /// Incoming-webhook automation stitches.
    pub stitches: Vec<Stitch>,
    /// Most addresses one add/clear call may carry (413 beyond; the real limit is unknown).
    pub max_addresses_per_call: usize,
    pub faults: Faults,
    /// What ban times count in (wall time unless a test moves it).
    pub clock: Arc<dyn Clock>,
}

impl Default for FortiGateConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            token: random_token(24),
            trusted_hosts: vec![
                "127.0.0.0/8".parse().expect("a CIDR"),
                "::1/128".parse().expect("a CIDR"),
            ],
            vdoms: vec!["root".into()],
            version: "v7.4.5".into(),
            build: 2702,
            serial: "FGVM01TM00000001".into(),
            allow_token_in_url: false,
            banned_ip_persistency: Persistency::Disabled,
            stitches: Vec::new(),
            max_addresses_per_call: 1000,
            faults: Faults::default(),
            clock: crate::clock::system(),
        }
    }
}

/// Faults on demand. Counters (`*_next`) apply to that many upcoming `/api/v2` calls, then clear.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every `/api/v2` answer.
    pub latency_ms: u64,
    /// Answer the next N calls with a 429 envelope (FortiOS rate limiting).
    pub http_429_next: u32,
    /// Answer the next N calls with a 500 envelope.
    pub http_500_next: u32,
    /// Answer the next N calls with an nginx-style HTML 502 (a proxy in front).
    pub html_502_next: u32,
    /// The next N calls that succeed are carried out, then their answer is lost (the connection
    /// is cut after the headers): the caller cannot know the ban is in place.
    pub lost_answers_next: u32,
    /// Every call answers 503 with `connection: close` and carries nothing out.
    pub unreachable: bool,
}

/// A partial update of [`Faults`] (`POST /sim/faults`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsUpdate {
    pub latency_ms: Option<u64>,
    pub http_429_next: Option<u32>,
    pub http_500_next: Option<u32>,
    pub html_502_next: Option<u32>,
    pub lost_answers_next: Option<u32>,
    pub unreachable: Option<bool>,
    /// Clear every fault (before applying the rest of the update).
    pub clear: bool,
    /// Reboot the FortiGate (see [`RunningFortiGate::reboot`]).
    pub reboot: bool,
}

/// One address added to a banned list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BanAdd {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub vdom: String,
    pub ip: IpAddr,
    /// Seconds asked for (0 = indefinite).
    pub expiry: u32,
    /// `add_users` or `webhook:<stitch name>`.
    pub via: String,
    /// The address was banned already when this add arrived: the ban was sent twice.
    pub while_banned: bool,
}

/// One call of an automation stitch's webhook.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookCall {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The stitch's name, percent-decoded.
    pub name: String,
    /// The body as sent (a JSON string when it was not JSON).
    pub body: Value,
}

/// A banned address, as the list holds it.
#[derive(Debug, Clone)]
struct Ban {
    /// Unix seconds of the first ban.
    created: i64,
    /// Unix seconds it ends, 0 when indefinite.
    expires: i64,
    /// Seconds the last add asked for.
    expiry: u32,
}

/// History entries kept (the oldest go first); `adds_total` counts them all.
const KEPT_HISTORY: usize = 100_000;
/// Webhook calls and refusals kept.
const KEPT_RECORDS: usize = 10_000;
/// The `source` FortiOS lists for a ban made by an administrator.
const SOURCE: &str = "admin";

struct SimState {
    config: FortiGateConfig,
    /// Per VDOM, per address.
    banned: BTreeMap<String, BTreeMap<IpAddr, Ban>>,
    calls: BTreeMap<&'static str, u64>,
    adds_total: u64,
    history: VecDeque<BanAdd>,
    webhook_calls: VecDeque<WebhookCall>,
    refusals: VecDeque<String>,
    reboots: u64,
    expiry_omitted: u64,
    faults: Faults,
}

type Shared = Arc<Mutex<SimState>>;

/// A running FortiGate simulator.
pub struct RunningFortiGate {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` (or `http://`).
    pub url: String,
    /// SHA-256 fingerprint of the certificate (HTTPS only), colon-separated hex.
    pub fingerprint: Option<String>,
    /// The REST API administrator's key.
    pub token: String,
    state: Shared,
    served: crate::serve::Served,
}

impl RunningFortiGate {
    /// What `GET /sim/state` answers, without a request.
    pub fn state(&self) -> Value {
        snapshot(&mut self.state.lock().expect("sim state"))
    }

    /// The addresses banned in `vdom` right now (past their expiry by the clock: gone).
    pub fn banned(&self, vdom: &str) -> BTreeSet<IpAddr> {
        let mut s = self.state.lock().expect("sim state");
        s.expire();
        s.banned
            .get(vdom)
            .map(|list| list.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every address added, oldest first (the newest 100,000).
    pub fn history(&self) -> Vec<BanAdd> {
        let s = self.state.lock().expect("sim state");
        s.history.iter().cloned().collect()
    }

    /// Every webhook call, oldest first (the newest 10,000).
    pub fn webhook_calls(&self) -> Vec<WebhookCall> {
        let s = self.state.lock().expect("sim state");
        s.webhook_calls.iter().cloned().collect()
    }

    /// Why each request refused with 401 was refused, oldest first (the newest 10,000):
    /// `token in URL`, `missing token`, `bad token`, `untrusted host <ip>`.
    pub fn refusals(&self) -> Vec<String> {
        let s = self.state.lock().expect("sim state");
        s.refusals.iter().cloned().collect()
    }

    /// Switches faults, as `POST /sim/faults` does.
    pub fn set_faults(&self, update: FaultsUpdate) -> Faults {
        apply_faults(&mut self.state.lock().expect("sim state"), update)
    }

    /// Reboots: the banned lists keep only what `banned_ip_persistency` keeps (disabled:
    /// nothing; permanent-only: indefinite bans; all: everything).
    pub fn reboot(&self) {
        self.state.lock().expect("sim state").reboot();
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) {
        self.served.stop().await;
    }
}

/// Starts a FortiGate simulator; returns once it listens.
pub async fn start(config: FortiGateConfig) -> anyhow::Result<RunningFortiGate> {
    anyhow::ensure!(
        !config.vdoms.is_empty(),
        "a FortiGate has at least one VDOM"
    );
    anyhow::ensure!(
        !config.trusted_hosts.is_empty(),
        "FortiOS requires at least one trusted host (0.0.0.0/0 and ::/0 trust every address)"
    );
    anyhow::ensure!(
        config.max_addresses_per_call > 0,
        "max_addresses_per_call must be at least 1"
    );
    let state: Shared = Arc::new(Mutex::new(SimState {
        banned: config
            .vdoms
            .iter()
            .map(|vdom| (vdom.clone(), BTreeMap::new()))
            .collect(),
        faults: config.faults.clone(),
        config: config.clone(),
        calls: BTreeMap::new(),
        adds_total: 0,
        history: VecDeque::new(),
        webhook_calls: VecDeque::new(),
        refusals: VecDeque::new(),
        reboots: 0,
        expiry_omitted: 0,
    }));
    let app = Router::new()
        .route("/sim/state", get(sim_state))
        .route("/sim/faults", post(sim_faults))
        .route("/api/v2/{*path}", any(api))
        .with_state(state.clone());
    let served = crate::serve::serve(config.listen, config.tls, app)?;
    Ok(RunningFortiGate {
        addr: served.addr,
        url: served.url.clone(),
        fingerprint: served.fingerprint.clone(),
        token: config.token,
        state,
        served,
    })
}

/// The endpoints this simulator knows, below `/api/v2/`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    AddUsers,
    ClearUsers,
    ClearAll,
    List,
    /// An automation stitch's webhook, by (percent-decoded) name.
    Webhook(String),
}

impl Endpoint {
    fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/api/v2/")?.trim_end_matches('/');
        Some(match rest {
            "monitor/user/banned/add_users" => Self::AddUsers,
            "monitor/user/banned/clear_users" => Self::ClearUsers,
            "monitor/user/banned/clear_all" => Self::ClearAll,
            // Older documents and scripts list through `/select/`.
            "monitor/user/banned" | "monitor/user/banned/select" => Self::List,
            _ => {
                let name = rest.strip_prefix("monitor/system/automation-stitch/webhook/")?;
                if name.is_empty() || name.contains('/') {
                    return None;
                }
                let name = percent_encoding::percent_decode_str(name)
                    .decode_utf8()
                    .ok()?;
                Self::Webhook(name.into_owned())
            }
        })
    }

    /// The name `/sim/state` counts calls under.
    fn key(&self) -> &'static str {
        match self {
            Self::AddUsers => "add_users",
            Self::ClearUsers => "clear_users",
            Self::ClearAll => "clear_all",
            Self::List => "banned",
            Self::Webhook(_) => "webhook",
        }
    }

    fn method(&self) -> Method {
        match self {
            Self::List => Method::GET,
            _ => Method::POST,
        }
    }

    /// The envelope's `path`, `name` and `action` (the webhook's answer has none).
    fn target(&self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Self::AddUsers => Some(("user", "banned", "add_users")),
            Self::ClearUsers => Some(("user", "banned", "clear_users")),
            Self::ClearAll => Some(("user", "banned", "clear_all")),
            Self::List => Some(("user", "banned", "")),
            Self::Webhook(_) => None,
        }
    }
}

/// What FortiOS's envelope says about the call it answers.
struct Call {
    method: Method,
    /// `vdom`, `path`, `name`, `action`.
    target: Option<(String, &'static str, &'static str, &'static str)>,
}

/// Why a call was refused: the answer's status, `error` number and `message`.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: i64,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 424, FortiOS's answer to a missing or invalid parameter.
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FAILED_DEPENDENCY, -651, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, -3, message)
    }
}

impl SimState {
    fn default_vdom(&self) -> String {
        self.config.vdoms[0].clone()
    }

    /// Drops every ban past its expiry.
    fn expire(&mut self) {
        let now = self.config.clock.now_secs();
        for list in self.banned.values_mut() {
            list.retain(|_, ban| ban.expires == 0 || now < ban.expires);
        }
    }

    fn reboot(&mut self) {
        self.expire();
        let keep = self.config.banned_ip_persistency;
        for list in self.banned.values_mut() {
            match keep {
                Persistency::Disabled => list.clear(),
                Persistency::PermanentOnly => list.retain(|_, ban| ban.expires == 0),
                Persistency::All => {}
            }
        }
        self.reboots += 1;
    }

    fn ban(&mut self, vdom: &str, ip: IpAddr, expiry: u32, via: String) {
        let at_ms = self.config.clock.now_ms();
        let now = at_ms.div_euclid(1000);
        let expires = if expiry == 0 {
            0
        } else {
            now + i64::from(expiry)
        };
        let list = self.banned.entry(vdom.to_owned()).or_default();
        let while_banned = list.contains_key(&ip);
        list.entry(ip)
            .and_modify(|ban| {
                ban.expires = expires;
                ban.expiry = expiry;
            })
            .or_insert(Ban {
                created: now,
                expires,
                expiry,
            });
        self.adds_total += 1;
        if self.history.len() == KEPT_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(BanAdd {
            at_ms,
            vdom: vdom.to_owned(),
            ip,
            expiry,
            via,
            while_banned,
        });
    }

    /// Checks the token and the client's address; `Err` says why not.
    fn authenticate(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        query: &[(String, String)],
    ) -> Result<(), String> {
        let url_token = query
            .iter()
            .find(|(key, _)| key == "access_token")
            .map(|(_, value)| value.as_str());
        if url_token.is_some() && !self.config.allow_token_in_url {
            return Err("token in URL".into());
        }
        match bearer(headers).or(url_token) {
            None => return Err("missing token".into()),
            Some(token) if token != self.config.token => return Err("bad token".into()),
            Some(_) => {}
        }
        let peer = peer.to_canonical();
        if !self
            .config
            .trusted_hosts
            .iter()
            .any(|net| net.contains(&peer))
        {
            return Err(format!("untrusted host {peer}"));
        }
        Ok(())
    }

    fn envelope(&self, call: &Call, status: StatusCode, extra: Value) -> Response {
        let mut body = json!({
            "http_method": call.method.as_str(),
            "status": if status.is_success() { "success" } else { "error" },
            "http_status": status.as_u16(),
            "serial": self.config.serial,
            "version": self.config.version,
            "build": self.config.build,
        });
        if let Some((vdom, path, name, action)) = &call.target {
            body["vdom"] = json!(vdom);
            body["path"] = json!(path);
            body["name"] = json!(name);
            body["action"] = json!(action);
        }
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                body[key] = value;
            }
        }
        (status, Json(body)).into_response()
    }

    fn success(&self, call: &Call, results: Option<Value>) -> Response {
        let extra = results.map_or(json!({}), |results| json!({ "results": results }));
        self.envelope(call, StatusCode::OK, extra)
    }

    fn failure(&self, call: &Call, refusal: Refusal) -> Response {
        let extra = json!({"error": refusal.code, "message": refusal.message});
        self.envelope(call, refusal.status, extra)
    }

    fn add_users(&mut self, vdom: &str, body: &Bytes) -> Result<Option<Value>, Refusal> {
        let request = json_object(body)?;
        let ips = addresses(&request, self.config.max_addresses_per_call)?;
        let expiry = match request.get("expiry") {
            None | Some(Value::Null) => {
                self.expiry_omitted += 1;
                0
            }
            Some(value) => value
                .as_u64()
                .and_then(|e| u32::try_from(e).ok())
                .ok_or_else(|| Refusal::invalid(format!("Invalid value for expiry: {value}")))?,
        };
        for ip in ips {
            self.ban(vdom, ip, expiry, "add_users".into());
        }
        Ok(Some(json!({})))
    }

    fn clear_users(&mut self, vdom: &str, body: &Bytes) -> Result<Option<Value>, Refusal> {
        let request = json_object(body)?;
        let ips = addresses(&request, self.config.max_addresses_per_call)?;
        if let Some(list) = self.banned.get_mut(vdom) {
            for ip in ips {
                list.remove(&ip);
            }
        }
        Ok(Some(json!({})))
    }

    fn clear_all(&mut self, vdom: &str) -> Result<Option<Value>, Refusal> {
        if let Some(list) = self.banned.get_mut(vdom) {
            list.clear();
        }
        Ok(Some(json!({})))
    }

    fn list(&self, vdom: &str) -> Result<Option<Value>, Refusal> {
        let results: Vec<Value> = self
            .banned
            .get(vdom)
            .into_iter()
            .flatten()
            .map(|(ip, ban)| {
                json!({
                    "ip_address": ip.to_string(),
                    "source": SOURCE,
                    "created": ban.created,
                    "expires": ban.expires,
                    "ipv6": ip.is_ipv6(),
                })
            })
            .collect();
        Ok(Some(Value::Array(results)))
    }

    fn webhook(&mut self, vdom: &str, name: &str, body: &Bytes) -> Result<Option<Value>, Refusal> {
        let Some(stitch) = self.config.stitches.iter().find(|s| s.name == name) else {
            return Err(Refusal::not_found(format!(
                "No automation stitch with an incoming webhook named {name:?}"
            )));
        };
        let ban_seconds = stitch.ban_seconds;
        let body = if body.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        let srcip = body.get("srcip").cloned();
        if self.webhook_calls.len() == KEPT_RECORDS {
            self.webhook_calls.pop_front();
        }
        self.webhook_calls.push_back(WebhookCall {
            at_ms: self.config.clock.now_ms(),
            name: name.to_owned(),
            body,
        });
        if let Some(seconds) = ban_seconds {
            let ip = srcip
                .as_ref()
                .and_then(Value::as_str)
                .and_then(|text| text.parse::<IpAddr>().ok())
                .ok_or_else(|| {
                    let shown = srcip.map_or("nothing".to_owned(), |v| v.to_string());
                    Refusal::invalid(format!("IP Ban needs srcip, an IP address; got {shown}"))
                })?;
            self.ban(vdom, ip, seconds, format!("webhook:{name}"));
        }
        Ok(None)
    }
}

/// The body as a JSON object (an empty body is `{}`).
fn json_object(body: &Bytes) -> Result<Value, Refusal> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            -1,
            "The request body must be a JSON object",
        )),
    }
}

/// `ip_addresses`: a non-empty array of IPv4/IPv6 addresses, all valid, at most `max`.
fn addresses(request: &Value, max: usize) -> Result<Vec<IpAddr>, Refusal> {
    let Some(items) = request.get("ip_addresses").and_then(Value::as_array) else {
        return Err(Refusal::invalid(
            "ip_addresses is required: an array of IPv4/IPv6 addresses",
        ));
    };
    if items.is_empty() {
        return Err(Refusal::invalid("ip_addresses is empty"));
    }
    if items.len() > max {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            -1,
            format!(
                "Too many addresses: {} (at most {max} per call)",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .map(|item| {
            item.as_str()
                .and_then(|text| text.parse::<IpAddr>().ok())
                .ok_or_else(|| Refusal::invalid(format!("Invalid IP address: {item}")))
        })
        .collect()
}

/// A 200 whose body never arrives: the connection is cut after the headers.
fn cut_connection() -> Response {
    let body = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("answer lost (simulated fault)"))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from_stream(body))
        .expect("a valid response")
}

async fn sim_state(State(state): State<Shared>) -> Json<Value> {
    Json(snapshot(&mut state.lock().expect("sim state")))
}

async fn sim_faults(State(state): State<Shared>, Json(update): Json<FaultsUpdate>) -> Json<Faults> {
    Json(apply_faults(&mut state.lock().expect("sim state"), update))
}

/// Everything the FortiGate was asked and what it holds (bans past their expiry dropped).
fn snapshot(s: &mut SimState) -> Value {
    s.expire();
    let banned: BTreeMap<&String, Vec<Value>> = s
        .banned
        .iter()
        .map(|(vdom, list)| {
            let entries = list
                .iter()
                .map(|(ip, ban)| {
                    json!({"ip_address": ip.to_string(), "created": ban.created,
                        "expires": ban.expires, "expiry": ban.expiry, "ipv6": ip.is_ipv6()})
                })
                .collect();
            (vdom, entries)
        })
        .collect();
    json!({
        "version": s.config.version,
        "build": s.config.build,
        "serial": s.config.serial,
        "banned_ip_persistency": s.config.banned_ip_persistency,
        "allow_token_in_url": s.config.allow_token_in_url,
        "banned": banned,
        "calls": s.calls,
        "adds_total": s.adds_total,
        "history_len": s.history.len(),
        "webhook_calls": s.webhook_calls,
        "reboots": s.reboots,
        "refusals": s.refusals,
        "expiry_omitted": s.expiry_omitted,
        "faults": s.faults,
    })
}

fn apply_faults(s: &mut SimState, update: FaultsUpdate) -> Faults {
    if update.clear {
        s.faults = Faults::default();
    }
    let f = &mut s.faults;
    if let Some(v) = update.latency_ms {
        f.latency_ms = v;
    }
    if let Some(v) = update.http_429_next {
        f.http_429_next = v;
    }
    if let Some(v) = update.http_500_next {
        f.http_500_next = v;
    }
    if let Some(v) = update.html_502_next {
        f.html_502_next = v;
    }
    if let Some(v) = update.lost_answers_next {
        f.lost_answers_next = v;
    }
    if let Some(v) = update.unreachable {
        f.unreachable = v;
    }
    if update.reboot {
        s.reboot();
    }
    s.faults.clone()
}

/// Every request below `/api/v2/`: faults, then authentication, then the endpoint.
async fn api(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = state.lock().expect("sim state").faults.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut guard = state.lock().expect("sim state");
    let s = &mut *guard;
    let query: Vec<(String, String)> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let endpoint = Endpoint::parse(uri.path());
    *s.calls
        .entry(endpoint.as_ref().map_or("unknown", Endpoint::key))
        .or_default() += 1;
    let asked_vdom = query
        .iter()
        .find(|(key, _)| key == "vdom")
        .map(|(_, value)| value.clone());
    let vdom = asked_vdom.clone().unwrap_or_else(|| s.default_vdom());
    let call = Call {
        method: method.clone(),
        target: endpoint
            .as_ref()
            .and_then(Endpoint::target)
            .map(|(path, name, action)| (vdom.clone(), path, name, action)),
    };

    if s.faults.unreachable {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONNECTION, "close")],
            "unreachable (simulated fault)",
        )
            .into_response();
    }
    if s.faults.html_502_next > 0 {
        s.faults.html_502_next -= 1;
        return html(StatusCode::BAD_GATEWAY, "502 Bad Gateway");
    }
    if s.faults.http_429_next > 0 {
        s.faults.http_429_next -= 1;
        let refusal = Refusal::new(StatusCode::TOO_MANY_REQUESTS, -1, "Too many requests");
        return s.failure(&call, refusal);
    }
    if s.faults.http_500_next > 0 {
        s.faults.http_500_next -= 1;
        let refusal = Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, -1, "Internal error");
        return s.failure(&call, refusal);
    }

    if let Err(reason) = s.authenticate(peer.ip(), &headers, &query) {
        if s.refusals.len() == KEPT_RECORDS {
            s.refusals.pop_front();
        }
        s.refusals.push_back(reason);
        let refusal = Refusal::new(StatusCode::UNAUTHORIZED, -1, "Unauthorized");
        return s.failure(&call, refusal);
    }
    let Some(endpoint) = endpoint else {
        let refusal = Refusal::not_found(format!("Unknown API path {}", uri.path()));
        return s.failure(&call, refusal);
    };
    if method != endpoint.method() {
        let refusal = Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            -1,
            format!("{} needs {}", uri.path(), endpoint.method()),
        );
        return s.failure(&call, refusal);
    }
    if asked_vdom.is_some() && !s.config.vdoms.contains(&vdom) {
        return s.failure(&call, Refusal::not_found(format!("Unknown VDOM {vdom:?}")));
    }

    s.expire();
    let outcome = match &endpoint {
        Endpoint::AddUsers => s.add_users(&vdom, &body),
        Endpoint::ClearUsers => s.clear_users(&vdom, &body),
        Endpoint::ClearAll => s.clear_all(&vdom),
        Endpoint::List => s.list(&vdom),
        Endpoint::Webhook(name) => s.webhook(&vdom, name, &body),
    };
    let answer = match outcome {
        Ok(results) => s.success(&call, results),
        Err(refusal) => return s.failure(&call, refusal),
    };
    if s.faults.lost_answers_next > 0 {
        s.faults.lost_answers_next -= 1;
        return cut_connection();
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    /// A simulator and a client for it.
    struct Lab {
        fg: RunningFortiGate,
        http: reqwest::Client,
    }

    impl Lab {
        async fn start(config: FortiGateConfig) -> Self {
            Self {
                fg: start(config).await.expect("simulator starts"),
                http: crate::serve::test_client(),
            }
        }

        /// A call with the right token in the header; answers status and JSON body.
        async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
            let request = self
                .http
                .request(method, format!("{}{path}", self.fg.url))
                .bearer_auth(&self.fg.token);
            send(request, body).await
        }

        async fn add(&self, ips: &[&str], expiry: u32) -> (u16, Value) {
            let body = json!({"ip_addresses": ips, "expiry": expiry});
            self.call(
                Method::POST,
                "/api/v2/monitor/user/banned/add_users",
                Some(body),
            )
            .await
        }

        /// The addresses `GET …/banned` lists.
        async fn listed(&self, vdom: Option<&str>) -> Vec<Value> {
            let path = match vdom {
                Some(vdom) => format!("/api/v2/monitor/user/banned?vdom={vdom}"),
                None => "/api/v2/monitor/user/banned".to_owned(),
            };
            let (status, body) = self.call(Method::GET, &path, None).await;
            assert_eq!(status, 200, "{body}");
            body["results"].as_array().expect("results").clone()
        }
    }

    async fn send(request: reqwest::RequestBuilder, body: Option<Value>) -> (u16, Value) {
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = request.send().await.expect("an answer");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter()
            .map(|ip| ip.parse().expect("an address"))
            .collect()
    }

    fn listed_ips(results: &[Value]) -> Vec<&str> {
        results
            .iter()
            .map(|r| r["ip_address"].as_str().expect("ip_address"))
            .collect()
    }

    #[tokio::test]
    async fn adds_lists_clears_and_clears_all() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        let (status, body) = lab.add(&["203.0.113.7", "198.51.100.1"], 300).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "success");
        assert_eq!(body["http_status"], 200);
        assert_eq!(body["http_method"], "POST");
        assert_eq!(body["serial"], "FGVM01TM00000001");
        assert_eq!(body["version"], "v7.4.5");
        assert_eq!(body["build"], 2702);
        assert_eq!(body["vdom"], "root");
        assert_eq!(
            (&body["path"], &body["name"], &body["action"]),
            (&json!("user"), &json!("banned"), &json!("add_users"))
        );
        let listed = lab.listed(None).await;
        assert_eq!(listed_ips(&listed), ["198.51.100.1", "203.0.113.7"]);
        assert_eq!(listed[0]["source"], "admin");
        assert_eq!(listed[0]["ipv6"], false);
        assert_eq!(
            listed[0]["expires"].as_i64().expect("expires"),
            listed[0]["created"].as_i64().expect("created") + 300
        );
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7", "198.51.100.1"]));

        let clear = json!({"ip_addresses": ["203.0.113.7", "192.0.2.99"]});
        let (status, body) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/user/banned/clear_users",
                Some(clear),
            )
            .await;
        assert_eq!((status, &body["action"]), (200, &json!("clear_users")));
        assert_eq!(lab.fg.banned("root"), ips(&["198.51.100.1"]));

        let (status, _) = lab
            .call(Method::POST, "/api/v2/monitor/user/banned/clear_all", None)
            .await;
        assert_eq!(status, 200);
        assert!(lab.listed(None).await.is_empty());
        assert!(lab.fg.banned("root").is_empty());

        let state = lab.fg.state();
        assert_eq!(state["calls"]["add_users"], 1);
        assert_eq!(state["calls"]["clear_users"], 1);
        assert_eq!(state["calls"]["clear_all"], 1);
        assert_eq!(state["calls"]["banned"], 2);
        assert_eq!(state["adds_total"], 2);
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_ban_ends_at_its_expiry_by_the_clock() {
        let clock = ManualClock::at(1_700_000_000_000);
        let lab = Lab::start(FortiGateConfig {
            clock: clock.clone(),
            ..FortiGateConfig::default()
        })
        .await;
        lab.add(&["203.0.113.7"], 300).await;
        lab.add(&["203.0.113.8"], 0).await;
        let listed = lab.listed(None).await;
        assert_eq!(listed[0]["created"], 1_700_000_000);
        assert_eq!(listed[0]["expires"], 1_700_000_300);
        assert_eq!(listed[1]["expires"], 0, "an indefinite ban expires 0");

        clock.advance(Duration::from_secs(299));
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7", "203.0.113.8"]));
        clock.advance(Duration::from_secs(1));
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.8"]));
        assert_eq!(listed_ips(&lab.listed(None).await), ["203.0.113.8"]);
        assert_eq!(
            lab.fg.state()["banned"]["root"].as_array().map(Vec::len),
            Some(1)
        );
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn re_adding_a_banned_address_refreshes_its_expiry() {
        let clock = ManualClock::at(1_700_000_000_000);
        let lab = Lab::start(FortiGateConfig {
            clock: clock.clone(),
            ..FortiGateConfig::default()
        })
        .await;
        lab.add(&["203.0.113.7"], 300).await;
        clock.advance(Duration::from_secs(200));
        lab.add(&["203.0.113.7"], 300).await;
        let listed = lab.listed(None).await;
        assert_eq!(listed[0]["created"], 1_700_000_000);
        assert_eq!(listed[0]["expires"], 1_700_000_500);
        clock.advance(Duration::from_secs(200));
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7"]));

        let history = lab.fg.history();
        assert_eq!(history.len(), 2);
        assert!(!history[0].while_banned);
        assert!(history[1].while_banned, "the second add found it banned");
        assert_eq!(history[1].at_ms, 1_700_000_200_000);
        assert_eq!(history[1].via, "add_users");
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_reboot_keeps_what_the_persistency_setting_keeps() {
        for (persistency, kept) in [
            (Persistency::Disabled, ips(&[])),
            (Persistency::PermanentOnly, ips(&["203.0.113.8"])),
            (Persistency::All, ips(&["203.0.113.7", "203.0.113.8"])),
        ] {
            let lab = Lab::start(FortiGateConfig {
                banned_ip_persistency: persistency,
                ..FortiGateConfig::default()
            })
            .await;
            lab.add(&["203.0.113.7"], 300).await;
            lab.add(&["203.0.113.8"], 0).await;
            lab.fg.reboot();
            assert_eq!(lab.fg.banned("root"), kept, "{persistency}");
            assert_eq!(lab.fg.state()["reboots"], 1);
            lab.fg.stop().await;
        }
    }

    #[tokio::test]
    async fn sim_endpoints_need_no_token_and_reboot_on_request() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        lab.add(&["203.0.113.7"], 300).await;
        let faults = lab
            .http
            .post(format!("{}/sim/faults", lab.fg.url))
            .json(&json!({"reboot": true, "http_500_next": 2}))
            .send()
            .await
            .expect("an answer");
        assert_eq!(faults.status(), 200);
        let faults: Faults = faults.json().await.expect("faults");
        assert_eq!(faults.http_500_next, 2);
        assert!(lab.fg.banned("root").is_empty());

        let state: Value = lab
            .http
            .get(format!("{}/sim/state", lab.fg.url))
            .send()
            .await
            .expect("an answer")
            .json()
            .await
            .expect("state");
        assert_eq!(state["reboots"], 1);
        assert_eq!(state["faults"]["http_500_next"], 2);
        assert_eq!(state["history_len"], 1);

        let unknown = lab
            .http
            .post(format!("{}/sim/faults", lab.fg.url))
            .json(&json!({"no_such_fault": 1}))
            .send()
            .await
            .expect("an answer");
        assert!(unknown.status().is_client_error());
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_missing_or_wrong_token_is_401_and_nothing_is_added() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        let url = format!("{}/api/v2/monitor/user/banned/add_users", lab.fg.url);
        let body = json!({"ip_addresses": ["203.0.113.7"], "expiry": 60});
        let (status, answer) = send(lab.http.post(&url), Some(body.clone())).await;
        assert_eq!(status, 401);
        assert_eq!(answer["status"], "error");
        assert_eq!(answer["http_status"], 401);
        let (status, _) = send(lab.http.post(&url).bearer_auth("wrong"), Some(body.clone())).await;
        assert_eq!(status, 401);
        let basic = lab.http.post(&url).basic_auth("admin", Some(&lab.fg.token));
        let (status, _) = send(basic, Some(body.clone())).await;
        assert_eq!(status, 401, "only a bearer token counts");
        let lower = lab
            .http
            .post(&url)
            .header("authorization", format!("bearer {}", lab.fg.token));
        let (status, _) = send(lower, Some(body)).await;
        assert_eq!(status, 200, "the scheme is case-insensitive");

        assert_eq!(
            lab.fg.refusals(),
            ["missing token", "bad token", "missing token"]
        );
        assert_eq!(lab.fg.history().len(), 1);
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_token_in_the_url_is_refused_even_when_right() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        let url = format!(
            "{}/api/v2/monitor/user/banned/add_users?access_token={}",
            lab.fg.url, lab.fg.token
        );
        let body = json!({"ip_addresses": ["203.0.113.7"], "expiry": 60});
        let (status, _) = send(lab.http.post(&url), Some(body.clone())).await;
        assert_eq!(status, 401);
        let both = lab.http.post(&url).bearer_auth(&lab.fg.token);
        let (status, _) = send(both, Some(body)).await;
        assert_eq!(status, 401, "refused even with the header as well");
        assert_eq!(lab.fg.refusals(), ["token in URL", "token in URL"]);
        assert!(lab.fg.banned("root").is_empty());
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_token_in_the_url_works_when_allowed() {
        let lab = Lab::start(FortiGateConfig {
            allow_token_in_url: true,
            ..FortiGateConfig::default()
        })
        .await;
        let url = format!(
            "{}/api/v2/monitor/user/banned/add_users?access_token={}",
            lab.fg.url, lab.fg.token
        );
        let body = json!({"ip_addresses": ["203.0.113.7"], "expiry": 60});
        let (status, answer) = send(lab.http.post(&url), Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7"]));
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_client_outside_the_trusted_hosts_is_401() {
        let lab = Lab::start(FortiGateConfig {
            trusted_hosts: vec!["10.0.0.0/8".parse().expect("a CIDR")],
            ..FortiGateConfig::default()
        })
        .await;
        let (status, _) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!(status, 401);
        assert_eq!(lab.fg.refusals(), ["untrusted host 127.0.0.1"]);
        assert!(lab.fg.banned("root").is_empty());
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn one_bad_address_refuses_the_call_with_424_and_adds_nothing() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        for bad in [
            json!({"ip_addresses": ["203.0.113.7", "203.0.113.300"], "expiry": 60}),
            json!({"ip_addresses": ["203.0.113.7", "10.0.0.0/8"], "expiry": 60}),
            json!({"ip_addresses": ["203.0.113.7", 7], "expiry": 60}),
            json!({"ip_addresses": [], "expiry": 60}),
            json!({"ip_addresses": "203.0.113.7", "expiry": 60}),
            json!({"expiry": 60}),
            json!({"ip_addresses": ["203.0.113.7"], "expiry": -1}),
            json!({"ip_addresses": ["203.0.113.7"], "expiry": "300"}),
        ] {
            let (status, answer) = lab
                .call(
                    Method::POST,
                    "/api/v2/monitor/user/banned/add_users",
                    Some(bad.clone()),
                )
                .await;
            assert_eq!(status, 424, "{bad}");
            assert_eq!(answer["status"], "error");
            assert_eq!(answer["http_status"], 424);
            assert!(answer["message"].is_string());
        }
        assert!(lab.fg.banned("root").is_empty());
        assert!(lab.fg.history().is_empty());
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn too_many_addresses_in_one_call_is_413() {
        let lab = Lab::start(FortiGateConfig {
            max_addresses_per_call: 2,
            ..FortiGateConfig::default()
        })
        .await;
        let (status, _) = lab.add(&["192.0.2.1", "192.0.2.2", "192.0.2.3"], 60).await;
        assert_eq!(status, 413);
        assert!(lab.fg.banned("root").is_empty());
        let (status, _) = lab.add(&["192.0.2.1", "192.0.2.2"], 60).await;
        assert_eq!(status, 200);
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn an_omitted_expiry_is_indefinite_and_counted() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        let body = json!({"ip_addresses": ["203.0.113.7"]});
        let (status, _) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/user/banned/add_users",
                Some(body),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(lab.listed(None).await[0]["expires"], 0);
        assert_eq!(lab.fg.state()["expiry_omitted"], 1);
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn ipv6_addresses_are_banned_and_listed_canonically() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        let (status, _) = lab.add(&["2001:DB8:0:0::7", "203.0.113.7"], 60).await;
        assert_eq!(status, 200);
        let listed = lab.listed(None).await;
        assert_eq!(listed_ips(&listed), ["203.0.113.7", "2001:db8::7"]);
        assert_eq!(listed[1]["ipv6"], true);
        assert_eq!(lab.fg.banned("root"), ips(&["2001:db8::7", "203.0.113.7"]));
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn vdoms_keep_their_own_lists_and_an_unknown_one_is_404() {
        let lab = Lab::start(FortiGateConfig {
            vdoms: vec!["root".into(), "dmz".into()],
            ..FortiGateConfig::default()
        })
        .await;
        let body = json!({"ip_addresses": ["203.0.113.7"], "expiry": 60});
        let (status, answer) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/user/banned/add_users?vdom=dmz",
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(answer["vdom"], "dmz");
        assert_eq!(lab.fg.banned("dmz"), ips(&["203.0.113.7"]));
        assert!(lab.fg.banned("root").is_empty());
        assert_eq!(listed_ips(&lab.listed(Some("dmz")).await), ["203.0.113.7"]);
        assert!(lab.listed(Some("root")).await.is_empty());

        let (status, answer) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/user/banned/add_users?vdom=nope",
                Some(body),
            )
            .await;
        assert_eq!((status, &answer["status"]), (404, &json!("error")));
        assert_eq!(lab.fg.history().len(), 1);
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_wrong_method_is_405_and_an_unknown_path_404() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        let (status, _) = lab
            .call(Method::GET, "/api/v2/monitor/user/banned/add_users", None)
            .await;
        assert_eq!(status, 405);
        let (status, _) = lab
            .call(Method::POST, "/api/v2/monitor/user/banned", None)
            .await;
        assert_eq!(status, 405);
        let (status, _) = lab
            .call(Method::GET, "/api/v2/monitor/system/nothing", None)
            .await;
        assert_eq!(status, 404);
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn error_faults_answer_then_clear() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        lab.fg.set_faults(FaultsUpdate {
            http_429_next: Some(1),
            http_500_next: Some(1),
            html_502_next: Some(1),
            ..FaultsUpdate::default()
        });
        let (status, body) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!(status, 502);
        assert!(body.as_str().is_some_and(|html| html.contains("nginx")));
        let (status, body) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!((status, &body["http_status"]), (429, &json!(429)));
        assert_eq!(body["status"], "error");
        let (status, body) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!((status, &body["http_status"]), (500, &json!(500)));
        assert!(
            lab.fg.banned("root").is_empty(),
            "a refused call bans nothing"
        );
        let (status, _) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!(status, 200);
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7"]));
        assert_eq!(lab.fg.state()["calls"]["add_users"], 4);
        assert_eq!(
            lab.fg.set_faults(FaultsUpdate::default()),
            Faults::default()
        );
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_lost_answer_still_bans() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        lab.fg.set_faults(FaultsUpdate {
            lost_answers_next: Some(1),
            ..FaultsUpdate::default()
        });
        let response = lab
            .http
            .post(format!(
                "{}/api/v2/monitor/user/banned/add_users",
                lab.fg.url
            ))
            .bearer_auth(&lab.fg.token)
            .json(&json!({"ip_addresses": ["203.0.113.7"], "expiry": 60}))
            .send()
            .await;
        let lost = match response {
            Ok(response) => response.bytes().await.is_err(),
            Err(_) => true,
        };
        assert!(lost, "the answer must not arrive");
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7"]));
        let (status, _) = lab.add(&["203.0.113.8"], 60).await;
        assert_eq!(status, 200, "only one answer is lost");
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn an_unreachable_firewall_carries_nothing_out() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        lab.fg.set_faults(FaultsUpdate {
            unreachable: Some(true),
            ..FaultsUpdate::default()
        });
        let (status, _) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!(status, 503);
        assert!(lab.fg.banned("root").is_empty());
        lab.fg.set_faults(FaultsUpdate {
            clear: true,
            ..FaultsUpdate::default()
        });
        let (status, _) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!(status, 200);
        lab.fg.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_the_answer() {
        let lab = Lab::start(FortiGateConfig::default()).await;
        lab.fg.set_faults(FaultsUpdate {
            latency_ms: Some(30_000),
            ..FaultsUpdate::default()
        });
        // Paused time: the simulator's sleep advances the virtual clock, nobody waits.
        let before = tokio::time::Instant::now();
        let (status, _) = lab.add(&["203.0.113.7"], 60).await;
        assert_eq!(status, 200);
        assert!(before.elapsed() >= Duration::from_secs(30));
        lab.fg.stop().await;
    }

    #[tokio::test]
    async fn a_webhook_bans_srcip_and_records_the_call() {
        let lab = Lab::start(FortiGateConfig {
            stitches: vec![
                Stitch {
                    name: "Flowmon ADS".into(),
                    ban_seconds: Some(600),
                },
                Stitch {
                    name: "notify".into(),
                    ban_seconds: None,
                },
            ],
            ..FortiGateConfig::default()
        })
        .await;
        let body = json!({"srcip": "203.0.113.7", "mac": "aa:bb:cc:dd:ee:ff",
            "fctuid": "A8BA0B12DA694E47BA4ADF24F8358E2F"});
        let (status, answer) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/system/automation-stitch/webhook/Flowmon%20ADS",
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer,
            json!({"http_method": "POST", "status": "success", "http_status": 200,
                "serial": "FGVM01TM00000001", "version": "v7.4.5", "build": 2702})
        );
        assert_eq!(lab.fg.banned("root"), ips(&["203.0.113.7"]));
        let history = lab.fg.history();
        assert_eq!(history[0].via, "webhook:Flowmon ADS");
        assert_eq!(history[0].expiry, 600);
        let calls = lab.fg.webhook_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "Flowmon ADS");
        assert_eq!(calls[0].body["mac"], "aa:bb:cc:dd:ee:ff");

        let (status, _) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/system/automation-stitch/webhook/notify",
                Some(json!({"srcip": "203.0.113.8"})),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            lab.fg.banned("root"),
            ips(&["203.0.113.7"]),
            "notify bans nothing"
        );

        let (status, _) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/system/automation-stitch/webhook/Flowmon%20ADS",
                Some(json!({"srcip": "not-an-ip"})),
            )
            .await;
        assert_eq!(status, 424);
        let (status, _) = lab
            .call(
                Method::POST,
                "/api/v2/monitor/system/automation-stitch/webhook/nobody",
                Some(body),
            )
            .await;
        assert_eq!(status, 404);
        assert_eq!(
            lab.fg.webhook_calls().len(),
            3,
            "the unknown stitch is not recorded"
        );
        assert_eq!(lab.fg.history().len(), 1);
        assert_eq!(lab.fg.state()["calls"]["webhook"], 4);
        lab.fg.stop().await;
    }

    #[test]
    fn persistency_reads_the_cli_words() {
        for p in [
            Persistency::Disabled,
            Persistency::PermanentOnly,
            Persistency::All,
        ] {
            assert_eq!(p.to_string().parse::<Persistency>(), Ok(p));
        }
        assert!("permanent".parse::<Persistency>().is_err());
    }

    #[test]
    fn endpoints_parse_from_paths() {
        assert_eq!(
            Endpoint::parse("/api/v2/monitor/user/banned/select/"),
            Some(Endpoint::List)
        );
        assert_eq!(
            Endpoint::parse("/api/v2/monitor/system/automation-stitch/webhook/a%2Fb"),
            Some(Endpoint::Webhook("a/b".into()))
        );
        assert_eq!(
            Endpoint::parse("/api/v2/monitor/system/automation-stitch/webhook/"),
            None
        );
        assert_eq!(Endpoint::parse("/api/v2/cmdb/firewall/address"), None);
    }
}
