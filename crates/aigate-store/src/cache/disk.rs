//! Embedded response cache: one SQLite file, `<dir>/cache.sqlite3`, that survives restarts.
//!
//! Layout: a single table `cache(key BLOB PRIMARY KEY, ns TEXT, expires_at INTEGER, size INTEGER,
//! value BLOB)` holding [`CachedResponse::encode`]'s output, with indexes on `expires_at` (expiry
//! sweeps and eviction order) and `ns` (purging one gateway). The database runs in WAL mode with
//! `synchronous=NORMAL` (a crash may lose the last few puts, never corrupt the file) and
//! `auto_vacuum=INCREMENTAL` so space freed by sweeps is given back to the file system.
//!
//! Bounds: the logical size of the rows (encoded value + key + namespace + a fixed row overhead) is
//! kept at or under `max_bytes`. When a put goes over, expired rows are deleted first, then the rows
//! expiring soonest, until the total fits (those count as evictions). An entry larger than the whole
//! cap is not stored. Expired rows (on the store's clock, [`DiskCacheStore::with_clock`], the system
//! clock by default) are never returned and are swept every
//! [`RECLAIM_EVERY_PUTS`] puts, at open, and on [`DiskCacheStore::reclaim_expired`]. The SQLite file
//! itself is larger than the logical size by page overhead and the WAL.
//!
//! Failure behaviour: every SQLite call runs on Tokio's blocking pool behind one mutex, never on
//! the async runtime. Every SQLite error (disk full, read-only or unwritable file, I/O errors) is
//! returned as [`StoreError::Io`], other database errors as [`StoreError::Unavailable`], an
//! undecodable row as [`StoreError::Corrupt`] (and the row is deleted); nothing panics. A file must
//! be used by one store (one process) at a time: the byte total is tracked in memory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::{CacheFilter, CacheKey, CacheStore, CacheStoreStats, CachedResponse, Clock, EntryMeta, StoreError};

/// File name of the database inside the directory given to [`DiskCacheStore::open`].
pub const DISK_CACHE_FILE: &str = "cache.sqlite3";

/// Expired rows are swept once every this many puts.
pub const RECLAIM_EVERY_PUTS: u64 = 512;

/// Fixed per-row overhead added to the logical size of a row (key, integers, row header).
const ROW_OVERHEAD: u64 = 32 + 32;

/// Rows examined per eviction round.
const EVICT_BATCH: i64 = 256;

/// Maps a SQLite error (see [`crate::sqlite::map_err`]).
fn sql_err(e: rusqlite::Error) -> StoreError {
    crate::sqlite::map_err("disk cache", e)
}

/// Unix ms as a SQLite integer (saturating).
fn to_sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// State shared by the clones of one store.
struct Shared {
    conn: Mutex<Connection>,
    path: PathBuf,
    max_bytes: u64,
    /// Logical bytes held (sum of `size`), written only under `conn`'s lock.
    bytes: AtomicU64,
    /// Rows held, written only under `conn`'s lock.
    entries: AtomicU64,
    /// Rows evicted for size since open.
    evictions: AtomicU64,
    /// Puts since open, for the periodic expiry sweep.
    puts: AtomicU64,
}

/// An embedded, size-bounded cache store in a SQLite file. Cloning shares the database handle.
#[derive(Clone)]
pub struct DiskCacheStore {
    inner: Arc<Shared>,
    /// When entries expire.
    clock: Clock,
}

impl std::fmt::Debug for DiskCacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCacheStore")
            .field("path", &self.inner.path)
            .field("max_bytes", &self.inner.max_bytes)
            .field("stats", &self.stats_sync())
            .finish()
    }
}

impl DiskCacheStore {
    /// Opens (creating `dir` and the database if needed) the store in `dir`, holding at most
    /// `max_bytes` of rows. Sweeps expired rows. Blocking: call it at startup, not on a hot path.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<DiskCacheStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("create cache directory {}: {e}", dir.display())))?;
        let path = dir.join(DISK_CACHE_FILE);
        let mut conn = Connection::open(&path).map_err(sql_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql_err)?;
        // auto_vacuum only takes effect before the first table is created.
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS cache (
                 key BLOB PRIMARY KEY NOT NULL,
                 ns TEXT NOT NULL,
                 expires_at INTEGER NOT NULL,
                 size INTEGER NOT NULL,
                 value BLOB NOT NULL
             );
             CREATE INDEX IF NOT EXISTS cache_expires_at ON cache(expires_at);
             CREATE INDEX IF NOT EXISTS cache_ns ON cache(ns);",
        )
        .map_err(sql_err)?;
        add_meta_columns(&conn)?;
        let tx = conn.transaction().map_err(sql_err)?;
        delete_expired(&tx, Clock::system().now_ms())?;
        let (entries, bytes): (i64, i64) = tx
            .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM cache", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        let _ = crate::sqlite::give_back_free_pages(&conn, crate::sqlite::KEEP_FREE_BYTES);
        Ok(DiskCacheStore {
            inner: Arc::new(Shared {
                conn: Mutex::new(conn),
                path,
                max_bytes,
                bytes: AtomicU64::new(u64::try_from(bytes).unwrap_or(0)),
                entries: AtomicU64::new(u64::try_from(entries).unwrap_or(0)),
                evictions: AtomicU64::new(0),
                puts: AtomicU64::new(0),
            }),
            clock: Clock::system(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The byte cap given at open.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// The same store on `clock` instead of the system clock (the sweep at open used the system
    /// clock).
    pub fn with_clock(self, clock: Clock) -> DiskCacheStore {
        DiskCacheStore { clock, ..self }
    }

    /// Deletes every expired row now; returns how many were deleted.
    pub async fn reclaim_expired(&self) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        self.run(move |shared, conn| {
            let tx = conn.transaction().map_err(sql_err)?;
            let (n, bytes) = delete_expired(&tx, now)?;
            tx.commit().map_err(sql_err)?;
            shared.sub(n, bytes);
            if n > 0 {
                // Best effort: give freed pages back to the file system.
                let _ = crate::sqlite::give_back_free_pages(conn, crate::sqlite::KEEP_FREE_BYTES);
            }
            Ok(n)
        })
        .await
    }

    /// Size figures, without touching the database.
    pub fn stats_sync(&self) -> CacheStoreStats {
        CacheStoreStats {
            entries: self.inner.entries.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared, &mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves the connection usable (SQLite rolls back).
            let mut conn = shared.conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&shared, &mut conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("disk cache task failed: {e}")))?
    }
}

impl Shared {
    fn sub(&self, rows: u64, bytes: u64) {
        let _ = self.entries.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(rows)));
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }
}

/// Adds the columns a filtered purge reads (`created_at`, `meta`: [`EntryMeta`] as JSON) to a
/// file written before they existed; its rows keep `created_at = 0` and no meta.
fn add_meta_columns(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('cache')").map_err(sql_err)?;
    let cols: Vec<String> =
        stmt.query_map([], |r| r.get(0)).map_err(sql_err)?.collect::<Result<_, _>>().map_err(sql_err)?;
    if !cols.iter().any(|c| c == "created_at") {
        conn.execute_batch("ALTER TABLE cache ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0").map_err(sql_err)?;
    }
    if !cols.iter().any(|c| c == "meta") {
        conn.execute_batch("ALTER TABLE cache ADD COLUMN meta TEXT").map_err(sql_err)?;
    }
    Ok(())
}

/// Deletes rows expired at `now`; returns (rows, bytes) deleted.
fn delete_expired(tx: &Transaction<'_>, now: u64) -> Result<(u64, u64), StoreError> {
    let now = to_sql_ms(now);
    let (n, bytes): (i64, i64) = tx
        .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM cache WHERE expires_at <= ?1", [now], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(sql_err)?;
    if n > 0 {
        tx.execute("DELETE FROM cache WHERE expires_at <= ?1", [now]).map_err(sql_err)?;
    }
    Ok((u64::try_from(n).unwrap_or(0), u64::try_from(bytes).unwrap_or(0)))
}

/// Deletes the row under `key`; returns its size if there was one.
fn delete_key(tx: &Transaction<'_>, key: &CacheKey) -> Result<Option<u64>, StoreError> {
    let size: Option<i64> = tx
        .query_row("SELECT size FROM cache WHERE key = ?1", [&key.0[..]], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    if size.is_some() {
        tx.execute("DELETE FROM cache WHERE key = ?1", [&key.0[..]]).map_err(sql_err)?;
    }
    Ok(size.map(|s| u64::try_from(s).unwrap_or(0)))
}

#[async_trait::async_trait]
impl CacheStore for DiskCacheStore {
    fn kind(&self) -> &'static str {
        "disk"
    }

    async fn get(&self, _ns: &str, key: &CacheKey) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        let key = *key;
        let now = self.clock.now_ms();
        self.run(move |shared, conn| {
            let value: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT value FROM cache WHERE key = ?1 AND expires_at > ?2",
                    params![&key.0[..], to_sql_ms(now)],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql_err)?;
            let Some(value) = value else { return Ok(None) };
            match CachedResponse::decode(Bytes::from(value)) {
                Ok(entry) => Ok(Some(Arc::new(entry))),
                Err(e) => {
                    // Drop the bad row so it does not fail every lookup.
                    let tx = conn.transaction().map_err(sql_err)?;
                    if let Some(size) = delete_key(&tx, &key)? {
                        tx.commit().map_err(sql_err)?;
                        shared.sub(1, size);
                    }
                    Err(e)
                }
            }
        })
        .await
    }

    async fn put(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>) -> Result<(), StoreError> {
        self.put_row(ns, key, entry, None).await
    }

    async fn put_with_meta(
        &self,
        ns: &str,
        key: &CacheKey,
        entry: Arc<CachedResponse>,
        meta: &EntryMeta,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(meta).map_err(|e| StoreError::Corrupt(format!("entry meta: {e}")))?;
        self.put_row(ns, key, entry, Some(json)).await
    }

    async fn purge_matching(&self, ns: &str, filter: &CacheFilter) -> Result<Vec<CacheKey>, StoreError> {
        let ns = ns.to_owned();
        let filter = filter.clone();
        self.run(move |shared, conn| {
            let tx = conn.transaction().map_err(sql_err)?;
            let mut victims: Vec<(CacheKey, u64)> = Vec::new();
            {
                let mut stmt = tx
                    .prepare_cached("SELECT key, created_at, meta, size FROM cache WHERE ns = ?1")
                    .map_err(sql_err)?;
                let mut rows = stmt.query([&ns]).map_err(sql_err)?;
                while let Some(r) = rows.next().map_err(sql_err)? {
                    let key: Vec<u8> = r.get(0).map_err(sql_err)?;
                    let created: i64 = r.get(1).map_err(sql_err)?;
                    let meta: Option<String> = r.get(2).map_err(sql_err)?;
                    let size: i64 = r.get(3).map_err(sql_err)?;
                    let meta = meta.and_then(|m| serde_json::from_str::<EntryMeta>(&m).ok());
                    let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) else { continue };
                    if filter.matches(meta.as_ref(), u64::try_from(created).unwrap_or(0)) {
                        victims.push((CacheKey(key), u64::try_from(size).unwrap_or(0)));
                    }
                }
            }
            let mut bytes = 0;
            {
                let mut del = tx.prepare_cached("DELETE FROM cache WHERE key = ?1").map_err(sql_err)?;
                for (k, size) in &victims {
                    del.execute([&k.0[..]]).map_err(sql_err)?;
                    bytes += size;
                }
            }
            tx.commit().map_err(sql_err)?;
            shared.sub(victims.len() as u64, bytes);
            Ok(victims.into_iter().map(|(k, _)| k).collect())
        })
        .await
    }

    async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        let key = key.copied();
        let ns = ns.to_owned();
        self.run(move |shared, conn| {
            let tx = conn.transaction().map_err(sql_err)?;
            let (n, bytes) = match key {
                Some(k) => match delete_key(&tx, &k)? {
                    Some(size) => (1, size),
                    None => (0, 0),
                },
                None => {
                    let (n, bytes): (i64, i64) = tx
                        .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM cache WHERE ns = ?1", [&ns], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .map_err(sql_err)?;
                    tx.execute("DELETE FROM cache WHERE ns = ?1", [&ns]).map_err(sql_err)?;
                    (u64::try_from(n).unwrap_or(0), u64::try_from(bytes).unwrap_or(0))
                }
            };
            tx.commit().map_err(sql_err)?;
            shared.sub(n, bytes);
            Ok(n)
        })
        .await
    }

    fn stats(&self) -> CacheStoreStats {
        self.stats_sync()
    }
}

impl DiskCacheStore {
    /// Stores a row, with its meta (JSON) if given.
    async fn put_row(
        &self,
        ns: &str,
        key: &CacheKey,
        entry: Arc<CachedResponse>,
        meta: Option<String>,
    ) -> Result<(), StoreError> {
        let key = *key;
        let ns = ns.to_owned();
        let now = self.clock.now_ms();
        self.run(move |shared, conn| {
            let sweep = shared.puts.fetch_add(1, Ordering::Relaxed) % RECLAIM_EVERY_PUTS == RECLAIM_EVERY_PUTS - 1;
            let tx = conn.transaction().map_err(sql_err)?;
            let mut entries = shared.entries.load(Ordering::Relaxed);
            let mut bytes = shared.bytes.load(Ordering::Relaxed);
            if let Some(old) = delete_key(&tx, &key)? {
                entries = entries.saturating_sub(1);
                bytes = bytes.saturating_sub(old);
            }
            let mut evicted = 0u64;
            let mut swept = false;
            if sweep {
                let (n, b) = delete_expired(&tx, now)?;
                entries = entries.saturating_sub(n);
                bytes = bytes.saturating_sub(b);
                swept = n > 0;
            }
            let value = entry.encode();
            let size = value.len() as u64 + ns.len() as u64 + ROW_OVERHEAD;
            if !entry.is_expired(now) && size <= shared.max_bytes {
                tx.execute(
                    "INSERT INTO cache (key, ns, expires_at, size, value, created_at, meta) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        &key.0[..],
                        ns,
                        to_sql_ms(entry.expires_at_ms),
                        to_sql_ms(size),
                        &value[..],
                        to_sql_ms(entry.created_at_ms),
                        meta
                    ],
                )
                .map_err(sql_err)?;
                entries += 1;
                bytes += size;
                if bytes > shared.max_bytes && !sweep {
                    let (n, b) = delete_expired(&tx, now)?;
                    entries = entries.saturating_sub(n);
                    bytes = bytes.saturating_sub(b);
                    swept = n > 0;
                }
                while bytes > shared.max_bytes {
                    let victims: Vec<(Vec<u8>, i64)> = {
                        let mut stmt = tx
                            .prepare_cached(
                                "SELECT key, size FROM cache WHERE key != ?1 ORDER BY expires_at, rowid LIMIT ?2",
                            )
                            .map_err(sql_err)?;
                        let rows = stmt
                            .query_map(params![&key.0[..], EVICT_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))
                            .map_err(sql_err)?;
                        rows.collect::<Result<_, _>>().map_err(sql_err)?
                    };
                    if victims.is_empty() {
                        break;
                    }
                    let mut del = tx.prepare_cached("DELETE FROM cache WHERE key = ?1").map_err(sql_err)?;
                    for (k, s) in victims {
                        if bytes <= shared.max_bytes {
                            break;
                        }
                        del.execute([&k[..]]).map_err(sql_err)?;
                        entries = entries.saturating_sub(1);
                        bytes = bytes.saturating_sub(u64::try_from(s).unwrap_or(0));
                        evicted += 1;
                    }
                }
            } else if size > shared.max_bytes {
                tracing::debug!(size, max = shared.max_bytes, "disk cache: entry larger than the cache, not stored");
            }
            tx.commit().map_err(sql_err)?;
            shared.entries.store(entries, Ordering::Relaxed);
            shared.bytes.store(bytes, Ordering::Relaxed);
            shared.evictions.fetch_add(evicted, Ordering::Relaxed);
            if swept {
                let _ = crate::sqlite::give_back_free_pages(conn, crate::sqlite::KEEP_FREE_BYTES);
            }
            Ok(())
        })
        .await
    }
}
