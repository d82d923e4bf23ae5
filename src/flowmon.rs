//! What Flowmon ADS hands a custom script, parsed without I/O.
//!
//! ADS writes one event per line on the script's stdin, in one of these shapes
//! (`docs/flowmon.md` has the field tables and their sources):
//!
//! | fields | shape                                                     |
//! |--------|-----------------------------------------------------------|
//! | 14     | Flowmon IDS (Suricata) event, or an ADS standard event whose empty last field was trimmed |
//! | 15     | ADS standard event                                        |
//! | 16     | ADS extended event whose empty last field was trimmed     |
//! | 17     | ADS extended event (adds subtype and MITRE ATT&CK)        |
//! | `{…}`  | one JSON object (ADS 12.5+), ADS or IDS keys              |
//!
//! Rules that the public vendor scripts get wrong and this module gets right: split on tabs only
//! (never collapse empty fields), strip only the line terminator, treat `""`, `" "` and `n/a` as
//! absent, parse the source as a real IPv4/IPv6 address, and never let one bad line disturb another.

use std::io::BufRead;
use std::net::IpAddr;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which input shape a line had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::EnumIter)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// ADS tab-separated, 15 fields (14 when the trailing empty field was trimmed).
    AdsStandard,
    /// ADS tab-separated "extended version", 17 fields (16 when trimmed).
    AdsExtended,
    /// Flowmon IDS tab-separated, 14 fields.
    Ids,
    /// One JSON object with ADS keys.
    AdsJson,
    /// One JSON object with IDS keys (no `timestamp`).
    IdsJson,
}

impl InputFormat {
    /// A short, bounded label (used as a metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdsStandard => "ads_standard",
            Self::AdsExtended => "ads_extended",
            Self::Ids => "ids",
            Self::AdsJson => "ads_json",
            Self::IdsJson => "ids_json",
        }
    }

    /// True for Flowmon IDS (signature) events, false for ADS (behaviour) events.
    pub fn is_ids(self) -> bool {
        matches!(self, Self::Ids | Self::IdsJson)
    }
}

/// Event priority, normalised. Ordered: `Unknown < Informational < … < Critical`.
///
/// ADS sends the perspective's priority by name (`Critical`, `HIGH`, …). It is empty when an
/// analyst runs the script by hand ("Initiate response"), which yields `Unknown`. IDS sends the
/// Suricata severity (1 = high, 2 = medium, 3 = low, 4 = informational).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Unknown,
    Informational,
    Low,
    Medium,
    High,
    Critical,
}

impl Priority {
    /// Parses an ADS priority name; anything unrecognised is `Unknown`.
    pub fn from_ads(value: Option<&str>) -> Self {
        let Some(value) = value else {
            return Self::Unknown;
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "critical" => Self::Critical,
            "high" => Self::High,
            "medium" => Self::Medium,
            "low" => Self::Low,
            "informational" | "information" | "info" => Self::Informational,
            _ => Self::Unknown,
        }
    }

    /// Parses an IDS (Suricata) severity: a number 1–4, or a name as ADS would send it.
    pub fn from_ids_severity(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("1") => Self::High,
            Some("2") => Self::Medium,
            Some("3") => Self::Low,
            Some("4") => Self::Informational,
            other => Self::from_ads(other),
        }
    }

    /// The lower-case name used in messages and config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Informational => "informational",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// A timestamp as ADS wrote it, and its UTC reading when the text was recognised.
///
/// The format is not documented: public scripts read it as `YYYY-MM-DD HH:MM:SS` or as epoch
/// seconds. Both (and RFC 3339, epoch milliseconds, `M/D/YYYY H:MM`) are recognised; times without
/// a zone are read as UTC. The raw text is always kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowmonTime {
    pub raw: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub utc: Option<DateTime<Utc>>,
}

impl FlowmonTime {
    fn parse(raw: &str) -> Self {
        Self {
            raw: raw.to_owned(),
            utc: parse_timestamp(raw),
        }
    }
}

fn parse_timestamp(raw: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    if raw.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = raw.parse().ok()?;
        return match raw.len() {
            9 | 10 => Utc.timestamp_opt(n, 0).single(),
            12 | 13 => Utc.timestamp_millis_opt(n).single(),
            _ => None,
        };
    }
    const NAIVE: [&str; 5] = [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%m/%d/%Y %H:%M",
    ];
    NAIVE
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(raw, f).ok())
        .map(|t| t.and_utc())
}

/// Fields only Flowmon IDS events carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdsFields {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_port: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub destination: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub destination_port: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signature_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signature_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub log_source_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub log_source_interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub severity: Option<String>,
}

/// One parsed Flowmon event. Absent fields are `None` (never `""`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowmonEvent {
    pub format: InputFormat,
    /// ADS/IDS event id (the key of `/rest/ads/event/{id}`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
    /// The detection method code (`SCANS`, `SSHDICT`, …); `None` for IDS events.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    /// Submethod (extended format and JSON only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subtype: Option<String>,
    /// MITRE ATT&CK categories as ADS wrote them (extended format only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mitre: Option<String>,
    /// Human description of the method (IDS: the signature name).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
    /// The perspective of the custom-script action; empty on a manual trigger.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub perspective: Option<String>,
    pub priority: Priority,
    /// The priority or severity exactly as received.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub priority_raw: Option<String>,
    /// When ADS detected the event (IDS: first seen).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detected_at: Option<FlowmonTime>,
    /// Timestamp of the first flow (IDS: last seen).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub first_flow: Option<FlowmonTime>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ports: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub protocol: Option<String>,
    /// The event source: the host a quarantine would act on.
    pub source: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub targets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data_feed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ids: Option<IdsFields>,
}

/// Why a line could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "expected 14, 15, 16 or 17 tab-separated fields or a JSON object, found {found} field(s)"
    )]
    FieldCount { found: usize },
    #[error("the event has no source address")]
    MissingSource,
    #[error("the event source {value:?} is not an IPv4 or IPv6 address")]
    InvalidSource { value: String },
    #[error("a 14-field line is neither an IDS event (source in field 4) nor a trimmed ADS event (source in field 11)")]
    AmbiguousFourteen,
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("the JSON line is not an object")]
    NotAnObject,
    #[error("line of {len} bytes exceeds the limit of {max} bytes")]
    LineTooLong { len: usize, max: usize },
}

impl ParseError {
    /// A short, bounded code for metrics and dead-letter messages.
    pub fn code(&self) -> &'static str {
        match self {
            Self::FieldCount { .. } => "field_count",
            Self::MissingSource => "missing_source",
            Self::InvalidSource { .. } => "invalid_source",
            Self::AmbiguousFourteen => "ambiguous_fields",
            Self::InvalidJson(_) => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::LineTooLong { .. } => "line_too_long",
        }
    }
}

/// Parses one line (its terminator, `\n` or `\r\n`, may still be attached).
///
/// Returns `Ok(None)` for a blank line, which ADS does not send as an event.
pub fn parse_line(bytes: &[u8]) -> Result<Option<FlowmonEvent>, ParseError> {
    let bytes = strip_terminator(bytes);
    let text = String::from_utf8_lossy(bytes);
    if text.trim().is_empty() {
        return Ok(None);
    }
    if text.trim_start().starts_with('{') {
        return parse_json(&text).map(Some);
    }
    parse_tsv(&text).map(Some)
}

/// Removes one trailing `\n` or `\r\n` (and a lone trailing `\r`), nothing else.
pub fn strip_terminator(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// A field's value, or `None` when ADS marked it empty (`""`, `" "`, `n/a`).
fn present(field: &str) -> Option<String> {
    let field = field.trim();
    if field.is_empty() || field.eq_ignore_ascii_case("n/a") {
        None
    } else {
        Some(field.to_owned())
    }
}

fn parse_ip(value: Option<&str>) -> Result<IpAddr, ParseError> {
    let value = value.map(str::trim).filter(|v| !v.is_empty());
    let value = value.ok_or(ParseError::MissingSource)?;
    value
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| ParseError::InvalidSource {
            value: value.chars().take(64).collect(),
        })
}

fn is_ip(field: &str) -> bool {
    field.trim().parse::<IpAddr>().is_ok()
}

/// Splits ADS's `", "`-separated target list.
fn split_targets(field: Option<&str>) -> Vec<String> {
    field
        .map(|f| f.split(',').filter_map(present).collect())
        .unwrap_or_default()
}

fn parse_tsv(text: &str) -> Result<FlowmonEvent, ParseError> {
    let fields: Vec<&str> = text.split('\t').collect();
    match fields.len() {
        15 => Ok(ads_standard(&fields)),
        16 | 17 => Ok(ads_extended(&fields)),
        // IDS has its source at index 3; a standard ADS event with its empty last field trimmed
        // has the method code there and the source at index 10.
        14 if is_ip(fields[3]) => Ok(ids(&fields)),
        14 if is_ip(fields[10]) => Ok(ads_standard(&fields)),
        14 if fields[3].trim().is_empty() && fields[10].trim().is_empty() => {
            Err(ParseError::MissingSource)
        }
        14 => Err(ParseError::AmbiguousFourteen),
        found => Err(ParseError::FieldCount { found }),
    }
    .and_then(|mut event| {
        event.source = parse_ip(event_source_field(&fields, event.format))?;
        Ok(event)
    })
}

fn event_source_field<'a>(fields: &[&'a str], format: InputFormat) -> Option<&'a str> {
    let index = match format {
        InputFormat::AdsStandard => 10,
        InputFormat::AdsExtended => 12,
        _ => 3,
    };
    fields.get(index).copied()
}

fn field(fields: &[&str], index: usize) -> Option<String> {
    fields.get(index).and_then(|f| present(f))
}

fn time_field(fields: &[&str], index: usize) -> Option<FlowmonTime> {
    field(fields, index).map(|t| FlowmonTime::parse(&t))
}

const UNSPECIFIED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// `0 ID · 1 detected · 2 first flow · 3 type · 4 description · 5 perspective · 6 priority ·
/// 7 detail · 8 ports · 9 protocol · 10 source · 11 source name · 12 targets · 13 feed · 14 user`
fn ads_standard(f: &[&str]) -> FlowmonEvent {
    FlowmonEvent {
        format: InputFormat::AdsStandard,
        event_id: field(f, 0),
        detected_at: time_field(f, 1),
        first_flow: time_field(f, 2),
        method: field(f, 3),
        subtype: None,
        mitre: None,
        description: field(f, 4),
        perspective: field(f, 5),
        priority: Priority::from_ads(field(f, 6).as_deref()),
        priority_raw: field(f, 6),
        detail: field(f, 7),
        ports: field(f, 8),
        protocol: field(f, 9),
        source: UNSPECIFIED,
        source_name: field(f, 11),
        targets: split_targets(f.get(12).copied()),
        data_feed: field(f, 13),
        user_identity: field(f, 14),
        ids: None,
    }
}

/// As standard, with `4 subtype · 5 MITRE` inserted after the type code.
fn ads_extended(f: &[&str]) -> FlowmonEvent {
    FlowmonEvent {
        format: InputFormat::AdsExtended,
        event_id: field(f, 0),
        detected_at: time_field(f, 1),
        first_flow: time_field(f, 2),
        method: field(f, 3),
        subtype: field(f, 4),
        mitre: field(f, 5),
        description: field(f, 6),
        perspective: field(f, 7),
        priority: Priority::from_ads(field(f, 8).as_deref()),
        priority_raw: field(f, 8),
        detail: field(f, 9),
        ports: field(f, 10),
        protocol: field(f, 11),
        source: UNSPECIFIED,
        source_name: field(f, 13),
        targets: split_targets(f.get(14).copied()),
        data_feed: field(f, 15),
        user_identity: field(f, 16),
        ids: None,
    }
}

/// `0 ID · 1 first seen · 2 last seen · 3 src IP · 4 src port · 5 dst IP · 6 dst port · 7 protocol ·
/// 8 signature id · 9 signature name · 10 log source IP · 11 log source interface · 12 category ·
/// 13 severity`
fn ids(f: &[&str]) -> FlowmonEvent {
    let ids = IdsFields {
        source_port: field(f, 4),
        destination: field(f, 5),
        destination_port: field(f, 6),
        signature_id: field(f, 8),
        signature_name: field(f, 9),
        log_source_ip: field(f, 10),
        log_source_interface: field(f, 11),
        category: field(f, 12),
        severity: field(f, 13),
    };
    FlowmonEvent {
        format: InputFormat::Ids,
        event_id: field(f, 0),
        detected_at: time_field(f, 1),
        first_flow: time_field(f, 2),
        method: None,
        subtype: None,
        mitre: None,
        description: ids.signature_name.clone(),
        perspective: None,
        priority: Priority::from_ids_severity(ids.severity.as_deref()),
        priority_raw: ids.severity.clone(),
        detail: None,
        ports: ids.destination_port.clone(),
        protocol: field(f, 7),
        source: UNSPECIFIED,
        source_name: None,
        targets: ids.destination.iter().cloned().collect(),
        data_feed: None,
        user_identity: None,
        ids: Some(ids),
    }
}

/// A JSON value as a present string: strings, numbers and booleans; `null`/empty are absent.
fn json_str(obj: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match obj.get(*k)? {
        Value::String(s) => present(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

fn json_time(obj: &Map<String, Value>, keys: &[&str]) -> Option<FlowmonTime> {
    json_str(obj, keys).map(|t| FlowmonTime::parse(&t))
}

/// Targets as a `", "`-separated string, an array of strings, or an array of `{ "ip": … }`.
fn json_targets(obj: &Map<String, Value>) -> Vec<String> {
    match obj.get("targets") {
        Some(Value::String(s)) => split_targets(Some(s)),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(s) => present(s),
                Value::Object(o) => json_str(o, &["ip"]),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_json(text: &str) -> Result<FlowmonEvent, ParseError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ParseError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ParseError::NotAnObject);
    };
    let is_ids = !obj.contains_key("timestamp") && obj.contains_key("srcIp");
    if is_ids {
        let ids = IdsFields {
            source_port: json_str(&obj, &["srcPort"]),
            destination: json_str(&obj, &["dstIp"]),
            destination_port: json_str(&obj, &["dstPort"]),
            signature_id: json_str(&obj, &["signatureId"]),
            signature_name: json_str(&obj, &["signatureName"]),
            log_source_ip: json_str(&obj, &["logSourceIp"]),
            log_source_interface: json_str(&obj, &["logSourceInterface"]),
            category: json_str(&obj, &["category"]),
            severity: json_str(&obj, &["severity"]),
        };
        return Ok(FlowmonEvent {
            format: InputFormat::IdsJson,
            event_id: json_str(&obj, &["id"]),
            detected_at: json_time(&obj, &["firstSeen"]),
            first_flow: json_time(&obj, &["lastSeen"]),
            method: None,
            subtype: None,
            mitre: None,
            description: ids.signature_name.clone(),
            perspective: None,
            priority: Priority::from_ids_severity(ids.severity.as_deref()),
            priority_raw: ids.severity.clone(),
            detail: None,
            ports: ids.destination_port.clone(),
            protocol: json_str(&obj, &["protocol"]),
            source: parse_ip(json_str(&obj, &["srcIp"]).as_deref())?,
            source_name: None,
            targets: ids.destination.iter().cloned().collect(),
            data_feed: None,
            user_identity: None,
            ids: Some(ids),
        });
    }
    let source = match obj.get("source") {
        Some(Value::Object(o)) => json_str(o, &["ip"]),
        _ => json_str(&obj, &["source"]),
    };
    let priority_raw = json_str(&obj, &["severity", "priority"]);
    Ok(FlowmonEvent {
        format: InputFormat::AdsJson,
        event_id: json_str(&obj, &["id"]),
        detected_at: json_time(&obj, &["timestamp"]),
        first_flow: json_time(&obj, &["firstFlow", "flowStamp"]),
        method: json_str(&obj, &["type", "method"]),
        subtype: json_str(&obj, &["subtype", "typeSubtype"]),
        mitre: json_str(&obj, &["mitre"]),
        description: json_str(&obj, &["typeDesc"]),
        perspective: json_str(&obj, &["perspective"]),
        priority: Priority::from_ads(priority_raw.as_deref()),
        priority_raw,
        detail: json_str(&obj, &["detail"]),
        ports: json_str(&obj, &["ports"]),
        protocol: json_str(&obj, &["protocol"]),
        source: parse_ip(source.as_deref())?,
        source_name: json_str(&obj, &["sourceName", "capturedSourceName"]),
        targets: json_targets(&obj),
        data_feed: json_str(&obj, &["netFlowSource", "dataFeed"]),
        user_identity: json_str(&obj, &["userIdentity"]),
        ids: None,
    })
}

/// One line read from stdin: its 1-based number, its bytes (terminator stripped, at most the
/// reader's limit) and its full length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLine {
    pub number: u64,
    pub bytes: Vec<u8>,
    /// The line's length before any truncation; `len > bytes.len()` means it was cut.
    pub len: usize,
}

impl RawLine {
    pub fn truncated(&self) -> bool {
        self.len > self.bytes.len()
    }

    /// Parses this line; a line over the limit is an error without being looked at.
    pub fn parse(&self, max: usize) -> Result<Option<FlowmonEvent>, ParseError> {
        if self.truncated() {
            return Err(ParseError::LineTooLong { len: self.len, max });
        }
        parse_line(&self.bytes)
    }
}

/// Reads lines of at most `max` bytes each; the rest of a longer line is counted and skipped, so
/// memory stays bounded whatever arrives on stdin.
pub struct LineReader<R> {
    inner: R,
    max: usize,
    number: u64,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            max,
            number: 0,
        }
    }

    /// The next line, or `None` at end of input.
    pub fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        let mut bytes = Vec::new();
        let mut len = 0usize; // content bytes seen, without the '\n'
        let mut seen_any = false;
        let mut ends_with_cr = false;
        loop {
            let buf = match self.inner.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                break;
            }
            seen_any = true;
            let newline = buf.iter().position(|&b| b == b'\n');
            let content = &buf[..newline.unwrap_or(buf.len())];
            // Keep one byte past the limit so a '\r' right at the limit can still be dropped.
            let room = (self.max + 1).saturating_sub(bytes.len());
            bytes.extend_from_slice(&content[..content.len().min(room)]);
            len += content.len();
            if let Some(&last) = content.last() {
                ends_with_cr = last == b'\r';
            }
            let consumed = content.len() + usize::from(newline.is_some());
            self.inner.consume(consumed);
            if newline.is_some() {
                break;
            }
        }
        if !seen_any {
            return Ok(None);
        }
        if ends_with_cr {
            len -= 1;
        }
        bytes.truncate(len.min(self.max));
        self.number += 1;
        Ok(Some(RawLine {
            number: self.number,
            bytes,
            len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(fields: &[&str]) -> String {
        fields.join("\t")
    }

    fn standard(source: &str) -> String {
        join(&[
            "4821",
            "2026-11-20 10:13:02",
            "2026-11-20 10:11:00",
            "SCANS",
            "Port scanning",
            "Security",
            "High",
            "TCP SYN scan, 1200 ports",
            "22,23,80",
            "TCP",
            source,
            "scanner.example.net",
            "10.0.0.1, 10.0.0.2",
            "edge-feed",
            " ",
        ])
    }

    fn extended(source: &str) -> String {
        join(&[
            "4822",
            "2026-11-20 10:13:02",
            "1763633460",
            "SSHDICT",
            "General",
            "T1110 Brute Force",
            "SSH attack",
            "Security",
            "Critical",
            "attempts: 800",
            "22",
            "TCP",
            source,
            " ",
            "10.0.0.5",
            "dc-feed",
            "alice",
        ])
    }

    fn ids_line(source: &str) -> String {
        join(&[
            "991",
            "2026-11-20 10:00:00",
            "2026-11-20 10:05:00",
            source,
            "51515",
            "10.0.0.9",
            "445",
            "TCP",
            "2024217",
            "ET EXPLOIT SMB",
            "192.0.2.10",
            "eth1",
            "Attempted Admin",
            "1",
        ])
    }

    fn parse(line: &str) -> Result<FlowmonEvent, ParseError> {
        parse_line(line.as_bytes()).map(|e| e.expect("an event"))
    }

    #[test]
    fn ads_standard_fields_land_where_ads_puts_them() {
        let e = parse(&standard("198.51.100.7")).unwrap();
        assert_eq!(e.format, InputFormat::AdsStandard);
        assert_eq!(e.event_id.as_deref(), Some("4821"));
        assert_eq!(e.method.as_deref(), Some("SCANS"));
        assert_eq!(e.description.as_deref(), Some("Port scanning"));
        assert_eq!(e.perspective.as_deref(), Some("Security"));
        assert_eq!(e.priority, Priority::High);
        assert_eq!(e.source, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(e.source_name.as_deref(), Some("scanner.example.net"));
        assert_eq!(e.targets, vec!["10.0.0.1", "10.0.0.2"]);
        assert_eq!(e.data_feed.as_deref(), Some("edge-feed"));
        assert_eq!(e.user_identity, None, "a single space is an empty field");
        let detected = e.detected_at.unwrap();
        assert_eq!(detected.raw, "2026-11-20 10:13:02");
        assert_eq!(
            detected.utc.unwrap().to_rfc3339(),
            "2026-11-20T10:13:02+00:00"
        );
    }

    #[test]
    fn ads_extended_shifts_by_two_and_keeps_subtype_and_mitre() {
        let e = parse(&extended("2001:db8::66")).unwrap();
        assert_eq!(e.format, InputFormat::AdsExtended);
        assert_eq!(e.method.as_deref(), Some("SSHDICT"));
        assert_eq!(e.subtype.as_deref(), Some("General"));
        assert_eq!(e.mitre.as_deref(), Some("T1110 Brute Force"));
        assert_eq!(e.description.as_deref(), Some("SSH attack"));
        assert_eq!(e.priority, Priority::Critical);
        assert_eq!(e.source.to_string(), "2001:db8::66");
        assert_eq!(e.source_name, None);
        assert_eq!(e.user_identity.as_deref(), Some("alice"));
        let first = e.first_flow.unwrap();
        assert_eq!(
            first.utc.unwrap().timestamp(),
            1_763_633_460,
            "epoch seconds"
        );
    }

    #[test]
    fn trimmed_last_field_is_tolerated_in_both_ads_formats() {
        let std15 = standard("192.0.2.1");
        let std14 = std15.trim_end_matches([' ', '\t']);
        assert_eq!(std14.split('\t').count(), 14);
        let e = parse(std14).unwrap();
        assert_eq!(e.format, InputFormat::AdsStandard, "not misread as IDS");
        assert_eq!(e.source.to_string(), "192.0.2.1");

        let mut ext = extended("192.0.2.2");
        ext.truncate(ext.rfind('\t').unwrap());
        let e = parse(&ext).unwrap();
        assert_eq!(e.format, InputFormat::AdsExtended);
        assert_eq!(e.user_identity, None);
        assert_eq!(e.source.to_string(), "192.0.2.2");
    }

    #[test]
    fn ids_fields_and_severity() {
        let e = parse(&ids_line("203.0.113.50")).unwrap();
        assert_eq!(e.format, InputFormat::Ids);
        assert_eq!(e.source.to_string(), "203.0.113.50");
        assert_eq!(e.priority, Priority::High, "Suricata severity 1");
        assert_eq!(e.method, None);
        let ids = e.ids.unwrap();
        assert_eq!(ids.signature_name.as_deref(), Some("ET EXPLOIT SMB"));
        assert_eq!(ids.destination_port.as_deref(), Some("445"));
        assert_eq!(e.targets, vec!["10.0.0.9"]);
    }

    #[test]
    fn crlf_and_lf_terminators_are_stripped_and_nothing_else() {
        let line = format!("{}\r\n", standard("192.0.2.3"));
        let e = parse(&line).unwrap();
        assert_eq!(e.user_identity, None);
        assert_eq!(e.source.to_string(), "192.0.2.3");
        assert_eq!(strip_terminator(b"a\t \r\n"), b"a\t ");
        assert_eq!(strip_terminator(b"a\t \n"), b"a\t ");
    }

    #[test]
    fn empty_fields_are_never_collapsed() {
        // Every optional field empty, written as ADS 13 does (a single space) and as older
        // versions may (nothing at all): positions must not shift.
        for empty in [" ", ""] {
            let mut fields = vec![empty; 15];
            fields[0] = "1";
            fields[3] = "SCANS";
            fields[10] = "192.0.2.4";
            let e = parse(&join(&fields)).unwrap();
            assert_eq!(e.source.to_string(), "192.0.2.4");
            assert_eq!(e.priority, Priority::Unknown, "manual trigger: no priority");
            assert_eq!(e.perspective, None);
            assert!(e.targets.is_empty());
        }
    }

    #[test]
    fn na_is_absent() {
        let line = standard("192.0.2.5").replace("\t \t", "\tn/a\t");
        assert_eq!(parse(&line).unwrap().user_identity, None);
    }

    #[test]
    fn ipv4_mapped_ipv6_source_is_canonical_ipv4() {
        let e = parse(&standard("::ffff:192.0.2.6")).unwrap();
        assert_eq!(e.source.to_string(), "192.0.2.6");
    }

    #[test]
    fn json_ads_and_ids_objects() {
        let ads = r#"{"id":77,"timestamp":"2026-11-20 10:13:02","type":"RDPDICT","typeDesc":"RDP attack","severity":"MEDIUM","source":"198.51.100.9","targets":"10.1.1.1, 10.1.1.2","detail":"x","perspective":"Security","netFlowSource":"core","userIdentity":""}"#;
        let e = parse(ads).unwrap();
        assert_eq!(e.format, InputFormat::AdsJson);
        assert_eq!(e.event_id.as_deref(), Some("77"));
        assert_eq!(e.method.as_deref(), Some("RDPDICT"));
        assert_eq!(e.priority, Priority::Medium);
        assert_eq!(e.targets, vec!["10.1.1.1", "10.1.1.2"]);
        assert_eq!(e.data_feed.as_deref(), Some("core"));
        assert_eq!(e.user_identity, None);

        let ids = r#"{"id":5,"firstSeen":"2026-11-20 10:00:00","category":"Attempted Admin","severity":2,"srcIp":"2001:db8::9","dstIp":"10.0.0.1","signatureName":"ET SCAN","logSourceInterface":"eth0","logSourceIp":"192.0.2.1"}"#;
        let e = parse(ids).unwrap();
        assert_eq!(e.format, InputFormat::IdsJson);
        assert_eq!(e.priority, Priority::Medium);
        assert_eq!(e.source.to_string(), "2001:db8::9");

        let arrays = r#"{"timestamp":"1","source":{"ip":"192.0.2.8"},"targets":[{"ip":"10.0.0.1"},"10.0.0.2"]}"#;
        let e = parse(arrays).unwrap();
        assert_eq!(e.source.to_string(), "192.0.2.8");
        assert_eq!(e.targets, vec!["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn hostile_lines_are_typed_errors() {
        assert_eq!(parse("a\tb\tc"), Err(ParseError::FieldCount { found: 3 }));
        assert_eq!(
            parse(&standard("999.1.1.1")),
            Err(ParseError::InvalidSource {
                value: "999.1.1.1".into()
            })
        );
        assert_eq!(parse(&standard(" ")), Err(ParseError::MissingSource));
        assert!(matches!(parse("{nope"), Err(ParseError::InvalidJson(_))));
        assert!(matches!(
            parse("{\"timestamp\":1}"),
            Err(ParseError::MissingSource)
        ));
        let mut fourteen = vec!["x"; 14];
        fourteen[3] = "SCANS";
        assert_eq!(parse(&join(&fourteen)), Err(ParseError::AmbiguousFourteen));
        assert_eq!(
            parse_line(b"   \r\n"),
            Ok(None),
            "blank lines are not events"
        );
    }

    #[test]
    fn invalid_utf8_is_read_lossily_and_the_event_survives() {
        let mut line = standard("192.0.2.10").into_bytes();
        let detail_at = line.windows(3).position(|w| w == b"TCP").unwrap();
        line.splice(detail_at..detail_at, [0xff, 0xfe, 0xc3]);
        let e = parse_line(&line).unwrap().unwrap();
        assert_eq!(e.source.to_string(), "192.0.2.10");
        assert!(e.detail.unwrap().contains('\u{FFFD}'));
    }

    #[test]
    fn shell_metacharacters_are_kept_as_inert_text() {
        let evil = "$(reboot);`id`|&&>/tmp/x'\"\\";
        let mut fields: Vec<String> = standard("192.0.2.11")
            .split('\t')
            .map(String::from)
            .collect();
        for (i, f) in fields.iter_mut().enumerate() {
            if i != 10 {
                *f = evil.to_string();
            }
        }
        let e = parse(&fields.join("\t")).unwrap();
        assert_eq!(e.source.to_string(), "192.0.2.11");
        assert_eq!(e.detail.as_deref(), Some(evil));
        let mut fields_bad_source = fields.clone();
        fields_bad_source[10] = evil.to_string();
        assert!(matches!(
            parse(&fields_bad_source.join("\t")),
            Err(ParseError::InvalidSource { .. })
        ));
    }

    #[test]
    fn priority_names_and_order() {
        assert_eq!(Priority::from_ads(Some("CRITICAL")), Priority::Critical);
        assert_eq!(
            Priority::from_ads(Some("Informational")),
            Priority::Informational
        );
        assert_eq!(Priority::from_ads(Some("7")), Priority::Unknown);
        assert_eq!(Priority::from_ids_severity(Some("3")), Priority::Low);
        assert!(Priority::Critical > Priority::High);
        assert!(Priority::Informational > Priority::Unknown);
    }

    #[test]
    fn reader_splits_lines_counts_them_and_bounds_long_ones() {
        let big = "x".repeat(1 << 20);
        let input = format!("one\r\n\ntwo\n{big}\nlast-without-newline");
        let mut reader = LineReader::new(input.as_bytes(), 1000);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().unwrap() {
            lines.push(line);
        }
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0].bytes, b"one");
        assert_eq!(lines[1].bytes, b"");
        assert_eq!(lines[2].number, 3);
        assert_eq!(lines[3].len, 1 << 20);
        assert_eq!(lines[3].bytes.len(), 1000);
        assert!(lines[3].truncated());
        assert_eq!(
            lines[3].parse(1000),
            Err(ParseError::LineTooLong {
                len: 1 << 20,
                max: 1000
            })
        );
        assert_eq!(lines[4].bytes, b"last-without-newline");
        assert!(!lines[4].truncated());
    }

    #[test]
    fn ten_thousand_events_parse_independently() {
        let mut input = String::new();
        for i in 0..10_000u32 {
            if i % 1000 == 999 {
                input.push_str("garbage line\n");
            } else {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                input.push_str(&standard(&ip.to_string()));
                input.push('\n');
            }
        }
        let mut reader = LineReader::new(input.as_bytes(), 65536);
        let (mut ok, mut bad) = (0, 0);
        while let Some(line) = reader.next_line().unwrap() {
            match line.parse(65536) {
                Ok(Some(_)) => ok += 1,
                Err(ParseError::FieldCount { found: 1 }) => bad += 1,
                other => panic!("line {}: {other:?}", line.number),
            }
        }
        assert_eq!((ok, bad), (9_990, 10));
    }

    proptest::proptest! {
        #[test]
        fn no_input_bytes_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_line(&bytes);
            let mut reader = LineReader::new(bytes.as_slice(), 64);
            while let Some(line) = reader.next_line().unwrap() {
                let _ = line.parse(64);
            }
        }

        #[test]
        fn tab_soup_never_panics(fields in proptest::collection::vec("[ -~\t]{0,12}", 0..20)) {
            let _ = parse_line(fields.join("\t").as_bytes());
        }
    }
}
