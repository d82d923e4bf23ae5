//! Flowmon's REST API, as the shim uses it: the source MAC address of ADS events, for a
//! FortiGate stitch's access-layer quarantine (seed 002's v2 script does the same with curl).
//!
//! One OAuth token per run (`POST /resources/oauth/token`, password grant, client
//! `invea-tech`), then `GET /rest/ads/event/{id}` per event, a few at a time, all within
//! `shim.flowmon_api.timeout`. The lookups run on input that is already safe in the spool, and
//! whatever fails or runs out of time leaves its event without a MAC: an event is never held
//! back or lost for it. The credentials come from a file, never from ADS parameters, and are
//! never logged.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::FlowmonApiConfig;
use crate::event::MacAddr;
use crate::secret::Secret;

/// The REST user, read from `credentials_file`.
#[derive(Debug)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

/// Reads `user` (first line) and `password` (second line). The error names the file, never
/// its contents.
pub fn read_credentials(path: &Path) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("shim.flowmon_api.credentials_file {}: {e}", path.display()))?;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    match (lines.next(), lines.next()) {
        (Some(user), Some(password)) if !user.trim().is_empty() && !password.is_empty() => {
            Ok(Credentials {
                user: user.trim().to_owned(),
                password: Secret::new(password.to_owned()),
            })
        }
        _ => Err(format!(
            "shim.flowmon_api.credentials_file {}: needs the user on its first line and the password on its second",
            path.display()
        )),
    }
}

/// The MAC address of each event id that Flowmon knows one for, looked up within `time`.
/// Never fails: what could not be looked up is said in a warning and left out.
pub async fn source_macs(
    config: &FlowmonApiConfig,
    ids: &[String],
    time: Duration,
) -> HashMap<String, MacAddr> {
    if ids.is_empty() || time.is_zero() {
        return HashMap::new();
    }
    let deadline = Instant::now() + time;
    match tokio::time::timeout_at(deadline, lookups(config, ids)).await {
        Ok(Ok(found)) => {
            info!(
                asked = ids.len(),
                found = found.len(),
                "looked up source MAC addresses in Flowmon's REST API"
            );
            found
        }
        Ok(Err(e)) => {
            warn!(error = %e, "cannot look up source MAC addresses; events go without them");
            HashMap::new()
        }
        Err(_) => {
            warn!(timeout = ?time, asked = ids.len(), "MAC lookups ran out of time; events go without them");
            HashMap::new()
        }
    }
}

async fn lookups(
    config: &FlowmonApiConfig,
    ids: &[String],
) -> Result<HashMap<String, MacAddr>, String> {
    let credentials = read_credentials(&config.credentials_file)?;
    let http = crate::checkpoint::tls::http_client("flowmon", &config.tls, config.timeout)?;
    let base = config.url.trim_end_matches('/');
    let token = token(&http, base, &credentials).await?;
    let found = stream::iter(ids.iter().cloned())
        .map(|id| {
            let (http, token) = (&http, &token);
            async move {
                let mac = event_mac(http, base, token, &id).await;
                (id, mac)
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .filter_map(|(id, mac)| async move {
            match mac {
                Ok(Some(mac)) => Some((id, mac)),
                Ok(None) => None,
                Err(e) => {
                    warn!(event_id = id, error = %e, "no MAC address for this event");
                    None
                }
            }
        })
        .collect()
        .await;
    Ok(found)
}

async fn token(
    http: &reqwest::Client,
    base: &str,
    credentials: &Credentials,
) -> Result<Secret, String> {
    let form = [
        ("grant_type", "password"),
        ("client_id", "invea-tech"),
        ("username", credentials.user.as_str()),
        ("password", credentials.password.expose()),
    ];
    let response = http
        .post(format!("{base}/resources/oauth/token"))
        .form(&form)
        .send()
        .await
        .map_err(|e| format!("token request: {}", crate::secret::scrub(&e.to_string())))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|_| format!("token request: HTTP {status} without JSON"))?;
    match body.get("access_token").and_then(Value::as_str) {
        Some(token) if status.is_success() => Ok(Secret::new(token.to_owned())),
        _ => Err(format!(
            "token request refused (HTTP {status}): check the user and password in credentials_file"
        )),
    }
}

/// One event's MAC: `None` when Flowmon has none for it.
async fn event_mac(
    http: &reqwest::Client,
    base: &str,
    token: &Secret,
    id: &str,
) -> Result<Option<MacAddr>, String> {
    let id: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
    let response = http
        .get(format!("{base}/rest/ads/event/{id}"))
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|e| crate::secret::scrub(&e.to_string()))?;
    let status = response.status();
    if status.as_u16() == 404 {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body: Value = response.json().await.map_err(|_| "not JSON".to_owned())?;
    Ok(body
        .get("macAddress")
        .and_then(Value::as_str)
        .and_then(|text| text.parse().ok()))
}

/// How long a run may spend on lookups: the configured timeout, or less when the delivery
/// deadline is nearer.
pub fn budget(config: &FlowmonApiConfig, left: Duration) -> Duration {
    config.timeout.min(left / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_two_lines_and_errors_never_show_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "flowmon-api\r\ns3cr3t-Passw0rd\n").unwrap();
        let c = read_credentials(&path).unwrap();
        assert_eq!(c.user, "flowmon-api");
        assert_eq!(c.password.expose(), "s3cr3t-Passw0rd");
        assert_eq!(format!("{c:?}").matches("s3cr3t").count(), 0);

        std::fs::write(&path, "only-a-user-s3cr3t\n").unwrap();
        let e = read_credentials(&path).unwrap_err();
        assert!(e.contains("second"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(read_credentials(&dir.path().join("missing")).is_err());
    }
}
