//! Request and response bodies of the SQLite log store, kept out of the database in append-only
//! segment files (`<database file>.bodies/seg-<n>.bin`); a row holds the segment number, the
//! offset and the two lengths.
//!
//! Why not BLOB columns: in WAL mode SQLite writes every byte twice (to the WAL, then to the
//! database at each checkpoint) and copies each bound BLOB once more; bodies are most of a row's
//! bytes, so they would be most of the cost of logging with bodies on. Appended to a segment file
//! they are written once, in one `write` per batch. No crate keeps blobs beside an SQLite table
//! this way, hence this module (a few file operations).
//!
//! Consistency: a batch's bodies are written (to the OS) before the transaction that inserts its
//! rows commits, so a process crash never leaves a row whose body bytes are missing; like the
//! WAL's `synchronous=NORMAL`, nothing is fsynced, and after a power loss a row may point at bytes
//! that never reached the disk (the body then reads as absent). Bytes whose rows were rolled back,
//! dropped at the retention cap or were duplicates stay unused until their segment goes.
//!
//! Space: table `body_segments(seg, live)` counts, in the same transactions as the rows, the rows
//! that point into each segment; a segment file is removed once no row points into it and it is
//! no longer the one being written. Deleting records through the API also overwrites their body
//! bytes with zeros at once (retention does not: its segments go whole). A segment takes new
//! batches until it holds [`SEGMENT_BYTES`]; every open starts a new one and removes files no row
//! points into (left by a crash between a commit and a file removal).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::StoreError;

/// Size at which a segment stops taking new batches.
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Where a record's bodies are: segment, offset, and each body's length (None: no such body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyRef {
    pub seg: i64,
    pub off: i64,
    pub request_len: Option<i64>,
    pub response_len: Option<i64>,
}

impl BodyRef {
    fn total(&self) -> u64 {
        (self.request_len.unwrap_or(0).max(0) + self.response_len.unwrap_or(0).max(0)) as u64
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("log bodies: {what} {}: {e}", path.display()))
}

/// The segment files of one database.
#[derive(Debug)]
pub(crate) struct BodyFiles {
    dir: PathBuf,
    /// The segment being written: number, file, length.
    current: Option<(i64, File, u64)>,
    next_seg: i64,
    /// Bodies of the batch being built, written by [`BodyFiles::flush`].
    pending: Vec<u8>,
    /// Segments no row points into since the transaction in progress: removed once it commits.
    pub(crate) dead: Vec<i64>,
}

impl BodyFiles {
    /// The segment directory of the database at `db_path`.
    pub(crate) fn dir_for(db_path: &Path) -> PathBuf {
        let mut name = db_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".bodies");
        db_path.with_file_name(name)
    }

    /// Opens the directory (creating it), removes the segment files not in `live` (the segments
    /// rows point into) and starts after the highest segment number seen.
    pub(crate) fn open(dir: PathBuf, live: &[i64]) -> Result<BodyFiles, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
        let mut highest = live.iter().copied().max().unwrap_or(0);
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err("read", &dir, e))? {
            let entry = entry.map_err(|e| io_err("read", &dir, e))?;
            let Some(seg) = parse_name(&entry.file_name().to_string_lossy()) else { continue };
            highest = highest.max(seg);
            if !live.contains(&seg) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BodyFiles { dir, current: None, next_seg: highest + 1, pending: Vec::new(), dead: Vec::new() })
    }

    fn path(&self, seg: i64) -> PathBuf {
        self.dir.join(format!("seg-{seg:08}.bin"))
    }

    /// Starts a batch: the segment its bodies go to (a new one when the current one is full).
    pub(crate) fn begin(&mut self) -> Result<(), StoreError> {
        self.pending.clear();
        if self.current.as_ref().is_some_and(|(_, _, len)| *len < SEGMENT_BYTES) {
            return Ok(());
        }
        let seg = self.next_seg;
        let path = self.path(seg);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat", &path, e))?.len();
        self.next_seg = seg + 1;
        self.current = Some((seg, file, len));
        Ok(())
    }

    /// Adds a record's bodies to the batch; None when it has none.
    pub(crate) fn add(&mut self, request: Option<&Bytes>, response: Option<&Bytes>) -> Option<BodyRef> {
        if request.is_none() && response.is_none() {
            return None;
        }
        let (seg, _, len) = self.current.as_ref()?;
        let off = len + self.pending.len() as u64;
        let mut put = |b: Option<&Bytes>| {
            b.map(|b| {
                self.pending.extend_from_slice(b);
                b.len() as i64
            })
        };
        let request_len = put(request);
        let response_len = put(response);
        Some(BodyRef { seg: *seg, off: off as i64, request_len, response_len })
    }

    /// Writes the batch's bodies to the segment (before the rows commit); returns the segment and
    /// whether anything was written.
    pub(crate) fn flush(&mut self) -> Result<Option<i64>, StoreError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let Some((seg, file, len)) = self.current.as_mut() else { return Ok(None) };
        let seg = *seg;
        if let Err(e) = file.write_all(&self.pending) {
            // A partial write leaves the file longer than counted: start over in a new segment.
            self.current = None;
            return Err(io_err("write", &self.dir, e));
        }
        *len += self.pending.len() as u64;
        self.pending.clear();
        Ok(Some(seg))
    }

    /// Reads a record's bodies; a missing file or short read gives no body (see the module docs).
    pub(crate) fn read(&self, r: &BodyRef) -> (Option<Bytes>, Option<Bytes>) {
        let Ok(file) = File::open(self.path(r.seg)) else { return (None, None) };
        let mut buf = vec![0u8; usize::try_from(r.total()).unwrap_or(0)];
        if file.read_exact_at(&mut buf, r.off.max(0) as u64).is_err() {
            return (None, None);
        }
        let all = Bytes::from(buf);
        let req_len = r.request_len.unwrap_or(0).max(0) as usize;
        (r.request_len.map(|_| all.slice(..req_len)), r.response_len.map(|_| all.slice(req_len..)))
    }

    /// Overwrites records' body bytes with zeros (records deleted on request).
    pub(crate) fn blank(&self, refs: &[BodyRef]) -> Result<(), StoreError> {
        let mut by_seg: BTreeMap<i64, Vec<&BodyRef>> = BTreeMap::new();
        for r in refs {
            by_seg.entry(r.seg).or_default().push(r);
        }
        for (seg, refs) in by_seg {
            let path = self.path(seg);
            let file = match OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &path, e)),
            };
            for r in refs {
                let zeros = vec![0u8; usize::try_from(r.total()).unwrap_or(0)];
                file.write_all_at(&zeros, r.off.max(0) as u64).map_err(|e| io_err("blank", &path, e))?;
            }
        }
        Ok(())
    }

    /// Removes segment files no row points into any more (never the one being written).
    pub(crate) fn remove(&mut self, dead: &[i64]) {
        for &seg in dead {
            if self.current.as_ref().is_some_and(|(s, _, _)| *s == seg) {
                continue;
            }
            let _ = std::fs::remove_file(self.path(seg));
        }
    }

    /// The segment being written, if any.
    pub(crate) fn current(&self) -> Option<i64> {
        self.current.as_ref().map(|(s, _, _)| *s)
    }
}

fn parse_name(name: &str) -> Option<i64> {
    name.strip_prefix("seg-")?.strip_suffix(".bin")?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bodies_round_trip_blank_and_orphans_go() {
        let dir = std::env::temp_dir().join(format!("aigate-bodies-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut f = BodyFiles::open(dir.clone(), &[]).unwrap();
        f.begin().unwrap();
        let a = f.add(Some(&Bytes::from_static(b"req-a")), Some(&Bytes::from_static(b"resp-a"))).unwrap();
        assert!(f.add(None, None).is_none());
        let b = f.add(None, Some(&Bytes::from_static(b"resp-b"))).unwrap();
        let c = f.add(Some(&Bytes::new()), None).unwrap();
        assert_eq!(f.flush().unwrap(), Some(a.seg));
        assert_eq!(f.read(&a), (Some(Bytes::from_static(b"req-a")), Some(Bytes::from_static(b"resp-a"))));
        assert_eq!(f.read(&b), (None, Some(Bytes::from_static(b"resp-b"))));
        assert_eq!(f.read(&c), (Some(Bytes::new()), None));
        f.blank(&[a]).unwrap();
        assert_eq!(f.read(&a).0.unwrap().as_ref(), &[0u8; 5]);
        assert_eq!(f.read(&b).1.unwrap().as_ref(), b"resp-b", "a neighbour is untouched");
        // Reopened with no live segment: the file is an orphan and goes; numbering moves on.
        drop(f);
        let mut f = BodyFiles::open(dir.clone(), &[]).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        f.begin().unwrap();
        assert_eq!(f.current(), Some(a.seg + 1));
        assert_eq!(f.read(&b), (None, None), "a missing segment reads as no body");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
