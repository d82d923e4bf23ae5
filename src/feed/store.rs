//! What the feeds list, folded from the state topic: pure, no I/O. [`FeedStore::fold`] takes
//! state messages in topic order; [`FeedStore::render`] turns the store into each feed's
//! bodies at a given time, leaving out what must never be listed.
//!
//! An address is listed in a feed while a *confirmed* block of that feed's target names it
//! (not a pending record: its block may not be in place; not an `expired` one), its time has
//! not run out, no exemption of its site covers it (an exemption stops automatic blocks: an
//! operator's block made since it began is listed), and no never-block rule protects it. Every
//! filter runs at render time, so a block expires from a feed on the second, and a
//! never-block network added to the configuration after the block keeps it out too.
//!
//! Memory: one fixed-size entry per block of a feed target (the 16-byte key, the address,
//! interned site and feed, the expiry, a manual block's start), about 70 bytes with the map's
//! overhead; blocks of pushed targets are not kept.

use std::collections::HashMap;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::checkpoint::sam::RuleKey;
use crate::pipeline::dedupe::{BlockRecord, ExemptionRecord, Origin};
use crate::pipeline::rebuild::StateMessage;

/// A block of a feed target.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ip: IpAddr,
    feed: u16,
    site: u16,
    expires_ms: i64,
    /// An operator's block: when it was made (unix ms); 0 for an automatic one.
    manual_ms: i64,
}

/// Everything the feeds are built from.
#[derive(Debug, Default)]
pub struct FeedStore {
    /// The feed targets' names; an entry's `feed` indexes it.
    feeds: Vec<String>,
    sites: Vec<String>,
    site_ids: HashMap<String, u16>,
    blocks: HashMap<RuleKey, Entry>,
    /// Exemptions by (site, address): since and until when (unix ms).
    exemptions: HashMap<(u16, IpAddr), (i64, i64)>,
    /// Per feed, the newest state record (its Kafka timestamp, unix ms) that touched it.
    touched_ms: Vec<i64>,
}

/// One feed, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub name: String,
    /// Addresses listed.
    pub entries: usize,
    /// One address per line, sorted (Check Point Network Feed "Flat List", FortiGate External
    /// Block List, Palo Alto EDL): shared by every response, never copied.
    pub text: Body,
    /// Check Point's IoC CSV (sk132193), built from `text` when first asked for.
    csv: std::sync::OnceLock<Body>,
    /// When the content was last known to change (unix ms): the newest record or expiry or
    /// exemption end behind it, never later than the build (a writer's clock may run ahead).
    /// The same log gives the same value in every process.
    pub last_modified_ms: i64,
}

impl Rendered {
    /// This rendering, with `older`'s CSV when both list the same addresses (built only once).
    pub fn reusing(self, older: &Rendered) -> Self {
        if let Some(csv) = older
            .csv
            .get()
            .filter(|_| self.text.etag == older.text.etag)
        {
            let _ = self.csv.set(csv.clone());
        }
        self
    }
}

/// A response body and its strong validator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    pub bytes: axum::body::Bytes,
    pub etag: String,
}

impl Body {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            etag: etag(&bytes),
            bytes: bytes.into(),
        }
    }
}

impl Rendered {
    /// The IoC CSV: IPv4 addresses only, as its `IP` type is.
    pub fn csv(&self) -> &Body {
        self.csv.get_or_init(|| Body::new(csv_of(&self.text.bytes)))
    }

    /// Whether the CSV is built already (asking for it costs nothing then).
    pub fn csv_built(&self) -> bool {
        self.csv.get().is_some()
    }
}

/// The feeds at one instant, and when they next change by time alone (an expiry, an
/// exemption's end), if ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendering {
    pub feeds: Vec<Rendered>,
    pub next_change_ms: Option<i64>,
}

/// Check Point IoC CSV's header (sk132193).
pub const CSV_HEADER: &str = "#UNIQ-NAME,VALUE,TYPE,CONFIDENCE,SEVERITY,PRODUCT,COMMENT\n";

impl FeedStore {
    /// A store for these feed targets.
    pub fn new(feeds: impl IntoIterator<Item = String>) -> Self {
        let feeds: Vec<String> = feeds.into_iter().collect();
        Self {
            touched_ms: vec![0; feeds.len()],
            feeds,
            ..Self::default()
        }
    }

    /// Blocks held (of feed targets, confirmed, not yet removed).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    fn feed_id(&self, target: &str) -> Option<u16> {
        self.feeds
            .iter()
            .position(|f| f == target)
            .map(|i| i as u16)
    }

    fn site_id(&mut self, site: &str) -> u16 {
        if let Some(&id) = self.site_ids.get(site) {
            return id;
        }
        let id = self.sites.len() as u16;
        self.sites.push(site.to_owned());
        self.site_ids.insert(site.to_owned(), id);
        id
    }

    fn touch(&mut self, feed: u16, at_ms: i64) {
        let t = &mut self.touched_ms[feed as usize];
        *t = (*t).max(at_ms);
    }

    /// Takes one state message written at `at_ms` (its Kafka timestamp). Returns whether a
    /// feed may have changed.
    pub fn fold(&mut self, message: StateMessage, at_ms: i64) -> bool {
        match message {
            StateMessage::Block(record) => self.block(&record, at_ms),
            StateMessage::Tombstone(key) => match self.blocks.remove(&key) {
                Some(entry) => {
                    self.touch(entry.feed, at_ms);
                    true
                }
                None => false,
            },
            StateMessage::Exemption(record) => self.exempt(&record, at_ms),
            StateMessage::ExemptionEnded(site, ip) => {
                let Some(&site) = self.site_ids.get(&site) else {
                    return false;
                };
                let ended = self.exemptions.remove(&(site, ip.to_canonical())).is_some();
                if ended {
                    self.touch_all(at_ms);
                }
                ended
            }
            StateMessage::Claim(_) | StateMessage::Other => false,
        }
    }

    fn touch_all(&mut self, at_ms: i64) {
        for feed in 0..self.feeds.len() {
            self.touch(feed as u16, at_ms);
        }
    }

    fn block(&mut self, record: &BlockRecord, at_ms: i64) -> bool {
        let Some(feed) = self.feed_id(&record.target) else {
            return false;
        };
        self.touch(feed, at_ms);
        if record.pending || record.expired {
            // Not (or no longer) a confirmed block: not listed.
            return self.blocks.remove(&record.key).is_some();
        }
        let site = self.site_id(&record.site);
        let entry = Entry {
            ip: record.ip.to_canonical(),
            feed,
            site,
            expires_ms: record.expires_at.timestamp_millis(),
            manual_ms: match record.origin {
                Origin::Manual => record.blocked_at.timestamp_millis().max(1),
                _ => 0,
            },
        };
        self.blocks.insert(record.key, entry);
        true
    }

    fn exempt(&mut self, record: &ExemptionRecord, at_ms: i64) -> bool {
        let site = self.site_id(&record.site);
        self.exemptions.insert(
            (site, record.ip.to_canonical()),
            (
                record.since.timestamp_millis(),
                record.until.timestamp_millis(),
            ),
        );
        self.touch_all(at_ms);
        true
    }

    /// Every feed at `now_ms`. `protected(site, ip)` says whether a never-block rule covers
    /// the address at the site (it is then never listed).
    pub fn render(&self, now_ms: i64, protected: impl Fn(&str, IpAddr) -> bool) -> Rendering {
        let mut listed: Vec<Vec<IpAddr>> = vec![Vec::new(); self.feeds.len()];
        let mut last_modified = self.touched_ms.clone();
        let mut next_change: Option<i64> = None;
        let mut later = |at: i64| next_change = Some(next_change.map_or(at, |n| n.min(at)));
        for entry in self.blocks.values() {
            let feed = entry.feed as usize;
            if entry.expires_ms <= now_ms {
                last_modified[feed] = last_modified[feed].max(entry.expires_ms);
                continue;
            }
            if let Some(&(since, until)) = self.exemptions.get(&(entry.site, entry.ip)) {
                let overruled = entry.manual_ms != 0 && entry.manual_ms >= since;
                if until <= now_ms {
                    last_modified[feed] = last_modified[feed].max(until);
                } else if !overruled {
                    later(until.min(entry.expires_ms));
                    continue;
                }
            }
            if protected(&self.sites[entry.site as usize], entry.ip) {
                continue;
            }
            later(entry.expires_ms);
            listed[feed].push(entry.ip);
        }
        for &at in &last_modified {
            if at > now_ms {
                // A writer's clock runs ahead: built again when the date comes, so every
                // server that read the same log then says the same.
                later(at);
            }
        }
        let feeds = (self.feeds.iter().zip(listed).zip(last_modified))
            .map(|((name, mut ips), last_modified_ms)| {
                ips.sort_unstable();
                ips.dedup();
                Rendered {
                    name: name.clone(),
                    entries: ips.len(),
                    text: Body::new(text_of(&ips)),
                    csv: std::sync::OnceLock::new(),
                    last_modified_ms: last_modified_ms.min(now_ms),
                }
            })
            .collect();
        Rendering {
            feeds,
            next_change_ms: next_change,
        }
    }
}

/// The flat list of sorted, distinct addresses.
fn text_of(ips: &[IpAddr]) -> Vec<u8> {
    use std::io::Write;
    let mut text = Vec::with_capacity(ips.len() * 14);
    for ip in ips {
        writeln!(text, "{ip}").expect("writing to memory");
    }
    text
}

/// The IoC CSV of a flat list: its IPv4 lines, each a row.
fn csv_of(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let lines = text.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let mut csv = Vec::with_capacity(CSV_HEADER.len() + text.len() * 4);
    csv.extend_from_slice(CSV_HEADER.as_bytes());
    for line in lines.filter(|l| !l.contains(&b':')) {
        let ip = String::from_utf8_lossy(line);
        writeln!(
            csv,
            "samgate-{ip},{ip},IP,high,high,samgate,blocked by samgate"
        )
        .expect("writing to memory");
    }
    csv
}

/// A strong validator: the first 128 bits of the body's SHA-256, quoted.
fn etag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::dedupe::STATE_SCHEMA;
    use chrono::{DateTime, TimeZone, Utc};

    const NOW: i64 = 1_800_000_000_000;

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).unwrap()
    }

    fn key(n: u8) -> RuleKey {
        RuleKey::parse(&format!("{n:02x}{}", "0".repeat(30))).unwrap()
    }

    fn record(n: u8, target: &str, site: &str, ip: &str, expires_ms: i64) -> BlockRecord {
        BlockRecord {
            schema: STATE_SCHEMA.into(),
            key: key(n),
            site: site.into(),
            ip: ip.parse().unwrap(),
            target: target.into(),
            level: 0,
            blocked_at: at(NOW - 60_000),
            expires_at: at(expires_ms),
            event_id: "e".into(),
            pending: false,
            writer: None,
            origin: Origin::Automatic,
            actor: None,
            expired: false,
        }
    }

    fn exemption(site: &str, ip: &str, until_ms: i64) -> ExemptionRecord {
        ExemptionRecord {
            schema: crate::pipeline::dedupe::EXEMPTION_SCHEMA.into(),
            site: site.into(),
            ip: ip.parse().unwrap(),
            since: at(NOW - 1000),
            until: at(until_ms),
            reason: None,
            actor: None,
            command_id: "c".into(),
            writer: None,
        }
    }

    fn text(r: &Rendering, feed: &str) -> String {
        let f = r.feeds.iter().find(|f| f.name == feed).unwrap();
        String::from_utf8(f.text.bytes.to_vec()).unwrap()
    }

    fn unprotected(_: &str, _: IpAddr) -> bool {
        false
    }

    #[test]
    fn what_each_record_does_to_the_feed() {
        let hour = 3_600_000;
        // (records folded in order, the feed "edge" at NOW)
        let cases: Vec<(Vec<StateMessage>, &str)> = vec![
            // A confirmed block is listed; sorted, one line per address, repeats once.
            (
                vec![
                    StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(record(2, "edge", "brno", "198.51.100.7", NOW + hour)),
                    StateMessage::Block(record(3, "edge", "brno", "203.0.113.9", NOW + hour)),
                ],
                "198.51.100.7\n203.0.113.9\n",
            ),
            // Another target's block, and a pending one: not listed.
            (
                vec![
                    StateMessage::Block(record(1, "fw", "prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(BlockRecord {
                        pending: true,
                        ..record(2, "edge", "prague", "203.0.113.10", NOW + hour)
                    }),
                ],
                "",
            ),
            // Confirmed, then pending again (a re-block on its way): out until confirmed.
            (
                vec![
                    StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(BlockRecord {
                        pending: true,
                        ..record(1, "edge", "prague", "203.0.113.9", NOW + hour)
                    }),
                ],
                "",
            ),
            // Unblocked (the tombstone), expired by time, and marked expired: gone.
            (
                vec![
                    StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Tombstone(key(1)),
                    StateMessage::Block(record(2, "edge", "prague", "203.0.113.10", NOW - 1)),
                    StateMessage::Block(BlockRecord {
                        expired: true,
                        ..record(3, "edge", "prague", "203.0.113.11", NOW + hour)
                    }),
                ],
                "",
            ),
            // Exempted at its site: not listed; the same address blocked for another site is.
            (
                vec![
                    StateMessage::Exemption(exemption("prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(record(2, "edge", "prague", "203.0.113.10", NOW + hour)),
                ],
                "203.0.113.10\n",
            ),
            (
                vec![
                    StateMessage::Exemption(exemption("prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(record(1, "edge", "brno", "203.0.113.9", NOW + hour)),
                ],
                "203.0.113.9\n",
            ),
            // An exemption stops automatic blocks: an operator's block made since it began is
            // listed, one made before it is not.
            (
                vec![
                    StateMessage::Exemption(exemption("prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(BlockRecord {
                        origin: Origin::Manual,
                        blocked_at: at(NOW - 500),
                        ..record(1, "edge", "prague", "203.0.113.9", NOW + hour)
                    }),
                    StateMessage::Block(BlockRecord {
                        origin: Origin::Manual,
                        ..record(2, "edge", "prague", "203.0.113.10", NOW + hour)
                    }),
                    StateMessage::Exemption(exemption("prague", "203.0.113.10", NOW + hour)),
                ],
                "203.0.113.9\n",
            ),
            // An exemption that ended, or ran out: listed again.
            (
                vec![
                    StateMessage::Exemption(exemption("prague", "203.0.113.9", NOW + hour)),
                    StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + hour)),
                    StateMessage::ExemptionEnded("prague".into(), "203.0.113.9".parse().unwrap()),
                ],
                "203.0.113.9\n",
            ),
            (
                vec![
                    StateMessage::Exemption(exemption("prague", "203.0.113.9", NOW - 1)),
                    StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + hour)),
                ],
                "203.0.113.9\n",
            ),
            // IPv6, and an IPv4-mapped address made canonical.
            (
                vec![
                    StateMessage::Block(record(1, "edge", "prague", "2001:db8::7", NOW + hour)),
                    StateMessage::Block(record(
                        2,
                        "edge",
                        "prague",
                        "::ffff:192.0.2.1",
                        NOW + hour,
                    )),
                ],
                "192.0.2.1\n2001:db8::7\n",
            ),
        ];
        for (i, (messages, want)) in cases.into_iter().enumerate() {
            let mut store = FeedStore::new(["edge".to_owned()]);
            for (n, m) in messages.into_iter().enumerate() {
                store.fold(m, NOW - 10_000 + n as i64);
            }
            let r = store.render(NOW, unprotected);
            assert_eq!(text(&r, "edge"), want, "case {i}");
        }
    }

    #[test]
    fn protected_addresses_are_never_listed() {
        let mut store = FeedStore::new(["edge".to_owned()]);
        store.fold(
            StateMessage::Block(record(1, "edge", "prague", "10.99.0.5", NOW + 60_000)),
            NOW,
        );
        store.fold(
            StateMessage::Block(record(2, "edge", "prague", "203.0.113.9", NOW + 60_000)),
            NOW,
        );
        let never =
            |site: &str, ip: IpAddr| site == "prague" && ip.to_string().starts_with("10.99.");
        assert_eq!(text(&store.render(NOW, never), "edge"), "203.0.113.9\n");
    }

    #[test]
    fn the_next_change_by_time_and_last_modified_follow_expiries_and_exemptions() {
        let mut store = FeedStore::new(["edge".to_owned()]);
        store.fold(
            StateMessage::Block(record(1, "edge", "prague", "203.0.113.9", NOW + 5_000)),
            NOW - 100,
        );
        store.fold(
            StateMessage::Block(record(2, "edge", "prague", "203.0.113.10", NOW + 9_000)),
            NOW - 50,
        );
        store.fold(
            StateMessage::Exemption(exemption("prague", "203.0.113.10", NOW + 2_000)),
            NOW - 10,
        );
        let r = store.render(NOW, unprotected);
        assert_eq!(text(&r, "edge"), "203.0.113.9\n");
        assert_eq!(
            r.next_change_ms,
            Some(NOW + 2_000),
            "the exemption ends first"
        );
        assert_eq!(r.feeds[0].last_modified_ms, NOW - 10);
        let r = store.render(NOW + 2_000, unprotected);
        assert_eq!(
            text(&r, "edge"),
            "203.0.113.9\n203.0.113.10\n",
            "numeric order"
        );
        assert_eq!(r.next_change_ms, Some(NOW + 5_000));
        assert_eq!(r.feeds[0].last_modified_ms, NOW + 2_000);
        let r = store.render(NOW + 5_000, unprotected);
        assert_eq!(text(&r, "edge"), "203.0.113.10\n");
        assert_eq!(r.feeds[0].last_modified_ms, NOW + 5_000);
        let r = store.render(NOW + 9_000, unprotected);
        assert_eq!(text(&r, "edge"), "");
        assert_eq!(r.next_change_ms, None);
        // A record stamped by a clock that runs ahead: the date is never later than the build.
        store.fold(
            StateMessage::Block(record(3, "edge", "prague", "203.0.113.11", NOW + 90_000)),
            NOW + 60_000,
        );
        let r = store.render(NOW + 10_000, unprotected);
        assert_eq!(text(&r, "edge"), "203.0.113.11\n");
        assert_eq!(r.feeds[0].last_modified_ms, NOW + 10_000);
        assert_eq!(
            r.next_change_ms,
            Some(NOW + 60_000),
            "built again at the record's date"
        );
        let r = store.render(NOW + 60_000, unprotected);
        assert_eq!(r.feeds[0].last_modified_ms, NOW + 60_000);
    }

    #[test]
    fn the_same_records_give_the_same_bodies_and_validators() {
        let records = [
            record(1, "edge", "prague", "203.0.113.9", NOW + 60_000),
            record(2, "edge", "brno", "2001:db8::1", NOW + 60_000),
            record(3, "edge", "brno", "198.51.100.1", NOW + 60_000),
        ];
        let mut a = FeedStore::new(["edge".to_owned()]);
        let mut b = FeedStore::new(["edge".to_owned()]);
        for (i, r) in records.iter().enumerate() {
            a.fold(StateMessage::Block(r.clone()), NOW + i as i64);
        }
        // Another order of the same keys' final records (another partition interleaving).
        for (i, r) in records.iter().enumerate().rev() {
            b.fold(StateMessage::Block(r.clone()), NOW + i as i64);
        }
        let (ra, rb) = (a.render(NOW, unprotected), b.render(NOW, unprotected));
        assert_eq!(ra, rb);
        let csv = String::from_utf8(ra.feeds[0].csv().bytes.to_vec()).unwrap();
        assert_eq!(
            csv,
            format!("{CSV_HEADER}samgate-198.51.100.1,198.51.100.1,IP,high,high,samgate,blocked by samgate\nsamgate-203.0.113.9,203.0.113.9,IP,high,high,samgate,blocked by samgate\n"),
            "IPv4 only"
        );
        assert_eq!(ra.feeds[0].entries, 3);
        assert_ne!(ra.feeds[0].text.etag, ra.feeds[0].csv().etag);
        assert!(ra.feeds[0].text.etag.starts_with('"') && ra.feeds[0].text.etag.len() == 34);
    }
}
