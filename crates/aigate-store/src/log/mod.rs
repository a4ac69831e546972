//! The request-log store (the audit trail): one trait, [`LogStore`], the record it holds
//! ([`LogRecord`]), the query it answers ([`LogFilter`] → [`LogPage`]) and the per-gateway
//! retention policy it enforces ([`Retention`]).
//!
//! Every operation is scoped to one gateway: rows of other gateways are never read, counted,
//! changed or deleted. Records are listed newest first, ordered by `(created_at_ms, id)` descending,
//! so pagination with the opaque cursor of [`LogPage::next_cursor`] is stable when many records share
//! a timestamp (no duplicates, no gaps, even while new records arrive).
//!
//! Bounds: a page holds at most [`MAX_LIST_LIMIT`] records ([`DEFAULT_LIST_LIMIT`] unless asked),
//! a record keeps at most [`MAX_METADATA`] metadata entries (extra entries are dropped on insert),
//! and a gateway holds at most [`Retention::max_records`] rows once a retention is set with
//! [`LogStore::set_retention`]; rows older than [`Retention::max_age_ms`] are removed by
//! [`LogStore::enforce_retention`], which the caller runs periodically. Deletions run in
//! transactions of at most [`DELETE_CHUNK_ROWS`] rows, so a large purge never holds other writers up
//! for long; for the same reason an insert trims at most `max(batch, DELETE_CHUNK_ROWS)` rows (a
//! larger excess, after the cap was lowered, is trimmed by [`LogStore::enforce_retention`]).
//!
//! Failure behaviour: errors come back as [`StoreError`], never as panics. Invalid input (a
//! malformed cursor, a feedback other than -1/+1, a non-finite score) is rejected as
//! [`StoreError::InvalidInput`] with a message starting `invalid`; API layers check it first with
//! [`LogFilter::validate`] to answer 400. Non-finite floats inside a record are stored as unknown
//! (`None`; a non-finite `duration_ms` as 0), because neither backend can hold them faithfully.
//! An insert is atomic; a delete or retention run that fails part-way keeps the chunks it already
//! committed (the row counts stay exact).
//!
//! Analytics: the same stores keep traffic rollups in the transaction of every insert and answer
//! [`LogStore::analytics`] from them (see [`crate::log::analytics`]).
//!
//! Implementations: [`crate::SqliteLogStore`] (embedded, default) and [`crate::PostgresLogStore`]
//! (shared by replicas); both pass `tests/log_conformance.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Analytics, AnalyticsQuery, StoreError};

pub mod analytics;
mod bodies;
pub mod postgres;
pub mod sqlite;

/// Metadata entries kept per record; extra entries are dropped on insert.
pub const MAX_METADATA: usize = 5;

/// Records per page when [`LogFilter::limit`] is `None`.
pub const DEFAULT_LIST_LIMIT: u32 = 50;

/// Largest page [`LogStore::list`] returns, whatever [`LogFilter::limit`] asks.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// Most rows one transaction of [`LogStore::delete`] or [`LogStore::enforce_retention`] removes;
/// larger deletions run as several transactions, so other writers are never held up for long.
pub const DELETE_CHUNK_ROWS: u64 = 10_000;

/// A metadata value: what `cf-aig-metadata`-style headers carry.
///
/// Serialised untagged: a JSON string, number or boolean; a whole number is written as an integer
/// (`7`, not `7.0`), as the client sent it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MetaValue {
    /// A string.
    String(String),
    /// A number (finite; non-finite numbers are dropped on insert).
    Number(f64),
    /// A boolean.
    Bool(bool),
}

/// Largest magnitude below which every integer is exact in an `f64` (2^53).
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// `n` as an integer when it is a whole number an `f64` holds exactly.
fn as_integer(n: f64) -> Option<i64> {
    (n.fract() == 0.0 && n.abs() < MAX_EXACT_INTEGER).then_some(n as i64)
}

impl Serialize for MetaValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MetaValue::String(v) => s.serialize_str(v),
            MetaValue::Number(n) => match as_integer(*n) {
                Some(i) => s.serialize_i64(i),
                None => s.serialize_f64(*n),
            },
            MetaValue::Bool(b) => s.serialize_bool(*b),
        }
    }
}

impl MetaValue {
    /// The value as JSON (a whole number as an integer).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            MetaValue::String(s) => serde_json::Value::String(s.clone()),
            MetaValue::Number(n) => match as_integer(*n) {
                Some(i) => i.into(),
                None => serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, Into::into),
            },
            MetaValue::Bool(b) => serde_json::Value::Bool(*b),
        }
    }

    /// A JSON scalar as a value (`None` for null, arrays and objects).
    pub fn from_json(v: &serde_json::Value) -> Option<MetaValue> {
        match v {
            serde_json::Value::String(s) => Some(MetaValue::String(s.clone())),
            serde_json::Value::Number(n) => n.as_f64().map(MetaValue::Number),
            serde_json::Value::Bool(b) => Some(MetaValue::Bool(*b)),
            _ => None,
        }
    }

    fn is_storable(&self) -> bool {
        !matches!(self, MetaValue::Number(n) if !n.is_finite())
    }
}

/// One request through a gateway, as the audit trail keeps it.
///
/// JSON form (serde): field names as below; `metadata` is a JSON object whose key order is the
/// entry order; `request_body` / `response_body` are standard base64 strings and are omitted when
/// `None` (as they are in [`LogPage`] records).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The log id (a UUIDv7 string); unique within a gateway.
    pub id: String,
    /// The caller's event id (`cf-aig-event-id`-style), if any.
    pub event_id: Option<String>,
    /// When the request arrived, Unix ms.
    pub created_at_ms: u64,
    /// The gateway it went through (stores overwrite it with the gateway the batch is inserted into).
    pub gateway: String,
    /// The upstream provider.
    pub provider: String,
    /// The endpoint path.
    pub path: String,
    /// The model the client asked for.
    pub requested_model: Option<String>,
    /// The model the provider says answered.
    pub served_model: Option<String>,
    /// HTTP status returned to the client.
    pub status: u16,
    /// Whether the request succeeded.
    pub success: bool,
    /// Cache outcome: `HIT`, `MISS`, `BYPASS`, `OFF` or `SHADOW-HIT`.
    pub cache_status: String,
    /// Whether the response was streamed.
    pub stream: bool,
    /// Total time, ms.
    pub duration_ms: f64,
    /// Time to the first response byte, ms.
    pub ttfb_ms: Option<f64>,
    /// Time spent waiting on the provider, ms.
    pub upstream_ms: Option<f64>,
    /// Time spent in the gateway itself, ms.
    pub overhead_ms: Option<f64>,
    /// Input tokens.
    pub tokens_in: Option<u64>,
    /// Output tokens.
    pub tokens_out: Option<u64>,
    /// Input tokens served from the provider's prompt cache.
    pub cached_tokens_in: Option<u64>,
    /// Reasoning tokens.
    pub reasoning_tokens: Option<u64>,
    /// Cost in USD; `None` when unknown (never 0 for unknown).
    pub cost_usd: Option<f64>,
    /// USD saved by a cache hit.
    pub saved_usd: Option<f64>,
    /// Whether the cost was set by the caller rather than computed.
    pub custom_cost: bool,
    /// Caller metadata, at most [`MAX_METADATA`] entries, in order.
    #[serde(default, with = "meta_map")]
    pub metadata: Vec<(String, MetaValue)>,
    /// The client's `user-agent`.
    pub user_agent: Option<String>,
    /// Error message, for failed requests.
    pub error: Option<String>,
    /// Request body as received (absent when not logged, and in list results).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "body_b64")]
    pub request_body: Option<Bytes>,
    /// Response body as returned (absent when not logged, and in list results).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "body_b64")]
    pub response_body: Option<Bytes>,
    /// Human feedback: -1 or +1.
    pub feedback: Option<i8>,
    /// Evaluation score.
    pub score: Option<f64>,
    /// Times the request was sent upstream, over every fallback step: 1 normally, more after
    /// retries, 0 when nothing was sent (a cache hit, a request refused before the upstream).
    #[serde(default)]
    pub attempts: u32,
    /// The 0-based fallback step that answered (Cloudflare's `step`); `None` without steps.
    #[serde(default)]
    pub step: Option<u32>,
    /// The dynamic route that served the request, as `NAME@VERSION` (`support@3`).
    #[serde(default)]
    pub route: Option<String>,
    /// A short circuit-breaker note on the upstream (`half-open` when this request was the probe,
    /// `open: openai` when a step was skipped for its open breaker).
    #[serde(default)]
    pub breaker: Option<String>,
}

/// Serde for `metadata`: a JSON object that keeps the entry order.
mod meta_map {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    use super::MetaValue;

    pub fn serialize<S: Serializer>(v: &[(String, MetaValue)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (k, val) in v {
            m.serialize_entry(k, val)?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, MetaValue)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, MetaValue)>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of string, number or boolean values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, MetaValue>()? {
                    out.push(entry);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Serde for the bodies: standard base64 strings.
mod body_b64 {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else { return Ok(None) };
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(|v| Some(Bytes::from(v)))
            .map_err(serde::de::Error::custom)
    }
}

/// Which records a [`LogStore::list`] or [`LogStore::delete`] selects. `Default` selects every
/// record of the gateway. All conditions must hold; an unknown (`None`) field of a record never
/// matches a condition on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogFilter {
    /// Only records created at or after this Unix ms.
    pub from_ms: Option<u64>,
    /// Only records created before this Unix ms (exclusive).
    pub to_ms: Option<u64>,
    /// Only this HTTP status.
    pub status: Option<u16>,
    /// Only successful (`true`) or failed (`false`) requests.
    pub success: Option<bool>,
    /// Only cache hits (`cache_status == "HIT"`, `true`) or everything else (`false`).
    pub cached: Option<bool>,
    /// Only this provider.
    pub provider: Option<String>,
    /// Only records whose served or requested model is this one.
    pub model: Option<String>,
    /// Only records that cost at least this many USD.
    pub min_cost_usd: Option<f64>,
    /// Only records that cost at most this many USD.
    pub max_cost_usd: Option<f64>,
    /// Only records with at least this many tokens (in + out; an unknown side counts 0, a record
    /// with both unknown never matches).
    pub min_tokens: Option<u64>,
    /// Only records with at most this many tokens (in + out, as for `min_tokens`).
    pub max_tokens: Option<u64>,
    /// Only records that took at least this many ms.
    pub min_duration_ms: Option<f64>,
    /// Only records that took at most this many ms.
    pub max_duration_ms: Option<f64>,
    /// Only records whose metadata has this key with exactly this value (same type; numbers compare
    /// numerically).
    pub metadata: Option<(String, MetaValue)>,
    /// Only records with this event id.
    pub event_id: Option<String>,
    /// Only records served by this dynamic route: `NAME` matches every version (`NAME@…`),
    /// `NAME@VERSION` that version only.
    pub route: Option<String>,
    /// Only records answered by this fallback step.
    pub step: Option<u32>,
    /// Page size for [`LogStore::list`]: [`DEFAULT_LIST_LIMIT`] when `None`, clamped to
    /// `1..=`[`MAX_LIST_LIMIT`]. Ignored by [`LogStore::delete`].
    pub limit: Option<u32>,
    /// Continue after the page that returned this [`LogPage::next_cursor`]. Ignored by
    /// [`LogStore::delete`].
    pub cursor: Option<String>,
}

impl LogFilter {
    /// The page size [`LogStore::list`] uses for this filter.
    pub fn effective_limit(&self) -> u32 {
        self.limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT)
    }

    /// Checks what a store would reject: a malformed cursor, a NaN bound, a non-finite metadata
    /// number. `Err` carries a message for the client.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.cursor {
            decode_cursor(c)?;
        }
        for (name, v) in [
            ("min_cost_usd", self.min_cost_usd),
            ("max_cost_usd", self.max_cost_usd),
            ("min_duration_ms", self.min_duration_ms),
            ("max_duration_ms", self.max_duration_ms),
        ] {
            if v.is_some_and(f64::is_nan) {
                return Err(format!("{name} is not a number"));
            }
        }
        if let Some((_, v)) = &self.metadata {
            if !v.is_storable() {
                return Err("metadata filter value is not a finite number".into());
            }
        }
        Ok(())
    }
}

/// One page of [`LogStore::list`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogPage {
    /// Matching records, newest first, without bodies.
    pub records: Vec<LogRecord>,
    /// Cursor of the next page (set [`LogFilter::cursor`] to it), `None` on the last page.
    pub next_cursor: Option<String>,
}

/// What [`LogStore::insert_batch`] does once a gateway holds [`Retention::max_records`] rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum AtCap {
    /// Insert everything, then delete the oldest rows (by `created_at_ms`, then id) beyond the cap.
    #[default]
    DeleteOldest,
    /// Insert only up to the cap; the rest of the batch is dropped (the caller counts the drops
    /// from the returned count).
    StopInserting,
}

/// Per-gateway retention policy, kept in memory by the store ([`LogStore::set_retention`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Retention {
    /// Most rows kept for the gateway.
    pub max_records: u64,
    /// What happens at the cap.
    pub at_cap: AtCap,
    /// Rows older than this many ms are removed by [`LogStore::enforce_retention`] (and, with
    /// [`AtCap::StopInserting`], before a batch that would not fit).
    pub max_age_ms: Option<u64>,
}

impl Default for Retention {
    /// No limit: unbounded rows, [`AtCap::DeleteOldest`], no age limit.
    fn default() -> Self {
        Retention { max_records: u64::MAX, at_cap: AtCap::DeleteOldest, max_age_ms: None }
    }
}

/// A request-log backend: the audit trail of every gateway.
///
/// Implementations: [`crate::SqliteLogStore`] (a SQLite file under `data_dir`, the default) and
/// [`crate::PostgresLogStore`] (shared by replicas). Errors are returned, never panicked; a failing
/// store degrades logging, never the proxying.
#[async_trait::async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// Short name for logs and metrics (`sqlite`, `postgres`).
    fn kind(&self) -> &'static str;

    /// Inserts `records` under `gateway` (their `gateway` field is ignored) in one transaction,
    /// honouring the gateway's [`Retention`]; returns how many rows were inserted. A record whose
    /// id is already stored in the gateway with the same `created_at_ms` is skipped (so a retried
    /// or replayed batch is not duplicated; the gateway's ids are UUIDv7 holding that time,
    /// [`log_id_at`], so no two of its records share an id); with [`AtCap::StopInserting`] the
    /// batch is inserted in order only until the cap is reached.
    ///
    /// The same transaction adds to the analytics rollups ([`crate::log::analytics`]) every record that
    /// is not a duplicate id, including those dropped at the cap (analytics count traffic, not
    /// what is kept).
    async fn insert_batch(&self, gateway: &str, records: &[LogRecord]) -> Result<u64, StoreError>;

    /// [`LogStore::insert_batch`] for a batch the caller shares: a store that hands the batch to
    /// another thread (SQLite's blocking pool) takes the `Arc` instead of copying every record.
    async fn insert_shared(&self, gateway: &str, records: std::sync::Arc<Vec<LogRecord>>) -> Result<u64, StoreError> {
        self.insert_batch(gateway, &records).await
    }

    /// Adds `records` to the gateway's analytics rollups only, without storing them (requests whose
    /// record is not kept: logging disabled for the gateway or refused by the client). Ids are not
    /// checked for duplicates. Atomic.
    async fn add_to_rollups(&self, gateway: &str, records: &[LogRecord]) -> Result<(), StoreError>;

    /// The gateway's traffic analytics over `q`'s range, from the rollups (see
    /// [`crate::log::analytics`]). Rejects, as [`StoreError::InvalidInput`], what
    /// [`AnalyticsQuery::validate`] rejects.
    async fn analytics(&self, gateway: &str, q: &AnalyticsQuery) -> Result<Analytics, StoreError>;

    /// One page of the gateway's records matching `filter`, newest first, without bodies.
    async fn list(&self, gateway: &str, filter: &LogFilter) -> Result<LogPage, StoreError>;

    /// One record with its bodies.
    async fn get(&self, gateway: &str, id: &str) -> Result<Option<LogRecord>, StoreError>;

    /// Deletes every record of the gateway matching `filter` (limit and cursor ignored; the default
    /// filter deletes them all), in transactions of at most [`DELETE_CHUNK_ROWS`] rows; returns how
    /// many were deleted.
    async fn delete(&self, gateway: &str, filter: &LogFilter) -> Result<u64, StoreError>;

    /// Sets the feedback (-1 or +1) and/or score of one record; a `None` leaves that field as it is.
    /// Returns whether the record exists.
    async fn patch(
        &self,
        gateway: &str,
        id: &str,
        feedback: Option<i8>,
        score: Option<f64>,
    ) -> Result<bool, StoreError>;

    /// Rows held for the gateway.
    async fn count(&self, gateway: &str) -> Result<u64, StoreError>;

    /// Sets the gateway's retention (in memory, per store; [`Retention::default`] means none).
    fn set_retention(&self, gateway: &str, retention: Retention);

    /// The gateway's retention, if one was set.
    fn retention(&self, gateway: &str) -> Option<Retention>;

    /// Applies the gateway's retention now: deletes rows older than `max_age_ms` and, with
    /// [`AtCap::DeleteOldest`], the oldest rows beyond `max_records`, in transactions of at most
    /// [`DELETE_CHUNK_ROWS`] rows. Returns how many were removed (0 without a retention).
    ///
    /// Also prunes the gateway's analytics rollups, with or without a retention: minute rows older
    /// than [`crate::MINUTE_ROLLUP_RETENTION_MS`] and hour rows older than
    /// [`crate::HOUR_ROLLUP_RETENTION_MS`]
    /// (not counted in the result). Otherwise rollups are never changed by deletions.
    async fn enforce_retention(&self, gateway: &str) -> Result<u64, StoreError>;
}

// ---------------------------------------------------------------------------------------------
// Shared by the implementations
// ---------------------------------------------------------------------------------------------

/// Retention policies by gateway.
#[derive(Debug, Default)]
pub(crate) struct Retentions(Mutex<HashMap<String, Retention>>);

impl Retentions {
    pub(crate) fn set(&self, gateway: &str, r: Retention) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if r == Retention::default() {
            m.remove(gateway);
        } else {
            m.insert(gateway.to_owned(), r);
        }
    }

    pub(crate) fn get(&self, gateway: &str) -> Option<Retention> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(gateway).copied()
    }
}

/// The id of a record created at `created_at_ms` (Unix ms): a UUIDv7 holding that time in its
/// timestamp field, a counter in its 12 `rand_a` bits (RFC 9562, 6.2, method 1: ids the process
/// makes within one millisecond differ there and sort in the order they were made) and 62 random
/// bits. The gateway makes every record's id this way, so a store can find a record by id through
/// its time, and [`crate::SqliteLogStore`] keys its rows by gateway, time and that counter
/// (no separate index of ids).
pub fn log_id_at(created_at_ms: u64) -> uuid::Uuid {
    static COUNTER: AtomicU16 = AtomicU16::new(0);
    let nanos = u32::try_from((created_at_ms % 1000) * 1_000_000).unwrap_or(0);
    let random = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, created_at_ms / 1000, nanos));
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed) & 0x0FFF;
    let mut bytes = *random.as_bytes();
    let [hi, lo] = counter.to_be_bytes();
    bytes[6] = 0x70 | hi;
    bytes[7] = lo;
    uuid::Uuid::from_bytes(bytes)
}

/// The `rand_a` field (12 bits) of `id` if it is a UUIDv7 in canonical form (hyphenated, lower
/// case) whose timestamp is `ms`: the counter [`log_id_at`] put there.
pub(crate) fn log_id_counter(id: &str, ms: u64) -> Option<u16> {
    if id.len() != 36 || id.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let u = uuid::Uuid::try_parse(id).ok()?;
    let b = u.as_bytes();
    let ts = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    (u.get_version_num() == 7 && ts == ms).then(|| u16::from_be_bytes([b[6] & 0x0F, b[7]]))
}

/// The timestamp of a UUIDv7 log id, Unix ms (see [`log_id_at`]); `None` for any other string.
pub(crate) fn log_id_time_ms(id: &str) -> Option<u64> {
    let u = uuid::Uuid::try_parse(id).ok()?;
    if u.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = u.get_timestamp()?.to_unix();
    Some(secs.saturating_mul(1000).saturating_add(u64::from(nanos / 1_000_000)))
}

/// The error for rejected input.
pub(crate) fn invalid(msg: impl std::fmt::Display) -> StoreError {
    StoreError::InvalidInput(format!("invalid {msg}"))
}

/// Checks a patch's arguments.
pub(crate) fn check_patch(feedback: Option<i8>, score: Option<f64>) -> Result<(), StoreError> {
    if feedback.is_some_and(|f| f != -1 && f != 1) {
        return Err(invalid("feedback: must be -1 or +1"));
    }
    if score.is_some_and(|s| !s.is_finite()) {
        return Err(invalid("score: must be a finite number"));
    }
    Ok(())
}

/// Encodes a list position: the `(created_at_ms, id)` of the last row returned.
pub(crate) fn encode_cursor(created_at_ms: u64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at_ms}:{id}"))
}

/// Decodes [`encode_cursor`]'s output.
pub(crate) fn decode_cursor(cursor: &str) -> Result<(u64, String), String> {
    let bad = || format!("cursor {cursor:?}");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor.as_bytes()).map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let (ms, id) = s.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_owned()))
}

/// A Unix-ms or count as a database integer (saturating).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A database integer as a Unix-ms or count (negative → 0).
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A float as stored: non-finite → unknown.
pub(crate) fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|f| f.is_finite())
}

/// The metadata entries that are stored: the first [`MAX_METADATA`] storable ones.
pub(crate) fn stored_metadata(m: &[(String, MetaValue)]) -> impl Iterator<Item = &(String, MetaValue)> {
    m.iter().filter(|(_, v)| v.is_storable()).take(MAX_METADATA)
}

/// Metadata as a JSON object text (entry order kept), `None` when empty.
pub(crate) fn metadata_object_json(m: &[(String, MetaValue)]) -> Option<String> {
    if m.is_empty() {
        return None;
    }
    let mut out = String::from("{");
    let mut any = false;
    for (k, v) in stored_metadata(m) {
        if any {
            out.push(',');
        }
        any = true;
        out.push_str(&serde_json::Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&v.to_json().to_string());
    }
    out.push('}');
    any.then_some(out)
}

/// Parses [`metadata_object_json`]'s output.
pub(crate) fn metadata_from_object_json(s: &str) -> Result<Vec<(String, MetaValue)>, StoreError> {
    let mut de = serde_json::Deserializer::from_str(s);
    meta_map::deserialize(&mut de).map_err(|e| StoreError::Corrupt(format!("log metadata: {e}")))
}

/// Columns of a listed record (no bodies), in the order the decoders read them.
pub(crate) const LIST_COLUMNS: &str = "id, event_id, created_at_ms, gateway, provider, path, requested_model, \
     served_model, status, success, cache_status, stream, duration_ms, ttfb_ms, upstream_ms, overhead_ms, \
     tokens_in, tokens_out, cached_tokens_in, reasoning_tokens, cost_usd, saved_usd, custom_cost, metadata, \
     user_agent, error, feedback, score, attempts, step, route, breaker";

/// A bound SQL parameter of a generated `WHERE` clause.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SqlValue {
    Int(i64),
    Real(f64),
    Text(String),
    Bool(bool),
    /// JSON (PostgreSQL only: `jsonb`).
    Json(serde_json::Value),
}

/// The SQL flavour of a generated clause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A generated `WHERE` clause (without the keyword) and its parameters, numbered from 1.
#[derive(Clone, Debug, Default)]
pub(crate) struct SqlWhere {
    pub(crate) sql: String,
    pub(crate) params: Vec<SqlValue>,
    dialect: Option<Dialect>,
}

impl SqlWhere {
    /// Adds a parameter; returns its placeholder (typed for PostgreSQL so the server infers it).
    pub(crate) fn param(&mut self, v: SqlValue) -> String {
        let ty = match &v {
            SqlValue::Int(_) => "int8",
            SqlValue::Real(_) => "float8",
            SqlValue::Text(_) => "text",
            SqlValue::Bool(_) => "bool",
            SqlValue::Json(_) => "jsonb",
        };
        self.params.push(v);
        let n = self.params.len();
        match self.dialect {
            Some(Dialect::Postgres) => format!("${n}::{ty}"),
            _ => format!("?{n}"),
        }
    }

    pub(crate) fn and(&mut self, cond: &str) {
        if !self.sql.is_empty() {
            self.sql.push_str(" AND ");
        }
        self.sql.push_str(cond);
    }
}

/// Builds the condition selecting `gateway`'s rows that match `f` (and, when `with_cursor`, come
/// after its cursor). Values are always parameters, never spliced into the text.
pub(crate) fn filter_sql(
    dialect: Dialect,
    gateway: &str,
    f: &LogFilter,
    with_cursor: bool,
) -> Result<SqlWhere, StoreError> {
    f.validate().map_err(invalid)?;
    let mut w = SqlWhere { dialect: Some(dialect), ..SqlWhere::default() };
    let p = w.param(SqlValue::Text(gateway.to_owned()));
    w.and(&format!("gateway = {p}"));
    if let Some(v) = f.from_ms {
        let p = w.param(SqlValue::Int(to_i64(v)));
        w.and(&format!("created_at_ms >= {p}"));
    }
    if let Some(v) = f.to_ms {
        let p = w.param(SqlValue::Int(to_i64(v)));
        w.and(&format!("created_at_ms < {p}"));
    }
    if let Some(v) = f.status {
        let p = w.param(SqlValue::Int(i64::from(v)));
        w.and(&format!("status = {p}"));
    }
    if let Some(v) = f.success {
        let p = w.param(SqlValue::Bool(v));
        w.and(&format!("success = {p}"));
    }
    if let Some(v) = f.cached {
        let p = w.param(SqlValue::Text("HIT".into()));
        w.and(&format!("cache_status {} {p}", if v { "=" } else { "<>" }));
    }
    if let Some(v) = &f.provider {
        let p = w.param(SqlValue::Text(v.clone()));
        w.and(&format!("provider = {p}"));
    }
    if let Some(v) = &f.model {
        let p = w.param(SqlValue::Text(v.clone()));
        let q = w.param(SqlValue::Text(v.clone()));
        w.and(&format!("(served_model = {p} OR requested_model = {q})"));
    }
    if let Some(v) = f.min_cost_usd {
        let p = w.param(SqlValue::Real(v));
        w.and(&format!("cost_usd >= {p}"));
    }
    if let Some(v) = f.max_cost_usd {
        let p = w.param(SqlValue::Real(v));
        w.and(&format!("cost_usd <= {p}"));
    }
    if f.min_tokens.is_some() || f.max_tokens.is_some() {
        w.and("(tokens_in IS NOT NULL OR tokens_out IS NOT NULL)");
        // numeric in PostgreSQL: two saturated BIGINTs must not overflow.
        let total = match dialect {
            Dialect::Sqlite => "(COALESCE(tokens_in, 0) + COALESCE(tokens_out, 0))",
            Dialect::Postgres => "(COALESCE(tokens_in, 0)::numeric + COALESCE(tokens_out, 0))",
        };
        if let Some(v) = f.min_tokens {
            let p = w.param(SqlValue::Int(to_i64(v)));
            w.and(&format!("{total} >= {p}"));
        }
        if let Some(v) = f.max_tokens {
            let p = w.param(SqlValue::Int(to_i64(v)));
            w.and(&format!("{total} <= {p}"));
        }
    }
    if let Some(v) = f.min_duration_ms {
        let p = w.param(SqlValue::Real(v));
        w.and(&format!("duration_ms >= {p}"));
    }
    if let Some(v) = f.max_duration_ms {
        let p = w.param(SqlValue::Real(v));
        w.and(&format!("duration_ms <= {p}"));
    }
    if let Some((key, value)) = &f.metadata {
        match dialect {
            Dialect::Sqlite => {
                // json_each over the stored object: key, JSON type and SQL value must all match.
                let k = w.param(SqlValue::Text(key.clone()));
                let cond = match value {
                    MetaValue::String(s) => {
                        let v = w.param(SqlValue::Text(s.clone()));
                        format!("type = 'text' AND value = {v}")
                    }
                    MetaValue::Number(n) => {
                        let v = w.param(SqlValue::Real(*n));
                        format!("type IN ('integer', 'real') AND value = {v}")
                    }
                    MetaValue::Bool(b) => format!("type = '{b}'"),
                };
                w.and(&format!("EXISTS (SELECT 1 FROM json_each(metadata) WHERE key = {k} AND {cond})"));
            }
            Dialect::Postgres => {
                // The stored form is an array of {"k", "v"} objects: containment is an exact match.
                let doc = serde_json::json!([{ "k": key, "v": value.to_json() }]);
                let p = w.param(SqlValue::Json(doc));
                w.and(&format!("metadata @> {p}"));
            }
        }
    }
    if let Some(v) = &f.event_id {
        let p = w.param(SqlValue::Text(v.clone()));
        w.and(&format!("event_id = {p}"));
    }
    if let Some(v) = &f.route {
        // The name itself, or any version of it: a prefix match, case-sensitive in both (SQLite's
        // LIKE is not, so it uses GLOB), the name's wildcard characters escaped.
        let p = w.param(SqlValue::Text(v.clone()));
        let cond = match dialect {
            Dialect::Sqlite => {
                let q = w.param(SqlValue::Text(format!("{}@*", glob_escape(v))));
                format!("(route = {p} OR route GLOB {q})")
            }
            Dialect::Postgres => {
                let q = w.param(SqlValue::Text(format!("{}@%", like_escape(v))));
                format!("(route = {p} OR route LIKE {q})")
            }
        };
        w.and(&cond);
    }
    if let Some(v) = f.step {
        let p = w.param(SqlValue::Int(i64::from(v)));
        w.and(&format!("step = {p}"));
    }
    if with_cursor {
        if let Some(c) = &f.cursor {
            let (ms, id) = decode_cursor(c).map_err(invalid)?;
            let p = w.param(SqlValue::Int(to_i64(ms)));
            let q = w.param(SqlValue::Text(id));
            w.and(&format!("(created_at_ms, id) < ({p}, {q})"));
        }
    }
    Ok(w)
}

/// `s` matched literally by SQLite's `GLOB` (`*`, `?` and `[` in brackets).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

/// `s` matched literally by PostgreSQL's `LIKE` (its default escape character is `\`).
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_id_holds_its_time() {
        for ms in [0, 1, 999, 1_700_000_000_123, 1_764_000_000_000 + 86_399_999] {
            let id = log_id_at(ms).to_string();
            assert_eq!(log_id_time_ms(&id), Some(ms), "{id}");
            assert_eq!(id.as_bytes()[14], b'7', "{id}");
        }
        assert_ne!(log_id_at(5), log_id_at(5), "74 random bits");
        // Ids made in the same millisecond differ in their rand_a counter, which orders them.
        let ids: Vec<String> = (0..3).map(|_| log_id_at(7).to_string()).collect();
        let counters: Vec<u16> = ids.iter().map(|id| log_id_counter(id, 7).unwrap()).collect();
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(counters[i] < counters[j], ids[i] < ids[j], "{ids:?}");
                assert_eq!(counters[i] == counters[j], i == j, "{ids:?}");
            }
        }
        assert_eq!(log_id_counter(&ids[0], 8), None, "another millisecond");
        assert_eq!(log_id_counter(&ids[0].to_uppercase(), 7), None, "not canonical");
        for other in ["", "b", "0190a0a0-0000-4000-8000-000000000001", "not-a-uuid-at-all-0000000000000000000"] {
            assert_eq!(log_id_time_ms(other), None, "{other}");
        }
    }

    fn record() -> LogRecord {
        LogRecord {
            id: "0190a0a0-0000-7000-8000-000000000001".into(),
            event_id: Some("ev".into()),
            created_at_ms: 1_700_000_000_000,
            gateway: "gw".into(),
            provider: "openai".into(),
            path: "/v1/chat/completions".into(),
            requested_model: Some("gpt-4o".into()),
            served_model: Some("gpt-4o-2024-08-06".into()),
            status: 200,
            success: true,
            cache_status: "MISS".into(),
            stream: true,
            duration_ms: 12.5,
            ttfb_ms: Some(3.0),
            upstream_ms: None,
            overhead_ms: Some(0.25),
            tokens_in: Some(10),
            tokens_out: Some(20),
            cached_tokens_in: None,
            reasoning_tokens: Some(0),
            cost_usd: Some(0.001),
            saved_usd: None,
            custom_cost: false,
            metadata: vec![
                ("z".into(), MetaValue::String("last-first".into())),
                ("a".into(), MetaValue::Number(1.5)),
                ("b".into(), MetaValue::Bool(true)),
            ],
            user_agent: Some("curl/8".into()),
            error: None,
            request_body: Some(Bytes::from_static(b"{\"x\":1}\x00\xff")),
            response_body: None,
            feedback: Some(-1),
            score: Some(0.5),
            attempts: 3,
            step: Some(1),
            route: Some("support@3".into()),
            breaker: Some("half-open".into()),
        }
    }

    #[test]
    fn json_roundtrip_keeps_metadata_order_and_bodies() {
        let r = record();
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""metadata":{"z":"last-first","a":1.5,"b":true}"#), "{s}");
        assert!(s.contains(r#""request_body":"eyJ4IjoxfQD/""#), "{s}");
        assert!(!s.contains("response_body"), "{s}");
        let back: LogRecord = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }

    /// Spill files and clients written before `attempts`, `step`, `route` and `breaker` existed.
    #[test]
    fn json_without_the_routing_fields_reads_as_nothing_sent() {
        let s = serde_json::to_string(&record()).unwrap();
        let tail = r#","attempts":3,"step":1,"route":"support@3","breaker":"half-open"}"#;
        let old = format!("{}}}", s.strip_suffix(tail).unwrap());
        let back: LogRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(back, LogRecord { attempts: 0, step: None, route: None, breaker: None, ..record() });
    }

    #[test]
    fn route_filter_matches_the_name_literally() {
        assert_eq!(glob_escape("a*b?[c]"), "a[*]b[?][[]c]");
        assert_eq!(like_escape(r"a%b_c\d"), r"a\%b\_c\\d");
        let f = LogFilter { route: Some("sup_port".into()), step: Some(2), ..LogFilter::default() };
        let w = filter_sql(Dialect::Postgres, "gw", &f, true).unwrap();
        assert_eq!(w.sql, "gateway = $1::text AND (route = $2::text OR route LIKE $3::text) AND step = $4::int8");
        assert_eq!(w.params[2], SqlValue::Text(r"sup\_port@%".into()));
        let w = filter_sql(Dialect::Sqlite, "gw", &f, true).unwrap();
        assert_eq!(w.sql, "gateway = ?1 AND (route = ?2 OR route GLOB ?3) AND step = ?4");
        assert_eq!(w.params[2], SqlValue::Text("sup_port@*".into()));
    }

    #[test]
    fn metadata_object_json_roundtrip_and_bounds() {
        let mut m = record().metadata;
        let s = metadata_object_json(&m).unwrap();
        assert_eq!(metadata_from_object_json(&s).unwrap(), m);
        assert_eq!(metadata_object_json(&[]), None);
        m.push(("nan".into(), MetaValue::Number(f64::NAN)));
        for i in 0..5 {
            m.push((format!("k{i}"), MetaValue::Number(f64::from(i))));
        }
        let kept = metadata_from_object_json(&metadata_object_json(&m).unwrap()).unwrap();
        assert_eq!(kept.len(), MAX_METADATA);
        assert_eq!(kept[3], ("k0".to_owned(), MetaValue::Number(0.0)));
    }

    #[test]
    fn cursor_roundtrip_and_rejects_garbage() {
        let c = encode_cursor(42, "a:b");
        assert_eq!(decode_cursor(&c).unwrap(), (42, "a:b".to_owned()));
        assert!(decode_cursor("!!").is_err());
        assert!(decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x:y")).is_err());
        let f = LogFilter { cursor: Some("nope".into()), ..LogFilter::default() };
        assert!(f.validate().is_err());
        assert!(matches!(filter_sql(Dialect::Sqlite, "gw", &f, true), Err(StoreError::InvalidInput(_))));
    }

    #[test]
    fn limit_is_clamped() {
        let f = |limit| LogFilter { limit, ..LogFilter::default() };
        assert_eq!(f(None).effective_limit(), DEFAULT_LIST_LIMIT);
        assert_eq!(f(Some(0)).effective_limit(), 1);
        assert_eq!(f(Some(7)).effective_limit(), 7);
        assert_eq!(f(Some(50_000)).effective_limit(), MAX_LIST_LIMIT);
    }

    #[test]
    fn filter_sql_uses_placeholders_only() {
        let f = LogFilter {
            provider: Some("x' OR 1=1 --".into()),
            metadata: Some(("k'".into(), MetaValue::String("v'".into()))),
            cursor: Some(encode_cursor(1, "id'")),
            ..LogFilter::default()
        };
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let w = filter_sql(d, "gw'", &f, true).unwrap();
            assert!(!w.sql.contains("x'") && !w.sql.contains("gw'"), "{}", w.sql);
            assert!(!w.sql.contains("id'") && !w.sql.contains("k'") && !w.sql.contains("v'"), "{}", w.sql);
        }
        let w = filter_sql(Dialect::Postgres, "gw", &LogFilter { status: Some(200), ..LogFilter::default() }, true)
            .unwrap();
        assert_eq!(w.sql, "gateway = $1::text AND status = $2::int8");
        assert_eq!(w.params, vec![SqlValue::Text("gw".into()), SqlValue::Int(200)]);
    }
}
