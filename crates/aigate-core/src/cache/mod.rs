//! The response cache's machinery, shared by every request: the store (a memory tier in front of
//! the configured backend), the registry of identical requests in flight, the writer that stores
//! entries off the request path, and the counters. Whether a request is a HIT, follows an
//! identical request in flight, or is a MISS is decided by the cache phase
//! ([`crate::phases::cache`]); on a miss it hands the respond phase a [`MissHandle`], which tees the
//! answer into the store as it is relayed ([`tee`]) and stores it only after a clean end.
//!
//! Bounds: the write queue ([`WRITE_QUEUE`]; a full queue drops the write, counted), the store's
//! own size caps, the largest stored answer (`max_entry_size`, also what a flight buffers).
//!
//! Failure behaviour: fails open. A store error is a miss (counted, logged at most once per 10 s)
//! and the request goes upstream.

pub mod coalesce;
pub mod index;
pub mod key;
pub mod replay;
pub mod rules;
pub mod tee;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aigate_store::{CacheFilter, CacheKey, CacheStore, CachedResponse, EntryMeta, StoreError, TieredCache};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::{mpsc, watch};

use crate::body::GatewayBody;
use crate::client::UpstreamBody;
use crate::clock::Clock;
use crate::headers::{AIGATE_CACHE, CF_AIG_CACHE_STATUS};
use coalesce::{Flight, Inflight};
use replay::replay_headers;
use tee::Tee;

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

/// Counters of the cache (exported as metrics).
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
    facts: EntryFacts,
}

/// What the request that fills an entry says about it, kept as references (no copy, no parse)
/// until the writer turns them into the entry's [`EntryMeta`] off the request path.
#[derive(Debug, Clone)]
pub struct EntryFacts {
    /// The request body (its `model`).
    pub body: bytes::Bytes,
    /// `cf-aig-metadata`.
    pub metadata: Option<HeaderValue>,
    /// The endpoint.
    pub endpoint: crate::endpoint::Endpoint,
}

impl EntryFacts {
    /// The entry's meta: the requested model, the endpoint's name, the metadata as text.
    pub fn meta(&self) -> EntryMeta {
        let metadata = self
            .metadata
            .as_ref()
            .and_then(|v| crate::logs::parse_metadata(v.as_bytes()))
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| (k.clone(), index::meta_text(v)))
            .collect();
        EntryMeta {
            model: crate::meter::usage::request_model(&self.body),
            endpoint: self.endpoint.as_str().to_owned(),
            metadata,
        }
    }
}

/// The cache stage's shared state: store, in-flight registry, writer queue, counters.
pub struct CacheLayer {
    /// The store (memory tier in front of the configured backend).
    pub store: Arc<TieredCache>,
    /// Identical requests in flight.
    pub inflight: Inflight,
    /// Counters.
    pub stats: CacheStats,
    /// What this process knows of each entry (insight).
    pub index: Arc<index::CacheIndex>,
    /// Time source for expiry and `age`.
    pub clock: Clock,
    writer: mpsc::Sender<WriteJob>,
    writer_rx: std::sync::Mutex<Option<mpsc::Receiver<WriteJob>>>,
    last_error_log: AtomicU64,
}

/// Interval between two log lines about store errors.
const ERROR_LOG_INTERVAL_MS: u64 = 10_000;

impl CacheLayer {
    /// Creates the layer; [`CacheLayer::run_writer`] must be spawned to drain the write queue.
    pub fn new(store: TieredCache, clock: Clock) -> Arc<CacheLayer> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        Arc::new(CacheLayer {
            store: Arc::new(store),
            inflight: Inflight::default(),
            stats: CacheStats::default(),
            index: Arc::default(),
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
        let (key, e) = (job.flight.key(), &job.entry);
        let (created, expires, bytes) = (e.created_at_ms, e.expires_at_ms, e.body_len() as u64);
        match self.store.put_with_meta(&job.ns, key, job.entry, &job.facts.meta()).await {
            Ok(()) => {
                self.index.on_write(&job.ns, key, created, expires, bytes);
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.store_error("write", &e),
        }
        self.inflight.remove(&job.flight);
    }

    /// Queues an entry for writing; the flight stays registered until it lands.
    pub(crate) fn enqueue(
        &self,
        ns: Arc<str>,
        entry: Arc<CachedResponse>,
        flight: Arc<coalesce::Flight>,
        facts: EntryFacts,
    ) {
        if let Err(e) = self.writer.try_send(WriteJob { ns, entry, flight, facts }) {
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
        let n = self.store.purge(ns, key).await?;
        self.index.purged(ns, key.map(std::slice::from_ref));
        Ok(n)
    }

    /// Removes the entries of a gateway that `filter` matches (every store tier, every replica's
    /// memory tier); returns how many.
    pub async fn purge_matching(&self, ns: &str, filter: &CacheFilter) -> Result<u64, StoreError> {
        let keys = self.store.purge_matching(ns, filter).await?;
        self.index.purged(ns, Some(&keys));
        Ok(keys.len() as u64)
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

/// What the cache phase hands the respond phase on a miss: the request's flight, which stores
/// the answer when it ends cleanly. Dropped before that (upstream error, non-2xx answer), it fails
/// the flight, so requests following it go upstream on their own.
pub struct MissHandle {
    flight: Arc<Flight>,
    layer: Arc<CacheLayer>,
    ns: Arc<str>,
    ttl: Duration,
    facts: EntryFacts,
    armed: bool,
}

impl MissHandle {
    /// The handle of a flight registered in the in-flight registry (others may follow it).
    pub fn registered(
        flight: Arc<Flight>,
        layer: Arc<CacheLayer>,
        ns: Arc<str>,
        ttl: Duration,
        facts: EntryFacts,
    ) -> MissHandle {
        MissHandle { flight, layer, ns, ttl, facts, armed: true }
    }

    /// A flight nobody can join (shadow mode, coalescing off): it only builds the entry.
    pub fn private(
        key: CacheKey,
        max: usize,
        layer: Arc<CacheLayer>,
        ns: Arc<str>,
        ttl: Duration,
        facts: EntryFacts,
    ) -> MissHandle {
        MissHandle { flight: Flight::new(key, max), layer, ns, ttl, facts, armed: true }
    }

    /// The entry's key.
    pub fn key(&self) -> &CacheKey {
        self.flight.key()
    }

    /// Relays a 2xx answer while storing it: `terminal` is the event a stream must contain to
    /// have ended cleanly (`None` for a plain body).
    pub fn tee(
        mut self,
        status: StatusCode,
        headers: &HeaderMap,
        body: UpstreamBody,
        terminal: Option<&'static [u8]>,
    ) -> GatewayBody {
        self.armed = false;
        let headers = Arc::new(replay_headers(headers));
        self.flight.head(status, headers.clone());
        let tee = Tee::new(
            body,
            self.flight.clone(),
            self.layer.clone(),
            self.ns.clone(),
            status.as_u16(),
            headers,
            self.ttl,
            terminal,
            self.facts.clone(),
        );
        GatewayBody::Tee(Box::new(tee))
    }
}

impl Drop for MissHandle {
    fn drop(&mut self) {
        if self.armed {
            self.flight.fail();
            self.layer.inflight.remove(&self.flight);
        }
    }
}
