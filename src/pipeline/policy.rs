//! The policy, compiled from config: which events are acted on, where their blocks go, for how
//! long, and which addresses are never blocked. Pure; `pipeline::decide` applies it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::decide::Code;
use crate::checkpoint::sam::{Criteria, LogType, RuleKey, SamAction, SamMode, SamRule};
use crate::config::{Config, CriteriaKind, TargetConfig, TargetKind, TargetMode};
use crate::event::{Event, MacAddr};
use crate::flowmon::Priority;
use crate::fortigate::enforcer::FortiMode;

/// An enforcement target, resolved from config.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    /// What its calls are paced and capped by: a Check Point management server, or the
    /// FortiGate device itself.
    pub server: String,
    /// Where its rule must be: a Check Point target's gateways, or a FortiGate's one device.
    pub gateways: Vec<String>,
    pub mode: Mode,
    /// The rule's shape (a FortiGate ban is always `drop` of the source, no log flag).
    pub action: SamAction,
    pub close_connections: bool,
    pub log: LogType,
    pub criteria: CriteriaKind,
}

/// How a target's rules are issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Check Point: `fw sam` or `fw samp` through `run-script`.
    Sam(SamMode),
    /// FortiGate: the banned-IP list or an automation stitch.
    Forti(FortiMode),
    /// A feed: listed for gateways to fetch (`samgate feed`), nothing pushed.
    Feed,
}

impl Mode {
    /// The name results and docs use (`fw_sam`, `fw_samp`, `banned_ip`, `webhook`, `feed`).
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Sam(SamMode::FwSam) => "fw_sam",
            Mode::Sam(SamMode::FwSamp) => "fw_samp",
            Mode::Forti(FortiMode::BannedIp) => "banned_ip",
            Mode::Forti(FortiMode::Webhook { .. }) => "webhook",
            Mode::Feed => "feed",
        }
    }
}

impl Target {
    /// Resolves a validated target's config.
    pub fn from_config(name: &str, t: &TargetConfig) -> Self {
        match t.kind {
            TargetKind::Checkpoint => Target {
                name: name.to_owned(),
                server: t.server.clone().unwrap_or_default(),
                gateways: t.gateways.clone(),
                mode: Mode::Sam(match t.mode {
                    Some(TargetMode::FwSamp) => SamMode::FwSamp,
                    _ => SamMode::FwSam,
                }),
                action: t.action.unwrap_or(SamAction::Drop),
                close_connections: t.close_connections.unwrap_or(true),
                log: t.log.unwrap_or_default(),
                criteria: t.criteria.unwrap_or(CriteriaKind::Src),
            },
            TargetKind::Fortigate => {
                let device = t.device.clone().unwrap_or_default();
                Target {
                    name: name.to_owned(),
                    server: device.clone(),
                    gateways: vec![device],
                    mode: Mode::Forti(match (t.mode, &t.stitch) {
                        (Some(TargetMode::Webhook), Some(stitch)) => FortiMode::Webhook {
                            stitch: stitch.clone(),
                        },
                        _ => FortiMode::BannedIp,
                    }),
                    action: SamAction::Drop,
                    close_connections: false,
                    log: LogType::None,
                    criteria: CriteriaKind::Src,
                }
            }
            // A feed is its own "server" (its limits) and its own one "gateway" (results say
            // where the block is: in the feed of that name).
            TargetKind::Feed => Target {
                name: name.to_owned(),
                server: name.to_owned(),
                gateways: vec![name.to_owned()],
                mode: Mode::Feed,
                action: SamAction::Drop,
                close_connections: false,
                log: LogType::None,
                criteria: CriteriaKind::Src,
            },
        }
    }

    /// The rule for `source`, lasting `duration`, tagged with `key`.
    pub fn rule(&self, source: IpAddr, duration: Duration, key: RuleKey) -> SamRule {
        SamRule {
            action: self.action,
            close_connections: self.close_connections,
            criteria: match self.criteria {
                CriteriaKind::Src => Criteria::Src(source),
                CriteriaKind::Any => Criteria::Any(source),
            },
            timeout_secs: Some(duration.as_secs().clamp(1, crate::command::MAX_SECONDS) as u32),
            log: self.log,
            key: Some(key),
        }
    }

    pub fn action_name(&self) -> &'static str {
        match self.action {
            SamAction::Drop => "drop",
            SamAction::Reject => "reject",
            SamAction::Notify => "notify",
        }
    }
}

/// Why an event is not acted on (`filtered` results carry the code and the detail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    pub code: Code,
    pub detail: String,
}

/// The policy, compiled from config.
#[derive(Debug, Clone)]
pub struct Policy {
    methods: HashSet<String>,
    ids_events: bool,
    min_priority: Priority,
    act_on_unknown_priority: bool,
    perspectives: HashSet<String>,
    global_never_block: Vec<IpNet>,
    site_never_block: BTreeMap<String, Vec<IpNet>>,
    /// Per site, the networks whose sources' MAC addresses may be passed on.
    mac_networks: BTreeMap<String, Vec<IpNet>>,
    /// Ranges no rule may name: the special ranges, then `policy.not_blockable`.
    special: Vec<IpNet>,
    /// The management servers' own addresses, by server name.
    servers: Vec<(String, IpAddr)>,
    /// The gateways that fetch feeds, as `<feed>/<poller>`.
    pollers: Vec<(String, IpAddr)>,
    routes: BTreeMap<String, Vec<Arc<Target>>>,
    targets: BTreeMap<String, Arc<Target>>,
    durations: Vec<Duration>,
    critical_skips_a_step: bool,
    pub escalation_window: Duration,
}

impl Policy {
    /// Compiles a validated config. `servers` are the management servers' addresses (by server
    /// name): no rule may ever name them.
    pub fn new(config: &Config, servers: &[(String, IpAddr)]) -> Self {
        let p = &config.policy;
        let global_never_block = p.never_block.clone();
        let targets: BTreeMap<String, Arc<Target>> = config
            .targets
            .iter()
            .map(|(name, t)| (name.clone(), Arc::new(Target::from_config(name, t))))
            .collect();
        let mut site_never_block = BTreeMap::new();
        let mut routes = BTreeMap::new();
        let mut mac_networks = BTreeMap::new();
        for (site, s) in &config.sites {
            mac_networks.insert(site.clone(), s.mac_networks.clone());
            let mut nets = s.never_block.clone();
            nets.extend(s.collectors.iter().map(|ip| IpNet::from(*ip)));
            site_never_block.insert(site.clone(), nets);
            routes.insert(
                site.clone(),
                s.targets.iter().map(|t| targets[t].clone()).collect(),
            );
        }
        Self {
            methods: p.methods.iter().cloned().collect(),
            ids_events: p.ids_events,
            min_priority: p.min_priority,
            act_on_unknown_priority: p.act_on_unknown_priority,
            perspectives: p.perspectives.iter().cloned().collect(),
            global_never_block,
            site_never_block,
            mac_networks,
            special: crate::config::SPECIAL_RANGES
                .iter()
                .map(|net| net.parse().expect("a valid network"))
                .chain(p.not_blockable.iter().copied())
                .collect(),
            servers: servers
                .iter()
                .map(|(name, ip)| (name.clone(), ip.to_canonical()))
                .collect(),
            pollers: config
                .targets
                .iter()
                .flat_map(|(feed, t)| {
                    t.pollers
                        .iter()
                        .map(move |(name, ip)| (format!("{feed}/{name}"), ip.to_canonical()))
                })
                .collect(),
            routes,
            targets,
            durations: p.durations.iter().map(|d| d.0).collect(),
            critical_skips_a_step: p.critical_skips_a_step,
            escalation_window: p.escalation_window,
        }
    }

    /// The targets a site routes to (`None`: no such site).
    pub fn site_targets(&self, site: &str) -> Option<&[Arc<Target>]> {
        self.routes.get(site).map(Vec::as_slice)
    }

    /// The configured sites.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// What a new detection must be to be acted on: the methods, the lowest priority.
    pub fn acts_on(&self) -> (Vec<String>, Priority) {
        let mut methods: Vec<String> = self.methods.iter().cloned().collect();
        methods.sort();
        (methods, self.min_priority)
    }

    /// A target by name.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.get(name).map(|t| t.as_ref())
    }

    /// The targets an event's block goes to, or why it is not acted on. Checks, in order: the
    /// site is routed, the method (or IDS) is allowed, the priority, the perspective.
    pub fn route(&self, event: &Event) -> Result<&[Arc<Target>], Filtered> {
        let f = &event.flowmon;
        let targets = self.routes.get(&event.site).ok_or_else(|| Filtered {
            code: Code::UnknownSite,
            detail: format!("site {:?} has no [sites] entry", event.site),
        })?;
        self.kind_allowed(f)?;
        match f.priority {
            Priority::Unknown if !self.act_on_unknown_priority => {
                return Err(Filtered {
                    code: Code::PriorityUnknown,
                    detail: "the event has no priority (policy.act_on_unknown_priority = false)"
                        .into(),
                })
            }
            Priority::Unknown => {}
            p if p < self.min_priority => {
                return Err(Filtered {
                    code: Code::PriorityBelowMinimum,
                    detail: format!(
                        "priority {} is below {}",
                        p.as_str(),
                        self.min_priority.as_str()
                    ),
                })
            }
            _ => {}
        }
        if !self.perspectives.is_empty() {
            let perspective = f.perspective.as_deref().unwrap_or("");
            if !self.perspectives.contains(perspective) {
                return Err(Filtered {
                    code: Code::PerspectiveNotAllowed,
                    detail: format!("perspective {perspective:?} is not in policy.perspectives"),
                });
            }
        }
        Ok(targets)
    }

    /// IDS events only when enabled; ADS events only for an allowed method (or METHOD/Subtype).
    fn kind_allowed(&self, f: &crate::flowmon::FlowmonEvent) -> Result<(), Filtered> {
        if f.format.is_ids() {
            return match self.ids_events {
                true => Ok(()),
                false => Err(Filtered {
                    code: Code::IdsNotEnabled,
                    detail: "IDS events are not acted on (policy.ids_events = false)".into(),
                }),
            };
        }
        let method = f.method.as_deref().unwrap_or("");
        let with_subtype = f.subtype.as_deref().map(|s| format!("{method}/{s}"));
        let allowed = self.methods.contains(method)
            || with_subtype
                .as_ref()
                .is_some_and(|m| self.methods.contains(m));
        if allowed {
            return Ok(());
        }
        let shown = match (with_subtype.as_deref(), method) {
            (Some(m), _) => m,
            (None, "") => "(none)",
            (None, m) => m,
        };
        Err(Filtered {
            code: Code::MethodNotAllowed,
            detail: format!("method {shown} is not in policy.methods"),
        })
    }

    /// The never-block network that covers `ip` at `site`, if any. Called immediately before a
    /// command is built, for every block.
    pub fn never_block(&self, site: &str, ip: IpAddr) -> Option<IpNet> {
        let ip = ip.to_canonical(); // ::ffff:10.0.0.1 is 10.0.0.1
        let site_nets = self
            .site_never_block
            .get(site)
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.global_never_block
            .iter()
            .chain(site_nets)
            .find(|net| net.contains(&ip))
            .copied()
    }

    /// Whether no rule may name `ip` for `site`: a never-block network or a not-blockable
    /// address (what reconcile and the feeds leave out of what they expect or list).
    pub fn protects(&self, site: &str, ip: IpAddr) -> bool {
        self.never_block(site, ip).is_some() || self.not_blockable(ip).is_some()
    }

    /// Whether `mac`, seen by `site`'s probes for `source`, may be passed on to a firewall: a
    /// host's own (unicast) address, for a source in one of the site's `mac_networks` (beyond
    /// a router, the MAC Flowmon saw is the router's, which must never be quarantined).
    pub fn mac_usable(&self, site: &str, source: IpAddr, mac: MacAddr) -> bool {
        let source = source.to_canonical();
        mac.is_unicast_host()
            && self
                .mac_networks
                .get(site)
                .is_some_and(|nets| nets.iter().any(|net| net.contains(&source)))
    }

    /// Why no rule may name `ip`, if so: a special range (loopback, multicast, …), a
    /// management server's own address, or a gateway that fetches a feed.
    pub fn not_blockable(&self, ip: IpAddr) -> Option<(Code, String)> {
        let ip = ip.to_canonical();
        if let Some((name, _)) = self.servers.iter().find(|(_, server)| *server == ip) {
            return Some((
                Code::ManagementServer,
                format!("{ip} is the address of management server {name}"),
            ));
        }
        if let Some((name, _)) = self.pollers.iter().find(|(_, poller)| *poller == ip) {
            return Some((
                Code::FeedPoller,
                format!("{ip} is the address of feed poller {name}"),
            ));
        }
        if let IpAddr::V4(v4) = ip {
            if v4.is_broadcast() {
                return Some((
                    Code::SpecialAddress,
                    format!("{ip} is the broadcast address"),
                ));
            }
        }
        self.special
            .iter()
            .find(|net| net.contains(&ip))
            .map(|net| {
                (
                    Code::SpecialAddress,
                    format!("{ip} is in {net}, which no rule may name"),
                )
            })
    }

    /// Block duration for a source's `level`-th block (0 = first) at `priority`, capped at the
    /// last step.
    pub fn duration(&self, priority: Priority, level: u32) -> Duration {
        let skip = usize::from(self.critical_skips_a_step && priority == Priority::Critical);
        let step = (level as usize + skip).min(self.durations.len() - 1);
        self.durations[step]
    }
}

/// Idempotency key: a hash of target, criteria, address and action. One key = one rule on the
/// target's gateways, whichever sites detected the address: a target's gateways see one address
/// space, so the same address from two sites is one host to them (see docs/DESIGN.md).
pub fn idempotency_key(target: &Target, source: IpAddr) -> RuleKey {
    let criteria = match target.criteria {
        CriteriaKind::Src => "src",
        CriteriaKind::Any => "any",
    };
    let mut hash = Sha256::new();
    for part in [
        target.name.as_str(),
        criteria,
        &source.to_string(),
        target.action_name(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    RuleKey::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowmon::{FlowmonEvent, InputFormat};

    fn config() -> Config {
        Config::from_toml(
            r#"
            [policy]
            never_block = ["10.99.0.0/16"]
            [checkpoint.servers.hq]
            url = "https://192.0.2.250"
            api_key = "k"
            [targets.hq-edge]
            server = "hq"
            gateways = ["gw-1"]
            [sites.prague]
            targets = ["hq-edge"]
            never_block = ["10.1.0.0/24"]
            collectors = ["10.2.0.5"]
            "#,
        )
        .unwrap()
        .validate()
        .unwrap()
    }

    fn event(method: &str, priority: Priority, source: &str) -> Event {
        Event {
            schema: "samgate.event.v1".into(),
            id: "0".repeat(32),
            site: "prague".into(),
            collector: "fm".into(),
            received_at: chrono::Utc::now(),
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

    fn policy() -> Policy {
        Policy::new(&config(), &[("hq".into(), "192.0.2.250".parse().unwrap())])
    }

    #[test]
    fn the_safe_methods_are_acted_on_and_victim_methods_are_not() {
        let p = policy();
        assert_eq!(
            p.route(&event("SCANS", Priority::High, "198.51.100.1"))
                .unwrap()
                .len(),
            1
        );
        for victim in ["DOS", "SRVNA", "REFLECTDOS", "BROKENSEN", "NATDET"] {
            let f = p
                .route(&event(victim, Priority::Critical, "198.51.100.1"))
                .unwrap_err();
            assert_eq!(f.code, Code::MethodNotAllowed, "{victim}");
        }
        let mut blacklist = event("BLACKLIST", Priority::High, "198.51.100.1");
        assert_eq!(
            p.route(&blacklist).unwrap_err().code,
            Code::MethodNotAllowed,
            "only some subtypes"
        );
        blacklist.flowmon.subtype = Some("BotnetDomains".into());
        assert!(p.route(&blacklist).is_ok());
    }

    #[test]
    fn priority_perspective_site_and_ids_filters() {
        let p = policy();
        assert_eq!(
            p.route(&event("SCANS", Priority::Low, "198.51.100.1"))
                .unwrap_err()
                .code,
            Code::PriorityBelowMinimum
        );
        assert_eq!(
            p.route(&event("SCANS", Priority::Unknown, "198.51.100.1"))
                .unwrap_err()
                .code,
            Code::PriorityUnknown
        );
        let mut e = event("SCANS", Priority::High, "198.51.100.1");
        e.site = "brno".into();
        assert_eq!(p.route(&e).unwrap_err().code, Code::UnknownSite);
        let mut e = event("SCANS", Priority::High, "198.51.100.1");
        e.flowmon.format = InputFormat::Ids;
        assert_eq!(p.route(&e).unwrap_err().code, Code::IdsNotEnabled);
        let mut c = config();
        c.policy.perspectives = vec!["Other".into()];
        let strict = Policy::new(&c, &[]);
        assert_eq!(
            strict
                .route(&event("SCANS", Priority::High, "198.51.100.1"))
                .unwrap_err()
                .code,
            Code::PerspectiveNotAllowed
        );
    }

    #[test]
    fn never_block_covers_global_site_and_collectors_and_servers_are_not_blockable() {
        let p = policy();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            p.never_block("prague", ip("10.99.3.4")),
            Some("10.99.0.0/16".parse().unwrap())
        );
        assert_eq!(
            p.never_block("prague", ip("10.1.0.77")),
            Some("10.1.0.0/24".parse().unwrap())
        );
        assert_eq!(
            p.never_block("prague", ip("10.2.0.5")),
            Some("10.2.0.5/32".parse().unwrap())
        );
        assert_eq!(
            p.not_blockable(ip("192.0.2.250")).map(|(code, _)| code),
            Some(Code::ManagementServer)
        );
        assert_eq!(
            p.never_block("brno", ip("10.1.0.77")),
            None,
            "site lists stay per site"
        );
        assert_eq!(p.never_block("prague", ip("198.51.100.1")), None);
        assert_eq!(
            p.never_block("prague", ip("::ffff:10.99.3.4")),
            Some("10.99.0.0/16".parse().unwrap()),
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    #[test]
    fn a_mac_is_passed_on_only_for_a_host_on_the_sites_own_segments() {
        let mut c = config();
        c.sites.get_mut("prague").unwrap().mac_networks = vec!["192.0.2.0/25".parse().unwrap()];
        let p = Policy::new(&c, &[]);
        let host: MacAddr = "00:1a:2b:3c:4d:5e".parse().unwrap();
        let usable = |site: &str, ip: &str, mac: &str| {
            p.mac_usable(site, ip.parse().unwrap(), mac.parse().unwrap())
        };
        assert!(p.mac_usable("prague", "192.0.2.61".parse().unwrap(), host));
        assert!(usable("prague", "::ffff:192.0.2.61", "00:1a:2b:3c:4d:5e"));
        // Beyond a router: the MAC Flowmon saw is the router's.
        assert!(!usable("prague", "198.51.100.7", "00:1a:2b:3c:4d:5e"));
        assert!(
            !usable("brno", "192.0.2.61", "00:1a:2b:3c:4d:5e"),
            "per site"
        );
        // Never a host's: broadcast, multicast, all zeros.
        for group in [
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(!usable("prague", "192.0.2.61", group), "{group}");
        }
    }

    #[test]
    fn not_blockable_adds_to_the_special_ranges_never_replaces_them() {
        let mut c = config();
        c.policy.not_blockable = vec!["100.64.0.0/10".parse().unwrap()];
        let p = Policy::new(&c, &[]);
        let code = |s: &str| p.not_blockable(s.parse().unwrap()).map(|(code, _)| code);
        for special in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "169.254.1.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(code(special), Some(Code::SpecialAddress), "{special}");
        }
        assert_eq!(code("100.64.1.2"), Some(Code::SpecialAddress), "added");
        assert_eq!(code("198.51.100.1"), None);
    }

    #[test]
    fn a_gateway_that_fetches_a_feed_is_not_blockable() {
        let c = Config::from_toml(
            r#"
            [targets.blocklist]
            kind = "feed"
            [targets.blocklist.pollers]
            prague-gw = "192.0.2.10"
            [sites.prague]
            targets = ["blocklist"]
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        let p = Policy::new(&c, &[]);
        let (code, detail) = p
            .not_blockable("::ffff:192.0.2.10".parse().unwrap())
            .unwrap();
        assert_eq!(code, Code::FeedPoller);
        assert!(detail.contains("blocklist/prague-gw"), "{detail}");
        assert_eq!(p.not_blockable("192.0.2.11".parse().unwrap()), None);
    }

    #[test]
    fn durations_escalate_and_cap() {
        let p = policy();
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(p.duration(Priority::High, 0), h(1));
        assert_eq!(p.duration(Priority::High, 1), h(6));
        assert_eq!(p.duration(Priority::High, 2), h(24));
        assert_eq!(p.duration(Priority::High, 3), h(168));
        assert_eq!(p.duration(Priority::High, 40), h(168), "capped");
        assert_eq!(
            p.duration(Priority::Critical, 0),
            h(6),
            "critical starts a step up"
        );
    }

    #[test]
    fn keys_separate_targets_and_sources_but_not_sites() {
        let p = policy();
        let t = &p
            .route(&event("SCANS", Priority::High, "10.0.0.1"))
            .unwrap()[0];
        let a = idempotency_key(t, "10.0.0.1".parse().unwrap());
        assert_eq!(a, idempotency_key(t, "10.0.0.1".parse().unwrap()));
        assert_ne!(a, idempotency_key(t, "10.0.0.2".parse().unwrap()));
        let mut other = Target::clone(t);
        other.name = "other".into();
        assert_ne!(a, idempotency_key(&other, "10.0.0.1".parse().unwrap()));
    }
}
