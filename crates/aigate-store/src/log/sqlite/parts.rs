//! Time partitions: each gateway's rows are split into tables `logs_p{seq}` (listed in `log_parts`),
//! each holding one span of the gateway's keys.
//!
//! Why: deleting a row from the front of a b-tree costs about as much as inserting one (SQLite
//! rebalances the pages it empties), while dropping a table only frees its pages. With a cap, a
//! partition holds a sixteenth of it ([`PARTS_PER_CAP`]), so at the cap the oldest sixteenth goes
//! at once as one table instead of one row per new record.
//!
//! Bounds: a partition holds at most [`MAX_PART_ROWS`] rows; a gateway whose partitions would hold
//! fewer than [`MIN_PART_ROWS`] keeps one, trimmed row by row (an exact cap). Dropping a whole
//! partition takes a gateway at most a partition and an eighth under its cap
//! ([`PartPolicy::slack`]).

use rusqlite::{params, Connection, Transaction};

use super::keys::{gateway_keys, SLOTS};
use super::retention::release_segments;
use super::schema::{create_part_sql, part_table};
use super::sql_err;
use crate::log::bodies::BodyFiles;
use crate::log::{to_i64, to_u64, Retention};
use crate::StoreError;

/// Partition size for a cap: a sixteenth of `max_records`, so that at the cap the oldest
/// sixteenth goes at once as one table ([`Parts::drop_part`]) instead of one row per new one
/// (deleting a row from the front of a b-tree costs about as much as inserting one: SQLite
/// rebalances the pages it empties; dropping a table only frees its pages).
pub(super) const PARTS_PER_CAP: u64 = 16;

/// Below this many rows a partition is not worth a table: a gateway whose cap is under
/// `PARTS_PER_CAP` times this keeps one partition, trimmed row by row (an exact cap).
pub(super) const MIN_PART_ROWS: u64 = 8_192;

/// Largest partition (a gateway without a cap still gets partitions, which `max_age` drops).
pub(super) const MAX_PART_ROWS: u64 = 1 << 20;

/// How a gateway's rows are split into partitions ([`Parts`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct PartPolicy {
    /// Smallest partition worth rolling to ([`MIN_PART_ROWS`]).
    pub(super) min_rows: u64,
    /// A fixed partition size with an exact cap (tests: many partitions, the semantics of one).
    pub(super) fixed: Option<u64>,
}

impl PartPolicy {
    pub(super) const DEFAULT: PartPolicy = PartPolicy { min_rows: MIN_PART_ROWS, fixed: None };

    /// Rows after which the gateway's newest partition is closed and a new one started (None: it
    /// keeps one).
    pub(super) fn roll_rows(&self, r: Option<Retention>) -> Option<u64> {
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
    pub(super) fn slack(&self, roll: Option<u64>) -> u64 {
        match (self.fixed, roll) {
            (None, Some(rows)) => rows + rows / 8,
            _ => 0,
        }
    }
}

/// One partition: table `logs_p{seq}`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part {
    pub(super) seq: i64,
    /// Its first key (the next partition's first key ends it).
    pub(super) lo: i64,
    /// Rows (kept in the transaction of every insert and delete).
    pub(super) n: u64,
}

/// A gateway's partitions in key order (table `log_parts`). The gateway's key range ([`key`]) is
/// cut at millisecond boundaries: partition `i` holds the keys from its `lo` (the gateway's first
/// key for the oldest) to the next one's `lo` (the gateway's last key for the newest). New
/// records go to the newest; a record older than its start goes to the partition of its time.
/// Retention drops the oldest partition whole when that leaves the gateway at or above
/// `max_records` less [`PartPolicy::slack`], else deletes rows from its front.
pub(super) struct Parts {
    pub(super) no: i64,
    pub(super) list: Vec<Part>,
}

impl Parts {
    /// The partitions of gateway number `no`.
    pub(super) fn load(conn: &Connection, no: i64) -> Result<Parts, StoreError> {
        let mut st =
            conn.prepare_cached("SELECT seq, lo, n FROM log_parts WHERE gateway = ?1 ORDER BY lo").map_err(sql_err)?;
        let rows = st
            .query_map([no], |r| Ok(Part { seq: r.get(0)?, lo: r.get(1)?, n: to_u64(r.get(2)?) }))
            .map_err(sql_err)?;
        let list = rows.collect::<Result<Vec<Part>, _>>().map_err(sql_err)?;
        Ok(Parts { no, list })
    }

    /// The table of partition `i`.
    pub(super) fn table(&self, i: usize) -> String {
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
    pub(super) fn at(&self, k: i64) -> Option<usize> {
        (!self.list.is_empty()).then(|| self.list.partition_point(|p| p.lo <= k).saturating_sub(1))
    }

    /// The partitions holding keys in `[lo, hi]`, oldest first, each with the part of the range
    /// it holds.
    pub(super) fn span(&self, lo: i64, hi: i64) -> Vec<(usize, i64, i64)> {
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
    pub(super) fn add(&mut self, tx: &Connection, i: usize, rows: i64) -> Result<(), StoreError> {
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
    pub(super) fn drop_part(
        &mut self,
        tx: &Transaction<'_>,
        bodies: &mut BodyFiles,
        i: usize,
    ) -> Result<u64, StoreError> {
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
    pub(super) fn end_key(&self, conn: &Connection, i: usize, newest: bool) -> Result<Option<i64>, StoreError> {
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
    pub(super) fn roll(&mut self, tx: &Connection, roll: Option<u64>) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::sqlite::testing::*;

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
}
