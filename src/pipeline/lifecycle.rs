//! What happens to a block after it is made: it **expires** (an `expired` result, then, once the
//! escalation window has passed, a tombstone, so the compacted state topic stops growing), and
//! the gateways are **reconciled** with it (a rule the gateways lost is re-asserted, a rule
//! with samgate's tag that no block explains is reported, and removed when configured).
//!
//! Both act only on what this replica owns: the blocks of its partitions, and, for orphans, the
//! addresses whose partition it owns. What to do is decided by pure functions
//! ([`BlockState::sweep`], [`compare`]); this module only moves data.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tracing::{error, info, warn};

use super::decide::{Code, Enforce};
use super::dedupe::{BlockRecord, Ended, Origin, STATE_SCHEMA};
use super::enforce::{Batcher, Work};
use super::ownership::Claim;
use super::policy::{Policy, Target};
use super::report::{self, Outcome, ResultMessage, WriteError};
use super::rule::Progress;
use super::{finish, Completion, Shared};
use crate::checkpoint::sam::RuleKey;
use crate::command::Command;
use crate::enforcer::Listing;

/// How often the owner looks for blocks that ended.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Blocks that end within this margin are not re-asserted (the gateway may have dropped them
/// already, by their own `-t`).
const REASSERT_MARGIN: chrono::Duration = chrono::Duration::seconds(60);

/// Reports the blocks and exemptions that ended since the last sweep, and forgets history past
/// the escalation window (tombstones).
pub fn sweep(shared: &Arc<Shared>, policy: &Policy) {
    let now = Utc::now();
    let found = shared
        .state
        .lock()
        .expect("state")
        .sweep(now, |p| owned(shared, p).is_some());
    for ended in found.expired {
        let Some(claim) = owned(shared, ended.partition) else {
            continue;
        };
        let Some(target) = policy.target(&ended.subject.target) else {
            continue; // a target no longer configured
        };
        let mut result = ResultMessage::for_block(
            &ended.subject,
            target,
            ended.key,
            Origin::Expiry,
            Outcome::Expired,
            Code::Expired,
            format!(
                "the block of {} at {} ended at {} (the gateways drop the rule themselves: it was sent with -t)",
                ended.subject.ip,
                target.name,
                report::timestamp(ended.block.expires_at)
            ),
        );
        result.expires_at = Some(report::timestamp(ended.block.expires_at));
        result.level = Some(ended.block.level);
        result.event_ids.extend(ended.block.event_id.clone());
        let record = BlockRecord {
            schema: STATE_SCHEMA.into(),
            key: ended.key,
            site: ended.subject.site.clone(),
            ip: ended.subject.ip,
            target: ended.subject.target.clone(),
            level: ended.block.level,
            blocked_at: ended.block.blocked_at,
            expires_at: ended.block.expires_at,
            event_id: ended.block.event_id.clone().unwrap_or_default(),
            pending: false,
            writer: Some(shared.replica.clone()),
            origin: ended.block.origin,
            actor: ended.block.actor.clone(),
            expired: true,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // The result first, then the record that says it was written: a crash between
            // the two reports the expiry twice, never not at all; a result not written (the
            // partition moved on) leaves the record to the next owner, which reports it.
            if !finish(&shared, &Completion::own(claim, 1), result).await {
                return;
            }
            // The writes can take a while: a new block of the key decided meanwhile has its own
            // records, which this one must not follow (asked before every attempt).
            let unchanged = || {
                let state = shared.state.lock().expect("state");
                state.still_ended(&record.key, record.expires_at)
            };
            let payload = serde_json::to_string(&record).expect("records serialize");
            let topic = &shared.config.kafka.topics.state;
            let key = record.key.to_string();
            let stop = &shared.stopping;
            let written = report::write_while_current(
                &shared.producer,
                topic,
                &key,
                &payload,
                Some(claim.partition),
                stop,
                &unchanged,
            );
            if let Err(e @ WriteError::Refused(_)) = written.await {
                error!(error = %e, "an expired block's record was refused");
            }
        });
    }
    for (key, partition) in found.forgotten {
        if owned(shared, partition).is_none() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let topic = &shared.config.kafka.topics.state;
            let stop = &shared.stopping;
            let still_forgotten = || {
                owned(&shared, partition).is_some()
                    && !shared.state.lock().expect("state").knows(&key)
            };
            let key = key.to_string();
            let written = report::write_tombstone(
                &shared.producer,
                topic,
                &key,
                partition,
                stop,
                &still_forgotten,
            );
            if let Err(e @ WriteError::Refused(_)) = written.await {
                error!(error = %e, "a tombstone was refused");
            }
        });
    }
    for (site, ip, partition) in found.exemptions_ended {
        let Some(claim) = owned(shared, partition) else {
            continue;
        };
        let mut command = Command::new(crate::command::Action::Unexempt);
        command.site = Some(site.clone());
        command.ip = Some(ip);
        let mut result = ResultMessage::for_command(
            &command,
            Outcome::Released,
            Code::ExemptionEnded,
            format!("the exemption of {ip} at site {site} ended"),
        );
        result.origin = Origin::Expiry;
        result.event_ids.clear();
        let shared = shared.clone();
        tokio::spawn(async move {
            let topic = &shared.config.kafka.topics.state;
            let key = super::dedupe::exemption_key(&site, ip);
            let stop = &shared.stopping;
            // Not over a new exemption of the address made meanwhile.
            let still_ended = || {
                let state = shared.state.lock().expect("state");
                state.exemption(&site, ip, Utc::now()).is_none()
            };
            let tombstone = report::write_tombstone(
                &shared.producer,
                topic,
                &key,
                partition,
                stop,
                &still_ended,
            );
            match tombstone.await {
                Ok(Some(_)) => {
                    finish(&shared, &Completion::own(claim, 1), result).await;
                }
                Ok(None) | Err(WriteError::Stopping) => {} // a new exemption began meanwhile
                Err(e) => error!(error = %e, "an exemption's tombstone was refused"),
            }
        });
    }
}

/// The current claim on `partition`, if it is ours and consumed.
fn owned(shared: &Shared, partition: i32) -> Option<Claim> {
    shared
        .ownership
        .claim(partition)
        .filter(|_| shared.ownership.ready(partition))
}

/// Schema id of reconcile reports (on the results topic, key `reconcile/<target>`).
pub const RECONCILE_SCHEMA: &str = "samgate.reconcile.v1";

/// One replica's reconcile of one target: what it compared and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub schema: String,
    pub target: String,
    pub replica: String,
    /// The partitions (of this replica) whose blocks were compared.
    pub partitions: Vec<i32>,
    /// The `reconcile` commands this run answers (empty for the periodic loop).
    pub command_ids: Vec<String>,
    pub gateways: Vec<String>,
    /// Active blocks compared.
    pub blocks: usize,
    /// Gateway rules missing (a block and a gateway each), re-asserted.
    pub missing: usize,
    /// Rules with samgate's tag that no block explains.
    pub orphaned: usize,
    /// Orphans being removed (`reconcile.remove_orphans`).
    pub removing: usize,
    /// Gateways whose listing could not be read (nothing is repaired there).
    pub errors: Vec<String>,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub finished_at: DateTime<Utc>,
}

/// A `reconcile` command waiting for its answer.
pub struct Pending {
    pub command: Command,
    pub completion: Arc<Completion>,
}

/// The reconcile loop's inbox.
pub type Requests = mpsc::UnboundedSender<Pending>;

/// Hands a `reconcile` command to the loop (or answers at once when there is no loop).
pub fn request_reconcile(
    requests: &Requests,
    command: Command,
    completion: Arc<Completion>,
    shared: &Arc<Shared>,
) {
    if let Err(mpsc::error::SendError(pending)) = requests.send(Pending {
        command,
        completion,
    }) {
        warn!("the reconcile loop is gone; a reconcile command is not answered");
        pending.completion.done(shared);
    }
}

/// Reconciles every `reconcile.interval` (jittered), and on demand: requests that arrive within
/// a second of each other make one run (every owner hears one command per partition it owns).
pub async fn run(
    shared: Arc<Shared>,
    policy: Policy,
    permits: Arc<Semaphore>,
    batchers: BTreeMap<String, Arc<Batcher>>,
    queues: BTreeMap<String, mpsc::WeakSender<Work>>,
    mut requests: mpsc::UnboundedReceiver<Pending>,
) {
    let interval = shared.config.reconcile.interval;
    let next = |from: tokio::time::Instant| -> Option<tokio::time::Instant> {
        (!interval.is_zero()).then(|| from + interval.mul_f64(rand::rng().random_range(0.9..1.1)))
    };
    let mut due = next(tokio::time::Instant::now());
    loop {
        let mut answering = Vec::new();
        tokio::select! {
            _ = shared.stopping.cancelled() => break,
            _ = super::sleep_until_some(due) => {}
            request = requests.recv() => match request {
                Some(p) => answering.push(p),
                None => break,
            },
        }
        if !answering.is_empty() {
            // The other partitions' commands arrive at about the same time: one run for all.
            tokio::time::sleep(Duration::from_secs(1)).await;
            while let Ok(p) = requests.try_recv() {
                answering.push(p);
            }
        }
        let only: HashSet<String> = answering
            .iter()
            .filter_map(|p| p.command.target.clone())
            .collect();
        let all = answering.is_empty() || answering.iter().any(|p| p.command.target.is_none());
        for (name, batcher) in &batchers {
            if !all && !only.contains(name) {
                continue;
            }
            let Some(queue) = queues.get(name).and_then(mpsc::WeakSender::upgrade) else {
                continue;
            };
            let ids = answering.iter().map(|p| p.command.id.clone()).collect();
            let partitions = answering
                .iter()
                .map(|p| p.completion.claim.partition)
                .collect();
            let to = Repairs {
                queue: &queue,
                policy: &policy,
                permits: &permits,
            };
            reconcile_target(&shared, batcher, to, ids, partitions).await;
        }
        for p in answering {
            p.completion.done(&shared);
        }
        if due.is_some_and(|d| d <= tokio::time::Instant::now()) || due.is_none() {
            due = next(tokio::time::Instant::now());
        }
    }
}

/// Where reconcile's repairs go: the target's batcher, under the policy's safety checks, each
/// holding one of the pipeline's in-flight permits (so repairs never crowd out the events).
struct Repairs<'a> {
    queue: &'a mpsc::Sender<Work>,
    policy: &'a Policy,
    permits: &'a Arc<Semaphore>,
}

/// One target: list its gateways, compare with the active blocks of the partitions we own,
/// re-assert what is missing, report (and, if configured, remove) orphans, then write the
/// report.
async fn reconcile_target(
    shared: &Arc<Shared>,
    batcher: &Batcher,
    to: Repairs<'_>,
    command_ids: Vec<String>,
    mut partitions: Vec<i32>,
) {
    let queue = to.queue;
    let dry_run = shared.config.run.dry_run;
    let mut deferred = 0usize;
    let target = batcher.target.clone();
    let started_at = Utc::now();
    // What the gateways must hold, taken *before* they are listed: a block confirmed later may
    // have been sent after the listing.
    let active: Vec<Ended> = shared
        .state
        .lock()
        .expect("state")
        .active_at(&target.name, started_at + REASSERT_MARGIN)
        .into_iter()
        .filter(|b| owned(shared, b.partition).is_some())
        .collect();
    let (expected, protected) = unprotected(to.policy, active);
    if protected > 0 {
        warn!(
            target = target.name,
            blocks = protected,
            "reconcile: blocks of addresses protected since they were made (never-block, not \
             blockable) are not expected at the gateways, nor re-asserted; they run out there"
        );
    }
    let listing = batcher.list_gateways().await;
    let (listings, mut errors) = match listing {
        Ok(found) => found,
        Err(e) => {
            warn!(target = target.name, error = %e, "reconcile: cannot list the gateways");
            shared
                .metrics
                .reconciles
                .with_label_values(&[&target.name, "failed"])
                .inc();
            let errors = vec![crate::secret::scrub(&e.to_string())];
            let report = ReconcileReport {
                schema: RECONCILE_SCHEMA.into(),
                target: target.name.clone(),
                replica: shared.replica.clone(),
                partitions,
                command_ids,
                gateways: target.gateways.clone(),
                blocks: expected.len(),
                missing: 0,
                orphaned: 0,
                removing: 0,
                errors,
                started_at,
                finished_at: Utc::now(),
            };
            return write_report(shared, &report).await;
        }
    };
    let now = Utc::now();
    let drift = {
        let state = shared.state.lock().expect("state");
        let events_partitions = shared.events_partitions;
        compare(&target, &expected, &listings, |key, ip| {
            let partition =
                crate::kafka::partition_for(&crate::event::event_key(ip), events_partitions);
            !state.tracks(key, now) && owned(shared, partition).is_some()
        })
    };
    errors.extend(drift.unjudged.iter().map(|(gateway, blocks)| {
        format!("{gateway}: its IPv6 rules could not be listed; {blocks} IPv6 block(s) not checked")
    }));
    let missing: usize = drift.missing.iter().map(|(_, gws)| gws.len()).sum();
    let metrics = &shared.metrics;
    metrics
        .drift_rules
        .with_label_values(&[&target.name, "missing"])
        .set(missing as i64);
    metrics
        .drift_rules
        .with_label_values(&[&target.name, "orphaned"])
        .set(drift.orphans.len() as i64);
    if missing > 0 || !drift.orphans.is_empty() {
        warn!(
            target = target.name,
            missing,
            orphaned = drift.orphans.len(),
            "reconcile: the gateways are out of step with samgate's blocks"
        );
    }
    for (block, gateways) in &drift.missing {
        let Some(claim) = owned(shared, block.partition) else {
            continue;
        };
        if dry_run {
            continue; // dry run: counted and reported, never sent
        }
        if shared.state.lock().expect("state").reasserting(&block.key) {
            continue; // counted as missing; its repair is on its way already
        }
        // Safety last, for a re-assert too: the address may have become protected since.
        let (site, ip) = (&block.subject.site, block.subject.ip);
        if let Some(net) = to.policy.never_block(site, ip) {
            warn!(target = target.name, %ip, %net, "reconcile: not re-asserting a block of an address now in a never-block network");
            continue;
        }
        if let Some((_, why)) = to.policy.not_blockable(ip) {
            warn!(target = target.name, %ip, why, "reconcile: not re-asserting a block of an address no rule may name");
            continue;
        }
        let Ok(permit) = to.permits.clone().try_acquire_owned() else {
            deferred += 1;
            continue;
        };
        let remaining = (block.block.expires_at - now).to_std().unwrap_or_default();
        let enforce = Enforce {
            target: target.clone(),
            key: block.key,
            rule: target.rule(block.subject.ip, remaining, block.key),
            level: block.block.level,
            duration: remaining,
            verify_first: Some(block.block.clone()),
            origin: Origin::Reconcile,
            mac: None,
        };
        let mut result = ResultMessage::for_block(
            &block.subject,
            &target,
            block.key,
            Origin::Reconcile,
            Outcome::Blocked,
            Code::Reasserted,
            String::new(),
        );
        result.enforce_fields(&enforce);
        result.event_ids.extend(block.block.event_id.clone());
        let present: Vec<String> = target
            .gateways
            .iter()
            .filter(|g| !gateways.contains(g))
            .cloned()
            .collect();
        let mut work = Work::new(Completion::own_holding(claim, 1, permit), enforce, result);
        work.progress = Progress::missing_from(&target.gateways, &present);
        // The block's active record stands (a crash mid-send is repaired by the next
        // reconcile, which lists the gateways again): no write-ahead.
        work.pending_written = true;
        shared
            .state
            .lock()
            .expect("state")
            .set_reasserting(&block.key, true);
        metrics
            .reconcile_repairs
            .with_label_values(&[&target.name])
            .inc();
        if queue.send(work).await.is_err() {
            return;
        }
    }
    let mut removing = 0;
    for orphan in &drift.orphans {
        let partition = crate::kafka::partition_for(
            &crate::event::event_key(orphan.ip),
            shared.events_partitions,
        );
        let Some(claim) = owned(shared, partition) else {
            continue;
        };
        partitions.push(partition);
        let subject = super::dedupe::Subject {
            site: String::new(),
            ip: orphan.ip,
            target: target.name.clone(),
        };
        let reason = format!(
            "{} holds a rule with samgate's tag for {} that no block explains{}",
            orphan.gateways.join(", "),
            orphan.ip,
            if shared.config.reconcile.remove_orphans {
                "; removing it (reconcile.remove_orphans)"
            } else {
                "; left in place (reconcile.remove_orphans = false)"
            }
        );
        let result = ResultMessage::for_block(
            &subject,
            &target,
            orphan.key,
            Origin::Reconcile,
            Outcome::Orphaned,
            Code::Orphaned,
            reason,
        );
        finish(shared, &Completion::own(claim, 1), result.clone()).await;
        if shared.config.reconcile.remove_orphans && !dry_run {
            let Ok(permit) = to.permits.clone().try_acquire_owned() else {
                deferred += 1;
                continue;
            };
            removing += 1;
            let enforce = Enforce {
                target: target.clone(),
                key: orphan.key,
                rule: target.rule(orphan.ip, Duration::ZERO, orphan.key),
                level: 0,
                duration: Duration::ZERO,
                verify_first: None,
                origin: Origin::Reconcile,
                mac: None,
            };
            let mut result = result;
            result.outcome = Outcome::Unblocked;
            result.code = Code::OrphanRemoved;
            let work = Work::removal(Completion::own_holding(claim, 1, permit), enforce, result);
            metrics
                .reconcile_repairs
                .with_label_values(&[&target.name])
                .inc();
            if queue.send(work).await.is_err() {
                return;
            }
        }
    }
    if deferred > 0 {
        warn!(
            target = target.name,
            deferred, "reconcile: the pipeline is busy; these repairs wait for the next reconcile"
        );
    }
    metrics
        .reconciles
        .with_label_values(&[
            target.name.as_str(),
            if errors.is_empty() { "ok" } else { "failed" },
        ])
        .inc();
    partitions.sort_unstable();
    partitions.dedup();
    let report = ReconcileReport {
        schema: RECONCILE_SCHEMA.into(),
        target: target.name.clone(),
        replica: shared.replica.clone(),
        partitions,
        command_ids,
        gateways: target.gateways.clone(),
        blocks: expected.len(),
        missing,
        orphaned: drift.orphans.len(),
        removing,
        errors,
        started_at,
        finished_at: Utc::now(),
    };
    info!(
        target = report.target,
        blocks = report.blocks,
        missing = report.missing,
        orphaned = report.orphaned,
        "reconciled"
    );
    write_report(shared, &report).await;
}

async fn write_report(shared: &Shared, report: &ReconcileReport) {
    let payload = serde_json::to_string(report).expect("reports serialize");
    let topic = &shared.config.kafka.topics.results;
    let key = format!("reconcile/{}", report.target);
    let written = report::write(
        &shared.producer,
        topic,
        &key,
        &payload,
        None,
        &shared.stopping,
    );
    if let Err(e @ WriteError::Refused(_)) = written.await {
        error!(error = %e, "a reconcile report was refused");
    }
}

/// A rule with samgate's tag that no block explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub key: RuleKey,
    pub ip: IpAddr,
    pub gateways: Vec<String>,
}

/// The blocks whose addresses are still blockable, and how many are not: an address protected
/// since its block was made (a never-block network or an address no rule may name, added to
/// the configuration) is not expected at the gateways. Re-asserting it would break the
/// protection; counting it missing would raise drift until it runs out.
fn unprotected(policy: &Policy, blocks: Vec<Ended>) -> (Vec<Ended>, usize) {
    let all = blocks.len();
    let kept: Vec<Ended> = blocks
        .into_iter()
        .filter(|b| !policy.protects(&b.subject.site, b.subject.ip))
        .collect();
    let protected = all - kept.len();
    (kept, protected)
}

/// What reconcile found at one target.
#[derive(Debug, Default)]
pub struct Drift<'a> {
    /// Active blocks and the gateways that lost their rule.
    pub missing: Vec<(&'a Ended, Vec<String>)>,
    pub orphans: Vec<Orphan>,
    /// Per gateway, the blocks its listing could not tell about (IPv6 rules where only IPv4
    /// could be listed).
    pub unjudged: BTreeMap<String, usize>,
}

/// Compares the blocks a target's gateways must hold with what they list (pure). A gateway
/// without a listing is left out (nothing is concluded from it). `unexplained(key, ip)` says
/// whether a tagged rule is ours to call an orphan: no block tracks its key and its address's
/// partition is ours. Orphans are found only in `fw samp` listings (the only ones with tags).
pub fn compare<'a>(
    target: &Target,
    expected: &'a [Ended],
    listings: &BTreeMap<String, Listing>,
    unexplained: impl Fn(&RuleKey, IpAddr) -> bool,
) -> Drift<'a> {
    let mut drift = Drift::default();
    for block in expected {
        let rule = target.rule(block.subject.ip, Duration::from_secs(1), block.key);
        let mut lost = Vec::new();
        for (gateway, listing) in listings {
            match listing.holds(&rule) {
                Some(true) => {}
                Some(false) => lost.push(gateway.clone()),
                None => *drift.unjudged.entry(gateway.clone()).or_default() += 1,
            }
        }
        if !lost.is_empty() {
            drift.missing.push((block, lost));
        }
    }
    let mut orphans: BTreeMap<RuleKey, Orphan> = BTreeMap::new();
    for (gateway, listing) in listings {
        for (key, ip) in listing.tagged() {
            let Some(ip) = ip else { continue };
            if expected.iter().any(|b| b.key == *key) || !unexplained(key, *ip) {
                continue;
            }
            orphans
                .entry(*key)
                .or_insert_with(|| Orphan {
                    key: *key,
                    ip: *ip,
                    gateways: Vec::new(),
                })
                .gateways
                .push(gateway.clone());
        }
    }
    drift.orphans = orphans.into_values().collect();
    drift
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::enforcer::parse_listing;
    use crate::checkpoint::sam::{self, SamMode};
    use crate::config::Config;
    use crate::pipeline::dedupe::{Subject, TrackedBlock};

    /// Site `s` routes to target `edge` (gw-1, gw-2, `mode`) on server hq; `site` is added to
    /// the site's section.
    fn config(mode: &str, site: &str) -> Config {
        Config::from_toml(&format!(
            r#"
            [checkpoint.servers.hq]
            url = "https://192.0.2.250"
            api_key = "k"
            [targets.edge]
            server = "hq"
            gateways = ["gw-1", "gw-2"]
            mode = "{mode}"
            [sites.s]
            targets = ["edge"]
            {site}
            "#
        ))
        .unwrap()
        .validate()
        .unwrap()
    }

    fn target(mode: &str) -> Target {
        Policy::new(&config(mode, ""), &[])
            .target("edge")
            .unwrap()
            .clone()
    }

    fn ended(t: &Target, ip: &str) -> Ended {
        let ip: IpAddr = ip.parse().unwrap();
        let now = Utc::now();
        Ended {
            key: super::super::policy::idempotency_key(t, ip),
            partition: 0,
            subject: Subject {
                site: "s".into(),
                ip,
                target: t.name.clone(),
            },
            block: TrackedBlock {
                level: 0,
                blocked_at: now,
                expires_at: now + chrono::Duration::hours(1),
                event_id: None,
                origin: Origin::Automatic,
                actor: None,
            },
        }
    }

    #[test]
    fn blocks_of_addresses_protected_since_are_not_expected() {
        let t = target("fw_sam");
        let mut config = config("fw_sam", "never_block = [\"203.0.113.0/24\"]");
        config.policy.never_block = vec!["198.51.100.0/28".parse().unwrap()];
        let policy = Policy::new(&config, &[("hq".into(), "192.0.2.250".parse().unwrap())]);
        let blocks = [
            "198.51.100.1",
            "198.51.100.77",
            "203.0.113.9",
            "192.0.2.250",
        ]
        .map(|ip| ended(&t, ip))
        .to_vec();
        let (kept, protected) = unprotected(&policy, blocks);
        let kept: Vec<String> = kept.iter().map(|b| b.subject.ip.to_string()).collect();
        assert_eq!(kept, vec!["198.51.100.77"]);
        assert_eq!(
            protected, 3,
            "global, the site's, and a management server's address"
        );
    }

    #[test]
    fn samp_drift_finds_lost_rules_per_gateway_and_orphans_it_owns() {
        let t = target("fw_samp");
        let kept = ended(&t, "198.51.100.1");
        let lost = ended(&t, "198.51.100.2");
        let expected = vec![kept.clone(), lost.clone()];
        let orphan_ip: IpAddr = "198.51.100.3".parse().unwrap();
        let orphan = super::super::policy::idempotency_key(&t, orphan_ip);
        let foreign_ip: IpAddr = "198.51.100.4".parse().unwrap();
        let foreign = super::super::policy::idempotency_key(&t, foreign_ip);
        let listings = BTreeMap::from([
            (
                "gw-1".to_string(),
                Listing::Samp(vec![
                    (kept.key, Some(kept.subject.ip)),
                    (lost.key, Some(lost.subject.ip)),
                    (orphan, Some(orphan_ip)),
                    (foreign, Some(foreign_ip)),
                ]),
            ),
            (
                "gw-2".to_string(),
                Listing::Samp(vec![(kept.key, Some(kept.subject.ip))]),
            ),
        ]);
        // The foreign key's address belongs to another replica's partition.
        let drift = compare(&t, &expected, &listings, |_, ip| ip != foreign_ip);
        assert_eq!(drift.missing.len(), 1);
        assert_eq!(drift.missing[0].0.key, lost.key);
        assert_eq!(drift.missing[0].1, vec!["gw-2".to_string()]);
        assert_eq!(
            drift.orphans,
            vec![Orphan {
                key: orphan,
                ip: orphan_ip,
                gateways: vec!["gw-1".into()]
            }]
        );
        // A gateway without a listing concludes nothing.
        let only_one = BTreeMap::from([("gw-1".to_string(), listings["gw-1"].clone())]);
        assert!(compare(&t, &expected, &only_one, |_, _| false)
            .missing
            .is_empty());
    }

    #[test]
    fn sam_drift_matches_the_monitor_lines_and_finds_no_orphans() {
        let t = target("fw_sam");
        let kept = ended(&t, "198.51.100.1");
        let lost = ended(&t, "198.51.100.2");
        let expected = vec![kept.clone(), lost.clone()];
        let line = |ip: &str| sam::SamMonitorEntry {
            kind: "src".into(),
            actions: "drop|close|long_noalert".into(),
            expires: None,
            addresses: vec![ip.into()],
        };
        let listings = BTreeMap::from([
            (
                "gw-1".to_string(),
                Listing::Sam(vec![line("198.51.100.1"), line("198.51.100.9")]),
            ),
            (
                "gw-2".to_string(),
                Listing::Sam(vec![line("198.51.100.1"), line("198.51.100.2")]),
            ),
        ]);
        let drift = compare(&t, &expected, &listings, |_, _| true);
        assert_eq!(drift.missing.len(), 1);
        assert_eq!(drift.missing[0].1, vec!["gw-1".to_string()]);
        assert!(drift.orphans.is_empty(), "fw sam -M lines carry no tag");
    }

    #[test]
    fn a_fortigate_that_lost_its_bans_has_them_missing_and_no_orphans() {
        let config = Config::from_toml(
            r#"
            [fortigate.devices.fg]
            url = "https://192.0.2.251"
            token = "t"
            [targets.branch]
            kind = "fortigate"
            device = "fg"
            [sites.s]
            targets = ["branch"]
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        let t = Policy::new(&config, &[]).target("branch").unwrap().clone();
        assert_eq!(t.gateways, vec!["fg".to_string()]);
        let kept = ended(&t, "198.51.100.1");
        let lost = ended(&t, "2001:db8::2");
        let expected = vec![kept.clone(), lost.clone()];
        // After a reboot, the list holds one of them and a ban someone else made.
        let listings = BTreeMap::from([(
            "fg".to_string(),
            Listing::Banned(vec![
                "198.51.100.1".parse().unwrap(),
                "203.0.113.9".parse().unwrap(),
            ]),
        )]);
        let drift = compare(&t, &expected, &listings, |_, _| true);
        assert_eq!(drift.missing.len(), 1);
        assert_eq!(drift.missing[0].0.key, lost.key);
        assert_eq!(drift.missing[0].1, vec!["fg".to_string()]);
        assert!(drift.orphans.is_empty(), "bans carry no tag");
    }

    #[test]
    fn a_listing_is_only_believed_whole() {
        let ok = "operation=add uid=<5ac3965f,00000000,3403a8c0,0000264a> comment=samgate:00112233445566778899aabbccddeeff src_ip_addr=192.0.2.1 req_tpe=ip\nsamgate-rule 0 0\nsamgate-rule 1 0\n";
        let Ok(Listing::Samp(keys)) = parse_listing(SamMode::FwSamp, ok) else {
            panic!("a whole listing parses");
        };
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].1, Some("192.0.2.1".parse().unwrap()));
        let table = [
            ("samgate-rule 0 0\n", "the IPv6 listing was cut"),
            (
                "samgate-rule 0 1\nsamgate-rule 1 0\n",
                "the IPv4 listing failed with exit status 1",
            ),
            (
                "samgate-rule 0 0\nSAM policy is empty\nsamgate-rule 1 0\n",
                "the listing has a line samgate cannot read: \"SAM policy is empty\"",
            ),
        ];
        for (output, why) in table {
            assert_eq!(parse_listing(SamMode::FwSamp, output), Err(why.into()));
        }
    }

    #[test]
    fn a_gateway_without_ipv6_is_reconciled_for_its_ipv4_rules() {
        let t = target("fw_samp");
        let v4 = ended(&t, "198.51.100.1");
        let orphan_ip: IpAddr = "198.51.100.3".parse().unwrap();
        let orphan = super::super::policy::idempotency_key(&t, orphan_ip);
        let (lost_v4, v6) = (ended(&t, "198.51.100.2"), ended(&t, "2001:db8::1"));
        let expected = vec![v4.clone(), lost_v4.clone(), v6.clone()];
        // `fw6 samp get` fails where IPv6 is turned off; the IPv4 listing still counts.
        let output = format!(
            "operation=add uid=<5ac3965f,00000000,3403a8c0,0000264a> comment=samgate:{} src_ip_addr=198.51.100.1\n\
             operation=add uid=<5ac3965f,00000000,3403a8c0,0000264b> comment=samgate:{orphan} src_ip_addr=198.51.100.3\n\
             samgate-rule 0 0\nsamgate-rule 1 1\n",
            v4.key
        );
        let listing = parse_listing(SamMode::FwSamp, &output).unwrap();
        assert!(matches!(listing, Listing::Ipv4Only(_)), "{listing:?}");
        let listings = BTreeMap::from([("gw-1".to_string(), listing)]);
        let drift = compare(&t, &expected, &listings, |_, _| true);
        let missing: Vec<_> = drift.missing.iter().map(|(b, _)| b.key).collect();
        assert_eq!(missing, vec![lost_v4.key], "the IPv4 rules are judged");
        assert_eq!(drift.orphans.len(), 1, "and its tagged rules read");
        assert_eq!(
            drift.unjudged,
            BTreeMap::from([("gw-1".to_string(), 1)]),
            "the IPv6 block is neither held nor lost"
        );
    }
}
