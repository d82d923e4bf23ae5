//! Batch and enforce, the I/O shell around `pipeline::rule`: per target, rules are gathered
//! until `run.batch_max_rules` or `run.batch_max_delay`, then each batch takes one of its
//! server's slots and goes out as few [`Enforcer`] calls as its rules' next steps allow (one
//! per step and gateway set: usually one *send* to every gateway of the target: one Check Point
//! `run-script`, or one FortiGate `add_users`). What the firewall answered moves each rule's
//! [`Progress`]; a rule that is not done comes back after the delay [`retry_action`] gives,
//! until it is done or fails.
//!
//! Per server (a Check Point management server, a FortiGate device), a semaphore caps
//! concurrent batches and a governor rate limiter paces enforcer calls. Before a rule is first
//! sent, its *pending* state record is written (write-ahead), and the send holds a
//! [`SendGuard`](super::ownership::SendGuard) that a revoke of its partition waits for; work of
//! a revoked partition is dropped before it reaches the firewall.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::adaptive::{Answer, Bounds, Call, Controller, Limits};
use super::decide::{Code, Enforce};
use super::dedupe::{BlockRecord, Origin, Subject, TrackedBlock, STATE_SCHEMA};
use super::policy::Target;
use super::report::{self, ResultMessage, Settled, WriteError};
use super::rule::{self, retry_action, Next, Progress, RetryPolicy, Step};
use super::{Completion, Shared};
use crate::checkpoint::ErrorClass;
use crate::enforcer::{BackendError, Enforcer, Failed, Handle, Listings, Removal};
use crate::event::{DeadLetter, DeadLetterStage};
use crate::metrics::Metrics;

/// Courtesy towards one server (a management server, a FortiGate): concurrent batches (its
/// slots), rules per batch and enforcer calls per second. With `run.adaptive` the slots and
/// the batch size follow the server's answers ([`adaptive`](super::adaptive)); otherwise they
/// stay at `run.server_concurrency` and `run.batch_max_rules`.
pub struct ServerLimits {
    server: String,
    slots: Arc<Semaphore>,
    calls: DefaultDirectRateLimiter,
    control: std::sync::Mutex<Control>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The adaptive part of a server's limits.
struct Control {
    /// None: fixed limits.
    controller: Option<Controller>,
    limits: Limits,
    began: Instant,
    /// A batch waited for a slot, or went out full, since the last call.
    busy: bool,
    /// Slots to take out of circulation as batches give them back (a cut below the slots in
    /// use).
    debt: usize,
}

/// A server slot held by a batch (or a reconcile listing); given back when dropped, unless a
/// cut of the concurrency takes it.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limits: Arc<ServerLimits>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut control = self.limits.control.lock().expect("limits");
        if let Some(permit) = self.permit.take() {
            match control.debt {
                0 => drop(permit),
                _ => {
                    permit.forget();
                    control.debt -= 1;
                }
            }
        }
    }
}

impl ServerLimits {
    pub fn new(server: &str, run: &crate::config::RunConfig, metrics: Arc<Metrics>) -> Self {
        let rate = NonZeroU32::new(run.server_calls_per_second.max(1)).expect("positive");
        let bounds = Bounds {
            max_concurrency: run.server_concurrency.max(1),
            min_batch: (run.batch_max_rules / 20).max(1),
            max_batch: run.batch_max_rules.max(1),
        };
        let controller = run
            .adaptive
            .then(|| Controller::new(bounds, INITIAL_CONCURRENCY));
        let limits = match &controller {
            Some(c) => c.limits(),
            None => Limits {
                concurrency: bounds.max_concurrency,
                batch: bounds.max_batch,
            },
        };
        let this = Self {
            server: server.to_owned(),
            slots: Arc::new(Semaphore::new(limits.concurrency)),
            calls: RateLimiter::direct(Quota::per_second(rate)),
            control: std::sync::Mutex::new(Control {
                controller,
                limits,
                began: Instant::now(),
                busy: false,
                debt: 0,
            }),
            metrics,
        };
        this.show(limits);
        this
    }

    /// Waits for one of the server's slots.
    pub async fn slot(self: &Arc<Self>) -> Slot {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.control.lock().expect("limits").busy = true;
                self.slots.clone().acquire_owned().await.expect("open")
            }
        };
        Slot {
            permit: Some(permit),
            limits: self.clone(),
        }
    }

    /// The most rules a batch may carry now.
    pub fn batch(&self) -> usize {
        self.control.lock().expect("limits").limits.batch
    }

    /// A batch went out full: there was more to send than room.
    fn full(&self) {
        self.control.lock().expect("limits").busy = true;
    }

    /// An enforcer call of `rules` took `took` and answered `answer`: the limits follow.
    fn observe(&self, rules: usize, took: Duration, answer: Answer) {
        let mut guard = self.control.lock().expect("limits");
        let control = &mut *guard;
        // A call that says nothing about load leaves "busy" for the next one that does.
        let busy = match answer {
            Answer::Other => control.busy,
            _ => std::mem::take(&mut control.busy),
        };
        let at = control.began.elapsed();
        let Some(controller) = control.controller.as_mut() else {
            return;
        };
        let call = Call {
            rules,
            took,
            answer,
            busy,
        };
        let (before, after) = (control.limits, controller.observe(at, call));
        control.limits = after;
        if after.concurrency > before.concurrency {
            let more = after.concurrency - before.concurrency;
            let repaid = more.min(control.debt);
            control.debt -= repaid;
            self.slots.add_permits(more - repaid);
        } else if after.concurrency < before.concurrency {
            let fewer = before.concurrency - after.concurrency;
            control.debt += fewer - self.slots.forget_permits(fewer);
        }
        drop(guard);
        if after != before {
            self.show(after);
        }
    }

    fn show(&self, limits: Limits) {
        let m = &self.metrics;
        m.server_concurrency
            .with_label_values(&[&self.server])
            .set(limits.concurrency as i64);
        m.server_batch_rules
            .with_label_values(&[&self.server])
            .set(limits.batch as i64);
    }
}

/// Batches a server may have at once before its answers say more (or fewer).
pub const INITIAL_CONCURRENCY: usize = 2;

/// Which enforcer call a batch made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Block,
    Verify,
    Unblock,
}

/// What a call's outcome says about its server's load.
fn answer_of<T>(result: &Result<T, Failed>) -> Answer {
    match result {
        Ok(_) => Answer::Healthy,
        Err(failed) => match failed.error.class() {
            ErrorClass::Retryable | ErrorClass::RateLimited(_) => Answer::Overloaded,
            ErrorClass::Auth | ErrorClass::Permanent => Answer::Other,
        },
    }
}

/// One rule on its way to a target, with the event it answers.
pub struct Work {
    pub completion: Arc<Completion>,
    pub enforce: Enforce,
    /// The result, filled in with everything known at decision time.
    pub result: ResultMessage,
    pub progress: Progress,
    pub first_try: Instant,
    pub next_try: Instant,
    /// The pending state record is written (the rule may be sent).
    pub pending_written: bool,
    /// When this replica first sent the rule (its timeout counts from about then).
    pub first_sent: Option<DateTime<Utc>>,
    /// What went wrong in the last round, if anything (decides the retry delay).
    trouble: Option<ErrorClass>,
    /// A removal: what each gateway's last answer named the rule by (`fw samp` uids).
    handles: std::collections::HashMap<String, Vec<Handle>>,
}

impl Work {
    pub fn new(completion: Arc<Completion>, enforce: Enforce, result: ResultMessage) -> Self {
        let progress = Progress::new(&enforce.target.gateways, enforce.verify_first.is_some());
        let now = Instant::now();
        Self {
            completion,
            enforce,
            result,
            progress,
            first_try: now,
            next_try: now,
            pending_written: false,
            first_sent: None,
            trouble: None,
            handles: Default::default(),
        }
    }

    /// A removal (an unblock) of `enforce.rule` from its target's gateways.
    pub fn removal(completion: Arc<Completion>, enforce: Enforce, result: ResultMessage) -> Self {
        let mut work = Self::new(completion, enforce, result);
        work.progress = Progress::removal(&work.enforce.target.gateways);
        work
    }

    /// Where the rule applies.
    pub fn subject(&self) -> Subject {
        Subject {
            site: self.result.site.clone(),
            ip: self.result.ip,
            target: self.enforce.target.name.clone(),
        }
    }

    /// The block this rule makes (or made): a previous owner's, or ours from its first send.
    fn block(&self) -> TrackedBlock {
        match (&self.enforce.verify_first, self.first_sent) {
            // Re-asserted by reconcile: the same block, until the same time.
            (Some(original), _) if self.enforce.origin == Origin::Reconcile => {
                return original.clone()
            }
            (Some(found), None) => return found.clone(),
            _ => {}
        }
        let from = self.first_sent.unwrap_or_else(Utc::now);
        TrackedBlock {
            level: self.enforce.level,
            blocked_at: from,
            expires_at: chrono::Duration::from_std(self.enforce.duration)
                .ok()
                .and_then(|d| from.checked_add_signed(d))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            event_id: self.result.event_ids.first().cloned(),
            origin: match self.enforce.origin {
                Origin::Manual => Origin::Manual,
                _ => Origin::Automatic,
            },
            actor: self.result.actor.clone(),
        }
    }

    fn record(&self, pending: bool, writer: &str) -> BlockRecord {
        let block = self.block();
        BlockRecord {
            schema: STATE_SCHEMA.into(),
            key: self.enforce.key,
            site: self.result.site.clone(),
            ip: self.result.ip,
            target: self.enforce.target.name.clone(),
            level: block.level,
            blocked_at: block.blocked_at,
            expires_at: block.expires_at,
            event_id: block.event_id.unwrap_or_default(),
            pending,
            writer: Some(writer.to_owned()),
            origin: block.origin,
            actor: block.actor,
            expired: false,
        }
    }
}

/// One target's batcher: its enforcer, its server's limits, the shared pipeline.
pub struct Batcher {
    pub target: Arc<Target>,
    pub enforcer: Arc<dyn Enforcer>,
    pub limits: Arc<ServerLimits>,
    pub shared: Arc<Shared>,
}

impl Batcher {
    /// Runs until the queue closes and no batch is running. Once the pipeline stops, rules that
    /// wait for a retry are let go (their events go back to the partition's next owner).
    pub async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<Work>) {
        let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Work>();
        let mut waiting: Vec<Work> = Vec::new();
        let mut running = JoinSet::new();
        let mut open = true;
        loop {
            if self.shared.stopping.is_cancelled() {
                for work in waiting.drain(..) {
                    abandon(&self.shared, work, "stopping");
                }
            }
            if !open && waiting.is_empty() && running.is_empty() {
                break;
            }
            let next_due = waiting.iter().map(|w| w.next_try).min();
            let mut batch = Vec::new();
            tokio::select! {
                work = queue.recv(), if open => match work {
                    Some(work) => batch.push(work),
                    None => open = false,
                },
                Some(work) = retry_rx.recv() => waiting.push(work),
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = sleep_until(next_due), if next_due.is_some() => {}
            }
            // Due retries join the batch up to its size; the rest stay due for the next one.
            let now = Instant::now();
            waiting = join_due(&mut batch, waiting, self.most(), |w| w.next_try <= now);
            if batch.is_empty() {
                continue;
            }
            if self.shared.stopping.is_cancelled() {
                for work in batch {
                    abandon(&self.shared, work, "stopping");
                }
                continue;
            }
            // Take a server slot first, then fill the batch: while the server is busy, rules
            // queue up, so batches grow with the load.
            let waited = Instant::now();
            let slot = self.limits.slot().await;
            self.stage("slot", waited);
            let filling = Instant::now();
            open &= self.fill(&mut batch, &mut queue).await;
            self.stage("fill", filling);
            running.spawn(self.clone().run_batch(batch, slot, retry_tx.clone()));
        }
    }

    /// An enforcer call of `rules` began at `since` and answered: its stage time, and what it
    /// tells the server's limits. Only block calls are timed against the limits' fit of call
    /// time on batch size: a verify or an unblock costs the gateway differently per rule (a
    /// listing per rule, a script per gateway), so its time would read as congestion; its
    /// back-pressure (rate limits, server errors, timeouts) counts all the same.
    fn called<T>(&self, call: CallKind, rules: usize, since: Instant, answer: &Result<T, Failed>) {
        self.stage("firewall", since);
        let answer = match (call, answer_of(answer)) {
            (CallKind::Verify | CallKind::Unblock, Answer::Healthy) => Answer::Other,
            (_, answer) => answer,
        };
        self.limits.observe(rules, since.elapsed(), answer);
    }

    /// Records how long a stage of a batch took (`samgate_batch_stage_seconds`).
    fn stage(&self, stage: &str, since: Instant) {
        self.shared
            .metrics
            .batch_stage
            .with_label_values(&[&self.target.server, stage])
            .observe(since.elapsed().as_secs_f64());
    }

    /// The most rules the next batch may carry: the adaptive size, within the enforcer's limit.
    fn most(&self) -> usize {
        let now = self.limits.batch();
        self.enforcer.max_batch().map_or(now, |m| m.min(now))
    }

    /// Adds queued rules until the batch is full or its first rule waited `batch_max_delay`.
    /// Returns false when the queue closed.
    async fn fill(&self, batch: &mut Vec<Work>, queue: &mut mpsc::Receiver<Work>) -> bool {
        let run = &self.shared.config.run;
        let flush_at = Instant::now() + run.batch_max_delay;
        let most = self.most();
        if batch.len() >= most {
            self.limits.full();
        }
        while batch.len() < most {
            tokio::select! {
                biased; // what is queued goes in even when the delay is already over
                work = queue.recv() => match work {
                    Some(work) => batch.push(work),
                    None => return false,
                },
                _ = tokio::time::sleep_until(flush_at) => break,
            }
            if batch.len() == most {
                self.limits.full();
            }
        }
        true
    }

    /// One batch: its rules' next steps as few run-scripts as possible, then each rule on.
    async fn run_batch(
        self: Arc<Self>,
        batch: Vec<Work>,
        slot: Slot,
        retry: mpsc::UnboundedSender<Work>,
    ) {
        let mut groups: BTreeMap<(bool, bool, Vec<String>), Vec<Work>> = BTreeMap::new();
        for mut work in batch {
            if !self.shared.ownership.is_current(work.completion.claim) {
                self.shared.metrics.fenced.inc();
                continue; // the partition moved on: its next owner answers the event
            }
            work.trouble = None;
            let removal = work.progress.is_removal();
            let reconciled = !removal && work.enforce.origin == Origin::Reconcile;
            let deadline = self.shared.config.run.retry_deadline;
            if removal && work.first_try.elapsed() < deadline && self.block_in_flight(&work) {
                // A block of this key is on its way: remove it once it landed, not before.
                work.next_try = Instant::now() + Duration::from_millis(500);
                if let Err(mpsc::error::SendError(work)) = retry.send(work) {
                    abandon(&self.shared, work, "its batcher stopped");
                }
                continue;
            }
            if removal
                && work.enforce.origin == Origin::Reconcile
                && self
                    .shared
                    .state
                    .lock()
                    .expect("state")
                    .tracks(&work.enforce.key, Utc::now())
            {
                // An orphan no more: a block of its key began since reconcile listed it (the
                // scanner that left it scans on). Removing it would take out that block.
                tracing::debug!(key = %work.enforce.key, "not removing a rule a new block now explains");
                continue;
            }
            if reconciled && !self.still_expected(&work) {
                // Unblocked, expired or replaced since reconcile listed it: nothing to repair.
                self.shared
                    .state
                    .lock()
                    .expect("state")
                    .set_reasserting(&work.enforce.key, false);
                continue;
            }
            if work.first_sent.is_none()
                && !removal
                && !reconciled
                && self
                    .shared
                    .state
                    .lock()
                    .expect("state")
                    .take_contested(&work.enforce.key)
            {
                // Another replica wrote a record for this key meanwhile (it may have sent the
                // rule): ask the gateways instead of sending.
                work.progress = Progress::new(&self.target.gateways, true);
            }
            let (send, gateways) = match work.progress.next() {
                Step::Verify(gateways) => (false, gateways),
                Step::Send(gateways) => (true, gateways),
                Step::Done => (false, Vec::new()),
            };
            groups
                .entry((removal, send, gateways))
                .or_default()
                .push(work);
        }
        let mut settled = Vec::new();
        for ((removal, send, gateways), works) in groups {
            settled.extend(match (send, gateways.is_empty()) {
                (_, true) => works,
                (true, false) if removal => self.remove(works, &gateways).await,
                (true, false) => self.send(works, &gateways).await,
                (false, false) => self.verify(works, &gateways).await,
            });
        }
        // The firewall's part is done: let the next batch use the server while Kafka answers.
        drop(slot);
        let reporting = Instant::now();
        let mut reports = JoinSet::new();
        for work in settled {
            let (shared, retry) = (self.shared.clone(), retry.clone());
            reports.spawn(async move { settle(&shared, work, &retry).await });
        }
        while let Some(joined) = reports.join_next().await {
            if let Err(e) = joined {
                error!(error = %e, "a reporting task failed; its event will be redelivered");
            }
        }
        self.stage("report", reporting);
    }

    /// Sends the rules to `gateways`: write-ahead records, the fence, one enforcer call.
    async fn send(&self, works: Vec<Work>, gateways: &[String]) -> Vec<Work> {
        let writing = Instant::now();
        let mut works = self.write_ahead(works).await;
        self.stage("write_ahead", writing);
        let guard = self.fence(&mut works);
        if works.is_empty() {
            return works;
        }
        self.shared.metrics.batch_rules.observe(works.len() as f64);
        let now = Utc::now();
        for work in &mut works {
            work.first_sent.get_or_insert(now);
        }
        let step = Step::Send(gateways.to_vec());
        self.limits.calls.until_ready().await;
        let rules: Vec<&Enforce> = works.iter().map(|w| &w.enforce).collect();
        let calling = Instant::now();
        let answer = self.enforcer.block(&rules, gateways).await;
        self.called(CallKind::Block, rules.len(), calling, &answer);
        drop(guard);
        match answer {
            Ok(answer) => {
                for (work, verdicts) in works.iter_mut().zip(answer.verdicts) {
                    work.result
                        .task_ids
                        .extend(answer.references.iter().cloned());
                    if verdicts.iter().any(|(_, v)| *v != rule::Sent::Confirmed) {
                        work.trouble = Some(ErrorClass::Retryable);
                    }
                    work.progress.after_send(&verdicts);
                }
            }
            Err(failed) => for_each_error(&mut works, &step, &failed),
        }
        works
    }

    /// The send guard a revoke waits for; the works of claims revoked meanwhile are dropped
    /// (their partition's next owner answers their events).
    fn fence(&self, works: &mut Vec<Work>) -> super::ownership::SendGuard<'_> {
        let claims: Vec<_> = works.iter().map(|w| w.completion.claim).collect();
        let (guard, current) = self.shared.ownership.begin_send(&claims);
        let stale = current.iter().filter(|c| !**c).count();
        self.shared.metrics.fenced.inc_by(stale as u64);
        let mut keep = current.into_iter();
        works.retain(|_| keep.next().unwrap_or(false));
        guard
    }

    /// Asks `gateways` whether each rule is in place.
    async fn verify(&self, mut works: Vec<Work>, gateways: &[String]) -> Vec<Work> {
        let step = Step::Verify(gateways.to_vec());
        self.limits.calls.until_ready().await;
        let rules: Vec<&Enforce> = works.iter().map(|w| &w.enforce).collect();
        let calling = Instant::now();
        let answer = self.enforcer.verify(&rules, gateways).await;
        self.called(CallKind::Verify, rules.len(), calling, &answer);
        match answer {
            Ok(verified) => {
                let found = verified
                    .verdicts
                    .iter()
                    .filter(|v| v.iter().all(|(_, p)| *p == rule::Presence::InPlace))
                    .count();
                info!(
                    target = self.target.name,
                    checked = works.len(),
                    in_place = found,
                    "asked the gateways about rules whose fate was unknown"
                );
                let mut handles = verified.handles.into_iter();
                for (work, verdicts) in works.iter_mut().zip(verified.verdicts) {
                    if verdicts
                        .iter()
                        .any(|(_, p)| matches!(p, rule::Presence::Unknown(_)))
                    {
                        work.trouble = Some(ErrorClass::Retryable);
                    }
                    work.progress.after_verify(&verdicts);
                    let found = handles.next().unwrap_or_default();
                    if work.progress.is_removal() {
                        work.handles.extend(found);
                        let listed = verdicts.iter().any(|(_, p)| *p == rule::Presence::InPlace);
                        if listed && work.progress.cancels > 0 {
                            // Cancelled and still there: back off, and fail at the deadline.
                            work.trouble = Some(ErrorClass::Retryable);
                        }
                    }
                }
            }
            Err(failed) => for_each_error(&mut works, &step, &failed),
        }
        works
    }

    /// Whether a re-assert's block is still the active block reconcile saw.
    fn still_expected(&self, work: &Work) -> bool {
        let Some(block) = &work.enforce.verify_first else {
            return false;
        };
        let state = self.shared.state.lock().expect("state");
        state.expects(&work.enforce.key, block.expires_at, Utc::now())
    }

    /// Whether a block of `work`'s key is being enforced right now, first sent or re-asserted
    /// by reconcile (an unblock waits for it: removed before it landed, it would stay).
    fn block_in_flight(&self, work: &Work) -> bool {
        let state = self.shared.state.lock().expect("state");
        state.block_in_flight(&work.enforce.key, Utc::now())
    }

    /// Removes the rules from `gateways`, where the last question found them (Check Point:
    /// `fw sam -C` with the rule's own flags, or `fw samp del` of the uids listed; FortiGate:
    /// `clear_users`). Whatever the firewall answers, the rule's next step is to ask again.
    async fn remove(&self, mut works: Vec<Work>, gateways: &[String]) -> Vec<Work> {
        let guard = self.fence(&mut works);
        if works.is_empty() {
            return works;
        }
        let step = Step::Send(gateways.to_vec());
        for _ in 0..self.enforcer.unblock_calls(gateways.len()) {
            self.limits.calls.until_ready().await;
        }
        let removals: Vec<Removal<'_>> = works
            .iter()
            .map(|w| Removal {
                enforce: &w.enforce,
                found: &w.handles,
            })
            .collect();
        let calling = Instant::now();
        let answer = self.enforcer.unblock(&removals, gateways).await;
        self.called(CallKind::Unblock, removals.len(), calling, &answer);
        drop(removals);
        drop(guard);
        match answer {
            Ok(answer) => {
                for (work, verdicts) in works.iter_mut().zip(answer.verdicts) {
                    work.result
                        .task_ids
                        .extend(answer.references.iter().cloned());
                    work.progress.after_send(&verdicts);
                }
            }
            Err(failed) => for_each_error(&mut works, &step, &failed),
        }
        for work in &mut works {
            work.handles.clear();
        }
        works
    }

    /// Lists the rules on every gateway of the target (reconcile), within the server's limits.
    pub async fn list_gateways(&self) -> Result<Listings, BackendError> {
        let _slot = self.limits.slot().await;
        self.limits.calls.until_ready().await;
        self.enforcer.list(&self.target.gateways).await
    }

    /// Writes the pending record of every rule not sent before; a rule whose record cannot be
    /// written is not sent.
    async fn write_ahead(&self, works: Vec<Work>) -> Vec<Work> {
        let mut writes = JoinSet::new();
        for (i, work) in works.iter().enumerate() {
            if work.pending_written {
                continue;
            }
            let (shared, record) = (self.shared.clone(), work.record(true, &self.shared.replica));
            let partition = work.completion.claim.partition;
            writes.spawn(async move {
                let payload = serde_json::to_string(&record).expect("state serializes");
                let topic = &shared.config.kafka.topics.state;
                let key = record.key.to_string();
                let written = report::write(
                    &shared.producer,
                    topic,
                    &key,
                    &payload,
                    Some(partition),
                    &shared.stopping,
                )
                .await;
                (i, written)
            });
        }
        // Written only when Kafka said so: a write that failed, or whose task died, is not.
        let mut written: Vec<bool> = works.iter().map(|w| w.pending_written).collect();
        let mut refused: Vec<Option<String>> = vec![None; works.len()];
        while let Some(joined) = writes.join_next().await {
            match joined {
                Ok((i, Ok(_))) => written[i] = true,
                Ok((i, Err(e))) => {
                    warn!(error = %e, "a pending state record was not written; its rule is not sent");
                    if matches!(e, WriteError::Refused(_)) {
                        refused[i] = Some(e.to_string());
                    }
                }
                Err(e) => error!(error = %e, "a state write failed"),
            }
        }
        let mut ready = Vec::new();
        for ((mut work, written), refused) in works.into_iter().zip(written).zip(refused) {
            match (written, refused) {
                (true, _) => {
                    work.pending_written = true;
                    ready.push(work);
                }
                // Refused for good (no retry mends it): answered `failed`, not left unanswered
                // (a redelivery would meet the same refusal, and its offset would hold back
                // the partition's commits).
                (false, Some(why)) if self.shared.ownership.is_current(work.completion.claim) => {
                    work.progress.last_problem =
                        Some(format!("its pending state record was refused: {why}"));
                    failed(&self.shared, work, Code::Permanent).await;
                }
                (false, _) => abandon(&self.shared, work, "its pending record was not written"),
            }
        }
        ready
    }
}

fn for_each_error(works: &mut [Work], step: &Step, failed: &Failed) {
    for work in works {
        work.progress.after_error(step, failed);
        work.trouble = Some(failed.error.class());
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// After a round: report a rule that is done, retry one that is not, or give up on it.
async fn settle(shared: &Arc<Shared>, mut work: Work, retry: &mpsc::UnboundedSender<Work>) {
    if work.progress.next() == Step::Done {
        return match work.progress.is_removal() {
            true => unblocked(shared, work).await,
            false => blocked(shared, work).await,
        };
    }
    if shared.stopping.is_cancelled() {
        return abandon(shared, work, "stopping");
    }
    let run = &shared.config.run;
    let policy = RetryPolicy {
        initial: run.retry_initial,
        max: run.retry_max,
        deadline: run.retry_deadline,
    };
    let next = match work.trouble {
        // Progress without trouble (the gateways said "absent"): send at once.
        None => Next::Retry(Duration::ZERO),
        Some(class) => retry_action(
            class,
            work.progress.attempts,
            work.first_try.elapsed(),
            &policy,
            rand::rng().random_range(0.75..1.25),
        ),
    };
    match next {
        Next::Retry(delay) => {
            if !delay.is_zero() {
                let problem = work.progress.last_problem.as_deref().unwrap_or("-");
                warn!(target = work.enforce.target.name, ip = %work.result.ip, attempts = work.progress.attempts, retry_in = ?delay, problem, "rule not confirmed yet; will try again");
            }
            work.next_try = Instant::now() + delay;
            if let Err(mpsc::error::SendError(work)) = retry.send(work) {
                abandon(shared, work, "its batcher stopped");
            }
        }
        Next::Fail(code) => failed(shared, work, code).await,
    }
}

/// The rule is on every gateway: remember it (state topic first), then report.
async fn blocked(shared: &Arc<Shared>, mut work: Work) {
    let claim = work.completion.claim;
    if !shared.ownership.is_current(claim) {
        shared.metrics.fenced.inc();
        return;
    }
    let block = work.block();
    // A block re-asserted by reconcile is the same block: its record (with its origin and actor)
    // stands as written, so neither a pending nor an active record is written for it.
    if work.enforce.origin != Origin::Reconcile {
        let record = work.record(false, &shared.replica);
        let payload = serde_json::to_string(&record).expect("state serializes");
        let topic = &shared.config.kafka.topics.state;
        let key = record.key.to_string();
        let stop = &shared.stopping;
        match report::write(
            &shared.producer,
            topic,
            &key,
            &payload,
            Some(claim.partition),
            stop,
        )
        .await
        {
            Ok(_) => {}
            Err(WriteError::Stopping) => return,
            Err(e @ WriteError::Refused(_)) => {
                error!(error = %e, key, "the state record of a block was refused: a restart may verify it again");
            }
        }
    }
    {
        let mut state = shared.state.lock().expect("state");
        // Asked under the state's lock, which a revoke takes to drop the partition's entries
        // (after it revoked the claim): a block confirmed for a partition gone meanwhile would
        // come back, stale, if the partition came back here.
        if !shared.ownership.is_current(claim) {
            shared.metrics.fenced.inc();
            return; // its next owner answers the event
        }
        match work.enforce.origin {
            Origin::Reconcile => state.set_reasserting(&work.enforce.key, false),
            _ => state.confirm(work.enforce.key, claim.partition, &work.subject(), &block),
        }
    }
    if let Some(detected) = work.result.detected() {
        let latency = (Utc::now() - detected).to_std().unwrap_or_default();
        shared
            .metrics
            .detection_to_enforcement
            .observe(latency.as_secs_f64());
    }
    work.result.settle(Settled::Blocked {
        verified: work.first_sent.is_none(),
        attempts: work.progress.attempts,
        block,
        duration: work.enforce.duration,
    });
    super::finish(shared, &work.completion, work.result).await;
}

/// The rule is gone from every gateway: forget the block (a tombstone on the state topic: an
/// unblocked block leaves no history, it was a mistake), then report.
async fn unblocked(shared: &Arc<Shared>, mut work: Work) {
    let claim = work.completion.claim;
    if !shared.ownership.is_current(claim) {
        shared.metrics.fenced.inc();
        return;
    }
    let key = work.enforce.key;
    let forgotten = work.enforce.origin == Origin::Reconcile
        || shared
            .state
            .lock()
            .expect("state")
            .remove_unless_in_flight(&key);
    if forgotten && work.enforce.origin != Origin::Reconcile {
        let topic = &shared.config.kafka.topics.state;
        let still_forgotten = || {
            shared.ownership.is_current(claim) && !shared.state.lock().expect("state").knows(&key)
        };
        match report::write_tombstone(
            &shared.producer,
            topic,
            &key.to_string(),
            claim.partition,
            &shared.stopping,
            &still_forgotten,
        )
        .await
        {
            Ok(_) => {}
            Err(WriteError::Stopping) => return,
            Err(e) => {
                error!(error = %e, key = %key, "the tombstone of an unblocked block was refused")
            }
        }
    }
    work.result.settle(Settled::Unblocked {
        found: work.progress.found,
        attempts: work.progress.attempts,
    });
    super::finish(shared, &work.completion, work.result).await;
}

/// The rule could not be enforced: dead-letter and report. A rule that may be on a gateway stays
/// *unconfirmed*, so the next detection asks the gateways before sending it.
async fn failed(shared: &Arc<Shared>, mut work: Work, code: Code) {
    let claim = work.completion.claim;
    if !shared.ownership.is_current(claim) {
        shared.metrics.fenced.inc();
        return;
    }
    forget_or_keep(shared, &work);
    work.result.settle(Settled::Failed {
        code,
        attempts: work.progress.attempts,
        problem: work
            .progress
            .last_problem
            .clone()
            .unwrap_or_else(|| "no reason recorded".into()),
    });
    let json = serde_json::to_string(&work.result).expect("results serialize");
    let mut dead = DeadLetter::new(
        DeadLetterStage::Enforce,
        code.as_str(),
        work.result.reason.clone(),
        json.as_bytes(),
        json.len(),
    );
    dead.site = Some(work.result.site.clone());
    if !super::write_dead_letter(shared, &work.enforce.key.to_string(), dead).await {
        return; // stopping
    }
    super::finish(shared, &work.completion, work.result).await;
}

/// Lets a rule go without a result (stopping, or its record could not be written): its event
/// goes back to the partition's next owner.
fn abandon(shared: &Shared, work: Work, why: &str) {
    if shared.ownership.is_current(work.completion.claim) {
        forget_or_keep(shared, &work);
    }
    tracing::debug!(ip = %work.result.ip, why, "rule let go; its event will be redelivered");
}

/// In memory: a rule that may be in place is unconfirmed; one that is surely not is forgotten.
/// (A removal that did not finish changes nothing: the block stays as it was believed.)
fn forget_or_keep(shared: &Shared, work: &Work) {
    if work.progress.is_removal() {
        // The block stays as it was believed (and reconcile counts it again).
        let mut state = shared.state.lock().expect("state");
        state.set_removing(&work.enforce.key, false);
        return;
    }
    if work.enforce.origin == Origin::Reconcile {
        let mut state = shared.state.lock().expect("state");
        state.set_reasserting(&work.enforce.key, false);
        return;
    }
    let mut state = shared.state.lock().expect("state");
    if work.progress.maybe_in_place() {
        state.unconfirm(
            work.enforce.key,
            work.completion.claim.partition,
            &work.subject(),
            &work.block(),
        );
    } else {
        state.abort(&work.enforce.key);
    }
}

/// Moves the `due` items of `waiting` into `batch` while it holds fewer than `most`, in their
/// order; returns the rest (not due, or no room left), still in order.
fn join_due<T>(
    batch: &mut Vec<T>,
    waiting: Vec<T>,
    most: usize,
    due: impl Fn(&T) -> bool,
) -> Vec<T> {
    let mut later = Vec::with_capacity(waiting.len());
    for item in waiting {
        if batch.len() < most && due(&item) {
            batch.push(item);
        } else {
            later.push(item);
        }
    }
    later
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(adaptive: bool) -> (Arc<ServerLimits>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let run = crate::config::RunConfig {
            adaptive,
            server_concurrency: 16,
            batch_max_rules: 500,
            ..Default::default()
        };
        (
            Arc::new(ServerLimits::new("hq", &run, metrics.clone())),
            metrics,
        )
    }

    fn gauges(metrics: &Metrics) -> (i64, i64) {
        (
            metrics.server_concurrency.with_label_values(&["hq"]).get(),
            metrics.server_batch_rules.with_label_values(&["hq"]).get(),
        )
    }

    #[test]
    fn due_retries_join_a_batch_only_up_to_its_size() {
        // (batch before, waiting (value, due), most) -> (batch after, still waiting)
        type Case = (Vec<u32>, Vec<(u32, bool)>, usize, Vec<u32>, Vec<u32>);
        let cases: Vec<Case> = vec![
            (vec![], vec![], 4, vec![], vec![]),
            (
                vec![],
                vec![(1, true), (2, false), (3, true)],
                4,
                vec![1, 3],
                vec![2],
            ),
            (
                vec![9],
                vec![(1, true), (2, true), (3, true)],
                3,
                vec![9, 1, 2],
                vec![3],
            ),
            (vec![9, 8], vec![(1, true)], 2, vec![9, 8], vec![1]),
            (vec![9, 8, 7], vec![(1, true)], 2, vec![9, 8, 7], vec![1]),
            (vec![], vec![(1, false), (2, true)], 1, vec![2], vec![1]),
        ];
        for (mut batch, waiting, most, joined, left) in cases {
            let due: Vec<u32> = waiting.iter().filter(|w| w.1).map(|w| w.0).collect();
            let waiting: Vec<u32> = waiting.iter().map(|w| w.0).collect();
            let rest = join_due(&mut batch, waiting.clone(), most, |v| due.contains(v));
            assert_eq!(
                (&batch, &rest),
                (&joined, &left),
                "{waiting:?} into at most {most}"
            );
        }
    }

    #[tokio::test]
    async fn a_cut_below_the_slots_in_use_takes_them_as_they_come_back() {
        let (limits, metrics) = limits(true);
        assert_eq!(gauges(&metrics), (INITIAL_CONCURRENCY as i64, 500));
        let (a, b) = (limits.slot().await, limits.slot().await);
        assert_eq!(limits.slots.available_permits(), 0);
        // Back-pressure while both are out: one slot fewer, and the batch halved.
        limits.observe(500, Duration::from_secs(1), Answer::Overloaded);
        assert_eq!(gauges(&metrics), (1, 250));
        assert_eq!(limits.batch(), 250);
        drop(a); // taken by the cut
        assert_eq!(limits.slots.available_permits(), 0);
        drop(b);
        assert_eq!(limits.slots.available_permits(), 1);
        // A healthy call while a batch waited: one more slot (slow start ended with the cut),
        // and the batch grows back by a quarter.
        let held = limits.slot().await;
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.slot().await }
        });
        tokio::task::yield_now().await;
        while !limits.control.lock().unwrap().busy {
            tokio::task::yield_now().await;
        }
        limits.observe(250, Duration::from_secs(1), Answer::Healthy);
        assert_eq!(gauges(&metrics), (2, 313));
        let second = waiting.await.unwrap(); // the new slot let it through
        drop((held, second));
        assert_eq!(limits.slots.available_permits(), 2);
    }

    #[tokio::test]
    async fn fixed_limits_stay_where_the_configuration_puts_them() {
        let (limits, metrics) = limits(false);
        assert_eq!(gauges(&metrics), (16, 500));
        limits.observe(500, Duration::from_secs(30), Answer::Overloaded);
        assert_eq!(gauges(&metrics), (16, 500));
        assert_eq!(limits.slots.available_permits(), 16);
    }
}
