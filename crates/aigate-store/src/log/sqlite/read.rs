//! Reading: a page of records (newest partition first, each in key order down), one record with its
//! bodies, the analytics rollups; and decoding rows.
//!
//! Each read runs in one read transaction, so it sees one state of the file even while another
//! process drops a partition. A row that cannot be decoded is [`StoreError::Corrupt`].

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::keys::{find_id, gateway_number, ms_keys, time_keys};
use super::parts::Parts;
use super::sql_err;
use crate::log::analytics::{assemble, Histogram, Plan, Rollup, RollupRow, FLOAT_COLUMNS, INT_COLUMNS};
use crate::log::bodies::{BodyFiles, BodyRef};
use crate::log::{
    decode_cursor, encode_cursor, filter_sql, invalid, metadata_from_object_json, to_i64, to_u64, Dialect, SqlValue,
    SqlWhere, LIST_COLUMNS,
};
use crate::{Analytics, AnalyticsQuery, LogFilter, LogPage, LogRecord, StoreError};

/// Decodes a rollup row: `bucket_ms, dim, dim_value`, the counters, the sums, `hist`.
pub(super) fn decode_rollup(row: &Row<'_>) -> rusqlite::Result<Result<RollupRow, StoreError>> {
    let mut ints = [0u64; 9];
    for (i, v) in ints.iter_mut().enumerate() {
        *v = to_u64(row.get(3 + i)?);
    }
    let mut floats = [0f64; 4];
    for (i, v) in floats.iter_mut().enumerate() {
        *v = row.get(12 + i)?;
    }
    let hist: String = row.get(16)?;
    let hist = match Histogram::from_json(&hist) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(RollupRow {
        bucket_ms: to_u64(row.get(0)?),
        dim: row.get(1)?,
        value: row.get(2)?,
        rollup: Rollup::from_columns(ints, floats, hist),
    }))
}

/// Decodes a row of [`LIST_COLUMNS`] (the bodies are read apart, from their segment).
pub(super) fn decode(row: &Row<'_>) -> rusqlite::Result<Result<LogRecord, StoreError>> {
    let opt_u64 = |i: usize| -> rusqlite::Result<Option<u64>> { Ok(row.get::<_, Option<i64>>(i)?.map(to_u64)) };
    let metadata: Option<String> = row.get(23)?;
    let metadata = match metadata.as_deref().map(metadata_from_object_json).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return Ok(Err(e)),
    };
    let status: i64 = row.get(8)?;
    let feedback: Option<i64> = row.get(26)?;
    Ok(Ok(LogRecord {
        id: row.get(0)?,
        event_id: row.get(1)?,
        created_at_ms: to_u64(row.get(2)?),
        gateway: row.get(3)?,
        provider: row.get(4)?,
        path: row.get(5)?,
        requested_model: row.get(6)?,
        served_model: row.get(7)?,
        status: u16::try_from(status).unwrap_or(0),
        success: row.get(9)?,
        cache_status: row.get(10)?,
        stream: row.get(11)?,
        duration_ms: row.get(12)?,
        ttfb_ms: row.get(13)?,
        upstream_ms: row.get(14)?,
        overhead_ms: row.get(15)?,
        tokens_in: opt_u64(16)?,
        tokens_out: opt_u64(17)?,
        cached_tokens_in: opt_u64(18)?,
        reasoning_tokens: opt_u64(19)?,
        cost_usd: row.get(20)?,
        saved_usd: row.get(21)?,
        custom_cost: row.get(22)?,
        metadata,
        user_agent: row.get(24)?,
        error: row.get(25)?,
        request_body: None,
        response_body: None,
        feedback: feedback.and_then(|f| i8::try_from(f).ok()),
        score: row.get(27)?,
        attempts: u32::try_from(row.get::<_, i64>(28)?).unwrap_or(0),
        step: row.get::<_, Option<i64>>(29)?.and_then(|s| u32::try_from(s).ok()),
        route: row.get(30)?,
        breaker: row.get(31)?,
    }))
}

/// What [`list`] reads: a checked filter.
pub(super) struct ListQuery {
    gateway: String,
    /// The filter's conditions but the time range and the cursor.
    w: SqlWhere,
    /// The `(created_at_ms, id)` of the last row of the previous page.
    cursor: Option<(u64, String)>,
    limit: usize,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
}

impl ListQuery {
    /// Checks `filter` (an invalid one is [`StoreError::InvalidInput`]).
    pub(super) fn new(gateway: &str, filter: &LogFilter) -> Result<ListQuery, StoreError> {
        Ok(ListQuery {
            gateway: gateway.to_owned(),
            w: filter_sql(Dialect::Sqlite, gateway, filter, false)?,
            cursor: filter.cursor.as_deref().map(decode_cursor).transpose().map_err(invalid)?,
            limit: filter.effective_limit() as usize,
            from_ms: filter.from_ms,
            to_ms: filter.to_ms,
        })
    }
}

/// One page of the gateway's records matching `q`, newest first.
pub(super) fn list(conn: &Connection, q: ListQuery) -> Result<LogPage, StoreError> {
    let ListQuery { gateway, w, cursor, limit, from_ms, to_ms } = q;
    let empty = LogPage { records: Vec::new(), next_cursor: None };
    let Some(no) = gateway_number(conn, &gateway)? else { return Ok(empty) };
    let Some((lo, mut hi)) = time_keys(no, from_ms, to_ms) else { return Ok(empty) };
    let parts = Parts::load(conn, no)?;
    let mut w = w;
    if let Some((ms, id)) = &cursor {
        // After the cursor's row: below its key; if that row is gone, before it in
        // (created_at_ms, id) order, as the keys sort.
        let (ms_lo, ms_hi) = ms_keys(no, *ms);
        let at: Option<i64> = match parts.at(ms_lo) {
            Some(i) => conn
                .prepare_cached(&format!(
                    "SELECT k FROM {} WHERE k BETWEEN ?1 AND ?2 AND created_at_ms = ?3 AND id = ?4",
                    parts.table(i)
                ))
                .map_err(sql_err)?
                .query_row(params![ms_lo, ms_hi, to_i64(*ms), id], |r| r.get(0))
                .optional()
                .map_err(sql_err)?,
            None => None,
        };
        match at {
            Some(k) => hi = hi.min(k - 1),
            None => {
                hi = hi.min(ms_hi);
                let p = w.param(SqlValue::Int(to_i64(*ms)));
                let q = w.param(SqlValue::Text(id.clone()));
                w.and(&format!("(created_at_ms, id) < ({p}, {q})"));
            }
        }
    }
    // Newest partition first, each in key order down, until the page (and one more row,
    // which says whether there is a next page) is full.
    let mut records = Vec::with_capacity(limit.min(64));
    for (i, lo, hi) in parts.span(lo, hi).into_iter().rev() {
        let want = limit + 1 - records.len();
        if want == 0 {
            break;
        }
        let mut w = w.clone();
        let p = w.param(SqlValue::Int(lo));
        let q = w.param(SqlValue::Int(hi));
        w.and(&format!("k BETWEEN {p} AND {q}"));
        let l = w.param(SqlValue::Int(to_i64(want as u64)));
        let sql = format!("SELECT {LIST_COLUMNS} FROM {} WHERE {} ORDER BY k DESC LIMIT {l}", parts.table(i), w.sql);
        let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(w.params.iter()), decode).map_err(sql_err)?;
        for row in rows {
            records.push(row.map_err(sql_err)??);
        }
    }
    let next_cursor = if records.len() > limit {
        records.truncate(limit);
        records.last().map(|r| encode_cursor(r.created_at_ms, &r.id))
    } else {
        None
    };
    Ok(LogPage { records, next_cursor })
}

/// The gateway's record `id` with its bodies.
pub(super) fn get(
    conn: &Connection,
    bodies: &BodyFiles,
    gateway: &str,
    id: &str,
) -> Result<Option<LogRecord>, StoreError> {
    let Some((table, k)) = find_id(conn, gateway, id)? else { return Ok(None) };
    let sql = format!("SELECT {LIST_COLUMNS}, body_seg, body_off, request_len, response_len FROM {table} WHERE k = ?1");
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let found = stmt
        .query_row([k], |r| {
            let body = match (r.get::<_, Option<i64>>(32)?, r.get::<_, Option<i64>>(33)?) {
                (Some(seg), Some(off)) => Some(BodyRef { seg, off, request_len: r.get(34)?, response_len: r.get(35)? }),
                _ => None,
            };
            Ok((decode(r)?, body))
        })
        .optional()
        .map_err(sql_err)?;
    let Some((record, body)) = found else { return Ok(None) };
    let mut record = record?;
    if let Some(body) = body {
        (record.request_body, record.response_body) = bodies.read(&body);
    }
    Ok(Some(record))
}

/// The gateway's analytics over `q`, planned as `p`, from its rollup rows.
pub(super) fn analytics(
    conn: &Connection,
    gateway: &str,
    q: &AnalyticsQuery,
    p: &Plan,
) -> Result<Analytics, StoreError> {
    let sql = format!(
        "SELECT bucket_ms, dim, dim_value, {}, {}, hist FROM log_rollups WHERE gateway = ?1 AND grain_ms = ?2 \
         AND dim IN (?3, ?4) AND bucket_ms >= ?5 AND bucket_ms < ?6",
        INT_COLUMNS.join(", "),
        FLOAT_COLUMNS.join(", ")
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let group_dim = p.dims.last().cloned().unwrap_or_default();
    let args = params![gateway, to_i64(p.grain_ms), "", group_dim, to_i64(p.from_bucket_ms), to_i64(p.to_bucket_ms)];
    let rows = stmt.query_map(args, decode_rollup).map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(sql_err)??);
    }
    Ok(assemble(q, out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::log::sqlite::testing::*;

    /// Two stores on one file (as two processes would be): one keeps adding partitions and
    /// dropping the oldest, the other lists and looks records up meanwhile; each read sees one
    /// state of the file, never a partition dropped under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_never_meets_a_partition_dropped_under_it() {
        let (path, dir) = temp_path("two-stores");
        let writer = SqliteLogStore::open_with_partition_rows(&path, 2).unwrap();
        writer.set_retention("gw", Retention { max_records: 6, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        let reader = SqliteLogStore::open(&path).unwrap();
        let t = now_ms() - 100_000;
        let first = record(&log_id_at(t).to_string(), t);
        writer.insert_batch("gw", std::slice::from_ref(&first)).await.unwrap();
        let writing = tokio::spawn(async move {
            for i in 1..400u64 {
                let batch: Vec<LogRecord> =
                    (0..3).map(|j| record(&log_id_at(t + i * 3 + j).to_string(), t + i * 3 + j)).collect();
                writer.insert_batch("gw", &batch).await.unwrap();
            }
        });
        let mut reads = 0;
        while !writing.is_finished() {
            let page = reader.list("gw", &LogFilter { limit: Some(2), ..LogFilter::default() }).await.unwrap();
            assert!(page.records.len() <= 2);
            let _ = reader.get("gw", &first.id).await.unwrap();
            reads += 1;
        }
        writing.await.unwrap();
        assert!(reads > 10, "{reads} reads");
        assert!(reader.count("gw").await.unwrap() <= 6);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
