//! Traffic analytics of a gateway, answered from rollups that the log stores keep as records are
//! written, never by scanning records: [`LogStore::analytics`](crate::LogStore::analytics) takes an
//! [`AnalyticsQuery`] and returns [`Analytics`] (totals, per-group totals and time buckets).
//!
//! Rollups: every record given to [`LogStore::insert_batch`](crate::LogStore::insert_batch) (except
//! duplicate ids) or to [`LogStore::add_to_rollups`](crate::LogStore::add_to_rollups) is added, in
//! the same transaction, to one rollup row per grain (minute and hour buckets, UTC, aligned on the
//! Unix epoch) and per dimension: overall (`dim = ""`), `model` (served model, else requested
//! model, else `""`), `provider`, and `metadata.<key>` for each stored metadata entry (value as a
//! string: strings as they are, numbers and booleans via `Display`). A batch is first aggregated
//! here ([`aggregate`]), so a write costs a few upserted rows per batch, not per record. Day buckets
//! are summed from hour rows at query time. Rollups record traffic, not retention: deleting or
//! trimming records leaves them alone; [`LogStore::enforce_retention`](crate::LogStore::enforce_retention)
//! prunes minute rows older than [`MINUTE_ROLLUP_RETENTION_MS`] and hour rows older than
//! [`HOUR_ROLLUP_RETENTION_MS`].
//!
//! Latency percentiles come from a histogram of `duration_ms` with log-scale buckets growing by
//! [`HIST_GROWTH`] from [`HIST_MIN_MS`] to [`HIST_MAX_MS`] (plus an underflow and an overflow
//! bucket). A percentile is the nearest-rank sample's bucket, reported as the geometric middle of
//! the bucket, so within the range it is within `sqrt(1.15) - 1` ≈ 7.3 % of the exact nearest-rank
//! percentile (under 0.1 ms it reads 0.1 ms, from 10 minutes on 600000 ms). Histograms are merged
//! (never percentiles averaged), so totals and groups are as exact as one bucket. The histogram is
//! stored sparse, as a JSON object `{"<bucket index>": count}`, merged in SQL inside the upsert.
//!
//! Bounds: a query covers at most [`MAX_ANALYTICS_BUCKETS`] buckets; invalid queries are rejected
//! as [`StoreError::InvalidInput`] with a message starting `invalid` (check first with
//! [`AnalyticsQuery::validate`] to answer 400).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::log::{finite, invalid, stored_metadata};
use crate::{LogRecord, MetaValue, StoreError};

/// One minute, ms.
pub const MINUTE_MS: u64 = 60_000;

/// One hour, ms.
pub const HOUR_MS: u64 = 3_600_000;

/// One day, ms.
pub const DAY_MS: u64 = 86_400_000;

/// Minute-grain rollup rows older than this are pruned by
/// [`LogStore::enforce_retention`](crate::LogStore::enforce_retention): 8 days.
pub const MINUTE_ROLLUP_RETENTION_MS: u64 = 8 * DAY_MS;

/// Hour-grain rollup rows older than this are pruned by
/// [`LogStore::enforce_retention`](crate::LogStore::enforce_retention): 400 days.
pub const HOUR_ROLLUP_RETENTION_MS: u64 = 400 * DAY_MS;

/// Most buckets one analytics query may span.
pub const MAX_ANALYTICS_BUCKETS: u64 = 50_000;

/// Lower bound of the first log-scale latency bucket, ms (smaller durations go to the underflow
/// bucket).
pub const HIST_MIN_MS: f64 = 0.1;

/// Upper bound of the latency histogram, ms (10 minutes; longer durations go to the overflow
/// bucket).
pub const HIST_MAX_MS: f64 = 600_000.0;

/// Ratio of the bounds of one latency bucket.
pub const HIST_GROWTH: f64 = 1.15;

/// Log-scale buckets: `HIST_MIN_MS * HIST_GROWTH^HIST_LOG_BUCKETS >= HIST_MAX_MS`.
const HIST_LOG_BUCKETS: usize = 112;

/// Histogram length: underflow, the log-scale buckets, overflow.
const HIST_LEN: usize = HIST_LOG_BUCKETS + 2;

/// Integer counters of a rollup row, in the order [`Rollup::ints`] returns them.
pub(crate) const INT_COLUMNS: [&str; 9] = [
    "requests",
    "errors",
    "cache_hits",
    "shadow_hits",
    "tokens_in",
    "tokens_out",
    "cached_tokens_in",
    "reasoning_tokens",
    "cost_unknown",
];

/// Float sums of a rollup row, in the order [`Rollup::floats`] returns them.
pub(crate) const FLOAT_COLUMNS: [&str; 4] = ["cost_usd", "saved_usd", "shadow_saved_usd", "duration_sum_ms"];

// ---------------------------------------------------------------------------------------------
// Query types
// ---------------------------------------------------------------------------------------------

/// Width of the buckets of an analytics answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One minute (read from minute rollups, kept [`MINUTE_ROLLUP_RETENTION_MS`]).
    Minute,
    /// One hour (read from hour rollups).
    #[default]
    Hour,
    /// One UTC day (summed from hour rollups).
    Day,
}

impl Granularity {
    /// Bucket width, ms.
    pub fn width_ms(self) -> u64 {
        match self {
            Granularity::Minute => MINUTE_MS,
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }

    /// Grain of the rollup rows it reads, ms.
    pub(crate) fn source_grain_ms(self) -> u64 {
        match self {
            Granularity::Minute => MINUTE_MS,
            Granularity::Hour | Granularity::Day => HOUR_MS,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Granularity {
    type Err = String;

    /// `minute`, `hour` or `day` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "minute" => Ok(Granularity::Minute),
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            _ => Err(format!("unknown granularity {s:?}: expected \"minute\", \"hour\" or \"day\"")),
        }
    }
}

/// How an analytics answer is split into groups.
///
/// Text form (serde, [`FromStr`], [`fmt::Display`]): `none` (or empty), `model`, `provider`,
/// `metadata.<key>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GroupBy {
    /// No groups: overall buckets only.
    #[default]
    None,
    /// By model (served model, else requested model, else `""`).
    Model,
    /// By provider.
    Provider,
    /// By the value of this metadata key (records without it are in no group, only in the totals).
    Metadata(String),
}

impl GroupBy {
    /// The rollup dimension it reads (`None` for no grouping).
    pub(crate) fn dim(&self) -> Option<String> {
        match self {
            GroupBy::None => None,
            GroupBy::Model => Some("model".into()),
            GroupBy::Provider => Some("provider".into()),
            GroupBy::Metadata(k) => Some(format!("metadata.{k}")),
        }
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dim() {
            Some(d) => f.write_str(&d),
            None => f.write_str("none"),
        }
    }
}

impl FromStr for GroupBy {
    type Err = String;

    /// `""` or `none`, `model`, `provider`, `metadata.<key>` (a non-empty key, kept as written).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(key) = s.strip_prefix("metadata.") {
            if key.is_empty() {
                return Err("group by metadata: the key is empty".into());
            }
            return Ok(GroupBy::Metadata(key.to_owned()));
        }
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(GroupBy::None),
            "model" => Ok(GroupBy::Model),
            "provider" => Ok(GroupBy::Provider),
            _ => {
                Err(format!("unknown group by {s:?}: expected \"none\", \"model\", \"provider\" or \"metadata.<key>\""))
            }
        }
    }
}

impl TryFrom<String> for GroupBy {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<GroupBy> for String {
    fn from(g: GroupBy) -> String {
        g.to_string()
    }
}

/// What [`LogStore::analytics`](crate::LogStore::analytics) computes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyticsQuery {
    /// First bucket start included, Unix ms (buckets whose start is in `[from_ms, to_ms)`).
    pub from_ms: u64,
    /// End of the range (exclusive) on bucket starts, Unix ms.
    pub to_ms: u64,
    /// Bucket width.
    pub granularity: Granularity,
    /// Grouping.
    pub group_by: GroupBy,
}

impl AnalyticsQuery {
    /// Number of buckets the range spans (whether or not they hold traffic).
    pub fn bucket_count(&self) -> u64 {
        let (lo, hi) = self.bucket_range();
        (hi - lo) / self.granularity.width_ms()
    }

    /// Checks what a store would reject: `from_ms > to_ms`, more than [`MAX_ANALYTICS_BUCKETS`]
    /// buckets, an empty metadata key. `Err` carries a message for the client.
    pub fn validate(&self) -> Result<(), String> {
        if self.from_ms > self.to_ms {
            return Err(format!("range: from_ms {} is after to_ms {}", self.from_ms, self.to_ms));
        }
        if matches!(&self.group_by, GroupBy::Metadata(k) if k.is_empty()) {
            return Err("group by metadata: the key is empty".into());
        }
        let n = self.bucket_count();
        if n > MAX_ANALYTICS_BUCKETS {
            return Err(format!(
                "range: {n} {} buckets, more than {MAX_ANALYTICS_BUCKETS}; use a coarser granularity",
                self.granularity
            ));
        }
        Ok(())
    }

    /// The answer's bucket starts as a range `[lo, hi)` of multiples of the bucket width.
    fn bucket_range(&self) -> (u64, u64) {
        let w = self.granularity.width_ms();
        let up = |x: u64| x.div_ceil(w).saturating_mul(w);
        let (lo, hi) = (up(self.from_ms), up(self.to_ms));
        (lo, hi.max(lo))
    }
}

/// Aggregates of some traffic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AnalyticsStats {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Requests answered from the cache (`HIT`).
    pub cache_hits: u64,
    /// Requests the cache could have answered (`SHADOW-HIT`).
    pub shadow_hits: u64,
    /// `cache_hits / requests` (0 without requests).
    pub hit_rate: f64,
    /// `errors / requests` (0 without requests).
    pub error_rate: f64,
    /// Input tokens (known values).
    pub tokens_in: u64,
    /// Output tokens (known values).
    pub tokens_out: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cached_tokens_in: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Cost in USD (known costs).
    pub cost_usd: f64,
    /// Requests with an unknown cost (cache hits excluded).
    pub cost_unknown: u64,
    /// USD saved by cache hits.
    pub saved_usd: f64,
    /// USD the cache would have saved: the cost of the shadow hits.
    pub shadow_saved_usd: f64,
    /// Mean duration, ms (exact; `None` without requests).
    pub mean_ms: Option<f64>,
    /// Median duration, ms (estimated, see [`crate::log::analytics`]).
    pub p50_ms: Option<f64>,
    /// 95th percentile duration, ms (estimated).
    pub p95_ms: Option<f64>,
    /// 99th percentile duration, ms (estimated).
    pub p99_ms: Option<f64>,
}

/// One time bucket (of one group) of an analytics answer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AnalyticsBucket {
    /// Bucket start, Unix ms (UTC, a multiple of the bucket width).
    pub start_ms: u64,
    /// The group's value (`None` without grouping).
    pub group: Option<String>,
    /// The bucket's aggregates.
    #[serde(flatten)]
    pub stats: AnalyticsStats,
}

/// One group's totals over the whole range.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AnalyticsGroup {
    /// The group's value.
    pub group: Option<String>,
    /// The group's aggregates.
    #[serde(flatten)]
    pub stats: AnalyticsStats,
}

/// The answer of [`LogStore::analytics`](crate::LogStore::analytics).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Analytics {
    /// The query's `from_ms`.
    pub from_ms: u64,
    /// The query's `to_ms`.
    pub to_ms: u64,
    /// Bucket width.
    pub granularity: Granularity,
    /// The grouping in its text form (`model`, `provider`, `metadata.<key>`), `None` without.
    pub group_by: Option<String>,
    /// All traffic of the range (including records outside every group of a metadata grouping).
    pub totals: AnalyticsStats,
    /// Per-group totals over the range, most requests first (then by group); empty without
    /// grouping.
    pub groups: Vec<AnalyticsGroup>,
    /// Non-empty buckets, by start then group.
    pub buckets: Vec<AnalyticsBucket>,
}

// ---------------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------------

/// A latency histogram: counts per bucket (underflow, log-scale buckets, overflow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; HIST_LEN] }
    }
}

impl Histogram {
    /// The bucket of a duration (NaN and negatives go to the underflow bucket).
    fn index(ms: f64) -> usize {
        if ms.is_nan() || ms < HIST_MIN_MS {
            0
        } else if ms >= HIST_MAX_MS {
            HIST_LEN - 1
        } else {
            // In 0..HIST_LOG_BUCKETS: ms / MIN is in [1, 6e6).
            let i = ((ms / HIST_MIN_MS).ln() / HIST_GROWTH.ln()).floor();
            1 + (i.max(0.0) as usize).min(HIST_LOG_BUCKETS - 1)
        }
    }

    /// The value reported for a bucket: the geometric middle of its bounds.
    fn representative(i: usize) -> f64 {
        match i {
            0 => HIST_MIN_MS,
            i if i >= HIST_LEN - 1 => HIST_MAX_MS,
            i => HIST_MIN_MS * HIST_GROWTH.powf(i as f64 - 0.5),
        }
    }

    /// Counts one duration.
    pub(crate) fn record(&mut self, ms: f64) {
        self.counts[Self::index(ms)] += 1;
    }

    /// Adds `other`'s counts.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
    }

    /// Durations counted.
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// The nearest-rank `p`-quantile (`p` in (0, 1]): the bucket of the `ceil(p * n)`-th smallest
    /// duration, as its representative value. `None` when empty.
    pub(crate) fn percentile(&self, p: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = nearest_rank(p, n);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return Some(Self::representative(i));
            }
        }
        Some(Self::representative(HIST_LEN - 1))
    }

    /// The stored form: a JSON object of the non-zero buckets, `{"<index>": count}`.
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, c) in self.counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&format!("\"{i}\":{c}"));
        }
        out.push('}');
        out
    }

    /// Parses [`Histogram::to_json`]'s output, or the backends' merge of it (any JSON object of
    /// bucket index strings to non-negative integers, with any whitespace). Hand-rolled: a query
    /// parses one per row read.
    pub(crate) fn from_json(s: &str) -> Result<Histogram, StoreError> {
        let bad = || StoreError::Corrupt(format!("latency histogram: {s:?}"));
        let mut h = Histogram::default();
        let mut p = JsonCursor { b: s.as_bytes(), i: 0 };
        p.expect(b'{').ok_or_else(bad)?;
        if p.eat(b'}') {
            return p.end().then_some(h).ok_or_else(bad);
        }
        loop {
            p.expect(b'"').ok_or_else(bad)?;
            let i = p.number().ok_or_else(bad)?;
            p.expect(b'"').ok_or_else(bad)?;
            p.expect(b':').ok_or_else(bad)?;
            let c = p.number().ok_or_else(bad)?;
            let slot = usize::try_from(i).ok().and_then(|i| h.counts.get_mut(i)).ok_or_else(bad)?;
            *slot = slot.saturating_add(c);
            if p.eat(b'}') {
                return p.end().then_some(h).ok_or_else(bad);
            }
            p.expect(b',').ok_or_else(bad)?;
        }
    }
}

/// A position in a histogram's JSON text.
struct JsonCursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonCursor<'_> {
    fn skip_ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    /// Consumes `c` (after whitespace) if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        let hit = self.b.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    /// A run of ASCII digits as a number.
    fn number(&mut self) -> Option<u64> {
        self.skip_ws();
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        (self.i > start).then_some(n)
    }

    fn end(&mut self) -> bool {
        self.skip_ws();
        self.i == self.b.len()
    }
}

/// The 1-based rank of the nearest-rank `p`-quantile of `n` samples: `ceil(p * n)` in `1..=n`
/// (with a little slack so that, say, `0.95 * 20` is 19, not 20).
pub fn nearest_rank(p: f64, n: u64) -> u64 {
    let r = (p * n as f64 - 1e-9).ceil();
    (r.max(1.0) as u64).min(n)
}

// ---------------------------------------------------------------------------------------------
// Rollups
// ---------------------------------------------------------------------------------------------

/// The aggregates of one rollup row (or of a merge of rows).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Rollup {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) cache_hits: u64,
    pub(crate) shadow_hits: u64,
    pub(crate) tokens_in: u64,
    pub(crate) tokens_out: u64,
    pub(crate) cached_tokens_in: u64,
    pub(crate) reasoning_tokens: u64,
    pub(crate) cost_unknown: u64,
    pub(crate) cost_usd: f64,
    pub(crate) saved_usd: f64,
    pub(crate) shadow_saved_usd: f64,
    pub(crate) duration_sum_ms: f64,
    pub(crate) hist: Histogram,
}

impl Rollup {
    /// Counts one record (non-finite floats as unknown, a non-finite duration as 0, as stored).
    pub(crate) fn add(&mut self, r: &LogRecord) {
        let hit = r.cache_status == "HIT";
        let shadow = r.cache_status == "SHADOW-HIT";
        let cost = finite(r.cost_usd);
        let duration = if r.duration_ms.is_finite() { r.duration_ms } else { 0.0 };
        let add = |a: &mut u64, v: Option<u64>| *a = a.saturating_add(v.unwrap_or(0));
        self.requests += 1;
        self.errors += u64::from(!r.success);
        self.cache_hits += u64::from(hit);
        self.shadow_hits += u64::from(shadow);
        add(&mut self.tokens_in, r.tokens_in);
        add(&mut self.tokens_out, r.tokens_out);
        add(&mut self.cached_tokens_in, r.cached_tokens_in);
        add(&mut self.reasoning_tokens, r.reasoning_tokens);
        self.cost_unknown += u64::from(cost.is_none() && !hit);
        self.cost_usd += cost.unwrap_or(0.0);
        self.saved_usd += finite(r.saved_usd).unwrap_or(0.0);
        if shadow {
            self.shadow_saved_usd += cost.unwrap_or(0.0);
        }
        self.duration_sum_ms += duration;
        self.hist.record(duration);
    }

    /// Adds another rollup.
    pub(crate) fn merge(&mut self, o: &Rollup) {
        for (a, b) in self.ints_mut().into_iter().zip(o.ints()) {
            *a = a.saturating_add(b);
        }
        self.cost_usd += o.cost_usd;
        self.saved_usd += o.saved_usd;
        self.shadow_saved_usd += o.shadow_saved_usd;
        self.duration_sum_ms += o.duration_sum_ms;
        self.hist.merge(&o.hist);
    }

    /// The counters, in the order of [`INT_COLUMNS`].
    pub(crate) fn ints(&self) -> [u64; 9] {
        [
            self.requests,
            self.errors,
            self.cache_hits,
            self.shadow_hits,
            self.tokens_in,
            self.tokens_out,
            self.cached_tokens_in,
            self.reasoning_tokens,
            self.cost_unknown,
        ]
    }

    fn ints_mut(&mut self) -> [&mut u64; 9] {
        [
            &mut self.requests,
            &mut self.errors,
            &mut self.cache_hits,
            &mut self.shadow_hits,
            &mut self.tokens_in,
            &mut self.tokens_out,
            &mut self.cached_tokens_in,
            &mut self.reasoning_tokens,
            &mut self.cost_unknown,
        ]
    }

    /// The sums, in the order of [`FLOAT_COLUMNS`] (a NaN, from sums of opposite infinities, as 0:
    /// neither backend's `NOT NULL` column takes it).
    pub(crate) fn floats(&self) -> [f64; 4] {
        [self.cost_usd, self.saved_usd, self.shadow_saved_usd, self.duration_sum_ms].map(|v| {
            if v.is_nan() {
                0.0
            } else {
                v
            }
        })
    }

    /// A rollup from stored columns (in the orders of [`INT_COLUMNS`] and [`FLOAT_COLUMNS`]).
    pub(crate) fn from_columns(ints: [u64; 9], floats: [f64; 4], hist: Histogram) -> Rollup {
        let mut r = Rollup { hist, ..Rollup::default() };
        for (a, b) in r.ints_mut().into_iter().zip(ints) {
            *a = b;
        }
        [r.cost_usd, r.saved_usd, r.shadow_saved_usd, r.duration_sum_ms] = floats;
        r
    }

    /// The public aggregates.
    pub(crate) fn stats(&self) -> AnalyticsStats {
        let ratio = |a: u64| if self.requests == 0 { 0.0 } else { a as f64 / self.requests as f64 };
        AnalyticsStats {
            requests: self.requests,
            errors: self.errors,
            cache_hits: self.cache_hits,
            shadow_hits: self.shadow_hits,
            hit_rate: ratio(self.cache_hits),
            error_rate: ratio(self.errors),
            tokens_in: self.tokens_in,
            tokens_out: self.tokens_out,
            cached_tokens_in: self.cached_tokens_in,
            reasoning_tokens: self.reasoning_tokens,
            cost_usd: self.cost_usd,
            cost_unknown: self.cost_unknown,
            saved_usd: self.saved_usd,
            shadow_saved_usd: self.shadow_saved_usd,
            mean_ms: (self.requests > 0).then(|| self.duration_sum_ms / self.requests as f64),
            p50_ms: self.hist.percentile(0.50),
            p95_ms: self.hist.percentile(0.95),
            p99_ms: self.hist.percentile(0.99),
        }
    }
}

/// The key of a rollup row within a gateway; ordered as the primary key (the order in which a
/// batch upserts, so concurrent writers lock rows in one order).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RollupKey {
    pub(crate) grain_ms: u64,
    pub(crate) dim: String,
    pub(crate) bucket_ms: u64,
    pub(crate) value: String,
}

/// A metadata value as a group name (borrowed when it is a string).
fn meta_str(v: &MetaValue) -> Cow<'_, str> {
    match v {
        MetaValue::String(s) => Cow::Borrowed(s),
        MetaValue::Number(n) => Cow::Owned(n.to_string()),
        MetaValue::Bool(b) => Cow::Owned(b.to_string()),
    }
}

/// The dimension of a rollup row, borrowed from the records while a batch is aggregated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Dim<'a> {
    All,
    Model,
    Provider,
    Metadata(&'a str),
}

impl Dim<'_> {
    fn name(&self) -> String {
        match self {
            Dim::All => String::new(),
            Dim::Model => "model".into(),
            Dim::Provider => "provider".into(),
            Dim::Metadata(k) => format!("metadata.{k}"),
        }
    }
}

/// The rollup rows `records` add to: one per grain and dimension, sorted by key. Keys borrow from
/// the records while aggregating (this runs for every record written), and become owned only once
/// per row.
pub(crate) fn aggregate<'a>(records: impl IntoIterator<Item = &'a LogRecord>) -> Vec<(RollupKey, Rollup)> {
    type Key<'a> = (u64, u64, Dim<'a>, Cow<'a, str>);
    let mut index: HashMap<Key<'a>, usize> = HashMap::new();
    let mut rows: Vec<(Key<'a>, Rollup)> = Vec::new();
    let mut dims: Vec<(Dim<'a>, Cow<'a, str>)> = Vec::new();
    // The rows the previous record went to: the records of a batch mostly share theirs (same
    // minute, model, provider and metadata), and then no key is built or hashed.
    let mut last: Option<(&'a LogRecord, Vec<usize>)> = None;
    for r in records {
        if let Some((prev, targets)) = &last {
            if same_rollup_rows(prev, r) {
                for &i in targets {
                    rows[i].1.add(r);
                }
                continue;
            }
        }
        dims.clear();
        let model = r.served_model.as_deref().or(r.requested_model.as_deref()).unwrap_or("");
        dims.push((Dim::All, Cow::Borrowed("")));
        dims.push((Dim::Model, Cow::Borrowed(model)));
        dims.push((Dim::Provider, Cow::Borrowed(r.provider.as_str())));
        for (k, v) in stored_metadata(&r.metadata) {
            if !dims.iter().any(|(d, _)| *d == Dim::Metadata(k.as_str())) {
                dims.push((Dim::Metadata(k.as_str()), meta_str(v)));
            }
        }
        let mut targets = Vec::with_capacity(2 * dims.len());
        for grain_ms in [MINUTE_MS, HOUR_MS] {
            let bucket_ms = r.created_at_ms - r.created_at_ms % grain_ms;
            for (dim, value) in &dims {
                let key = (grain_ms, bucket_ms, dim.clone(), value.clone());
                let i = *index.entry(key).or_insert_with_key(|key| {
                    rows.push((key.clone(), Rollup::default()));
                    rows.len() - 1
                });
                rows[i].1.add(r);
                targets.push(i);
            }
        }
        last = Some((r, targets));
    }
    let mut out: Vec<(RollupKey, Rollup)> = rows
        .into_iter()
        .map(|((grain_ms, bucket_ms, dim, value), rollup)| {
            (RollupKey { grain_ms, dim: dim.name(), bucket_ms, value: value.into_owned() }, rollup)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether `a` and `b` add to the same rollup rows: the same minute (hence hour), model, provider
/// and metadata.
fn same_rollup_rows(a: &LogRecord, b: &LogRecord) -> bool {
    a.created_at_ms / MINUTE_MS == b.created_at_ms / MINUTE_MS
        && a.served_model.as_deref().or(a.requested_model.as_deref())
            == b.served_model.as_deref().or(b.requested_model.as_deref())
        && a.provider == b.provider
        && a.metadata == b.metadata
}

/// The rows an analytics query reads: grain, dimensions and bucket range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Grain of the rows read, ms.
    pub(crate) grain_ms: u64,
    /// `""` (totals) and the grouping's dimension, if any.
    pub(crate) dims: Vec<String>,
    /// Rows with `from_bucket_ms <= bucket_ms < to_bucket_ms`.
    pub(crate) from_bucket_ms: u64,
    /// See `from_bucket_ms`.
    pub(crate) to_bucket_ms: u64,
}

/// Checks `q` and plans its read.
pub(crate) fn plan(q: &AnalyticsQuery) -> Result<Plan, StoreError> {
    q.validate().map_err(invalid)?;
    let (lo, hi) = q.bucket_range();
    let mut dims = vec![String::new()];
    dims.extend(q.group_by.dim());
    Ok(Plan { grain_ms: q.granularity.source_grain_ms(), dims, from_bucket_ms: lo, to_bucket_ms: hi })
}

/// One stored rollup row, as read for a query.
#[derive(Clone, Debug)]
pub(crate) struct RollupRow {
    pub(crate) bucket_ms: u64,
    pub(crate) dim: String,
    pub(crate) value: String,
    pub(crate) rollup: Rollup,
}

/// Builds the answer of `q` from the rows its [`plan`] selected.
pub(crate) fn assemble(q: &AnalyticsQuery, rows: impl IntoIterator<Item = RollupRow>) -> Analytics {
    let width = q.granularity.width_ms();
    let group_dim = q.group_by.dim();
    let mut totals = Rollup::default();
    let mut groups: HashMap<String, Rollup> = HashMap::new();
    let mut buckets: BTreeMap<(u64, Option<String>), Rollup> = BTreeMap::new();
    for row in rows {
        let start = row.bucket_ms - row.bucket_ms % width;
        if row.dim.is_empty() {
            totals.merge(&row.rollup);
            if group_dim.is_none() {
                buckets.entry((start, None)).or_default().merge(&row.rollup);
            }
        } else if group_dim.as_deref() == Some(row.dim.as_str()) {
            groups.entry(row.value.clone()).or_default().merge(&row.rollup);
            buckets.entry((start, Some(row.value))).or_default().merge(&row.rollup);
        }
    }
    let mut groups: Vec<AnalyticsGroup> = groups
        .into_iter()
        .filter(|(_, r)| r.requests > 0)
        .map(|(g, r)| AnalyticsGroup { group: Some(g), stats: r.stats() })
        .collect();
    groups.sort_by(|a, b| b.stats.requests.cmp(&a.stats.requests).then_with(|| a.group.cmp(&b.group)));
    Analytics {
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        granularity: q.granularity,
        group_by: group_dim,
        totals: totals.stats(),
        groups,
        buckets: buckets
            .into_iter()
            .filter(|(_, r)| r.requests > 0)
            .map(|((start_ms, group), r)| AnalyticsBucket { start_ms, group, stats: r.stats() })
            .collect(),
    }
}

/// Name of the SQL function the SQLite store registers to merge two stored histograms.
pub(crate) const HIST_MERGE_FN: &str = "aigate_hist_merge";

/// Merges two histograms in their stored form ([`Histogram::to_json`]).
pub(crate) fn merge_hist_json(a: &str, b: &str) -> Result<String, StoreError> {
    let mut h = Histogram::from_json(a)?;
    h.merge(&Histogram::from_json(b)?);
    Ok(h.to_json())
}

/// SQL of the `DO UPDATE SET` list of the rollup upsert: counters add up (saturating at the
/// largest BIGINT), sums add up, histograms merge bucket by bucket. `t` names the stored row.
///
/// Why merge in SQL rather than read, merge in Rust and write back: the `ON CONFLICT DO UPDATE`
/// row lock makes each row's update atomic, so replicas writing the same PostgreSQL (or processes
/// sharing a SQLite file) never lose an increment, whatever other locks they hold. The histogram is
/// a sparse JSON object (a minute row typically has a handful of non-empty buckets out of 114), so
/// rows stay small; PostgreSQL merges it with its JSON functions, SQLite with [`merge_hist_json`]
/// registered on the store's connection (still inside the upsert).
pub(crate) fn upsert_set_sql(postgres: bool, t: &str) -> String {
    const MAX: &str = "9223372036854775807";
    let mut sets: Vec<String> = INT_COLUMNS
        .iter()
        .map(|c| format!("{c} = CASE WHEN {t}.{c} > {MAX} - excluded.{c} THEN {MAX} ELSE {t}.{c} + excluded.{c} END"))
        .collect();
    sets.extend(FLOAT_COLUMNS.iter().map(|c| format!("{c} = {t}.{c} + excluded.{c}")));
    sets.push(if postgres {
        format!(
            "hist = (SELECT COALESCE(jsonb_object_agg(k, n), '{{}}'::jsonb) FROM (SELECT k, SUM(v) AS n FROM \
             (SELECT key AS k, value::int8 AS v FROM jsonb_each_text({t}.hist) UNION ALL \
             SELECT key, value::int8 FROM jsonb_each_text(excluded.hist)) u GROUP BY k) s)"
        )
    } else {
        // A function of the SQLite store's connection (`merge_hist_json`): merging in SQL with
        // `json_each`, `GROUP BY` and `json_group_object` would build and group a table of every
        // bucket for each upserted row.
        format!("hist = {HIST_MERGE_FN}({t}.hist, excluded.hist)")
    });
    sets.join(", ")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn stored_histograms_merge_bucket_by_bucket() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        for ms in [0.5, 3.0, 3.1, 250.0] {
            a.record(ms);
        }
        for ms in [3.05, 1e9, f64::NAN] {
            b.record(ms);
        }
        let merged = merge_hist_json(&a.to_json(), &b.to_json()).unwrap();
        a.merge(&b);
        assert_eq!(merged, a.to_json());
        assert_eq!(merge_hist_json("{}", "{}").unwrap(), "{}");
        assert!(merge_hist_json("{\"1\":", "{}").is_err());
    }

    fn rec(id: &str, ms: u64, duration_ms: f64) -> LogRecord {
        LogRecord {
            id: id.into(),
            created_at_ms: ms,
            gateway: String::new(),
            provider: "openai".into(),
            path: "/".into(),
            requested_model: Some("alias".into()),
            status: 200,
            success: true,
            cache_status: "MISS".into(),
            duration_ms,
            tokens_in: Some(3),
            ..LogRecord::default()
        }
    }

    fn exact_percentile(values: &[f64], p: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        v[nearest_rank(p, v.len() as u64) as usize - 1]
    }

    #[test]
    fn histogram_covers_its_range() {
        assert!(HIST_MIN_MS * HIST_GROWTH.powi(HIST_LOG_BUCKETS as i32) >= HIST_MAX_MS);
        assert!(HIST_MIN_MS * HIST_GROWTH.powi(HIST_LOG_BUCKETS as i32 - 1) < HIST_MAX_MS);
        assert_eq!(Histogram::index(0.0), 0);
        assert_eq!(Histogram::index(f64::NAN), 0);
        assert_eq!(Histogram::index(0.1), 1);
        assert_eq!(Histogram::index(599_999.0), HIST_LOG_BUCKETS);
        assert_eq!(Histogram::index(600_000.0), HIST_LEN - 1);
        assert_eq!(Histogram::default().percentile(0.5), None);
    }

    #[test]
    fn histogram_json_roundtrip_is_sparse() {
        let mut h = Histogram::default();
        for ms in [0.0, 1.0, 1.0, 250.0, 1e9] {
            h.record(ms);
        }
        let s = h.to_json();
        assert_eq!(s.matches(':').count(), 4, "{s}");
        assert_eq!(Histogram::from_json(&s).unwrap(), h);
        assert_eq!(Histogram::from_json("{}").unwrap(), Histogram::default());
        // PostgreSQL's jsonb text form.
        assert_eq!(Histogram::from_json(" { \"0\": 1, \"12\" : 30 } ").unwrap().count(), 31);
        for bad in ["{\"999\":1}", "[1]", "", "{", "{\"1\":1,}", "{\"1\":-1}", "{\"a\":1}", "{} x", "{\"1\":1.5}"] {
            assert!(Histogram::from_json(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Within the histogram's range, every percentile (of the samples, and of a merge of two
        /// histograms) is within 10 % of the exact nearest-rank percentile.
        #[test]
        fn percentile_error_is_bounded(
            a in prop::collection::vec(0.1f64..600_000.0, 1..300),
            b in prop::collection::vec(0.1f64..600_000.0, 0..300),
            p in 0.01f64..1.0,
        ) {
            let (mut ha, mut hb) = (Histogram::default(), Histogram::default());
            a.iter().for_each(|v| ha.record(*v));
            b.iter().for_each(|v| hb.record(*v));
            ha.merge(&hb);
            let all: Vec<f64> = a.iter().chain(&b).copied().collect();
            let exact = exact_percentile(&all, p);
            let est = ha.percentile(p).unwrap();
            prop_assert!((est - exact).abs() <= 0.1 * exact, "p{p}: {est} vs {exact}");
        }
    }

    #[test]
    fn aggregate_of_runs_of_alike_records_matches_one_by_one() {
        // Consecutive records that share their rows take aggregate's shortcut; the result must be
        // what aggregating every record on its own and merging gives.
        let t = 10 * DAY_MS + 3 * HOUR_MS;
        let mut recs = Vec::new();
        for i in 0..40u64 {
            let mut r = rec(&format!("r{i}"), t + (i / 10) * MINUTE_MS + i, 1.0 + i as f64);
            if i % 7 == 3 {
                r.served_model = Some("other".into());
            }
            if i % 5 == 0 {
                r.metadata = vec![("team".into(), MetaValue::String(format!("t{}", i % 2)))];
            }
            r.cost_usd = Some(0.001 * i as f64);
            recs.push(r);
        }
        let together = aggregate(&recs);
        let mut one_by_one: Vec<(RollupKey, Rollup)> = Vec::new();
        for r in &recs {
            for (k, v) in aggregate([r]) {
                match one_by_one.iter_mut().find(|(k2, _)| *k2 == k) {
                    Some((_, acc)) => acc.merge(&v),
                    None => one_by_one.push((k, v)),
                }
            }
        }
        one_by_one.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(together.len(), one_by_one.len());
        for ((ka, a), (kb, b)) in together.iter().zip(&one_by_one) {
            assert_eq!(ka, kb);
            assert_eq!(a.ints(), b.ints(), "{ka:?}");
            assert!((a.cost_usd - b.cost_usd).abs() < 1e-12, "{ka:?}");
            assert_eq!(a.hist, b.hist, "{ka:?}");
        }
    }

    #[test]
    fn aggregate_splits_by_grain_and_dimension() {
        let t = 10 * DAY_MS + 5 * HOUR_MS + 7 * MINUTE_MS + 1234;
        let mut a = rec("a", t, 10.0);
        a.metadata = vec![
            ("user".into(), MetaValue::String("x".into())),
            ("n".into(), MetaValue::Number(7.0)),
            ("b".into(), MetaValue::Bool(true)),
            ("user".into(), MetaValue::String("dup".into())),
        ];
        a.cost_usd = Some(0.5);
        a.cache_status = "SHADOW-HIT".into();
        let mut b = rec("b", t + MINUTE_MS, 20.0);
        b.served_model = Some("served".into());
        b.success = false;
        b.cache_status = "HIT".into();
        b.saved_usd = Some(0.25);
        b.duration_ms = f64::NAN;
        let rows = aggregate([&a, &b]);
        let keys: Vec<(u64, &str, &str)> =
            rows.iter().map(|(k, _)| (k.grain_ms, k.dim.as_str(), k.value.as_str())).collect();
        // Minute: 2 buckets × (overall, model, provider) + a's 3 metadata keys; hour: one bucket.
        assert_eq!(rows.len(), 2 * 3 + 3 + (1 + 2 + 1 + 3), "{keys:?}");
        assert!(keys.contains(&(MINUTE_MS, "metadata.n", "7")));
        assert!(keys.contains(&(MINUTE_MS, "metadata.b", "true")));
        assert!(keys.contains(&(HOUR_MS, "model", "served")));
        assert!(keys.contains(&(HOUR_MS, "model", "alias")));
        assert!(!keys.iter().any(|k| k.2 == "dup"));
        let (k, overall) = rows.iter().find(|(k, _)| k.grain_ms == HOUR_MS && k.dim.is_empty()).unwrap();
        assert_eq!(k.bucket_ms, 10 * DAY_MS + 5 * HOUR_MS);
        assert_eq!(
            (overall.requests, overall.errors, overall.cache_hits, overall.shadow_hits, overall.cost_unknown),
            (2, 1, 1, 1, 0)
        );
        assert_eq!((overall.cost_usd, overall.saved_usd, overall.shadow_saved_usd), (0.5, 0.25, 0.5));
        assert_eq!((overall.tokens_in, overall.duration_sum_ms), (6, 10.0));
        // Sorted by key.
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn assemble_buckets_groups_and_totals() {
        let q =
            AnalyticsQuery { from_ms: 0, to_ms: 2 * DAY_MS, granularity: Granularity::Day, group_by: GroupBy::Model };
        let plan = plan(&q).unwrap();
        assert_eq!((plan.grain_ms, plan.dims.clone()), (HOUR_MS, vec![String::new(), "model".into()]));
        let row = |bucket_ms, dim: &str, value: &str, n: u64| {
            let mut r = Rollup::default();
            for _ in 0..n {
                r.add(&rec("x", bucket_ms, 5.0));
            }
            RollupRow { bucket_ms, dim: dim.into(), value: value.into(), rollup: r }
        };
        let rows = vec![
            row(HOUR_MS, "", "", 3),
            row(HOUR_MS, "model", "a", 1),
            row(HOUR_MS, "model", "b", 2),
            row(DAY_MS + 3 * HOUR_MS, "", "", 4),
            row(DAY_MS + 3 * HOUR_MS, "model", "a", 4),
            row(2 * HOUR_MS, "", "", 1),
            row(2 * HOUR_MS, "model", "a", 1),
        ];
        let a = assemble(&q, rows);
        assert_eq!(a.group_by.as_deref(), Some("model"));
        assert_eq!(a.totals.requests, 8);
        assert_eq!(a.totals.p50_ms, Some(Histogram::representative(Histogram::index(5.0))));
        let groups: Vec<(Option<&str>, u64)> =
            a.groups.iter().map(|g| (g.group.as_deref(), g.stats.requests)).collect();
        assert_eq!(groups, [(Some("a"), 6), (Some("b"), 2)]);
        let buckets: Vec<(u64, Option<&str>, u64)> =
            a.buckets.iter().map(|b| (b.start_ms, b.group.as_deref(), b.stats.requests)).collect();
        assert_eq!(buckets, [(0, Some("a"), 2), (0, Some("b"), 2), (DAY_MS, Some("a"), 4)]);
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.contains(r#""granularity":"day""#) && json.contains(r#""start_ms":0,"group":"a","requests":2"#));
        assert_eq!(serde_json::from_str::<Analytics>(&json).unwrap(), a);
    }

    #[test]
    fn query_parsing_and_validation() {
        assert_eq!("Hour".parse::<Granularity>().unwrap(), Granularity::Hour);
        assert!("week".parse::<Granularity>().is_err());
        for (s, g) in [
            ("", GroupBy::None),
            ("none", GroupBy::None),
            ("model", GroupBy::Model),
            ("provider", GroupBy::Provider),
            ("metadata.user.Id", GroupBy::Metadata("user.Id".into())),
        ] {
            assert_eq!(s.parse::<GroupBy>().unwrap(), g, "{s:?}");
        }
        assert!("metadata.".parse::<GroupBy>().is_err());
        assert!("user".parse::<GroupBy>().is_err());
        let q = AnalyticsQuery {
            from_ms: 0,
            to_ms: DAY_MS,
            granularity: Granularity::Minute,
            group_by: GroupBy::Metadata("k".into()),
        };
        let json = serde_json::to_string(&q).unwrap();
        assert_eq!(json, r#"{"from_ms":0,"to_ms":86400000,"granularity":"minute","group_by":"metadata.k"}"#);
        assert_eq!(serde_json::from_str::<AnalyticsQuery>(&json).unwrap(), q);
        assert_eq!(q.bucket_count(), 1440);
        assert!(q.validate().is_ok());
        // Buckets whose start is in [from, to): 00:00:30 .. 00:02:00 holds 00:01 only.
        let q2 = AnalyticsQuery { from_ms: 30_000, to_ms: 2 * MINUTE_MS, ..q.clone() };
        assert_eq!(q2.bucket_count(), 1);
        assert!(AnalyticsQuery { from_ms: 2, to_ms: 1, ..q.clone() }.validate().is_err());
        let long = AnalyticsQuery { to_ms: 50_001 * MINUTE_MS, ..q.clone() };
        assert!(matches!(plan(&long), Err(StoreError::InvalidInput(m)) if m.starts_with("invalid")));
        assert!(AnalyticsQuery { to_ms: 50_000 * MINUTE_MS, ..q.clone() }.validate().is_ok());
        assert!(AnalyticsQuery { to_ms: u64::MAX, granularity: Granularity::Day, ..q }.validate().is_err());
    }
}
