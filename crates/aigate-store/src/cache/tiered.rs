//! The cache the gateway uses: a [`MemoryCacheStore`] in front of an optional backing store
//! (disk or Redis).
//!
//! Reads try memory first, synchronously: a memory hit returns without awaiting anything else. A
//! miss reads the backing store and copies a hit into memory. Writes and purges go to both tiers.
//!
//! Bounds: those of the two tiers (the memory tier's byte cap and TTL cap, the backing store's own).
//! With a shared backing store (Redis), [`crate::build_cache`] adds a [`PurgeBus`]: a purge on one
//! replica empties the other replicas' memory tiers before it returns; the short TTL cap it gives
//! the memory tier in that case bounds what a replica that missed the announcement serves.
//!
//! Failure behaviour: the memory tier cannot fail. A backing-store error is returned to the caller
//! (who treats it as a miss) after the memory tier has been served: `put` and `purge` still update
//! memory, and `get` reports the error only when memory missed.

use std::sync::Arc;

use crate::cache::purge_bus::PurgeBus;
use crate::{
    CacheFilter, CacheKey, CacheStore, CacheStoreStats, CachedResponse, EntryMeta, MemoryCacheStore, StoreError,
};

/// A memory tier in front of an optional backing store. Cloning shares both tiers.
#[derive(Clone)]
pub struct TieredCache {
    memory: MemoryCacheStore,
    backing: Option<Arc<dyn CacheStore>>,
    /// Announces purges to the other replicas sharing the backing store (Redis).
    bus: Option<Arc<PurgeBus>>,
}

impl std::fmt::Debug for TieredCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("memory", &self.memory)
            .field("backing", &self.backing.as_ref().map(|b| b.kind()))
            .finish()
    }
}

impl TieredCache {
    /// A cache of `memory` in front of `backing` (memory only when `None`).
    pub fn new(memory: MemoryCacheStore, backing: Option<Arc<dyn CacheStore>>) -> TieredCache {
        TieredCache { memory, backing, bus: None }
    }

    /// The same cache, announcing its purges on `bus` (built on this cache's memory tier).
    pub fn with_purge_bus(self, bus: Option<Arc<PurgeBus>>) -> TieredCache {
        TieredCache { bus, ..self }
    }

    /// The memory tier.
    pub fn memory(&self) -> &MemoryCacheStore {
        &self.memory
    }

    /// The backing store, if any.
    pub fn backing(&self) -> Option<&Arc<dyn CacheStore>> {
        self.backing.as_ref()
    }

    /// The memory tier's entry under `key`: the synchronous fast path (no future, no allocation
    /// beyond an `Arc` clone). `None` means "ask [`CacheStore::get`]", which consults the backing store.
    pub fn memory_get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.memory.get_sync(key)
    }

    /// The purge announcements of a cache shared with other replicas, if any.
    pub fn purge_bus(&self) -> Option<&Arc<PurgeBus>> {
        self.bus.as_ref()
    }

    /// The memory tier's size figures.
    pub fn memory_stats(&self) -> CacheStoreStats {
        self.memory.stats_sync()
    }

    /// The backing store's size figures, if there is one.
    pub fn backing_stats(&self) -> Option<CacheStoreStats> {
        self.backing.as_ref().map(|b| b.stats())
    }
}

#[async_trait::async_trait]
impl CacheStore for TieredCache {
    /// The backing store's kind, or `memory` when there is none.
    fn kind(&self) -> &'static str {
        self.backing.as_ref().map_or("memory", |b| b.kind())
    }

    async fn get(&self, ns: &str, key: &CacheKey) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        if let Some(hit) = self.memory.get_sync(key) {
            return Ok(Some(hit));
        }
        let Some(backing) = &self.backing else { return Ok(None) };
        let found = backing.get(ns, key).await?;
        if let Some(entry) = &found {
            self.memory.put_sync(ns, key, entry.clone());
        }
        Ok(found)
    }

    async fn put(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>) -> Result<(), StoreError> {
        self.memory.put_sync(ns, key, entry.clone());
        match &self.backing {
            Some(backing) => backing.put(ns, key, entry).await,
            None => Ok(()),
        }
    }

    async fn put_with_meta(
        &self,
        ns: &str,
        key: &CacheKey,
        entry: Arc<CachedResponse>,
        meta: &EntryMeta,
    ) -> Result<(), StoreError> {
        self.memory.put_meta_sync(ns, key, entry.clone(), Some(Arc::new(meta.clone())));
        match &self.backing {
            Some(backing) => backing.put_with_meta(ns, key, entry, meta).await,
            None => Ok(()),
        }
    }

    /// Purges the matching entries of the backing store (which knows every entry's facts), then
    /// those keys and the matching entries of the memory tier (which may hold entries it never
    /// wrote to the backing store with their facts), then the other replicas' memory tiers by the
    /// keys, through the [`PurgeBus`].
    async fn purge_matching(&self, ns: &str, filter: &CacheFilter) -> Result<Vec<CacheKey>, StoreError> {
        let mut keys = match &self.backing {
            Some(backing) => backing.purge_matching(ns, filter).await?,
            None => Vec::new(),
        };
        for k in &keys {
            self.memory.purge_sync(ns, Some(k));
        }
        keys.extend(self.memory.purge_matching_sync(ns, filter));
        keys.sort_unstable();
        keys.dedup();
        if let (Some(bus), false) = (&self.bus, keys.is_empty()) {
            if let Err(e) = bus.announce_keys(ns, &keys).await {
                tracing::warn!(gateway = ns, error = %e, "cache purge: the other replicas were not told; they serve their copies at most {:?}", crate::REDIS_MEMORY_TTL_CAP);
            }
        }
        Ok(keys)
    }

    /// Purges both tiers, then the other replicas' memory tiers through the [`PurgeBus`] if there is
    /// one (a failed announcement is logged, not returned: the shared store is purged); returns the
    /// larger of the two counts (an entry is usually in both).
    async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        let in_memory = self.memory.purge_sync(ns, key);
        let Some(backing) = &self.backing else { return Ok(in_memory) };
        let removed = in_memory.max(backing.purge(ns, key).await?);
        if let Some(bus) = &self.bus {
            if let Err(e) = bus.announce(ns, key).await {
                tracing::warn!(gateway = ns, error = %e, "cache purge: the other replicas were not told; they serve their copies at most {:?}", crate::REDIS_MEMORY_TTL_CAP);
            }
        }
        Ok(removed)
    }

    /// The backing store's figures when it has one that knows them (Redis does not), else the
    /// memory tier's.
    fn stats(&self) -> CacheStoreStats {
        match self.backing.as_ref().map(|b| b.stats()) {
            Some(s) if s != CacheStoreStats::default() => s,
            _ => self.memory.stats_sync(),
        }
    }
}
