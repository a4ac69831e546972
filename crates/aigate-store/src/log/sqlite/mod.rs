//! Embedded request-log store: one SQLite file (by default `<data_dir>/logs.sqlite3`).
//!
//! Layout: partition tables `logs_p{seq}` ([`Parts`], listed in `log_parts`: each holds one
//! gateway's rows of one span of time) with one column per scalar field of [`LogRecord`],
//! `metadata` as a JSON object text (entry order kept); the bodies are in segment files beside the
//! database ([`crate::log::bodies`]: written once instead of twice through the WAL), the row holding where
//! (`body_seg`, `body_off`, `request_len`, `response_len`; rows of schema 3 and older keep theirs
//! in the BLOB columns `request_body`, `response_body`, still read). Since schema 6 a table is a
//! rowid table keyed by one integer `k` = gateway number (table `log_gateways`) | `created_at_ms`
//! | slot within the millisecond ([`key`]): an insert appends to a b-tree of integer keys (the
//! schema-5 table, keyed by `(gateway, created_at_ms, id)` without a rowid, compared decoded
//! records on every step: inserts cost a third more, `examples/schema_exp.rs`), and the keys are
//! the listing order, the cursor and the retention order. The gateway's ids are UUIDv7 holding
//! the record's time and, in `rand_a`, a counter ([`crate::log::log_id_at`]) that is the slot: keys
//! sort as `(created_at_ms, id)` and a lookup by id is a key lookup. Any other id, or an id whose
//! slot is taken, is placed between its neighbours in id order ([`place`]), its millisecond noted
//! in `log_placed` so that later ids there are placed too. There is no index of ids; rows of older
//! schemas, whose time could be a millisecond past their id's, are found within
//! [`LEGACY_ID_SKEW_MS`]; an id that is no UUIDv7 by a scan of the gateway's keys. A record is its
//! `(created_at_ms, id)`: inserting one already stored is a no-op. One more
//! index, `(gateway, event_id, created_at_ms, id)` on rows with an event id, serves event
//! lookups. Table `log_counts(gateway, n)` holds each gateway's row count, kept in the same
//! transaction as every insert and delete, so the retention check of a batch never counts rows.
//! Table `log_rollups` holds the analytics rollups ([`crate::log::analytics`]), primary key
//! `(gateway, grain_ms, dim, bucket_ms, dim_value)` (a query reads one contiguous range per
//! dimension), updated by upserts in the transaction of every insert. The schema version is
//! `PRAGMA user_version`; opening a file of schema 5 or older copies its table into the schema-6
//! layout once (6 s for a million rows on the benchmark VM, logged), and a schema-6 table `logs`
//! (every gateway's rows) becomes partitions ([`migrate_to_7`]). Retention drops whole
//! partitions where it can ([`trim_to_cap`], [`expire`]). The database
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

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::functions::FunctionFlags;
use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{params, Connection, OptionalExtension, Row, ToSql, Transaction, TransactionBehavior};

use crate::cache::memory::now_ms;
use crate::log::analytics::{
    aggregate, assemble, merge_hist_json, plan, upsert_set_sql, Histogram, Rollup, RollupKey, RollupRow, FLOAT_COLUMNS,
    HIST_MERGE_FN, HOUR_MS, INT_COLUMNS, MINUTE_MS,
};
use crate::log::bodies::{BodyFiles, BodyRef};
use crate::log::{
    check_patch, decode_cursor, filter_sql, finite, log_id_counter, metadata_from_object_json, metadata_object_json,
    to_i64, to_u64, AtCap, Dialect, Retention, Retentions, SqlValue, DELETE_CHUNK_ROWS, LIST_COLUMNS,
};
use crate::{
    Analytics, AnalyticsQuery, LogFilter, LogPage, LogRecord, LogStore, StoreError, HOUR_ROLLUP_RETENTION_MS,
    MINUTE_ROLLUP_RETENTION_MS,
};

/// File name of the database inside the data directory ([`crate::LogBackend::parse`]).
pub const LOG_SQLITE_FILE: &str = "logs.sqlite3";

/// Schema version written to `PRAGMA user_version` (3: the event-id index is partial; 4: bodies
/// in segment files; 5: the table keyed by `(gateway, created_at_ms, id)`, no index of ids;
/// 6: a rowid table keyed by `k`, see [`key`]; 7: that table split into partitions, [`Parts`]).
const SCHEMA_VERSION: i64 = 7;

/// Page size of a new database file. Records are ~0.5 KB, ~1.5 KB with bodies: 32 KiB pages
/// halve the cost of an insert against SQLite's 4 KiB default (fewer pages split, written to the
/// WAL and checkpointed per record; measured with `examples/schema_exp.rs`, see
/// docs/benchmarks.md). An existing file keeps the page size it was created with.
const PAGE_SIZE: u32 = 32 * 1024;

/// Rows deleted before the file is asked to give pages back.
const VACUUM_AFTER_ROWS: u64 = 1_000;

/// The columns of the `logs` table after its key, as created.
const LOG_COLUMN_DEFS: &str = "gateway TEXT NOT NULL,
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
             response_len INTEGER";

/// The `logs` table (schema 6) under the name `table`: a rowid table whose rowid `k` ([`key`])
/// orders the rows as `(gateway, created_at_ms, id)` does. An insert appends to a b-tree of
/// integer keys (a third cheaper than the schema-5 table keyed by those three columns, whose
/// every comparison decoded a record; `examples/schema_exp.rs`), and deleting the oldest rows
/// is a range of keys. There is no index of ids: an id made by the gateway names its key.
/// (`request_body` and `response_body` hold the bodies of rows stored before schema 4.)
fn create_logs_sql(table: &str) -> String {
    format!("CREATE TABLE {table} (\n             k INTEGER PRIMARY KEY,\n             {LOG_COLUMN_DEFS}\n         );")
}

/// The schema of a new file: every table but the partitions (created as a gateway needs them,
/// [`create_part_sql`]), and the version.
fn create_schema_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS log_gateways (
             name TEXT PRIMARY KEY NOT NULL,
             no INTEGER NOT NULL UNIQUE
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS log_placed (ms_key INTEGER PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS log_parts (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             gateway INTEGER NOT NULL,
             lo INTEGER NOT NULL,
             n INTEGER NOT NULL
         );
         CREATE UNIQUE INDEX IF NOT EXISTS log_parts_gateway_lo ON log_parts(gateway, lo);
         CREATE TABLE IF NOT EXISTS log_part_segs (
             seq INTEGER NOT NULL,
             seg INTEGER NOT NULL,
             n INTEGER NOT NULL,
             PRIMARY KEY (seq, seg)
         ) WITHOUT ROWID;
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
         PRAGMA user_version = {SCHEMA_VERSION};"
    )
}

/// Accepts a file of the current schema, or a new one (`user_version` 0 and no table); refuses any
/// other, saying what to do: aigate converts no older schema (only development builds wrote them).
fn check_version(path: &Path, version: i64, tables: i64) -> Result<(), StoreError> {
    if version == SCHEMA_VERSION || (version == 0 && tables == 0) {
        return Ok(());
    }
    let file = path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
    let (has, from) = match version {
        0 => ("tables but no log schema".to_owned(), "another program"),
        v => (format!("log schema {v}"), "a development build"),
    };
    Err(StoreError::Unavailable(format!(
        "{file} has {has}; this aigate reads schema {SCHEMA_VERSION} only (the file comes from {from}): \
         move it away or delete it, and aigate creates a new one (file: {path})",
        path = path.display()
    )))
}

/// The insert of [`insert_one`] into `table`.
fn insert_sql(table: &str) -> String {
    format!("INSERT INTO {table} {INSERT_TAIL}")
}

const INSERT_TAIL: &str = "(gateway, id, event_id, created_at_ms, provider, path, requested_model, \
     served_model, status, success, cache_status, stream, duration_ms, ttfb_ms, upstream_ms, overhead_ms, tokens_in, \
     tokens_out, cached_tokens_in, reasoning_tokens, cost_usd, saved_usd, custom_cost, metadata, user_agent, error, \
     feedback, score, body_seg, body_off, request_len, response_len, k) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, \
     ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33) \
     ON CONFLICT (k) DO NOTHING";

/// Bits of [`key`]: a slot within the millisecond (12), the millisecond (42: Unix ms up to the
/// year 2109; later times share the last one) and, above, the gateway's number (9).
const SLOT_BITS: u32 = 12;
const MS_BITS: u32 = 42;
const SLOTS: i64 = 1 << SLOT_BITS;
const MAX_KEY_MS: u64 = (1 << MS_BITS) - 1;

/// Gateway numbers a file can hold ([`gateway_number`]).
const MAX_GATEWAYS: i64 = 1 << (63 - MS_BITS - SLOT_BITS);

/// The row key `k` of a gateway's record created at `ms`, in slot `slot` of that millisecond. The
/// keys of one gateway are one range ([`gateway_keys`]) and sort by time; within a millisecond a
/// record made by the gateway takes the slot its id's counter names ([`log_id_counter`]), so keys
/// sort as ids do; any other record (an id not made that way, two ids on one slot) is given a
/// free slot between its neighbours in id order ([`place`]).
fn key(gateway: i64, ms: u64, slot: i64) -> i64 {
    // `ms` is at most 42 bits and `slot` 12: the value stays below 2^63 for any gateway number.
    (gateway << (MS_BITS + SLOT_BITS)) | ((ms.min(MAX_KEY_MS) as i64) << SLOT_BITS) | (slot & (SLOTS - 1))
}

/// The key a record of `gateway` created at `ms` gets when its id's counter names a slot
/// ([`log_id_counter`]) and that slot is free.
fn own_key(gateway: i64, ms: u64, id: &str) -> Option<i64> {
    // Times past MAX_KEY_MS share one millisecond of keys: placed, not at a slot.
    log_id_counter(id, ms).filter(|_| ms < MAX_KEY_MS).map(|c| key(gateway, ms, i64::from(c)))
}

/// The keys of a gateway's records created in millisecond `ms`.
fn ms_keys(gateway: i64, ms: u64) -> (i64, i64) {
    (key(gateway, ms, 0), key(gateway, ms, SLOTS - 1))
}

/// All the keys of a gateway.
fn gateway_keys(gateway: i64) -> (i64, i64) {
    (key(gateway, 0, 0), key(gateway, MAX_KEY_MS, SLOTS - 1))
}

/// The keys of a gateway's records created in `[from_ms, to_ms)` (a wider range for times past
/// [`MAX_KEY_MS`], which share its last millisecond); None when the range is empty.
fn time_keys(gateway: i64, from_ms: Option<u64>, to_ms: Option<u64>) -> Option<(i64, i64)> {
    let (mut lo, mut hi) = gateway_keys(gateway);
    if let Some(from) = from_ms {
        lo = key(gateway, from, 0);
    }
    if let Some(to) = to_ms {
        hi = ms_keys(gateway, to.checked_sub(1)?).1;
    }
    (lo <= hi).then_some((lo, hi))
}

/// Partition size for a cap: a sixteenth of `max_records`, so that at the cap the oldest
/// sixteenth goes at once as one table ([`Parts::drop_part`]) instead of one row per new one
/// (deleting a row from the front of a b-tree costs about as much as inserting one: SQLite
/// rebalances the pages it empties; dropping a table only frees its pages).
const PARTS_PER_CAP: u64 = 16;

/// Below this many rows a partition is not worth a table: a gateway whose cap is under
/// `PARTS_PER_CAP` times this keeps one partition, trimmed row by row (an exact cap).
const MIN_PART_ROWS: u64 = 8_192;

/// Largest partition (a gateway without a cap still gets partitions, which `max_age` drops).
const MAX_PART_ROWS: u64 = 1 << 20;

/// How a gateway's rows are split into partitions ([`Parts`]).
#[derive(Clone, Copy, Debug)]
struct PartPolicy {
    /// Smallest partition worth rolling to ([`MIN_PART_ROWS`]).
    min_rows: u64,
    /// A fixed partition size with an exact cap (tests: many partitions, the semantics of one).
    fixed: Option<u64>,
}

impl PartPolicy {
    const DEFAULT: PartPolicy = PartPolicy { min_rows: MIN_PART_ROWS, fixed: None };

    /// Rows after which the gateway's newest partition is closed and a new one started (None: it
    /// keeps one).
    fn roll_rows(&self, r: Option<Retention>) -> Option<u64> {
        if let Some(f) = self.fixed {
            return Some(f.max(1));
        }
        let cap = r.map_or(u64::MAX, |r| r.max_records);
        let rows = (cap / PARTS_PER_CAP).min(MAX_PART_ROWS);
        (rows >= self.min_rows).then_some(rows)
    }

    /// How far under the cap dropping a whole partition may take a gateway: a partition and an
    /// eighth (a partition is closed at the first batch after it is full, so it can hold a batch
    /// more); none with a fixed size.
    fn slack(&self, roll: Option<u64>) -> u64 {
        match (self.fixed, roll) {
            (None, Some(rows)) => rows + rows / 8,
            _ => 0,
        }
    }
}

/// One partition: table `logs_p{seq}`.
#[derive(Clone, Copy, Debug)]
struct Part {
    seq: i64,
    /// Its first key (the next partition's first key ends it).
    lo: i64,
    /// Rows (kept in the transaction of every insert and delete).
    n: u64,
}

/// A gateway's partitions in key order (table `log_parts`). The gateway's key range ([`key`]) is
/// cut at millisecond boundaries: partition `i` holds the keys from its `lo` (the gateway's first
/// key for the oldest) to the next one's `lo` (the gateway's last key for the newest). New
/// records go to the newest; a record older than its start goes to the partition of its time.
/// Retention drops the oldest partition whole when that leaves the gateway at or above
/// `max_records` less [`PartPolicy::slack`], else deletes rows from its front.
struct Parts {
    no: i64,
    list: Vec<Part>,
}

/// The name of partition table `seq`.
fn part_table(seq: i64) -> String {
    format!("logs_p{seq}")
}

impl Parts {
    /// The partitions of gateway number `no`.
    fn load(conn: &Connection, no: i64) -> Result<Parts, StoreError> {
        let mut st =
            conn.prepare_cached("SELECT seq, lo, n FROM log_parts WHERE gateway = ?1 ORDER BY lo").map_err(sql_err)?;
        let rows = st
            .query_map([no], |r| Ok(Part { seq: r.get(0)?, lo: r.get(1)?, n: to_u64(r.get(2)?) }))
            .map_err(sql_err)?;
        let list = rows.collect::<Result<Vec<Part>, _>>().map_err(sql_err)?;
        Ok(Parts { no, list })
    }

    /// The table of partition `i`.
    fn table(&self, i: usize) -> String {
        part_table(self.list[i].seq)
    }

    /// The keys partition `i` holds.
    fn range(&self, i: usize) -> (i64, i64) {
        let (first, last) = gateway_keys(self.no);
        let lo = if i == 0 { first } else { self.list[i].lo };
        let hi = self.list.get(i + 1).map_or(last, |p| p.lo - 1);
        (lo, hi)
    }

    /// The partition holding key `k` (None when the gateway has none).
    fn at(&self, k: i64) -> Option<usize> {
        (!self.list.is_empty()).then(|| self.list.partition_point(|p| p.lo <= k).saturating_sub(1))
    }

    /// The partitions holding keys in `[lo, hi]`, oldest first, each with the part of the range
    /// it holds.
    fn span(&self, lo: i64, hi: i64) -> Vec<(usize, i64, i64)> {
        (0..self.list.len())
            .filter_map(|i| {
                let (a, b) = self.range(i);
                let (a, b) = (a.max(lo), b.min(hi));
                (a <= b).then_some((i, a, b))
            })
            .collect()
    }

    /// Creates a partition starting at key `lo` (after the newest one's keys) and makes it the
    /// newest.
    fn create(&mut self, tx: &Connection, lo: i64) -> Result<(), StoreError> {
        tx.prepare_cached("INSERT INTO log_parts (gateway, lo, n) VALUES (?1, ?2, 0)")
            .map_err(sql_err)?
            .execute([self.no, lo])
            .map_err(sql_err)?;
        let seq = tx.last_insert_rowid();
        tx.execute_batch(&create_part_sql(seq)).map_err(sql_err)?;
        self.list.push(Part { seq, lo, n: 0 });
        Ok(())
    }

    /// Adds `rows` (negative: removes) to partition `i`'s count.
    fn add(&mut self, tx: &Connection, i: usize, rows: i64) -> Result<(), StoreError> {
        let p = &mut self.list[i];
        if rows == 0 {
            return Ok(());
        }
        p.n = p.n.saturating_add_signed(rows);
        tx.prepare_cached("UPDATE log_parts SET n = ?2 WHERE seq = ?1")
            .map_err(sql_err)?
            .execute(params![p.seq, to_i64(p.n)])
            .map_err(sql_err)?;
        Ok(())
    }

    /// Drops partition `i` with its rows, releasing their bodies' segments; returns its rows.
    fn drop_part(&mut self, tx: &Transaction<'_>, bodies: &mut BodyFiles, i: usize) -> Result<u64, StoreError> {
        let p = self.list[i];
        let table = part_table(p.seq);
        // Its rows' bodies, counted per segment as they were inserted (no scan of the rows).
        let per_seg: Vec<(i64, i64)> = {
            let mut st = tx.prepare_cached("SELECT seg, n FROM log_part_segs WHERE seq = ?1").map_err(sql_err)?;
            let rows = st.query_map([p.seq], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql_err)?;
            rows.collect::<Result<_, _>>().map_err(sql_err)?
        };
        release_segments(tx, bodies, p.seq, per_seg)?;
        tx.prepare_cached("DELETE FROM log_part_segs WHERE seq = ?1")
            .map_err(sql_err)?
            .execute([p.seq])
            .map_err(sql_err)?;
        tx.execute_batch(&format!("DROP TABLE {table};")).map_err(sql_err)?;
        tx.prepare_cached("DELETE FROM log_parts WHERE seq = ?1")
            .map_err(sql_err)?
            .execute([p.seq])
            .map_err(sql_err)?;
        self.list.remove(i);
        Ok(p.n)
    }

    /// The newest (`newest`) or oldest key in partition `i`.
    fn end_key(&self, conn: &Connection, i: usize, newest: bool) -> Result<Option<i64>, StoreError> {
        let (lo, hi) = self.range(i);
        let f = if newest { "max" } else { "min" };
        conn.prepare_cached(&format!("SELECT {f}(k) FROM {} WHERE k BETWEEN ?1 AND ?2", self.table(i)))
            .map_err(sql_err)?
            .query_row([lo, hi], |r| r.get(0))
            .map_err(sql_err)
    }

    /// Starts a new partition for a batch when the newest holds `roll` rows or more (the first
    /// partition when the gateway has none). The new one starts at the millisecond after the
    /// newest row, so no millisecond is ever split.
    fn roll(&mut self, tx: &Connection, roll: Option<u64>) -> Result<(), StoreError> {
        let Some(last) = self.list.len().checked_sub(1) else {
            return self.create(tx, gateway_keys(self.no).0);
        };
        if roll.is_none_or(|rows| self.list[last].n < rows) {
            return Ok(());
        }
        let Some(newest) = self.end_key(tx, last, true)? else { return Ok(()) };
        let lo = (newest | (SLOTS - 1)) + 1;
        if lo > gateway_keys(self.no).1 {
            return Ok(());
        }
        self.create(tx, lo)
    }
}

/// Creates partition table `seq` with its event-id index.
fn create_part_sql(seq: i64) -> String {
    let table = part_table(seq);
    format!("{} {}", create_logs_sql(&table), part_index_sql(&table))
}

/// The event-id index of partition table `table`: most requests carry no event id, and a partial
/// index costs them nothing.
fn part_index_sql(table: &str) -> String {
    format!(
        "CREATE INDEX {table}_event_id ON {table}(gateway, event_id, created_at_ms, id) WHERE event_id IS NOT NULL;"
    )
}

/// The number of gateway `name` in this file, if it has one.
fn gateway_number(conn: &Connection, name: &str) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT no FROM log_gateways WHERE name = ?1")
        .map_err(sql_err)?
        .query_row([name], |r| r.get(0))
        .optional()
        .map_err(sql_err)
}

/// The number of gateway `name`, given one if it has none: the next unused, or, once all
/// [`MAX_GATEWAYS`] are taken, the number of a gateway without records.
fn gateway_number_or_new(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    if let Some(no) = gateway_number(conn, name)? {
        return Ok(no);
    }
    let next: i64 =
        conn.query_row("SELECT coalesce(max(no) + 1, 0) FROM log_gateways", [], |r| r.get(0)).map_err(sql_err)?;
    let no = if next < MAX_GATEWAYS {
        next
    } else {
        let mut free = None;
        let nos: Vec<i64> = {
            let mut st = conn.prepare("SELECT no FROM log_gateways ORDER BY no").map_err(sql_err)?;
            let nos = st.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
            nos.collect::<Result<_, _>>().map_err(sql_err)?
        };
        for no in nos {
            let used: bool = conn
                .query_row("SELECT EXISTS (SELECT 1 FROM log_parts WHERE gateway = ?1 AND n > 0)", [no], |r| r.get(0))
                .map_err(sql_err)?;
            if !used {
                free = Some(no);
                break;
            }
        }
        let Some(no) = free else {
            return Err(StoreError::Unavailable(format!(
                "log store: {MAX_GATEWAYS} gateways hold records, none is free for {name:?}"
            )));
        };
        conn.execute("DELETE FROM log_gateways WHERE no = ?1", [no]).map_err(sql_err)?;
        // Its partitions are empty: they go.
        for p in Parts::load(conn, no)?.list {
            conn.execute_batch(&format!("DROP TABLE {};", part_table(p.seq))).map_err(sql_err)?;
        }
        conn.execute("DELETE FROM log_parts WHERE gateway = ?1", [no]).map_err(sql_err)?;
        no
    };
    conn.execute("INSERT INTO log_gateways (name, no) VALUES (?1, ?2)", params![name, no]).map_err(sql_err)?;
    Ok(no)
}

/// Reads table `log_placed`, the milliseconds holding placed rows ([`Shared::placed`]).
fn load_placed(conn: &Connection) -> Result<BTreeSet<i64>, StoreError> {
    let mut st = conn.prepare("SELECT ms_key FROM log_placed").map_err(sql_err)?;
    let keys = st.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
    keys.collect::<Result<BTreeSet<i64>, _>>().map_err(sql_err)
}

/// Where [`place`] puts a record.
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    /// The record is stored already (same id and time).
    Stored,
    /// At this key, free.
    At(i64),
}

/// Finds the key of a record (`created_at_ms`, `id`) of gateway number `gateway` in `table` whose
/// own slot is taken or which has none: the record's millisecond is read (a few rows) and the
/// record goes to a free slot between its neighbours in `(created_at_ms, id)` order, the slot its
/// id names if that one qualifies; when none is free between them, the millisecond's rows are
/// spread over the slots again. A millisecond where a row lands elsewhere than its own slot is
/// noted in table `log_placed`. Errors when the millisecond holds [`SLOTS`] records already.
fn place(conn: &Connection, table: &str, gateway: i64, created_at_ms: u64, id: &str) -> Result<Placement, StoreError> {
    let (lo, hi) = ms_keys(gateway, created_at_ms);
    let mut rows: Vec<(i64, i64, String)> = Vec::new();
    {
        let mut st = conn
            .prepare_cached(&format!("SELECT k, created_at_ms, id FROM {table} WHERE k BETWEEN ?1 AND ?2 ORDER BY k"))
            .map_err(sql_err)?;
        let found = st.query_map([lo, hi], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_err)?;
        for row in found {
            rows.push(row.map_err(sql_err)?);
        }
    }
    let me = (to_i64(created_at_ms), id);
    if rows.iter().any(|(_, t, i)| (*t, i.as_str()) == me) {
        return Ok(Placement::Stored);
    }
    // Rows before `me` come first (keys sort as the rows do).
    let before = rows.partition_point(|(_, t, i)| (*t, i.as_str()) < me);
    let low = if before == 0 { lo } else { rows[before - 1].0 + 1 };
    let high = rows.get(before).map_or(hi, |r| r.0 - 1);
    let own = own_key(gateway, created_at_ms, id);
    let mark = || {
        conn.prepare_cached("INSERT OR IGNORE INTO log_placed (ms_key) VALUES (?1)")
            .and_then(|mut st| st.execute([lo]))
            .map_err(sql_err)
    };
    if low <= high {
        let k = own.filter(|k| (low..=high).contains(k)).unwrap_or(low + (high - low) / 2);
        if Some(k) != own {
            mark()?;
        }
        return Ok(Placement::At(k));
    }
    if rows.len() >= SLOTS as usize {
        return Err(StoreError::Unavailable(format!(
            "log store: millisecond {created_at_ms} holds {SLOTS} records of one gateway already"
        )));
    }
    // No free slot between the neighbours: spread the millisecond's rows (and the new one) evenly,
    // moving them out of the way first (negative keys are never used otherwise).
    let n = rows.len() as i64 + 1;
    let slot_of = |i: i64| lo + i * SLOTS / n;
    mark()?;
    conn.execute(&format!("UPDATE {table} SET k = -1 - k WHERE k BETWEEN ?1 AND ?2"), [lo, hi]).map_err(sql_err)?;
    let mut mv = conn.prepare_cached(&format!("UPDATE {table} SET k = ?2 WHERE k = ?1")).map_err(sql_err)?;
    for (i, (k, _, _)) in rows.iter().enumerate() {
        let i = i as i64;
        let to = slot_of(if i < before as i64 { i } else { i + 1 });
        mv.execute([-1 - k, to]).map_err(sql_err)?;
    }
    Ok(Placement::At(slot_of(before as i64)))
}

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
    /// never meet on a slot (at most 4096 a millisecond); rows of schema 5 and other ids add to it.
    placed: Mutex<BTreeSet<i64>>,
    /// How the gateways' rows are split into partitions.
    policy: PartPolicy,
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

/// The gateway's row count.
fn count_rows(tx: &Connection, gateway: &str) -> Result<u64, StoreError> {
    let n: Option<i64> = tx
        .prepare_cached("SELECT n FROM log_counts WHERE gateway = ?1")
        .map_err(sql_err)?
        .query_row([gateway], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    Ok(n.map_or(0, to_u64))
}

/// Stores the gateway's row count.
fn set_count(tx: &Transaction<'_>, gateway: &str, n: u64) -> Result<(), StoreError> {
    if n == 0 {
        tx.prepare_cached("DELETE FROM log_counts WHERE gateway = ?1").map_err(sql_err)?.execute([gateway])
    } else {
        tx.prepare_cached(
            "INSERT INTO log_counts (gateway, n) VALUES (?1, ?2) ON CONFLICT (gateway) DO UPDATE SET n = excluded.n",
        )
        .map_err(sql_err)?
        .execute(params![gateway, to_i64(n)])
    }
    .map_err(sql_err)?;
    Ok(())
}

/// What a row deletion returns: where the deleted rows' bodies were.
const RETURNING_BODIES: &str = "RETURNING body_seg, body_off, request_len, response_len";

/// Runs a `DELETE ... RETURNING_BODIES` statement on partition `seq` and releases the deleted
/// rows' bodies (blanking them first when `blank`); returns how many rows it deleted.
fn delete_rows<P: rusqlite::Params>(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    seq: i64,
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
    release_bodies(tx, bodies, seq, &refs, blank)?;
    Ok(n)
}

/// Counts deleted rows' bodies off their segments (overwriting them first when `blank`) and marks
/// the segments no row points into any more for removal once the transaction commits.
fn release_bodies(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    seq: i64,
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
    release_segments(tx, bodies, seq, per_seg)
}

/// Takes `rows` deleted rows of partition `seq` off each segment's counts (the segment's and the
/// partition's, `log_part_segs`) and marks the segments no row points into any more for removal
/// once the transaction commits.
fn release_segments(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    seq: i64,
    per_seg: impl IntoIterator<Item = (i64, i64)>,
) -> Result<(), StoreError> {
    let mut dec = tx.prepare_cached("UPDATE body_segments SET live = live - ?2 WHERE seg = ?1").map_err(sql_err)?;
    let mut dec_part =
        tx.prepare_cached("UPDATE log_part_segs SET n = n - ?3 WHERE seq = ?1 AND seg = ?2").map_err(sql_err)?;
    let mut any = false;
    for (seg, k) in per_seg {
        dec.execute(params![seg, k]).map_err(sql_err)?;
        dec_part.execute(params![seq, seg, k]).map_err(sql_err)?;
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

/// The table and key of the gateway's row with id `id`, if there is one. A UUIDv7 id (the gateway
/// makes every id so, [`crate::log::log_id_at`]) names its time and, mostly, its slot: the row is
/// read at that key, else searched for in its millisecond (placed elsewhere: [`place`]); any other
/// id by a scan of the gateway's rows.
fn find_id(conn: &Connection, gateway: &str, id: &str) -> Result<Option<(String, i64)>, StoreError> {
    let Some(no) = gateway_number(conn, gateway)? else { return Ok(None) };
    let parts = Parts::load(conn, no)?;
    // The first row with this id in the gateway's keys [lo, hi].
    let within = |lo: i64, hi: i64| -> Result<Option<(String, i64)>, StoreError> {
        for (i, lo, hi) in parts.span(lo, hi) {
            let table = parts.table(i);
            let k: Option<i64> = conn
                .prepare_cached(&format!("SELECT k FROM {table} WHERE k BETWEEN ?1 AND ?2 AND id = ?3 LIMIT 1"))
                .map_err(sql_err)?
                .query_row(params![lo, hi, id], |r| r.get(0))
                .optional()
                .map_err(sql_err)?;
            if let Some(k) = k {
                return Ok(Some((table, k)));
            }
        }
        Ok(None)
    };
    let Some(t) = crate::log::log_id_time_ms(id) else {
        let (lo, hi) = gateway_keys(no);
        return within(lo, hi);
    };
    if let Some(k) = own_key(no, t, id) {
        if let Some(found) = within(k, k)? {
            return Ok(Some(found));
        }
    }
    let (lo, hi) = ms_keys(no, t);
    within(lo, hi)
}

/// Deletes the gateway's `n` oldest rows among those created before `before_ms` (all of its rows
/// when `None`), oldest partition first; returns how many.
fn delete_front(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    parts: &mut Parts,
    before_ms: Option<u64>,
    n: u64,
) -> Result<u64, StoreError> {
    let Some((lo, hi)) = time_keys(parts.no, None, before_ms) else { return Ok(0) };
    let mut deleted = 0;
    for (i, lo, hi) in parts.span(lo, hi) {
        if deleted >= n {
            break;
        }
        let d = delete_front_in(tx, bodies, parts.list[i].seq, (lo, hi), n - deleted)?;
        parts.add(tx, i, -to_i64(d))?;
        deleted += d;
    }
    Ok(deleted)
}

/// Deletes the `n` first rows of partition `seq` in the keys `[lo, hi]`; returns how many. The
/// key of the `n`-th is found first and everything up to it is deleted as one range, without `RETURNING`
/// (which would make SQLite collect the keys and seek each row again); the bodies' segments are
/// counted from the same range beforehand. (Deleting `IN (SELECT … LIMIT n)` cost about as much
/// per row as inserting one.)
fn delete_front_in(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    seq: i64,
    (lo, hi): (i64, i64),
    n: u64,
) -> Result<u64, StoreError> {
    if n == 0 {
        return Ok(0);
    }
    let table = part_table(seq);
    let last: Option<i64> = tx
        .prepare_cached(&format!("SELECT k FROM {table} WHERE k BETWEEN ?1 AND ?2 ORDER BY k LIMIT 1 OFFSET ?3"))
        .map_err(sql_err)?
        .query_row(params![lo, hi, to_i64(n - 1)], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    // Fewer than n such rows: all of them go.
    let hi = last.unwrap_or(hi);
    let mut per_seg = Vec::new();
    {
        let mut st = tx
            .prepare_cached(&format!(
                "SELECT body_seg, count(*) FROM {table} WHERE k BETWEEN ?1 AND ?2 AND body_seg IS NOT NULL \
                 GROUP BY body_seg"
            ))
            .map_err(sql_err)?;
        let rows = st.query_map([lo, hi], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).map_err(sql_err)?;
        for row in rows {
            per_seg.push(row.map_err(sql_err)?);
        }
    }
    let deleted = tx
        .prepare_cached(&format!("DELETE FROM {table} WHERE k BETWEEN ?1 AND ?2"))
        .map_err(sql_err)?
        .execute([lo, hi])
        .map_err(sql_err)? as u64;
    release_segments(tx, bodies, seq, per_seg)?;
    Ok(deleted)
}

/// The millisecond of key `k`.
fn key_ms(k: i64) -> u64 {
    ((k >> SLOT_BITS) as u64) & MAX_KEY_MS
}

/// Removes the gateway's rows created before `cutoff_ms`: its oldest partitions whole while their
/// newest row is (never the newest partition), then at most `chunk` rows from the front. Returns
/// the rows removed.
fn expire(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    parts: &mut Parts,
    cutoff_ms: u64,
    chunk: u64,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    while parts.list.len() >= 2 {
        if parts.end_key(tx, 0, true)?.is_some_and(|k| key_ms(k) >= cutoff_ms) {
            break;
        }
        removed += parts.drop_part(tx, bodies, 0)?;
    }
    Ok(removed + delete_front(tx, bodies, parts, Some(cutoff_ms), chunk)?)
}

/// Brings a gateway holding `n` rows down to `max_records`: its oldest partitions whole while what
/// is left stays at or above `max_records` less the policy's slack (never the newest partition),
/// then at most `chunk` rows from the front. Returns the rows removed.
fn trim_to_cap(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    (parts, policy): (&mut Parts, PartPolicy),
    r: &Retention,
    n: u64,
    chunk: u64,
) -> Result<u64, StoreError> {
    let floor = r.max_records.saturating_sub(policy.slack(policy.roll_rows(Some(*r))));
    let (mut left, mut removed) = (n, 0);
    while left > r.max_records && parts.list.len() >= 2 && left.saturating_sub(parts.list[0].n) >= floor {
        let d = parts.drop_part(tx, bodies, 0)?;
        removed += d;
        left = left.saturating_sub(d);
    }
    if left > r.max_records {
        removed += delete_front(tx, bodies, parts, None, (left - r.max_records).min(chunk))?;
    }
    Ok(removed)
}

/// One step of [`LogStore::enforce_retention`] on a gateway holding `n` rows: drops its empty
/// partitions but the newest, removes rows created before `cutoff_ms` (whole partitions, then at
/// most [`DELETE_CHUNK_ROWS`] rows), then (DeleteOldest only) the oldest beyond the cap. Returns
/// the rows removed.
fn retention_step(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    (parts, policy): (&mut Parts, PartPolicy),
    r: &Retention,
    cutoff_ms: Option<u64>,
    n: u64,
) -> Result<u64, StoreError> {
    while let Some(i) = (0..parts.list.len().saturating_sub(1)).find(|&i| parts.list[i].n == 0) {
        parts.drop_part(tx, bodies, i)?;
    }
    let mut removed = 0;
    if let Some(cutoff) = cutoff_ms {
        removed += expire(tx, bodies, parts, cutoff, DELETE_CHUNK_ROWS)?;
    }
    let left = n.saturating_sub(removed);
    if r.at_cap == AtCap::DeleteOldest && left > r.max_records && removed < DELETE_CHUNK_ROWS {
        removed += trim_to_cap(tx, bodies, (parts, policy), r, left, DELETE_CHUNK_ROWS - removed)?;
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
    conn: &Connection,
    stmt: &mut rusqlite::CachedStatement<'_>,
    (gateway, no, table): (&str, i64, &str),
    placed: &mut BTreeSet<i64>,
    r: &'a LogRecord,
    body: Option<BodyRef>,
    prev: Option<&PrevRow<'_>>,
) -> Result<(bool, PrevRow<'a>), StoreError> {
    let metadata = metadata_object_json(&r.metadata);
    let bind = |stmt: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
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
        Ok(())
    };
    bind(stmt).map_err(sql_err)?;
    let mut execute_at = |k: i64| -> Result<bool, StoreError> {
        stmt.raw_bind_parameter(33, k).map_err(sql_err)?;
        Ok(stmt.raw_execute().map_err(sql_err)? > 0)
    };
    // Mostly: the slot the id names is free, in a millisecond holding no placed row.
    let ms_key = ms_keys(no, r.created_at_ms).0;
    let own = own_key(no, r.created_at_ms, &r.id);
    let new = match own.filter(|_| !placed.contains(&ms_key)) {
        Some(k) if execute_at(k)? => true,
        _ => match place(conn, table, no, r.created_at_ms, &r.id)? {
            Placement::Stored => false,
            Placement::At(k) => {
                if Some(k) != own {
                    // `place` noted it in the table (a rolled-back batch leaves the set a
                    // millisecond too many: harmless).
                    placed.insert(ms_key);
                }
                execute_at(k)?
            }
        },
    };
    Ok((new, PrevRow { record: r, metadata, body }))
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

/// Decodes a row of [`LIST_COLUMNS`] (the bodies are read apart, from their segment).
fn decode(row: &Row<'_>) -> rusqlite::Result<Result<LogRecord, StoreError>> {
    let opt_u64 = |i: usize| -> rusqlite::Result<Option<u64>> { Ok(row.get::<_, Option<i64>>(i)?.map(to_u64)) };
    let metadata: Option<String> = row.get(23)?;
    let metadata = match metadata.as_deref().map(metadata_from_object_json).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return Ok(Err(e)),
    };
    let status: i64 = row.get(8)?;
    let feedback: Option<i64> = row.get(26)?;
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
        request_body: None,
        response_body: None,
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
        let shared = self.inner.clone();
        self.write(move |tx, bodies| {
            let no = gateway_number_or_new(tx, &gateway)?;
            let policy = shared.policy;
            let mut parts = Parts::load(tx, no)?;
            parts.roll(tx, policy.roll_rows(retention))?;
            let mut placed = shared.placed.lock().unwrap_or_else(PoisonError::into_inner);
            let mut n = count_rows(tx, &gateway)?;
            let mut removed = 0;
            let cap = match retention {
                Some(r) if r.at_cap == AtCap::StopInserting => {
                    // Make room from expired rows before refusing any.
                    if let Some(age) = r.max_age_ms.filter(|_| n.saturating_add(records.len() as u64) > r.max_records) {
                        let d = expire(tx, bodies, &mut parts, now_ms().saturating_sub(age), DELETE_CHUNK_ROWS)?;
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
            // Rows inserted per partition, and of them with bodies.
            let mut added = vec![(0i64, 0i64); parts.list.len()];
            // Rows inserted that point into the batch's body segment.
            let mut with_bodies = 0i64;
            if records.iter().any(|r| r.request_body.is_some() || r.response_body.is_some()) {
                bodies.begin()?;
            }
            {
                // The statement of the partition the last record went to (nearly always the
                // newest).
                let mut current: Option<(usize, String, rusqlite::CachedStatement<'_>)> = None;
                let mut prev: Option<PrevRow<'_>> = None;
                for (i, r) in records.iter().enumerate() {
                    if cap.is_some_and(|cap| n >= cap) {
                        stopped_at = i;
                        break;
                    }
                    let part = parts.at(ms_keys(no, r.created_at_ms).0).unwrap_or(0);
                    if current.as_ref().is_none_or(|c| c.0 != part) {
                        // Another statement: its bindings are not the previous row's.
                        drop(current.take());
                        prev = None;
                        let table = parts.table(part);
                        let stmt = tx.prepare_cached(&insert_sql(&table)).map_err(sql_err)?;
                        current = Some((part, table, stmt));
                    }
                    let Some((_, table, stmt)) = current.as_mut() else { unreachable!("set above") };
                    let body = bodies.add(r.request_body.as_ref(), r.response_body.as_ref());
                    let (new, bound) =
                        insert_one(tx, stmt, (&gateway, no, table.as_str()), &mut placed, r, body, prev.as_ref())?;
                    prev = Some(bound);
                    if new {
                        n += 1;
                        inserted += 1;
                        with_bodies += i64::from(body.is_some());
                        added[part].0 += 1;
                        added[part].1 += i64::from(body.is_some());
                        counted.push(r);
                    }
                }
            }
            for (i, &(rows, _)) in added.iter().enumerate() {
                parts.add(tx, i, rows)?;
            }
            // The bodies reach the file before the rows pointing at them commit; the rows pointing
            // into the segment are counted for it and for each partition (which then needs no scan
            // when it is dropped).
            if let Some(seg) = bodies.flush()? {
                if with_bodies > 0 {
                    tx.prepare_cached(
                        "INSERT INTO body_segments (seg, live) VALUES (?1, ?2) \
                         ON CONFLICT (seg) DO UPDATE SET live = live + excluded.live",
                    )
                    .map_err(sql_err)?
                    .execute(params![seg, with_bodies])
                    .map_err(sql_err)?;
                    let mut per_part = tx
                        .prepare_cached(
                            "INSERT INTO log_part_segs (seq, seg, n) VALUES (?1, ?2, ?3) \
                             ON CONFLICT (seq, seg) DO UPDATE SET n = n + excluded.n",
                        )
                        .map_err(sql_err)?;
                    for (i, &(_, with)) in added.iter().enumerate().filter(|(_, a)| a.1 > 0) {
                        per_part.execute(params![parts.list[i].seq, seg, with]).map_err(sql_err)?;
                    }
                }
            }
            if stopped_at < records.len() {
                // Dropped at the cap: still traffic, unless a duplicate id.
                let mut seen = HashSet::new();
                for r in &records[stopped_at..] {
                    let (lo, hi) = ms_keys(no, r.created_at_ms);
                    if !seen.insert((r.created_at_ms, r.id.as_str())) {
                        continue;
                    }
                    let stored = match parts.at(lo) {
                        Some(i) => tx
                            .prepare_cached(&format!(
                                "SELECT 1 FROM {} WHERE k BETWEEN ?1 AND ?2 AND created_at_ms = ?3 AND id = ?4",
                                parts.table(i)
                            ))
                            .map_err(sql_err)?
                            .exists(params![lo, hi, to_i64(r.created_at_ms), r.id])
                            .map_err(sql_err)?,
                        None => false,
                    };
                    if !stored {
                        counted.push(r);
                    }
                }
            }
            upsert_rollups(tx, &gateway, &aggregate(counted))?;
            if let Some(r) = retention.filter(|r| r.at_cap == AtCap::DeleteOldest && n > r.max_records) {
                let chunk = DELETE_CHUNK_ROWS.max(records.len() as u64);
                let d = trim_to_cap(tx, bodies, (&mut parts, policy), &r, n, chunk)?;
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
        // The filter is checked first (an invalid one is an error for a gateway without rows too).
        let w = filter_sql(Dialect::Sqlite, gateway, filter, false)?;
        let cursor = filter.cursor.as_deref().map(decode_cursor).transpose().map_err(crate::log::invalid)?;
        let limit = filter.effective_limit() as usize;
        let (gateway, from_ms, to_ms) = (gateway.to_owned(), filter.from_ms, filter.to_ms);
        self.read(move |db| {
            let empty = LogPage { records: Vec::new(), next_cursor: None };
            let Some(no) = gateway_number(&db.conn, &gateway)? else { return Ok(empty) };
            let Some((lo, mut hi)) = time_keys(no, from_ms, to_ms) else { return Ok(empty) };
            let parts = Parts::load(&db.conn, no)?;
            let mut w = w;
            if let Some((ms, id)) = &cursor {
                // After the cursor's row: below its key; if that row is gone, before it in
                // (created_at_ms, id) order, as the keys sort.
                let (ms_lo, ms_hi) = ms_keys(no, *ms);
                let at: Option<i64> = match parts.at(ms_lo) {
                    Some(i) => db
                        .conn
                        .prepare_cached(&format!(
                            "SELECT k FROM {} WHERE k BETWEEN ?1 AND ?2 AND created_at_ms = ?3 AND id = ?4",
                            parts.table(i)
                        ))
                        .map_err(sql_err)?
                        .query_row(params![ms_lo, ms_hi, to_i64(*ms), id], |r| r.get(0))
                        .optional()
                        .map_err(sql_err)?,
                    None => None,
                };
                match at {
                    Some(k) => hi = hi.min(k - 1),
                    None => {
                        hi = hi.min(ms_hi);
                        let p = w.param(SqlValue::Int(to_i64(*ms)));
                        let q = w.param(SqlValue::Text(id.clone()));
                        w.and(&format!("(created_at_ms, id) < ({p}, {q})"));
                    }
                }
            }
            // Newest partition first, each in key order down, until the page (and one more row,
            // which says whether there is a next page) is full.
            let mut records = Vec::with_capacity(limit.min(64));
            for (i, lo, hi) in parts.span(lo, hi).into_iter().rev() {
                let want = limit + 1 - records.len();
                if want == 0 {
                    break;
                }
                let mut w = w.clone();
                let p = w.param(SqlValue::Int(lo));
                let q = w.param(SqlValue::Int(hi));
                w.and(&format!("k BETWEEN {p} AND {q}"));
                let l = w.param(SqlValue::Int(to_i64(want as u64)));
                let sql =
                    format!("SELECT {LIST_COLUMNS} FROM {} WHERE {} ORDER BY k DESC LIMIT {l}", parts.table(i), w.sql);
                let mut stmt = db.conn.prepare_cached(&sql).map_err(sql_err)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(w.params.iter()), decode).map_err(sql_err)?;
                for row in rows {
                    records.push(row.map_err(sql_err)??);
                }
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
        self.read(move |db| {
            let Some((table, k)) = find_id(&db.conn, &gateway, &id)? else { return Ok(None) };
            let sql = format!(
                "SELECT {LIST_COLUMNS}, body_seg, body_off, request_len, response_len FROM {table} WHERE k = ?1"
            );
            let mut stmt = db.conn.prepare_cached(&sql).map_err(sql_err)?;
            let found = stmt
                .query_row([k], |r| {
                    let body = match (r.get::<_, Option<i64>>(28)?, r.get::<_, Option<i64>>(29)?) {
                        (Some(seg), Some(off)) => {
                            Some(BodyRef { seg, off, request_len: r.get(30)?, response_len: r.get(31)? })
                        }
                        _ => None,
                    };
                    Ok((decode(r)?, body))
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
        let w = Arc::new(filter_sql(Dialect::Sqlite, gateway, filter, false)?);
        let (from_ms, to_ms) = (filter.from_ms, filter.to_ms);
        let mut total = 0;
        loop {
            let (w, gateway) = (w.clone(), gateway.to_owned());
            let d = self
                .write(move |tx, bodies| {
                    let Some(no) = gateway_number(tx, &gateway)? else { return Ok((0, 0)) };
                    let Some((lo, hi)) = time_keys(no, from_ms, to_ms) else { return Ok((0, 0)) };
                    let mut parts = Parts::load(tx, no)?;
                    let mut d = 0;
                    for (i, lo, hi) in parts.span(lo, hi) {
                        if d >= DELETE_CHUNK_ROWS {
                            break;
                        }
                        let table = parts.table(i);
                        let mut w = (*w).clone();
                        let p = w.param(SqlValue::Int(lo));
                        let q = w.param(SqlValue::Int(hi));
                        w.and(&format!("k BETWEEN {p} AND {q}"));
                        let l = w.param(SqlValue::Int(to_i64(DELETE_CHUNK_ROWS - d)));
                        let sql = format!(
                            "DELETE FROM {table} WHERE k IN (SELECT k FROM {table} WHERE {} LIMIT {l}) \
                             {RETURNING_BODIES}",
                            w.sql
                        );
                        // Deleted on request: the bodies are overwritten at once, not when their
                        // segment goes.
                        let seq = parts.list[i].seq;
                        let di = delete_rows(tx, bodies, seq, &sql, rusqlite::params_from_iter(w.params.iter()), true)?;
                        parts.add(tx, i, -to_i64(di))?;
                        d += di;
                    }
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
            let Some((table, k)) = find_id(tx, &gateway, &id)? else { return Ok((false, 0)) };
            let n = tx
                .execute(
                    &format!(
                        "UPDATE {table} SET feedback = COALESCE(?2, feedback), score = COALESCE(?3, score) WHERE k = ?1"
                    ),
                    params![k, feedback.map(i64::from), score],
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
        let policy = self.inner.policy;
        let mut total = 0;
        loop {
            let gateway = gateway.to_owned();
            let d = self
                .write(move |tx, bodies| {
                    let Some(no) = gateway_number(tx, &gateway)? else { return Ok((0, 0)) };
                    let mut parts = Parts::load(tx, no)?;
                    let n = count_rows(tx, &gateway)?;
                    let removed = retention_step(tx, bodies, (&mut parts, policy), &r, cutoff, n)?;
                    if removed > 0 {
                        set_count(tx, &gateway, n.saturating_sub(removed))?;
                    }
                    Ok((removed, removed))
                })
                .await?;
            total += d;
            if d < DELETE_CHUNK_ROWS {
                break;
            }
        }
        // Placed-row notes of milliseconds before the gateway's oldest row go.
        let (gateway, shared) = (gateway.to_owned(), self.inner.clone());
        self.write(move |tx, _| {
            let Some(no) = gateway_number(tx, &gateway)? else { return Ok(((), 0)) };
            let (lo, hi) = gateway_keys(no);
            let parts = Parts::load(tx, no)?;
            let mut oldest = None;
            for i in 0..parts.list.len() {
                oldest = parts.end_key(tx, i, false)?;
                if oldest.is_some() {
                    break;
                }
            }
            let below = oldest.map_or(hi, |k| (k & !(SLOTS - 1)) - 1);
            let gone =
                tx.execute("DELETE FROM log_placed WHERE ms_key BETWEEN ?1 AND ?2", [lo, below]).map_err(sql_err)?;
            if gone > 0 {
                *shared.placed.lock().unwrap_or_else(PoisonError::into_inner) = load_placed(tx)?;
            }
            Ok(((), 0))
        })
        .await?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::log_id_at;
    use bytes::Bytes;

    fn index_names(conn: &Connection, table: &str) -> Vec<String> {
        let mut st = conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?1").unwrap();
        let names = st.query_map([table], |r| r.get::<_, String>(0)).unwrap();
        names.map(Result::unwrap).collect()
    }

    /// The partition tables of gateway `gateway`, oldest first.
    fn part_tables(conn: &Connection, gateway: &str) -> Vec<String> {
        let mut st = conn
            .prepare(
                "SELECT seq FROM log_parts JOIN log_gateways ON log_gateways.no = log_parts.gateway \
                 WHERE log_gateways.name = ?1 ORDER BY lo",
            )
            .unwrap();
        let seqs = st.query_map([gateway], |r| r.get::<_, i64>(0)).unwrap();
        seqs.map(|s| part_table(s.unwrap())).collect()
    }

    fn temp_path(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("aigate-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dir.join(LOG_SQLITE_FILE), dir)
    }

    /// A file of another schema (an older development build's) is refused at open, unchanged, with
    /// a message saying what to do; so is a file holding other tables.
    #[test]
    fn a_file_of_another_schema_is_refused() {
        let (path, dir) = temp_path("schema-5");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE logs (id TEXT); PRAGMA user_version = 5;").unwrap();
        }
        let err = SqliteLogStore::open(&path).unwrap_err().to_string();
        assert!(
            err.contains(
                "logs.sqlite3 has log schema 5; this aigate reads schema 7 only (the file comes from a development \
                 build): move it away or delete it, and aigate creates a new one"
            ),
            "{err}"
        );
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!((version, mode.as_str()), (5, "delete"), "the file is left as it was");
        conn.execute_batch("PRAGMA user_version = 0;").unwrap();
        drop(conn);
        let err = SqliteLogStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("logs.sqlite3 has tables but no log schema; this aigate reads schema 7 only"), "{err}");
        // Moved away: a new file is created, and reopened as it is.
        std::fs::remove_file(&path).unwrap();
        drop(SqliteLogStore::open(&path).unwrap());
        let s = SqliteLogStore::open(&path).unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A lookup by event id uses the partition's partial index (`event_id = ?` implies `IS NOT
    /// NULL`).
    #[tokio::test]
    async fn an_event_id_lookup_uses_the_partial_index() {
        let (path, dir) = temp_path("event-index");
        let s = SqliteLogStore::open(&path).unwrap();
        s.insert_batch("default", &[record("a", now_ms())]).await.unwrap();
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let table = part_tables(&conn, "default").remove(0);
        let names = index_names(&conn, &table);
        assert_eq!(names, [format!("{table}_event_id")]);
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT id FROM {table} WHERE gateway = ?1 AND event_id = ?2 \
                 ORDER BY created_at_ms DESC, id DESC LIMIT 50"
            ))
            .unwrap()
            .query_map(params!["default", "ev-1"], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(plan.iter().any(|p| p.contains(&names[0])), "{plan:?}");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_lookup_by_id_uses_the_key() {
        let (path, dir) = temp_path("plan");
        let s = SqliteLogStore::open(&path).unwrap();
        s.insert_batch("g", &[record("x", now_ms())]).await.unwrap();
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let table = part_tables(&conn, "g").remove(0);
        let page_size: u32 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page_size, PAGE_SIZE, "a new file gets the larger page size");
        let plan = |sql: &str| -> String {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = st.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        };
        for sql in [
            "SELECT k FROM logs WHERE k = 5 AND id = 'x'",
            "SELECT k FROM logs WHERE k BETWEEN 4 AND 6 AND id = 'x' LIMIT 1",
            "SELECT k FROM logs WHERE k BETWEEN 4 AND 6 AND created_at_ms = 5 AND id = 'x'",
            "SELECT k, created_at_ms, id FROM logs WHERE k BETWEEN 4 AND 6 ORDER BY k",
            "SELECT k FROM logs WHERE k BETWEEN 4 AND 6 ORDER BY k LIMIT 1 OFFSET 9",
            "SELECT body_seg, count(*) FROM logs WHERE k BETWEEN 4 AND 6 AND body_seg IS NOT NULL GROUP BY body_seg",
            "DELETE FROM logs WHERE k BETWEEN 4 AND 6",
            "DELETE FROM logs WHERE k IN (SELECT k FROM logs WHERE gateway = 'g' AND status >= 500 \
             AND k BETWEEN 4 AND 6 LIMIT 10)",
            "SELECT id FROM logs WHERE gateway = 'g' AND status = 200 AND k BETWEEN 4 AND 6 ORDER BY k DESC LIMIT 51",
        ] {
            let sql = sql.replace("logs", &table);
            let p = plan(&sql);
            assert!(p.contains("USING INTEGER PRIMARY KEY"), "{sql}: {p}");
            assert!(!p.contains(&format!("SCAN {table}")) && !p.contains("TEMP B-TREE FOR ORDER BY"), "{sql}: {p}");
        }
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A minimal record (the store is told its gateway separately).
    fn record(id: &str, created_at_ms: u64) -> LogRecord {
        LogRecord {
            id: id.to_owned(),
            created_at_ms,
            gateway: "gw".into(),
            provider: "openai".into(),
            path: "chat/completions".into(),
            status: 200,
            success: true,
            cache_status: "MISS".into(),
            duration_ms: 1.0,
            ..LogRecord::default()
        }
    }

    /// Every record of `gw`, newest first, read in pages of `limit`.
    async fn listed(s: &SqliteLogStore, gw: &str, limit: u32) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut f = LogFilter { limit: Some(limit), ..LogFilter::default() };
        loop {
            let page = s.list(gw, &f).await.unwrap();
            out.extend(page.records.into_iter().map(|r| (r.created_at_ms, r.id)));
            match page.next_cursor {
                Some(c) => f.cursor = Some(c),
                None => return out,
            }
        }
    }

    /// A UUIDv7 of millisecond `ms` whose rand_a counter is `counter`.
    fn id_with_counter(ms: u64, counter: u16, tail: u8) -> String {
        let mut b = *log_id_at(ms).as_bytes();
        let [hi, lo] = counter.to_be_bytes();
        (b[6], b[7], b[15]) = (0x70 | hi, lo, tail);
        uuid::Uuid::from_bytes(b).to_string()
    }

    #[tokio::test]
    async fn records_go_to_the_slot_their_id_names_or_between_their_neighbours() {
        let (path, dir) = temp_path("slots");
        let s = SqliteLogStore::open(&path).unwrap();
        let t = now_ms() - 10_000;
        // Ids the gateway made sit at the slot their counter names.
        let made: Vec<String> = (0..3).map(|_| log_id_at(t).to_string()).collect();
        let recs: Vec<LogRecord> = made.iter().map(|id| record(id, t)).collect();
        assert_eq!(s.insert_batch("gw", &recs).await.unwrap(), 3);
        // Two ids on one slot, ids that name none, and a burst at one millisecond in id order
        // (more than the halving of free slots allows: the millisecond is spread again).
        let mut others =
            vec![record(&id_with_counter(t + 1, 7, 1), t + 1), record(&id_with_counter(t + 1, 7, 2), t + 1)];
        others.push(record(&id_with_counter(t + 1, 7, 0), t + 1));
        others.extend((0..40).map(|i| record(&format!("burst-{i:03}"), t + 2)));
        others.extend((0..5).rev().map(|i| record(&format!("late-{i}"), t + 1)));
        others.push(record(&made[1], t + 3)); // the same id at another time is another record
        assert_eq!(s.insert_batch("gw", &others).await.unwrap(), others.len() as u64);
        // Replays are no-ops, wherever the record was placed.
        assert_eq!(s.insert_batch("gw", &others).await.unwrap(), 0);
        assert_eq!(s.insert_batch("gw", &recs).await.unwrap(), 0);
        let mut want: Vec<(u64, String)> =
            recs.iter().chain(&others).map(|r| (r.created_at_ms, r.id.clone())).collect();
        want.sort_by(|a, b| b.cmp(a));
        for limit in [1, 3, 7, 100] {
            assert_eq!(listed(&s, "gw", limit).await, want, "limit {limit}");
        }
        for r in recs.iter().chain(&others) {
            let got = s.get("gw", &r.id).await.unwrap().unwrap();
            assert_eq!(got.id, r.id);
        }
        assert_eq!(s.count("gw").await.unwrap(), want.len() as u64);
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let no: i64 = conn.query_row("SELECT no FROM log_gateways WHERE name = 'gw'", [], |r| r.get(0)).unwrap();
        let table = part_tables(&conn, "gw").remove(0);
        for id in &made {
            let k: i64 = conn
                .query_row(
                    &format!("SELECT k FROM {table} WHERE id = ?1 AND created_at_ms = ?2"),
                    params![id, to_i64(t)],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(k, key(no, t, i64::from(log_id_counter(id, t).unwrap())), "{id}");
        }
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Partitions and what retention does with them: a partition of a sixteenth of the cap (here
    /// 8 rows of a cap of 128: the minimum lowered to 8) is closed when full; at the cap the
    /// oldest goes whole, keeping the gateway between the cap less a partition and an eighth, and
    /// the cap; the listing, lookups and counts stay those of the newest records.
    #[tokio::test]
    async fn at_the_cap_the_oldest_partition_goes_whole() {
        let (path, dir) = temp_path("parts");
        let s = SqliteLogStore::open_with(&path, PartPolicy { min_rows: 8, fixed: None }).unwrap();
        s.set_retention("gw", Retention { max_records: 128, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        let t = now_ms() - 100_000;
        let mut all: Vec<(u64, String)> = Vec::new();
        let mut counts = Vec::new();
        for i in 0..300u64 {
            let r = record(&log_id_at(t + i).to_string(), t + i);
            assert_eq!(s.insert_batch("gw", std::slice::from_ref(&r)).await.unwrap(), 1);
            all.push((r.created_at_ms, r.id));
            counts.push(s.count("gw").await.unwrap());
        }
        // Up to the cap every row stays; past it, whole partitions of 8 go: 129 rows become 121.
        assert_eq!(&counts[..128], &(1..=128).collect::<Vec<u64>>()[..]);
        assert!(counts[128..].iter().all(|n| (121..=128).contains(n)), "{counts:?}");
        assert!(counts.windows(2).any(|w| w == [128, 121]), "{counts:?}");
        let n = *counts.last().unwrap() as usize;
        let mut want = all[all.len() - n..].to_vec();
        want.reverse();
        assert_eq!(listed(&s, "gw", 7).await, want);
        assert_eq!(s.get("gw", &want[n - 1].1).await.unwrap().unwrap().created_at_ms, want[n - 1].0);
        assert_eq!(s.get("gw", &all[all.len() - n - 1].1).await.unwrap(), None, "dropped");
        {
            let conn = Connection::open(&path).unwrap();
            let tables = part_tables(&conn, "gw");
            assert_eq!(tables.len(), n.div_ceil(8), "{tables:?}");
            let in_tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema WHERE name LIKE 'logs_p%' AND type = 'table'", [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(in_tables as usize, tables.len(), "dropped partitions leave no table");
            let rows: u64 =
                conn.query_row("SELECT sum(n) FROM log_parts", [], |r| r.get::<_, i64>(0)).map(to_u64).unwrap();
            assert_eq!(rows, n as u64);
        }
        // Out of order: a record older than the newest partition goes to the partition of its
        // time, and is listed in its place.
        let late = record(&log_id_at(t + 250).to_string(), t + 250);
        assert_eq!(s.insert_batch("gw", std::slice::from_ref(&late)).await.unwrap(), 1);
        assert!(listed(&s, "gw", 5).await.contains(&(t + 250, late.id.clone())));
        // max_age drops the partitions entirely before the cutoff and trims the one across it.
        s.set_retention(
            "gw",
            Retention { max_records: 128, at_cap: AtCap::DeleteOldest, max_age_ms: Some(now_ms() - (t + 290)) },
        );
        let kept = s.list("gw", &LogFilter::default()).await.unwrap().records;
        let younger = kept.iter().filter(|r| r.created_at_ms >= t + 290).count() as u64;
        s.enforce_retention("gw").await.unwrap();
        // (The clock moved on a little: a row or so more may have expired.)
        let left = s.count("gw").await.unwrap();
        assert!(left <= younger && left + 5 >= younger, "{left} of {younger}");
        assert_eq!(listed(&s, "gw", 100).await.len() as u64, left);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Bodies in partitions: each partition counts its rows per body segment as they are inserted,
    /// so a dropped partition releases its segments without reading its rows; a segment no row
    /// points into any more is removed.
    #[tokio::test]
    async fn dropped_partitions_release_their_bodies() {
        let (path, dir) = temp_path("part-bodies");
        let policy = PartPolicy { min_rows: 8, fixed: None };
        let cap = Retention { max_records: 128, at_cap: AtCap::DeleteOldest, max_age_ms: None };
        let t = now_ms() - 100_000;
        let with_body = |i: u64| {
            let mut r = record(&log_id_at(t + i).to_string(), t + i);
            r.response_body = Some(Bytes::from(format!("body-{i}")));
            r
        };
        let s = SqliteLogStore::open_with(&path, policy).unwrap();
        s.set_retention("gw", cap);
        for i in 0..100 {
            s.insert_batch("gw", &[with_body(i)]).await.unwrap();
        }
        drop(s);
        // Reopened: a new segment; the first one's rows all go with their partitions.
        let s = SqliteLogStore::open_with(&path, policy).unwrap();
        s.set_retention("gw", cap);
        let mut last = None;
        for i in 100..400 {
            let r = with_body(i);
            s.insert_batch("gw", std::slice::from_ref(&r)).await.unwrap();
            last = Some(r);
        }
        let newest = s.get("gw", &last.unwrap().id).await.unwrap().unwrap();
        assert_eq!(newest.response_body.as_deref(), Some(&b"body-399"[..]));
        let n = s.count("gw").await.unwrap();
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        let mut with_bodies = 0;
        for table in part_tables(&conn, "gw") {
            with_bodies += count(&format!("SELECT count(*) FROM {table} WHERE body_seg IS NOT NULL"));
        }
        assert_eq!(with_bodies, to_i64(n));
        assert_eq!(count("SELECT sum(live) FROM body_segments"), with_bodies);
        assert_eq!(count("SELECT sum(n) FROM log_part_segs"), with_bodies);
        assert_eq!(count("SELECT count(*) FROM log_part_segs WHERE seq NOT IN (SELECT seq FROM log_parts)"), 0);
        let files = std::fs::read_dir(BodyFiles::dir_for(&path)).unwrap().count();
        assert_eq!(files, 1, "the first segment went with the last row pointing into it");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two stores on one file (as two processes would be): one keeps adding partitions and
    /// dropping the oldest, the other lists and looks records up meanwhile; each read sees one
    /// state of the file, never a partition dropped under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_never_meets_a_partition_dropped_under_it() {
        let (path, dir) = temp_path("two-stores");
        let writer = SqliteLogStore::open_with_partition_rows(&path, 2).unwrap();
        writer.set_retention("gw", Retention { max_records: 6, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        let reader = SqliteLogStore::open(&path).unwrap();
        let t = now_ms() - 100_000;
        let first = record(&log_id_at(t).to_string(), t);
        writer.insert_batch("gw", std::slice::from_ref(&first)).await.unwrap();
        let writing = tokio::spawn(async move {
            for i in 1..400u64 {
                let batch: Vec<LogRecord> =
                    (0..3).map(|j| record(&log_id_at(t + i * 3 + j).to_string(), t + i * 3 + j)).collect();
                writer.insert_batch("gw", &batch).await.unwrap();
            }
        });
        let mut reads = 0;
        while !writing.is_finished() {
            let page = reader.list("gw", &LogFilter { limit: Some(2), ..LogFilter::default() }).await.unwrap();
            assert!(page.records.len() <= 2);
            let _ = reader.get("gw", &first.id).await.unwrap();
            reads += 1;
        }
        writing.await.unwrap();
        assert!(reads > 10, "{reads} reads");
        assert!(reader.count("gw").await.unwrap() <= 6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn gateway_numbers_run_out_and_are_reused_from_empty_gateways() {
        let (path, dir) = temp_path("gateways");
        let s = SqliteLogStore::open(&path).unwrap();
        let t = now_ms();
        for g in 0..MAX_GATEWAYS {
            let r = record(&log_id_at(t).to_string(), t);
            assert_eq!(s.insert_batch(&format!("g{g}"), std::slice::from_ref(&r)).await.unwrap(), 1);
        }
        let one_more = record(&log_id_at(t).to_string(), t);
        let err = s.insert_batch("late", std::slice::from_ref(&one_more)).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        // A gateway whose records are all gone gives its number up.
        assert_eq!(s.delete("g7", &LogFilter::default()).await.unwrap(), 1);
        assert_eq!(s.insert_batch("late", std::slice::from_ref(&one_more)).await.unwrap(), 1);
        assert_eq!(listed(&s, "late", 10).await, [(t, one_more.id.clone())]);
        assert_eq!(listed(&s, "g7", 10).await, []);
        assert_eq!(listed(&s, "g8", 10).await.len(), 1);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
