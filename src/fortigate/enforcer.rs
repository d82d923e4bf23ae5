//! FortiGate behind the [`Enforcer`] interface. A FortiGate target has one "gateway": the
//! device itself.
//!
//! - **Banned-IP list** (`mode = "banned_ip"`): a batch is one `add_users` call with every
//!   address and the batch's expiry (the longest of its rules'; FortiOS takes one expiry per
//!   call, so rules of different durations go in calls of their own). Questions, removals and
//!   listings read and change the same list (`GET …/user/banned`, `clear_users`).
//! - **Automation-stitch webhook** (`mode = "webhook"`): one call per address (a stitch takes one
//!   `srcip`, and `mac` when the shim found it), for estates whose stitch quarantines (IP Ban,
//!   access-layer quarantine by MAC). The stitch's actions decide what happens and for how
//!   long; samgate verifies and reconciles through the banned list, which an IP Ban action fills
//!   (`docs/fortigate.md`).
//!
//! Bans do not survive a FortiGate reboot by default (`banned-ip-persistency disabled`):
//! reconcile lists the device and re-asserts what it lost.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;

use super::{delivery, FortiClient, FortiError};
use crate::enforcer::{
    Answer, BackendError, Enforcer, Failed, Listing, Listings, Removal, Verified,
};
use crate::pipeline::decide::Enforce;
use crate::pipeline::rule::{Presence, Sent};

/// How a FortiGate target quarantines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FortiMode {
    /// The banned-IP list (`add_users` / `clear_users`).
    BannedIp,
    /// An automation stitch's incoming webhook, by stitch name.
    Webhook { stitch: String },
}

/// One FortiGate target.
pub struct FortiGateEnforcer {
    pub client: Arc<FortiClient>,
    pub mode: FortiMode,
}

fn failed(error: FortiError) -> Failed {
    Failed {
        delivery: delivery(&error),
        error: error.into(),
    }
}

/// The address a rule bans (FortiGate rules are by source address only).
fn address(enforce: &Enforce) -> IpAddr {
    enforce.rule.criteria.address()
}

/// FortiOS's `expiry`: seconds, where 0 would mean *never*: a rule always has a time.
fn expiry(enforce: &Enforce) -> u32 {
    let most = crate::command::MAX_SECONDS as u32;
    enforce.rule.timeout_secs.unwrap_or(most).clamp(1, most)
}

#[async_trait]
impl Enforcer for FortiGateEnforcer {
    async fn block(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Answer, Failed> {
        match &self.mode {
            FortiMode::BannedIp => {
                // One call per distinct expiry (usually one: a batch's rules mostly share the
                // policy's first step).
                let mut by_expiry: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
                for (i, rule) in rules.iter().enumerate() {
                    by_expiry.entry(expiry(rule)).or_default().push(i);
                }
                let mut verdicts = vec![Vec::new(); rules.len()];
                for (calls, (expiry, members)) in by_expiry.into_iter().enumerate() {
                    let ips: Vec<IpAddr> = members.iter().map(|&i| address(rules[i])).collect();
                    let verdict = match self.client.ban(&ips, expiry).await {
                        Ok(()) => Sent::Confirmed,
                        // The first call refused as a whole: nothing was done; say so as one
                        // failure, which keeps its class (auth, rate limit, …).
                        Err(e) if calls == 0 => return Err(failed(e)),
                        Err(e) => verdict_of_failure(&e),
                    };
                    for i in members {
                        verdicts[i] = per_gateway(gateways, &verdict);
                    }
                }
                Ok(Answer {
                    verdicts,
                    references: Vec::new(),
                })
            }
            FortiMode::Webhook { stitch } => {
                let mut verdicts = Vec::with_capacity(rules.len());
                for (i, rule) in rules.iter().enumerate() {
                    let verdict = match self.client.webhook(stitch, address(rule), rule.mac).await {
                        // A 200 says the stitch was triggered, not that its IP Ban ran (the
                        // stitch may have none, or it may fail): the banned list says.
                        Ok(()) => Sent::Unknown(
                            "the stitch was triggered; its ban is read back from the banned list"
                                .into(),
                        ),
                        Err(e) if i == 0 => return Err(failed(e)),
                        Err(e) => verdict_of_failure(&e),
                    };
                    verdicts.push(per_gateway(gateways, &verdict));
                }
                Ok(Answer {
                    verdicts,
                    references: Vec::new(),
                })
            }
        }
    }

    async fn verify(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Verified, Failed> {
        let banned = self.client.banned().await.map_err(failed)?;
        let verdicts = rules
            .iter()
            .map(|rule| {
                let presence = match banned.iter().any(|b| b.ip_address == address(rule)) {
                    true => Presence::InPlace,
                    false => Presence::Absent,
                };
                per_gateway(gateways, &presence)
            })
            .collect();
        Ok(Verified {
            verdicts,
            handles: vec![HashMap::new(); rules.len()],
        })
    }

    async fn unblock(
        &self,
        removals: &[Removal<'_>],
        gateways: &[String],
    ) -> Result<Answer, Failed> {
        let ips: Vec<IpAddr> = removals.iter().map(|r| address(r.enforce)).collect();
        self.client.unban(&ips).await.map_err(failed)?;
        Ok(Answer {
            verdicts: vec![per_gateway(gateways, &Sent::Confirmed); removals.len()],
            references: Vec::new(),
        })
    }

    async fn list(&self, gateways: &[String]) -> Result<Listings, BackendError> {
        let banned = self.client.banned().await?;
        let listing = Listing::Banned(banned.into_iter().map(|b| b.ip_address).collect());
        Ok((
            gateways
                .iter()
                .map(|g| (g.clone(), listing.clone()))
                .collect(),
            Vec::new(),
        ))
    }

    fn max_batch(&self) -> Option<usize> {
        match self.mode {
            // A stitch takes one address per call: each is its own batch, paced and capped like
            // any other call.
            FortiMode::Webhook { .. } => Some(1),
            FortiMode::BannedIp => None,
        }
    }
}

/// The call a block makes, as results show it (`add_users {…}` or `webhook <stitch> {…}`).
pub fn describe_ban(mode: &FortiMode, enforce: &Enforce) -> String {
    let ip = address(enforce);
    match mode {
        FortiMode::BannedIp => format!(
            "POST /api/v2/monitor/user/banned/add_users {}",
            serde_json::json!({"ip_addresses": [ip], "expiry": expiry(enforce)})
        ),
        FortiMode::Webhook { stitch } => {
            let mut body = serde_json::json!({ "srcip": ip });
            if let Some(mac) = enforce.mac {
                body["mac"] = serde_json::json!(mac.to_string());
            }
            format!("POST /api/v2/monitor/system/automation-stitch/webhook/{stitch} {body}")
        }
    }
}

/// The call an unblock makes, as results show it.
pub fn describe_unban(rule: &crate::checkpoint::sam::SamRule) -> String {
    format!(
        "POST /api/v2/monitor/user/banned/clear_users {}",
        serde_json::json!({"ip_addresses": [rule.criteria.address()]})
    )
}

fn per_gateway<T: Clone>(gateways: &[String], verdict: &T) -> Vec<(String, T)> {
    gateways
        .iter()
        .map(|g| (g.clone(), verdict.clone()))
        .collect()
}

/// A later call of a batch failed: what its rules' state is on the device.
fn verdict_of_failure(error: &FortiError) -> Sent {
    match delivery(error) {
        crate::pipeline::rule::Delivery::NotSent => Sent::Refused(error.to_string()),
        crate::pipeline::rule::Delivery::MaybeSent => Sent::Unknown(error.to_string()),
    }
}
