//! Decide, as pure code: for one event, what happens at each target of its site. No I/O, no
//! locks, no clock: the policy, a view of the block state and `now` come in, [`Decision`]s come
//! out, and `pipeline::report` turns each into a result message.
//!
//! The order is the safety order: route and filter, then dedupe (a block already in place costs
//! nothing), then the escalation level and duration, and **last**, immediately before the rule is
//! built, the never-block networks and the addresses no rule may ever name.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::dedupe::{Check, Origin, TrackedBlock};
use super::policy::{idempotency_key, Policy, Target};
use crate::checkpoint::sam::{RuleKey, SamRule};
use crate::command::{Action, Command};
use crate::event::{Event, MacAddr};
use crate::flowmon::Priority;

/// Why a result has its outcome: a short, stable code (the `code` of `samgate.result.v1`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Code {
    // filtered
    UnknownSite,
    IdsNotEnabled,
    MethodNotAllowed,
    PriorityUnknown,
    PriorityBelowMinimum,
    PerspectiveNotAllowed,
    // duplicate
    /// A block for the same key is in place.
    ActiveBlock,
    /// A block for the same key is being enforced right now.
    BeingEnforced,
    // suppressed
    NeverBlock,
    // not_blockable
    /// Unspecified, loopback, multicast, broadcast, link-local or another special range.
    SpecialAddress,
    /// A management server's own address.
    ManagementServer,
    /// A gateway that fetches a feed (`targets.<feed>.pollers`).
    FeedPoller,
    // dry_run
    DryRun,
    // blocked
    /// Sent, and every gateway confirmed it.
    Enforced,
    /// Found in place on every gateway (its sender stopped before it could tell), not sent again.
    Verified,
    // failed
    /// Still not confirmed at `run.retry_deadline`.
    RetriesExhausted,
    /// The management server refused samgate's credentials or permissions.
    Auth,
    /// The request can never succeed as configured (an unknown gateway, a refused certificate…).
    Permanent,
    /// `run.max_tracked_blocks` active blocks are tracked already; this one would not be.
    StateFull,
    // exempted
    /// An operator exempted the address at the site (set now, or in force).
    Exempted,
    // unblocked
    /// Removed from the gateways that held it.
    Removed,
    /// No gateway held it (nothing to remove).
    NotInPlace,
    /// A rule with samgate's tag that no block explained, removed (`reconcile.remove_orphans`).
    OrphanRemoved,
    // released
    /// An operator ended the exemption.
    Released,
    /// The exemption's time ran out.
    ExemptionEnded,
    /// There was no exemption to end.
    NotExempted,
    // expired
    /// The block's time ran out (the gateways drop the rule themselves: every rule has `-t`).
    Expired,
    // blocked, by reconcile
    /// The gateway had lost the rule of an active block; sent again.
    Reasserted,
    // orphaned
    /// A gateway holds a rule with samgate's tag that no block explains (left in place).
    Orphaned,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What the state knows of a key, as decide needs it.
pub trait BlockView {
    fn check(&self, key: &RuleKey, now: DateTime<Utc>) -> Check;
    /// The end of the address's exemption at the site, if one is in force.
    fn exemption(&self, site: &str, ip: IpAddr, now: DateTime<Utc>) -> Option<DateTime<Utc>>;
}

/// A rule to enforce (or, in dry-run mode, to show).
#[derive(Debug, Clone, PartialEq)]
pub struct Enforce {
    pub target: Arc<Target>,
    pub key: RuleKey,
    pub rule: SamRule,
    /// 0 for a first block, +1 per repeat within the escalation window.
    pub level: u32,
    pub duration: Duration,
    /// A previous owner may have sent this rule already (its outcome was never seen): ask the
    /// gateways before sending anything.
    pub verify_first: Option<TrackedBlock>,
    pub origin: Origin,
    /// The source's MAC address, when the event carried one (a FortiGate stitch passes it on
    /// for access-layer quarantine); never part of the rule's identity.
    pub mac: Option<MacAddr>,
}

/// Rules to remove from a target's gateways (an unblock).
#[derive(Debug, Clone, PartialEq)]
pub struct Unblock {
    pub target: Arc<Target>,
    pub key: RuleKey,
    /// The rule as samgate makes it (what is looked for and cancelled).
    pub rule: SamRule,
    pub origin: Origin,
}

/// What happens to one event at one target (or, for `Filtered`, at all of them).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The policy does not act on the event.
    Filtered { code: Code, detail: String },
    /// A block for this key is in place or on its way: no firewall call.
    Duplicate {
        target: Arc<Target>,
        key: RuleKey,
        /// The block in place (`None` while it is still being enforced).
        block: Option<TrackedBlock>,
    },
    /// The address is in a never-block network.
    Suppressed {
        target: Arc<Target>,
        key: RuleKey,
        level: u32,
        duration: Duration,
        network: IpNet,
    },
    /// No rule may name this address (loopback, multicast, a management server, …).
    NotBlockable {
        target: Arc<Target>,
        key: RuleKey,
        code: Code,
        detail: String,
    },
    /// Dry-run mode: the rule that would be enforced.
    DryRun(Enforce),
    /// Enforce this rule.
    Enforce(Enforce),
    /// An operator exempted the address at this site: no automatic block.
    Exempted {
        target: Arc<Target>,
        key: RuleKey,
        until: DateTime<Utc>,
    },
    /// Remove the rule from the target's gateways.
    Unblock(Unblock),
    /// Exempt the address at the command's site until `until`.
    Exempt { until: DateTime<Utc> },
    /// End the address's exemption at the command's site.
    Release,
}

/// Decides what `event` leads to at each target of its site.
pub fn decide(
    event: &Event,
    policy: &Policy,
    state: &impl BlockView,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let targets = match policy.route(event) {
        Ok(targets) => targets,
        Err(filtered) => {
            return vec![Decision::Filtered {
                code: filtered.code,
                detail: filtered.detail,
            }]
        }
    };
    let source = event.flowmon.source.to_canonical();
    targets
        .iter()
        .map(|target| decide_target(event, source, target, policy, state, dry_run, now))
        .collect()
}

fn decide_target(
    event: &Event,
    source: IpAddr,
    target: &Arc<Target>,
    policy: &Policy,
    state: &impl BlockView,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Decision {
    let key = idempotency_key(target, source);
    // An operator's exemption comes first: an exempted address is never blocked automatically,
    // and a detection while its block is being removed (`unblock --exempt-for`) is exempted too.
    if let Some(until) = state.exemption(&event.site, source, now) {
        return Decision::Exempted {
            target: target.clone(),
            key,
            until,
        };
    }
    let (level, verify_first) = match dedupe(&key, state, now) {
        Ok(found) => found,
        Err(block) => {
            let target = target.clone();
            return Decision::Duplicate { target, key, block };
        }
    };
    let duration = policy.duration(event.flowmon.priority, level);
    guarded(
        Enforce {
            target: target.clone(),
            key,
            rule: target.rule(source, duration, key),
            level,
            duration,
            verify_first,
            origin: Origin::Automatic,
            mac: event.source_mac,
        },
        &event.site,
        source,
        policy,
        dry_run,
    )
}

/// Dedupe, for a detection and an operator's block alike: `Err` with the block in place (`None`
/// while one is on its way) is a duplicate; otherwise the escalation level, and the block to
/// verify first if a previous owner may have sent it.
fn dedupe(
    key: &RuleKey,
    state: &impl BlockView,
    now: DateTime<Utc>,
) -> Result<(u32, Option<TrackedBlock>), Option<TrackedBlock>> {
    match state.check(key, now) {
        Check::Active(block) => Err(Some(block)),
        Check::Pending => Err(None),
        Check::Unconfirmed(block) => Ok((block.level, Some(block))),
        Check::Repeat { level } => Ok((level, None)),
        Check::New => Ok((0, None)),
    }
}

/// The safety checks, last, immediately before a rule goes out: the never-block networks, then
/// the addresses no rule may name; then dry-run or enforce.
fn guarded(
    enforce: Enforce,
    site: &str,
    source: IpAddr,
    policy: &Policy,
    dry_run: bool,
) -> Decision {
    let Enforce {
        target,
        key,
        level,
        duration,
        ..
    } = enforce.clone();
    // Safety last: nothing below this line may be skipped on the way to a rule.
    if let Some(network) = policy.never_block(site, source) {
        return Decision::Suppressed {
            target,
            key,
            level,
            duration,
            network,
        };
    }
    if let Some((code, detail)) = policy.not_blockable(source) {
        return Decision::NotBlockable {
            target,
            key,
            code,
            detail,
        };
    }
    // The source's MAC only where it is surely the source's own.
    let mut enforce = enforce;
    enforce.mac = enforce
        .mac
        .filter(|mac| policy.mac_usable(site, source, *mac));
    if dry_run {
        Decision::DryRun(enforce)
    } else {
        Decision::Enforce(enforce)
    }
}

/// Decides what an operator command leads to at each target of its site: the same dedupe and
/// the same safety checks as a detection for `block` (an operator cannot block a management
/// server by mistake); `unblock` removes the rule wherever it is (removing is always safe);
/// `exempt` / `unexempt` are one decision for the site. `reconcile` is not decided here.
pub fn decide_command(
    command: &Command,
    policy: &Policy,
    state: &impl BlockView,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let (Some(site), Some(ip)) = (command.site.as_deref(), command.ip) else {
        return Vec::new();
    };
    let ip = ip.to_canonical();
    let Some(targets) = policy.site_targets(site) else {
        return vec![Decision::Filtered {
            code: Code::UnknownSite,
            detail: format!("site {site:?} has no [sites] entry"),
        }];
    };
    let exempt_until =
        |seconds: u64| now + chrono::Duration::seconds(seconds.min(i64::MAX as u64 / 1000) as i64);
    match command.action {
        Action::Block => targets
            .iter()
            .map(|target| {
                let key = idempotency_key(target, ip);
                let (level, verify_first) = match dedupe(&key, state, now) {
                    Ok(found) => found,
                    Err(block) => {
                        let target = target.clone();
                        return Decision::Duplicate { target, key, block };
                    }
                };
                let duration = command
                    .duration_s
                    .map(Duration::from_secs)
                    .unwrap_or_else(|| policy.duration(Priority::High, level));
                let enforce = Enforce {
                    target: target.clone(),
                    key,
                    rule: target.rule(ip, duration, key),
                    level,
                    duration,
                    verify_first,
                    origin: Origin::Manual,
                    mac: None,
                };
                guarded(enforce, site, ip, policy, dry_run)
            })
            .collect(),
        Action::Unblock => {
            let exempt = command
                .exempt_for_s
                .filter(|s| *s > 0)
                .map(|s| Decision::Exempt {
                    until: exempt_until(s),
                });
            exempt
                .into_iter()
                .chain(targets.iter().map(|target| {
                    let key = idempotency_key(target, ip);
                    Decision::Unblock(Unblock {
                        target: target.clone(),
                        key,
                        rule: target.rule(ip, Duration::ZERO, key),
                        origin: Origin::Manual,
                    })
                }))
                .collect()
        }
        Action::Exempt => vec![Decision::Exempt {
            until: exempt_until(command.exempt_for_s.unwrap_or(0)),
        }],
        Action::Unexempt => vec![Decision::Release],
        Action::Reconcile => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::checkpoint::sam::Criteria;
    use crate::config::Config;
    use crate::flowmon::{FlowmonEvent, InputFormat, Priority};

    /// A state that answers from a table.
    #[derive(Default)]
    struct Table(HashMap<RuleKey, Check>);

    impl BlockView for Table {
        fn check(&self, key: &RuleKey, _now: DateTime<Utc>) -> Check {
            self.0.get(key).cloned().unwrap_or(Check::New)
        }

        fn exemption(&self, _: &str, ip: IpAddr, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
            (ip == "198.51.100.77".parse::<IpAddr>().unwrap())
                .then(|| now + chrono::Duration::hours(1))
        }
    }

    fn policy() -> Policy {
        let config = Config::from_toml(
            r#"
            [policy]
            never_block = ["10.99.0.0/16"]
            [checkpoint.servers.hq]
            url = "https://192.0.2.250"
            api_key = "k"
            [targets.edge]
            server = "hq"
            gateways = ["gw-1", "gw-2"]
            [targets.branch]
            server = "hq"
            gateways = ["gw-3"]
            mode = "fw_samp"
            [sites.prague]
            targets = ["edge", "branch"]
            never_block = ["10.1.0.0/24"]
            collectors = ["10.2.0.5"]
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        Policy::new(&config, &[("hq".into(), "192.0.2.250".parse().unwrap())])
    }

    fn event(method: &str, priority: Priority, source: &str) -> Event {
        Event {
            schema: "samgate.event.v1".into(),
            id: "0".repeat(32),
            site: "prague".into(),
            collector: "fm".into(),
            received_at: Utc::now(),
            line: 1,
            flowmon: FlowmonEvent {
                format: InputFormat::AdsStandard,
                event_id: Some("1".into()),
                method: Some(method.into()),
                subtype: None,
                mitre: None,
                description: None,
                perspective: Some("Security".into()),
                priority,
                priority_raw: None,
                detected_at: None,
                first_flow: None,
                detail: None,
                ports: None,
                protocol: None,
                source: source.parse().unwrap(),
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

    /// One word per decision, for table tests.
    fn shape(decisions: &[Decision]) -> Vec<String> {
        decisions
            .iter()
            .map(|d| match d {
                Decision::Filtered { code, .. } => format!("filtered:{}", code.as_str()),
                Decision::Duplicate { block: Some(_), .. } => "duplicate:active".into(),
                Decision::Duplicate { block: None, .. } => "duplicate:pending".into(),
                Decision::Suppressed { network, .. } => format!("suppressed:{network}"),
                Decision::NotBlockable { code, .. } => format!("not_blockable:{}", code.as_str()),
                Decision::DryRun(e) => format!("dry_run:{}", e.level),
                Decision::Exempted { .. } => "exempted".into(),
                Decision::Unblock(u) => format!("unblock:{}", u.target.name),
                Decision::Exempt { .. } => "exempt".into(),
                Decision::Release => "release".into(),
                Decision::Enforce(e) => format!(
                    "enforce:{}:{}s{}",
                    e.level,
                    e.duration.as_secs(),
                    if e.verify_first.is_some() {
                        ":verify"
                    } else {
                        ""
                    }
                ),
            })
            .collect()
    }

    fn block(level: u32) -> TrackedBlock {
        let now = Utc::now();
        TrackedBlock {
            level,
            blocked_at: now,
            expires_at: now + chrono::Duration::hours(1),
            event_id: None,
            origin: Origin::Automatic,
            actor: None,
        }
    }

    #[test]
    fn each_event_gets_one_decision_per_target_in_safety_order() {
        let p = policy();
        let now = Utc::now();
        let empty = Table::default();
        let cases: Vec<(&str, Priority, &str, Vec<&str>)> = vec![
            (
                "SCANS",
                Priority::High,
                "198.51.100.1",
                vec!["enforce:0:3600s"; 2],
            ),
            (
                "SCANS",
                Priority::Critical,
                "198.51.100.1",
                vec!["enforce:0:21600s"; 2],
            ),
            (
                "DOS",
                Priority::High,
                "198.51.100.1",
                vec!["filtered:method_not_allowed"],
            ),
            (
                "SCANS",
                Priority::Low,
                "198.51.100.1",
                vec!["filtered:priority_below_minimum"],
            ),
            (
                "SCANS",
                Priority::High,
                "10.99.3.4",
                vec!["suppressed:10.99.0.0/16"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "10.1.0.7",
                vec!["suppressed:10.1.0.0/24"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "10.2.0.5",
                vec!["suppressed:10.2.0.5/32"; 2],
            ),
            // A mapped IPv6 address is its IPv4 address: never-block holds for it too.
            (
                "SCANS",
                Priority::High,
                "::ffff:10.99.3.4",
                vec!["suppressed:10.99.0.0/16"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "192.0.2.250",
                vec!["not_blockable:management_server"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "::ffff:192.0.2.250",
                vec!["not_blockable:management_server"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "127.0.0.1",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "0.0.0.0",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "255.255.255.255",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "224.0.0.5",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "169.254.1.1",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "fe80::1",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "::1",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "ff02::1",
                vec!["not_blockable:special_address"; 2],
            ),
            (
                "SCANS",
                Priority::High,
                "2001:db8::7",
                vec!["enforce:0:3600s"; 2],
            ),
        ];
        for (method, priority, source, expected) in cases {
            let decisions = decide(&event(method, priority, source), &p, &empty, false, now);
            assert_eq!(
                shape(&decisions),
                expected,
                "{method} {priority:?} {source}"
            );
        }
    }

    #[test]
    fn the_state_decides_duplicates_levels_and_verification() {
        let p = policy();
        let now = Utc::now();
        let e = event("SCANS", Priority::High, "198.51.100.1");
        let source = "198.51.100.1".parse().unwrap();
        let keys: Vec<RuleKey> = p
            .route(&e)
            .unwrap()
            .iter()
            .map(|t| idempotency_key(t, source))
            .collect();
        let cases = [
            (Check::Active(block(0)), "duplicate:active"),
            (Check::Pending, "duplicate:pending"),
            (Check::Repeat { level: 2 }, "enforce:2:86400s"),
            (Check::Unconfirmed(block(1)), "enforce:1:21600s:verify"),
            (Check::New, "enforce:0:3600s"),
        ];
        for (check, expected) in cases {
            let state = Table(HashMap::from([(keys[0], check.clone())]));
            let decisions = decide(&e, &p, &state, false, now);
            assert_eq!(
                shape(&decisions),
                vec![expected, "enforce:0:3600s"],
                "{check:?} on the first target only"
            );
        }
        // A block in place stays a duplicate even when its address became protected since.
        let protected = event("SCANS", Priority::High, "10.99.3.4");
        let key = idempotency_key(
            &p.route(&protected).unwrap()[0],
            "10.99.3.4".parse().unwrap(),
        );
        let state = Table(HashMap::from([(key, Check::Active(block(0)))]));
        assert_eq!(
            shape(&decide(&protected, &p, &state, false, now))[0],
            "duplicate:active"
        );
    }

    #[test]
    fn an_exempted_address_is_not_blocked_automatically_even_while_its_block_is_removed() {
        let p = policy();
        let now = Utc::now();
        let e = event("SCANS", Priority::High, "198.51.100.77");
        assert_eq!(
            shape(&decide(&e, &p, &Table::default(), false, now)),
            vec!["exempted"; 2]
        );
        let key = idempotency_key(&p.route(&e).unwrap()[0], "198.51.100.77".parse().unwrap());
        let state = Table(HashMap::from([(key, Check::Active(block(0)))]));
        assert_eq!(
            shape(&decide(&e, &p, &state, false, now)),
            vec!["exempted"; 2]
        );
    }

    #[test]
    fn commands_take_the_same_safety_checks() {
        use crate::command::{Action, Command};
        let p = policy();
        let now = Utc::now();
        let command = |action: Action, ip: &str| Command {
            site: Some("prague".into()),
            ip: Some(ip.parse().unwrap()),
            exempt_for_s: Some(3600),
            ..Command::new(action)
        };
        let cases: Vec<(Command, Vec<&str>)> = vec![
            (
                command(Action::Block, "198.51.100.1"),
                vec!["enforce:0:3600s"; 2],
            ),
            (
                Command {
                    duration_s: Some(120),
                    ..command(Action::Block, "198.51.100.1")
                },
                vec!["enforce:0:120s"; 2],
            ),
            // An exemption stops automatic blocks only: the operator's block goes through.
            (
                command(Action::Block, "198.51.100.77"),
                vec!["enforce:0:3600s"; 2],
            ),
            (
                command(Action::Block, "10.99.3.4"),
                vec!["suppressed:10.99.0.0/16"; 2],
            ),
            (
                command(Action::Block, "::ffff:192.0.2.250"),
                vec!["not_blockable:management_server"; 2],
            ),
            (
                command(Action::Unblock, "198.51.100.1"),
                vec!["exempt", "unblock:edge", "unblock:branch"],
            ),
            (
                Command {
                    exempt_for_s: None,
                    ..command(Action::Unblock, "10.99.3.4")
                },
                vec!["unblock:edge", "unblock:branch"],
            ),
            (command(Action::Exempt, "198.51.100.1"), vec!["exempt"]),
            (command(Action::Unexempt, "198.51.100.1"), vec!["release"]),
            (
                Command {
                    site: Some("nowhere".into()),
                    ..command(Action::Block, "198.51.100.1")
                },
                vec!["filtered:unknown_site"],
            ),
        ];
        for (c, expected) in cases {
            let decisions = decide_command(&c, &p, &Table::default(), false, now);
            assert_eq!(shape(&decisions), expected, "{:?} {:?}", c.action, c.ip);
        }
        let block = command(Action::Block, "198.51.100.1");
        let key = idempotency_key(
            &p.site_targets("prague").unwrap()[0],
            "198.51.100.1".parse().unwrap(),
        );
        let state = Table(HashMap::from([(
            key,
            Check::Active(super::tests::block(0)),
        )]));
        assert_eq!(
            shape(&decide_command(&block, &p, &state, false, now)),
            vec!["duplicate:active", "enforce:0:3600s"]
        );
    }

    #[test]
    fn dry_run_builds_the_same_rule_and_sends_nothing() {
        let p = policy();
        let e = event("SCANS", Priority::High, "198.51.100.1");
        let decisions = decide(&e, &p, &Table::default(), true, Utc::now());
        assert_eq!(shape(&decisions), vec!["dry_run:0"; 2]);
        let Decision::DryRun(enforce) = &decisions[0] else {
            unreachable!()
        };
        assert_eq!(
            enforce.rule.criteria,
            Criteria::Src("198.51.100.1".parse().unwrap())
        );
        assert_eq!(enforce.rule.key, Some(enforce.key));
    }

    #[test]
    fn every_code_has_a_stable_name() {
        use strum::IntoEnumIterator;
        for code in Code::iter() {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
