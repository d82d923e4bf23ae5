//! One FortiGate's REST API: the banned-IP list and the automation-stitch webhook.
//!
//! Every request carries the REST API administrator's token in `Authorization: Bearer` (never
//! `?access_token=`), the VDOM as `?vdom=` when one is configured, and is checked against
//! FortiOS's monitor envelope (`status`, `http_status`): a 200 whose envelope says `error` is an
//! error. Answer texts are scrubbed of anything that looks like a key before they reach an
//! error message.

use std::net::IpAddr;
use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::FortiError;
use crate::checkpoint::tls;
use crate::config::FortigateDeviceConfig;
use crate::event::MacAddr;
use crate::secret::Secret;

/// One entry of `GET /api/v2/monitor/user/banned`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BannedEntry {
    pub ip_address: IpAddr,
    /// Who banned it (`admin` for the API, `ips`, `dos`, …).
    #[serde(default)]
    pub source: Option<String>,
    /// Epoch seconds.
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub created: Option<i64>,
    /// Epoch seconds; 0 (or absent) for a ban without expiry.
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub expires: Option<i64>,
}

/// Epoch seconds as FortiOS versions write them: an integer, a float, or a numeric string
/// (an entry samgate cannot read makes the whole listing unreadable, never a missing ban).
fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("{n} is not a time"))),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(|f| Some(f as i64))
            .map_err(|_| D::Error::custom(format!("{s:?} is not a time"))),
        Some(other) => Err(D::Error::custom(format!("{other} is not a time"))),
    }
}

/// A client for one FortiGate (one VDOM).
pub struct FortiClient {
    name: String,
    url: String,
    vdom: Option<String>,
    token: Secret,
    http: reqwest::Client,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for FortiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FortiClient")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("vdom", &self.vdom)
            .finish_non_exhaustive()
    }
}

impl FortiClient {
    /// A client for the device configured as `name`. Does not connect yet.
    pub fn new(name: &str, config: &FortigateDeviceConfig) -> Result<Self, String> {
        let token = config
            .token
            .clone()
            .ok_or_else(|| format!("fortigate.devices.{name}: needs a token"))?;
        let http = tls::http_client(name, &config.tls, config.request_timeout)?;
        if config.url.starts_with("http://") {
            tracing::warn!(
                device = name,
                "plain HTTP to this FortiGate: its API token crosses the network unencrypted (simulators and labs only; use https://)"
            );
        }
        Ok(Self {
            name: name.to_owned(),
            url: config.url.trim_end_matches('/').to_owned(),
            vdom: config.vdom.clone(),
            token,
            http,
            metrics: None,
        })
    }

    /// Records requests and latency in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bans `ips` for `expiry` seconds (0: until unbanned), in one call.
    pub async fn ban(&self, ips: &[IpAddr], expiry: u32) -> Result<(), FortiError> {
        let body = json!({ "ip_addresses": ips, "expiry": expiry });
        self.request(
            Method::POST,
            "add_users",
            "monitor/user/banned/add_users",
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// Lifts the bans of `ips` (addresses not banned are no error).
    pub async fn unban(&self, ips: &[IpAddr]) -> Result<(), FortiError> {
        let body = json!({ "ip_addresses": ips });
        self.request(
            Method::POST,
            "clear_users",
            "monitor/user/banned/clear_users",
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// What the device bans now.
    pub async fn banned(&self) -> Result<Vec<BannedEntry>, FortiError> {
        let envelope = self
            .request(Method::GET, "banned", "monitor/user/banned", None)
            .await?;
        let results = envelope.get("results").cloned().unwrap_or(Value::Null);
        match results {
            // One entry it cannot read and the listing proves nothing: a ban it dropped would
            // read as absent (an unblock confirmed, a block sent again).
            Value::Array(items) => match items
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<Vec<BannedEntry>, _>>()
            {
                Ok(entries) => Ok(entries),
                Err(e) => Err(FortiError::Unreadable {
                    device: self.name.clone(),
                    detail: e.to_string(),
                }),
            },
            _ => Err(FortiError::Protocol {
                device: self.name.clone(),
                call: "banned",
                status: 200,
            }),
        }
    }

    /// Triggers the automation stitch `stitch` (an Incoming Webhook trigger) for `srcip`, with
    /// the source's `mac` when known (access-layer quarantine reads it).
    pub async fn webhook(
        &self,
        stitch: &str,
        srcip: IpAddr,
        mac: Option<MacAddr>,
    ) -> Result<(), FortiError> {
        let mut body = json!({ "srcip": srcip });
        if let Some(mac) = mac {
            body["mac"] = json!(mac.to_string());
        }
        let path = format!(
            "monitor/system/automation-stitch/webhook/{}",
            url::form_urlencoded::byte_serialize(stitch.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        );
        self.request(Method::POST, "webhook", &path, Some(&body))
            .await
            .map(drop)
    }

    async fn request(
        &self,
        method: Method,
        call: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, FortiError> {
        let started = std::time::Instant::now();
        let result = self.request_unmeasured(method, call, path, body).await;
        if let Some(m) = &self.metrics {
            let status = match &result {
                Ok(_) => "ok",
                Err(FortiError::Transport { .. }) => "transport",
                Err(FortiError::Status { .. }) => "api",
                Err(FortiError::Protocol { .. } | FortiError::Unreadable { .. }) => "protocol",
            };
            m.api_requests
                .with_label_values(&[&self.name, call, status])
                .inc();
            m.api_latency
                .with_label_values(&[&self.name, call])
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn request_unmeasured(
        &self,
        method: Method,
        call: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, FortiError> {
        let mut request = self
            .http
            .request(method, format!("{}/api/v2/{path}", self.url))
            .bearer_auth(self.token.expose());
        if let Some(vdom) = &self.vdom {
            request = request.query(&[("vdom", vdom)]);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        let envelope = serde_json::from_slice::<Value>(&bytes).ok();
        let failed = |status: u16, message: String| FortiError::Status {
            device: self.name.clone(),
            call,
            status,
            message: crate::secret::scrub(&message),
        };
        match envelope {
            Some(Value::Object(map)) if (200..300).contains(&status) => {
                let says_error = map.get("status").and_then(Value::as_str) == Some("error");
                let inner = map
                    .get("http_status")
                    .and_then(Value::as_u64)
                    .unwrap_or(200);
                if says_error || !(200..300).contains(&inner) {
                    return Err(failed(inner as u16, envelope_message(&map)));
                }
                Ok(Value::Object(map))
            }
            Some(_) | None if (200..300).contains(&status) => Err(FortiError::Protocol {
                device: self.name.clone(),
                call,
                status,
            }),
            Some(Value::Object(map)) => Err(failed(status, envelope_message(&map))),
            _ => Err(failed(status, status_hint(status).to_owned())),
        }
    }

    fn transport(&self, error: reqwest::Error) -> FortiError {
        let detail = tls::error_chain(&error);
        let tls = tls::refused_certificate(&detail);
        FortiError::Transport {
            device: self.name.clone(),
            timeout: error.is_timeout(),
            maybe_delivered: !tls && !error.is_connect(),
            tls,
            detail: crate::secret::scrub(&detail),
        }
    }
}

/// What an error envelope says (FortiOS puts a number in `error`, sometimes a `message`).
fn envelope_message(map: &serde_json::Map<String, Value>) -> String {
    let mut parts = Vec::new();
    for field in ["message", "error", "cli_error"] {
        match map.get(field) {
            Some(Value::String(s)) if !s.is_empty() => parts.push(format!("{field} {s}")),
            Some(Value::Number(n)) => parts.push(format!("{field} {n}")),
            _ => {}
        }
    }
    match parts.is_empty() {
        true => "status error".into(),
        false => parts.join(", "),
    }
}

/// What a status without a JSON body most likely means.
fn status_hint(status: u16) -> &'static str {
    match status {
        401 => "not authorised: a wrong or missing token, this address not among the REST API administrator's trusted hosts, or the token sent in the URL (FortiOS 7.4.5+)",
        403 => "the REST API administrator's profile lacks a permission",
        404 => "no such endpoint or VDOM",
        429 => "rate limited",
        502..=504 => "something in front of the FortiGate answered; it may be restarting",
        _ => "a non-JSON answer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_entries_read_every_time_format_and_refuse_the_rest() {
        let read = |v: Value| serde_json::from_value::<BannedEntry>(v).map(|e| e.expires);
        for (entry, expires) in [
            (
                json!({"ip_address": "192.0.2.7", "expires": 1800000000}),
                Some(1800000000),
            ),
            (
                json!({"ip_address": "192.0.2.7", "expires": 1800000000.0}),
                Some(1800000000),
            ),
            (
                json!({"ip_address": "192.0.2.7", "expires": "1800000000"}),
                Some(1800000000),
            ),
            (json!({"ip_address": "192.0.2.7", "expires": 0}), Some(0)),
            (json!({"ip_address": "192.0.2.7"}), None),
            (json!({"ip_address": "192.0.2.7", "expires": null}), None),
        ] {
            assert_eq!(read(entry.clone()).unwrap(), expires, "{entry}");
        }
        for entry in [
            json!({"ip_address": "192.0.2.7", "expires": "soon"}),
            json!({"ip_address": "192.0.2.7", "expires": [1]}),
            json!({"ip_address": "not an address"}),
        ] {
            assert!(read(entry.clone()).is_err(), "{entry}");
        }
    }
}
