//! aigate-store: the store traits of aigate and their implementations.
//!
//! One trait per domain, held as `Arc<dyn _>` and chosen from configuration in one place
//! ([`build_cache`]): memory / embedded implementations are the default, Redis (and later
//! PostgreSQL) implementations share state between replicas. Every implementation of a trait passes
//! the same conformance suite (`tests/`).
//!
//! Response cache: [`MemoryCacheStore`] (moka, bounded by bytes), [`DiskCacheStore`] (SQLite file,
//! bounded by size, survives restarts), [`RedisCacheStore`] (shared, LZ4 for large entries, never
//! blocks past its timeout) and [`TieredCache`] (memory in front of one of the others), which is what
//! [`build_cache`] returns for a [`CacheBackend`]. Failures come back as [`StoreError`], never as
//! panics; callers treat them as misses.
//!
//! Request logs (the audit trail): [`LogStore`], with [`SqliteLogStore`] (a file under `data_dir`,
//! the default) and [`PostgresLogStore`] (shared by replicas, schema created and migrated by aigate),
//! chosen by [`build_log_store`] from a [`LogBackend`]. A failing log store degrades logging, never
//! the proxying. The same stores answer traffic analytics ([`LogStore::analytics`]) from rollups
//! kept as records are written ([`log::analytics`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod cache;
pub mod limit;
pub mod log;
mod sqlite;

pub use self::cache::disk::DiskCacheStore;
pub use self::cache::memory::MemoryCacheStore;
pub use self::cache::redis::RedisCacheStore;
pub use self::cache::tiered::TieredCache;
pub use self::cache::{CacheKey, CacheStore, CacheStoreStats, CachedResponse};
pub use self::limit::memory::{LimitClock, MemoryLimitStore, DEFAULT_LIMIT_MAX_KEYS};
pub use self::limit::redis::{RedisLimitStore, LIMIT_REDIS_OP_TIMEOUT};
pub use self::limit::{Decision, LimitSpec, RateLimitStore, Reservation, Technique, MAX_SUB_WINDOWS};
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

/// TTL cap of the memory tier in front of Redis: how long a replica may serve an entry purged
/// elsewhere.
pub const REDIS_MEMORY_TTL_CAP: Duration = Duration::from_secs(10);

/// Per-command timeout of the Redis cache store built by [`build_cache`].
pub const REDIS_OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Where cached responses are kept beyond the in-process memory tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheBackend {
    /// Memory only (per process, lost on restart).
    Memory,
    /// A SQLite file `dir/cache.sqlite3` holding at most `max_bytes`, behind the memory tier.
    Disk {
        /// Directory of the database file (created if missing).
        dir: PathBuf,
        /// Byte cap of the file's rows.
        max_bytes: u64,
    },
    /// A Redis server shared by replicas, behind a memory tier whose entries live at most
    /// [`REDIS_MEMORY_TTL_CAP`].
    Redis {
        /// `redis://` or `rediss://` URL.
        url: String,
    },
}

impl CacheBackend {
    /// Parses a backend spec: `memory`, `disk` (a database under `data_dir` capped at `disk_bytes`)
    /// or a `redis://` / `rediss://` URL.
    pub fn parse(spec: &str, data_dir: &Path, disk_bytes: u64) -> Result<CacheBackend, String> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("memory") {
            Ok(CacheBackend::Memory)
        } else if spec.eq_ignore_ascii_case("disk") {
            Ok(CacheBackend::Disk { dir: data_dir.to_path_buf(), max_bytes: disk_bytes })
        } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
            Ok(CacheBackend::Redis { url: spec.to_owned() })
        } else {
            Err(format!("unknown cache backend {spec:?}: expected \"memory\", \"disk\" or a redis:// or rediss:// URL"))
        }
    }
}

/// Builds the cache for `backend` with a memory tier of `memory_bytes`: the one place a backend is
/// chosen. Opens the disk database (blocking) but never connects to Redis, so it succeeds while
/// Redis is down; fails on an unusable directory or a malformed Redis URL.
pub fn build_cache(backend: &CacheBackend, memory_bytes: u64) -> Result<TieredCache, StoreError> {
    let memory = MemoryCacheStore::new(memory_bytes);
    Ok(match backend {
        CacheBackend::Memory => TieredCache::new(memory, None),
        CacheBackend::Disk { dir, max_bytes } => {
            let disk: Arc<dyn CacheStore> = Arc::new(DiskCacheStore::open(dir, *max_bytes)?);
            TieredCache::new(memory, Some(disk))
        }
        CacheBackend::Redis { url } => {
            let redis: Arc<dyn CacheStore> = Arc::new(RedisCacheStore::new(url, REDIS_OP_TIMEOUT)?);
            TieredCache::new(memory.with_ttl_cap(REDIS_MEMORY_TTL_CAP), Some(redis))
        }
    })
}

/// Builds the rate-limit store for a backend spec: `memory` (per process, at most
/// [`DEFAULT_LIMIT_MAX_KEYS`] keys) or a `redis://` / `rediss://` URL (shared by replicas, each
/// operation bounded by [`LIMIT_REDIS_OP_TIMEOUT`]): the one place a backend is chosen. Never connects
/// to Redis, so it succeeds while Redis is down; fails on an unknown spec or a malformed URL.
pub fn build_limit_store(spec: &str) -> Result<Arc<dyn RateLimitStore>, String> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("memory") {
        Ok(Arc::new(MemoryLimitStore::new(DEFAULT_LIMIT_MAX_KEYS)))
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        let store = RedisLimitStore::new(spec, LIMIT_REDIS_OP_TIMEOUT).map_err(|e| e.to_string())?;
        Ok(Arc::new(store))
    } else {
        Err(format!("unknown rate-limit backend {spec:?}: expected \"memory\" or a redis:// or rediss:// URL"))
    }
}

/// Where request logs are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogBackend {
    /// A SQLite file (embedded, per process).
    Sqlite {
        /// The database file (its directory is created if missing).
        path: PathBuf,
    },
    /// A PostgreSQL database shared by replicas (table [`DEFAULT_LOG_TABLE`]).
    Postgres {
        /// `postgres://` or `postgresql://` URL.
        url: String,
    },
}

impl LogBackend {
    /// Parses a backend spec: `sqlite` (the file [`LOG_SQLITE_FILE`] under `data_dir`) or a
    /// `postgres://` / `postgresql://` URL.
    pub fn parse(spec: &str, data_dir: &Path) -> Result<LogBackend, String> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("sqlite") {
            Ok(LogBackend::Sqlite { path: data_dir.join(LOG_SQLITE_FILE) })
        } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            Ok(LogBackend::Postgres { url: spec.to_owned() })
        } else {
            Err(format!("unknown log backend {spec:?}: expected \"sqlite\" or a postgres:// or postgresql:// URL"))
        }
    }
}

/// Builds the log store for `backend`: the one place a backend is chosen. Opens the SQLite file (on
/// the blocking pool); for PostgreSQL, tries to create or migrate the schema but still returns the
/// store when the server is unreachable (a warning is logged; the store migrates on first use).
/// Fails on an unusable file or directory, or a malformed PostgreSQL URL.
pub async fn build_log_store(backend: &LogBackend) -> Result<Arc<dyn LogStore>, StoreError> {
    match backend {
        LogBackend::Sqlite { path } => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteLogStore::open(&path))
                .await
                .map_err(|e| StoreError::Unavailable(format!("log store open task failed: {e}")))??;
            Ok(Arc::new(store))
        }
        LogBackend::Postgres { url } => {
            let store = PostgresLogStore::connect(url)?;
            if let Err(e) = store.ensure_schema().await {
                tracing::warn!(error = %e, "log store: PostgreSQL schema not ready yet, will retry on first use");
            }
            Ok(Arc::new(store))
        }
    }
}

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
    /// Local I/O (disk full, permissions).
    #[error("store I/O error: {0}")]
    Io(String),
}
