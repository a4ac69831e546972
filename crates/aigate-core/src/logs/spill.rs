//! Spill files: where records go when the queue to the writer is full or the store fails, under
//! `data_dir/log-spill/` as JSON lines, and how the writer replays them into the store.
//!
//! Bounds: the channel to the spill thread ([`SPILL_CHANNEL`]) and the bytes on disk
//! (`storage.log_spill_max`); past either, records are dropped and counted. A file is closed at
//! [`SPILL_FILE_MAX`] or after [`SPILL_IDLE`]; only closed files are replayed. A crash leaves at
//! most a torn last line, skipped on replay.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use super::finalize::Finalizer;
use super::{Finished, LogPipeline, BATCH};
use crate::meter::Meter;

/// Capacity of the channel to the spill thread.
pub const SPILL_CHANNEL: usize = 65_536;

/// A spill file is closed (and becomes replayable) at this size or after [`SPILL_IDLE`] idle.
pub const SPILL_FILE_MAX: u64 = 16 * 1024 * 1024;

/// Idle time after which the spill thread closes its file.
pub const SPILL_IDLE: Duration = Duration::from_millis(500);

/// Spill directory under `data_dir`.
pub const SPILL_DIR: &str = "log-spill";

pub(super) enum SpillItem {
    Meter(Box<Meter>),
    Records(Vec<Finished>),
    Flush(std_mpsc::SyncSender<()>),
}

/// Extension of a spill file being rewritten after a partial replay (a leftover one is removed).
const SPILL_REWRITE_EXT: &str = "rewrite";

/// Renames files left open by a crash so they are replayed, and returns the bytes on disk.
pub(super) fn recover_spill_files(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SPILL_REWRITE_EXT) {
            // A rewrite cut short: the file it was to replace is still whole.
            std::fs::remove_file(&path)?;
        } else if path.extension().is_some_and(|e| e == "partial") {
            let done = path.with_extension("");
            std::fs::rename(&path, &done)?;
            total += std::fs::metadata(&done)?.len();
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            total += std::fs::metadata(&path)?.len();
        }
    }
    Ok(total)
}

pub(super) fn list_spill_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    Ok(files)
}

/// The spill file being appended to.
struct SpillFile {
    path: PathBuf,
    /// Unbuffered: a record counts as spilled only once its line is in the file, so a full disk
    /// can never take records that were already counted (as a buffer flushed later could).
    out: std::fs::File,
    /// Bytes of whole lines in the file.
    bytes: u64,
}

/// How often at most the spill thread warns that records are being dropped.
const DROP_WARN_EVERY_MS: u64 = 10_000;

/// The spill thread: appends records as JSON lines to `*.jsonl.partial`, renamed to `*.jsonl`
/// when closed (size cap, idle, flush). A record that cannot be written (disk full, I/O error,
/// `log_spill_max` reached) is dropped, counted and reported (a warning at most every 10 s); a
/// line cut short by a failed write is cut off the file, so the next record starts a whole line.
pub(super) fn spill_loop(rx: &std_mpsc::Receiver<SpillItem>, dir: &Path, fin: &Finalizer, max_bytes: u64) {
    let mut current: Option<SpillFile> = None;
    let mut seq: u64 = 0;
    let mut last_warn_ms: Option<u64> = None;
    let mut drop_record = |why: &dyn std::fmt::Display| {
        let dropped = fin.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = fin.clock.now_ms();
        if last_warn_ms.is_none_or(|t| now.saturating_sub(t) >= DROP_WARN_EVERY_MS) {
            last_warn_ms = Some(now);
            tracing::warn!(reason = %why, dropped_total = dropped, "log spill: records dropped");
        }
    };
    let close = |f: Option<SpillFile>| {
        if let Some(f) = f {
            let _ = f.out.sync_data();
            let done = f.path.with_extension("");
            if let Err(e) = std::fs::rename(&f.path, &done) {
                tracing::warn!(error = %e, "cannot close a log spill file");
            }
        }
    };
    loop {
        let item = match rx.recv_timeout(SPILL_IDLE) {
            Ok(i) => i,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                close(current.take());
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                close(current.take());
                return;
            }
        };
        let records = match item {
            SpillItem::Meter(m) => vec![fin.finalize(m)],
            SpillItem::Records(r) => r,
            SpillItem::Flush(ack) => {
                close(current.take());
                let _ = ack.send(());
                continue;
            }
        };
        for r in records {
            let mut line = match serde_json::to_vec(&r) {
                Ok(l) => l,
                Err(e) => {
                    drop_record(&e);
                    continue;
                }
            };
            line.push(b'\n');
            let len = line.len() as u64;
            if fin.stats.spill_bytes.load(Ordering::Relaxed) + len > max_bytes {
                drop_record(&"storage.log_spill_max reached");
                continue;
            }
            if current.as_ref().is_some_and(|f| f.bytes >= SPILL_FILE_MAX) {
                close(current.take());
            }
            let f = match &mut current {
                Some(f) => f,
                None => {
                    seq += 1;
                    let path = dir.join(format!("spill-{:013}-{:06}.jsonl.partial", fin.clock.now_ms(), seq));
                    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
                        Ok(out) => current.insert(SpillFile { path, out, bytes: 0 }),
                        Err(e) => {
                            drop_record(&format_args!("cannot create a spill file: {e}"));
                            continue;
                        }
                    }
                }
            };
            match f.out.write_all(&line) {
                Ok(()) => {
                    f.bytes += len;
                    fin.stats.spill_bytes.fetch_add(len, Ordering::Relaxed);
                    fin.stats.spilled.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    drop_record(&e);
                    // Part of the line may be in the file: cut it off. If that fails too, the file
                    // is closed as it is (replay skips the torn line) and counted at its size.
                    if f.out.set_len(f.bytes).is_err() {
                        let on_disk = f.out.metadata().map_or(f.bytes, |m| m.len());
                        fin.stats.spill_bytes.fetch_add(on_disk.saturating_sub(f.bytes), Ordering::Relaxed);
                        close(current.take());
                    }
                }
            }
        }
    }
}

impl LogPipeline {
    /// Replays closed spill files into the store, oldest first, for at most `budget`. Returns
    /// false if the store failed.
    pub async fn replay_spill(&self, budget: Duration) -> bool {
        let started = Instant::now();
        let files = match list_spill_files(&self.spill_dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list log spill files");
                return true;
            }
        };
        for path in files {
            if started.elapsed() >= budget {
                break;
            }
            let data = match tokio::fs::read(&path).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, file = %path.display(), "cannot read a log spill file");
                    continue;
                }
            };
            let mut records = Vec::new();
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Finished>(line) {
                    Ok(f) => records.push(f),
                    // A torn last line after a crash.
                    Err(e) => tracing::debug!(error = %e, "skipping an unreadable spill line"),
                }
            }
            let mut records = records.into_iter().peekable();
            while records.peek().is_some() {
                let chunk: Vec<Finished> = records.by_ref().take(BATCH).collect();
                let n = chunk.len() as u64;
                let kept = chunk.iter().filter(|f| f.keep).count() as u64;
                match self.store_finished(chunk).await {
                    Ok(_) => {
                        self.stats.replayed.fetch_add(n, Ordering::Relaxed);
                        self.stats.written.fetch_add(kept, Ordering::Relaxed);
                    }
                    Err((e, unstored)) => {
                        self.store_failed(&e);
                        // What is stored must not be replayed again: a kept record would be skipped
                        // (ids are unique), but one only counted in analytics would count twice.
                        let rest: Vec<Finished> = unstored.into_iter().chain(records).collect();
                        self.rewrite_spill_file(path, data.len() as u64, rest).await;
                        return false;
                    }
                }
            }
            if tokio::fs::remove_file(&path).await.is_ok() {
                self.sub_spill_bytes(data.len() as u64);
            }
        }
        true
    }

    fn sub_spill_bytes(&self, n: u64) {
        let _ =
            self.stats.spill_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(n)));
    }

    /// Replaces spill file `path` (of `old_len` bytes) with `records` (written beside it on the
    /// blocking pool, then renamed over it: a crash leaves either file whole). On failure the old
    /// file stays.
    async fn rewrite_spill_file(&self, path: PathBuf, old_len: u64, records: Vec<Finished>) {
        let tmp = path.with_extension(SPILL_REWRITE_EXT);
        let (tmp2, path2) = (tmp.clone(), path.clone());
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp2)?);
            for f in &records {
                serde_json::to_writer(&mut out, f)?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
            std::fs::rename(&tmp2, &path2)?;
            Ok(std::fs::metadata(&path2)?.len())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match result {
            Ok(new_len) => {
                self.sub_spill_bytes(old_len);
                self.stats.spill_bytes.fetch_add(new_len, Ordering::Relaxed);
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                tracing::warn!(error = %e, file = %path.display(), "cannot rewrite a log spill file");
            }
        }
    }
}
