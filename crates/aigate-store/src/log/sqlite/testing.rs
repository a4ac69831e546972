//! What the SQLite log store's tests share: temporary files, minimal records, reading a
//! gateway's records and partitions back.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

pub(super) use bytes::Bytes;
pub(super) use rusqlite::{params, Connection};

use super::schema::part_table;
pub(super) use super::{SqliteLogStore, LOG_SQLITE_FILE};
pub(super) use crate::log::{log_id_at, to_u64};
pub(super) use crate::{AtCap, LogFilter, LogRecord, LogStore, Retention};

pub(super) fn index_names(conn: &Connection, table: &str) -> Vec<String> {
    let mut st = conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?1").unwrap();
    let names = st.query_map([table], |r| r.get::<_, String>(0)).unwrap();
    names.map(Result::unwrap).collect()
}

/// The partition tables of gateway `gateway`, oldest first.
pub(super) fn part_tables(conn: &Connection, gateway: &str) -> Vec<String> {
    let mut st = conn
        .prepare(
            "SELECT seq FROM log_parts JOIN log_gateways ON log_gateways.no = log_parts.gateway \
             WHERE log_gateways.name = ?1 ORDER BY lo",
        )
        .unwrap();
    let seqs = st.query_map([gateway], |r| r.get::<_, i64>(0)).unwrap();
    seqs.map(|s| part_table(s.unwrap())).collect()
}

pub(super) fn temp_path(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("aigate-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join(LOG_SQLITE_FILE), dir)
}

/// A minimal record (the store is told its gateway separately).
pub(super) fn record(id: &str, created_at_ms: u64) -> LogRecord {
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
pub(super) async fn listed(s: &SqliteLogStore, gw: &str, limit: u32) -> Vec<(u64, String)> {
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
pub(super) fn id_with_counter(ms: u64, counter: u16, tail: u8) -> String {
    let mut b = *log_id_at(ms).as_bytes();
    let [hi, lo] = counter.to_be_bytes();
    (b[6], b[7], b[15]) = (0x70 | hi, lo, tail);
    uuid::Uuid::from_bytes(b).to_string()
}

/// Now, Unix ms, on the system clock.
pub(super) fn now_ms() -> u64 {
    crate::Clock::system().now_ms()
}
