//! `samgate feed`: block-list feeds that gateways fetch themselves. Each target of
//! `kind = "feed"` is served at `GET /feeds/<name>` (one address per line: a Check Point
//! Network Feed "Flat List", a FortiGate External Block List, a Palo Alto EDL) and
//! `GET /feeds/<name>.csv` (Check Point's IoC CSV, IPv4 only).
//!
//! A process of its own, not a listener inside `samgate run`: a feed is built from the *whole*
//! state topic (every partition), while a `run` replica owns only some partitions; so any
//! number of `samgate feed` processes (a Deployment of their own, scaled for the gateways that
//! poll, restarted without touching enforcement) read the same log and serve the same bytes.
//!
//! - **Reading** (one thread): every partition of the state topic from its start, folded into
//!   the [`store::FeedStore`]. The feeds answer 503 until every partition was read to its end
//!   once: a partial feed would take blocks off the gateways.
//! - **Building**: a change is built after `feed.rebuild_delay` (200 ms), and a feed whose
//!   entries expire, or whose exemption ends, is rebuilt at that instant. Never-block networks
//!   and not-blockable addresses are left out at every build (`Policy`, as `run` checks them).
//! - **Serving** (axum, plain HTTP or TLS from `feed.tls`): strong `ETag`s (the body's
//!   SHA-256) with `If-None-Match`, so a gateway polling an unchanged feed gets a 304 and no
//!   body (`Last-Modified` is sent, but a date alone never earns a 304: see [`not_modified`]);
//!   per feed, optional basic authentication and/or a bearer token; metrics per feed, and per
//!   configured poller the time of its last fetch (`samgate_feed_last_poll_timestamp_seconds`),
//!   which an alert watches; `GET /feeds/<name>/clients` lists every client address's last fetch.

pub mod enforcer;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use chrono::{TimeZone, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, TargetKind};
use crate::http::Readiness;
use crate::metrics::Metrics;
use crate::pipeline::policy::Policy;
use crate::secret::Secret;
use store::{FeedStore, Rendered};

/// Client addresses remembered per feed for `/feeds/<name>/clients` (the oldest go first).
const CLIENTS_KEPT: usize = 10_000;

/// TLS handshakes in progress at once (each bounded by a 10 s timeout).
const MAX_HANDSHAKES: usize = 256;

/// Who may fetch a feed, and who is expected to.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub basic: Option<(String, Secret)>,
    pub token: Option<Secret>,
    /// Configured pollers by the address they fetch from.
    pub pollers: BTreeMap<IpAddr, String>,
}

impl Access {
    fn open(&self) -> bool {
        self.basic.is_none() && self.token.is_none()
    }
}

/// What the handlers share.
struct Feeds {
    access: BTreeMap<String, Access>,
    published: RwLock<BTreeMap<String, Arc<Rendered>>>,
    /// Per feed, each client address's last fetch (unix seconds).
    clients: Mutex<BTreeMap<String, HashMap<IpAddr, i64>>>,
    metrics: Arc<Metrics>,
    ready: Readiness,
    trust_forwarded_for: bool,
}

/// The feed targets of `config`, with their access settings.
pub fn access(config: &Config) -> BTreeMap<String, Access> {
    (config.targets.iter())
        .filter(|(_, t)| t.kind == TargetKind::Feed)
        .map(|(name, t)| {
            let basic = t.username.clone().zip(t.password.clone());
            let pollers = t
                .pollers
                .iter()
                .map(|(n, ip)| (ip.to_canonical(), n.clone()));
            let access = Access {
                basic,
                token: t.token.clone(),
                pollers: pollers.collect(),
            };
            (name.clone(), access)
        })
        .collect()
}

/// Runs until `cancel`. `on_listen` gets the bound address (`feed.listen` port 0 picks one).
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    on_listen: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let access = access(&config);
    anyhow::ensure!(
        !access.is_empty(),
        "no target has kind = \"feed\": there is nothing to serve"
    );
    let metrics = Arc::new(Metrics::new());
    for (name, a) in &access {
        for poller in a.pollers.values().map(String::as_str).chain(["other"]) {
            metrics.feed_last_poll.with_label_values(&[name, poller]);
        }
        for status in ["200", "304", "401", "503"] {
            metrics.feed_requests.with_label_values(&[name, status]);
        }
    }
    let servers = crate::pipeline::server_addresses(&config).await?;
    let policy = Policy::new(&config, &servers);
    let feeds = Arc::new(Feeds {
        published: RwLock::default(),
        clients: Mutex::default(),
        metrics: metrics.clone(),
        ready: Readiness::default(),
        trust_forwarded_for: config.feed.trust_forwarded_for,
        access,
    });
    let tls = match &config.feed.tls {
        Some(tls) => Some(tls_config(tls)?),
        None => None,
    };
    let router = router(feeds.clone());
    let listener = tokio::net::TcpListener::bind(config.feed.listen)
        .await
        .with_context(|| format!("feed.listen: cannot listen on {}", config.feed.listen))?;
    let addr = listener.local_addr()?;
    on_listen(addr);
    info!(%addr, tls = tls.is_some(), feeds = ?feeds.access.keys().collect::<Vec<_>>(), "serving feeds");
    let reader = {
        let (feeds, cancel) = (feeds.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("samgate-feed-reader".into())
            .spawn(move || {
                // However the reader ends (an error, a panic), the server stops with it: a feed
                // nobody updates any more must not go on being served.
                let _stop = cancel.clone().drop_guard();
                let read = follow(&config, &policy, &feeds, &cancel);
                if let Err(e) = &read {
                    tracing::error!(error = format!("{e:#}"), "the state reader stopped");
                }
                read
            })?
    };
    match tls {
        None => serve_connections(listener, router, cancel.clone()).await,
        Some(tls) => {
            let listener = TlsListener::start(listener, tls, cancel.clone());
            serve_connections(listener, router, cancel.clone()).await
        }
    }
    cancel.cancel();
    let joined = tokio::task::spawn_blocking(move || reader.join()).await;
    match joined {
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(_)) => anyhow::bail!("the state reader panicked"),
        _ => {}
    }
    Ok(())
}

/// Connections served at once; the rest wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request's head (the first, or the next on a kept-alive
/// connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection lives: a client that stops reading a response holds neither its
/// slot nor the bytes of a feed since replaced for longer. (A gateway's fetch takes seconds.)
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves `router` on what `listener` accepts, until `cancel`, with the limits a server open
/// to any client needs and `axum::serve` does not set: [`MAX_CONNECTIONS`], [`HEADER_TIMEOUT`]
/// (slow-loris), [`CONNECTION_LIFETIME`]. On `cancel`, connections finish the request they
/// serve (for up to 5 s).
async fn serve_connections<L>(mut listener: L, router: Router, cancel: CancellationToken)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = cancel.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (io, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        // What the handlers read as the client's address (`ConnectInfo<ClientAddr>`).
        let app = router
            .clone()
            .layer(axum::Extension(ConnectInfo(ClientAddr(peer))));
        let cancel = cancel.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    tracing::debug!(%peer, "feed connection closed at its lifetime's end");
                }
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Reads the state topic and rebuilds the feeds, until `cancel`.
fn follow(
    config: &Config,
    policy: &Policy,
    feeds: &Feeds,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let topic = &config.kafka.topics.state;
    let consumer: BaseConsumer<ReaderContext> = crate::kafka::base_config(&config.kafka)
        .set("group.id", format!("{}-feed", config.run.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100")
        // librdkafka's 64 MiB of prefetch would be more than a million-entry feed itself.
        .set("queued.max.messages.kbytes", "16384")
        .create_with_context(ReaderContext)
        .context("cannot create the state reader")?;
    // The state topic is `samgate run`'s to create (its partitions follow the events topic's).
    let partitions = loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(m) => match m.topics().first().map(|t| t.partitions().len()) {
                Some(n) if n > 0 => break n as i32,
                _ => warn!(
                    topic,
                    "the state topic does not exist yet; waiting for samgate run to create it"
                ),
            },
            Err(e) => warn!(topic, error = %e, "cannot read the state topic's metadata yet"),
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let mut assignment = TopicPartitionList::new();
    let mut at_end = vec![false; partitions as usize];
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        // An empty partition is read already (a broker may never report its end); one whose
        // offsets cannot be had yet waits for its end as any other.
        match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
            Ok((low, high)) => at_end[p as usize] = high <= low,
            Err(e) => {
                warn!(topic, partition = p, error = %e, "cannot read the partition's offsets yet")
            }
        }
    }
    consumer.assign(&assignment)?;
    let names: Vec<String> = feeds.access.keys().cloned().collect();
    let mut store = FeedStore::new(names);
    let mut lag_check = Instant::now(); // the first once loaded
    let records = feeds.metrics.feed_state_records.with_label_values(&[topic]);
    let delay = config.feed.rebuild_delay;
    let (mut dirty_since, mut next_change): (Option<Instant>, Option<i64>) = (None, None);
    let started = Instant::now();
    while !cancel.is_cancelled() {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                records.inc();
                let at = m.timestamp().to_millis().unwrap_or_else(now_ms);
                if store.fold(crate::pipeline::rebuild::decode(&m), at) {
                    dirty_since.get_or_insert_with(Instant::now);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(end) = at_end.get_mut(p as usize) {
                    *end = true;
                }
            }
            Some(Err(e)) => warn!(error = %e, "state reader error"),
            None => {}
        }
        let loaded = at_end.iter().all(|e| *e);
        if !loaded {
            continue;
        }
        if Instant::now() >= lag_check {
            lag_check = Instant::now() + LAG_CHECK_EVERY;
            check_lag(&consumer, topic, partitions, &feeds.metrics);
        }
        let now = now_ms();
        let first = !feeds.ready.get();
        let changed = dirty_since.is_some_and(|d| d.elapsed() >= delay);
        if first || changed || next_change.is_some_and(|n| n <= now) {
            let built = Instant::now();
            let rendering = store.render(now, |site, ip| policy.protects(site, ip));
            next_change = rendering.next_change_ms;
            dirty_since = None;
            publish(feeds, rendering.feeds);
            if first {
                feeds.ready.set(true);
                info!(
                    blocks = store.len(),
                    loaded_in_ms = started.elapsed().as_millis() as u64,
                    built_in_ms = built.elapsed().as_millis() as u64,
                    "feeds ready"
                );
            }
        }
    }
    feeds.ready.set(false);
    Ok(())
}

/// How often the state reader measures how far behind the state topic it is.
const LAG_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Measures how far behind the state topic's end the reader is, into
/// `samgate_feed_state_lag_records` and, when Kafka answered for every partition,
/// `samgate_feed_state_checked_timestamp_seconds`: a feed server that lost Kafka keeps serving
/// what it read last (gateways keep polling it), and the alert `SamgateFeedStale` says so.
fn check_lag(
    consumer: &BaseConsumer<ReaderContext>,
    topic: &str,
    partitions: i32,
    metrics: &Metrics,
) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    let mut lag = 0i64;
    for p in 0..partitions {
        let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) else {
            return;
        };
        let at = positions
            .find_partition(topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(at) => Some(at),
                _ => None, // nothing read yet: from the start
            })
            .unwrap_or(low);
        lag += (high - at.max(low)).max(0);
    }
    metrics.feed_state_lag.with_label_values(&[topic]).set(lag);
    metrics
        .feed_state_checked
        .with_label_values(&[topic])
        .set(now_ms() / 1000);
}

/// The state reader's client: reaching a partition's end is how it knows it is loaded, not an
/// error (librdkafka also reports it to the client's error callback).
struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::PartitionEOF(_)
            | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) => {
                tracing::trace!(reason, "state partition read to its end")
            }
            e => warn!(error = %e, reason, "state reader: Kafka client error"),
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// Swaps in the feeds that changed, and shows them in the metrics.
fn publish(feeds: &Feeds, rendered: Vec<Rendered>) {
    let m = &feeds.metrics;
    let mut published = feeds.published.write().expect("published");
    for feed in rendered {
        let name = feed.name.clone();
        m.feed_entries
            .with_label_values(&[&name])
            .set(feed.entries as i64);
        m.feed_bytes
            .with_label_values(&[&name, "text"])
            .set(feed.text.bytes.len() as i64);
        // A new date alone replaces the feed too (its CSV kept): every server that read the
        // same log then answers with the same date, whenever it started.
        let feed = match published.get(&name) {
            None => feed,
            Some(old)
                if old.text.etag == feed.text.etag
                    && old.last_modified_ms == feed.last_modified_ms =>
            {
                continue
            }
            Some(old) => feed.reusing(old),
        };
        m.feed_last_change
            .with_label_values(&[&name])
            .set(feed.last_modified_ms / 1000);
        published.insert(name, Arc::new(feed));
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn router(feeds: Arc<Feeds>) -> Router {
    let health = crate::http::router(feeds.metrics.clone(), feeds.ready.clone());
    Router::new()
        .route("/feeds/{file}", get(serve_feed))
        .route("/feeds/{name}/clients", get(serve_clients))
        .with_state(feeds)
        .merge(health)
}

/// The format a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Csv,
}

/// A feed path's name and format (`edge`, `edge.txt`, `edge.csv`).
fn parse_file(file: &str) -> (&str, Format) {
    if let Some(name) = file.strip_suffix(".csv") {
        return (name, Format::Csv);
    }
    (file.strip_suffix(".txt").unwrap_or(file), Format::Text)
}

async fn serve_feed(
    State(feeds): State<Arc<Feeds>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    Path(file): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let (name, format) = parse_file(&file);
    let Some(access) = feeds.access.get(name) else {
        return (StatusCode::NOT_FOUND, "no such feed\n").into_response();
    };
    let count = |status: &str| {
        feeds
            .metrics
            .feed_requests
            .with_label_values(&[name, status])
            .inc()
    };
    if !authorized(access, &headers) {
        count("401");
        let mut response = (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
        let challenge = format!("Basic realm=\"samgate feed {name}\"");
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        return response;
    }
    let feed = feeds
        .published
        .read()
        .expect("published")
        .get(name)
        .cloned();
    let Some(feed) = feed.filter(|_| feeds.ready.get()) else {
        count("503");
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            "the feed is still loading\n",
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    // A fetch is a GET answered with the feed (200 or 304): not a HEAD probe, not a 503.
    if method == Method::GET {
        let client = client_address(peer, &headers, feeds.trust_forwarded_for);
        feeds.polled(name, access, client);
    }
    let (body, content_type) = match format {
        Format::Text => (&feed.text, "text/plain; charset=utf-8"),
        Format::Csv => {
            // Built on first request, once per content: tens of megabytes at a million
            // entries, so off the async workers (which serve the 304s and the probes).
            if !feed.csv_built() {
                let building = feed.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    building.csv();
                })
                .await;
            }
            let csv = feed.csv();
            let bytes = csv.bytes.len() as i64;
            feeds
                .metrics
                .feed_bytes
                .with_label_values(&[name, "csv"])
                .set(bytes);
            (csv, "text/csv; charset=utf-8")
        }
    };
    let etag = &body.etag;
    let last_modified = http_date(feed.last_modified_ms);
    let validators = [
        (header::ETAG, HeaderValue::from_str(etag)),
        (header::LAST_MODIFIED, HeaderValue::from_str(&last_modified)),
        (
            header::CACHE_CONTROL,
            Ok(HeaderValue::from_static("no-cache")),
        ),
    ];
    let mut response = match not_modified(&headers, etag) {
        true => {
            count("304");
            StatusCode::NOT_MODIFIED.into_response()
        }
        false => {
            count("200");
            let mut r = body.bytes.clone().into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            r
        }
    };
    for (name, value) in validators {
        if let Ok(value) = value {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

async fn serve_clients(
    State(feeds): State<Arc<Feeds>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(access) = feeds.access.get(&name) else {
        return (StatusCode::NOT_FOUND, "no such feed\n").into_response();
    };
    if !authorized(access, &headers) {
        return (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
    }
    let clients = feeds.clients.lock().expect("clients");
    let mut rows: Vec<serde_json::Value> = clients
        .get(&name)
        .into_iter()
        .flatten()
        .map(|(ip, at)| {
            let poller = access.pollers.get(ip).map(String::as_str);
            serde_json::json!({
                "address": ip,
                "poller": poller,
                "last_fetch": Utc.timestamp_opt(*at, 0).single().map(|t| t.to_rfc3339()),
            })
        })
        .collect();
    rows.sort_by(|a, b| b["last_fetch"].as_str().cmp(&a["last_fetch"].as_str()));
    axum::Json(serde_json::json!({ "feed": name, "clients": rows })).into_response()
}

impl Feeds {
    /// An authorised fetch of `feed` by `client`: its last-poll time, for the metric (a
    /// configured poller, or `other`) and for `/clients`.
    fn polled(&self, feed: &str, access: &Access, client: IpAddr) {
        let now = Utc::now().timestamp();
        let poller = access.pollers.get(&client).map_or("other", String::as_str);
        self.metrics
            .feed_last_poll
            .with_label_values(&[feed, poller])
            .set(now);
        let mut clients = self.clients.lock().expect("clients");
        let seen = clients.entry(feed.to_owned()).or_default();
        if seen.len() >= CLIENTS_KEPT && !seen.contains_key(&client) {
            if let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip) {
                seen.remove(&oldest);
            }
        }
        seen.insert(client, now);
    }
}

/// The client's address: the peer's, or with `feed.trust_forwarded_for` the last address of
/// `X-Forwarded-For`, the one the proxy in front of the feeds appended (the ones before it are
/// the client's own say, and anyone could claim to be a gateway there).
fn client_address(peer: SocketAddr, headers: &HeaderMap, trust_forwarded_for: bool) -> IpAddr {
    // The last line too: a proxy may add a line of its own rather than append to the client's.
    let forwarded = trust_forwarded_for
        .then(|| headers.get_all("x-forwarded-for").iter().next_back())
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    forwarded.unwrap_or(peer.ip()).to_canonical()
}

/// Whether the request carries the feed's basic credentials or its token (or the feed is open).
fn authorized(access: &Access, headers: &HeaderMap) -> bool {
    if access.open() {
        return true;
    }
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, value) = given.split_once(' ').unwrap_or((given, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => {
            let Some((user, password)) = &access.basic else {
                return false;
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value.trim()) else {
                return false;
            };
            let expected = format!("{user}:{}", password.expose());
            same(&decoded, expected.as_bytes())
        }
        "bearer" => access
            .token
            .as_ref()
            .is_some_and(|t| same(value.trim().as_bytes(), t.expose().as_bytes())),
        _ => false,
    }
}

/// Compares secrets without a time that depends on where they differ: their digests, byte by
/// byte, all of them.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether a conditional GET may be answered 304 (RFC 9110 §13.1): only a matching
/// `If-None-Match` (weak comparison; `*` matches). `If-Modified-Since` is not honoured, as
/// RFC 9110 allows: `Last-Modified` comes from the log's record times, and a change can arrive
/// in the same second or carry an older time (a record read late), so a date could call a
/// changed feed unchanged and keep an unblocked address on the gateways.
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    // A list may come in one header line or several (RFC 9110 §5.3).
    (headers.get_all(header::IF_NONE_MATCH).iter())
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        .any(|t| t.trim() == "*" || bare(t) == bare(etag))
}

/// An HTTP date (IMF-fixdate).
fn http_date(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// The remote address of a connection, plain or TLS.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The server certificate and key of `feed.tls`.
fn tls_config(tls: &crate::config::FeedTlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect())
        .with_context(|| {
            format!(
                "feed.tls.cert_file: cannot read {}",
                tls.cert_file.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "feed.tls.cert_file: {} holds no certificate",
        tls.cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).with_context(|| {
        format!(
            "feed.tls.key_file: cannot read a private key from {}",
            tls.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("feed.tls: the certificate and key do not make a TLS server")?;
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands on those whose TLS handshake completed (each handshake
/// in a task of its own, bounded in time, so a slow client holds up no one; at most
/// [`MAX_HANDSHAKES`] at once).
pub struct TlsListener {
    handshaken: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(
        listener: tokio::net::TcpListener,
        config: Arc<rustls::ServerConfig>,
        cancel: CancellationToken,
    ) -> Self {
        let local = listener.local_addr().expect("bound");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        // Handshakes cost CPU: a flood of slow or bogus clients waits in the kernel's backlog.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "feed listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                    let handshake = handshake.await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "feed listener: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "feed listener: TLS handshake timed out"),
                    }
                });
            }
        });
        Self {
            handshaken: rx,
            local,
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn client_addresses() {
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let xff = |v: &str| headers(&[("x-forwarded-for", v)]);
        let cases = [
            (xff("198.51.100.7"), false, "192.0.2.1"),
            (xff("198.51.100.7"), true, "198.51.100.7"),
            // The proxy appends the address it saw; what comes before is the client's claim.
            (xff("203.0.113.9, 198.51.100.7"), true, "198.51.100.7"),
            (xff("not an address"), true, "192.0.2.1"),
            (xff("::ffff:198.51.100.7"), true, "198.51.100.7"),
            (headers(&[]), true, "192.0.2.1"),
            // A proxy that adds a line of its own: the client's line comes first.
            (
                headers(&[
                    ("x-forwarded-for", "192.0.2.10"),
                    ("x-forwarded-for", "198.51.100.7"),
                ]),
                true,
                "198.51.100.7",
            ),
        ];
        for (h, trust, want) in cases {
            assert_eq!(
                client_address(peer, &h, trust),
                want.parse::<IpAddr>().unwrap(),
                "{h:?} {trust}"
            );
        }
    }

    #[test]
    fn conditional_gets() {
        let etag = "\"abc\"";
        let modified = 1_800_000_000_000; // Fri, 15 Jan 2027 08:00:00 GMT
        let date = http_date(modified);
        let later = http_date(modified + 60_000);
        let cases = [
            (vec![], false),
            (vec![("if-none-match", "\"abc\"")], true),
            (vec![("if-none-match", "W/\"abc\"")], true),
            (vec![("if-none-match", "\"x\", \"abc\"")], true),
            (vec![("if-none-match", "*")], true),
            (vec![("if-none-match", "\"x\"")], false),
            // A list over several header lines.
            (
                vec![("if-none-match", "\"x\""), ("if-none-match", "\"abc\"")],
                true,
            ),
            // If-None-Match decides when present, whatever the date says.
            (
                vec![
                    ("if-none-match", "\"x\""),
                    ("if-modified-since", date.as_str()),
                ],
                false,
            ),
            // A date alone never: a change may carry an older record time.
            (vec![("if-modified-since", date.as_str())], false),
            (vec![("if-modified-since", later.as_str())], false),
            (vec![("if-modified-since", "yesterday")], false),
        ];
        for (i, (h, want)) in cases.into_iter().enumerate() {
            assert_eq!(not_modified(&headers(&h), etag), want, "case {i}: {h:?}");
        }
        assert_eq!(date, "Fri, 15 Jan 2027 08:00:00 GMT");
    }

    #[test]
    fn who_may_fetch() {
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let locked = Access {
            basic: Some(("gw".into(), Secret::new("s3cret"))),
            token: Some(Secret::new("t0ken")),
            pollers: BTreeMap::new(),
        };
        let cases = [
            (vec![], false),
            (vec![("authorization", basic("gw", "s3cret"))], true),
            (vec![("authorization", basic("gw", "wrong"))], false),
            (vec![("authorization", basic("other", "s3cret"))], false),
            (vec![("authorization", "Bearer t0ken".to_owned())], true),
            (vec![("authorization", "bearer t0ken".to_owned())], true),
            (vec![("authorization", "Bearer t0ke".to_owned())], false),
            (vec![("authorization", "Basic !!!".to_owned())], false),
            (vec![("authorization", "Digest x".to_owned())], false),
        ];
        for (i, (h, want)) in cases.into_iter().enumerate() {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(authorized(&locked, &headers(&h)), want, "case {i}: {h:?}");
        }
        assert!(
            authorized(&Access::default(), &headers(&[])),
            "an open feed"
        );
        let token_only = Access {
            token: Some(Secret::new("t0ken")),
            ..Access::default()
        };
        assert!(!authorized(
            &token_only,
            &headers(&[("authorization", &basic("gw", "t0ken"))])
        ));
    }

    #[test]
    fn paths_and_mapped_peers() {
        assert_eq!(parse_file("edge"), ("edge", Format::Text));
        assert_eq!(parse_file("edge.txt"), ("edge", Format::Text));
        assert_eq!(parse_file("edge.csv"), ("edge", Format::Csv));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:1".parse().unwrap();
        assert_eq!(
            client_address(mapped, &HeaderMap::new(), false),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
