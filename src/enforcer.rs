//! The one interface the pipeline enforces through, whatever the firewall: block a batch of
//! rules, ask whether rules are in place, remove rules, list what a device enforces. Check Point
//! ([`crate::checkpoint::enforcer`]: `run-script` carrying `fw sam` / `fw samp`) and FortiGate
//! ([`crate::fortigate::enforcer`]: the REST banned-IP list, or an automation-stitch webhook)
//! implement it; batching, rate limits, retries, the rule state machine, reconcile and the
//! operators' commands (`pipeline::enforce`, `pipeline::lifecycle`) are the same for both.
//!
//! An enforcer answers per rule and per *gateway* (a Check Point target's gateways; a FortiGate
//! target's one device), in the words of the state machine (`pipeline::rule`): [`Sent`] after a
//! send, [`Presence`] after a question. A call that failed as a whole says whether it may have
//! been carried out ([`Delivery`]): that is what keeps an unknown outcome from being resent.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use async_trait::async_trait;

use crate::checkpoint::sam::{self, RuleKey, SampUid};
use crate::checkpoint::{ApiError, ErrorClass};
use crate::pipeline::decide::Enforce;
use crate::pipeline::rule::{Delivery, Presence, Sent};

/// Per rule (in the order given), per gateway (in the order given): a verdict.
pub type Verdicts<T> = Vec<Vec<(String, T)>>;

/// What a send or a removal answered.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub verdicts: Verdicts<Sent>,
    /// The firewall's own references to the calls (Check Point task ids), for results.
    pub references: Vec<String>,
}

/// What a question about rules answered.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub verdicts: Verdicts<Presence>,
    /// Per rule, per gateway: what a removal of the rule there must name (the uids of `fw samp`
    /// rules carrying its key). Empty where a rule is removed by what it is.
    pub handles: Vec<HashMap<String, Vec<Handle>>>,
}

/// What a firewall calls one of its rules, read back from it (never from an event).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Handle {
    SampUid(SampUid),
}

/// A rule to remove, with what the last question found of it per gateway.
pub struct Removal<'a> {
    pub enforce: &'a Enforce,
    pub found: &'a HashMap<String, Vec<Handle>>,
}

/// What one gateway enforces, as far as samgate can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// `fw samp get`: samgate's tagged rules (key, and the address they name).
    Samp(Vec<(RuleKey, Option<IpAddr>)>),
    /// `fw sam -M`: untagged lines, matched to samgate's rule by criteria and flags.
    Sam(Vec<sam::SamMonitorEntry>),
    /// A FortiGate's banned-IP list: addresses (no tags).
    Banned(Vec<IpAddr>),
    /// A feed: built from the state topic, so it holds every active block by construction.
    Published,
    /// Only the IPv4 rules could be listed: the IPv6 query failed (a gateway with IPv6 turned
    /// off has no `fw6` tables to ask). IPv6 rules are not judged there.
    Ipv4Only(Box<Listing>),
}

impl Listing {
    /// Whether the listing holds samgate's rule; `None` when it cannot tell.
    pub fn holds(&self, rule: &sam::SamRule) -> Option<bool> {
        match self {
            Listing::Samp(keys) => Some(keys.iter().any(|(k, _)| Some(*k) == rule.key)),
            Listing::Sam(lines) => Some(lines.iter().any(|l| sam::monitor_entry_is(l, rule))),
            Listing::Banned(ips) => Some(ips.contains(&rule.criteria.address())),
            Listing::Published => Some(true),
            Listing::Ipv4Only(_) if rule.criteria.is_ipv6() => None,
            Listing::Ipv4Only(ipv4) => ipv4.holds(rule),
        }
    }

    /// samgate's tagged rules, where the listing has tags (`fw samp get`).
    pub fn tagged(&self) -> &[(RuleKey, Option<IpAddr>)] {
        match self {
            Listing::Samp(keys) => keys,
            Listing::Ipv4Only(ipv4) => ipv4.tagged(),
            _ => &[],
        }
    }
}

/// Per gateway, its listing; the gateways that could not be listed, with why.
pub type Listings = (BTreeMap<String, Listing>, Vec<String>);

/// An error of some firewall's API, classified the one way retries read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    CheckPoint(#[from] ApiError),
    #[error(transparent)]
    FortiGate(#[from] crate::fortigate::FortiError),
    /// A rule cannot be expressed in the target's command form (a configuration matter).
    #[error("unrenderable rule: {0}")]
    Unrenderable(String),
    /// A call was accepted, but following it to its end failed (a task the server forgot, a
    /// session lost while polling): whatever the reason, what it did is unknown, and the
    /// gateways are asked, never a failure concluded from the polling alone.
    #[error("the call was accepted, then could not be followed to its end: {0}")]
    Unfollowed(Box<BackendError>),
}

impl BackendError {
    /// What the retries do about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::CheckPoint(e) => crate::checkpoint::classify(e),
            Self::FortiGate(e) => crate::fortigate::classify(e),
            Self::Unrenderable(_) => ErrorClass::Permanent,
            Self::Unfollowed(e) => match e.class() {
                ErrorClass::RateLimited(at_least) => ErrorClass::RateLimited(at_least),
                _ => ErrorClass::Retryable,
            },
        }
    }
}

/// A call that failed as a whole, and whether it may have been carried out.
#[derive(Debug, Clone)]
pub struct Failed {
    pub error: BackendError,
    pub delivery: Delivery,
}

impl Failed {
    /// The call was refused before anything ran.
    pub fn not_sent(error: impl Into<BackendError>) -> Self {
        Self {
            error: error.into(),
            delivery: Delivery::NotSent,
        }
    }

    /// The call may have been carried out (its answer was lost, or its work could not be
    /// followed to the end).
    pub fn maybe_sent(error: impl Into<BackendError>) -> Self {
        Self {
            error: error.into(),
            delivery: Delivery::MaybeSent,
        }
    }
}

/// A firewall samgate enforces through. Calls are made within the target's server limits
/// (`pipeline::enforce::ServerLimits`), which the caller holds; an enforcer paces nothing itself
/// beyond what its protocol demands (Check Point's login budget).
#[async_trait]
pub trait Enforcer: Send + Sync {
    /// Puts `rules` in place on `gateways`.
    async fn block(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Answer, Failed>;

    /// Asks `gateways` whether each rule is in place.
    async fn verify(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Verified, Failed>;

    /// Removes rules from `gateways` (where the last question found them). Whatever this
    /// answers, the state machine asks again before it believes a rule gone.
    async fn unblock(
        &self,
        removals: &[Removal<'_>],
        gateways: &[String],
    ) -> Result<Answer, Failed>;

    /// Lists every gateway of the target (reconcile). A gateway whose listing cannot be read
    /// whole is named in the second part, and nothing is concluded about it.
    async fn list(&self, gateways: &[String]) -> Result<Listings, BackendError>;

    /// The most rules one call can carry, when the firewall bounds it (the batcher fills batches
    /// up to the smaller of this and `run.batch_max_rules`).
    fn max_batch(&self) -> Option<usize> {
        None
    }

    /// How many server calls one [`Enforcer::unblock`] of `gateways` makes (each takes a token
    /// of the server's rate limit).
    fn unblock_calls(&self, _gateways: usize) -> u32 {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_could_not_be_followed_is_asked_about_never_failed() {
        let api = |status: u16, code: &str| {
            BackendError::CheckPoint(ApiError::Api {
                server: "mgmt".into(),
                command: "show-task".into(),
                status,
                code: code.into(),
                message: "m".into(),
            })
        };
        let unfollowed = |e: BackendError| BackendError::Unfollowed(Box::new(e)).class();
        // On its own, a task the server forgot is permanent, and a login refused is auth.
        assert_eq!(
            api(404, "generic_err_object_not_found").class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            unfollowed(api(404, "generic_err_object_not_found")),
            ErrorClass::Retryable
        );
        assert_eq!(
            unfollowed(api(400, "err_login_failed")),
            ErrorClass::Retryable
        );
        let limited = api(429, "err_too_many_requests").class();
        assert!(matches!(limited, ErrorClass::RateLimited(_)), "{limited:?}");
        assert_eq!(unfollowed(api(429, "err_too_many_requests")), limited);
    }
}
