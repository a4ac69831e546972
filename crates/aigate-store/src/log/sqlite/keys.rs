//! The row key of a record, and where a record goes in the key space.
//!
//! `k` = gateway number (9 bits, table `log_gateways`) | `created_at_ms` (42 bits: Unix ms up to
//! the year 2109; later times share the last one) | slot within the millisecond (12 bits). The keys
//! of one gateway are one range and sort by time. A record the gateway made has a UUIDv7 id whose
//! `rand_a` counter ([`crate::log::log_id_at`]) names its slot, so keys sort as ids do and a lookup
//! by id is a key lookup ([`find_id`]). Any other id, or an id whose slot is taken, is placed
//! between its neighbours in id order ([`place`]), its millisecond noted in table `log_placed` so
//! that later ids there are placed too.
//!
//! Bounds: at most [`MAX_GATEWAYS`] gateways hold records in one file (a gateway whose records are
//! all gone gives its number up), and at most [`SLOTS`] records of one gateway share a millisecond;
//! past either, an insert fails with [`StoreError::Unavailable`].

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::parts::Parts;
use super::schema::part_table;
use super::sql_err;
use crate::log::{log_id_counter, log_id_time_ms, to_i64};
use crate::StoreError;

/// Bits of [`key`]: a slot within the millisecond (12), the millisecond (42: Unix ms up to the
/// year 2109; later times share the last one) and, above, the gateway's number (9).
pub(super) const SLOT_BITS: u32 = 12;

pub(super) const MS_BITS: u32 = 42;

pub(super) const SLOTS: i64 = 1 << SLOT_BITS;

pub(super) const MAX_KEY_MS: u64 = (1 << MS_BITS) - 1;

/// Gateway numbers a file can hold ([`gateway_number`]).
pub(super) const MAX_GATEWAYS: i64 = 1 << (63 - MS_BITS - SLOT_BITS);

/// The row key `k` of a gateway's record created at `ms`, in slot `slot` of that millisecond. The
/// keys of one gateway are one range ([`gateway_keys`]) and sort by time; within a millisecond a
/// record made by the gateway takes the slot its id's counter names ([`log_id_counter`]), so keys
/// sort as ids do; any other record (an id not made that way, two ids on one slot) is given a
/// free slot between its neighbours in id order ([`place`]).
pub(super) fn key(gateway: i64, ms: u64, slot: i64) -> i64 {
    // `ms` is at most 42 bits and `slot` 12: the value stays below 2^63 for any gateway number.
    (gateway << (MS_BITS + SLOT_BITS)) | ((ms.min(MAX_KEY_MS) as i64) << SLOT_BITS) | (slot & (SLOTS - 1))
}

/// The key a record of `gateway` created at `ms` gets when its id's counter names a slot
/// ([`log_id_counter`]) and that slot is free.
pub(super) fn own_key(gateway: i64, ms: u64, id: &str) -> Option<i64> {
    // Times past MAX_KEY_MS share one millisecond of keys: placed, not at a slot.
    log_id_counter(id, ms).filter(|_| ms < MAX_KEY_MS).map(|c| key(gateway, ms, i64::from(c)))
}

/// The keys of a gateway's records created in millisecond `ms`.
pub(super) fn ms_keys(gateway: i64, ms: u64) -> (i64, i64) {
    (key(gateway, ms, 0), key(gateway, ms, SLOTS - 1))
}

/// All the keys of a gateway.
pub(super) fn gateway_keys(gateway: i64) -> (i64, i64) {
    (key(gateway, 0, 0), key(gateway, MAX_KEY_MS, SLOTS - 1))
}

/// The keys of a gateway's records created in `[from_ms, to_ms)` (a wider range for times past
/// [`MAX_KEY_MS`], which share its last millisecond); None when the range is empty.
pub(super) fn time_keys(gateway: i64, from_ms: Option<u64>, to_ms: Option<u64>) -> Option<(i64, i64)> {
    let (mut lo, mut hi) = gateway_keys(gateway);
    if let Some(from) = from_ms {
        lo = key(gateway, from, 0);
    }
    if let Some(to) = to_ms {
        hi = ms_keys(gateway, to.checked_sub(1)?).1;
    }
    (lo <= hi).then_some((lo, hi))
}

/// The millisecond of key `k`.
pub(super) fn key_ms(k: i64) -> u64 {
    ((k >> SLOT_BITS) as u64) & MAX_KEY_MS
}

/// The number of gateway `name` in this file, if it has one.
pub(super) fn gateway_number(conn: &Connection, name: &str) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT no FROM log_gateways WHERE name = ?1")
        .map_err(sql_err)?
        .query_row([name], |r| r.get(0))
        .optional()
        .map_err(sql_err)
}

/// The number of gateway `name`, given one if it has none: the next unused, or, once all
/// [`MAX_GATEWAYS`] are taken, the number of a gateway without records.
pub(super) fn gateway_number_or_new(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    if let Some(no) = gateway_number(conn, name)? {
        return Ok(no);
    }
    let next: i64 =
        conn.query_row("SELECT coalesce(max(no) + 1, 0) FROM log_gateways", [], |r| r.get(0)).map_err(sql_err)?;
    let no = if next < MAX_GATEWAYS {
        next
    } else {
        let mut free = None;
        let nos: Vec<i64> = {
            let mut st = conn.prepare("SELECT no FROM log_gateways ORDER BY no").map_err(sql_err)?;
            let nos = st.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
            nos.collect::<Result<_, _>>().map_err(sql_err)?
        };
        for no in nos {
            let used: bool = conn
                .query_row("SELECT EXISTS (SELECT 1 FROM log_parts WHERE gateway = ?1 AND n > 0)", [no], |r| r.get(0))
                .map_err(sql_err)?;
            if !used {
                free = Some(no);
                break;
            }
        }
        let Some(no) = free else {
            return Err(StoreError::Unavailable(format!(
                "log store: {MAX_GATEWAYS} gateways hold records, none is free for {name:?}"
            )));
        };
        conn.execute("DELETE FROM log_gateways WHERE no = ?1", [no]).map_err(sql_err)?;
        // Its partitions are empty: they go.
        for p in Parts::load(conn, no)?.list {
            conn.execute_batch(&format!("DROP TABLE {};", part_table(p.seq))).map_err(sql_err)?;
        }
        conn.execute("DELETE FROM log_parts WHERE gateway = ?1", [no]).map_err(sql_err)?;
        no
    };
    conn.execute("INSERT INTO log_gateways (name, no) VALUES (?1, ?2)", params![name, no]).map_err(sql_err)?;
    Ok(no)
}

/// Reads table `log_placed`, the milliseconds holding placed rows ([`Shared::placed`]).
pub(super) fn load_placed(conn: &Connection) -> Result<BTreeSet<i64>, StoreError> {
    let mut st = conn.prepare("SELECT ms_key FROM log_placed").map_err(sql_err)?;
    let keys = st.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_err)?;
    keys.collect::<Result<BTreeSet<i64>, _>>().map_err(sql_err)
}

/// Where [`place`] puts a record.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// The record is stored already (same id and time).
    Stored,
    /// At this key, free.
    At(i64),
}

/// Finds the key of a record (`created_at_ms`, `id`) of gateway number `gateway` in `table` whose
/// own slot is taken or which has none: the record's millisecond is read (a few rows) and the
/// record goes to a free slot between its neighbours in `(created_at_ms, id)` order, the slot its
/// id names if that one qualifies; when none is free between them, the millisecond's rows are
/// spread over the slots again. A millisecond where a row lands elsewhere than its own slot is
/// noted in table `log_placed`. Errors when the millisecond holds [`SLOTS`] records already.
pub(super) fn place(
    conn: &Connection,
    table: &str,
    gateway: i64,
    created_at_ms: u64,
    id: &str,
) -> Result<Placement, StoreError> {
    let (lo, hi) = ms_keys(gateway, created_at_ms);
    let mut rows: Vec<(i64, i64, String)> = Vec::new();
    {
        let mut st = conn
            .prepare_cached(&format!("SELECT k, created_at_ms, id FROM {table} WHERE k BETWEEN ?1 AND ?2 ORDER BY k"))
            .map_err(sql_err)?;
        let found = st.query_map([lo, hi], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_err)?;
        for row in found {
            rows.push(row.map_err(sql_err)?);
        }
    }
    let me = (to_i64(created_at_ms), id);
    if rows.iter().any(|(_, t, i)| (*t, i.as_str()) == me) {
        return Ok(Placement::Stored);
    }
    // Rows before `me` come first (keys sort as the rows do).
    let before = rows.partition_point(|(_, t, i)| (*t, i.as_str()) < me);
    let low = if before == 0 { lo } else { rows[before - 1].0 + 1 };
    let high = rows.get(before).map_or(hi, |r| r.0 - 1);
    let own = own_key(gateway, created_at_ms, id);
    let mark = || {
        conn.prepare_cached("INSERT OR IGNORE INTO log_placed (ms_key) VALUES (?1)")
            .and_then(|mut st| st.execute([lo]))
            .map_err(sql_err)
    };
    if low <= high {
        let k = own.filter(|k| (low..=high).contains(k)).unwrap_or(low + (high - low) / 2);
        if Some(k) != own {
            mark()?;
        }
        return Ok(Placement::At(k));
    }
    if rows.len() >= SLOTS as usize {
        return Err(StoreError::Unavailable(format!(
            "log store: millisecond {created_at_ms} holds {SLOTS} records of one gateway already"
        )));
    }
    // No free slot between the neighbours: spread the millisecond's rows (and the new one) evenly,
    // moving them out of the way first (negative keys are never used otherwise).
    let n = rows.len() as i64 + 1;
    let slot_of = |i: i64| lo + i * SLOTS / n;
    mark()?;
    conn.execute(&format!("UPDATE {table} SET k = -1 - k WHERE k BETWEEN ?1 AND ?2"), [lo, hi]).map_err(sql_err)?;
    let mut mv = conn.prepare_cached(&format!("UPDATE {table} SET k = ?2 WHERE k = ?1")).map_err(sql_err)?;
    for (i, (k, _, _)) in rows.iter().enumerate() {
        let i = i as i64;
        let to = slot_of(if i < before as i64 { i } else { i + 1 });
        mv.execute([-1 - k, to]).map_err(sql_err)?;
    }
    Ok(Placement::At(slot_of(before as i64)))
}

/// The table and key of the gateway's row with id `id`, if there is one. A UUIDv7 id (the gateway
/// makes every id so, [`crate::log::log_id_at`]) names its time and, mostly, its slot: the row is
/// read at that key, else searched for in its millisecond (placed elsewhere: [`place`]); any other
/// id by a scan of the gateway's rows.
pub(super) fn find_id(conn: &Connection, gateway: &str, id: &str) -> Result<Option<(String, i64)>, StoreError> {
    let Some(no) = gateway_number(conn, gateway)? else { return Ok(None) };
    let parts = Parts::load(conn, no)?;
    // The first row with this id in the gateway's keys [lo, hi].
    let within = |lo: i64, hi: i64| -> Result<Option<(String, i64)>, StoreError> {
        for (i, lo, hi) in parts.span(lo, hi) {
            let table = parts.table(i);
            let k: Option<i64> = conn
                .prepare_cached(&format!("SELECT k FROM {table} WHERE k BETWEEN ?1 AND ?2 AND id = ?3 LIMIT 1"))
                .map_err(sql_err)?
                .query_row(params![lo, hi, id], |r| r.get(0))
                .optional()
                .map_err(sql_err)?;
            if let Some(k) = k {
                return Ok(Some((table, k)));
            }
        }
        Ok(None)
    };
    let Some(t) = log_id_time_ms(id) else {
        let (lo, hi) = gateway_keys(no);
        return within(lo, hi);
    };
    if let Some(k) = own_key(no, t, id) {
        if let Some(found) = within(k, k)? {
            return Ok(Some(found));
        }
    }
    let (lo, hi) = ms_keys(no, t);
    within(lo, hi)
}

/// Forgets the placed-row notes ([`place`]) of the milliseconds before the gateway's oldest row,
/// in the table and in `placed`.
pub(super) fn forget_placed(
    tx: &Transaction<'_>,
    gateway: &str,
    placed: &Mutex<BTreeSet<i64>>,
) -> Result<(), StoreError> {
    let Some(no) = gateway_number(tx, gateway)? else { return Ok(()) };
    let (lo, hi) = gateway_keys(no);
    let parts = Parts::load(tx, no)?;
    let mut oldest = None;
    for i in 0..parts.list.len() {
        oldest = parts.end_key(tx, i, false)?;
        if oldest.is_some() {
            break;
        }
    }
    let below = oldest.map_or(hi, |k| (k & !(SLOTS - 1)) - 1);
    let gone = tx.execute("DELETE FROM log_placed WHERE ms_key BETWEEN ?1 AND ?2", [lo, below]).map_err(sql_err)?;
    if gone > 0 {
        *placed.lock().unwrap_or_else(PoisonError::into_inner) = load_placed(tx)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::sqlite::testing::*;

    #[tokio::test]
    async fn records_go_to_the_slot_their_id_names_or_between_their_neighbours() {
        let (path, dir) = temp_path("slots");
        let s = SqliteLogStore::open(&path).unwrap();
        let t = now_ms() - 10_000;
        // Ids the gateway made sit at the slot their counter names.
        let made: Vec<String> = (0..3).map(|_| log_id_at(t).to_string()).collect();
        let recs: Vec<LogRecord> = made.iter().map(|id| record(id, t)).collect();
        assert_eq!(s.insert_batch("gw", &recs).await.unwrap(), 3);
        // Two ids on one slot, ids that name none, and a burst at one millisecond in id order
        // (more than the halving of free slots allows: the millisecond is spread again).
        let mut others =
            vec![record(&id_with_counter(t + 1, 7, 1), t + 1), record(&id_with_counter(t + 1, 7, 2), t + 1)];
        others.push(record(&id_with_counter(t + 1, 7, 0), t + 1));
        others.extend((0..40).map(|i| record(&format!("burst-{i:03}"), t + 2)));
        others.extend((0..5).rev().map(|i| record(&format!("late-{i}"), t + 1)));
        others.push(record(&made[1], t + 3)); // the same id at another time is another record
        assert_eq!(s.insert_batch("gw", &others).await.unwrap(), others.len() as u64);
        // Replays are no-ops, wherever the record was placed.
        assert_eq!(s.insert_batch("gw", &others).await.unwrap(), 0);
        assert_eq!(s.insert_batch("gw", &recs).await.unwrap(), 0);
        let mut want: Vec<(u64, String)> =
            recs.iter().chain(&others).map(|r| (r.created_at_ms, r.id.clone())).collect();
        want.sort_by(|a, b| b.cmp(a));
        for limit in [1, 3, 7, 100] {
            assert_eq!(listed(&s, "gw", limit).await, want, "limit {limit}");
        }
        for r in recs.iter().chain(&others) {
            let got = s.get("gw", &r.id).await.unwrap().unwrap();
            assert_eq!(got.id, r.id);
        }
        assert_eq!(s.count("gw").await.unwrap(), want.len() as u64);
        drop(s);
        let conn = Connection::open(&path).unwrap();
        let no: i64 = conn.query_row("SELECT no FROM log_gateways WHERE name = 'gw'", [], |r| r.get(0)).unwrap();
        let table = part_tables(&conn, "gw").remove(0);
        for id in &made {
            let k: i64 = conn
                .query_row(
                    &format!("SELECT k FROM {table} WHERE id = ?1 AND created_at_ms = ?2"),
                    params![id, to_i64(t)],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(k, key(no, t, i64::from(log_id_counter(id, t).unwrap())), "{id}");
        }
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn gateway_numbers_run_out_and_are_reused_from_empty_gateways() {
        let (path, dir) = temp_path("gateways");
        let s = SqliteLogStore::open(&path).unwrap();
        let t = now_ms();
        for g in 0..MAX_GATEWAYS {
            let r = record(&log_id_at(t).to_string(), t);
            assert_eq!(s.insert_batch(&format!("g{g}"), std::slice::from_ref(&r)).await.unwrap(), 1);
        }
        let one_more = record(&log_id_at(t).to_string(), t);
        let err = s.insert_batch("late", std::slice::from_ref(&one_more)).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        // A gateway whose records are all gone gives its number up.
        assert_eq!(s.delete("g7", &LogFilter::default()).await.unwrap(), 1);
        assert_eq!(s.insert_batch("late", std::slice::from_ref(&one_more)).await.unwrap(), 1);
        assert_eq!(listed(&s, "late", 10).await, [(t, one_more.id.clone())]);
        assert_eq!(listed(&s, "g7", 10).await, []);
        assert_eq!(listed(&s, "g8", 10).await.len(), 1);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
