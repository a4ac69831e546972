//! What the SQLite-backed stores share: how a SQLite error maps to a [`StoreError`], and giving
//! free pages back to the file system.

use rusqlite::{Connection, ErrorCode};

use crate::StoreError;

/// Storage problems (disk full, I/O, permissions, corruption) become [`StoreError::Io`], the
/// rest [`StoreError::Unavailable`]; `what` names the store in the message.
pub(crate) fn map_err(what: &str, e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::ReadOnly
                    | ErrorCode::CannotOpen
                    | ErrorCode::PermissionDenied
                    | ErrorCode::DatabaseCorrupt
                    | ErrorCode::NotADatabase
                    | ErrorCode::FileLockingProtocolFailed
            ) =>
        {
            StoreError::Io(e.to_string())
        }
        _ => StoreError::Unavailable(format!("{what}: {e}")),
    }
}

/// Free space a SQLite file keeps for reuse when [`give_back_free_pages`] runs after deletes: a
/// store at its cap frees and reuses pages batch after batch, and moving the file's last pages
/// into the freed ones each time (what `incremental_vacuum` does) would rewrite them for nothing.
pub(crate) const KEEP_FREE_BYTES: i64 = 64 * 1024 * 1024;

/// Gives the file's free pages beyond `keep_bytes` back to the file system (the stores create
/// their files with `auto_vacuum = INCREMENTAL`). The pragma frees one page per result row it
/// returns, so every row is read: `execute_batch` would step it once and free a single page.
pub(crate) fn give_back_free_pages(conn: &Connection, keep_bytes: i64) -> rusqlite::Result<()> {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let excess = free - keep_bytes / page.max(512);
    if excess <= 0 {
        return Ok(());
    }
    // A pragma takes no bound parameters.
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({excess})"))?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn free_pages_beyond_the_kept_amount_go_back() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA page_size = 4096; PRAGMA auto_vacuum = INCREMENTAL;
             CREATE TABLE t (b BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
             INSERT INTO t SELECT zeroblob(4000) FROM n;
             DELETE FROM t;",
        )
        .unwrap();
        let free = || conn.query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0)).unwrap();
        assert!(free() >= 500, "{}", free());
        give_back_free_pages(&conn, 100 * 4096).unwrap();
        assert_eq!(free(), 100, "keeps what it was asked to keep");
        give_back_free_pages(&conn, 100 * 4096).unwrap();
        assert_eq!(free(), 100, "nothing beyond it: no change");
        give_back_free_pages(&conn, 0).unwrap();
        assert_eq!(free(), 0);
    }
}
