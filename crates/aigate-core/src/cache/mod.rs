//! Stage 4, the response cache: decides HIT or MISS before anything goes upstream, and on a miss
//! tees the upstream's response into the store as it is relayed.
//!
//! Reads: the gateway's cache settings, the `cf-aig-skip-cache` / `cf-aig-cache-ttl` /
//! `cf-aig-cache-key` headers (and the legacy `cf-skip-cache` / `cf-cache-ttl`), the method, path,
//! query, body and credentials (for the key). Writes: `cf-aig-cache-status` (`HIT`/`MISS`),
//! `aigate-cache` (`HIT`/`MISS`/`BYPASS`/`OFF`/`SHADOW-HIT`), `aigate-cache-key` and, on hits, `age`.
//!
//! Only complete 2xx responses of endpoints whose result is a pure function of the request are
//! stored (chat/completions, completions, embeddings, responses, Anthropic messages; GET models);
//! a stream is stored only after its clean end (`[DONE]`, `message_stop`, `response.completed`).
//! Store writes go through a bounded queue to one writer task, off the request path.
//!
//! Failure behaviour: fails open. A store error is a miss (counted, logged at most once per
//! interval) and the request goes upstream; an invalid cache header is a 400 naming the header.

pub mod coalesce;
pub mod key;
pub mod tee;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aigate_store::{CacheKey, CacheStore, CachedResponse, StoreError, TieredCache};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use tokio::sync::{mpsc, watch};

use crate::body::GatewayBody;
use crate::clock::Clock;
use crate::config::{CacheMode, CacheScope, CacheSettings};
use crate::error::GatewayError;
use crate::headers::{
    AIGATE_CACHE, AIGATE_CACHE_KEY, CF_AIG_CACHE_KEY, CF_AIG_CACHE_STATUS, CF_AIG_CACHE_TTL, CF_AIG_SKIP_CACHE,
    CF_CACHE_TTL, CF_SKIP_CACHE,
};
use coalesce::{FlightEvent, FlightReceiver, Inflight};

/// TTL of entries stored because of `cf-aig-cache-key` on a gateway whose cache is off.
pub const CUSTOM_KEY_DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Longest accepted `cf-aig-cache-ttl`: 30 days.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Capacity of the queue to the cache writer.
pub const WRITE_QUEUE: usize = 1024;

/// The cache status of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from cache (or from an identical in-flight request).
    Hit,
    /// Looked up, not found, answered from upstream.
    Miss,
    /// Not looked up: `cf-aig-skip-cache`, or an endpoint that is never cached.
    Bypass,
    /// The gateway's cache is off.
    Off,
    /// Shadow mode: would have been a hit; answered from upstream.
    ShadowHit,
}

impl CacheStatus {
    /// `cf-aig-cache-status` value (Cloudflare knows only HIT and MISS).
    pub fn cf_value(self) -> &'static str {
        if self == CacheStatus::Hit {
            "HIT"
        } else {
            "MISS"
        }
    }
    /// `aigate-cache` value.
    pub fn aigate_value(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Bypass => "BYPASS",
            CacheStatus::Off => "OFF",
            CacheStatus::ShadowHit => "SHADOW-HIT",
        }
    }
    /// Writes both headers.
    pub fn write(self, h: &mut HeaderMap) {
        h.insert(CF_AIG_CACHE_STATUS, HeaderValue::from_static(self.cf_value()));
        h.insert(AIGATE_CACHE, HeaderValue::from_static(self.aigate_value()));
    }
}

/// Per-request cache headers.
#[derive(Debug, Default)]
pub struct CacheOptions {
    /// `cf-aig-skip-cache: true`.
    pub skip: bool,
    /// `cf-aig-cache-ttl` (`Some(ZERO)` means do not cache).
    pub ttl: Option<Duration>,
    /// `cf-aig-cache-key`.
    pub custom_key: Option<String>,
}

/// The first of `names` present, as (name, trimmed value).
fn header<'a, 'n>(h: &'a HeaderMap, names: &'n [HeaderName]) -> Result<Option<(&'n str, &'a str)>, GatewayError> {
    for name in names {
        if let Some(v) = h.get(name) {
            let n = name.as_str();
            let s = v.to_str().map_err(|_| GatewayError::BadRequest(format!("invalid {n}: not visible ASCII")))?;
            return Ok(Some((n, s.trim())));
        }
    }
    Ok(None)
}

impl CacheOptions {
    /// Reads the cache headers; an invalid value is a 400 naming the header.
    pub fn parse(h: &HeaderMap) -> Result<CacheOptions, GatewayError> {
        let mut o = CacheOptions::default();
        if let Some((n, v)) = header(h, &[CF_AIG_SKIP_CACHE, CF_SKIP_CACHE])? {
            o.skip = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(GatewayError::BadRequest(format!("invalid {n}: expected true or false"))),
            };
        }
        if let Some((n, v)) = header(h, &[CF_AIG_CACHE_TTL, CF_CACHE_TTL])? {
            let secs: u64 = v
                .parse()
                .map_err(|_| GatewayError::BadRequest(format!("invalid {n}: expected a number of seconds")))?;
            let d = Duration::from_secs(secs);
            if secs != 0 && (d < Duration::from_secs(60) || d > MAX_TTL) {
                return Err(GatewayError::BadRequest(format!(
                    "invalid {n}: {secs} is outside 60..={} seconds (0 disables caching for this request)",
                    MAX_TTL.as_secs()
                )));
            }
            o.ttl = Some(d);
        }
        if let Some((n, v)) = header(h, &[CF_AIG_CACHE_KEY])? {
            if v.is_empty() || v.len() > 1024 {
                return Err(GatewayError::BadRequest(format!("invalid {n}: expected 1 to 1024 characters")));
            }
            o.custom_key = Some(v.to_string());
        }
        Ok(o)
    }
}

/// What the cache does for one request.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Nothing: cache off (`Off`) or bypassed (`Bypass`).
    Skip(CacheStatus),
    /// Look up and/or store under `key`.
    Use(Use),
}

/// A request the cache takes part in.
#[derive(Debug, Clone)]
pub struct Use {
    /// The key.
    pub key: CacheKey,
    /// TTL of a stored entry.
    pub ttl: Duration,
    /// Shadow mode: never serve hits.
    pub shadow: bool,
    /// Join identical in-flight requests.
    pub coalesce: bool,
    /// Longest wait for a leader's head.
    pub coalesce_wait: Duration,
    /// Largest stored response.
    pub max_entry_size: u64,
}

/// Whether a request's response may be cached: a pure function of the request.
pub fn cacheable_endpoint(method: &Method, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    if method == Method::POST {
        ["chat/completions", "completions", "embeddings", "responses", "messages"]
            .iter()
            .any(|e| path == *e || path.ends_with(&format!("/{e}")))
    } else if method == Method::GET {
        path == "models" || path.ends_with("/models")
    } else {
        false
    }
}

/// The request facts the plan needs.
pub struct PlanInput<'a> {
    /// Gateway cache settings.
    pub settings: &'a CacheSettings,
    /// Parsed headers.
    pub options: &'a CacheOptions,
    /// The request as the key sees it (credentials are dropped when `scope = "gateway"`).
    pub request: key::KeyInput<'a>,
}

/// Decides what the cache does for a request.
pub fn plan(i: &PlanInput<'_>) -> Plan {
    let (s, r) = (i.settings, &i.request);
    let custom = i.options.custom_key.as_deref();
    if s.mode == CacheMode::Off && custom.is_none() {
        return Plan::Skip(CacheStatus::Off);
    }
    if i.options.skip || i.options.ttl == Some(Duration::ZERO) || !cacheable_endpoint(r.method, r.path) {
        return Plan::Skip(CacheStatus::Bypass);
    }
    let key = match custom {
        Some(c) => key::custom(r.gateway, c),
        None if s.scope == CacheScope::Gateway => key::compute(&key::KeyInput { credentials: &[], ..*r }),
        None => key::compute(r),
    };
    let default_ttl = if s.mode == CacheMode::Off { CUSTOM_KEY_DEFAULT_TTL } else { s.ttl };
    Plan::Use(Use {
        key,
        ttl: i.options.ttl.unwrap_or(default_ttl),
        shadow: s.mode == CacheMode::Shadow,
        coalesce: s.coalesce && s.mode != CacheMode::Shadow,
        coalesce_wait: s.coalesce_wait,
        max_entry_size: s.max_entry_size,
    })
}

/// Counters of the cache stage (exported as metrics).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Hits served from the store.
    pub hits: AtomicU64,
    /// Hits served from an identical in-flight request.
    pub coalesced: AtomicU64,
    /// Misses.
    pub misses: AtomicU64,
    /// Shadow-mode would-be hits.
    pub shadow_hits: AtomicU64,
    /// Entries written.
    pub writes: AtomicU64,
    /// Writes dropped because the queue was full.
    pub write_drops: AtomicU64,
    /// Store errors (reads and writes).
    pub store_errors: AtomicU64,
}

struct WriteJob {
    ns: Arc<str>,
    entry: Arc<CachedResponse>,
    flight: Arc<coalesce::Flight>,
}

/// The cache stage's shared state: store, in-flight registry, writer queue, counters.
pub struct CacheLayer {
    /// The store (memory tier in front of the configured backend).
    pub store: Arc<TieredCache>,
    /// Identical requests in flight.
    pub inflight: Inflight,
    /// Counters.
    pub stats: CacheStats,
    /// Time source for expiry and `age`.
    pub clock: Arc<Clock>,
    writer: mpsc::Sender<WriteJob>,
    writer_rx: std::sync::Mutex<Option<mpsc::Receiver<WriteJob>>>,
    last_error_log: AtomicU64,
}

/// Interval between two log lines about store errors.
const ERROR_LOG_INTERVAL_MS: u64 = 10_000;

impl CacheLayer {
    /// Creates the layer; [`CacheLayer::run_writer`] must be spawned to drain the write queue.
    pub fn new(store: TieredCache, clock: Arc<Clock>) -> Arc<CacheLayer> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        Arc::new(CacheLayer {
            store: Arc::new(store),
            inflight: Inflight::default(),
            stats: CacheStats::default(),
            clock,
            writer: tx,
            writer_rx: std::sync::Mutex::new(Some(rx)),
            last_error_log: AtomicU64::new(0),
        })
    }

    /// The writer loop: stores queued entries until `shutdown`, then drains what is queued.
    pub async fn run_writer(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.writer_rx.lock().ok().and_then(|mut r| r.take()) else { return };
        loop {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => self.write(job).await,
                    None => return,
                },
                _ = shutdown.changed() => {
                    while let Ok(job) = rx.try_recv() {
                        self.write(job).await;
                    }
                    return;
                }
            }
        }
    }

    async fn write(&self, job: WriteJob) {
        match self.store.put(&job.ns, job.flight.key(), job.entry).await {
            Ok(()) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.store_error("write", &e),
        }
        self.inflight.remove(&job.flight);
    }

    /// Queues an entry for writing; the flight stays registered until it lands.
    pub(crate) fn enqueue(&self, ns: Arc<str>, entry: Arc<CachedResponse>, flight: Arc<coalesce::Flight>) {
        if let Err(e) = self.writer.try_send(WriteJob { ns, entry, flight }) {
            self.stats.write_drops.fetch_add(1, Ordering::Relaxed);
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            self.inflight.remove(&job.flight);
        }
    }

    /// Looks `key` up: memory tier first (no await), then the backend. Errors count as misses.
    pub async fn lookup(&self, ns: &str, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let now = self.clock.now_ms();
        if let Some(e) = self.store.memory_get(key) {
            return (!e.is_expired(now)).then_some(e);
        }
        match self.store.get(ns, key).await {
            Ok(Some(e)) if !e.is_expired(now) => Some(e),
            Ok(_) => None,
            Err(e) => {
                self.store_error("read", &e);
                None
            }
        }
    }

    /// Removes one entry or a whole gateway's entries.
    pub async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        self.store.purge(ns, key).await
    }

    fn store_error(&self, op: &'static str, e: &StoreError) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_ms();
        let last = self.last_error_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= ERROR_LOG_INTERVAL_MS
            && self.last_error_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            let total = self.stats.store_errors.load(Ordering::Relaxed);
            tracing::warn!(store = self.store.kind(), op, error = %e, errors_total = total,
                "cache store failing; requests go upstream (logged at most every 10s)");
        }
    }
}

/// Headers never replayed from the cache: per-response or per-connection facts.
fn replayable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(matches!(
        n,
        "date"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "set-cookie"
            | "age"
            | "server"
            | "alt-svc"
            | "cf-ray"
            | "via"
            | "trailer"
            | "upgrade"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("cf-aig-")
        || n.starts_with("aigate-"))
}

/// The headers of an upstream response worth storing.
pub fn replay_headers(h: &HeaderMap) -> Vec<(String, Bytes)> {
    h.iter()
        .filter(|(k, _)| replayable(k))
        .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

fn apply_headers(h: &mut HeaderMap, stored: &[(String, Bytes)]) {
    for (k, v) in stored {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
            h.append(k, v);
        }
    }
}

/// A response served from a stored entry.
pub fn hit_response(entry: Arc<CachedResponse>, key: &CacheKey, now_ms: u64) -> Response<GatewayBody> {
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
    let age = now_ms.saturating_sub(entry.created_at_ms) / 1000;
    let sized = !entry.headers.iter().any(|(k, v)| k == "content-type" && v.starts_with(b"text/event-stream"));
    let mut resp = Response::new(GatewayBody::Replay { entry: entry.clone(), next: 0, sized });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    apply_headers(h, &entry.headers);
    h.insert(http::header::AGE, HeaderValue::from(age));
    set_key_header(h, key);
    CacheStatus::Hit.write(h);
    resp
}

/// Writes `aigate-cache-key` (the digest; usable with the purge API).
pub fn set_key_header(h: &mut HeaderMap, key: &CacheKey) {
    if let Ok(v) = HeaderValue::from_str(&key.to_hex()) {
        h.insert(AIGATE_CACHE_KEY, v);
    }
}

/// Waits for a leader's head; `None` means go upstream alone (leader failed or too slow).
pub async fn follow(mut rx: FlightReceiver, wait: Duration, key: &CacheKey) -> Option<Response<GatewayBody>> {
    let first = tokio::time::timeout(wait, rx.recv()).await.ok().flatten()?;
    let FlightEvent::Head(status, headers) = first else { return None };
    let mut resp = Response::new(GatewayBody::Follower(rx));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    apply_headers(h, &headers);
    h.insert(http::header::AGE, HeaderValue::from_static("0"));
    set_key_header(h, key);
    CacheStatus::Hit.write(h);
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn options_parse_and_refuse() {
        let o = CacheOptions::parse(&hm(&[("cf-aig-skip-cache", "true"), ("cf-aig-cache-ttl", "120")])).unwrap();
        assert!(o.skip);
        assert_eq!(o.ttl, Some(Duration::from_secs(120)));
        let o = CacheOptions::parse(&hm(&[("cf-skip-cache", "false"), ("cf-cache-ttl", "0")])).unwrap();
        assert!(!o.skip);
        assert_eq!(o.ttl, Some(Duration::ZERO));
        for (k, v) in [
            ("cf-aig-skip-cache", "yes"),
            ("cf-aig-cache-ttl", "10"),
            ("cf-aig-cache-ttl", "abc"),
            ("cf-cache-ttl", "99999999"),
        ] {
            let e = CacheOptions::parse(&hm(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn cacheable_endpoints() {
        assert!(cacheable_endpoint(&Method::POST, "chat/completions"));
        assert!(cacheable_endpoint(&Method::POST, "v1/chat/completions"));
        assert!(cacheable_endpoint(&Method::POST, "v1/messages"));
        assert!(cacheable_endpoint(&Method::POST, "responses"));
        assert!(cacheable_endpoint(&Method::GET, "models"));
        assert!(!cacheable_endpoint(&Method::GET, "models/gpt-4o"));
        assert!(!cacheable_endpoint(&Method::POST, "images/generations"));
        assert!(!cacheable_endpoint(&Method::POST, "audio/transcriptions"));
        assert!(!cacheable_endpoint(&Method::DELETE, "chat/completions"));
    }

    #[test]
    fn replay_headers_drop_per_response_facts() {
        let h = hm(&[
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
            ("date", "x"),
            ("x-ratelimit-remaining-requests", "9"),
            ("content-length", "10"),
        ]);
        let names: Vec<String> = replay_headers(&h).into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, vec!["content-type".to_string(), "x-request-id".to_string()]);
    }
}
