//! aigate-store: the store traits of aigate and their implementations.
//!
//! One trait per domain, held as `Arc<dyn _>`, each in its folder with its implementations:
//! memory / embedded implementations are the default, Redis and PostgreSQL implementations share
//! state between replicas. Every implementation of a trait passes the same conformance suite
//! (`tests/`). Which implementation serves a domain is chosen from configuration in one place
//! ([`open`], through [`build_cache`], [`build_limit_store`] and [`open_log_store`]), and every
//! store reads the time through one injected [`Clock`].
//!
//! - [`cache`]: the response cache. [`MemoryCacheStore`] (moka, bounded by bytes),
//!   [`DiskCacheStore`] (SQLite file, bounded by size, survives restarts), [`RedisCacheStore`]
//!   (shared, LZ4 for large entries, never blocks past its timeout) and [`TieredCache`] (memory in
//!   front of one of the others), which is what [`build_cache`] returns for a [`CacheBackend`].
//!   Failures come back as [`StoreError`], never as panics; callers treat them as misses.
//! - [`limit`]: rate limits. [`MemoryLimitStore`] (per process) and [`RedisLimitStore`] (shared,
//!   atomic Lua scripts on Redis's clock), built by [`build_limit_store`] for a [`LimitBackend`].
//!   The caller decides whether a failing limiter allows or denies.
//! - [`log`]: request logs (the audit trail). [`SqliteLogStore`] (a file under `data_dir`, the
//!   default) and [`PostgresLogStore`] (shared by replicas, schema created by aigate), opened by
//!   [`open_log_store`] for a [`LogBackend`]. A failing log store degrades logging, never the
//!   proxying. The same stores answer traffic analytics ([`LogStore::analytics`]) from rollups kept
//!   as records are written ([`log::analytics`]).

mod backends;
pub mod cache;
mod clock;
pub mod limit;
pub mod log;
mod sqlite;

pub use self::backends::{
    build_cache, build_limit_store, open, open_log_store, Backends, CacheBackend, LimitBackend, LogBackend, Stores,
    REDIS_MEMORY_TTL_CAP, REDIS_OP_TIMEOUT,
};
pub use self::cache::disk::DiskCacheStore;
pub use self::cache::memory::MemoryCacheStore;
pub use self::cache::redis::RedisCacheStore;
pub use self::cache::tiered::TieredCache;
pub use self::cache::{CacheFilter, CacheKey, CacheStore, CacheStoreStats, CachedResponse, EntryMeta};
pub use self::clock::Clock;
pub use self::limit::memory::{MemoryLimitStore, DEFAULT_LIMIT_MAX_KEYS};
pub use self::limit::redis::{RedisLimitStore, LIMIT_REDIS_OP_TIMEOUT};
pub use self::limit::{Check, Decision, LimitSpec, RateLimitStore, Reservation, Technique, MAX_SUB_WINDOWS};
pub use self::log::analytics::{
    Analytics, AnalyticsBucket, AnalyticsGroup, AnalyticsQuery, AnalyticsStats, Granularity, GroupBy,
    HOUR_ROLLUP_RETENTION_MS, MAX_ANALYTICS_BUCKETS, MINUTE_ROLLUP_RETENTION_MS,
};
pub use self::log::postgres::{PostgresLogStore, DEFAULT_LOG_TABLE};
pub use self::log::sqlite::{SqliteLogStore, LOG_SQLITE_FILE};
pub use self::log::{
    log_id_at, AtCap, LogFilter, LogPage, LogRecord, LogStore, MetaValue, Retention, DEFAULT_LIST_LIMIT,
    DELETE_CHUNK_ROWS, MAX_LIST_LIMIT, MAX_METADATA,
};

/// A store failure. Callers degrade the feature (a cache error is a miss), never the proxying.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or answered with an error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend took too long.
    #[error("store timed out")]
    Timeout,
    /// Stored data could not be decoded.
    #[error("corrupt entry: {0}")]
    Corrupt(String),
    /// Bad input to a query (a malformed cursor, an invalid filter or analytics query, a feedback
    /// other than -1/+1): the caller's mistake, which API layers answer with 400. The message
    /// starts with `invalid`.
    #[error("{0}")]
    InvalidInput(String),
    /// Local I/O (disk full, permissions).
    #[error("store I/O error: {0}")]
    Io(String),
}
