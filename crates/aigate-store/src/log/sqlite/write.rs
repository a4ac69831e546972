//! Writing: inserting a batch (its rows into the partitions, its bodies into the current segment,
//! the gateway's row count, the rollup upserts, the trim to the cap), all in one transaction; and
//! patching a record's feedback and score.
//!
//! Failure behaviour: any error rolls the whole batch back; body bytes already appended to the
//! segment stay unused until the segment goes.

use std::collections::{BTreeSet, HashSet};
use std::sync::PoisonError;

use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::keys::{find_id, gateway_number_or_new, ms_keys, own_key, place, Placement};
use super::parts::Parts;
use super::retention::{expire, trim_to_cap};
use super::schema::insert_sql;
use super::{sql_err, Shared};
use crate::log::analytics::{aggregate, upsert_set_sql, Rollup, RollupKey, FLOAT_COLUMNS, INT_COLUMNS};
use crate::log::bodies::{BodyFiles, BodyRef};
use crate::log::{finite, metadata_object_json, to_i64, to_u64, AtCap, Retention, DELETE_CHUNK_ROWS};
use crate::{LogRecord, StoreError};

/// The gateway's row count.
pub(super) fn count_rows(tx: &Connection, gateway: &str) -> Result<u64, StoreError> {
    let n: Option<i64> = tx
        .prepare_cached("SELECT n FROM log_counts WHERE gateway = ?1")
        .map_err(sql_err)?
        .query_row([gateway], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    Ok(n.map_or(0, to_u64))
}

/// Stores the gateway's row count.
pub(super) fn set_count(tx: &Transaction<'_>, gateway: &str, n: u64) -> Result<(), StoreError> {
    if n == 0 {
        tx.prepare_cached("DELETE FROM log_counts WHERE gateway = ?1").map_err(sql_err)?.execute([gateway])
    } else {
        tx.prepare_cached(
            "INSERT INTO log_counts (gateway, n) VALUES (?1, ?2) ON CONFLICT (gateway) DO UPDATE SET n = excluded.n",
        )
        .map_err(sql_err)?
        .execute(params![gateway, to_i64(n)])
    }
    .map_err(sql_err)?;
    Ok(())
}

/// The previous row [`insert_one`] bound in this batch. SQLite keeps a statement's bindings from
/// one execution to the next (rusqlite clears them only when the statement goes back to its
/// cache, after the batch), so a parameter equal to the previous row's is not bound again: most
/// columns repeat within a batch (gateway, provider, path, models, status, the NULLs), and
/// binding a value (copied into SQLite, the old one released) costs more than comparing it.
pub(super) struct PrevRow<'a> {
    record: &'a LogRecord,
    metadata: Option<String>,
    body: Option<BodyRef>,
}

/// Inserts one record, its bodies at `body`; returns whether it was new, and what it bound (the
/// `prev` of the next row). The parameters are bound one by one (`raw_bind_parameter`), those
/// that differ from `prev`'s only (all of them for a batch's first row).
pub(super) fn insert_one<'a>(
    conn: &Connection,
    stmt: &mut rusqlite::CachedStatement<'_>,
    (gateway, no, table): (&str, i64, &str),
    placed: &mut BTreeSet<i64>,
    r: &'a LogRecord,
    body: Option<BodyRef>,
    prev: Option<&PrevRow<'_>>,
) -> Result<(bool, PrevRow<'a>), StoreError> {
    let metadata = metadata_object_json(&r.metadata);
    let bind = |stmt: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
        // Binds `$get` (an expression of the record `$x`) unless the previous row's is the same.
        macro_rules! bind {
            ($i:expr, |$x:ident| $get:expr) => {{
                let v = {
                    let $x = r;
                    $get
                };
                if prev.is_none_or(|p| {
                    let $x = p.record;
                    $get != v
                }) {
                    stmt.raw_bind_parameter($i, v)?;
                }
            }};
        }
        // The same for a float, compared bit for bit (0.0 == -0.0, but they are not stored alike).
        macro_rules! bind_f64 {
            ($i:expr, |$x:ident| $get:expr) => {{
                let v: Option<f64> = {
                    let $x = r;
                    $get
                };
                if prev.is_none_or(|p| {
                    let $x = p.record;
                    let old: Option<f64> = $get;
                    old.map(f64::to_bits) != v.map(f64::to_bits)
                }) {
                    stmt.raw_bind_parameter($i, v)?;
                }
            }};
        }
        if prev.is_none() {
            stmt.raw_bind_parameter(1, gateway)?;
        }
        bind!(2, |x| &x.id);
        bind!(3, |x| &x.event_id);
        bind!(4, |x| to_i64(x.created_at_ms));
        bind!(5, |x| &x.provider);
        bind!(6, |x| &x.path);
        bind!(7, |x| &x.requested_model);
        bind!(8, |x| &x.served_model);
        bind!(9, |x| i64::from(x.status));
        bind!(10, |x| x.success);
        bind!(11, |x| &x.cache_status);
        bind!(12, |x| x.stream);
        bind_f64!(13, |x| Some(if x.duration_ms.is_finite() { x.duration_ms } else { 0.0 }));
        bind_f64!(14, |x| finite(x.ttfb_ms));
        bind_f64!(15, |x| finite(x.upstream_ms));
        bind_f64!(16, |x| finite(x.overhead_ms));
        bind!(17, |x| x.tokens_in.map(to_i64));
        bind!(18, |x| x.tokens_out.map(to_i64));
        bind!(19, |x| x.cached_tokens_in.map(to_i64));
        bind!(20, |x| x.reasoning_tokens.map(to_i64));
        bind_f64!(21, |x| finite(x.cost_usd));
        bind_f64!(22, |x| finite(x.saved_usd));
        bind!(23, |x| x.custom_cost);
        if prev.is_none_or(|p| p.metadata != metadata) {
            stmt.raw_bind_parameter(24, &metadata)?;
        }
        bind!(25, |x| &x.user_agent);
        bind!(26, |x| &x.error);
        bind!(27, |x| x.feedback.map(i64::from));
        bind_f64!(28, |x| finite(x.score));
        let old = prev.map(|p| p.body);
        if old.is_none_or(|o| o.map(|b| b.seg) != body.map(|b| b.seg)) {
            stmt.raw_bind_parameter(29, body.map(|b| b.seg))?;
        }
        if old.is_none_or(|o| o.map(|b| b.off) != body.map(|b| b.off)) {
            stmt.raw_bind_parameter(30, body.map(|b| b.off))?;
        }
        if old.is_none_or(|o| o.and_then(|b| b.request_len) != body.and_then(|b| b.request_len)) {
            stmt.raw_bind_parameter(31, body.and_then(|b| b.request_len))?;
        }
        if old.is_none_or(|o| o.and_then(|b| b.response_len) != body.and_then(|b| b.response_len)) {
            stmt.raw_bind_parameter(32, body.and_then(|b| b.response_len))?;
        }
        bind!(33, |x| i64::from(x.attempts));
        bind!(34, |x| x.step.map(i64::from));
        bind!(35, |x| &x.route);
        bind!(36, |x| &x.breaker);
        Ok(())
    };
    bind(stmt).map_err(sql_err)?;
    let mut execute_at = |k: i64| -> Result<bool, StoreError> {
        stmt.raw_bind_parameter(37, k).map_err(sql_err)?;
        Ok(stmt.raw_execute().map_err(sql_err)? > 0)
    };
    // Mostly: the slot the id names is free, in a millisecond holding no placed row.
    let ms_key = ms_keys(no, r.created_at_ms).0;
    let own = own_key(no, r.created_at_ms, &r.id);
    let new = match own.filter(|_| !placed.contains(&ms_key)) {
        Some(k) if execute_at(k)? => true,
        _ => match place(conn, table, no, r.created_at_ms, &r.id)? {
            Placement::Stored => false,
            Placement::At(k) => {
                if Some(k) != own {
                    // `place` noted it in the table (a rolled-back batch leaves the set a
                    // millisecond too many: harmless).
                    placed.insert(ms_key);
                }
                execute_at(k)?
            }
        },
    };
    Ok((new, PrevRow { record: r, metadata, body }))
}

/// Adds aggregated rollups to the gateway's rows (one upsert per row, in key order).
pub(super) fn upsert_rollups(
    tx: &Transaction<'_>,
    gateway: &str,
    rows: &[(RollupKey, Rollup)],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO log_rollups (gateway, grain_ms, dim, bucket_ms, dim_value, {}, {}, hist) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
         ON CONFLICT (gateway, grain_ms, dim, bucket_ms, dim_value) DO UPDATE SET {}",
        INT_COLUMNS.join(", "),
        FLOAT_COLUMNS.join(", "),
        upsert_set_sql(false, "log_rollups")
    );
    let mut stmt = tx.prepare_cached(&sql).map_err(sql_err)?;
    for (k, r) in rows {
        let mut values: Vec<Value> = vec![
            Value::Text(gateway.to_owned()),
            Value::Integer(to_i64(k.grain_ms)),
            Value::Text(k.dim.clone()),
            Value::Integer(to_i64(k.bucket_ms)),
            Value::Text(k.value.clone()),
        ];
        values.extend(r.ints().into_iter().map(|v| Value::Integer(to_i64(v))));
        values.extend(r.floats().into_iter().map(Value::Real));
        values.push(Value::Text(r.hist.to_json()));
        stmt.execute(rusqlite::params_from_iter(values)).map_err(sql_err)?;
    }
    Ok(())
}

/// Inserts `records` into `gateway`'s partitions in transaction `tx`, honouring its `retention`
/// (see [`crate::LogStore::insert_batch`]): their bodies go to the current segment, the gateway's
/// row count and the rollups are updated, and at the cap the oldest rows go (or, with
/// [`AtCap::StopInserting`], rows older than `max_age_ms` at `now_ms` first make room). Returns the
/// rows inserted and the rows removed.
pub(super) fn insert_batch(
    tx: &Transaction<'_>,
    bodies: &mut BodyFiles,
    shared: &Shared,
    gateway: &str,
    records: &[LogRecord],
    retention: Option<Retention>,
    now_ms: u64,
) -> Result<(u64, u64), StoreError> {
    let no = gateway_number_or_new(tx, gateway)?;
    let policy = shared.policy;
    let mut parts = Parts::load(tx, no)?;
    parts.roll(tx, policy.roll_rows(retention))?;
    let mut placed = shared.placed.lock().unwrap_or_else(PoisonError::into_inner);
    let mut n = count_rows(tx, gateway)?;
    let mut removed = 0;
    let cap = match retention {
        Some(r) if r.at_cap == AtCap::StopInserting => {
            // Make room from expired rows before refusing any.
            if let Some(age) = r.max_age_ms.filter(|_| n.saturating_add(records.len() as u64) > r.max_records) {
                let d = expire(tx, bodies, &mut parts, now_ms.saturating_sub(age), DELETE_CHUNK_ROWS)?;
                removed += d;
                n = n.saturating_sub(d);
            }
            Some(r.max_records)
        }
        _ => None,
    };
    let mut inserted = 0u64;
    // What the rollups count: every record but duplicate ids.
    let mut counted: Vec<&LogRecord> = Vec::with_capacity(records.len());
    let mut stopped_at = records.len();
    // Rows inserted per partition, and of them with bodies.
    let mut added = vec![(0i64, 0i64); parts.list.len()];
    // Rows inserted that point into the batch's body segment.
    let mut with_bodies = 0i64;
    if records.iter().any(|r| r.request_body.is_some() || r.response_body.is_some()) {
        bodies.begin()?;
    }
    {
        // The statement of the partition the last record went to (nearly always the
        // newest).
        let mut current: Option<(usize, String, rusqlite::CachedStatement<'_>)> = None;
        let mut prev: Option<PrevRow<'_>> = None;
        for (i, r) in records.iter().enumerate() {
            if cap.is_some_and(|cap| n >= cap) {
                stopped_at = i;
                break;
            }
            let part = parts.at(ms_keys(no, r.created_at_ms).0).unwrap_or(0);
            if current.as_ref().is_none_or(|c| c.0 != part) {
                // Another statement: its bindings are not the previous row's.
                drop(current.take());
                prev = None;
                let table = parts.table(part);
                let stmt = tx.prepare_cached(&insert_sql(&table)).map_err(sql_err)?;
                current = Some((part, table, stmt));
            }
            let Some((_, table, stmt)) = current.as_mut() else { unreachable!("set above") };
            let body = bodies.add(r.request_body.as_ref(), r.response_body.as_ref());
            let (new, bound) =
                insert_one(tx, stmt, (gateway, no, table.as_str()), &mut placed, r, body, prev.as_ref())?;
            prev = Some(bound);
            if new {
                n += 1;
                inserted += 1;
                with_bodies += i64::from(body.is_some());
                added[part].0 += 1;
                added[part].1 += i64::from(body.is_some());
                counted.push(r);
            }
        }
    }
    for (i, &(rows, _)) in added.iter().enumerate() {
        parts.add(tx, i, rows)?;
    }
    // The bodies reach the file before the rows pointing at them commit; the rows pointing
    // into the segment are counted for it and for each partition (which then needs no scan
    // when it is dropped).
    if let Some(seg) = bodies.flush()? {
        if with_bodies > 0 {
            tx.prepare_cached(
                "INSERT INTO body_segments (seg, live) VALUES (?1, ?2) \
                 ON CONFLICT (seg) DO UPDATE SET live = live + excluded.live",
            )
            .map_err(sql_err)?
            .execute(params![seg, with_bodies])
            .map_err(sql_err)?;
            let mut per_part = tx
                .prepare_cached(
                    "INSERT INTO log_part_segs (seq, seg, n) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (seq, seg) DO UPDATE SET n = n + excluded.n",
                )
                .map_err(sql_err)?;
            for (i, &(_, with)) in added.iter().enumerate().filter(|(_, a)| a.1 > 0) {
                per_part.execute(params![parts.list[i].seq, seg, with]).map_err(sql_err)?;
            }
        }
    }
    if stopped_at < records.len() {
        // Dropped at the cap: still traffic, unless a duplicate id.
        let mut seen = HashSet::new();
        for r in &records[stopped_at..] {
            let (lo, hi) = ms_keys(no, r.created_at_ms);
            if !seen.insert((r.created_at_ms, r.id.as_str())) {
                continue;
            }
            let stored = match parts.at(lo) {
                Some(i) => tx
                    .prepare_cached(&format!(
                        "SELECT 1 FROM {} WHERE k BETWEEN ?1 AND ?2 AND created_at_ms = ?3 AND id = ?4",
                        parts.table(i)
                    ))
                    .map_err(sql_err)?
                    .exists(params![lo, hi, to_i64(r.created_at_ms), r.id])
                    .map_err(sql_err)?,
                None => false,
            };
            if !stored {
                counted.push(r);
            }
        }
    }
    upsert_rollups(tx, gateway, &aggregate(counted))?;
    if let Some(r) = retention.filter(|r| r.at_cap == AtCap::DeleteOldest && n > r.max_records) {
        let chunk = DELETE_CHUNK_ROWS.max(records.len() as u64);
        let d = trim_to_cap(tx, bodies, (&mut parts, policy), &r, n, chunk)?;
        removed += d;
        n = n.saturating_sub(d);
    }
    set_count(tx, gateway, n)?;
    Ok((inserted, removed))
}

/// Sets the feedback and/or score of the gateway's record `id`; returns whether it exists.
pub(super) fn patch(
    tx: &Transaction<'_>,
    gateway: &str,
    id: &str,
    feedback: Option<i8>,
    score: Option<f64>,
) -> Result<bool, StoreError> {
    let Some((table, k)) = find_id(tx, gateway, id)? else { return Ok(false) };
    let n = tx
        .execute(
            &format!("UPDATE {table} SET feedback = COALESCE(?2, feedback), score = COALESCE(?3, score) WHERE k = ?1"),
            params![k, feedback.map(i64::from), score],
        )
        .map_err(sql_err)?;
    Ok(n > 0)
}
