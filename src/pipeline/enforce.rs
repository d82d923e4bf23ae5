//! Batch and enforce: per target, rules are gathered until `run.batch_max_rules` or
//! `run.batch_max_delay`, sent as one `run-script`, and each rule's own outcome is mapped back to
//! its event. Failed rules alone are retried, with exponential backoff and jitter, until
//! `run.retry_deadline`; then they are reported `failed` and dead-lettered. Per management server,
//! a semaphore caps concurrent batches and a governor rate limiter paces calls.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::warn;

use super::dedupe::{BlockRecord, STATE_SCHEMA};
use super::policy::Target;
use super::report::{timestamp, Outcome, ResultMessage};
use super::{Completion, Shared};
use crate::checkpoint::sam::{self, Operation, RuleKey, SamRule};
use crate::checkpoint::{classify, ErrorClass, ManagementClient, RunScript};
use crate::event::{DeadLetter, DeadLetterStage};

/// Courtesy towards one management server: concurrent batches and calls per second.
pub struct ServerLimits {
    batches: Arc<Semaphore>,
    calls: DefaultDirectRateLimiter,
}

impl ServerLimits {
    pub fn new(concurrency: usize, calls_per_second: u32) -> Self {
        let rate = NonZeroU32::new(calls_per_second.max(1)).expect("positive");
        Self {
            batches: Arc::new(Semaphore::new(concurrency.max(1))),
            calls: RateLimiter::direct(Quota::per_second(rate)),
        }
    }
}

/// One rule on its way to a target, with the event it answers.
pub struct Work {
    pub completion: Arc<Completion>,
    pub key: RuleKey,
    pub rule: SamRule,
    pub level: u32,
    pub duration: Duration,
    /// The result, filled in with everything known at decision time.
    pub result: ResultMessage,
    pub first_attempt: Instant,
    pub attempts: u32,
    pub next_try: Instant,
    /// A block whose outcome nobody saw (its owner stopped mid-call): ask the gateway first.
    pub verify: Option<BlockRecord>,
}

/// Runs one target's batcher until its queue closes and nothing waits for a retry.
pub async fn run_target(
    target: Arc<Target>,
    client: Arc<ManagementClient>,
    limits: Arc<ServerLimits>,
    mut queue: mpsc::Receiver<Work>,
    shared: Arc<Shared>,
) {
    let max_rules = shared.config.run.batch_max_rules;
    let max_delay = shared.config.run.batch_max_delay;
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Work>();
    let mut waiting: Vec<Work> = Vec::new(); // retries not yet due
    let mut open = true;
    let batches_running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        // Wait for the first rule of a batch: new work, or a retry coming due.
        let next_due = waiting.iter().map(|w| w.next_try).min();
        let mut batch: Vec<Work> = Vec::new();
        tokio::select! {
            work = queue.recv(), if open => match work {
                Some(work) => batch.push(work),
                None => open = false,
            },
            Some(work) = retry_rx.recv() => waiting.push(work),
            _ = sleep_until(next_due), if next_due.is_some() => {}
        }
        if !open && batch.is_empty() && waiting.is_empty() {
            if batches_running.load(std::sync::atomic::Ordering::Acquire) == 0 {
                break;
            }
            // A running batch may still hand back retries.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let now = Instant::now();
        let (due, later): (Vec<Work>, Vec<Work>) =
            waiting.drain(..).partition(|w| w.next_try <= now);
        waiting = later;
        batch.extend(due);
        if batch.is_empty() {
            continue;
        }
        let flush_at = now + max_delay;
        // Take a server slot first, then fill the batch: while the server is busy, rules queue up,
        // so batches grow with the load. Stop when full or when the oldest rule waited long enough.
        let permit = limits
            .batches
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        while batch.len() < max_rules && open {
            tokio::select! {
                biased; // what is queued goes in even when the delay is already over
                work = queue.recv() => match work {
                    Some(work) => batch.push(work),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(flush_at) => break,
            }
        }
        batches_running.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let running = batches_running.clone();
        let batch_task = enforce_batch(
            batch,
            target.clone(),
            client.clone(),
            limits.clone(),
            shared.clone(),
            retry_tx.clone(),
            permit,
        );
        tokio::spawn(async move {
            batch_task.await;
            running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One `run-script` for a batch, then each rule to its outcome.
async fn enforce_batch(
    batch: Vec<Work>,
    target: Arc<Target>,
    client: Arc<ManagementClient>,
    limits: Arc<ServerLimits>,
    shared: Arc<Shared>,
    retry: mpsc::UnboundedSender<Work>,
    permit: OwnedSemaphorePermit,
) {
    // Blocks of a stopped owner: those already on every gateway are done without a new rule.
    // When the gateways cannot be asked, the question is retried like a failed block (sending
    // the rule blind could issue it twice).
    let (to_verify, mut batch): (Vec<Work>, Vec<Work>) =
        batch.into_iter().partition(|w| w.verify.is_some());
    let mut unverified: Vec<(Work, Verdict)> = Vec::new();
    if !to_verify.is_empty() {
        match verify(to_verify, &target, &client, &limits).await {
            Ok(checked) => {
                let mut reports = tokio::task::JoinSet::new();
                for (mut work, in_place) in checked {
                    if in_place {
                        work.attempts += 1; // the question was a firewall call
                        let shared = shared.clone();
                        reports.spawn(async move { blocked(&shared, work).await });
                    } else {
                        batch.push(work);
                    }
                }
                join_all(&mut reports).await;
            }
            Err((works, e)) => {
                let reason = format!("cannot verify a stopped replica's block: {e}");
                let class = classify(&e);
                unverified.extend(works.into_iter().map(|w| (w, Err((class, reason.clone())))));
            }
        }
    }
    // Write-ahead: the state topic learns of each block before the firewall does, so whoever
    // owns the partition next can tell "maybe blocked" from "never tried". When a record cannot
    // be written (shutting down), nothing of the batch is sent: its events go back to the
    // partition's next owner.
    let mut acks = tokio::task::JoinSet::new();
    for work in &batch {
        let record = state_record(work, Utc::now(), true);
        let (shared, key, partition) = (
            shared.clone(),
            work.key.to_string(),
            work.completion.partition,
        );
        acks.spawn(async move {
            let payload = serde_json::to_string(&record).expect("state serializes");
            crate::pipeline::report::produce_acked(
                &shared.producer,
                &shared.config.kafka.topics.state,
                &key,
                &payload,
                Some(partition),
                &shared.cancel,
            )
            .await
        });
    }
    let mut all_written = true;
    while let Some(joined) = acks.join_next().await {
        all_written &= joined.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a state write failed; its batch is not sent");
            false
        });
    }
    if !all_written {
        let mut state = shared.state.lock().expect("state");
        for work in batch.iter().chain(unverified.iter().map(|(w, _)| w)) {
            state.abort(&work.key);
        }
        return;
    }
    if batch.is_empty() && unverified.is_empty() {
        return;
    }
    let (verdicts, task_ids) = if batch.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        block(&batch, &target, &client, &limits, &shared).await
    };
    // The firewall's part is done: let the next batch use the server while Kafka acknowledges.
    drop(permit);
    // Reports run concurrently: each waits for its own acknowledgements, none for another's.
    let mut reports = tokio::task::JoinSet::new();
    for (mut work, verdict) in batch.into_iter().zip(verdicts).chain(unverified) {
        work.attempts += 1;
        work.result.task_ids.extend(task_ids.iter().cloned());
        match verdict {
            Ok(()) => {
                let shared = shared.clone();
                reports.spawn(async move { blocked(&shared, work).await });
            }
            Err((class, reason)) => {
                let delay = match class {
                    ErrorClass::Retryable => Some(backoff(&shared, work.attempts)),
                    ErrorClass::RateLimited(d) => Some(d.max(backoff(&shared, work.attempts))),
                    ErrorClass::Auth | ErrorClass::Permanent => None,
                };
                let deadline = work.first_attempt + shared.config.run.retry_deadline;
                match delay {
                    Some(d) if Instant::now() + d < deadline && !shared.cancel.is_cancelled() => {
                        warn!(target = target.name, attempts = work.attempts, retry_in = ?d, reason, "rule not enforced; will retry");
                        work.next_try = Instant::now() + d;
                        if let Err(mpsc::error::SendError(work)) = retry.send(work) {
                            let shared = shared.clone();
                            reports.spawn(
                                async move { fail(&shared, work, "shutdown", reason).await },
                            );
                        }
                    }
                    _ => {
                        let code = match class {
                            ErrorClass::Auth => "auth",
                            ErrorClass::Permanent => "permanent",
                            _ => "retries_exhausted",
                        };
                        let shared = shared.clone();
                        reports.spawn(async move { fail(&shared, work, code, reason).await });
                    }
                }
            }
        }
    }
    join_all(&mut reports).await;
}

/// A rule's fate in a batch: done, or why not and whether to try again.
type Verdict = Result<(), (ErrorClass, String)>;

/// One `run-script` for the batch's rules on the target's gateways: each rule's verdict, and
/// the task ids.
async fn block(
    batch: &[Work],
    target: &Target,
    client: &ManagementClient,
    limits: &ServerLimits,
    shared: &Shared,
) -> (Vec<Verdict>, Vec<String>) {
    let rules: Vec<SamRule> = batch.iter().map(|w| w.rule).collect();
    shared.metrics.batch_rules.observe(rules.len() as f64);
    let script = match sam::batch_script(&rules, target.mode, Operation::Block) {
        Ok(script) => script,
        Err(e) => {
            let reason = format!("unrenderable rule: {e}");
            return (
                vec![Err((ErrorClass::Permanent, reason)); rules.len()],
                Vec::new(),
            );
        }
    };
    limits.calls.until_ready().await;
    let comments = format!("samgate: {} rule(s)", rules.len());
    let request = RunScript {
        name: "samgate block",
        script: &script,
        targets: &target.gateways,
        comments: &comments,
    };
    let outcome = client.run_script_to_end(&request).await;
    // Per rule: Ok, or (retry class, reason).
    let verdicts: Vec<Verdict> = match &outcome {
        Ok(tasks) => {
            // Each gateway's output, parsed once: the exit status of every rule.
            let per_task: Vec<Vec<Option<i32>>> = tasks
                .iter()
                .map(|task| {
                    let output = task.details.first().map_or("", |d| d.output.as_str());
                    sam::parse_outcomes(output, rules.len())
                })
                .collect();
            (0..rules.len())
                .map(|i| {
                    for (task, statuses) in tasks.iter().zip(&per_task) {
                        let status = statuses[i];
                        let ok_task = task.status.is_success()
                            || task.status == crate::checkpoint::TaskStatus::PartiallySucceeded;
                        if !ok_task || status != Some(0) {
                            let detail = task.details.first();
                            let gateway =
                                detail.and_then(|d| d.gateway.clone()).unwrap_or_default();
                            let error = detail
                                .map(|d| d.error.trim().to_owned())
                                .unwrap_or_default();
                            let reason = format!(
                                "gateway {gateway}: task {}, rule exit status {}{}",
                                task.status.as_str(),
                                status.map_or("missing".to_string(), |s| s.to_string()),
                                if error.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {}", error.lines().next().unwrap_or(""))
                                }
                            );
                            return Err((ErrorClass::Retryable, reason));
                        }
                    }
                    Ok(())
                })
                .collect()
        }
        Err(e) => vec![Err((classify(e), e.to_string())); rules.len()],
    };
    let task_ids = outcome
        .map(|tasks| tasks.into_iter().map(|t| t.task_id).collect())
        .unwrap_or_default();
    (verdicts, task_ids)
}

/// `retry_initial · 2^(attempts-1)`, capped at `retry_max`, with ±25 % jitter.
fn backoff(shared: &Shared, attempts: u32) -> Duration {
    let run = &shared.config.run;
    let base = run
        .retry_initial
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
        .min(run.retry_max);
    let jitter = rand::rng().random_range(0.75..1.25);
    base.mul_f64(jitter)
}

/// Asks the gateways whether each rule is in place: `true` on every gateway (the work's
/// `verify` record says until when); `false` when not, so block it. When the gateways cannot be
/// asked, the works come back with the error.
async fn verify(
    works: Vec<Work>,
    target: &Target,
    client: &ManagementClient,
    limits: &ServerLimits,
) -> Result<Vec<(Work, bool)>, (Vec<Work>, crate::checkpoint::ApiError)> {
    let rules: Vec<SamRule> = works.iter().map(|w| w.rule).collect();
    let script = sam::verify_script(&rules, target.mode);
    limits.calls.until_ready().await;
    let request = RunScript {
        name: "samgate verify",
        script: &script,
        targets: &target.gateways,
        comments: "samgate: verify blocks of a stopped replica",
    };
    let found: Vec<bool> = match client.run_script_to_end(&request).await {
        Ok(tasks) => {
            let per_task: Vec<Vec<Option<(i32, bool)>>> = tasks
                .iter()
                .map(|t| {
                    let output = t.details.first().map_or("", |d| d.output.as_str());
                    sam::parse_sections(output, rules.len())
                })
                .collect();
            (0..rules.len())
                .map(|i| per_task.iter().all(|s| s[i] == Some((0, true))))
                .collect()
        }
        Err(e) => {
            warn!(target = target.name, error = %e, "cannot verify blocks of a stopped replica; will ask again");
            return Err((works, e));
        }
    };
    tracing::info!(
        target = target.name,
        checked = rules.len(),
        in_place = found.iter().filter(|f| **f).count(),
        "verified blocks left unconfirmed by a stopped replica"
    );
    Ok(works
        .into_iter()
        .zip(found)
        .map(|(mut work, found)| {
            if !found {
                work.verify = None;
            }
            (work, found)
        })
        .collect())
}

fn state_record(work: &Work, now: chrono::DateTime<Utc>, pending: bool) -> BlockRecord {
    let expires = match (&work.verify, pending) {
        (Some(found), false) => found.expires_at,
        _ => now + chrono::Duration::from_std(work.duration).unwrap_or(chrono::Duration::MAX),
    };
    BlockRecord {
        schema: STATE_SCHEMA.into(),
        key: work.key,
        site: work.result.site.clone(),
        ip: work.result.ip,
        target: work.result.target.clone().unwrap_or_default(),
        level: work.level,
        blocked_at: work
            .verify
            .as_ref()
            .filter(|_| !pending)
            .map_or(now, |r| r.blocked_at),
        expires_at: expires,
        event_id: work.result.event_ids.first().cloned().unwrap_or_default(),
        pending,
    }
}

/// The rule is on every gateway: remember it (state topic first), then report.
async fn blocked(shared: &Arc<Shared>, mut work: Work) {
    let now = Utc::now();
    let record = state_record(&work, now, false);
    let expires = record.expires_at;
    let verified = work.verify.is_some();
    let payload = serde_json::to_string(&record).expect("state serializes");
    let partition = work.completion.partition;
    crate::pipeline::report::produce_acked(
        &shared.producer,
        &shared.config.kafka.topics.state,
        &work.key.to_string(),
        &payload,
        Some(partition),
        &shared.cancel,
    )
    .await;
    shared
        .state
        .lock()
        .expect("state")
        .record(partition, record, now);
    work.result.outcome = Outcome::Blocked;
    if verified {
        work.result.code = "verified".into();
        work.result.reason = format!(
            "blocked on {} (found in place after a restart; not sent again)",
            work.result.gateways.join(", ")
        );
    } else {
        work.result.code = "enforced".into();
        work.result.reason = format!(
            "blocked on {} for {}",
            work.result.gateways.join(", "),
            humantime::format_duration(work.duration)
        );
    }
    work.result.attempts = work.attempts;
    work.result.expires_at = Some(timestamp(expires));
    work.result.enforced_at = Some(timestamp(now));
    if let Some(detected) = work.result.detected() {
        let latency = (now - detected).to_std().unwrap_or_default();
        shared
            .metrics
            .detection_to_enforcement
            .observe(latency.as_secs_f64());
    }
    super::finish(shared, &work.completion, work.result).await;
}

/// The rule could not be enforced: forget the pending block, dead-letter, report.
async fn fail(shared: &Arc<Shared>, mut work: Work, code: &str, reason: String) {
    shared.state.lock().expect("state").abort(&work.key);
    work.result.outcome = Outcome::Failed;
    work.result.code = code.to_owned();
    work.result.reason = format!("not enforced after {} attempt(s): {reason}", work.attempts);
    work.result.attempts = work.attempts;
    let json = serde_json::to_string(&work.result).expect("results serialize");
    let mut dead = DeadLetter::new(
        DeadLetterStage::Enforce,
        code,
        work.result.reason.clone(),
        json.as_bytes(),
        json.len(),
    );
    dead.site = Some(work.result.site.clone());
    let payload = serde_json::to_string(&dead).expect("dead letters serialize");
    crate::pipeline::report::produce_acked(
        &shared.producer,
        &shared.config.kafka.topics.dlq,
        &work.key.to_string(),
        &payload,
        None,
        &shared.cancel,
    )
    .await;
    shared
        .metrics
        .dead_letters
        .with_label_values(&[DeadLetterStage::Enforce.as_str()])
        .inc();
    super::finish(shared, &work.completion, work.result).await;
}

/// Waits for every task of `set`; a task that panicked is a bug worth an ERROR line.
async fn join_all<T: 'static>(set: &mut tokio::task::JoinSet<T>) {
    while let Some(joined) = set.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "a reporting task failed; its event will be redelivered");
        }
    }
}
