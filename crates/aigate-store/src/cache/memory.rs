//! In-process response cache: a [`moka`] cache bounded by bytes.
//!
//! Bounds: the total [`CachedResponse::weight`] of the held entries stays at or under the
//! `max_bytes` given to [`MemoryCacheStore::new`] (moka applies the bound asynchronously, so it may be
//! exceeded briefly until its maintenance runs; TinyLFU admission decides what is kept). Each entry
//! lives until its own `expires_at_ms` on the store's clock ([`MemoryCacheStore::with_clock`], the
//! system clock by default), optionally capped by [`MemoryCacheStore::with_ttl_cap`] (used
//! when the memory tier sits in front of a shared store such as Redis, so a purge on another replica
//! is seen here within the cap).
//!
//! Failure behaviour: none. Every operation is infallible; the async [`CacheStore`] methods always
//! return `Ok`. An entry heavier than the whole capacity is simply not kept. The synchronous
//! [`MemoryCacheStore::get_sync`] / [`MemoryCacheStore::put_sync`] are the fast path of
//! [`crate::TieredCache`]: a hit costs a hash lookup and an `Arc` clone, no allocation and no future.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;

use crate::{CacheFilter, CacheKey, CacheStore, CacheStoreStats, CachedResponse, Clock, EntryMeta, StoreError};

/// What the moka cache holds for a key: the response, the namespace it was stored under, and what
/// a filtered purge matches on (absent for an entry copied from a backing store: the backing store
/// keeps it, and tells which keys a filtered purge removed).
#[derive(Clone)]
struct Entry {
    response: Arc<CachedResponse>,
    ns: Arc<str>,
    meta: Option<Arc<EntryMeta>>,
}

/// Computes each entry's moka lifetime from its absolute expiry, capped by the optional TTL cap.
struct EntryExpiry {
    ttl_cap: Option<Duration>,
    clock: Clock,
}

impl EntryExpiry {
    fn lifetime(&self, entry: &Entry) -> Duration {
        let left = Duration::from_millis(entry.response.expires_at_ms.saturating_sub(self.clock.now_ms()));
        match self.ttl_cap {
            Some(cap) => left.min(cap),
            None => left,
        }
    }
}

impl Expiry<CacheKey, Entry> for EntryExpiry {
    fn expire_after_create(&self, _key: &CacheKey, value: &Entry, _created_at: Instant) -> Option<Duration> {
        Some(self.lifetime(value))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Entry,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(value))
    }
}

/// An in-process cache store bounded by bytes, with per-entry expiry. Cloning shares the cache.
#[derive(Clone)]
pub struct MemoryCacheStore {
    cache: Cache<CacheKey, Entry>,
    evictions: Arc<AtomicU64>,
    max_bytes: u64,
    ttl_cap: Option<Duration>,
    clock: Clock,
}

impl std::fmt::Debug for MemoryCacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCacheStore")
            .field("max_bytes", &self.max_bytes)
            .field("ttl_cap", &self.ttl_cap)
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl MemoryCacheStore {
    /// A store holding at most `max_bytes` of entries (by [`CachedResponse::weight`]), each kept
    /// until its own expiry on the system clock.
    pub fn new(max_bytes: u64) -> MemoryCacheStore {
        MemoryCacheStore::build(max_bytes, None, Clock::system())
    }

    /// The same store, but no entry is kept longer than `cap` (whatever its own expiry), for a
    /// memory tier in front of a shared store. Entries already held are dropped, so call this
    /// right after [`MemoryCacheStore::new`].
    pub fn with_ttl_cap(self, cap: Duration) -> MemoryCacheStore {
        MemoryCacheStore::build(self.max_bytes, Some(cap), self.clock)
    }

    /// The same store, on `clock` instead of the system clock. Entries already held are dropped, so
    /// call this right after [`MemoryCacheStore::new`].
    pub fn with_clock(self, clock: Clock) -> MemoryCacheStore {
        MemoryCacheStore::build(self.max_bytes, self.ttl_cap, clock)
    }

    fn build(max_bytes: u64, ttl_cap: Option<Duration>, clock: Clock) -> MemoryCacheStore {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, e: &Entry| {
                u32::try_from(e.response.weight().saturating_add(e.ns.len())).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry { ttl_cap, clock: clock.clone() })
            .eviction_listener(move |_key, _value, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryCacheStore { cache, evictions, max_bytes, ttl_cap, clock }
    }

    /// The byte capacity given at construction.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The TTL cap, if any.
    pub fn ttl_cap(&self) -> Option<Duration> {
        self.ttl_cap
    }

    /// The entry under `key` unless absent or expired; synchronous, no allocation beyond an `Arc`
    /// clone.
    pub fn get_sync(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let entry = self.cache.get(key)?;
        if entry.response.is_expired(self.clock.now_ms()) {
            self.cache.invalidate(key);
            return None;
        }
        Some(entry.response)
    }

    /// Stores `entry` under `key` in namespace `ns` until its expiry (or the TTL cap). An already
    /// expired entry is not stored, and removes what `key` held.
    pub fn put_sync(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>) {
        self.put_meta_sync(ns, key, entry, None);
    }

    /// [`MemoryCacheStore::put_sync`] with what a filtered purge matches on.
    pub fn put_meta_sync(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>, meta: Option<Arc<EntryMeta>>) {
        if entry.is_expired(self.clock.now_ms()) {
            self.cache.invalidate(key);
            return;
        }
        self.cache.insert(*key, Entry { response: entry, ns: Arc::from(ns), meta });
    }

    /// Removes the entries of `ns` that `filter` matches; returns their keys.
    pub fn purge_matching_sync(&self, ns: &str, filter: &CacheFilter) -> Vec<CacheKey> {
        let keys: Vec<Arc<CacheKey>> = self
            .cache
            .iter()
            .filter(|(_, e)| &*e.ns == ns && filter.matches(e.meta.as_deref(), e.response.created_at_ms))
            .map(|(k, _)| k)
            .collect();
        keys.into_iter().filter(|k| self.cache.remove(&**k).is_some()).map(|k| *k).collect()
    }

    /// Removes `key`, or every entry of `ns` when `key` is `None`; returns how many were removed.
    pub fn purge_sync(&self, ns: &str, key: Option<&CacheKey>) -> u64 {
        match key {
            Some(k) => u64::from(self.cache.remove(k).is_some()),
            None => {
                let keys: Vec<Arc<CacheKey>> =
                    self.cache.iter().filter(|(_, e)| &*e.ns == ns).map(|(k, _)| k).collect();
                keys.into_iter().filter(|k| self.cache.remove(&**k).is_some()).count() as u64
            }
        }
    }

    /// Removes every entry of every namespace.
    pub fn purge_all_sync(&self) {
        self.cache.invalidate_all();
    }

    /// Runs moka's pending maintenance (size eviction, expiry) now; tests and shutdown use it.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    /// Size figures (approximate until [`MemoryCacheStore::run_pending_tasks`] has run).
    pub fn stats_sync(&self) -> CacheStoreStats {
        CacheStoreStats {
            entries: self.cache.entry_count(),
            bytes: self.cache.weighted_size(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[async_trait::async_trait]
impl CacheStore for MemoryCacheStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, _ns: &str, key: &CacheKey) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        Ok(self.get_sync(key))
    }

    async fn put(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>) -> Result<(), StoreError> {
        self.put_sync(ns, key, entry);
        Ok(())
    }

    async fn put_with_meta(
        &self,
        ns: &str,
        key: &CacheKey,
        entry: Arc<CachedResponse>,
        meta: &EntryMeta,
    ) -> Result<(), StoreError> {
        self.put_meta_sync(ns, key, entry, Some(Arc::new(meta.clone())));
        Ok(())
    }

    async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        Ok(self.purge_sync(ns, key))
    }

    async fn purge_matching(&self, ns: &str, filter: &CacheFilter) -> Result<Vec<CacheKey>, StoreError> {
        Ok(self.purge_matching_sync(ns, filter))
    }

    fn stats(&self) -> CacheStoreStats {
        self.stats_sync()
    }
}
