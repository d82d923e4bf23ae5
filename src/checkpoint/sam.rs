//! SAM rules and the gateway commands that carry them, as pure code.
//!
//! A [`SamRule`] holds only typed values (an address or network, an integer timeout, enums and a
//! hex [`RuleKey`]), so nothing taken from an event can reach a script: there is no string field
//! to smuggle text through. Rendering follows the `fw sam` CLI reference and the `fw samp`
//! (SAM policy, R80.20+) forms in `docs/checkpoint.md`; IPv6 rules use `fw6`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What a rule does to matching connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamAction {
    /// Drop matching connections silently.
    Drop,
    /// Reject matching connections (the peer is told).
    Reject,
    /// Only log matching connections.
    Notify,
}

/// Which connections a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "match", content = "value")]
pub enum Criteria {
    /// Connections from this address.
    Src(IpAddr),
    /// Connections to this address.
    Dst(IpAddr),
    /// Connections from or to this address.
    Any(IpAddr),
    /// Connections from this network.
    SubSrc(IpNet),
    /// Connections to this network.
    SubDst(IpNet),
    /// Connections from or to this network.
    SubAny(IpNet),
}

impl Criteria {
    /// The address the rule names (a network's own address for the network forms).
    pub fn address(&self) -> IpAddr {
        match self {
            Self::Src(ip) | Self::Dst(ip) | Self::Any(ip) => *ip,
            Self::SubSrc(net) | Self::SubDst(net) | Self::SubAny(net) => net.network(),
        }
    }

    pub fn is_ipv6(&self) -> bool {
        match self {
            Self::Src(ip) | Self::Dst(ip) | Self::Any(ip) => ip.is_ipv6(),
            Self::SubSrc(net) | Self::SubDst(net) | Self::SubAny(net) => {
                matches!(net, IpNet::V6(_))
            }
        }
    }

    /// The `fw sam` criteria words: `src 192.0.2.1`, `subsrc 192.0.2.0 255.255.255.0`, …
    fn fw_sam_words(&self) -> String {
        match self {
            Self::Src(ip) => format!("src {ip}"),
            Self::Dst(ip) => format!("dst {ip}"),
            Self::Any(ip) => format!("any {ip}"),
            Self::SubSrc(net) => format!("subsrc {} {}", net.network(), net.netmask()),
            Self::SubDst(net) => format!("subdst {} {}", net.network(), net.netmask()),
            Self::SubAny(net) => format!("subany {} {}", net.network(), net.netmask()),
        }
    }
}

impl fmt::Display for Criteria {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fw_sam_words())
    }
}

/// How enforcement is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogType {
    /// No log.
    None,
    /// A log entry per matching connection.
    #[default]
    Log,
    /// An alert per matching connection.
    Alert,
}

impl LogType {
    fn fw_sam(self) -> &'static str {
        match self {
            Self::None => "nolog",
            Self::Log => "long_noalert",
            Self::Alert => "long_alert",
        }
    }
}

/// A rule's idempotency key: exactly 32 lower-case hex digits (so it is safe in any script).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey([u8; 16]);

impl RuleKey {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Parses 32 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }

    /// The rule name samgate gives this key on the gateway.
    pub fn rule_name(&self) -> String {
        format!("samgate-{}", &self.to_string()[..16])
    }
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for RuleKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RuleKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("expected 32 hex digits"))
    }
}

/// The originator tag on every rule samgate creates.
pub const ORIGINATOR: &str = "samgate";

/// One SAM rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SamRule {
    pub action: SamAction,
    /// Also close connections already open (`-I`/`-J`; `-C` in `fw samp`).
    pub close_connections: bool,
    pub criteria: Criteria,
    /// Seconds until the gateway drops the rule; `None` = until cancelled.
    pub timeout_secs: Option<u32>,
    pub log: LogType,
    /// Tags the rule as samgate's (name, comment, originator) when present.
    pub key: Option<RuleKey>,
}

/// Why a rule cannot be expressed in a command form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("`fw samp` ip rules match a source or a destination, not either (`{0}`); use fw_sam mode or src/dst criteria")]
    SampAnyUnsupported(Criteria),
    #[error(
        "`fw samp` rules are removed by uid: list them with `fw samp get` and send `fw samp del`"
    )]
    SampUnblockNeedsUid,
}

impl SamRule {
    fn fw(&self) -> &'static str {
        if self.criteria.is_ipv6() {
            "fw6"
        } else {
            "fw"
        }
    }

    fn fw_sam_action_flag(&self) -> &'static str {
        match (self.action, self.close_connections) {
            (SamAction::Notify, _) => "-n",
            (SamAction::Reject, false) => "-i",
            (SamAction::Reject, true) => "-I",
            (SamAction::Drop, false) => "-j",
            (SamAction::Drop, true) => "-J",
        }
    }

    /// `-e name=…+comment=…+originator=samgate` when the rule has a key.
    fn fw_sam_tags(&self) -> String {
        match self.key {
            Some(key) => format!(
                " -e name={}+comment=samgate:{key}+originator={ORIGINATOR}",
                key.rule_name()
            ),
            None => String::new(),
        }
    }

    /// `fw sam [-t T] -l LOG [-e tags] -J src 192.0.2.1`.
    pub fn fw_sam(&self) -> String {
        let timeout = self
            .timeout_secs
            .map(|t| format!(" -t {t}"))
            .unwrap_or_default();
        format!(
            "{} sam{timeout} -l {}{} {} {}",
            self.fw(),
            self.log.fw_sam(),
            self.fw_sam_tags(),
            self.fw_sam_action_flag(),
            self.criteria.fw_sam_words()
        )
    }

    /// The cancel of [`Self::fw_sam`]: the same flags without `-t`, plus `-C`.
    pub fn fw_sam_cancel(&self) -> String {
        format!(
            "{} sam -l {}{} -C {} {}",
            self.fw(),
            self.log.fw_sam(),
            self.fw_sam_tags(),
            self.fw_sam_action_flag(),
            self.criteria.fw_sam_words()
        )
    }

    /// The arguments after `fw samp add` (also a `fw samp batch` line after `add`).
    fn samp_add_args(&self) -> Result<String, RenderError> {
        let action = match self.action {
            SamAction::Drop => "d",
            SamAction::Reject => "r",
            SamAction::Notify => "n",
        };
        let mut args = format!("-a {action}");
        match self.log {
            LogType::None => {}
            LogType::Log => args.push_str(" -l r"),
            LogType::Alert => args.push_str(" -l a"),
        }
        if let Some(t) = self.timeout_secs {
            args.push_str(&format!(" -t {t}"));
        }
        if let Some(key) = self.key {
            args.push_str(&format!(
                " -n {} -c samgate:{key} -o {ORIGINATOR}",
                key.rule_name()
            ));
        }
        args.push_str(" ip");
        if self.close_connections {
            args.push_str(" -C");
        }
        let filter = match self.criteria {
            Criteria::Src(ip) => format!(" -s {ip}"),
            Criteria::Dst(ip) => format!(" -d {ip}"),
            Criteria::SubSrc(net) => format!(" -s {} -m {}", net.network(), net.netmask()),
            Criteria::SubDst(net) => format!(" -d {} -M {}", net.network(), net.netmask()),
            any @ (Criteria::Any(_) | Criteria::SubAny(_)) => {
                return Err(RenderError::SampAnyUnsupported(any))
            }
        };
        args.push_str(&filter);
        Ok(args)
    }

    /// `fw samp add -a d -l r -t 3600 -n samgate-… -c samgate:KEY -o samgate ip -C -s 192.0.2.1`.
    pub fn fw_samp_add(&self) -> Result<String, RenderError> {
        Ok(format!("{} samp add {}", self.fw(), self.samp_add_args()?))
    }
}

/// `fw samp del '<uid>'` for a rule uid as `fw samp get` printed it.
pub fn fw_samp_del(uid: &SampUid, ipv6: bool) -> String {
    format!("{} samp del '{uid}'", if ipv6 { "fw6" } else { "fw" })
}

/// One script that deletes `fw samp` rules by uid (`fw6` for IPv6 rules), then flushes, which
/// `del` needs to take effect at once. The uids are [`SampUid`]s: only the documented shape,
/// read back from the gateway, reaches the script.
pub fn samp_delete_script(uids: &[(SampUid, bool)]) -> String {
    let mut script = format!("# samgate: delete {} rule(s)\n", uids.len());
    for (uid, ipv6) in uids {
        script.push_str(&fw_samp_del(uid, *ipv6));
        script.push('\n');
    }
    script.push_str(&samp_flush(uids.iter().any(|(_, ipv6)| *ipv6)));
    script
}

/// `fw samp get` (every rule, one per line).
pub fn fw_samp_get(ipv6: bool) -> String {
    format!("{} samp get", if ipv6 { "fw6" } else { "fw" })
}

/// The flush-only rule that makes `fw samp` changes take effect at once (mandatory after `del`).
pub const FW_SAMP_FLUSH: &str = "fw samp add -t 2 quota flush true";
/// The same for `fw6 samp`: whether IPv6 rules live in a database of their own is unconfirmed,
/// so a script that touched them flushes that one too (at worst a second, harmless flush).
pub const FW6_SAMP_FLUSH: &str = "fw6 samp add -t 2 quota flush true";

/// The flush lines a script needs: `fw`'s always, `fw6`'s when it touched IPv6 rules.
fn samp_flush(ipv6: bool) -> String {
    let mut lines = format!("{FW_SAMP_FLUSH} >/dev/null\n");
    if ipv6 {
        lines.push_str(&format!("{FW6_SAMP_FLUSH} >/dev/null\n"));
    }
    lines
}

/// `fw samp batch` (`fw6` for IPv6) with `add` lines, in one heredoc.
pub fn fw_samp_batch(rules: &[SamRule], ipv6: bool) -> Result<String, RenderError> {
    let fw = if ipv6 { "fw6" } else { "fw" };
    let mut script = format!("{fw} samp batch <<'SAMGATE_BATCH'\n");
    for rule in rules {
        script.push_str(&format!("add {}\n", rule.samp_add_args()?));
    }
    script.push_str("SAMGATE_BATCH\n");
    Ok(script)
}

/// A block script for `fw_samp` targets that starts a handful of processes however many rules
/// it carries: per address family, a listing of the batch's keys (samgate's comment, several
/// `-v` values) before and after one `fw samp batch`, with the flush rule between. `fw samp
/// batch` prints nothing documented per line, so each rule's outcome is read from the listings
/// ([`samp_batch_readback`]): a rule landed when a uid with its key is listed after the batch
/// that was not before (an older rule with the same key, still in force, proves nothing about
/// this send). Sections 0 and 1 are the listings before (IPv4, IPv6), 2 and 3 the batches' exit
/// statuses, 4 and 5 the listings after: six whatever the families, so the reader never guesses.
pub fn samp_batch_script(rules: &[SamRule]) -> Result<String, RenderError> {
    let mut script = format!("# samgate: {} rule(s) in fw samp batch\n", rules.len());
    let family = |ipv6: bool| -> Vec<SamRule> {
        rules
            .iter()
            .filter(|r| r.criteria.is_ipv6() == ipv6)
            .copied()
            .collect()
    };
    let listing = |script: &mut String, section: usize, ipv6: bool| {
        let keys: Vec<String> = family(ipv6)
            .iter()
            .filter_map(|r| r.key)
            .map(|k| format!(" -v samgate:{k}"))
            .collect();
        if keys.is_empty() {
            script.push_str(&format!("echo \"{OUTCOME_MARKER} {section} 0\"\n"));
            return;
        }
        let fw = if ipv6 { "fw6" } else { "fw" };
        script.push_str(&format!(
            "{fw} samp get -k comment -t in{}; echo \"{OUTCOME_MARKER} {section} $?\"\n",
            keys.concat()
        ));
    };
    listing(&mut script, 0, false);
    listing(&mut script, 1, true);
    for (section, ipv6) in [(2, false), (3, true)] {
        let these = family(ipv6);
        if these.is_empty() {
            script.push_str(&format!("echo \"{OUTCOME_MARKER} {section} 0\"\n"));
            continue;
        }
        script.push_str(&fw_samp_batch(&these, ipv6)?);
        script.push_str(&format!("echo \"{OUTCOME_MARKER} {section} $?\"\n"));
    }
    script.push_str(&samp_flush(!family(true).is_empty()));
    listing(&mut script, 4, false);
    listing(&mut script, 5, true);
    Ok(script)
}

/// What a [`samp_batch_script`]'s listings say of one rule's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    /// A rule with the key is listed after the batch that was not before: this send's.
    New,
    /// Only rules listed before the batch carry the key: this send's line did not land.
    OnlyOlder,
    /// No rule carries the key.
    Absent,
}

/// The uids listed per samgate key, before and after a [`samp_batch_script`]'s batch of one
/// address family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FamilyReadback {
    before: HashMap<RuleKey, HashSet<SampUid>>,
    after: HashMap<RuleKey, HashSet<SampUid>>,
}

/// What a [`samp_batch_script`]'s listings say, per address family (IPv4, IPv6).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReadback([Option<FamilyReadback>; 2]);

impl BatchReadback {
    /// Whether this send's rule with `key` landed; `None` when a listing of its address family
    /// is missing, failed, was cut or cannot be read (nothing is concluded then).
    pub fn landed(&self, key: RuleKey, ipv6: bool) -> Option<Landed> {
        let family = self.0[usize::from(ipv6)].as_ref()?;
        let before = family.before.get(&key);
        Some(match family.after.get(&key) {
            None => Landed::Absent,
            Some(after) if after.iter().any(|u| before.is_none_or(|b| !b.contains(u))) => {
                Landed::New
            }
            Some(_) => Landed::OnlyOlder,
        })
    }
}

/// Reads a [`samp_batch_script`]'s listings, each address family on its own: a gateway with
/// IPv6 turned off fails the `fw6` ones, which says nothing of the IPv4 rules.
pub fn samp_batch_readback(output: &str) -> BatchReadback {
    let sections = split_sections(output, 6);
    let read = |section: &Option<(i32, String)>| {
        let Some((0, printed)) = section else {
            return None;
        };
        let mut by_key: HashMap<RuleKey, HashSet<SampUid>> = HashMap::new();
        for entry in parse_samp_get(printed).ok()? {
            if let Some(key) = entry.samgate_key() {
                by_key.entry(key).or_default().insert(entry.uid);
            }
        }
        Some(by_key)
    };
    let family = |before: usize, after: usize| {
        Some(FamilyReadback {
            before: read(&sections[before])?,
            after: read(&sections[after])?,
        })
    };
    BatchReadback([family(0, 4), family(1, 5)])
}

/// A `fw samp` rule uid: `<5ac3965f,00000000,3403a8c0,0000264a>` (four 8-digit hex words).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SampUid(String);

impl SampUid {
    /// Accepts only the documented shape, so a uid read back from a gateway is safe to send;
    /// kept as the gateway printed it (the shape makes it safe, and `del` gets it verbatim).
    pub fn parse(text: &str) -> Option<Self> {
        let inner = text.strip_prefix('<')?.strip_suffix('>')?;
        let words: Vec<&str> = inner.split(',').collect();
        let ok = words.len() == 4
            && words
                .iter()
                .all(|w| w.len() == 8 && w.bytes().all(|b| b.is_ascii_hexdigit()));
        ok.then(|| Self(text.to_owned()))
    }
}

impl fmt::Display for SampUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which command form carries rules to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamMode {
    /// Legacy `fw sam`: immediate, everywhere; cancel by repeating the flags with `-C`.
    FwSam,
    /// `fw samp` (R80.20+): persistent across reboot, named and tagged.
    FwSamp,
}

/// What to do with each rule of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Block,
    Unblock,
}

/// The marker each batch line prints: `samgate-rule <index> <exit status>`.
pub const OUTCOME_MARKER: &str = "samgate-rule";

/// One script for a batch of rules: each rule's command followed by an `echo` of its index and
/// exit status, so one `run-script` yields a result per rule. `fw samp` batches end with the
/// flush rule. Unblocking in `fw_samp` mode needs the rule uids, see [`fw_samp_del`].
pub fn batch_script(
    rules: &[SamRule],
    mode: SamMode,
    operation: Operation,
) -> Result<String, RenderError> {
    let mut script = format!("# samgate: {} rule(s)\n", rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let command = match (mode, operation) {
            (SamMode::FwSam, Operation::Block) => rule.fw_sam(),
            (SamMode::FwSam, Operation::Unblock) => rule.fw_sam_cancel(),
            (SamMode::FwSamp, Operation::Block) => rule.fw_samp_add()?,
            (SamMode::FwSamp, Operation::Unblock) => return Err(RenderError::SampUnblockNeedsUid),
        };
        script.push_str(&format!("{command}; echo \"{OUTCOME_MARKER} {i} $?\"\n"));
    }
    if mode == SamMode::FwSamp {
        script.push_str(&samp_flush(rules.iter().any(|r| r.criteria.is_ipv6())));
    }
    Ok(script)
}

/// One script that asks the gateway whether each rule is in place: `fw sam -M` with the rule's
/// action class and criteria, or `fw samp get` filtered by the rule's samgate comment. Each
/// query is followed by the outcome marker; see [`split_sections`].
pub fn verify_script(rules: &[SamRule], mode: SamMode) -> String {
    let mut script = format!("# samgate: verify {} rule(s)\n", rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let query = match mode {
            SamMode::FwSam => {
                let class = match rule.action {
                    SamAction::Drop => "-j",
                    SamAction::Reject => "-i",
                    SamAction::Notify => "-n",
                };
                // Both streams: where `fw sam -M` prints is undocumented, and a listing it
                // printed to stderr would otherwise read as "no rule" (an unblock confirmed
                // that was never sent). Anything unexpected there makes the answer unknown.
                format!(
                    "{} sam -M {class} {} 2>&1",
                    rule.fw(),
                    rule.criteria.fw_sam_words()
                )
            }
            SamMode::FwSamp => match rule.key {
                Some(key) => format!("{} samp get -k comment -t in -v samgate:{key}", rule.fw()),
                None => fw_samp_get(rule.criteria.is_ipv6()),
            },
        };
        script.push_str(&format!("{query}; echo \"{OUTCOME_MARKER} {i} $?\"\n"));
    }
    script
}

/// Splits a script's output at the outcome markers: for each of `count` rules, its exit status
/// and what its command printed (the lines since the previous marker).
pub fn split_sections(output: &str, count: usize) -> Vec<Option<(i32, String)>> {
    let mut sections = vec![None; count];
    let mut printed = String::new();
    for line in output.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some(OUTCOME_MARKER) {
            let index = words.next().and_then(|w| w.parse::<usize>().ok());
            let status = words.next().and_then(|w| w.parse::<i32>().ok());
            let text = std::mem::take(&mut printed);
            if let (Some(index), Some(status)) = (index, status) {
                if let Some(slot) = sections.get_mut(index) {
                    *slot = Some((status, text));
                }
            }
        } else if !line.trim().is_empty() {
            printed.push_str(line);
            printed.push('\n');
        }
    }
    sections
}

/// The exit status of each of `count` rules from a batch script's output (`None`: no line, e.g.
/// the script was cut short).
pub fn parse_outcomes(output: &str, count: usize) -> Vec<Option<i32>> {
    let mut outcomes = vec![None; count];
    for line in output.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some(OUTCOME_MARKER) {
            continue;
        }
        let index = words.next().and_then(|w| w.parse::<usize>().ok());
        let status = words.next().and_then(|w| w.parse::<i32>().ok());
        if let (Some(index), Some(status)) = (index, status) {
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = Some(status);
            }
        }
    }
    outcomes
}

/// One line of `fw samp get`: `operation=add uid=<…> target=all timeout=300 action=notify …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampEntry {
    pub uid: SampUid,
    /// Every `key=value` of the line, `\ ` unescaped.
    pub fields: BTreeMap<String, String>,
}

impl SampEntry {
    /// The samgate key in the rule's comment (`samgate:<key>`), if samgate made it.
    pub fn samgate_key(&self) -> Option<RuleKey> {
        self.fields
            .get("comment")
            .and_then(|c| c.strip_prefix("samgate:"))
            .and_then(RuleKey::parse)
    }
}

/// A line of a gateway's listing that samgate cannot read. Nothing is concluded from such a
/// listing: read as "no rule", it would confirm an unblock whose rule is still there. The
/// empty-database and filtered forms of `fw samp get` and all of `fw sam -M` are unconfirmed
/// (docs/checkpoint.md), so a wrong guess is noticed here, not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(String);

impl Unreadable {
    fn line(line: &str) -> Self {
        Self(line.trim().chars().take(120).collect())
    }
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a line samgate cannot read: {:?}", self.0)
    }
}

/// Parses `fw samp get` output (default format, one rule per line). Every line that is not blank
/// must be a rule with a well-formed uid.
pub fn parse_samp_get(output: &str) -> Result<Vec<SampEntry>, Unreadable> {
    output
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: BTreeMap<String, String> = split_escaped(line)
                .into_iter()
                .filter_map(|word| {
                    word.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                })
                .collect();
            let uid = fields.get("uid").and_then(|u| SampUid::parse(u));
            match uid {
                Some(uid) => Ok(SampEntry { uid, fields }),
                None => Err(Unreadable::line(line)),
            }
        })
        .collect()
}

/// Splits on spaces that are not backslash-escaped, unescaping `\ `.
fn split_escaped(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            ' ' | '\t' => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// One active `fw sam` rule as `fw sam -M` lists it. The real listing format is undocumented; the
/// simulator (and this parser) use the SAM log record formats of the CLI reference:
/// `<type>,<actions>,<expire>,<ipaddr>` and `<type>,<actions>,<expire>,<src>,<dst>,<dport>,<ip_p>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamMonitorEntry {
    pub kind: String,
    pub actions: String,
    /// Unix time the rule expires, `None` for "never".
    pub expires: Option<i64>,
    pub addresses: Vec<String>,
}

/// Whether a `fw sam -M` line is `rule`: the same criteria and address, action, close flag and
/// log type. (The listing carries no tags, so a foreign rule with exactly these flags counts too:
/// it blocks the same connections.)
pub fn monitor_entry_is(entry: &SamMonitorEntry, rule: &SamRule) -> bool {
    let (kind, address) = match rule.criteria {
        Criteria::Src(ip) => ("src", ip),
        Criteria::Dst(ip) => ("dst", ip),
        Criteria::Any(ip) => ("any", ip),
        _ => return false,
    };
    let action = match rule.action {
        SamAction::Drop => "drop",
        SamAction::Reject => "reject",
        SamAction::Notify => "notify",
    };
    let actions: Vec<&str> = entry.actions.split('|').collect();
    entry.kind == kind
        && entry
            .addresses
            .first()
            .and_then(|a| a.parse::<IpAddr>().ok())
            == Some(address)
        && actions.contains(&action)
        && actions.contains(&"close") == rule.close_connections
        && actions.contains(&rule.log.fw_sam())
}

/// Parses `fw sam -M` output (see [`SamMonitorEntry`]). Every line that is not blank must be a
/// record.
pub fn parse_sam_monitor(output: &str) -> Result<Vec<SamMonitorEntry>, Unreadable> {
    output
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| monitor_entry(line).ok_or_else(|| Unreadable::line(line)))
        .collect()
}

/// The criteria types of `fw sam` (CLI reference): the first field of a SAM record.
const CRITERIA_TYPES: [&str; 21] = [
    "src",
    "dst",
    "any",
    "subsrc",
    "subdst",
    "subany",
    "srv",
    "subsrv",
    "subsrvs",
    "subsrvd",
    "dstsrv",
    "srcpr",
    "dstpr",
    "subsrcpr",
    "subdstpr",
    "subdstsrv",
    "service",
    "generic",
    "apn",
    "imsi",
    "msisdn",
];

/// `<type>,<actions>,<expire>,<criteria…>`: any criteria type, each with its own number of
/// fields (samgate matches only `src`/`dst`/`any` ones, but a foreign subnet or service rule must
/// not make the whole listing unreadable).
fn monitor_entry(line: &str) -> Option<SamMonitorEntry> {
    let parts: Vec<&str> = line.trim().split(',').map(str::trim).collect();
    if parts.len() < 4 || !CRITERIA_TYPES.contains(&parts[0]) {
        return None;
    }
    let expires = match parts[2] {
        "never" | "0" => None,
        t => Some(t.parse().ok()?),
    };
    Some(SamMonitorEntry {
        kind: parts[0].to_owned(),
        actions: parts[1].to_owned(),
        expires,
        addresses: parts[3..].iter().map(|s| s.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: SamAction, close: bool, criteria: Criteria) -> SamRule {
        SamRule {
            action,
            close_connections: close,
            criteria,
            timeout_secs: Some(3600),
            log: LogType::Log,
            key: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn fw_sam_action_flags_and_criteria_follow_the_cli_reference() {
        let cases = [
            (
                SamAction::Drop,
                true,
                Criteria::Src(ip("192.0.2.1")),
                "fw sam -t 3600 -l long_noalert -J src 192.0.2.1",
            ),
            (
                SamAction::Drop,
                false,
                Criteria::Dst(ip("192.0.2.1")),
                "fw sam -t 3600 -l long_noalert -j dst 192.0.2.1",
            ),
            (
                SamAction::Reject,
                true,
                Criteria::Any(ip("192.0.2.1")),
                "fw sam -t 3600 -l long_noalert -I any 192.0.2.1",
            ),
            (
                SamAction::Reject,
                false,
                Criteria::SubSrc(net("10.1.0.0/16")),
                "fw sam -t 3600 -l long_noalert -i subsrc 10.1.0.0 255.255.0.0",
            ),
            (
                SamAction::Notify,
                false,
                Criteria::SubDst(net("10.1.2.0/24")),
                "fw sam -t 3600 -l long_noalert -n subdst 10.1.2.0 255.255.255.0",
            ),
            (
                SamAction::Notify,
                true,
                Criteria::SubAny(net("10.0.0.0/8")),
                "fw sam -t 3600 -l long_noalert -n subany 10.0.0.0 255.0.0.0",
            ),
            (
                SamAction::Drop,
                true,
                Criteria::Src(ip("2001:db8::7")),
                "fw6 sam -t 3600 -l long_noalert -J src 2001:db8::7",
            ),
            (
                SamAction::Drop,
                true,
                Criteria::SubSrc(net("2001:db8::/48")),
                "fw6 sam -t 3600 -l long_noalert -J subsrc 2001:db8:: ffff:ffff:ffff::",
            ),
        ];
        for (action, close, criteria, expected) in cases {
            assert_eq!(rule(action, close, criteria).fw_sam(), expected);
        }
    }

    #[test]
    fn no_timeout_log_types_and_tags() {
        let key = RuleKey::parse("00112233445566778899aabbccddeeff").unwrap();
        let mut r = rule(SamAction::Drop, true, Criteria::Src(ip("192.0.2.9")));
        r.timeout_secs = None;
        r.log = LogType::Alert;
        r.key = Some(key);
        assert_eq!(
            r.fw_sam(),
            "fw sam -l long_alert -e name=samgate-0011223344556677+comment=samgate:00112233445566778899aabbccddeeff+originator=samgate -J src 192.0.2.9"
        );
        r.log = LogType::None;
        assert!(r.fw_sam().contains("-l nolog"));
    }

    #[test]
    fn cancel_repeats_the_block_flags_without_the_timeout() {
        let mut r = rule(SamAction::Reject, true, Criteria::Any(ip("198.51.100.4")));
        r.key = RuleKey::parse("ffffffffffffffffffffffffffffffff");
        let block = r.fw_sam();
        let cancel = r.fw_sam_cancel();
        assert_eq!(cancel.replace(" -C", ""), block.replace(" -t 3600", ""));
        assert!(cancel.contains(" -C -I any 198.51.100.4"));
    }

    #[test]
    fn fw_samp_add_forms() {
        let key = RuleKey::parse("0123456789abcdef0123456789abcdef").unwrap();
        let mut r = rule(SamAction::Drop, true, Criteria::Src(ip("192.0.2.1")));
        r.key = Some(key);
        assert_eq!(
            r.fw_samp_add().unwrap(),
            "fw samp add -a d -l r -t 3600 -n samgate-0123456789abcdef -c samgate:0123456789abcdef0123456789abcdef -o samgate ip -C -s 192.0.2.1"
        );
        let r = rule(
            SamAction::Notify,
            false,
            Criteria::SubDst(net("10.0.0.0/8")),
        );
        assert_eq!(
            r.fw_samp_add().unwrap(),
            "fw samp add -a n -l r -t 3600 ip -d 10.0.0.0 -M 255.0.0.0"
        );
        let r = rule(SamAction::Reject, false, Criteria::Src(ip("2001:db8::1")));
        assert_eq!(
            r.fw_samp_add().unwrap(),
            "fw6 samp add -a r -l r -t 3600 ip -s 2001:db8::1"
        );
        let r = rule(SamAction::Drop, false, Criteria::Any(ip("192.0.2.1")));
        assert!(r.fw_samp_add().is_err());
    }

    #[test]
    fn samp_batch_and_del() {
        let rules = [
            rule(SamAction::Drop, false, Criteria::Src(ip("192.0.2.1"))),
            rule(SamAction::Drop, false, Criteria::Src(ip("192.0.2.2"))),
        ];
        assert_eq!(
            fw_samp_batch(&rules, false).unwrap(),
            "fw samp batch <<'SAMGATE_BATCH'\nadd -a d -l r -t 3600 ip -s 192.0.2.1\nadd -a d -l r -t 3600 ip -s 192.0.2.2\nSAMGATE_BATCH\n"
        );
        let uid = SampUid::parse("<5ac3965f,00000000,3403a8c0,0000264a>").unwrap();
        assert_eq!(
            fw_samp_del(&uid, false),
            "fw samp del '<5ac3965f,00000000,3403a8c0,0000264a>'"
        );
        assert!(SampUid::parse("<5ac3965f,0000,3403a8c0,0000264a>").is_none());
        assert!(SampUid::parse("<5ac3965f,00000000,3403a8c0,0000264a>;reboot").is_none());
    }

    #[test]
    fn batch_script_reports_each_rule() {
        let rules: Vec<SamRule> = (1..=3)
            .map(|i| {
                rule(
                    SamAction::Drop,
                    true,
                    Criteria::Src(ip(&format!("192.0.2.{i}"))),
                )
            })
            .collect();
        let script = batch_script(&rules, SamMode::FwSam, Operation::Block).unwrap();
        assert_eq!(script.lines().count(), 4);
        assert!(script.contains(
            "fw sam -t 3600 -l long_noalert -J src 192.0.2.2; echo \"samgate-rule 1 $?\""
        ));
        let samp = batch_script(&rules, SamMode::FwSamp, Operation::Block).unwrap();
        assert!(samp.ends_with("fw samp add -t 2 quota flush true >/dev/null\n"));
        let v6 = [rule(
            SamAction::Drop,
            true,
            Criteria::Src(ip("2001:db8::9")),
        )];
        let samp6 = batch_script(&v6, SamMode::FwSamp, Operation::Block).unwrap();
        assert!(samp6.ends_with("fw samp add -t 2 quota flush true >/dev/null\nfw6 samp add -t 2 quota flush true >/dev/null\n"));
        let output = "samgate-rule 0 0\nsome stderr\nsamgate-rule 2 1\nsamgate-rule 9 0\n";
        assert_eq!(parse_outcomes(output, 3), vec![Some(0), None, Some(1)]);
    }

    #[test]
    fn a_samp_batch_script_starts_four_processes_per_family_and_its_listings_say_what_landed() {
        let mut rules: Vec<SamRule> = (1..=3)
            .map(|i| {
                rule(
                    SamAction::Drop,
                    true,
                    Criteria::Src(ip(&format!("192.0.2.{i}"))),
                )
            })
            .collect();
        rules.push(rule(
            SamAction::Drop,
            true,
            Criteria::Src(ip("2001:db8::7")),
        ));
        for (i, r) in rules.iter_mut().enumerate() {
            r.key = RuleKey::parse(&format!("{i:032x}"));
        }
        let script = samp_batch_script(&rules).unwrap();
        let processes = script
            .lines()
            .filter(|l| l.starts_with("fw ") || l.starts_with("fw6 "))
            .count();
        // Per address family: the listing before, the batch, the flush, the listing after.
        assert_eq!(processes, 8, "{script}");
        assert!(script.contains("\nfw6 samp add -t 2 quota flush true >/dev/null\n"));
        assert_eq!(
            script.matches("\nadd ").count(),
            4,
            "one batch line per rule"
        );
        assert!(
            script.contains("fw6 samp batch <<'SAMGATE_BATCH'\nadd "),
            "{script}"
        );
        let v4_listing = |section: usize| {
            format!(
                "fw samp get -k comment -t in -v samgate:{:032x} -v samgate:{:032x} -v samgate:{:032x}; echo \"samgate-rule {section} $?\"",
                0, 1, 2
            )
        };
        let (before, batch, after) = (
            script.find(&v4_listing(0)).expect("listing before"),
            script.find("\nfw samp batch").unwrap(),
            script.find(&v4_listing(4)).expect("listing after"),
        );
        assert!(before < batch && batch < after, "{script}");
        // Only IPv4 rules: the IPv6 sections are there, and empty.
        let v4 = samp_batch_script(&rules[..1]).unwrap();
        for section in [1, 3, 5] {
            assert!(
                v4.contains(&format!("echo \"samgate-rule {section} 0\"\n")),
                "{v4}"
            );
        }
        assert!(!v4.contains("fw6 "), "{v4}");

        let key = |i: usize| RuleKey::parse(&format!("{i:032x}")).unwrap();
        let listed = |i: usize, uid: u32| {
            format!("operation=add uid=<5ac3965f,00000000,3403a8c0,{uid:08x}> comment=samgate:{:032x} src_ip_addr=192.0.2.1 req_tpe=ip\n", i)
        };
        // Before: key 1 has an older rule. After: key 0 new, key 1 only the older one, key 2
        // an older one and a new one, key 3 nothing.
        let output = format!(
            "{}samgate-rule 0 0\nsamgate-rule 1 0\nsamgate-rule 2 0\nsamgate-rule 3 0\n{}{}{}{}samgate-rule 4 0\nsamgate-rule 5 0\n",
            listed(1, 7) + &listed(2, 8),
            listed(0, 9),
            listed(1, 7),
            listed(2, 8),
            listed(2, 10),
        );
        let readback = samp_batch_readback(&output);
        assert_eq!(
            (0..4)
                .map(|i| readback.landed(key(i), false))
                .collect::<Vec<_>>(),
            [Landed::New, Landed::OnlyOlder, Landed::New, Landed::Absent].map(Some)
        );
        assert_eq!(readback.landed(key(9), true), Some(Landed::Absent));
        // A listing that failed, or output cut before it, concludes nothing for its family only.
        let failed = "samgate-rule 0 0\nsamgate-rule 1 0\nsamgate-rule 2 0\nsamgate-rule 3 0\nsamgate-rule 4 1\nsamgate-rule 5 0\n";
        let readback = samp_batch_readback(failed);
        assert_eq!(readback.landed(key(0), false), None);
        assert_eq!(readback.landed(key(0), true), Some(Landed::Absent));
        let cut = samp_batch_readback("samgate-rule 0 0\nsamgate-rule 1 0\n");
        assert_eq!(
            (cut.landed(key(0), false), cut.landed(key(0), true)),
            (None, None)
        );
        // IPv6 turned off: the fw6 listings fail; the IPv4 rules are still read.
        let no_ipv6 = format!(
            "samgate-rule 0 0\nsamgate-rule 1 1\nsamgate-rule 2 0\nsamgate-rule 3 1\n{}samgate-rule 4 0\nsamgate-rule 5 1\n",
            listed(0, 9)
        );
        let readback = samp_batch_readback(&no_ipv6);
        assert_eq!(readback.landed(key(0), false), Some(Landed::New));
        assert_eq!(readback.landed(key(3), true), None);
    }

    #[test]
    fn verify_scripts_ask_per_rule_and_sections_say_what_was_found() {
        let mut r = rule(SamAction::Drop, true, Criteria::Src(ip("192.0.2.1")));
        r.key = RuleKey::parse("0123456789abcdef0123456789abcdef");
        let script = verify_script(
            &[
                r,
                rule(SamAction::Reject, false, Criteria::Src(ip("2001:db8::1"))),
            ],
            SamMode::FwSam,
        );
        assert!(script.contains("fw sam -M -j src 192.0.2.1 2>&1; echo \"samgate-rule 0 $?\""));
        assert!(script.contains("fw6 sam -M -i src 2001:db8::1 2>&1; echo \"samgate-rule 1 $?\""));
        let samp = verify_script(&[r], SamMode::FwSamp);
        assert!(samp
            .contains("fw samp get -k comment -t in -v samgate:0123456789abcdef0123456789abcdef"));
        let output = "src,drop|close|long_noalert,1763640000,192.0.2.1\nsamgate-rule 0 0\nsamgate-rule 1 0\n";
        assert_eq!(
            split_sections(output, 3),
            vec![
                Some((
                    0,
                    "src,drop|close|long_noalert,1763640000,192.0.2.1\n".into()
                )),
                Some((0, String::new())),
                None
            ]
        );
    }

    #[test]
    fn samp_get_listing_parses_escaped_fields() {
        let out = "operation=add uid=<5ac3965f,00000000,3403a8c0,0000264a> target=all timeout=300 action=notify log=log name=Test\\ Rule comment=samgate:0123456789abcdef0123456789abcdef originator=John\\ Doe src_ip_addr=1.1.1.1 req_tpe=ip\n";
        let entries = parse_samp_get(out).unwrap();
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(e.fields["name"], "Test Rule");
        assert_eq!(e.fields["originator"], "John Doe");
        assert_eq!(e.fields["src_ip_addr"], "1.1.1.1");
        assert_eq!(e.uid.to_string(), "<5ac3965f,00000000,3403a8c0,0000264a>");
        assert_eq!(
            e.samgate_key().unwrap().to_string(),
            "0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn sam_monitor_listing_parses_both_record_forms() {
        let out =
            "src,drop|close,1763640000,192.0.2.1\n\nsrv,reject,never,192.0.2.1,192.0.2.2,22,6\n";
        let entries = parse_sam_monitor(out).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].expires, Some(1_763_640_000));
        assert_eq!(entries[1].expires, None);
        assert_eq!(entries[1].addresses.len(), 4);
    }

    #[test]
    fn a_listing_with_a_line_samgate_cannot_read_concludes_nothing() {
        let rule = "operation=add uid=<5ac3965f,00000000,3403a8c0,0000264a> comment=samgate:0123456789abcdef0123456789abcdef src_ip_addr=192.0.2.1 req_tpe=ip";
        // (listing, rules read by `fw samp get`'s parser or None, the same for `fw sam -M`'s)
        let table: [(&str, Option<usize>, Option<usize>); 11] = [
            ("", Some(0), Some(0)),
            ("\n  \n", Some(0), Some(0)),
            (rule, Some(1), None),
            ("src,drop|close,never,192.0.2.1", None, Some(1)),
            ("No rules were found", None, None),
            (&format!("SAM Policy rules:\n{rule}"), None, None),
            (
                "operation=add uid=<nothex!,00000000,3403a8c0,0000264a>",
                None,
                None,
            ),
            ("src,drop,soon,192.0.2.1", None, None),
            (
                "subsrc,drop|close,never,192.0.2.0,255.255.255.0",
                None,
                Some(1),
            ),
            (
                "subsrv,reject,0,192.0.2.0,255.255.255.0,192.0.2.9,255.255.255.255,22,6",
                None,
                Some(1),
            ),
            ("Total,1,never,rules", None, None),
        ];
        for (listing, samp, monitor) in table {
            assert_eq!(
                parse_samp_get(listing).ok().map(|e| e.len()),
                samp,
                "{listing:?}"
            );
            assert_eq!(
                parse_sam_monitor(listing).ok().map(|e| e.len()),
                monitor,
                "{listing:?}"
            );
        }
        let why = parse_samp_get("No rules were found\n")
            .unwrap_err()
            .to_string();
        assert_eq!(why, "a line samgate cannot read: \"No rules were found\"");
        // After a batch, an unreadable listing leaves every rule's outcome unknown.
        let output = "samgate-rule 0 0\nsamgate-rule 1 0\nsamgate-rule 2 0\nsamgate-rule 3 0\nNo rules were found\nsamgate-rule 4 0\nsamgate-rule 5 0\n";
        let key = RuleKey::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(samp_batch_readback(output).landed(key, false), None);
    }

    #[test]
    fn keys_parse_only_hex() {
        assert!(RuleKey::parse("0123456789abcdef0123456789abcdeF").is_some());
        assert!(RuleKey::parse("0123456789abcdef0123456789abcde;").is_none());
        assert!(RuleKey::parse("short").is_none());
    }

    proptest::proptest! {
        /// Whatever text an attacker controls, it can only choose among typed values; every
        /// script samgate renders is made of a fixed alphabet with no shell metacharacters
        /// beyond the ones the template itself uses.
        #[test]
        fn arbitrary_text_cannot_reach_a_script(text in ".*", bits in proptest::num::u128::ANY, prefix in 0u8..=128, t in proptest::option::of(proptest::num::u32::ANY)) {
            // The only way event text can influence a rule is through parsing into typed values.
            let address: Option<IpAddr> = text.trim().parse().ok();
            let v6 = std::net::Ipv6Addr::from(bits);
            let net = IpNet::new(IpAddr::V6(v6), prefix).unwrap().trunc();
            let key = RuleKey::from_bytes(bits.to_be_bytes());
            let mut rules = vec![SamRule { action: SamAction::Drop, close_connections: true, criteria: Criteria::SubSrc(net), timeout_secs: t, log: LogType::Alert, key: Some(key) }];
            if let Some(address) = address {
                rules.push(SamRule { action: SamAction::Reject, close_connections: false, criteria: Criteria::Src(address), timeout_secs: t, log: LogType::None, key: None });
            }
            for mode in [SamMode::FwSam, SamMode::FwSamp] {
                let script = batch_script(&rules, mode, Operation::Block).unwrap();
                for line in script.lines().skip(1) {
                    let (command, echo) = line.split_once("; echo").unwrap_or((line, ""));
                    proptest::prop_assert!(echo.is_empty() || echo.starts_with(" \"samgate-rule "));
                    // Commands are words of [A-Za-z0-9.:_+=/-] separated by single spaces.
                    let command = command.trim_end_matches(" >/dev/null");
                    proptest::prop_assert!(
                        command.bytes().all(|b| b.is_ascii_alphanumeric() || b" .:_+=/-".contains(&b)),
                        "unsafe byte in {:?}", command
                    );
                }
            }
        }
    }
}
