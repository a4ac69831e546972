//! The file's schema: its tables and their SQL text, and the version check at open.
//!
//! Tables: `log_gateways(name, no)` numbers the gateways (the high bits of a row key, see
//! `keys`); `log_parts(seq, gateway, lo, n)` lists each gateway's partitions, the first key and the
//! row count of each, and `log_part_segs(seq, seg, n)` the rows of each partition per body segment
//! (see `parts`); `logs_p{seq}` hold the records, one column per scalar field of
//! [`crate::LogRecord`], `metadata` as a JSON object text (entry order kept); `log_placed(ms_key)`
//! the milliseconds holding a row placed off its own slot; `log_counts(gateway, n)` each gateway's
//! row count; `log_rollups` the analytics rollups, primary key `(gateway, grain_ms, dim, bucket_ms,
//! dim_value)` (a query reads one contiguous range per dimension); `body_segments(seg, live)` the
//! rows pointing into each body segment file.
//!
//! The version is `PRAGMA user_version` ([`SCHEMA_VERSION`]). A new file (version 0, no table) is
//! given the schema at open; a file of the current version opens as it is; a version-7 file (the
//! first released layout) is converted in place at open ([`migrate`]), keeping its records; any
//! other file is refused, unchanged, with [`StoreError::Unavailable`] saying to move it away
//! (only development builds wrote older versions).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::sql_err;
use crate::StoreError;

/// Schema version written to `PRAGMA user_version`: the partitioned tables keyed by `k` described
/// here, with the retry and fallback columns (`attempts`, `step`, `route`, `breaker`).
pub(super) const SCHEMA_VERSION: i64 = 8;

/// The version [`migrate`] converts: version 8 without the retry and fallback columns.
pub(super) const MIGRATED_VERSION: i64 = 7;

/// The columns version 8 added to every partition, as `ALTER TABLE … ADD COLUMN` takes them (the
/// end of [`LOG_COLUMN_DEFS`], so a converted partition has the layout of a new one).
const V8_COLUMNS: [&str; 4] = ["attempts INTEGER NOT NULL DEFAULT 0", "step INTEGER", "route TEXT", "breaker TEXT"];

/// Page size of a new database file. A record takes under a kilobyte, and larger pages than
/// SQLite's 4 KiB default make an insert cheaper: fewer pages split, written to the WAL and
/// checkpointed per record. A file keeps the page size it was created with.
pub(super) const PAGE_SIZE: u32 = 32 * 1024;

/// The columns of a partition table after its key, as created. `request_body` and `response_body`
/// are part of the layout but always NULL: the bodies are in segment files, the row
/// holding where (`body_seg`, `body_off`, `request_len`, `response_len`).
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
             response_len INTEGER,
             attempts INTEGER NOT NULL DEFAULT 0,
             step INTEGER,
             route TEXT,
             breaker TEXT";

/// The schema of a new file: every table but the partitions (created as a gateway needs them,
/// [`create_part_sql`]), and the version.
pub(super) fn create_schema_sql() -> String {
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

/// Accepts a file of the current schema, one [`migrate`] converts, or a new one (`user_version` 0
/// and no table); refuses any other, saying what to do.
pub(super) fn check_version(path: &Path, version: i64, tables: i64) -> Result<(), StoreError> {
    if version == SCHEMA_VERSION || version == MIGRATED_VERSION || (version == 0 && tables == 0) {
        return Ok(());
    }
    let file = path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
    let (has, from) = match version {
        0 => ("tables but no log schema".to_owned(), "another program"),
        v => (format!("log schema {v}"), "a development build"),
    };
    Err(StoreError::Unavailable(format!(
        "{file} has {has}; this aigate reads schema {MIGRATED_VERSION} or {SCHEMA_VERSION} only (the file \
         comes from {from}): move it away or delete it, and aigate creates a new one (file: {path})",
        path = path.display()
    )))
}

/// Converts a version-7 file to the current schema in place: the new columns are added to every
/// partition (existing rows read `attempts` 0, the others NULL) and the version set, in one write
/// transaction, so a failure leaves the file at version 7 and two processes opening it at once
/// convert it once. Adding a column rewrites no row: the file's size does not matter.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
    if version != MIGRATED_VERSION {
        // Another process converted it meanwhile.
        return Ok(());
    }
    let tables: Vec<String> = {
        let mut st = tx
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name GLOB 'logs_p[0-9]*'")
            .map_err(sql_err)?;
        let names = st.query_map([], |r| r.get(0)).map_err(sql_err)?;
        names.collect::<Result<_, _>>().map_err(sql_err)?
    };
    let mut sql = String::new();
    for table in &tables {
        for column in V8_COLUMNS {
            sql.push_str(&format!("ALTER TABLE {table} ADD COLUMN {column};\n"));
        }
    }
    sql.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION};"));
    tx.execute_batch(&sql).map_err(sql_err)?;
    tx.commit().map_err(sql_err)?;
    tracing::info!(partitions = tables.len(), "log store: schema {MIGRATED_VERSION} converted to {SCHEMA_VERSION}");
    Ok(())
}

/// The insert of [`insert_one`] into `table`.
pub(super) fn insert_sql(table: &str) -> String {
    format!("INSERT INTO {table} {INSERT_TAIL}")
}

pub(super) const INSERT_TAIL: &str = "(gateway, id, event_id, created_at_ms, provider, path, requested_model, \
     served_model, status, success, cache_status, stream, duration_ms, ttfb_ms, upstream_ms, overhead_ms, tokens_in, \
     tokens_out, cached_tokens_in, reasoning_tokens, cost_usd, saved_usd, custom_cost, metadata, user_agent, error, \
     feedback, score, body_seg, body_off, request_len, response_len, attempts, step, route, breaker, k) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, \
     ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35, ?36, ?37) \
     ON CONFLICT (k) DO NOTHING";

/// The name of partition table `seq`.
pub(super) fn part_table(seq: i64) -> String {
    format!("logs_p{seq}")
}

/// Creates partition table `seq`: a rowid table whose rowid `k` sorts as `(gateway, created_at_ms,
/// id)` (see `keys`), so an insert appends to a b-tree of integer keys and deleting the oldest rows
/// is a range of keys; there is no index of ids. Its one index serves lookups by event id: most
/// requests carry none, and a partial index costs them nothing.
pub(super) fn create_part_sql(seq: i64) -> String {
    let table = part_table(seq);
    format!(
        "CREATE TABLE {table} (\n             k INTEGER PRIMARY KEY,\n             {LOG_COLUMN_DEFS}\n         );
         CREATE INDEX {table}_event_id ON {table}(gateway, event_id, created_at_ms, id) WHERE event_id IS NOT NULL;"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::sqlite::testing::*;

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
                "logs.sqlite3 has log schema 5; this aigate reads schema 7 or 8 only (the file comes from a \
                 development build): move it away or delete it, and aigate creates a new one"
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
        assert!(
            err.contains("logs.sqlite3 has tables but no log schema; this aigate reads schema 7 or 8 only"),
            "{err}"
        );
        // Moved away: a new file is created, and reopened as it is.
        std::fs::remove_file(&path).unwrap();
        drop(SqliteLogStore::open(&path).unwrap());
        let s = SqliteLogStore::open(&path).unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The schema version 7 wrote, as it was (the conversion must keep working on it whatever the
    /// current schema becomes).
    const V7_SCHEMA: &str = "
        CREATE TABLE log_gateways (name TEXT PRIMARY KEY NOT NULL, no INTEGER NOT NULL UNIQUE) WITHOUT ROWID;
        CREATE TABLE log_placed (ms_key INTEGER PRIMARY KEY);
        CREATE TABLE log_parts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, gateway INTEGER NOT NULL, lo INTEGER NOT NULL, n INTEGER NOT NULL
        );
        CREATE UNIQUE INDEX log_parts_gateway_lo ON log_parts(gateway, lo);
        CREATE TABLE log_part_segs (
            seq INTEGER NOT NULL, seg INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (seq, seg)
        ) WITHOUT ROWID;
        CREATE TABLE log_counts (gateway TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE log_rollups (
            gateway TEXT NOT NULL, grain_ms INTEGER NOT NULL, dim TEXT NOT NULL, bucket_ms INTEGER NOT NULL,
            dim_value TEXT NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL,
            cache_hits INTEGER NOT NULL, shadow_hits INTEGER NOT NULL, tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL, cached_tokens_in INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
            cost_unknown INTEGER NOT NULL, cost_usd REAL NOT NULL, saved_usd REAL NOT NULL,
            shadow_saved_usd REAL NOT NULL, duration_sum_ms REAL NOT NULL, hist TEXT NOT NULL,
            PRIMARY KEY (gateway, grain_ms, dim, bucket_ms, dim_value)
        ) WITHOUT ROWID;
        CREATE TABLE body_segments (seg INTEGER PRIMARY KEY NOT NULL, live INTEGER NOT NULL);
        PRAGMA user_version = 7;";

    /// A version-7 partition table.
    fn v7_part(seq: i64) -> String {
        format!(
            "CREATE TABLE logs_p{seq} (
                 k INTEGER PRIMARY KEY, gateway TEXT NOT NULL, id TEXT NOT NULL, event_id TEXT,
                 created_at_ms INTEGER NOT NULL, provider TEXT NOT NULL, path TEXT NOT NULL, requested_model TEXT,
                 served_model TEXT, status INTEGER NOT NULL, success INTEGER NOT NULL, cache_status TEXT NOT NULL,
                 stream INTEGER NOT NULL, duration_ms REAL NOT NULL, ttfb_ms REAL, upstream_ms REAL,
                 overhead_ms REAL, tokens_in INTEGER, tokens_out INTEGER, cached_tokens_in INTEGER,
                 reasoning_tokens INTEGER, cost_usd REAL, saved_usd REAL, custom_cost INTEGER NOT NULL,
                 metadata TEXT, user_agent TEXT, error TEXT, feedback INTEGER, score REAL, request_body BLOB,
                 response_body BLOB, body_seg INTEGER, body_off INTEGER, request_len INTEGER, response_len INTEGER
             );
             CREATE INDEX logs_p{seq}_event_id ON logs_p{seq}(gateway, event_id, created_at_ms, id)
                 WHERE event_id IS NOT NULL;"
        )
    }

    /// A version-7 file (from the first release) is converted at open and keeps its records: they
    /// read back as sent once with no step, route or breaker; new records carry the new fields, in
    /// every partition; the next open finds the file current.
    #[tokio::test]
    async fn a_version_7_file_is_converted_in_place() {
        use crate::log::sqlite::keys::{gateway_keys, own_key};
        let (path, dir) = temp_path("schema-7");
        let t = now_ms() - 60_000;
        let old: Vec<LogRecord> = (0..2).map(|i| record(&log_id_at(t + i).to_string(), t + i)).collect();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V7_SCHEMA).unwrap();
            // Two gateways, a partition each, a row in each.
            for (no, (gw, r)) in ["a", "b"].into_iter().zip(&old).enumerate() {
                let (no, seq) = (no as i64, no as i64 + 1);
                conn.execute_batch(&v7_part(seq)).unwrap();
                conn.execute("INSERT INTO log_gateways (name, no) VALUES (?1, ?2)", params![gw, no]).unwrap();
                conn.execute(
                    "INSERT INTO log_parts (seq, gateway, lo, n) VALUES (?1, ?2, ?3, 1)",
                    params![seq, no, gateway_keys(no).0],
                )
                .unwrap();
                conn.execute("INSERT INTO log_counts (gateway, n) VALUES (?1, 1)", [gw]).unwrap();
                conn.execute(
                    &format!(
                        "INSERT INTO logs_p{seq} (k, gateway, id, created_at_ms, provider, path, status, success, \
                         cache_status, stream, duration_ms, custom_cost) \
                         VALUES (?1, ?2, ?3, ?4, 'openai', 'chat/completions', 200, 1, 'MISS', 0, 1.0, 0)"
                    ),
                    params![own_key(no, r.created_at_ms, &r.id).unwrap(), gw, r.id, r.created_at_ms as i64],
                )
                .unwrap();
            }
        }
        let s = SqliteLogStore::open(&path).unwrap();
        for (gw, r) in ["a", "b"].into_iter().zip(&old) {
            let want = LogRecord { gateway: gw.into(), ..r.clone() };
            let got = s.get(gw, &r.id).await.unwrap().unwrap();
            assert_eq!(got, want);
            assert_eq!((got.attempts, got.step, got.route, got.breaker), (0, None, None, None));
            let mut new = record(&log_id_at(t + 10).to_string(), t + 10);
            (new.attempts, new.step) = (3, Some(1));
            (new.route, new.breaker) = (Some("support@3".into()), Some("open: openai".into()));
            assert_eq!(s.insert_batch(gw, std::slice::from_ref(&new)).await.unwrap(), 1);
            let new = LogRecord { gateway: gw.into(), ..new };
            assert_eq!(s.get(gw, &new.id).await.unwrap().unwrap(), new);
            let page = s.list(gw, &LogFilter { route: Some("support".into()), ..LogFilter::default() }).await;
            assert_eq!(page.unwrap().records, [new]);
            assert_eq!(s.count(gw).await.unwrap(), 2);
        }
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // A converted partition has the columns of a new one, in the same order.
        let columns = |sql: &str| -> Vec<String> {
            let mut st = conn.prepare(sql).unwrap();
            let names = st.query_map([], |r| r.get::<_, String>(1)).unwrap();
            names.map(Result::unwrap).collect()
        };
        conn.execute_batch(&create_part_sql(99)).unwrap();
        assert_eq!(columns("PRAGMA table_info(logs_p1)"), columns("PRAGMA table_info(logs_p99)"));
        drop(conn);
        drop(SqliteLogStore::open(&path).unwrap());
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
}
