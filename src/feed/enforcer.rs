//! A feed behind the [`Enforcer`] interface. Nothing is pushed: a feed lists what the state
//! topic says is active, so "sending" a rule is confirming it (its active state record, which
//! the batcher writes next, is what `samgate feed` serves), and removing it is its tombstone.
//! A feed target has one "gateway": the feed itself.
//!
//! The state machine still asks before it believes (`pipeline::rule`): a question is answered
//! from this replica's block state (a confirmed, unexpired block is in the feed; a block whose
//! fate is unknown is not, since feeds list only confirmed blocks), and a rule this enforcer
//! was asked to remove is absent from then on, until it is blocked again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::checkpoint::sam::{RuleKey, SamRule};
use crate::enforcer::{Answer, Enforcer, Failed, Listing, Listings, Removal, Verified};
use crate::pipeline::decide::Enforce;
use crate::pipeline::dedupe::Check;
use crate::pipeline::rule::{Presence, Sent};
use crate::pipeline::Shared;

/// How many removed keys are remembered before the settled ones are let go.
const WITHDRAWN_KEPT: usize = 10_000;

/// One feed target.
pub struct FeedEnforcer {
    pub shared: Arc<Shared>,
    /// Rules removed since they were last blocked.
    withdrawn: Mutex<HashSet<RuleKey>>,
}

impl FeedEnforcer {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            withdrawn: Mutex::default(),
        }
    }

    fn listed(&self, key: &RuleKey) -> bool {
        if self.withdrawn.lock().expect("withdrawn").contains(key) {
            return false;
        }
        let state = self.shared.state.lock().expect("state");
        matches!(state.check(key, chrono::Utc::now()), Check::Active(_))
    }
}

/// What a result says was done for a block: the feed that lists it.
pub fn describe_listing(enforce: &Enforce) -> String {
    format!(
        "listed in feed {} ({}) until it expires",
        enforce.target.name,
        enforce.rule.criteria.address()
    )
}

/// What a result says was done for an unblock.
pub fn describe_removal(rule: &SamRule) -> String {
    format!("removed from the feed ({})", rule.criteria.address())
}

fn per_gateway<T: Clone>(gateways: &[String], verdict: T) -> Vec<(String, T)> {
    gateways
        .iter()
        .map(|g| (g.clone(), verdict.clone()))
        .collect()
}

#[async_trait]
impl Enforcer for FeedEnforcer {
    async fn block(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Answer, Failed> {
        let mut withdrawn = self.withdrawn.lock().expect("withdrawn");
        for rule in rules {
            withdrawn.remove(&rule.key);
        }
        Ok(Answer {
            verdicts: rules
                .iter()
                .map(|_| per_gateway(gateways, Sent::Confirmed))
                .collect(),
            references: Vec::new(),
        })
    }

    async fn verify(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Verified, Failed> {
        let verdicts = rules
            .iter()
            .map(|rule| {
                let presence = match self.listed(&rule.key) {
                    true => Presence::InPlace,
                    false => Presence::Absent,
                };
                per_gateway(gateways, presence)
            })
            .collect();
        Ok(Verified {
            verdicts,
            handles: vec![Default::default(); rules.len()],
        })
    }

    async fn unblock(
        &self,
        removals: &[Removal<'_>],
        gateways: &[String],
    ) -> Result<Answer, Failed> {
        let mut withdrawn = self.withdrawn.lock().expect("withdrawn");
        for removal in removals {
            withdrawn.insert(removal.enforce.key);
        }
        if withdrawn.len() > WITHDRAWN_KEPT {
            // Bounded: a removal long settled has no block left to hide.
            let state = self.shared.state.lock().expect("state");
            let now = chrono::Utc::now();
            withdrawn.retain(|key| matches!(state.check(key, now), Check::Active(_)));
        }
        Ok(Answer {
            verdicts: removals
                .iter()
                .map(|_| per_gateway(gateways, Sent::Confirmed))
                .collect(),
            references: Vec::new(),
        })
    }

    /// A feed holds what the state topic holds, by construction: nothing can be missing
    /// from it, and nothing foreign can be in it. Whether gateways fetch it is what its
    /// metrics watch (`samgate_feed_last_poll_timestamp_seconds`).
    async fn list(&self, gateways: &[String]) -> Result<Listings, crate::enforcer::BackendError> {
        Ok((
            gateways
                .iter()
                .map(|g| (g.clone(), Listing::Published))
                .collect(),
            Vec::new(),
        ))
    }
}
