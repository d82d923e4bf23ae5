//! The messages the shim writes to Kafka: `samgate.event.v1` events and `samgate.dlq.v1`
//! dead letters. JSON Schemas: `docs/schemas/`.

use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::flowmon::{FlowmonEvent, RawLine};

/// Schema id carried by every event message.
pub const EVENT_SCHEMA: &str = "samgate.event.v1";
/// Schema id carried by every dead-letter message.
pub const DEAD_LETTER_SCHEMA: &str = "samgate.dlq.v1";
/// How much of a bad line a dead letter keeps: enough to diagnose, small enough for any broker.
pub const DEAD_LETTER_RAW_LIMIT: usize = 64 * 1024;

/// One Flowmon detection, as published to the events topic (key: [`Event::key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Always [`EVENT_SCHEMA`].
    pub schema: String,
    /// Stable id: the same line from the same collector and site always has the same id, so a
    /// replay (spool, redelivery) is recognisable downstream.
    pub id: String,
    /// The site (Flowmon installation) this event came from; the unit of routing.
    pub site: String,
    /// Host name of the machine the shim ran on (the Flowmon collector).
    pub collector: String,
    /// When the shim read the line (UTC).
    #[serde(with = "rfc3339_millis")]
    pub received_at: DateTime<Utc>,
    /// 1-based line number within the ADS run that delivered it.
    pub line: u64,
    /// The parsed fields.
    pub flowmon: FlowmonEvent,
    /// The line exactly as received (terminator stripped, decoded as UTF-8 lossily); cut when
    /// the event was too large (see `cut`).
    pub raw: String,
    /// Present when the event was cut to fit a message: what was shortened. Never the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<Cut>,
    /// The source's MAC address, as Flowmon's REST API knows it for this ADS event (looked up
    /// by the shim when `[shim.flowmon_api]` is set): a FortiGate stitch's access-layer
    /// quarantine acts on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_mac: Option<MacAddr>,
}

/// A MAC address (EUI-48), typed: it reaches a firewall only as its own canonical text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;

    /// `aa:bb:cc:dd:ee:ff`, `AA-BB-CC-DD-EE-FF` or `aabb.ccdd.eeff`.
    fn from_str(text: &str) -> Result<Self, String> {
        let hex: String = text
            .trim()
            .chars()
            .filter(|c| !matches!(c, ':' | '-' | '.'))
            .collect();
        let bad = || format!("{text:?} is not a MAC address");
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(bytes))
    }
}

impl MacAddr {
    /// Whether it can name one host's interface: not a group (multicast, broadcast) address,
    /// not all zeros.
    pub fn is_unicast_host(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How an event too large for a message was cut (see [`Event::fit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// The raw line's full length in bytes (`raw` keeps its start).
    pub raw_len: usize,
    /// Targets left out at the end of `flowmon.targets`.
    #[serde(default)]
    pub targets_omitted: usize,
    /// The detail's full length in bytes, when it was shortened too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail_len: Option<usize>,
    /// Other text fields of `flowmon` shortened as a last resort (`ports`, `description`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

impl Event {
    pub fn new(
        site: &str,
        collector: &str,
        received_at: DateTime<Utc>,
        line: &RawLine,
        flowmon: FlowmonEvent,
    ) -> Self {
        Self {
            schema: EVENT_SCHEMA.to_owned(),
            id: event_id(site, collector, &line.bytes),
            site: site.to_owned(),
            collector: collector.to_owned(),
            received_at,
            line: line.number,
            flowmon,
            raw: String::from_utf8_lossy(&line.bytes).into_owned(),
            cut: None,
            source_mac: None,
        }
    }

    /// Fits the event into `max` bytes of JSON, cutting (in this order, only as far as needed)
    /// the raw line to a quarter of `max`, the target list (a scan of a /16 names thousands),
    /// then the detail. The source and the method are never cut, so a huge event is still acted
    /// on. `true` when something was cut; an event that cannot fit is `LineTooLong`.
    pub fn fit(mut self, max: usize) -> Result<(Self, bool), crate::flowmon::ParseError> {
        let size = |e: &Event| serde_json::to_vec(e).map_or(usize::MAX, |v| v.len());
        let len = size(&self);
        if len <= max {
            return Ok((self, false));
        }
        let mut cut = Cut {
            raw_len: self.raw.len(),
            targets_omitted: 0,
            detail_len: None,
            fields: Vec::new(),
        };
        truncate_utf8(&mut self.raw, max / 4);
        self.cut = Some(cut.clone());
        if size(&self) > max {
            let all = std::mem::take(&mut self.flowmon.targets);
            let (mut kept, mut over) = (0, all.len() + 1); // fits with `kept`, not with `over`
            while over - kept > 1 {
                let mid = (kept + over) / 2;
                self.flowmon.targets = all[..mid].to_vec();
                cut.targets_omitted = all.len() - mid;
                self.cut = Some(cut.clone());
                if size(&self) <= max {
                    kept = mid;
                } else {
                    over = mid;
                }
            }
            self.flowmon.targets = all[..kept].to_vec();
            cut.targets_omitted = all.len() - kept;
            self.cut = Some(cut.clone());
        }
        if size(&self) > max {
            if let Some(detail) = &mut self.flowmon.detail {
                cut.detail_len = Some(detail.len());
                truncate_utf8(detail, max / 8);
                self.cut = Some(cut.clone());
            }
        }
        // Last: the other free-text fields (a port list of a wide scan can be longer than the
        // message), each to a sixteenth, largest first. Never the method: it is decided on.
        let mut texts: Vec<(&str, TextField, usize)> = CUTTABLE_FIELDS
            .iter()
            .filter_map(|&(name, field)| {
                Some((name, field, field(&mut self.flowmon).as_ref()?.len()))
            })
            .filter(|(_, _, len)| *len > max / 16)
            .collect();
        texts.sort_by_key(|(_, _, len)| std::cmp::Reverse(*len));
        for (name, field, _) in texts {
            if size(&self) <= max {
                break;
            }
            if let Some(text) = field(&mut self.flowmon) {
                truncate_utf8(text, max / 16);
            }
            cut.fields.push(name.to_owned());
            self.cut = Some(cut.clone());
        }
        match size(&self) <= max {
            true => Ok((self, true)),
            false => Err(crate::flowmon::ParseError::LineTooLong { len, max }),
        }
    }

    /// The Kafka key: the source address, so one partition (one consumer) owns an address
    /// whichever sites report it: two sites that route to the same target make one rule there.
    pub fn key(&self) -> String {
        event_key(self.flowmon.source)
    }
}

/// The free-text fields [`Event::fit`] may shorten last (never the method, the source or the
/// priority).
const CUTTABLE_FIELDS: [(&str, TextField); 8] = [
    ("ports", |f| &mut f.ports),
    ("description", |f| &mut f.description),
    ("source_name", |f| &mut f.source_name),
    ("user_identity", |f| &mut f.user_identity),
    ("mitre", |f| &mut f.mitre),
    ("data_feed", |f| &mut f.data_feed),
    ("perspective", |f| &mut f.perspective),
    ("protocol", |f| &mut f.protocol),
];

/// One free-text field of an event, by reference.
type TextField = fn(&mut FlowmonEvent) -> &mut Option<String>;

/// Shortens `text` to at most `max` bytes, at a character boundary.
fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Now, to the millisecond (what the messages carry).
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// The canonical address.
pub fn event_key(source: IpAddr) -> String {
    source.to_string()
}

fn event_id(site: &str, collector: &str, raw: &[u8]) -> String {
    let mut hash = Sha256::new();
    for part in [site.as_bytes(), collector.as_bytes(), raw] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where in samgate an input was rejected.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum DeadLetterStage {
    /// The shim could not parse a Flowmon line.
    Shim,
    /// The pipeline could not decode a message from the events topic.
    Decode,
    /// The pipeline gave up on an action after its retries.
    Enforce,
}

impl DeadLetterStage {
    /// The stage as the dead letter's `stage` field and the metric label spell it.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// An input samgate could not use, with the reason; written to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Always [`DEAD_LETTER_SCHEMA`].
    pub schema: String,
    pub stage: DeadLetterStage,
    /// A short, stable error code (`field_count`, `invalid_source`, …).
    pub error: String,
    /// The full, human-readable reason.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub site: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub collector: Option<String>,
    #[serde(with = "rfc3339_millis")]
    pub at: DateTime<Utc>,
    /// 1-based line number within the ADS run (shim stage).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub line: Option<u64>,
    /// The input, decoded as UTF-8 lossily, cut at [`DEAD_LETTER_RAW_LIMIT`] bytes.
    pub raw: String,
    /// The input's full length in bytes.
    pub raw_len: usize,
    /// True when `raw` holds only the first part of the input.
    pub raw_truncated: bool,
}

impl DeadLetter {
    pub fn new(
        stage: DeadLetterStage,
        error: &str,
        reason: String,
        raw: &[u8],
        raw_len: usize,
    ) -> Self {
        let kept = &raw[..raw.len().min(DEAD_LETTER_RAW_LIMIT)];
        Self {
            schema: DEAD_LETTER_SCHEMA.to_owned(),
            stage,
            error: error.to_owned(),
            reason,
            site: None,
            collector: None,
            at: Utc::now(),
            line: None,
            raw: String::from_utf8_lossy(kept).into_owned(),
            raw_len,
            raw_truncated: raw_len > kept.len(),
        }
    }

    /// The same dead letter with `raw` cut to at most `limit` bytes (at a character boundary):
    /// what is written when the topic refused the whole one as too large.
    pub fn shortened(mut self, limit: usize) -> Self {
        if self.raw.len() > limit {
            let mut end = limit;
            while !self.raw.is_char_boundary(end) {
                end -= 1;
            }
            self.raw.truncate(end);
            self.raw_truncated = true;
        }
        self
    }
}

/// RFC 3339 with milliseconds and a `Z`, the one timestamp format of every samgate message.
pub mod rfc3339_millis {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;
    use crate::flowmon::LineReader;

    #[test]
    fn a_shortened_dead_letter_cuts_its_input_at_a_character() {
        let raw = "é".repeat(10); // two bytes each
        let dead = DeadLetter::new(
            DeadLetterStage::Decode,
            "invalid_event",
            "r".into(),
            raw.as_bytes(),
            raw.len(),
        );
        assert!(!dead.raw_truncated);
        let short = dead.clone().shortened(5);
        assert_eq!((short.raw.as_str(), short.raw_truncated), ("éé", true));
        assert_eq!(short.raw_len, 20, "the input's own length stays");
        assert_eq!(dead.clone().shortened(20), dead, "short enough already");
    }

    #[test]
    fn a_stage_is_spelt_the_same_in_dead_letters_and_metrics() {
        for stage in DeadLetterStage::iter() {
            assert_eq!(serde_json::to_value(stage).unwrap(), stage.as_str());
        }
    }

    fn line(text: &str) -> RawLine {
        LineReader::new(text.as_bytes(), 1 << 16)
            .next_line()
            .unwrap()
            .unwrap()
    }

    const LINE: &str = "1\t2026-11-20 10:13:02\t \tSCANS\tPort scanning\tSec\tHigh\t \t \t \t2001:db8:0:0::1\t \t \t \t ";

    #[test]
    fn key_is_site_and_canonical_ip_and_id_is_stable() {
        let raw = line(LINE);
        let parsed = raw.parse(1 << 16).unwrap().unwrap();
        let t = Utc::now();
        let a = Event::new("prague", "fm1", t, &raw, parsed.clone());
        let b = Event::new("prague", "fm1", t, &raw, parsed.clone());
        let c = Event::new("brno", "fm1", t, &raw, parsed);
        assert_eq!(a.key(), "2001:db8::1");
        assert_eq!(a.key(), c.key(), "one address, one key, whatever the site");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.id.len(), 32);
        assert_eq!(a.schema, EVENT_SCHEMA);
    }

    #[test]
    fn event_round_trips_through_json() {
        let raw = line(LINE);
        let parsed = raw.parse(1 << 16).unwrap().unwrap();
        let e = Event::new("prague", "fm1", Utc::now(), &raw, parsed);
        let json = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&json).unwrap();
        // Milliseconds are the message precision.
        assert_eq!(
            back.received_at.timestamp_millis(),
            e.received_at.timestamp_millis()
        );
        assert_eq!(back.flowmon, e.flowmon);
        assert_eq!(back.raw, LINE);
    }

    #[test]
    fn dead_letter_cuts_huge_input_and_says_so() {
        let raw = vec![b'x'; DEAD_LETTER_RAW_LIMIT + 10];
        let d = DeadLetter::new(
            DeadLetterStage::Shim,
            "line_too_long",
            "too long".into(),
            &raw,
            raw.len(),
        );
        assert_eq!(d.raw.len(), DEAD_LETTER_RAW_LIMIT);
        assert!(d.raw_truncated);
        assert_eq!(d.raw_len, DEAD_LETTER_RAW_LIMIT + 10);
    }

    #[test]
    fn a_huge_event_is_cut_to_fit_keeping_its_source() {
        let targets: Vec<String> = (0..5000)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let text = LINE.replacen(
            "\t \t \t \t ",
            &format!("\t \t{}\t \t ", targets.join(", ")),
            1,
        );
        let raw = LineReader::new(text.as_bytes(), 1 << 24)
            .next_line()
            .unwrap()
            .unwrap();
        let parsed = raw.parse(1 << 24).unwrap().unwrap();
        assert_eq!(parsed.targets.len(), 5000);
        let event = Event::new("prague", "fm1", Utc::now(), &raw, parsed);
        let (small, cut) = event.clone().fit(1 << 20).unwrap();
        assert!(!cut && small.cut.is_none(), "fits as it is");
        let (fitted, cut) = event.fit(16 * 1024).unwrap();
        assert!(cut);
        let size = serde_json::to_vec(&fitted).unwrap().len();
        assert!(size <= 16 * 1024, "{size}");
        let marker = fitted.cut.clone().unwrap();
        assert_eq!(marker.raw_len, text.len());
        assert_eq!(fitted.flowmon.targets.len() + marker.targets_omitted, 5000);
        assert!(fitted.flowmon.targets.len() > 100, "as many as fit");
        assert_eq!(fitted.flowmon.source.to_string(), "2001:db8::1");
        assert_eq!(fitted.key(), "2001:db8::1");
    }

    #[test]
    fn a_port_list_longer_than_a_message_is_cut_too() {
        let raw = LineReader::new(LINE.as_bytes(), 1 << 24)
            .next_line()
            .unwrap()
            .unwrap();
        let parsed = raw.parse(1 << 24).unwrap().unwrap();
        let mut event = Event::new("prague", "fm1", Utc::now(), &raw, parsed);
        let ports: Vec<String> = (1..=20_000).map(|p| p.to_string()).collect();
        event.flowmon.ports = Some(ports.join(","));
        let method = event.flowmon.method.clone();
        let (fitted, cut) = event.fit(16 * 1024).unwrap();
        assert!(cut);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= 16 * 1024);
        assert_eq!(fitted.cut.unwrap().fields, vec!["ports".to_string()]);
        assert_eq!(fitted.flowmon.ports.unwrap().len(), 1024);
        assert_eq!(fitted.flowmon.method, method, "never the method");
        assert_eq!(fitted.flowmon.source.to_string(), "2001:db8::1");
    }
}
