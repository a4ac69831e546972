//! What the SQLite-backed stores share: how a SQLite error maps to a [`StoreError`].

use rusqlite::ErrorCode;

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
