//! Which implementation serves each domain, and the one place each is built.
//!
//! A backend is chosen from configuration as an enum ([`CacheBackend`], [`LimitBackend`],
//! [`LogBackend`], each with a `parse` of its config spec) and built by one factory per domain
//! ([`build_cache`], [`build_limit_store`], [`open_log_store`]); [`open`] builds all three for a
//! [`Backends`]. Every store built here reads the time through the [`Clock`] it is given.
//!
//! Failure behaviour: nothing here waits on the network. Redis and PostgreSQL stores connect on
//! first use (and reconnect by themselves), so building them succeeds while the server is down; only
//! a malformed URL fails. SQLite files (the disk cache, the log store) are opened synchronously: an
//! unusable directory or file, or a log file of another schema version, fails here. Errors are
//! [`StoreError`]s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::purge_bus::PurgeBus;
use crate::{
    CacheStore, Clock, DiskCacheStore, LogStore, MemoryCacheStore, MemoryLimitStore, PostgresLogStore, RateLimitStore,
    RedisCacheStore, RedisLimitStore, SqliteLogStore, StoreError, TieredCache, DEFAULT_LIMIT_MAX_KEYS,
    LIMIT_REDIS_OP_TIMEOUT, LOG_SQLITE_FILE,
};

/// TTL cap of the memory tier in front of Redis: how long a replica may serve an entry purged
/// elsewhere.
pub const REDIS_MEMORY_TTL_CAP: Duration = Duration::from_secs(10);

/// Per-command timeout of the Redis cache store built by [`build_cache`].
pub const REDIS_OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Whether a spec is a Redis URL.
fn is_redis_url(spec: &str) -> bool {
    spec.starts_with("redis://") || spec.starts_with("rediss://")
}

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
        } else if is_redis_url(spec) {
            Ok(CacheBackend::Redis { url: spec.to_owned() })
        } else {
            Err(format!("unknown cache backend {spec:?}: expected \"memory\", \"disk\" or a redis:// or rediss:// URL"))
        }
    }
}

/// Where rate-limit counters are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitBackend {
    /// Per process, at most [`DEFAULT_LIMIT_MAX_KEYS`] keys.
    Memory,
    /// A Redis server shared by replicas, each operation bounded by [`LIMIT_REDIS_OP_TIMEOUT`].
    Redis {
        /// `redis://` or `rediss://` URL.
        url: String,
    },
}

impl LimitBackend {
    /// Parses a backend spec: `memory` or a `redis://` / `rediss://` URL.
    pub fn parse(spec: &str) -> Result<LimitBackend, String> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("memory") {
            Ok(LimitBackend::Memory)
        } else if is_redis_url(spec) {
            Ok(LimitBackend::Redis { url: spec.to_owned() })
        } else {
            Err(format!("unknown rate-limit backend {spec:?}: expected \"memory\" or a redis:// or rediss:// URL"))
        }
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
    /// A PostgreSQL database shared by replicas (table [`crate::DEFAULT_LOG_TABLE`]).
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

/// Builds the cache for `backend` with a memory tier of `memory_bytes`, on `clock`. Opens the disk
/// database (blocking) but never connects to Redis (on Redis, inside a Tokio runtime, it starts the
/// [`PurgeBus`] subscriber, which connects in the background); fails on an unusable directory or a malformed
/// Redis URL.
pub fn build_cache(backend: &CacheBackend, memory_bytes: u64, clock: &Clock) -> Result<TieredCache, StoreError> {
    let memory = MemoryCacheStore::new(memory_bytes);
    Ok(match backend {
        CacheBackend::Memory => TieredCache::new(memory.with_clock(clock.clone()), None),
        CacheBackend::Disk { dir, max_bytes } => {
            let disk = DiskCacheStore::open(dir, *max_bytes)?.with_clock(clock.clone());
            TieredCache::new(memory.with_clock(clock.clone()), Some(Arc::new(disk) as Arc<dyn CacheStore>))
        }
        CacheBackend::Redis { url } => {
            let redis = RedisCacheStore::new(url, REDIS_OP_TIMEOUT)?.with_clock(clock.clone());
            let memory = memory.with_ttl_cap(REDIS_MEMORY_TTL_CAP).with_clock(clock.clone());
            let bus = PurgeBus::start(redis.clone(), memory.clone());
            TieredCache::new(memory, Some(Arc::new(redis) as Arc<dyn CacheStore>)).with_purge_bus(bus)
        }
    })
}

/// Builds the rate-limit store for `backend`, on `clock` (the memory store's windows; Redis counts
/// on its own clock). Never connects to Redis; fails on a malformed URL.
pub fn build_limit_store(backend: &LimitBackend, clock: &Clock) -> Result<Arc<dyn RateLimitStore>, StoreError> {
    Ok(match backend {
        LimitBackend::Memory => Arc::new(MemoryLimitStore::new(DEFAULT_LIMIT_MAX_KEYS).with_clock(clock.clone())),
        LimitBackend::Redis { url } => Arc::new(RedisLimitStore::new(url, LIMIT_REDIS_OP_TIMEOUT)?),
    })
}

/// Opens the log store for `backend`, on `clock` (retention cutoffs). SQLite opens (creating) its
/// file now, blocking: call it at startup or on the blocking pool. PostgreSQL connects and creates
/// its schema on first use, and retries after failures. Fails on an unusable file or directory, a
/// SQLite file of another schema version, or a malformed PostgreSQL URL.
pub fn open_log_store(backend: &LogBackend, clock: &Clock) -> Result<Arc<dyn LogStore>, StoreError> {
    Ok(match backend {
        LogBackend::Sqlite { path } => Arc::new(SqliteLogStore::open(path)?.with_clock(clock.clone())),
        LogBackend::Postgres { url } => Arc::new(PostgresLogStore::connect(url)?.with_clock(clock.clone())),
    })
}

/// The backend of every domain: what [`open`] builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    /// Where cached responses are kept beyond the memory tier.
    pub cache: CacheBackend,
    /// Size of the cache's in-process memory tier, bytes.
    pub cache_memory: u64,
    /// Where rate-limit counters are kept.
    pub limits: LimitBackend,
    /// Where request logs are kept.
    pub logs: LogBackend,
}

/// The stores of every domain, as [`open`] builds them.
#[derive(Clone)]
pub struct Stores {
    /// The response cache (memory tier in front of the configured backend).
    pub cache: TieredCache,
    /// The rate-limit counters.
    pub limits: Arc<dyn RateLimitStore>,
    /// The request logs.
    pub logs: Arc<dyn LogStore>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("cache", &self.cache)
            .field("limits", &self.limits.kind())
            .field("logs", &self.logs.kind())
            .finish()
    }
}

/// Builds every store for `backends`, on `clock`, without waiting on the network (see the module
/// docs): the cache ([`build_cache`]), the rate-limit store ([`build_limit_store`]) and the log
/// store ([`open_log_store`]).
pub fn open(backends: &Backends, clock: &Clock) -> Result<Stores, StoreError> {
    Ok(Stores {
        cache: build_cache(&backends.cache, backends.cache_memory, clock)?,
        limits: build_limit_store(&backends.limits, clock)?,
        logs: open_log_store(&backends.logs, clock)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_backend_parse() {
        assert_eq!(LimitBackend::parse(" Memory "), Ok(LimitBackend::Memory));
        for url in ["redis://127.0.0.1:6379", "rediss://u:p@h:6380/2"] {
            assert_eq!(LimitBackend::parse(url), Ok(LimitBackend::Redis { url: url.into() }));
        }
        for bad in ["", "disk", "sqlite", "http://h"] {
            let err = LimitBackend::parse(bad).unwrap_err();
            assert!(err.starts_with("unknown rate-limit backend"), "{err}");
        }
    }
}
