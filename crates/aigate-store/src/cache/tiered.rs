//! The cache the gateway uses: a [`MemoryCacheStore`] in front of an optional backing store
//! (disk or Redis).
//!
//! Reads try memory first, synchronously: a memory hit returns without awaiting anything else. A
//! miss reads the backing store and copies a hit into memory. Writes and purges go to both tiers.
//!
//! Bounds: those of the two tiers (the memory tier's byte cap and TTL cap, the backing store's own).
//! With a shared backing store (Redis), a purge on one replica reaches the other replicas' memory
//! tiers only when their entries expire, hence the short TTL cap [`crate::build_cache`] gives the
//! memory tier in that case.
//!
//! Failure behaviour: the memory tier cannot fail. A backing-store error is returned to the caller
//! (who treats it as a miss) after the memory tier has been served: `put` and `purge` still update
//! memory, and `get` reports the error only when memory missed.

use std::sync::Arc;

use crate::{CacheKey, CacheStore, CacheStoreStats, CachedResponse, MemoryCacheStore, StoreError};

/// A memory tier in front of an optional backing store. Cloning shares both tiers.
#[derive(Clone)]
pub struct TieredCache {
    memory: MemoryCacheStore,
    backing: Option<Arc<dyn CacheStore>>,
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
        TieredCache { memory, backing }
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

    /// Purges both tiers; returns the larger of the two counts (an entry is usually in both).
    async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        let in_memory = self.memory.purge_sync(ns, key);
        match &self.backing {
            Some(backing) => Ok(in_memory.max(backing.purge(ns, key).await?)),
            None => Ok(in_memory),
        }
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
