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

/// Gives the file's free pages back to the file system (the stores create their files with
/// `auto_vacuum = INCREMENTAL`). The pragma frees one page per result row it returns, so every
/// row is read: `execute_batch` would step it once and free a single page.
pub(crate) fn incremental_vacuum(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}
