//! Shared request-log store: a PostgreSQL table used by every replica.
//!
//! Layout (table name configurable, default [`DEFAULT_LOG_TABLE`]): `<table>` with one column per
//! scalar field of [`LogRecord`] (primary key `(gateway, id)`, `id` in the `C` collation so cursor
//! order is byte order), `metadata` as JSONB holding an array of `{"k": key, "v": value}` objects
//! (entry order kept; the metadata filter is a containment test), bodies as BYTEA; indexes
//! `(gateway, created_at_ms, id)` and `(gateway, event_id, created_at_ms, id)`.
//! `<table>_counts(gateway, n)` holds each gateway's row count, kept in the transaction of every
//! insert and delete; its row is locked first by every write, which serialises the writes of one
//! gateway across replicas (so a cap holds exactly and trims never deadlock). `<table>_rollups`
//! holds the analytics rollups ([`crate::log::analytics`]), primary key `(gateway, grain_ms, dim,
//! bucket_ms, dim_value)`, histogram as JSONB; every batch adds to them with one `INSERT … ON
//! CONFLICT DO UPDATE` of its aggregated rows in key order, in the batch's transaction, so the sums
//! stay exact when replicas write at once. `<table>_schema` holds the schema version.
//!
//! aigate creates the schema itself ([`PostgresLogStore::ensure_schema`], run once per store before
//! its first query), in one transaction that first takes `pg_advisory_xact_lock` on a key derived
//! from the table name, so replicas starting together create it once and the others wait and then
//! find it done. Tables of version 2 (the first released layout) are converted in place in the same
//! way, keeping their records; tables of another version (development builds) are refused: every
//! operation fails with a message naming the tables and what to do.
//!
//! Bounds: a pool of at most [`POOL_SIZE`] connections; a batch is inserted with one `INSERT …
//! SELECT FROM UNNEST(…)` statement per chunk of at most [`INSERT_CHUNK_ROWS`] rows /
//! [`INSERT_CHUNK_BYTES`] of bodies, plus one rollup upsert, all in one transaction.
//!
//! Failure behaviour: nothing connects at construction, so a store is built while PostgreSQL is
//! down; every operation then fails with [`StoreError::Unavailable`] (or [`StoreError::Timeout`]
//! after [`CONNECT_TIMEOUT`] connecting / [`OP_TIMEOUT`] per operation) and succeeds again once the
//! server is back, creating the schema first if it had not yet. A failed batch is rolled back whole.
//! Connections are plain TCP (or Unix socket): a URL with `sslmode=require` is refused when
//! connecting, as TLS is not built in.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::log::analytics::{
    aggregate, assemble, plan, upsert_set_sql, Histogram, Rollup, RollupKey, RollupRow, FLOAT_COLUMNS, HOUR_MS,
    INT_COLUMNS, MINUTE_MS,
};
use crate::log::{
    check_patch, encode_cursor, filter_sql, finite, invalid, stored_metadata, to_i64, to_u64, AtCap, Dialect,
    MetaValue, Retention, Retentions, SqlValue, DELETE_CHUNK_ROWS, LIST_COLUMNS,
};
use crate::{
    Analytics, AnalyticsQuery, Clock, LogFilter, LogPage, LogRecord, LogStore, StoreError, HOUR_ROLLUP_RETENTION_MS,
    MINUTE_ROLLUP_RETENTION_MS,
};

/// Table used by [`PostgresLogStore::connect`].
pub const DEFAULT_LOG_TABLE: &str = "aigate_logs";

/// Most connections a store opens.
pub const POOL_SIZE: usize = 4;

/// How long connecting (or waiting for a free connection) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one operation may take in all.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most rows per insert statement.
pub const INSERT_CHUNK_ROWS: usize = 1_000;

/// Most body bytes per insert statement (a chunk holds at least one row).
pub const INSERT_CHUNK_BYTES: usize = 32 << 20;

/// Longest table name accepted (PostgreSQL identifiers hold 63 bytes; suffixes are added).
const MAX_TABLE_LEN: usize = 40;

/// Version of the schema this aigate creates and reads (in `<table>_schema`): version 2 with the
/// retry and fallback columns (`attempts`, `step`, `route`, `breaker`).
const SCHEMA_VERSION: i32 = 3;

/// The version [`migrate_sql`] converts.
const MIGRATED_VERSION: i32 = 2;

/// Converts version-2 tables to the current schema: the new columns (existing rows read `attempts`
/// 0, the others NULL; a column with a constant default rewrites no row) and the version.
fn migrate_sql(t: &str) -> String {
    format!(
        r#"ALTER TABLE "{t}"
               ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 0,
               ADD COLUMN IF NOT EXISTS step INTEGER,
               ADD COLUMN IF NOT EXISTS route TEXT,
               ADD COLUMN IF NOT EXISTS breaker TEXT;
           UPDATE "{t}_schema" SET version = {SCHEMA_VERSION};"#
    )
}

/// The schema of `table` (every statement idempotent): the records, the counts, the rollups.
fn create_schema_sql(t: &str) -> String {
    format!(
        r#"CREATE TABLE IF NOT EXISTS "{t}" (
               gateway TEXT NOT NULL,
               id TEXT COLLATE "C" NOT NULL,
               event_id TEXT,
               created_at_ms BIGINT NOT NULL,
               provider TEXT NOT NULL,
               path TEXT NOT NULL,
               requested_model TEXT,
               served_model TEXT,
               status INTEGER NOT NULL,
               success BOOLEAN NOT NULL,
               cache_status TEXT NOT NULL,
               stream BOOLEAN NOT NULL,
               duration_ms DOUBLE PRECISION NOT NULL,
               ttfb_ms DOUBLE PRECISION,
               upstream_ms DOUBLE PRECISION,
               overhead_ms DOUBLE PRECISION,
               tokens_in BIGINT,
               tokens_out BIGINT,
               cached_tokens_in BIGINT,
               reasoning_tokens BIGINT,
               cost_usd DOUBLE PRECISION,
               saved_usd DOUBLE PRECISION,
               custom_cost BOOLEAN NOT NULL,
               metadata JSONB,
               user_agent TEXT,
               error TEXT,
               feedback SMALLINT,
               score DOUBLE PRECISION,
               request_body BYTEA,
               response_body BYTEA,
               attempts INTEGER NOT NULL DEFAULT 0,
               step INTEGER,
               route TEXT,
               breaker TEXT,
               PRIMARY KEY (gateway, id)
           );
           CREATE INDEX IF NOT EXISTS "{t}_gateway_time" ON "{t}" (gateway, created_at_ms, id);
           CREATE INDEX IF NOT EXISTS "{t}_gateway_event" ON "{t}" (gateway, event_id, created_at_ms, id);
           CREATE TABLE IF NOT EXISTS "{t}_counts" (
               gateway TEXT PRIMARY KEY,
               n BIGINT NOT NULL
           );
           CREATE TABLE IF NOT EXISTS "{t}_rollups" (
               gateway TEXT NOT NULL,
               grain_ms BIGINT NOT NULL,
               dim TEXT NOT NULL,
               bucket_ms BIGINT NOT NULL,
               dim_value TEXT NOT NULL,
               requests BIGINT NOT NULL,
               errors BIGINT NOT NULL,
               cache_hits BIGINT NOT NULL,
               shadow_hits BIGINT NOT NULL,
               tokens_in BIGINT NOT NULL,
               tokens_out BIGINT NOT NULL,
               cached_tokens_in BIGINT NOT NULL,
               reasoning_tokens BIGINT NOT NULL,
               cost_unknown BIGINT NOT NULL,
               cost_usd DOUBLE PRECISION NOT NULL,
               saved_usd DOUBLE PRECISION NOT NULL,
               shadow_saved_usd DOUBLE PRECISION NOT NULL,
               duration_sum_ms DOUBLE PRECISION NOT NULL,
               hist JSONB NOT NULL,
               PRIMARY KEY (gateway, grain_ms, dim, bucket_ms, dim_value)
           );"#
    )
}

/// Statements whose text depends only on the table name.
struct Queries {
    insert: String,
    existing_ids: String,
    upsert_rollups: String,
    select_rollups: String,
    prune_rollups: String,
    lock_count: String,
    set_count: String,
    get_count: String,
    get: String,
    patch: String,
    delete_older: String,
    delete_oldest: String,
}

impl Queries {
    fn new(t: &str) -> Queries {
        Queries {
            insert: format!(
                r#"INSERT INTO "{t}" (gateway, id, event_id, created_at_ms, provider, path, requested_model,
                   served_model, status, success, cache_status, stream, duration_ms, ttfb_ms, upstream_ms,
                   overhead_ms, tokens_in, tokens_out, cached_tokens_in, reasoning_tokens, cost_usd, saved_usd,
                   custom_cost, metadata, user_agent, error, feedback, score, request_body, response_body,
                   attempts, step, route, breaker)
                   SELECT $1::text, u.* FROM UNNEST($2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],
                   $7::text[], $8::text[], $9::int4[], $10::bool[], $11::text[], $12::bool[], $13::float8[],
                   $14::float8[], $15::float8[], $16::float8[], $17::int8[], $18::int8[], $19::int8[], $20::int8[],
                   $21::float8[], $22::float8[], $23::bool[], $24::jsonb[], $25::text[], $26::text[], $27::int2[],
                   $28::float8[], $29::bytea[], $30::bytea[], $31::int4[], $32::int4[], $33::text[],
                   $34::text[]) AS u
                   ON CONFLICT (gateway, id) DO NOTHING RETURNING id"#
            ),
            existing_ids: format!(r#"SELECT id FROM "{t}" WHERE gateway = $1 AND id = ANY($2::text[])"#),
            upsert_rollups: format!(
                r#"INSERT INTO "{t}_rollups" AS r (gateway, grain_ms, dim, bucket_ms, dim_value, {ints}, {floats}, hist)
                   SELECT $1::text, u.grain_ms, u.dim, u.bucket_ms, u.dim_value, {u_ints}, {u_floats}, u.hist::jsonb
                   FROM UNNEST($2::int8[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::int8[], $8::int8[],
                   $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::float8[],
                   $16::float8[], $17::float8[], $18::float8[], $19::text[])
                   AS u(grain_ms, dim, bucket_ms, dim_value, {ints}, {floats}, hist)
                   ON CONFLICT (gateway, grain_ms, dim, bucket_ms, dim_value) DO UPDATE SET {set}"#,
                ints = INT_COLUMNS.join(", "),
                floats = FLOAT_COLUMNS.join(", "),
                u_ints = INT_COLUMNS.map(|c| format!("u.{c}")).join(", "),
                u_floats = FLOAT_COLUMNS.map(|c| format!("u.{c}")).join(", "),
                set = upsert_set_sql(true, "r"),
            ),
            select_rollups: format!(
                r#"SELECT bucket_ms, dim, dim_value, {}, {}, hist::text FROM "{t}_rollups"
                   WHERE gateway = $1 AND grain_ms = $2 AND dim = ANY($3::text[]) AND bucket_ms >= $4
                   AND bucket_ms < $5"#,
                INT_COLUMNS.join(", "),
                FLOAT_COLUMNS.join(", ")
            ),
            prune_rollups: format!(
                r#"DELETE FROM "{t}_rollups" WHERE ctid = ANY(ARRAY(SELECT ctid FROM "{t}_rollups"
                   WHERE gateway = $1 AND ((grain_ms = $2 AND bucket_ms < $3) OR (grain_ms = $4 AND bucket_ms < $5))
                   LIMIT $6))"#
            ),
            // Creates the row if needed and locks it for the transaction.
            lock_count: format!(
                r#"INSERT INTO "{t}_counts" (gateway, n) VALUES ($1, 0)
                   ON CONFLICT (gateway) DO UPDATE SET n = "{t}_counts".n RETURNING n"#
            ),
            set_count: format!(r#"UPDATE "{t}_counts" SET n = $2 WHERE gateway = $1"#),
            get_count: format!(r#"SELECT n FROM "{t}_counts" WHERE gateway = $1"#),
            get: format!(
                r#"SELECT {LIST_COLUMNS}, request_body, response_body FROM "{t}" WHERE gateway = $1 AND id = $2"#
            ),
            patch: format!(
                r#"UPDATE "{t}" SET feedback = COALESCE($3, feedback), score = COALESCE($4, score)
                   WHERE gateway = $1 AND id = $2"#
            ),
            delete_older: format!(
                r#"DELETE FROM "{t}" WHERE gateway = $1 AND id IN
                   (SELECT id FROM "{t}" WHERE gateway = $1 AND created_at_ms < $2 ORDER BY created_at_ms, id LIMIT $3)"#
            ),
            delete_oldest: format!(
                r#"DELETE FROM "{t}" WHERE gateway = $1 AND id IN
                   (SELECT id FROM "{t}" WHERE gateway = $1 ORDER BY created_at_ms, id LIMIT $2)"#
            ),
        }
    }
}

/// Maps a PostgreSQL error to [`StoreError::Unavailable`], with the server's message.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match std::error::Error::source(&e) {
        Some(cause) => StoreError::Unavailable(format!("postgres log store: {e}: {cause}")),
        None => StoreError::Unavailable(format!("postgres log store: {e}")),
    }
}

/// Maps a pool error: timeouts to [`StoreError::Timeout`].
fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(_) => StoreError::Timeout,
        PoolError::Backend(e) => pg_err(e),
        e => StoreError::Unavailable(format!("postgres log store: {e}")),
    }
}

/// A stable 64-bit FNV-1a hash (the advisory lock key of a table's schema creation).
fn lock_key(s: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// State shared by the clones of one store.
struct Shared {
    pool: Pool,
    table: String,
    q: Queries,
    /// Set once the schema is known to be in place ([`PostgresLogStore::ensure_schema`]).
    schema_ready: tokio::sync::OnceCell<()>,
    retention: Retentions,
}

/// The request-log store in a PostgreSQL table shared by replicas. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresLogStore {
    inner: Arc<Shared>,
    /// Where the retention cutoffs (`max_age_ms`, rollup pruning) are measured from.
    clock: Clock,
}

impl std::fmt::Debug for PostgresLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLogStore").field("table", &self.inner.table).finish()
    }
}

impl PostgresLogStore {
    /// A store on table [`DEFAULT_LOG_TABLE`] of the database at `url` (`postgres://` or
    /// `postgresql://`, or a key=value connection string). Does not connect (see
    /// [`PostgresLogStore::ensure_schema`]); fails only on a malformed URL.
    pub fn connect(url: &str) -> Result<PostgresLogStore, StoreError> {
        PostgresLogStore::connect_with_table(url, DEFAULT_LOG_TABLE)
    }

    /// As [`PostgresLogStore::connect`], on `table` (and `<table>_counts`, `<table>_rollups`,
    /// `<table>_schema`):
    /// lowercase ASCII letters, digits and `_`, not starting with a digit, at most 40 bytes.
    pub fn connect_with_table(url: &str, table: &str) -> Result<PostgresLogStore, StoreError> {
        let valid = !table.is_empty()
            && table.len() <= MAX_TABLE_LEN
            && table.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !table.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(invalid(format!("log table name {table:?}")));
        }
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| invalid(format!("PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("aigate");
        }
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("postgres log store pool: {e}")))?;
        Ok(PostgresLogStore {
            inner: Arc::new(Shared {
                pool,
                table: table.to_owned(),
                q: Queries::new(table),
                schema_ready: tokio::sync::OnceCell::new(),
                retention: Retentions::default(),
            }),
            clock: Clock::system(),
        })
    }

    /// The same store on `clock` instead of the system clock.
    pub fn with_clock(self, clock: Clock) -> PostgresLogStore {
        PostgresLogStore { clock, ..self }
    }

    /// The table holding the records.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Creates the schema when the table has none, converts version-2 tables, or checks that it is
    /// the current one (safe when replicas run it at once). Runs at most once per store once it
    /// succeeds; every operation calls it first. A table of another schema version is refused with
    /// [`StoreError::Unavailable`], whose message names the tables and what to do.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.inner.schema_ready.get_or_try_init(|| timed(self.ensure_schema_now())).await.map(|_| ())
    }

    async fn ensure_schema_now(&self) -> Result<(), StoreError> {
        let t = &self.inner.table;
        let mut client = self.inner.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&format!("aigate-log-schema:{t}"))])
            .await
            .map_err(pg_err)?;
        tx.batch_execute(&format!(
            r#"CREATE TABLE IF NOT EXISTS "{t}_schema" (
                   one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
                   version INTEGER NOT NULL
               )"#
        ))
        .await
        .map_err(pg_err)?;
        let version: Option<i32> = tx
            .query_opt(&format!(r#"SELECT version FROM "{t}_schema""#), &[])
            .await
            .map_err(pg_err)?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg_err)?;
        match version {
            Some(SCHEMA_VERSION) => return Ok(()),
            Some(MIGRATED_VERSION) => {
                tx.batch_execute(&migrate_sql(t)).await.map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)?;
                tracing::info!(table = %t, from = MIGRATED_VERSION, to = SCHEMA_VERSION, "postgres log store: schema converted");
                return Ok(());
            }
            Some(v) => {
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL table {t} has log schema {v}; this aigate reads schema {MIGRATED_VERSION} or \
                     {SCHEMA_VERSION} only (the table comes from a development build): drop the tables {t}, \
                     {t}_counts, {t}_rollups and {t}_schema (or configure another table), and aigate creates new \
                     ones"
                )));
            }
            None => {}
        }
        tx.batch_execute(&create_schema_sql(t)).await.map_err(pg_err)?;
        tx.execute(&format!(r#"INSERT INTO "{t}_schema" (one, version) VALUES (true, $1)"#), &[&SCHEMA_VERSION])
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        tracing::info!(table = %t, version = SCHEMA_VERSION, "postgres log store: schema created");
        Ok(())
    }

    /// A pooled connection, after the schema is in place.
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.ensure_schema().await?;
        self.inner.pool.get().await.map_err(pool_err)
    }

    async fn insert_now(&self, gateway: &str, records: &[LogRecord]) -> Result<u64, StoreError> {
        let retention = self.inner.retention.get(gateway);
        let q = &self.inner.q;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let mut n = lock_count(&tx, q, gateway).await?;
        let cap = match retention {
            Some(r) if r.at_cap == AtCap::StopInserting => {
                // Make room from expired rows before refusing any.
                if let Some(age) = r.max_age_ms.filter(|_| n.saturating_add(records.len() as u64) > r.max_records) {
                    let (cutoff, limit) = (to_i64(self.clock.now_ms().saturating_sub(age)), to_i64(DELETE_CHUNK_ROWS));
                    let d = tx.execute(&q.delete_older, &[&gateway, &cutoff, &limit]).await.map_err(pg_err)?;
                    n = n.saturating_sub(d);
                }
                Some(r.max_records)
            }
            _ => None,
        };
        let insert = tx.prepare_cached(&q.insert).await.map_err(pg_err)?;
        let mut inserted = 0u64;
        // What the rollups count: every record but duplicate ids.
        let mut counted: Vec<&LogRecord> = Vec::with_capacity(records.len());
        let mut rest = records;
        while !rest.is_empty() {
            let mut take = chunk_len(rest);
            if let Some(cap) = cap {
                let room = usize::try_from(cap.saturating_sub(n)).unwrap_or(usize::MAX);
                if room == 0 {
                    break;
                }
                take = take.min(room);
            }
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let cols = Columns::new(chunk);
            let rows = tx.query(&insert, &cols.params(&gateway)).await.map_err(pg_err)?;
            let mut new_ids =
                rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<HashSet<_>, _>>().map_err(pg_err)?;
            // Within a statement the first of equal ids is inserted, the others skipped.
            counted.extend(chunk.iter().filter(|r| new_ids.remove(&r.id)));
            let added = rows.len() as u64;
            n += added;
            inserted += added;
        }
        if !rest.is_empty() {
            // Dropped at the cap: still traffic, unless a duplicate id.
            let ids: Vec<&str> = rest.iter().map(|r| r.id.as_str()).collect();
            let rows = tx.query(&q.existing_ids, &[&gateway, &ids]).await.map_err(pg_err)?;
            let mut seen =
                rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<HashSet<_>, _>>().map_err(pg_err)?;
            counted.extend(rest.iter().filter(|r| seen.insert(r.id.clone())));
        }
        upsert_rollups(&tx, q, gateway, &aggregate(counted)).await?;
        if let Some(r) = retention.filter(|r| r.at_cap == AtCap::DeleteOldest && n > r.max_records) {
            let k = to_i64((n - r.max_records).min(DELETE_CHUNK_ROWS.max(records.len() as u64)));
            n = n.saturating_sub(tx.execute(&q.delete_oldest, &[&gateway, &k]).await.map_err(pg_err)?);
        }
        tx.execute(&q.set_count, &[&gateway, &to_i64(n)]).await.map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(inserted)
    }

    async fn add_to_rollups_now(&self, gateway: &str, records: &[LogRecord]) -> Result<(), StoreError> {
        let rows = aggregate(records);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        upsert_rollups(&tx, &self.inner.q, gateway, &rows).await?;
        tx.commit().await.map_err(pg_err)
    }

    async fn analytics_now(&self, gateway: &str, q: &AnalyticsQuery) -> Result<Analytics, StoreError> {
        let p = plan(q)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.inner.q.select_rollups).await.map_err(pg_err)?;
        let (grain, from, to) = (to_i64(p.grain_ms), to_i64(p.from_bucket_ms), to_i64(p.to_bucket_ms));
        let rows = client.query(&stmt, &[&gateway, &grain, &p.dims, &from, &to]).await.map_err(pg_err)?;
        let rows = rows.iter().map(decode_rollup).collect::<Result<Vec<_>, _>>()?;
        Ok(assemble(q, rows))
    }

    /// Deletes the gateway's expired rollup rows, [`DELETE_CHUNK_ROWS`] per statement.
    async fn prune_rollups(&self, gateway: &str) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let minute_cutoff = to_i64(now.saturating_sub(MINUTE_ROLLUP_RETENTION_MS));
        let hour_cutoff = to_i64(now.saturating_sub(HOUR_ROLLUP_RETENTION_MS));
        let (minute, hour, limit) = (to_i64(MINUTE_MS), to_i64(HOUR_MS), to_i64(DELETE_CHUNK_ROWS));
        loop {
            let client = self.client().await?;
            let stmt = client.prepare_cached(&self.inner.q.prune_rollups).await.map_err(pg_err)?;
            let d = client
                .execute(&stmt, &[&gateway, &minute, &minute_cutoff, &hour, &hour_cutoff, &limit])
                .await
                .map_err(pg_err)?;
            if d < DELETE_CHUNK_ROWS {
                return Ok(());
            }
        }
    }

    async fn list_now(&self, gateway: &str, filter: &LogFilter) -> Result<LogPage, StoreError> {
        let mut w = filter_sql(Dialect::Postgres, gateway, filter, true)?;
        let limit = filter.effective_limit() as usize;
        let lim = w.param(SqlValue::Int(limit as i64 + 1));
        let sql = format!(
            r#"SELECT {LIST_COLUMNS} FROM "{}" WHERE {} ORDER BY created_at_ms DESC, id DESC LIMIT {lim}"#,
            self.inner.table, w.sql
        );
        let client = self.client().await?;
        let rows = client.query(&sql, &pg_params(&w.params)).await.map_err(pg_err)?;
        let mut records = rows.iter().map(|r| decode(r, false)).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|r| encode_cursor(r.created_at_ms, &r.id))
        } else {
            None
        };
        Ok(LogPage { records, next_cursor })
    }

    async fn get_now(&self, gateway: &str, id: &str) -> Result<Option<LogRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.inner.q.get).await.map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&gateway, &id]).await.map_err(pg_err)?;
        row.map(|r| decode(&r, true)).transpose()
    }

    /// Deletes one chunk of the rows `sql` (a chunked `DELETE`) selects; returns how many.
    async fn delete_chunk(&self, gateway: &str, sql: &str, values: &[SqlValue]) -> Result<u64, StoreError> {
        let q = &self.inner.q;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let n = lock_count(&tx, q, gateway).await?;
        let d = tx.execute(sql, &pg_params(values)).await.map_err(pg_err)?;
        tx.execute(&q.set_count, &[&gateway, &to_i64(n.saturating_sub(d))]).await.map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(d)
    }

    async fn patch_now(
        &self,
        gateway: &str,
        id: &str,
        feedback: Option<i8>,
        score: Option<f64>,
    ) -> Result<bool, StoreError> {
        check_patch(feedback, score)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.inner.q.patch).await.map_err(pg_err)?;
        let feedback = feedback.map(i16::from);
        let n = client.execute(&stmt, &[&gateway, &id, &feedback, &score]).await.map_err(pg_err)?;
        Ok(n > 0)
    }

    async fn count_now(&self, gateway: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.inner.q.get_count).await.map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&gateway]).await.map_err(pg_err)?;
        Ok(row.map(|r| r.try_get::<_, i64>(0)).transpose().map_err(pg_err)?.map_or(0, to_u64))
    }

    /// One step of [`LogStore::enforce_retention`]: removes at most [`DELETE_CHUNK_ROWS`] rows,
    /// those created before `cutoff_ms` first, then (DeleteOldest only) the oldest beyond the cap.
    async fn retention_step(&self, gateway: &str, r: Retention, cutoff_ms: Option<u64>) -> Result<u64, StoreError> {
        let q = &self.inner.q;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let n = lock_count(&tx, q, gateway).await?;
        let mut removed = 0;
        if let Some(cutoff) = cutoff_ms {
            let (cutoff, limit) = (to_i64(cutoff), to_i64(DELETE_CHUNK_ROWS));
            removed += tx.execute(&q.delete_older, &[&gateway, &cutoff, &limit]).await.map_err(pg_err)?;
        }
        let left = n.saturating_sub(removed);
        if r.at_cap == AtCap::DeleteOldest && left > r.max_records && removed < DELETE_CHUNK_ROWS {
            let k = to_i64((left - r.max_records).min(DELETE_CHUNK_ROWS - removed));
            removed += tx.execute(&q.delete_oldest, &[&gateway, &k]).await.map_err(pg_err)?;
        }
        tx.execute(&q.set_count, &[&gateway, &to_i64(n.saturating_sub(removed))]).await.map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(removed)
    }
}

/// Runs `f` within [`OP_TIMEOUT`].
async fn timed<T>(f: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(OP_TIMEOUT, f).await.unwrap_or(Err(StoreError::Timeout))
}

/// Locks the gateway's count row for the transaction; returns the count.
async fn lock_count(tx: &deadpool_postgres::Transaction<'_>, q: &Queries, gateway: &str) -> Result<u64, StoreError> {
    let stmt = tx.prepare_cached(&q.lock_count).await.map_err(pg_err)?;
    let n: i64 = tx.query_one(&stmt, &[&gateway]).await.map_err(pg_err)?.try_get(0).map_err(pg_err)?;
    Ok(to_u64(n))
}

/// Adds aggregated rollups to the gateway's rows: one statement, rows in key order (so concurrent
/// writers lock them in one order and cannot deadlock on them).
async fn upsert_rollups(
    tx: &deadpool_postgres::Transaction<'_>,
    q: &Queries,
    gateway: &str,
    rows: &[(RollupKey, Rollup)],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let grain: Vec<i64> = rows.iter().map(|(k, _)| to_i64(k.grain_ms)).collect();
    let dim: Vec<&str> = rows.iter().map(|(k, _)| k.dim.as_str()).collect();
    let bucket: Vec<i64> = rows.iter().map(|(k, _)| to_i64(k.bucket_ms)).collect();
    let value: Vec<&str> = rows.iter().map(|(k, _)| k.value.as_str()).collect();
    let ints: Vec<Vec<i64>> =
        (0..INT_COLUMNS.len()).map(|i| rows.iter().map(|(_, r)| to_i64(r.ints()[i])).collect()).collect();
    let floats: Vec<Vec<f64>> =
        (0..FLOAT_COLUMNS.len()).map(|i| rows.iter().map(|(_, r)| r.floats()[i]).collect()).collect();
    let hist: Vec<String> = rows.iter().map(|(_, r)| r.hist.to_json()).collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&gateway, &grain, &dim, &bucket, &value];
    params.extend(ints.iter().map(|v| v as &(dyn ToSql + Sync)));
    params.extend(floats.iter().map(|v| v as &(dyn ToSql + Sync)));
    params.push(&hist);
    let stmt = tx.prepare_cached(&q.upsert_rollups).await.map_err(pg_err)?;
    tx.execute(&stmt, &params).await.map_err(pg_err)?;
    Ok(())
}

/// Decodes a rollup row: `bucket_ms, dim, dim_value`, the counters, the sums, `hist` as text.
fn decode_rollup(row: &Row) -> Result<RollupRow, StoreError> {
    let bad = |e: tokio_postgres::Error| StoreError::Corrupt(format!("rollup row: {e}"));
    let mut ints = [0u64; 9];
    for (i, v) in ints.iter_mut().enumerate() {
        *v = to_u64(row.try_get(3 + i).map_err(bad)?);
    }
    let mut floats = [0f64; 4];
    for (i, v) in floats.iter_mut().enumerate() {
        *v = row.try_get(12 + i).map_err(bad)?;
    }
    let hist: &str = row.try_get(16).map_err(bad)?;
    Ok(RollupRow {
        bucket_ms: to_u64(row.try_get(0).map_err(bad)?),
        dim: row.try_get(1).map_err(bad)?,
        value: row.try_get(2).map_err(bad)?,
        rollup: Rollup::from_columns(ints, floats, Histogram::from_json(hist)?),
    })
}

/// How many of `records` go in the next insert statement.
fn chunk_len(records: &[LogRecord]) -> usize {
    let mut bytes = 0usize;
    for (i, r) in records.iter().enumerate().take(INSERT_CHUNK_ROWS) {
        bytes += r.request_body.as_ref().map_or(0, Bytes::len) + r.response_body.as_ref().map_or(0, Bytes::len);
        if bytes > INSERT_CHUNK_BYTES && i > 0 {
            return i;
        }
    }
    records.len().min(INSERT_CHUNK_ROWS)
}

/// The parameters of a generated clause.
fn pg_params(values: &[SqlValue]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|v| -> &(dyn ToSql + Sync) {
            match v {
                SqlValue::Int(v) => v,
                SqlValue::Real(v) => v,
                SqlValue::Text(v) => v,
                SqlValue::Bool(v) => v,
                SqlValue::Json(v) => v,
            }
        })
        .collect()
}

/// Metadata in its stored form: an array of `{"k", "v"}` objects, `None` when empty.
fn metadata_json(m: &[(String, MetaValue)]) -> Option<serde_json::Value> {
    let items: Vec<serde_json::Value> =
        stored_metadata(m).map(|(k, v)| serde_json::json!({ "k": k, "v": v.to_json() })).collect();
    (!items.is_empty()).then_some(serde_json::Value::Array(items))
}

/// Parses [`metadata_json`]'s output.
fn metadata_from_json(v: &serde_json::Value) -> Result<Vec<(String, MetaValue)>, StoreError> {
    let bad = || StoreError::Corrupt("log metadata: expected an array of {k, v} objects".into());
    let items = v.as_array().ok_or_else(bad)?;
    items
        .iter()
        .map(|item| {
            let k = item.get("k").and_then(serde_json::Value::as_str).ok_or_else(bad)?;
            let v = item.get("v").and_then(MetaValue::from_json).ok_or_else(bad)?;
            Ok((k.to_owned(), v))
        })
        .collect()
}

/// A count as an `INTEGER` column holds it (saturating).
fn saturating_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// One chunk of records as column arrays (for `UNNEST`).
struct Columns<'a> {
    id: Vec<&'a str>,
    event_id: Vec<Option<&'a str>>,
    created_at_ms: Vec<i64>,
    provider: Vec<&'a str>,
    path: Vec<&'a str>,
    requested_model: Vec<Option<&'a str>>,
    served_model: Vec<Option<&'a str>>,
    status: Vec<i32>,
    success: Vec<bool>,
    cache_status: Vec<&'a str>,
    stream: Vec<bool>,
    duration_ms: Vec<f64>,
    ttfb_ms: Vec<Option<f64>>,
    upstream_ms: Vec<Option<f64>>,
    overhead_ms: Vec<Option<f64>>,
    tokens_in: Vec<Option<i64>>,
    tokens_out: Vec<Option<i64>>,
    cached_tokens_in: Vec<Option<i64>>,
    reasoning_tokens: Vec<Option<i64>>,
    cost_usd: Vec<Option<f64>>,
    saved_usd: Vec<Option<f64>>,
    custom_cost: Vec<bool>,
    metadata: Vec<Option<serde_json::Value>>,
    user_agent: Vec<Option<&'a str>>,
    error: Vec<Option<&'a str>>,
    feedback: Vec<Option<i16>>,
    score: Vec<Option<f64>>,
    request_body: Vec<Option<&'a [u8]>>,
    response_body: Vec<Option<&'a [u8]>>,
    attempts: Vec<i32>,
    step: Vec<Option<i32>>,
    route: Vec<Option<&'a str>>,
    breaker: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn new(records: &'a [LogRecord]) -> Columns<'a> {
        let col = |f: &dyn Fn(&'a LogRecord) -> Option<&'a str>| records.iter().map(f).collect::<Vec<_>>();
        let f64s = |f: &dyn Fn(&LogRecord) -> Option<f64>| records.iter().map(|r| finite(f(r))).collect::<Vec<_>>();
        let ints = |f: &dyn Fn(&LogRecord) -> Option<u64>| records.iter().map(|r| f(r).map(to_i64)).collect::<Vec<_>>();
        Columns {
            id: records.iter().map(|r| r.id.as_str()).collect(),
            event_id: col(&|r| r.event_id.as_deref()),
            created_at_ms: records.iter().map(|r| to_i64(r.created_at_ms)).collect(),
            provider: records.iter().map(|r| r.provider.as_str()).collect(),
            path: records.iter().map(|r| r.path.as_str()).collect(),
            requested_model: col(&|r| r.requested_model.as_deref()),
            served_model: col(&|r| r.served_model.as_deref()),
            status: records.iter().map(|r| i32::from(r.status)).collect(),
            success: records.iter().map(|r| r.success).collect(),
            cache_status: records.iter().map(|r| r.cache_status.as_str()).collect(),
            stream: records.iter().map(|r| r.stream).collect(),
            duration_ms: records.iter().map(|r| if r.duration_ms.is_finite() { r.duration_ms } else { 0.0 }).collect(),
            ttfb_ms: f64s(&|r| r.ttfb_ms),
            upstream_ms: f64s(&|r| r.upstream_ms),
            overhead_ms: f64s(&|r| r.overhead_ms),
            tokens_in: ints(&|r| r.tokens_in),
            tokens_out: ints(&|r| r.tokens_out),
            cached_tokens_in: ints(&|r| r.cached_tokens_in),
            reasoning_tokens: ints(&|r| r.reasoning_tokens),
            cost_usd: f64s(&|r| r.cost_usd),
            saved_usd: f64s(&|r| r.saved_usd),
            custom_cost: records.iter().map(|r| r.custom_cost).collect(),
            metadata: records.iter().map(|r| metadata_json(&r.metadata)).collect(),
            user_agent: col(&|r| r.user_agent.as_deref()),
            error: col(&|r| r.error.as_deref()),
            feedback: records.iter().map(|r| r.feedback.map(i16::from)).collect(),
            score: f64s(&|r| r.score),
            request_body: records.iter().map(|r| r.request_body.as_deref()).collect(),
            response_body: records.iter().map(|r| r.response_body.as_deref()).collect(),
            attempts: records.iter().map(|r| saturating_i32(r.attempts)).collect(),
            step: records.iter().map(|r| r.step.map(saturating_i32)).collect(),
            route: col(&|r| r.route.as_deref()),
            breaker: col(&|r| r.breaker.as_deref()),
        }
    }

    /// The insert statement's parameters, `$1` = gateway.
    fn params<'s>(&'s self, gateway: &'s &str) -> [&'s (dyn ToSql + Sync); 34] {
        [
            gateway,
            &self.id,
            &self.event_id,
            &self.created_at_ms,
            &self.provider,
            &self.path,
            &self.requested_model,
            &self.served_model,
            &self.status,
            &self.success,
            &self.cache_status,
            &self.stream,
            &self.duration_ms,
            &self.ttfb_ms,
            &self.upstream_ms,
            &self.overhead_ms,
            &self.tokens_in,
            &self.tokens_out,
            &self.cached_tokens_in,
            &self.reasoning_tokens,
            &self.cost_usd,
            &self.saved_usd,
            &self.custom_cost,
            &self.metadata,
            &self.user_agent,
            &self.error,
            &self.feedback,
            &self.score,
            &self.request_body,
            &self.response_body,
            &self.attempts,
            &self.step,
            &self.route,
            &self.breaker,
        ]
    }
}

/// Decodes a row of [`LIST_COLUMNS`] (followed by the bodies when `bodies`).
fn decode(row: &Row, bodies: bool) -> Result<LogRecord, StoreError> {
    decode_inner(row, bodies).map_err(|e| match e {
        Decode::Pg(e) => StoreError::Corrupt(format!("log row: {e}")),
        Decode::Store(e) => e,
    })
}

enum Decode {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Decode {
    fn from(e: tokio_postgres::Error) -> Self {
        Decode::Pg(e)
    }
}

fn decode_inner(row: &Row, bodies: bool) -> Result<LogRecord, Decode> {
    let opt_u64 =
        |i: usize| -> Result<Option<u64>, tokio_postgres::Error> { Ok(row.try_get::<_, Option<i64>>(i)?.map(to_u64)) };
    let metadata = match row.try_get::<_, Option<serde_json::Value>>(23)? {
        Some(v) => metadata_from_json(&v).map_err(Decode::Store)?,
        None => Vec::new(),
    };
    let (request_body, response_body) = if bodies {
        (
            row.try_get::<_, Option<Vec<u8>>>(32)?.map(Bytes::from),
            row.try_get::<_, Option<Vec<u8>>>(33)?.map(Bytes::from),
        )
    } else {
        (None, None)
    };
    Ok(LogRecord {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        created_at_ms: to_u64(row.try_get(2)?),
        gateway: row.try_get(3)?,
        provider: row.try_get(4)?,
        path: row.try_get(5)?,
        requested_model: row.try_get(6)?,
        served_model: row.try_get(7)?,
        status: u16::try_from(row.try_get::<_, i32>(8)?).unwrap_or(0),
        success: row.try_get(9)?,
        cache_status: row.try_get(10)?,
        stream: row.try_get(11)?,
        duration_ms: row.try_get(12)?,
        ttfb_ms: row.try_get(13)?,
        upstream_ms: row.try_get(14)?,
        overhead_ms: row.try_get(15)?,
        tokens_in: opt_u64(16)?,
        tokens_out: opt_u64(17)?,
        cached_tokens_in: opt_u64(18)?,
        reasoning_tokens: opt_u64(19)?,
        cost_usd: row.try_get(20)?,
        saved_usd: row.try_get(21)?,
        custom_cost: row.try_get(22)?,
        metadata,
        user_agent: row.try_get(24)?,
        error: row.try_get(25)?,
        request_body,
        response_body,
        feedback: row.try_get::<_, Option<i16>>(26)?.and_then(|f| i8::try_from(f).ok()),
        score: row.try_get(27)?,
        attempts: u32::try_from(row.try_get::<_, i32>(28)?).unwrap_or(0),
        step: row.try_get::<_, Option<i32>>(29)?.and_then(|s| u32::try_from(s).ok()),
        route: row.try_get(30)?,
        breaker: row.try_get(31)?,
    })
}

#[async_trait::async_trait]
impl LogStore for PostgresLogStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn insert_batch(&self, gateway: &str, records: &[LogRecord]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        timed(self.insert_now(gateway, records)).await
    }

    async fn add_to_rollups(&self, gateway: &str, records: &[LogRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        timed(self.add_to_rollups_now(gateway, records)).await
    }

    async fn analytics(&self, gateway: &str, q: &AnalyticsQuery) -> Result<Analytics, StoreError> {
        timed(self.analytics_now(gateway, q)).await
    }

    async fn list(&self, gateway: &str, filter: &LogFilter) -> Result<LogPage, StoreError> {
        timed(self.list_now(gateway, filter)).await
    }

    async fn get(&self, gateway: &str, id: &str) -> Result<Option<LogRecord>, StoreError> {
        timed(self.get_now(gateway, id)).await
    }

    async fn delete(&self, gateway: &str, filter: &LogFilter) -> Result<u64, StoreError> {
        let w = filter_sql(Dialect::Postgres, gateway, filter, false)?;
        // $1 of the generated clause is the gateway.
        let t = &self.inner.table;
        let sql = format!(
            r#"DELETE FROM "{t}" WHERE gateway = $1::text AND id IN
               (SELECT id FROM "{t}" WHERE {} LIMIT {DELETE_CHUNK_ROWS})"#,
            w.sql
        );
        let mut total = 0;
        loop {
            let d = timed(self.delete_chunk(gateway, &sql, &w.params)).await?;
            total += d;
            if d < DELETE_CHUNK_ROWS {
                return Ok(total);
            }
        }
    }

    async fn patch(
        &self,
        gateway: &str,
        id: &str,
        feedback: Option<i8>,
        score: Option<f64>,
    ) -> Result<bool, StoreError> {
        timed(self.patch_now(gateway, id, feedback, score)).await
    }

    async fn count(&self, gateway: &str) -> Result<u64, StoreError> {
        timed(self.count_now(gateway)).await
    }

    fn set_retention(&self, gateway: &str, retention: Retention) {
        self.inner.retention.set(gateway, retention);
    }

    fn retention(&self, gateway: &str) -> Option<Retention> {
        self.inner.retention.get(gateway)
    }

    async fn enforce_retention(&self, gateway: &str) -> Result<u64, StoreError> {
        timed(self.prune_rollups(gateway)).await?;
        let Some(r) = self.inner.retention.get(gateway) else { return Ok(0) };
        let cutoff = r.max_age_ms.map(|age| self.clock.now_ms().saturating_sub(age));
        let mut total = 0;
        loop {
            let d = timed(self.retention_step(gateway, r, cutoff)).await?;
            total += d;
            if d < DELETE_CHUNK_ROWS {
                return Ok(total);
            }
        }
    }
}
