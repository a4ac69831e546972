//! Fixtures shared by the store conformance suites.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique to this process and call, for namespaces, tables and directories.
pub fn unique(tag: &str) -> String {
    format!("t{}_{}_{tag}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Now, Unix ms, on the system clock.
pub fn now_ms() -> u64 {
    aigate_store::Clock::system().now_ms()
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `aigate-<tag>-<unique>` under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("aigate-{}", unique(tag)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
