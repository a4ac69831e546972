//! Embedded request-log store: one SQLite file (by default `<data_dir>/logs.sqlite3`).
//!
//! Layout: table `logs` with one column per scalar field of [`LogRecord`], `metadata` as a JSON
//! object text (entry order kept); the bodies are in segment files beside the database
//! ([`crate::log_bodies`]: written once instead of twice through the WAL), the row holding where
//! (`body_seg`, `body_off`, `request_len`, `response_len`; rows of schema 3 and older keep theirs
//! in the BLOB columns `request_body`, `response_body`, still read). The table is keyed by
//! `(gateway, created_at_ms, id)` without a rowid (schema 5): an insert goes into that one b-tree,
//! near the end of its gateway's range, and the key is also the listing order, the cursor and the
//! retention order. There is no index of ids (it cost a third of an insert): the gateway's ids
//! are UUIDv7 holding the record's time ([`crate::log::log_id_at`]), so a lookup by id is a key
//! lookup (rows of older schemas, whose time could be a millisecond past their id's, are found
//! within [`LEGACY_ID_SKEW_MS`]; an id that is no UUIDv7, which the gateway never makes, by a scan).
//! A record is its `(created_at_ms, id)`: inserting one already stored is a no-op. One more
//! index, `(gateway, event_id, created_at_ms, id)` on rows with an event id, serves event
//! lookups. Table `log_counts(gateway, n)` holds each gateway's row count, kept in the same
//! transaction as every insert and delete, so the retention check of a batch never counts rows.
//! Table `log_rollups` holds the analytics rollups ([`crate::analytics`]), primary key
//! `(gateway, grain_ms, dim, bucket_ms, dim_value)` (a query reads one contiguous range per
//! dimension), updated by upserts in the transaction of every insert. The schema version is
//! `PRAGMA user_version`; opening a file of schema 4 or older copies its table into the schema-5
//! layout once (2.2 s for a million rows on the benchmark VM, logged). The database
//! runs in WAL mode with `synchronous=NORMAL` (a crash may lose the last batches, never corrupt the
//! file) and `auto_vacuum=INCREMENTAL` (free space beyond 64 MiB, kept for reuse, is given back to
//! the file system after deletes).
//!
//! Bounds: as [`crate::log`]; one statement per record inside one transaction per batch, plus one
//! upsert per rollup row the batch touches (grains × dimensions × buckets, not records).
//!
//! Failure behaviour: every SQLite call runs on Tokio's blocking pool behind one mutex, never on the
//! async runtime; writes take the write lock up front (`BEGIN IMMEDIATE`) and wait up to 5 s for
//! it. Storage errors (disk full, read-only, I/O) are returned as [`StoreError::Io`], other
//! database errors as [`StoreError::Unavailable`], an undecodable row as [`StoreError::Corrupt`];
//! nothing panics. A failed batch is rolled back whole. A file should be used by one process at a
//! time (the counts are transactional, so a second one stays correct, only slower).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{params, Connection, OptionalExtension, Row, ToSql, Transaction, TransactionBehavior};

use crate::analytics::{
    aggregate, assemble, plan, upsert_set_sql, Histogram, Rollup, RollupKey, RollupRow, FLOAT_COLUMNS, HOUR_MS,
    INT_COLUMNS, MINUTE_MS,
};
use crate::log::{
    check_patch, filter_sql, finite, metadata_from_object_json, metadata_object_json, to_i64, to_u64, AtCap, Dialect,
    Retention, Retentions, SqlValue, DELETE_CHUNK_ROWS, LIST_COLUMNS,
};
use crate::log_bodies::{BodyFiles, BodyRef};
use crate::memory::now_ms;
use crate::{
    Analytics, AnalyticsQuery, LogFilter, LogPage, LogRecord, LogStore, StoreError, HOUR_ROLLUP_RETENTION_MS,
    MINUTE_ROLLUP_RETENTION_MS,
};

/// File name of the database inside the data directory ([`crate::LogBackend::parse`]).
pub const LOG_SQLITE_FILE: &str = "logs.sqlite3";

/// Schema version written to `PRAGMA user_version` (3: the event-id index is partial; 4: bodies
/// in segment files; 5: the table keyed by `(gateway, created_at_ms, id)`, no index of ids).
const SCHEMA_VERSION: i64 = 5;

/// Page size of a new database file. Records are ~0.5 KB, ~1.5 KB with bodies: 32 KiB pages
/// halve the cost of an insert against SQLite's 4 KiB default (fewer pages split, written to the
/// WAL and checkpointed per record; measured with `examples/schema_exp.rs`, see
/// docs/benchmarks.md). An existing file keeps the page size it was created with.
const PAGE_SIZE: u32 = 32 * 1024;

/// Rows deleted before the file is asked to give pages back.
const VACUUM_AFTER_ROWS: u64 = 1_000;

/// Every column of `logs`, in table order.
const LOG_COLUMNS: &str = "gateway, id, event_id, created_at_ms, provider, path, requested_model, served_model, \
     status, success, cache_status, stream, duration_ms, ttfb_ms, upstream_ms, overhead_ms, tokens_in, tokens_out, \
     cached_tokens_in, reasoning_tokens, cost_usd, saved_usd, custom_cost, metadata, user_agent, error, feedback, \
     score, request_body, response_body, body_seg, body_off, request_len, response_len";

/// The `logs` table (schema 5) under the name `table`. Keyed by `(gateway, created_at_ms, id)`
/// without a rowid: a row goes into one b-tree, near the end of its gateway's range, and the key
/// is the listing order, the cursor and the retention order. There is no index of ids: the id
/// names its time ([`crate::log::log_id_at`]), so a lookup by id is a lookup by key.
/// (`request_body` and `response_body` hold the bodies of rows stored before schema 4.)
fn create_logs_sql(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (
             gateway TEXT NOT NULL,
             id TEXT NOT NULL,
             event_id TEXT,
             created_at_ms INTEGER NOT NULL,
             provider TEXT NOT NULL,
             path TEXT NOT NULL,
             requested_model TEXT,
             served_model TEXT,
             status INTEGER NOT NULL,
             success INTEGER NOT NULL,
             cache_status TEXT NOT NULL,
             stream INTEGER NOT NULL,
             duration_ms REAL NOT NULL,
             ttfb_ms REAL,
             upstream_ms REAL,
             overhead_ms REAL,
             tokens_in INTEGER,
             tokens_out INTEGER,
             cached_tokens_in INTEGER,
             reasoning_tokens INTEGER,
             cost_usd REAL,
             saved_usd REAL,
             custom_cost INTEGER NOT NULL,
             metadata TEXT,
             user_agent TEXT,
             error TEXT,
             feedback INTEGER,
             score REAL,
             request_body BLOB,
             response_body BLOB,
             body_seg INTEGER,
             body_off INTEGER,
             request_len INTEGER,
             response_len INTEGER,
             PRIMARY KEY (gateway, created_at_ms, id)
         ) WITHOUT ROWID;"
    )
}

const INSERT_SQL: &str = "INSERT INTO logs (gateway, id, event_id, created_at_ms, provider, path, requested_model, \
     served_model, status, success, cache_status, stream, duration_ms, ttfb_ms, upstream_ms, overhead_ms, tokens_in, \
     tokens_out, cached_tokens_in, reasoning_tokens, cost_usd, saved_usd, custom_cost, metadata, user_agent, error, \
     feedback, score, body_seg, body_off, request_len, response_len) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, \
     ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32) \
     ON CONFLICT (gateway, created_at_ms, id) DO NOTHING";

/// How far from its id's timestamp a row written before schema 5 may have its `created_at_ms`
/// (the gateway read the clock for each separately, microseconds apart); a lookup by id that
/// misses the exact key searches this far either side.
const LEGACY_ID_SKEW_MS: u64 = 1_000;

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
}

/// The embedded request-log store in a SQLite file. Cloning shares the database handle.
#[derive(Clone)]
pub struct SqliteLogStore {
    inner: Arc<Shared>,
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
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Io(format!("create log directory {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(sql_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql_err)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "log store {}: schema version {version} is newer than this aigate's {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let has_logs: bool = conn
            .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'logs'", [], |r| r.get(0))
            .map_err(sql_err)?;
        // Schema 4 adds where a row's bodies are to an existing table.
        let has_body_seg: bool = conn
            .query_row("SELECT count(*) FROM pragma_table_info('logs') WHERE name = 'body_seg'", [], |r| r.get(0))
            .map_err(sql_err)?;
        let migrate_4 = if has_logs && !has_body_seg {
            "ALTER TABLE logs ADD COLUMN body_seg INTEGER; ALTER TABLE logs ADD COLUMN body_off INTEGER; \
             ALTER TABLE logs ADD COLUMN request_len INTEGER; ALTER TABLE logs ADD COLUMN response_len INTEGER;"
        } else {
            ""
        };
        // Schema 5 keys the table by (gateway, created_at_ms, id) instead of a rowid plus two
        // indexes: an older table is copied into the new layout, in key order.
        let migrate_5 = if has_logs && version < 5 {
            let rows: i64 = conn.query_row("SELECT count(*) FROM logs", [], |r| r.get(0)).map_err(sql_err)?;
            tracing::info!(path = %path.display(), rows, "rebuilding the log table in the schema-5 layout (once)");
            format!(
                "{create} INSERT INTO logs_v5 ({LOG_COLUMNS}) SELECT {LOG_COLUMNS} FROM logs \
                 ORDER BY gateway, created_at_ms, id; DROP TABLE logs; ALTER TABLE logs_v5 RENAME TO logs;",
                create = create_logs_sql("logs_v5")
            )
        } else {
            String::new()
        };
        // page_size and auto_vacuum only take effect before the first table is created.
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE_SIZE};
             PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             BEGIN IMMEDIATE;
             {migrate_4}
             {migrate_5}
             {create_logs}
             -- Most requests carry no event id: a partial index costs them nothing (schema 3;
             -- schema 2 indexed every row).
             DROP INDEX IF EXISTS logs_gateway_event;
             CREATE INDEX IF NOT EXISTS logs_gateway_event_id ON logs(gateway, event_id, created_at_ms, id)
                 WHERE event_id IS NOT NULL;
             CREATE TABLE IF NOT EXISTS log_counts (
                 gateway TEXT PRIMARY KEY NOT NULL,
                 n INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS log_rollups (
                 gateway TEXT NOT NULL,
                 grain_ms INTEGER NOT NULL,
                 dim TEXT NOT NULL,
                 bucket_ms INTEGER NOT NULL,
                 dim_value TEXT NOT NULL,
                 requests INTEGER NOT NULL,
                 errors INTEGER NOT NULL,
                 cache_hits INTEGER NOT NULL,
                 shadow_hits INTEGER NOT NULL,
                 tokens_in INTEGER NOT NULL,
                 tokens_out INTEGER NOT NULL,
                 cached_tokens_in INTEGER NOT NULL,
                 reasoning_tokens INTEGER NOT NULL,
                 cost_unknown INTEGER NOT NULL,
                 cost_usd REAL NOT NULL,
                 saved_usd REAL NOT NULL,
                 shadow_saved_usd REAL NOT NULL,
                 duration_sum_ms REAL NOT NULL,
                 hist TEXT NOT NULL,
                 PRIMARY KEY (gateway, grain_ms, dim, bucket_ms, dim_value)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS body_segments (
                 seg INTEGER PRIMARY KEY NOT NULL,
                 live INTEGER NOT NULL
             );
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;",
            create_logs = create_logs_sql("logs").replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"),
        ))
        .map_err(sql_err)?;
        if !migrate_5.is_empty() {
            // Give the old table's pages back to the file system.
            crate::sqlite::give_back_free_pages(&conn, 0).map_err(sql_err)?;
            tracing::info!(path = %path.display(), "log table rebuilt");
        }
        // Segments no row points into (the last one written before a restart can be one) go.
        conn.execute("DELETE FROM body_segments WHERE live <= 0", []).map_err(sql_err)?;
        let live = {
            let mut st = conn.prepare("SELECT seg FROM body_segments").map_err(sql_err)?;
            let segs = st.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
            segs.collect::<Result<Vec<i64>, _>>().map_err(sql_err)?
        };
        let bodies = BodyFiles::open(BodyFiles::dir_for(path), &live)?;
        Ok(SqliteLogStore {
            inner: Arc::new(Shared {
                db: Mutex::new(Db { conn, bodies }),
                path: path.to_path_buf(),
                retention: Retentions::default(),
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Deletes the gateway's expired rollup rows, [`DELETE_CHUNK_ROWS`] per transaction.
    async fn prune_rollups(&self, gateway: &str) -> Result<(), StoreError> {
        let now = now_ms();
        let minute_cutoff = to_i64(now.saturating_sub(MINUTE_ROLLUP_RETENTION_MS));
        let hour_cutoff = to_i64(now.saturating_sub(HOUR_ROLLUP_RETENTION_MS));
        loop {
            let gateway = gateway.to_owned();
            let d = self
                .write(move |tx, _| {
                    let d = tx
                        .execute(
                            "DELETE FROM log_rollups WHERE (gateway, grain_ms, dim, bucket_ms, dim_value) IN \
                             (SELECT gateway, grain_ms, dim, bucket_ms, dim_value FROM log_rollups \
                             WHERE gateway = ?1 AND ((grain_ms = ?2 AND bucket_ms < ?3) OR \
                             (grain_ms = ?4 AND bucket_ms < ?5)) LIMIT ?6)",
                            params![
                                gateway,
                                to_i64(MINUTE_MS),
                                minute_cutoff,
                                to_i64(HOUR_MS),
                                hour_cutoff,
                                to_i64(DELETE_CHUNK_ROWS)
                            ],
                        )
                        .map_err(sql_err)? as u64;
                    Ok((d, d))
                })
                .await?;
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

/// The gateway's row count.
fn count_rows(tx: &Connection, gateway: &str) -> Result<u64, StoreError> {
    let n: Option<i64> = tx
        .query_row("SELECT n FROM log_counts WHERE gateway = ?1", [gateway], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    Ok(n.map_or(0, to_u64))
}

/// Stores the gateway's row count.
fn set_count(tx: &Transaction<'_>, gateway: &str, n: u64) -> Result<(), StoreError> {
    if n == 0 {
        tx.execute("DELETE FROM log_counts WHERE gateway = ?1", [gateway]).map_err(sql_err)?;
    } else {
        tx.execute(
            "INSERT INTO log_counts (gateway, n) VALUES (?1, ?2) ON CONFLICT (gateway) DO UPDATE SET n = excluded.n",
            params![gateway, to_i64(n)],
        )
        .map_err(sql_err)?;
    }
    Ok(())
}

/// What a row deletion returns: where the deleted rows' bodies were.
const RETURNING_BODIES: &str = "RETURNING body_seg, body_off, request_len, response_len";

/// Runs a `DELETE ... RETURNING_BODIES` statement and releases the deleted rows' bodies (blanking
/// them first when `blank`); returns how many rows it deleted.
fn delete_rows<P: rusqlite::Params>(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    sql: &str,
    args: P,
    blank: bool,
) -> Result<u64, StoreError> {
    let mut stmt = tx.prepare_cached(sql).map_err(sql_err)?;
    let mut rows = stmt.query(args).map_err(sql_err)?;
    let mut n = 0u64;
    let mut refs = Vec::new();
    while let Some(row) = rows.next().map_err(sql_err)? {
        n += 1;
        if let (Some(seg), Some(off)) = (row.get::<_, Option<i64>>(0).map_err(sql_err)?, row.get(1).map_err(sql_err)?) {
            refs.push(BodyRef {
                seg,
                off,
                request_len: row.get(2).map_err(sql_err)?,
                response_len: row.get(3).map_err(sql_err)?,
            });
        }
    }
    release_bodies(tx, bodies, &refs, blank)?;
    Ok(n)
}

/// Counts deleted rows' bodies off their segments (overwriting them first when `blank`) and marks
/// the segments no row points into any more for removal once the transaction commits.
fn release_bodies(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    refs: &[BodyRef],
    blank: bool,
) -> Result<(), StoreError> {
    if refs.is_empty() {
        return Ok(());
    }
    if blank {
        bodies.blank(refs)?;
    }
    let mut per_seg: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    for r in refs {
        *per_seg.entry(r.seg).or_default() += 1;
    }
    release_segments(tx, bodies, per_seg)
}

/// Takes `rows` deleted rows off each segment's count and marks the segments no row points into
/// any more for removal once the transaction commits.
fn release_segments(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    per_seg: impl IntoIterator<Item = (i64, i64)>,
) -> Result<(), StoreError> {
    let mut dec = tx.prepare_cached("UPDATE body_segments SET live = live - ?2 WHERE seg = ?1").map_err(sql_err)?;
    let mut any = false;
    for (seg, k) in per_seg {
        dec.execute(params![seg, k]).map_err(sql_err)?;
        any = true;
    }
    if !any {
        return Ok(());
    }
    let mut gone = tx
        .prepare_cached("DELETE FROM body_segments WHERE live <= 0 AND seg IS NOT ?1 RETURNING seg")
        .map_err(sql_err)?;
    let segs = gone.query_map([bodies.current()], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
    for seg in segs {
        bodies.dead.push(seg.map_err(sql_err)?);
    }
    Ok(())
}

/// The `created_at_ms` of the gateway's row with id `id`, if there is one. A UUIDv7 id names its
/// time: the row is looked up by key, then (rows stored before schema 5) within
/// [`LEGACY_ID_SKEW_MS`] of that time; any other id (never one the gateway makes) by a scan of the
/// gateway's rows.
fn find_id(conn: &Connection, gateway: &str, id: &str) -> Result<Option<i64>, StoreError> {
    let one = |sql: &str, args: &[&dyn ToSql]| -> Result<Option<i64>, StoreError> {
        conn.prepare_cached(sql).map_err(sql_err)?.query_row(args, |r| r.get(0)).optional().map_err(sql_err)
    };
    let Some(t) = crate::log::log_id_time_ms(id) else {
        return one("SELECT created_at_ms FROM logs WHERE gateway = ?1 AND id = ?2 LIMIT 1", &[&gateway, &id]);
    };
    let exact = one(
        "SELECT created_at_ms FROM logs WHERE gateway = ?1 AND created_at_ms = ?2 AND id = ?3",
        &[&gateway, &to_i64(t), &id],
    )?;
    if exact.is_some() {
        return Ok(exact);
    }
    one(
        "SELECT created_at_ms FROM logs WHERE gateway = ?1 AND created_at_ms BETWEEN ?2 AND ?3 AND id = ?4 LIMIT 1",
        &[&gateway, &to_i64(t.saturating_sub(LEGACY_ID_SKEW_MS)), &to_i64(t.saturating_add(LEGACY_ID_SKEW_MS)), &id],
    )
}

/// Deletes the gateway's `k` oldest rows among those created before `before_ms` (all of its rows
/// when `None`); returns how many. The rows are the front of the gateway's key range: the key of
/// the `k`-th is found first and everything up to it is deleted as one range, without `RETURNING`
/// (which would make SQLite collect the keys and seek each row again); the bodies' segments are
/// counted from the same range beforehand. (Deleting `IN (SELECT … LIMIT k)` cost about as much
/// per row as inserting one.)
fn delete_front(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    gateway: &str,
    before_ms: Option<u64>,
    k: u64,
) -> Result<u64, StoreError> {
    if k == 0 {
        return Ok(0);
    }
    let before = to_i64(before_ms.unwrap_or(u64::MAX / 2));
    let last: Option<(i64, String)> = tx
        .prepare_cached(
            "SELECT created_at_ms, id FROM logs WHERE gateway = ?1 AND created_at_ms < ?2 \
             ORDER BY created_at_ms, id LIMIT 1 OFFSET ?3",
        )
        .map_err(sql_err)?
        .query_row(params![gateway, before, to_i64(k - 1)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(sql_err)?;
    // The range's body segments, then the range (fewer than k such rows: all of them go).
    let (segs_sql, delete_sql, args): (&str, &str, Vec<&dyn ToSql>) = match &last {
        Some((t, id)) => (
            "SELECT body_seg, count(*) FROM logs WHERE gateway = ?1 AND (created_at_ms, id) <= (?2, ?3) \
             AND body_seg IS NOT NULL GROUP BY body_seg",
            "DELETE FROM logs WHERE gateway = ?1 AND (created_at_ms, id) <= (?2, ?3)",
            vec![&gateway, t, id],
        ),
        None => (
            "SELECT body_seg, count(*) FROM logs WHERE gateway = ?1 AND created_at_ms < ?2 \
             AND body_seg IS NOT NULL GROUP BY body_seg",
            "DELETE FROM logs WHERE gateway = ?1 AND created_at_ms < ?2",
            vec![&gateway, &before],
        ),
    };
    let mut per_seg = Vec::new();
    {
        let mut st = tx.prepare_cached(segs_sql).map_err(sql_err)?;
        let rows = st.query_map(&args[..], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).map_err(sql_err)?;
        for row in rows {
            per_seg.push(row.map_err(sql_err)?);
        }
    }
    let n = tx.prepare_cached(delete_sql).map_err(sql_err)?.execute(&args[..]).map_err(sql_err)? as u64;
    release_segments(tx, bodies, per_seg)?;
    Ok(n)
}

/// One step of [`LogStore::enforce_retention`] on a gateway holding `n` rows: removes at most
/// [`DELETE_CHUNK_ROWS`] rows, those created before `cutoff_ms` first, then (DeleteOldest only) the
/// oldest beyond the cap. Returns the rows removed.
fn retention_step(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    gateway: &str,
    r: &Retention,
    cutoff_ms: Option<u64>,
    n: u64,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    if let Some(cutoff) = cutoff_ms {
        removed += delete_front(tx, bodies, gateway, Some(cutoff), DELETE_CHUNK_ROWS)?;
    }
    let left = n.saturating_sub(removed);
    if r.at_cap == AtCap::DeleteOldest && left > r.max_records && removed < DELETE_CHUNK_ROWS {
        removed += delete_front(tx, bodies, gateway, None, (left - r.max_records).min(DELETE_CHUNK_ROWS - removed))?;
    }
    Ok(removed)
}

/// The previous row [`insert_one`] bound in this batch. SQLite keeps a statement's bindings from
/// one execution to the next (rusqlite clears them only when the statement goes back to its
/// cache, after the batch), so a parameter equal to the previous row's is not bound again: most
/// columns repeat within a batch (gateway, provider, path, models, status, the NULLs), and
/// binding a value (copied into SQLite, the old one released) costs more than comparing it.
struct PrevRow<'a> {
    record: &'a LogRecord,
    metadata: Option<String>,
    body: Option<BodyRef>,
}

/// Inserts one record, its bodies at `body`; returns whether it was new, and what it bound (the
/// `prev` of the next row). The parameters are bound one by one (`raw_bind_parameter`), those
/// that differ from `prev`'s only (all of them for a batch's first row).
fn insert_one<'a>(
    stmt: &mut rusqlite::CachedStatement<'_>,
    gateway: &str,
    r: &'a LogRecord,
    body: Option<BodyRef>,
    prev: Option<&PrevRow<'_>>,
) -> Result<(bool, PrevRow<'a>), StoreError> {
    let metadata = metadata_object_json(&r.metadata);
    let bind = |stmt: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<usize> {
        // Binds `$get` (an expression of the record `$x`) unless the previous row's is the same.
        macro_rules! bind {
            ($i:expr, |$x:ident| $get:expr) => {{
                let v = {
                    let $x = r;
                    $get
                };
                if prev.is_none_or(|p| {
                    let $x = p.record;
                    $get != v
                }) {
                    stmt.raw_bind_parameter($i, v)?;
                }
            }};
        }
        // The same for a float, compared bit for bit (0.0 == -0.0, but they are not stored alike).
        macro_rules! bind_f64 {
            ($i:expr, |$x:ident| $get:expr) => {{
                let v: Option<f64> = {
                    let $x = r;
                    $get
                };
                if prev.is_none_or(|p| {
                    let $x = p.record;
                    let old: Option<f64> = $get;
                    old.map(f64::to_bits) != v.map(f64::to_bits)
                }) {
                    stmt.raw_bind_parameter($i, v)?;
                }
            }};
        }
        if prev.is_none() {
            stmt.raw_bind_parameter(1, gateway)?;
        }
        bind!(2, |x| &x.id);
        bind!(3, |x| &x.event_id);
        bind!(4, |x| to_i64(x.created_at_ms));
        bind!(5, |x| &x.provider);
        bind!(6, |x| &x.path);
        bind!(7, |x| &x.requested_model);
        bind!(8, |x| &x.served_model);
        bind!(9, |x| i64::from(x.status));
        bind!(10, |x| x.success);
        bind!(11, |x| &x.cache_status);
        bind!(12, |x| x.stream);
        bind_f64!(13, |x| Some(if x.duration_ms.is_finite() { x.duration_ms } else { 0.0 }));
        bind_f64!(14, |x| finite(x.ttfb_ms));
        bind_f64!(15, |x| finite(x.upstream_ms));
        bind_f64!(16, |x| finite(x.overhead_ms));
        bind!(17, |x| x.tokens_in.map(to_i64));
        bind!(18, |x| x.tokens_out.map(to_i64));
        bind!(19, |x| x.cached_tokens_in.map(to_i64));
        bind!(20, |x| x.reasoning_tokens.map(to_i64));
        bind_f64!(21, |x| finite(x.cost_usd));
        bind_f64!(22, |x| finite(x.saved_usd));
        bind!(23, |x| x.custom_cost);
        if prev.is_none_or(|p| p.metadata != metadata) {
            stmt.raw_bind_parameter(24, &metadata)?;
        }
        bind!(25, |x| &x.user_agent);
        bind!(26, |x| &x.error);
        bind!(27, |x| x.feedback.map(i64::from));
        bind_f64!(28, |x| finite(x.score));
        let old = prev.map(|p| p.body);
        if old.is_none_or(|o| o.map(|b| b.seg) != body.map(|b| b.seg)) {
            stmt.raw_bind_parameter(29, body.map(|b| b.seg))?;
        }
        if old.is_none_or(|o| o.map(|b| b.off) != body.map(|b| b.off)) {
            stmt.raw_bind_parameter(30, body.map(|b| b.off))?;
        }
        if old.is_none_or(|o| o.and_then(|b| b.request_len) != body.and_then(|b| b.request_len)) {
            stmt.raw_bind_parameter(31, body.and_then(|b| b.request_len))?;
        }
        if old.is_none_or(|o| o.and_then(|b| b.response_len) != body.and_then(|b| b.response_len)) {
            stmt.raw_bind_parameter(32, body.and_then(|b| b.response_len))?;
        }
        stmt.raw_execute()
    };
    let n = bind(stmt).map_err(sql_err)?;
    Ok((n > 0, PrevRow { record: r, metadata, body }))
}

/// Adds aggregated rollups to the gateway's rows (one upsert per row, in key order).
fn upsert_rollups(tx: &Transaction<'_>, gateway: &str, rows: &[(RollupKey, Rollup)]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO log_rollups (gateway, grain_ms, dim, bucket_ms, dim_value, {}, {}, hist) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
         ON CONFLICT (gateway, grain_ms, dim, bucket_ms, dim_value) DO UPDATE SET {}",
        INT_COLUMNS.join(", "),
        FLOAT_COLUMNS.join(", "),
        upsert_set_sql(false, "log_rollups")
    );
    let mut stmt = tx.prepare_cached(&sql).map_err(sql_err)?;
    for (k, r) in rows {
        let mut values: Vec<Value> = vec![
            Value::Text(gateway.to_owned()),
            Value::Integer(to_i64(k.grain_ms)),
            Value::Text(k.dim.clone()),
            Value::Integer(to_i64(k.bucket_ms)),
            Value::Text(k.value.clone()),
        ];
        values.extend(r.ints().into_iter().map(|v| Value::Integer(to_i64(v))));
        values.extend(r.floats().into_iter().map(Value::Real));
        values.push(Value::Text(r.hist.to_json()));
        stmt.execute(rusqlite::params_from_iter(values)).map_err(sql_err)?;
    }
    Ok(())
}

/// Decodes a rollup row: `bucket_ms, dim, dim_value`, the counters, the sums, `hist`.
fn decode_rollup(row: &Row<'_>) -> rusqlite::Result<Result<RollupRow, StoreError>> {
    let mut ints = [0u64; 9];
    for (i, v) in ints.iter_mut().enumerate() {
        *v = to_u64(row.get(3 + i)?);
    }
    let mut floats = [0f64; 4];
    for (i, v) in floats.iter_mut().enumerate() {
        *v = row.get(12 + i)?;
    }
    let hist: String = row.get(16)?;
    let hist = match Histogram::from_json(&hist) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(RollupRow {
        bucket_ms: to_u64(row.get(0)?),
        dim: row.get(1)?,
        value: row.get(2)?,
        rollup: Rollup::from_columns(ints, floats, hist),
    }))
}

/// Decodes a row of [`LIST_COLUMNS`] (followed by the bodies when `bodies`).
fn decode(row: &Row<'_>, bodies: bool) -> rusqlite::Result<Result<LogRecord, StoreError>> {
    let opt_u64 = |i: usize| -> rusqlite::Result<Option<u64>> { Ok(row.get::<_, Option<i64>>(i)?.map(to_u64)) };
    let metadata: Option<String> = row.get(23)?;
    let metadata = match metadata.as_deref().map(metadata_from_object_json).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return Ok(Err(e)),
    };
    let status: i64 = row.get(8)?;
    let feedback: Option<i64> = row.get(26)?;
    let (request_body, response_body) = if bodies {
        (row.get::<_, Option<Vec<u8>>>(28)?.map(Bytes::from), row.get::<_, Option<Vec<u8>>>(29)?.map(Bytes::from))
    } else {
        (None, None)
    };
    Ok(Ok(LogRecord {
        id: row.get(0)?,
        event_id: row.get(1)?,
        created_at_ms: to_u64(row.get(2)?),
        gateway: row.get(3)?,
        provider: row.get(4)?,
        path: row.get(5)?,
        requested_model: row.get(6)?,
        served_model: row.get(7)?,
        status: u16::try_from(status).unwrap_or(0),
        success: row.get(9)?,
        cache_status: row.get(10)?,
        stream: row.get(11)?,
        duration_ms: row.get(12)?,
        ttfb_ms: row.get(13)?,
        upstream_ms: row.get(14)?,
        overhead_ms: row.get(15)?,
        tokens_in: opt_u64(16)?,
        tokens_out: opt_u64(17)?,
        cached_tokens_in: opt_u64(18)?,
        reasoning_tokens: opt_u64(19)?,
        cost_usd: row.get(20)?,
        saved_usd: row.get(21)?,
        custom_cost: row.get(22)?,
        metadata,
        user_agent: row.get(24)?,
        error: row.get(25)?,
        request_body,
        response_body,
        feedback: feedback.and_then(|f| i8::try_from(f).ok()),
        score: row.get(27)?,
    }))
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
        self.write(move |tx, bodies| {
            let mut n = count_rows(tx, &gateway)?;
            let mut removed = 0;
            let cap = match retention {
                Some(r) if r.at_cap == AtCap::StopInserting => {
                    // Make room from expired rows before refusing any.
                    if let Some(age) = r.max_age_ms.filter(|_| n.saturating_add(records.len() as u64) > r.max_records) {
                        let d =
                            delete_front(tx, bodies, &gateway, Some(now_ms().saturating_sub(age)), DELETE_CHUNK_ROWS)?;
                        removed += d;
                        n = n.saturating_sub(d);
                    }
                    Some(r.max_records)
                }
                _ => None,
            };
            let mut inserted = 0u64;
            // What the rollups count: every record but duplicate ids.
            let mut counted: Vec<&LogRecord> = Vec::with_capacity(records.len());
            let mut stopped_at = records.len();
            // Rows inserted that point into the batch's body segment.
            let mut with_bodies = 0i64;
            if records.iter().any(|r| r.request_body.is_some() || r.response_body.is_some()) {
                bodies.begin()?;
            }
            {
                let mut stmt = tx.prepare_cached(INSERT_SQL).map_err(sql_err)?;
                let mut prev: Option<PrevRow<'_>> = None;
                for (i, r) in records.iter().enumerate() {
                    if cap.is_some_and(|cap| n >= cap) {
                        stopped_at = i;
                        break;
                    }
                    let body = bodies.add(r.request_body.as_ref(), r.response_body.as_ref());
                    let (new, bound) = insert_one(&mut stmt, &gateway, r, body, prev.as_ref())?;
                    prev = Some(bound);
                    if new {
                        n += 1;
                        inserted += 1;
                        with_bodies += i64::from(body.is_some());
                        counted.push(r);
                    }
                }
            }
            // The bodies reach the file before the rows pointing at them commit.
            if let Some(seg) = bodies.flush()? {
                if with_bodies > 0 {
                    tx.prepare_cached(
                        "INSERT INTO body_segments (seg, live) VALUES (?1, ?2) \
                         ON CONFLICT (seg) DO UPDATE SET live = live + excluded.live",
                    )
                    .map_err(sql_err)?
                    .execute(params![seg, with_bodies])
                    .map_err(sql_err)?;
                }
            }
            if stopped_at < records.len() {
                // Dropped at the cap: still traffic, unless a duplicate id.
                let mut exists = tx
                    .prepare_cached("SELECT 1 FROM logs WHERE gateway = ?1 AND created_at_ms = ?2 AND id = ?3")
                    .map_err(sql_err)?;
                let mut seen = HashSet::new();
                for r in &records[stopped_at..] {
                    if seen.insert((r.created_at_ms, r.id.as_str()))
                        && !exists.exists(params![gateway, to_i64(r.created_at_ms), r.id]).map_err(sql_err)?
                    {
                        counted.push(r);
                    }
                }
            }
            upsert_rollups(tx, &gateway, &aggregate(counted))?;
            if let Some(r) = retention.filter(|r| r.at_cap == AtCap::DeleteOldest && n > r.max_records) {
                let excess = n - r.max_records;
                let d =
                    delete_front(tx, bodies, &gateway, None, excess.min(DELETE_CHUNK_ROWS.max(records.len() as u64)))?;
                removed += d;
                n = n.saturating_sub(d);
            }
            set_count(tx, &gateway, n)?;
            Ok((inserted, removed))
        })
        .await
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
        let sql = format!(
            "SELECT bucket_ms, dim, dim_value, {}, {}, hist FROM log_rollups WHERE gateway = ?1 AND grain_ms = ?2 \
             AND dim IN (?3, ?4) AND bucket_ms >= ?5 AND bucket_ms < ?6",
            INT_COLUMNS.join(", "),
            FLOAT_COLUMNS.join(", ")
        );
        self.run(move |db| {
            let mut stmt = db.conn.prepare_cached(&sql).map_err(sql_err)?;
            let group_dim = p.dims.last().cloned().unwrap_or_default();
            let args =
                params![gateway, to_i64(p.grain_ms), "", group_dim, to_i64(p.from_bucket_ms), to_i64(p.to_bucket_ms)];
            let rows = stmt.query_map(args, decode_rollup).map_err(sql_err)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(sql_err)??);
            }
            Ok(assemble(&q, out))
        })
        .await
    }

    async fn list(&self, gateway: &str, filter: &LogFilter) -> Result<LogPage, StoreError> {
        let w = filter_sql(Dialect::Sqlite, gateway, filter, true)?;
        let limit = filter.effective_limit() as usize;
        let sql = format!(
            "SELECT {LIST_COLUMNS} FROM logs WHERE {} ORDER BY created_at_ms DESC, id DESC LIMIT {}",
            w.sql,
            limit + 1
        );
        self.run(move |db| {
            let mut stmt = db.conn.prepare_cached(&sql).map_err(sql_err)?;
            let rows =
                stmt.query_map(rusqlite::params_from_iter(w.params.iter()), |r| decode(r, false)).map_err(sql_err)?;
            let mut records = Vec::with_capacity(limit.min(64));
            for row in rows {
                records.push(row.map_err(sql_err)??);
            }
            let next_cursor = if records.len() > limit {
                records.truncate(limit);
                records.last().map(|r| crate::log::encode_cursor(r.created_at_ms, &r.id))
            } else {
                None
            };
            Ok(LogPage { records, next_cursor })
        })
        .await
    }

    async fn get(&self, gateway: &str, id: &str) -> Result<Option<LogRecord>, StoreError> {
        let (gateway, id) = (gateway.to_owned(), id.to_owned());
        self.run(move |db| {
            let Some(t) = find_id(&db.conn, &gateway, &id)? else { return Ok(None) };
            let sql = format!(
                "SELECT {LIST_COLUMNS}, request_body, response_body, body_seg, body_off, request_len, response_len \
                 FROM logs WHERE gateway = ?1 AND created_at_ms = ?2 AND id = ?3"
            );
            let mut stmt = db.conn.prepare_cached(&sql).map_err(sql_err)?;
            let found = stmt
                .query_row(params![gateway, t, id], |r| {
                    let body = match (r.get::<_, Option<i64>>(30)?, r.get::<_, Option<i64>>(31)?) {
                        (Some(seg), Some(off)) => {
                            Some(BodyRef { seg, off, request_len: r.get(32)?, response_len: r.get(33)? })
                        }
                        _ => None,
                    };
                    Ok((decode(r, true)?, body))
                })
                .optional()
                .map_err(sql_err)?;
            let Some((record, body)) = found else { return Ok(None) };
            let mut record = record?;
            if let Some(body) = body {
                (record.request_body, record.response_body) = db.bodies.read(&body);
            }
            Ok(Some(record))
        })
        .await
    }

    async fn delete(&self, gateway: &str, filter: &LogFilter) -> Result<u64, StoreError> {
        let w = filter_sql(Dialect::Sqlite, gateway, filter, false)?;
        let sql = Arc::new(format!(
            "DELETE FROM logs WHERE (gateway, created_at_ms, id) IN (SELECT gateway, created_at_ms, id FROM logs \
             WHERE {} LIMIT {DELETE_CHUNK_ROWS}) {RETURNING_BODIES}",
            w.sql
        ));
        let values = Arc::new(w.params);
        let mut total = 0;
        loop {
            let (sql, values, gateway) = (sql.clone(), values.clone(), gateway.to_owned());
            let d = self
                .write(move |tx, bodies| {
                    // Deleted on request: the bodies are overwritten at once, not when their
                    // segment goes.
                    let d = delete_rows(tx, bodies, &sql, rusqlite::params_from_iter(values.iter()), true)?;
                    if d > 0 {
                        let n = count_rows(tx, &gateway)?;
                        set_count(tx, &gateway, n.saturating_sub(d))?;
                    }
                    Ok((d, d))
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
        self.write(move |tx, _| {
            let Some(t) = find_id(tx, &gateway, &id)? else { return Ok((false, 0)) };
            let n = tx
                .execute(
                    "UPDATE logs SET feedback = COALESCE(?4, feedback), score = COALESCE(?5, score) \
                     WHERE gateway = ?1 AND created_at_ms = ?2 AND id = ?3",
                    params![gateway, t, id, feedback.map(i64::from), score],
                )
                .map_err(sql_err)?;
            Ok((n > 0, 0))
        })
        .await
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
        let cutoff = r.max_age_ms.map(|age| now_ms().saturating_sub(age));
        let mut total = 0;
        loop {
            let gateway = gateway.to_owned();
            let d = self
                .write(move |tx, bodies| {
                    let n = count_rows(tx, &gateway)?;
                    let removed = retention_step(tx, bodies, &gateway, &r, cutoff, n)?;
                    if removed > 0 {
                        set_count(tx, &gateway, n.saturating_sub(removed))?;
                    }
                    Ok((removed, removed))
                })
                .await?;
            total += d;
            if d < DELETE_CHUNK_ROWS {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::log_id_at;

    fn index_names(conn: &Connection) -> Vec<String> {
        let mut st = conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'logs'").unwrap();
        let names = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
        names.map(Result::unwrap).collect()
    }

    fn temp_path(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("aigate-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dir.join(LOG_SQLITE_FILE), dir)
    }

    /// A file in the schema-4 layout, as aigate before schema 5 created it: a rowid table with a
    /// unique index of ids and a time index.
    fn schema_4_file(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
             {}
             CREATE UNIQUE INDEX logs_gateway_id ON logs(gateway, id);
             CREATE INDEX logs_gateway_time ON logs(gateway, created_at_ms, id);
             CREATE INDEX logs_gateway_event_id ON logs(gateway, event_id, created_at_ms, id)
                 WHERE event_id IS NOT NULL;
             CREATE TABLE log_counts (gateway TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE body_segments (seg INTEGER PRIMARY KEY NOT NULL, live INTEGER NOT NULL);
             PRAGMA user_version = 4;",
            create_logs_sql("logs")
                .replace(",\n             PRIMARY KEY (gateway, created_at_ms, id)\n         ) WITHOUT ROWID;", ");")
        ))
        .unwrap();
        let sql: String =
            conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 'logs'", [], |r| r.get(0)).unwrap();
        assert!(!sql.contains("WITHOUT ROWID") && sql.contains("response_len INTEGER)"), "{sql}");
        conn
    }

    /// Inserts a minimal row in whatever layout the file has.
    fn legacy_row(conn: &Connection, gateway: &str, id: &str, created_at_ms: u64) {
        conn.execute(
            "INSERT INTO logs (gateway, id, created_at_ms, provider, path, status, success, cache_status, stream, \
             duration_ms, custom_cost) VALUES (?1, ?2, ?3, 'openai', 'chat/completions', 200, 1, 'MISS', 0, 1.0, 0)",
            params![gateway, id, to_i64(created_at_ms)],
        )
        .unwrap();
    }

    #[tokio::test]
    async fn a_schema_4_file_is_rebuilt_keyed_by_time_and_its_ids_still_resolve() {
        let (path, dir) = temp_path("migrate-4");
        let t = now_ms() - 60_000;
        // Before schema 5 the gateway read the clock for the id and the time separately: a row's
        // created_at_ms can be a millisecond past its id's timestamp.
        let ids: Vec<(String, u64)> = (0..50u64).map(|i| (log_id_at(t + i).to_string(), t + i + i % 2)).collect();
        {
            let conn = schema_4_file(&path);
            for (id, ms) in &ids {
                legacy_row(&conn, "gw", id, *ms);
            }
            legacy_row(&conn, "other", "not-a-uuid", t);
            conn.execute_batch("INSERT INTO log_counts VALUES ('gw', 50), ('other', 1);").unwrap();
        }
        let s = SqliteLogStore::open(&path).unwrap();
        assert_eq!(s.count("gw").await.unwrap(), 50);
        for (id, ms) in &ids {
            let got = s.get("gw", id).await.unwrap().unwrap();
            assert_eq!((&got.id, got.created_at_ms), (id, *ms));
        }
        assert!(s.patch("gw", &ids[1].0, Some(1), None).await.unwrap());
        assert_eq!(s.get("gw", &ids[1].0).await.unwrap().unwrap().feedback, Some(1));
        assert_eq!(s.get("other", "not-a-uuid").await.unwrap().unwrap().created_at_ms, t);
        assert_eq!(s.get("gw", &log_id_at(t + 5000).to_string()).await.unwrap(), None);
        assert_eq!(s.get("other", &ids[0].0).await.unwrap(), None, "gateways stay apart");
        // Newest first, by (created_at_ms, id), across pages.
        let mut listed = Vec::new();
        let mut f = LogFilter { limit: Some(7), ..LogFilter::default() };
        loop {
            let page = s.list("gw", &f).await.unwrap();
            listed.extend(page.records.into_iter().map(|r| (r.id, r.created_at_ms)));
            match page.next_cursor {
                Some(c) => f.cursor = Some(c),
                None => break,
            }
        }
        let mut want = ids.clone();
        want.sort_by(|a, b| (b.1, &b.0).cmp(&(a.1, &a.0)));
        assert_eq!(listed, want);
        // A replayed record (same id and time) is not stored twice; a new one goes in.
        let mut again = s.get("gw", &ids[3].0).await.unwrap().unwrap();
        assert_eq!(s.insert_batch("gw", std::slice::from_ref(&again)).await.unwrap(), 0);
        again.id = log_id_at(t + 100).to_string();
        again.created_at_ms = t + 100;
        assert_eq!(s.insert_batch("gw", std::slice::from_ref(&again)).await.unwrap(), 1);
        assert_eq!(s.count("gw").await.unwrap(), 51);
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let sql: String =
            conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 'logs'", [], |r| r.get(0)).unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{sql}");
        assert_eq!(index_names(&conn).iter().filter(|n| !n.starts_with("sqlite_autoindex")).count(), 1);
        let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0)).unwrap();
        assert_eq!(free, 0, "the old table's pages went back to the file system");
        drop(conn);
        // A later open finds the schema current and changes nothing.
        let s = SqliteLogStore::open(&path).unwrap();
        assert_eq!(s.count("gw").await.unwrap(), 51);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_lookup_by_id_uses_the_key() {
        let (path, dir) = temp_path("plan");
        drop(SqliteLogStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let page_size: u32 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page_size, PAGE_SIZE, "a new file gets the larger page size");
        let plan = |sql: &str| -> String {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = st.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        };
        for sql in [
            "SELECT created_at_ms FROM logs WHERE gateway = 'g' AND created_at_ms = 5 AND id = 'x'",
            "SELECT created_at_ms FROM logs WHERE gateway = 'g' AND created_at_ms BETWEEN 4 AND 6 AND id = 'x' LIMIT 1",
            "SELECT created_at_ms, id FROM logs WHERE gateway = 'g' AND created_at_ms < 9 \
             ORDER BY created_at_ms, id LIMIT 1 OFFSET 9",
            "SELECT body_seg, count(*) FROM logs WHERE gateway = 'g' AND (created_at_ms, id) <= (5, 'x') \
             AND body_seg IS NOT NULL GROUP BY body_seg",
            "DELETE FROM logs WHERE gateway = 'g' AND (created_at_ms, id) <= (5, 'x')",
            "DELETE FROM logs WHERE gateway = 'g' AND created_at_ms < 9",
            "DELETE FROM logs WHERE (gateway, created_at_ms, id) IN (SELECT gateway, created_at_ms, id FROM logs \
             WHERE gateway = 'g' AND status >= 500 LIMIT 10)",
        ] {
            let p = plan(sql);
            assert!(p.contains("SEARCH logs USING PRIMARY KEY"), "{sql}: {p}");
            assert!(!p.contains("SCAN logs"), "{sql}: {p}");
        }
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_schema_3_file_keeps_its_in_row_bodies_and_gets_segments() {
        let (path, dir) = temp_path("migrate-3");
        {
            // A schema-3 file: the schema-4 layout without the body segment columns, a row holding
            // its bodies in the row.
            let conn = schema_4_file(&path);
            conn.execute_batch(
                "DROP TABLE body_segments;
                 ALTER TABLE logs DROP COLUMN body_seg; ALTER TABLE logs DROP COLUMN body_off;
                 ALTER TABLE logs DROP COLUMN request_len; ALTER TABLE logs DROP COLUMN response_len;
                 INSERT INTO logs (gateway, id, created_at_ms, provider, path, status, success, cache_status,
                     stream, duration_ms, custom_cost, request_body, response_body)
                 VALUES ('gw', 'old', 1, 'openai', '/v1/chat/completions', 200, 1, 'MISS', 0, 1.0, 0,
                     x'7b7d', x'5b5d');
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let s = SqliteLogStore::open(&path).unwrap();
        let old = s.get("gw", "old").await.unwrap().unwrap();
        assert_eq!(old.request_body.as_deref(), Some(&b"{}"[..]));
        assert_eq!(old.response_body.as_deref(), Some(&b"[]"[..]));
        let mut new = old.clone();
        new.id = "new".into();
        new.response_body = Some(Bytes::from_static(b"segment"));
        s.insert_batch("gw", std::slice::from_ref(&new)).await.unwrap();
        assert_eq!(s.get("gw", "new").await.unwrap().unwrap(), new);
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let in_row: Option<Vec<u8>> =
            conn.query_row("SELECT response_body FROM logs WHERE id = 'new'", [], |r| r.get(0)).unwrap();
        assert_eq!(in_row, None, "new bodies go to the segment files");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_schema_2_file_is_migrated_to_the_partial_event_index() {
        let (path, dir) = temp_path("migrate-2");
        {
            // A schema-2 file: the schema-4 layout with a full event index.
            let conn = schema_4_file(&path);
            conn.execute_batch(
                "DROP INDEX logs_gateway_event_id;
                 CREATE INDEX logs_gateway_event ON logs(gateway, event_id, created_at_ms, id);
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        drop(SqliteLogStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let names = index_names(&conn);
        assert!(names.iter().any(|n| n == "logs_gateway_event_id"), "{names:?}");
        assert!(!names.iter().any(|n| n == "logs_gateway_event"), "{names:?}");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // A lookup by event id still uses an index (`event_id = ?` implies IS NOT NULL).
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT id FROM logs WHERE gateway = ?1 AND event_id = ?2 \
                 ORDER BY created_at_ms DESC, id DESC LIMIT 50",
            )
            .unwrap()
            .query_map(params!["default", "ev-1"], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(plan.iter().any(|p| p.contains("logs_gateway_event_id")), "{plan:?}");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
