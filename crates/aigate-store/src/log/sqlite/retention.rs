//! Removing rows: trimming a gateway to its cap, expiring rows by age, deleting on request, pruning
//! old rollups; and releasing the bodies of what goes.
//!
//! Whole partitions go where they can (see `parts`), then rows from the front of the oldest, as one
//! key range. Each transaction removes at most [`DELETE_CHUNK_ROWS`] rows. Bodies deleted on
//! request are overwritten with zeros at once; those of rows removed by retention go with their
//! segment file, once no row points into it.

use rusqlite::{params, OptionalExtension, Transaction};

use super::keys::{gateway_number, key_ms, time_keys};
use super::parts::{PartPolicy, Parts};
use super::schema::part_table;
use super::sql_err;
use super::write::{count_rows, set_count};
use crate::log::analytics::{HOUR_MS, MINUTE_MS};
use crate::log::bodies::{BodyFiles, BodyRef};
use crate::log::{to_i64, AtCap, Retention, SqlValue, SqlWhere, DELETE_CHUNK_ROWS};
use crate::StoreError;

/// What a row deletion returns: where the deleted rows' bodies were.
pub(super) const RETURNING_BODIES: &str = "RETURNING body_seg, body_off, request_len, response_len";

/// Runs a `DELETE ... RETURNING_BODIES` statement on partition `seq` and releases the deleted
/// rows' bodies (blanking them first when `blank`); returns how many rows it deleted.
pub(super) fn delete_rows<P: rusqlite::Params>(
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
pub(super) fn release_bodies(
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
pub(super) fn release_segments(
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

/// Deletes the gateway's `n` oldest rows among those created before `before_ms` (all of its rows
/// when `None`), oldest partition first; returns how many.
pub(super) fn delete_front(
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
/// counted from the same range beforehand. (Deleting `IN (SELECT … LIMIT n)` costs about as much
/// per row as inserting one.)
pub(super) fn delete_front_in(
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

/// Removes the gateway's rows created before `cutoff_ms`: its oldest partitions whole while their
/// newest row is (never the newest partition), then at most `chunk` rows from the front. Returns
/// the rows removed.
pub(super) fn expire(
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
pub(super) fn trim_to_cap(
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
pub(super) fn retention_step(
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

/// Deletes at most [`DELETE_CHUNK_ROWS`] of the gateway's rows matching `w` created in
/// `[from_ms, to_ms)`, overwriting their bodies at once; returns how many.
pub(super) fn delete_chunk(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    gateway: &str,
    w: &SqlWhere,
    (from_ms, to_ms): (Option<u64>, Option<u64>),
) -> Result<u64, StoreError> {
    let Some(no) = gateway_number(tx, gateway)? else { return Ok(0) };
    let Some((lo, hi)) = time_keys(no, from_ms, to_ms) else { return Ok(0) };
    let mut parts = Parts::load(tx, no)?;
    let mut d = 0;
    for (i, lo, hi) in parts.span(lo, hi) {
        if d >= DELETE_CHUNK_ROWS {
            break;
        }
        let table = parts.table(i);
        let mut w = w.clone();
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
        let n = count_rows(tx, gateway)?;
        set_count(tx, gateway, n.saturating_sub(d))?;
    }
    Ok(d)
}

/// One transaction of [`crate::LogStore::enforce_retention`]: [`retention_step`] on the gateway,
/// and its row count; returns the rows removed.
pub(super) fn enforce_step(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    policy: PartPolicy,
    gateway: &str,
    r: &Retention,
    cutoff_ms: Option<u64>,
) -> Result<u64, StoreError> {
    let Some(no) = gateway_number(tx, gateway)? else { return Ok(0) };
    let mut parts = Parts::load(tx, no)?;
    let n = count_rows(tx, gateway)?;
    let removed = retention_step(tx, bodies, (&mut parts, policy), r, cutoff_ms, n)?;
    if removed > 0 {
        set_count(tx, gateway, n.saturating_sub(removed))?;
    }
    Ok(removed)
}

/// Deletes at most [`DELETE_CHUNK_ROWS`] of the gateway's minute rollups older than `minute_cutoff`
/// and hour rollups older than `hour_cutoff` (Unix ms); returns how many.
pub(super) fn prune_rollups(
    tx: &Transaction<'_>,
    gateway: &str,
    (minute_cutoff, hour_cutoff): (i64, i64),
) -> Result<u64, StoreError> {
    let d = tx
        .execute(
            "DELETE FROM log_rollups WHERE (gateway, grain_ms, dim, bucket_ms, dim_value) IN \
             (SELECT gateway, grain_ms, dim, bucket_ms, dim_value FROM log_rollups \
             WHERE gateway = ?1 AND ((grain_ms = ?2 AND bucket_ms < ?3) OR \
             (grain_ms = ?4 AND bucket_ms < ?5)) LIMIT ?6)",
            params![gateway, to_i64(MINUTE_MS), minute_cutoff, to_i64(HOUR_MS), hour_cutoff, to_i64(DELETE_CHUNK_ROWS)],
        )
        .map_err(sql_err)? as u64;
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::sqlite::testing::*;

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
}
