//! The operator's side of samgate: `samgate block | unblock | exempt | unexempt | reconcile` send
//! `samgate.command.v1` messages and wait for their results; `samgate blocks` and `samgate
//! explain` read what samgate believes from the state and results topics, without joining the
//! consumer group. What to print is pure ([`Table`], [`explain_site`]); the rest reads Kafka.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::command::{Action, Command};
use crate::config::Config;
use crate::event::event_key;
use crate::kafka::partition_for;
use crate::pipeline::decide;
use crate::pipeline::dedupe::{BlockRecord, BlockState, Check, ExemptionRecord, Origin};
use crate::pipeline::lifecycle::{ReconcileReport, RECONCILE_SCHEMA};
use crate::pipeline::policy::{idempotency_key, Policy};
use crate::pipeline::rebuild::{decode, StateMessage};
use crate::pipeline::report::{timestamp, Outcome, ResultMessage};

const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

/// A plain text table: a header and rows, columns padded to their widest cell.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Self {
            header,
            rows: Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| -> String {
            let last = cells.len() - 1;
            let mut out = String::new();
            for (i, cell) in cells.into_iter().enumerate() {
                out.push_str(cell);
                if i < last {
                    let pad = widths[i] - cell.chars().count() + 2;
                    out.push_str(&" ".repeat(pad));
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(self.header.clone());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// The sites a `--site` flag names: one configured site, or every one for `all`.
pub fn sites(config: &Config, site: &str) -> anyhow::Result<Vec<String>> {
    if site == "all" {
        return Ok(config.sites.keys().cloned().collect());
    }
    if !config.sites.contains_key(site) {
        let known: Vec<&str> = config.sites.keys().map(String::as_str).collect();
        bail!(
            "site {site:?} is not configured (sites: {}; or `all`)",
            known.join(", ")
        );
    }
    Ok(vec![site.to_owned()])
}

/// How many results answer `command` under `config` (one per target of its site, plus one for
/// an exemption set or ended).
pub fn expected_results(config: &Config, command: &Command) -> usize {
    let targets = command
        .site
        .as_ref()
        .and_then(|s| config.sites.get(s))
        .map_or(1, |s| s.targets.len());
    match command.action {
        Action::Block => targets,
        Action::Unblock => targets + usize::from(command.exempt_for_s.is_some()),
        Action::Exempt | Action::Unexempt => 1,
        Action::Reconcile => 0,
    }
}

/// The results-topic keys a command's results are written under: each target's idempotency key,
/// and the address (results without a target).
fn result_keys(config: &Config, policy: &Policy, site: &str, ip: IpAddr) -> Vec<String> {
    let mut keys = vec![event_key(ip)];
    if let (Some(targets), true) = (policy.site_targets(site), config.sites.contains_key(site)) {
        keys.extend(targets.iter().map(|t| idempotency_key(t, ip).to_string()));
    }
    keys
}

/// Sends operator commands (block, unblock, exempt, unexempt) and waits up to `timeout` for
/// their results. Returns the results that arrived and whether every expected one did.
pub async fn send_commands(
    config: &Config,
    commands: Vec<Command>,
    timeout: Duration,
) -> anyhow::Result<(Vec<ResultMessage>, bool)> {
    let topics = &config.kafka.topics;
    let policy = Policy::new(config, &[]);
    let results_partitions =
        crate::kafka::partition_count(&config.kafka, &topics.results, METADATA_TIMEOUT).await?;
    let mut partitions: Vec<i32> = commands
        .iter()
        .flat_map(|c| {
            result_keys(
                config,
                &policy,
                c.site.as_deref().unwrap_or(""),
                c.ip.expect("commands with an address"),
            )
        })
        .map(|k| partition_for(&k, results_partitions))
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    // Where the results partitions end now, before anything is sent: nothing is missed.
    let starts = ends(config, &topics.results, &partitions).await?;
    let producer = command_producer(config, timeout).await?;
    for command in &commands {
        let payload = serde_json::to_string(command).expect("commands serialize");
        let key = command.key();
        producer
            .send(
                FutureRecord::to(&topics.events).key(&key).payload(&payload),
                timeout,
            )
            .await
            .map_err(|(e, _)| {
                anyhow::anyhow!("cannot send the command to {}: {e}", topics.events)
            })?;
    }
    let mut wanted: HashMap<String, usize> = commands
        .iter()
        .map(|c| (c.id.clone(), expected_results(config, c)))
        .collect();
    let mut results = Vec::new();
    let deadline = Instant::now() + timeout;
    follow(
        config,
        &topics.results,
        starts,
        Until::Done,
        deadline,
        |message| {
            let Some(Ok(result)) = message
                .payload()
                .map(serde_json::from_slice::<ResultMessage>)
            else {
                return false;
            };
            let Some(left) = result.event_ids.first().and_then(|id| wanted.get_mut(id)) else {
                return false;
            };
            *left = left.saturating_sub(1);
            results.push(result);
            wanted.values().all(|n| *n == 0)
        },
    )
    .await?;
    let complete = wanted.values().all(|n| *n == 0);
    Ok((results, complete))
}

/// Whether a command's result means it was not carried out as asked.
pub fn refused(result: &ResultMessage) -> bool {
    matches!(
        result.outcome,
        Outcome::Failed | Outcome::Suppressed | Outcome::NotBlockable | Outcome::Filtered
    )
}

/// The results of commands as a table.
pub fn results_table(results: &[ResultMessage]) -> Table {
    let mut table = Table::new(vec![
        "SITE", "IP", "TARGET", "OUTCOME", "CODE", "UNTIL", "REASON",
    ]);
    for r in results {
        table.rows.push(vec![
            r.site.clone(),
            r.ip.to_string(),
            r.target.clone().unwrap_or_else(|| "-".into()),
            r.outcome.as_str().into(),
            r.code.as_str().into(),
            r.expires_at
                .clone()
                .or_else(|| r.exempt_until.clone())
                .unwrap_or_else(|| "-".into()),
            r.reason.clone(),
        ]);
    }
    table
}

/// Sends one `reconcile` command to every partition of the events topic (each owner hears
/// one) and waits for the reports that answer them: one per target and replica.
pub async fn reconcile(
    config: &Config,
    target: Option<&str>,
    actor: Option<String>,
    timeout: Duration,
) -> anyhow::Result<(Vec<ReconcileReport>, bool)> {
    let topics = &config.kafka.topics;
    if let Some(t) = target {
        if !config.targets.contains_key(t) {
            bail!("target {t:?} is not configured");
        }
    }
    let targets: Vec<String> = match target {
        Some(t) => vec![t.to_owned()],
        None => config.targets.keys().cloned().collect(),
    };
    let events =
        crate::kafka::partition_count(&config.kafka, &topics.events, METADATA_TIMEOUT).await?;
    let results =
        crate::kafka::partition_count(&config.kafka, &topics.results, METADATA_TIMEOUT).await?;
    let mut partitions: Vec<i32> = targets
        .iter()
        .map(|t| partition_for(&format!("reconcile/{t}"), results))
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    let starts = ends(config, &topics.results, &partitions).await?;
    let producer = command_producer(config, timeout).await?;
    let mut ids = Vec::new();
    for partition in 0..events {
        let mut command = Command::new(Action::Reconcile);
        command.target = target.map(str::to_owned);
        command.actor = actor.clone();
        let payload = serde_json::to_string(&command).expect("commands serialize");
        producer
            .send(
                FutureRecord::to(&topics.events)
                    .key(crate::command::RECONCILE_KEY)
                    .payload(&payload)
                    .partition(partition),
                timeout,
            )
            .await
            .map_err(|(e, _)| {
                anyhow::anyhow!("cannot send the command to {}: {e}", topics.events)
            })?;
        ids.push(command.id);
    }
    // Per target, the command ids not yet answered.
    let mut open: BTreeMap<String, Vec<String>> =
        targets.iter().map(|t| (t.clone(), ids.clone())).collect();
    let mut reports = Vec::new();
    let deadline = Instant::now() + timeout;
    follow(
        config,
        &topics.results,
        starts,
        Until::Done,
        deadline,
        |message| {
            let Some(Ok(report)) = message
                .payload()
                .map(serde_json::from_slice::<ReconcileReport>)
            else {
                return false;
            };
            if report.schema != RECONCILE_SCHEMA {
                return false;
            }
            let Some(left) = open.get_mut(&report.target) else {
                return false;
            };
            let before = left.len();
            left.retain(|id| !report.command_ids.contains(id));
            if left.len() < before {
                reports.push(report);
            }
            open.values().all(Vec::is_empty)
        },
    )
    .await?;
    let complete = open.values().all(Vec::is_empty);
    Ok((reports, complete))
}

pub fn reconcile_table(reports: &[ReconcileReport]) -> Table {
    let mut table = Table::new(vec![
        "TARGET",
        "REPLICA",
        "PARTITIONS",
        "BLOCKS",
        "MISSING",
        "ORPHANED",
        "ERRORS",
    ]);
    for r in reports {
        table.rows.push(vec![
            r.target.clone(),
            r.replica.clone(),
            r.partitions
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            r.blocks.to_string(),
            r.missing.to_string(),
            r.orphaned.to_string(),
            if r.errors.is_empty() {
                "-".into()
            } else {
                r.errors.join("; ")
            },
        ]);
    }
    table
}

/// What the state topic holds: the latest record of every block key, and the exemptions.
#[derive(Debug, Default)]
pub struct StateView {
    pub blocks: BTreeMap<String, (i32, BlockRecord)>,
    pub exemptions: BTreeMap<(String, IpAddr), ExemptionRecord>,
}

impl StateView {
    /// Folds state-topic messages in order (later records replace earlier ones; tombstones
    /// remove).
    pub fn fold(messages: &[OwnedMessage]) -> Self {
        let mut view = Self::default();
        for m in messages {
            match decode(m) {
                StateMessage::Block(record) => {
                    view.blocks
                        .insert(record.key.to_string(), (m.partition(), record));
                }
                StateMessage::Tombstone(key) => {
                    view.blocks.remove(&key.to_string());
                }
                StateMessage::Exemption(record) => {
                    view.exemptions
                        .insert((record.site.clone(), record.ip), record);
                }
                StateMessage::ExemptionEnded(site, ip) => {
                    view.exemptions.remove(&(site, ip));
                }
                StateMessage::Claim(_) | StateMessage::Other => {}
            }
        }
        view
    }

    /// The state as a replica would rebuild it (for the policy's view of an address).
    pub fn block_state(&self, config: &Config, now: DateTime<Utc>) -> BlockState {
        let mut state = BlockState::new(usize::MAX, config.policy.escalation_window);
        for (partition, record) in self.blocks.values() {
            state.load(*partition, record, now);
        }
        for record in self.exemptions.values() {
            state.load_exemption(0, record);
        }
        state
    }
}

/// A block's status as `blocks` and `explain` show it.
pub fn status(record: &BlockRecord, now: DateTime<Utc>) -> &'static str {
    match (record.pending, record.expires_at > now) {
        (true, true) => "unconfirmed",
        (false, true) => "active",
        (_, false) => "expired",
    }
}

/// `samgate blocks`: active blocks (and with `all`, expired history and exemptions).
pub fn blocks_table(view: &StateView, site: Option<&str>, all: bool, now: DateTime<Utc>) -> Table {
    let mut table = Table::new(vec![
        "SITE", "IP", "TARGET", "STATUS", "LEVEL", "SINCE", "EXPIRES", "ORIGIN", "EVENT",
    ]);
    let mut rows: Vec<(&String, &BlockRecord)> = view
        .blocks
        .values()
        .map(|(_, r)| (&r.site, r))
        .filter(|(s, _)| site.is_none_or(|site| site == s.as_str()))
        .filter(|(_, r)| all || status(r, now) != "expired")
        .collect();
    rows.sort_by(|a, b| (a.0, a.1.ip, &a.1.target).cmp(&(b.0, b.1.ip, &b.1.target)));
    for (_, r) in rows {
        let origin = match (&r.actor, r.origin) {
            (Some(actor), Origin::Manual) => format!("manual ({actor})"),
            (_, origin) => origin.as_str().into(),
        };
        table.rows.push(vec![
            r.site.clone(),
            r.ip.to_string(),
            r.target.clone(),
            status(r, now).into(),
            r.level.to_string(),
            timestamp(r.blocked_at),
            timestamp(r.expires_at),
            origin,
            if r.event_id.is_empty() {
                "-".into()
            } else {
                r.event_id.clone()
            },
        ]);
    }
    if all {
        for ((s, ip), e) in &view.exemptions {
            if site.is_some_and(|site| site != s) {
                continue;
            }
            table.rows.push(vec![
                s.clone(),
                ip.to_string(),
                "-".into(),
                if e.until > now {
                    "exempted"
                } else {
                    "exemption ended"
                }
                .into(),
                "-".into(),
                timestamp(e.since),
                timestamp(e.until),
                match &e.actor {
                    Some(a) => format!("manual ({a})"),
                    None => "manual".into(),
                },
                e.command_id.clone(),
            ]);
        }
    }
    table
}

/// `samgate explain` for one site: what samgate believes, what a new detection would lead to
/// and why, and the last results.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub site: String,
    pub ip: IpAddr,
    /// Per target: the block samgate holds, if any.
    pub beliefs: Vec<Belief>,
    pub exempt_until: Option<String>,
    /// A new detection now: the method and priority assumed, and the outcome per target.
    pub detection: String,
    pub would: Vec<String>,
    pub last_results: Vec<ResultMessage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Belief {
    pub target: String,
    pub key: String,
    /// `active`, `unconfirmed`, `expired (escalation history)`, or `none`.
    pub status: String,
    pub level: Option<u32>,
    pub since: Option<String>,
    pub expires: Option<String>,
    pub origin: Option<String>,
    pub event_id: Option<String>,
}

/// Explains `ip` at `site` from the state view (pure).
pub fn explain_site(
    policy: &Policy,
    view: &StateView,
    state: &BlockState,
    site: &str,
    ip: IpAddr,
    now: DateTime<Utc>,
) -> Explanation {
    let targets = policy.site_targets(site).unwrap_or_default();
    let beliefs = targets
        .iter()
        .map(|t| {
            let key = idempotency_key(t, ip);
            let record = view.blocks.get(&key.to_string()).map(|(_, r)| r);
            Belief {
                target: t.name.clone(),
                key: key.to_string(),
                status: match (record, state.check(&key, now)) {
                    (Some(r), _) if status(r, now) != "expired" => status(r, now).into(),
                    (Some(_), Check::Repeat { level }) => {
                        format!("expired (a new block would be level {level})")
                    }
                    (Some(_), _) => "expired".into(),
                    (None, _) => "none".into(),
                },
                level: record.map(|r| r.level),
                since: record.map(|r| timestamp(r.blocked_at)),
                expires: record.map(|r| timestamp(r.expires_at)),
                origin: record.map(|r| match &r.actor {
                    Some(a) => format!("{} ({a})", r.origin.as_str()),
                    None => r.origin.as_str().into(),
                }),
                event_id: record.map(|r| r.event_id.clone()).filter(|e| !e.is_empty()),
            }
        })
        .collect();
    let (methods, min_priority) = policy.acts_on();
    let method = if methods.iter().any(|m| m == "SCANS") {
        "SCANS".to_owned()
    } else {
        methods.first().cloned().unwrap_or_default()
    };
    let priority = min_priority.max(crate::flowmon::Priority::High);
    let event = synthetic_event(site, ip, &method, priority);
    let would = decide::decide(&event, policy, state, false, now)
        .iter()
        .map(|d| {
            let r = ResultMessage::decided(&event, d);
            let at = r
                .target
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default();
            let reason = match (r.outcome, r.reason.is_empty()) {
                (Outcome::Blocked, _) => format!(
                    "for {} (level {})",
                    humantime::format_duration(Duration::from_secs(r.duration_s.unwrap_or(0))),
                    r.level.unwrap_or(0)
                ),
                (_, true) => String::new(),
                (_, false) => r.reason.clone(),
            };
            format!("{}{at} ({}): {reason}", r.outcome.as_str(), r.code.as_str())
        })
        .collect();
    Explanation {
        site: site.to_owned(),
        ip,
        beliefs,
        exempt_until: state.exemption(site, ip, now).map(timestamp),
        detection: format!(
            "a {method} detection of priority {} (policy: methods {}, priority ≥ {})",
            priority.as_str(),
            methods.join(", "),
            min_priority.as_str()
        ),
        would,
        last_results: Vec::new(),
    }
}

fn synthetic_event(
    site: &str,
    ip: IpAddr,
    method: &str,
    priority: crate::flowmon::Priority,
) -> crate::event::Event {
    use crate::flowmon::{FlowmonEvent, InputFormat};
    crate::event::Event {
        schema: crate::event::EVENT_SCHEMA.into(),
        id: "0".repeat(32),
        site: site.to_owned(),
        collector: "explain".into(),
        received_at: Utc::now(),
        line: 0,
        flowmon: FlowmonEvent {
            format: InputFormat::AdsStandard,
            event_id: None,
            method: Some(method.to_owned()),
            subtype: None,
            mitre: None,
            description: None,
            perspective: None,
            priority,
            priority_raw: None,
            detected_at: None,
            first_flow: None,
            detail: None,
            ports: None,
            protocol: None,
            source: ip,
            source_name: None,
            targets: vec![],
            data_feed: None,
            user_identity: None,
            ids: None,
        },
        raw: String::new(),
        cut: None,
        source_mac: None,
    }
}

/// An explanation as text.
pub fn render_explanation(e: &Explanation) -> String {
    let mut out = format!("{} at site {}\n", e.ip, e.site);
    out.push_str("  samgate believes:\n");
    for b in &e.beliefs {
        out.push_str(&format!("    {}: {}", b.target, b.status));
        if let (Some(level), Some(since), Some(expires)) = (b.level, &b.since, &b.expires) {
            out.push_str(&format!(
                ", level {level}, since {since}, until {expires}, by {}",
                b.origin.as_deref().unwrap_or("-")
            ));
        }
        if let Some(id) = &b.event_id {
            out.push_str(&format!(", event {id}"));
        }
        out.push('\n');
    }
    match &e.exempt_until {
        Some(until) => out.push_str(&format!("    exempted until {until}\n")),
        None => out.push_str("    not exempted\n"),
    }
    out.push_str(&format!("  {} now would be:\n", e.detection));
    for w in &e.would {
        out.push_str(&format!("    {w}\n"));
    }
    if e.last_results.is_empty() {
        out.push_str("  no results in the look-back window\n");
    } else {
        out.push_str("  last results:\n");
        for r in &e.last_results {
            out.push_str(&format!(
                "    {}  {}  {}  {} ({}) {}\n",
                timestamp(r.decided_at),
                r.target.as_deref().unwrap_or("-"),
                r.origin.as_str(),
                r.outcome.as_str(),
                r.code.as_str(),
                r.reason
            ));
        }
    }
    out
}

/// `samgate explain`: per site, the state partition of the address and the results partitions
/// of its keys, read from `since` ago (offsets for times).
pub async fn explain(
    config: &Config,
    site: Option<&str>,
    ip: IpAddr,
    since: Duration,
    last: usize,
) -> anyhow::Result<Vec<Explanation>> {
    let ip = ip.to_canonical();
    let sites = match site {
        Some(s) => sites(config, s)?,
        None => config.sites.keys().cloned().collect(),
    };
    let topics = &config.kafka.topics;
    let servers = crate::pipeline::server_addresses(config).await?;
    let policy = Policy::new(config, &servers);
    let now = Utc::now();
    // State records go to their event's partition number (the state topic may have more).
    let events_partitions =
        crate::kafka::partition_count(&config.kafka, &topics.events, METADATA_TIMEOUT).await?;
    let partition = partition_for(&event_key(ip), events_partitions);
    let starts = beginnings(config, &topics.state, &[partition]).await?;
    let messages = read_to_end(config, &topics.state, starts).await?;
    let view = StateView::fold(&messages);
    let state = view.block_state(config, now);
    let results_partitions =
        crate::kafka::partition_count(&config.kafka, &topics.results, METADATA_TIMEOUT).await?;
    let mut keys: Vec<String> = sites
        .iter()
        .flat_map(|s| result_keys(config, &policy, s, ip))
        .collect();
    keys.sort();
    keys.dedup();
    let mut partitions: Vec<i32> = keys
        .iter()
        .map(|k| partition_for(k, results_partitions))
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    let from = now - chrono::Duration::from_std(since).unwrap_or(chrono::Duration::days(7));
    let starts = offsets_for_time(config, &topics.results, &partitions, from).await?;
    let mut results: Vec<ResultMessage> = read_to_end(config, &topics.results, starts)
        .await?
        .iter()
        .filter(|m| {
            m.key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .is_some_and(|k| keys.iter().any(|x| x == k))
        })
        .filter_map(|m| serde_json::from_slice::<ResultMessage>(m.payload()?).ok())
        .filter(|r| r.ip == ip && r.decided_at >= from)
        .collect();
    results.sort_by_key(|r| r.decided_at);
    Ok(sites
        .iter()
        .map(|s| {
            let mut e = explain_site(&policy, &view, &state, s, ip, now);
            let mine: Vec<ResultMessage> = results
                .iter()
                .filter(|r| r.site == *s || r.site.is_empty())
                .cloned()
                .collect();
            e.last_results = mine[mine.len().saturating_sub(last)..].to_vec();
            e
        })
        .collect())
}

/// `samgate blocks`: the whole state topic, every partition.
pub async fn state_view(config: &Config) -> anyhow::Result<StateView> {
    let topic = &config.kafka.topics.state;
    let n = crate::kafka::partition_count(&config.kafka, topic, METADATA_TIMEOUT).await?;
    let partitions: Vec<i32> = (0..n).collect();
    let starts = beginnings(config, topic, &partitions).await?;
    let messages = read_to_end(config, topic, starts).await?;
    Ok(StateView::fold(&messages))
}

/// The producer operator commands go out on (into the events topic), ready to send at once.
async fn command_producer(config: &Config, timeout: Duration) -> anyhow::Result<FutureProducer> {
    let deadline = Instant::now() + METADATA_TIMEOUT;
    let topics = [config.kafka.topics.events.as_str()];
    Ok(crate::kafka::producer_for(&config.kafka, &topics, timeout, deadline).await?)
}

/// A reader that joins no group.
fn reader(config: &Config) -> anyhow::Result<BaseConsumer> {
    crate::kafka::base_config(&config.kafka)
        .set("group.id", format!("{}-operator", config.run.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100")
        .create()
        .context("cannot create a Kafka reader")
}

/// Each partition's high watermark (where a reader waiting for new messages starts).
async fn ends(config: &Config, topic: &str, partitions: &[i32]) -> anyhow::Result<Vec<(i32, i64)>> {
    let (config, topic, partitions) = (config.clone(), topic.to_owned(), partitions.to_vec());
    tokio::task::spawn_blocking(move || {
        let r = reader(&config)?;
        partitions
            .iter()
            .map(|p| {
                let (_, high) = r.fetch_watermarks(&topic, *p, METADATA_TIMEOUT)?;
                Ok((*p, high))
            })
            .collect()
    })
    .await?
}

/// Each non-empty partition's low watermark (an empty one has nothing to read, and would never
/// report its end).
async fn beginnings(
    config: &Config,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let (config, topic, partitions) = (config.clone(), topic.to_owned(), partitions.to_vec());
    tokio::task::spawn_blocking(move || {
        let r = reader(&config)?;
        let mut starts = Vec::new();
        for p in partitions {
            let (low, high) = r.fetch_watermarks(&topic, p, METADATA_TIMEOUT)?;
            if high > low {
                starts.push((p, low));
            }
        }
        Ok(starts)
    })
    .await?
}

/// Each partition's first offset at or after `from` (the partition's start when the broker
/// cannot say).
async fn offsets_for_time(
    config: &Config,
    topic: &str,
    partitions: &[i32],
    from: DateTime<Utc>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let starts = beginnings(config, topic, partitions).await?;
    let (config, topic) = (config.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let r = reader(&config)?;
        let mut list = TopicPartitionList::new();
        for (p, _) in &starts {
            list.add_partition_offset(&topic, *p, Offset::Offset(from.timestamp_millis()))?;
        }
        let found = r.offsets_for_times(list, METADATA_TIMEOUT).ok();
        Ok(starts
            .into_iter()
            .map(|(p, low)| {
                let at = found
                    .as_ref()
                    .and_then(|l| l.find_partition(&topic, p))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) if o >= low => Some(o),
                        _ => None,
                    });
                (p, at.unwrap_or(low))
            })
            .collect())
    })
    .await?
}

/// Reads the partitions from their start offsets to their current end.
async fn read_to_end(
    config: &Config,
    topic: &str,
    starts: Vec<(i32, i64)>,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    follow(config, topic, starts, Until::End, deadline, |m| {
        messages.push(m.detach());
        false
    })
    .await
    .map(|_| messages)
}

/// How far [`follow`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Until every partition's current end.
    End,
    /// Until `done` says so (new messages keep coming).
    Done,
}

/// Reads the partitions from their start offsets, giving each message to `done`, until `done`
/// says so or (`Until::End`) every partition is read to its end; at `deadline` in any case.
async fn follow<F>(
    config: &Config,
    topic: &str,
    starts: Vec<(i32, i64)>,
    until: Until,
    deadline: Instant,
    mut done: F,
) -> anyhow::Result<()>
where
    F: FnMut(&rdkafka::message::BorrowedMessage<'_>) -> bool + Send,
{
    let r = reader(config)?;
    let mut list = TopicPartitionList::new();
    for (p, o) in &starts {
        list.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    r.assign(&list)?;
    let mut at_end = std::collections::HashSet::new();
    if starts.is_empty() {
        return Ok(());
    }
    tokio::task::block_in_place(|| {
        while Instant::now() < deadline {
            match r.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                    // Reading to the end (not waiting for anything): every partition is read.
                    if at_end.len() == starts.len() && until == Until::End {
                        return Ok(());
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "reading; going on"),
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    if done(&m) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_its_columns_and_trims_line_ends() {
        let mut t = Table::new(vec!["A", "LONGER"]);
        t.rows.push(vec!["wide cell".into(), "x".into()]);
        t.rows.push(vec!["é".into(), "".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide cell  x\né\n");
    }
}
