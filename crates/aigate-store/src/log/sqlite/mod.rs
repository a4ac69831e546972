//! Embedded request-log store: one SQLite file (by default `<data_dir>/logs.sqlite3`) and the body
//! segment files beside it.
//!
//! Where things are:
//! - `schema`: the tables and their SQL, the version check at open and the conversion of an older
//!   file.
//! - `keys`: the integer row key `k` = gateway number | millisecond | slot, and where a record goes
//!   when its id names no free slot.
//! - `parts`: each gateway's rows split into time partitions (tables `logs_p{seq}`).
//! - `write`: inserting a batch, the row counts, the rollup upserts.
//! - `read`: listing and looking up records, decoding rows, analytics queries.
//! - `retention`: trimming to the cap, expiring by age, deleting on request, releasing bodies.
//!
//! Design: a partition is a rowid table keyed by one integer `k` that sorts as
//! `(gateway, created_at_ms, id)` does, so an insert appends to a b-tree of integer keys (no record
//! is decoded to compare keys), and the keys are the listing order, the cursor and the retention
//! order. The gateway makes every id a UUIDv7 holding the record's time and, in `rand_a`, a counter
//! ([`crate::log::log_id_at`]) that names the slot: a lookup by id is a key lookup, and there is no
//! index of ids. A record is its `(created_at_ms, id)`: inserting one already stored is a no-op. A
//! partial index `(gateway, event_id, created_at_ms, id)` serves event lookups. The bodies are in
//! segment files ([`crate::log::bodies`]: written once instead of twice through the WAL), the row
//! holding where. Each gateway's row count (`log_counts`) and its analytics rollups (`log_rollups`,
//! [`crate::log::analytics`]) are kept in the transaction of every insert and delete, so the
//! retention check of a batch never counts rows. Retention drops whole partitions where it can. The
//! database runs in WAL mode with `synchronous=NORMAL` (a crash may lose the last batches, never
//! corrupt the file) and `auto_vacuum=INCREMENTAL` (free space beyond 64 MiB, kept for reuse, is
//! given back to the file system after deletes).
//!
//! Bounds: as [`crate::log`]; one statement per record inside one transaction per batch, plus one
//! upsert per rollup row the batch touches (grains × dimensions × buckets, not records). At most
//! 512 gateways hold records in one file, and at most 4096 records of one gateway share a
//! millisecond (beyond either, an insert fails with [`StoreError::Unavailable`]).
//!
//! Failure behaviour: every SQLite call runs on Tokio's blocking pool behind one mutex, never on the
//! async runtime; writes take the write lock up front (`BEGIN IMMEDIATE`) and wait up to 5 s for
//! it. Storage errors (disk full, read-only, I/O) are returned as [`StoreError::Io`], other
//! database errors as [`StoreError::Unavailable`], an undecodable row as [`StoreError::Corrupt`];
//! nothing panics. A failed batch is rolled back whole. A version-7 file is converted at open, in one
//! transaction; a file of another schema version is refused at open, unchanged, with a message
//! saying what to do. A file should be used by one process at a
//! time (the counts are transactional, so a second one stays correct, only slower).

mod keys;
mod parts;
mod read;
mod retention;
mod schema;
#[cfg(test)]
mod testing;
mod write;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::functions::FunctionFlags;
use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{Connection, ToSql, Transaction, TransactionBehavior};

use self::keys::load_placed;
use self::parts::PartPolicy;
use self::schema::{check_version, create_schema_sql, migrate, MIGRATED_VERSION, PAGE_SIZE};
use self::write::{count_rows, upsert_rollups};
use crate::log::analytics::{aggregate, merge_hist_json, plan, HIST_MERGE_FN};
use crate::log::bodies::BodyFiles;
use crate::log::{check_patch, filter_sql, to_i64, Dialect, Retention, Retentions, SqlValue, DELETE_CHUNK_ROWS};
use crate::{
    Analytics, AnalyticsQuery, Clock, LogFilter, LogPage, LogRecord, LogStore, StoreError, HOUR_ROLLUP_RETENTION_MS,
    MINUTE_ROLLUP_RETENTION_MS,
};

/// File name of the database inside the data directory ([`crate::LogBackend::parse`]).
pub const LOG_SQLITE_FILE: &str = "logs.sqlite3";

/// Rows deleted before the file is asked to give pages back.
const VACUUM_AFTER_ROWS: u64 = 1_000;

/// Maps a SQLite error (see [`crate::sqlite::map_err`]).
fn sql_err(e: rusqlite::Error) -> StoreError {
    crate::sqlite::map_err("log store", e)
}

impl ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            SqlValue::Int(v) => ToSqlOutput::Owned(Value::Integer(*v)),
            SqlValue::Real(v) => ToSqlOutput::Owned(Value::Real(*v)),
            SqlValue::Text(v) => v.to_sql()?,
            SqlValue::Bool(v) => ToSqlOutput::Owned(Value::Integer(i64::from(*v))),
            SqlValue::Json(v) => ToSqlOutput::Owned(Value::Text(v.to_string())),
        })
    }
}

/// The connection and the body segment files, used under one lock.
struct Db {
    conn: Connection,
    bodies: BodyFiles,
}

/// State shared by the clones of one store.
struct Shared {
    db: Mutex<Db>,
    path: PathBuf,
    retention: Retentions,
    /// The milliseconds (their first key) holding a row not at the slot its id names (table
    /// `log_placed`): a record made by the gateway goes to its own slot directly only in another
    /// millisecond, where keys sort as ids do without looking. Normally empty: ids the gateway makes
    /// never meet on a slot (at most 4096 a millisecond); ids made elsewhere add to it.
    placed: Mutex<BTreeSet<i64>>,
    /// How the gateways' rows are split into partitions.
    policy: PartPolicy,
}

/// The embedded request-log store in a SQLite file. Cloning shares the database handle.
#[derive(Clone)]
pub struct SqliteLogStore {
    inner: Arc<Shared>,
    /// Where the retention cutoffs (`max_age_ms`, rollup pruning) are measured from.
    clock: Clock,
}

impl std::fmt::Debug for SqliteLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLogStore").field("path", &self.inner.path).finish()
    }
}

impl SqliteLogStore {
    /// Opens (creating the parent directory, the file and the schema if needed) the store at `path`.
    /// Blocking: call it at startup or on the blocking pool.
    pub fn open(path: &Path) -> Result<SqliteLogStore, StoreError> {
        SqliteLogStore::open_with(path, PartPolicy::DEFAULT)
    }

    /// [`SqliteLogStore::open`] with partitions of a fixed `rows` and an exact cap: the store
    /// conformance suite runs on many partitions with it. Not for production use.
    #[doc(hidden)]
    pub fn open_with_partition_rows(path: &Path, rows: u64) -> Result<SqliteLogStore, StoreError> {
        SqliteLogStore::open_with(path, PartPolicy { min_rows: 0, fixed: Some(rows) })
    }

    fn open_with(path: &Path, policy: PartPolicy) -> Result<SqliteLogStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Io(format!("create log directory {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path).map_err(sql_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql_err)?;
        // A batch uses about a dozen statements, a gateway's partitions a few each.
        conn.set_prepared_statement_cache_capacity(64);
        conn.create_scalar_function(
            HIST_MERGE_FN,
            2,
            FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
            |ctx| {
                let (a, b) = (ctx.get_raw(0).as_str()?, ctx.get_raw(1).as_str()?);
                merge_hist_json(a, b).map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))
            },
        )
        .map_err(sql_err)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(sql_err)?;
        check_version(path, version, tables)?;
        // page_size and auto_vacuum only take effect before the first table is created.
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE_SIZE};
             PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;"
        ))
        .map_err(sql_err)?;
        if version == 0 {
            // A new file. Under the write lock, and idempotent: two processes creating the file at
            // once create the schema once.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            tx.execute_batch(&create_schema_sql()).map_err(sql_err)?;
            tx.commit().map_err(sql_err)?;
        } else if version == MIGRATED_VERSION {
            migrate(&mut conn)?;
        }
        // Segments no row points into (the last one written before a restart can be one) go.
        conn.execute("DELETE FROM body_segments WHERE live <= 0", []).map_err(sql_err)?;
        let live = {
            let mut st = conn.prepare("SELECT seg FROM body_segments").map_err(sql_err)?;
            let segs = st.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
            segs.collect::<Result<Vec<i64>, _>>().map_err(sql_err)?
        };
        let bodies = BodyFiles::open(BodyFiles::dir_for(path), &live)?;
        let placed = load_placed(&conn)?;
        Ok(SqliteLogStore {
            inner: Arc::new(Shared {
                db: Mutex::new(Db { conn, bodies }),
                path: path.to_path_buf(),
                retention: Retentions::default(),
                placed: Mutex::new(placed),
                policy,
            }),
            clock: Clock::system(),
        })
    }

    /// The same store on `clock` instead of the system clock.
    pub fn with_clock(self, clock: Clock) -> SqliteLogStore {
        SqliteLogStore { clock, ..self }
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Deletes the gateway's expired rollup rows, [`DELETE_CHUNK_ROWS`] per transaction.
    async fn prune_rollups(&self, gateway: &str) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let minute_cutoff = to_i64(now.saturating_sub(MINUTE_ROLLUP_RETENTION_MS));
        let hour_cutoff = to_i64(now.saturating_sub(HOUR_ROLLUP_RETENTION_MS));
        let cutoffs = (minute_cutoff, hour_cutoff);
        loop {
            let gateway = gateway.to_owned();
            let d = self.write(move |tx, _| retention::prune_rollups(tx, &gateway, cutoffs).map(|d| (d, d))).await?;
            if d < DELETE_CHUNK_ROWS {
                return Ok(());
            }
        }
    }

    /// Runs `f` with the connection and the body files on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves the connection usable (SQLite rolls back).
            let mut db = shared.db.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut db)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("log store task failed: {e}")))?
    }

    /// Runs `f`, which only reads, in one read transaction: it reads one state of the file, which
    /// another process cannot change between `f`'s reading of `log_parts` and of a partition.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |db| {
            db.conn.execute_batch("BEGIN").map_err(sql_err)?;
            let out = f(db);
            // Nothing was written: ending the transaction either way loses nothing.
            if db.conn.execute_batch("COMMIT").is_err() {
                let _ = db.conn.execute_batch("ROLLBACK");
            }
            out
        })
        .await
    }

    /// Runs `f` in a write transaction, committed when it returns `Ok((value, rows_deleted))`;
    /// removes the body segments the transaction left unused once committed, and gives pages back
    /// to the file system after large deletes.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut BodyFiles) -> Result<(T, u64), StoreError> + Send + 'static,
    {
        self.run(move |db| {
            let Db { conn, bodies } = db;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            let (value, deleted) = match f(&tx, bodies) {
                Ok(v) => v,
                Err(e) => {
                    bodies.dead.clear();
                    return Err(e);
                }
            };
            let committed = tx.commit().map_err(sql_err);
            let dead = std::mem::take(&mut bodies.dead);
            committed?;
            bodies.remove(&dead);
            if deleted >= VACUUM_AFTER_ROWS {
                // Best effort.
                let _ = crate::sqlite::give_back_free_pages(conn, crate::sqlite::KEEP_FREE_BYTES);
            }
            Ok(value)
        })
        .await
    }
}

#[async_trait::async_trait]
impl LogStore for SqliteLogStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn insert_batch(&self, gateway: &str, records: &[LogRecord]) -> Result<u64, StoreError> {
        self.insert_shared(gateway, Arc::new(records.to_vec())).await
    }

    async fn insert_shared(&self, gateway: &str, records: Arc<Vec<LogRecord>>) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let retention = self.inner.retention.get(gateway);
        let gateway = gateway.to_owned();
        let (shared, now) = (self.inner.clone(), self.clock.now_ms());
        self.write(move |tx, bodies| write::insert_batch(tx, bodies, &shared, &gateway, &records, retention, now)).await
    }

    async fn add_to_rollups(&self, gateway: &str, records: &[LogRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = aggregate(records);
        let gateway = gateway.to_owned();
        self.write(move |tx, _| Ok((upsert_rollups(tx, &gateway, &rows)?, 0))).await
    }

    async fn analytics(&self, gateway: &str, q: &AnalyticsQuery) -> Result<Analytics, StoreError> {
        let p = plan(q)?;
        let (gateway, q) = (gateway.to_owned(), q.clone());
        self.run(move |db| read::analytics(&db.conn, &gateway, &q, &p)).await
    }

    async fn list(&self, gateway: &str, filter: &LogFilter) -> Result<LogPage, StoreError> {
        // The filter is checked first (an invalid one is an error for a gateway without rows too).
        let q = read::ListQuery::new(gateway, filter)?;
        self.read(move |db| read::list(&db.conn, q)).await
    }

    async fn get(&self, gateway: &str, id: &str) -> Result<Option<LogRecord>, StoreError> {
        let (gateway, id) = (gateway.to_owned(), id.to_owned());
        self.read(move |db| read::get(&db.conn, &db.bodies, &gateway, &id)).await
    }

    async fn delete(&self, gateway: &str, filter: &LogFilter) -> Result<u64, StoreError> {
        let w = Arc::new(filter_sql(Dialect::Sqlite, gateway, filter, false)?);
        let (from_ms, to_ms) = (filter.from_ms, filter.to_ms);
        let mut total = 0;
        loop {
            let (w, gateway) = (w.clone(), gateway.to_owned());
            let d = self
                .write(move |tx, bodies| {
                    retention::delete_chunk(tx, bodies, &gateway, &w, (from_ms, to_ms)).map(|d| (d, d))
                })
                .await?;
            total += d;
            if d < DELETE_CHUNK_ROWS {
                return Ok(total);
            }
        }
    }

    async fn patch(
        &self,
        gateway: &str,
        id: &str,
        feedback: Option<i8>,
        score: Option<f64>,
    ) -> Result<bool, StoreError> {
        check_patch(feedback, score)?;
        let (gateway, id) = (gateway.to_owned(), id.to_owned());
        self.write(move |tx, _| write::patch(tx, &gateway, &id, feedback, score).map(|found| (found, 0))).await
    }

    async fn count(&self, gateway: &str) -> Result<u64, StoreError> {
        let gateway = gateway.to_owned();
        self.run(move |db| count_rows(&db.conn, &gateway)).await
    }

    fn set_retention(&self, gateway: &str, retention: Retention) {
        self.inner.retention.set(gateway, retention);
    }

    fn retention(&self, gateway: &str) -> Option<Retention> {
        self.inner.retention.get(gateway)
    }

    async fn enforce_retention(&self, gateway: &str) -> Result<u64, StoreError> {
        self.prune_rollups(gateway).await?;
        let Some(r) = self.inner.retention.get(gateway) else { return Ok(0) };
        let cutoff = r.max_age_ms.map(|age| self.clock.now_ms().saturating_sub(age));
        let policy = self.inner.policy;
        let mut total = 0;
        loop {
            let gateway = gateway.to_owned();
            let d = self
                .write(move |tx, bodies| {
                    retention::enforce_step(tx, bodies, policy, &gateway, &r, cutoff).map(|d| (d, d))
                })
                .await?;
            total += d;
            if d < DELETE_CHUNK_ROWS {
                break;
            }
        }
        // Placed-row notes of milliseconds before the gateway's oldest row go.
        let (gateway, shared) = (gateway.to_owned(), self.inner.clone());
        self.write(move |tx, _| keys::forget_placed(tx, &gateway, &shared.placed).map(|()| ((), 0))).await?;
        Ok(total)
    }
}
