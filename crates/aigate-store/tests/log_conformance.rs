//! One conformance suite for every [`LogStore`]: SQLite and PostgreSQL; then the backend-specific
//! checks (persistence, backend selection, concurrent schema creation, refused schemas, failure
//! behaviour).
//!
//! PostgreSQL tests use the server at `postgres://postgres@127.0.0.1:5432/test` (override with
//! `AIGATE_TEST_POSTGRES_URL`) and FAIL when it is unreachable, unless `AIGATE_SKIP_POSTGRES=1`.
//! Each PostgreSQL test uses its own tables (process id + counter), dropped at the end, so tests run
//! in parallel and alongside other runs without interfering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigate_store::log::analytics::{nearest_rank, DAY_MS, MINUTE_MS};
use aigate_store::{
    log_id_at, open_log_store, Analytics, AnalyticsQuery, AnalyticsStats, AtCap, Backends, CacheBackend, CacheStore,
    Clock, Granularity, GroupBy, LimitBackend, LogBackend, LogFilter, LogRecord, LogStore, MetaValue, PostgresLogStore,
    Retention, SqliteLogStore, StoreError, DELETE_CHUNK_ROWS, LOG_SQLITE_FILE,
};
use bytes::Bytes;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

use common::{now_ms, unique, TempDir};

fn pg_url() -> String {
    std::env::var("AIGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether PostgreSQL tests run: always, unless `AIGATE_SKIP_POSTGRES=1` (then they pass
/// vacuously, loudly).
fn pg_enabled() -> bool {
    if std::env::var("AIGATE_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        eprintln!("AIGATE_SKIP_POSTGRES=1: skipping a PostgreSQL test");
        return false;
    }
    true
}

/// Drops a test's tables when the test ends (on a thread of its own: Drop cannot await).
struct PgTables(String);

impl Drop for PgTables {
    fn drop(&mut self) {
        let t = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let Ok((client, conn)) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await else {
                    return;
                };
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!(r#"DROP TABLE IF EXISTS "{t}", "{t}_counts", "{t}_rollups", "{t}_schema""#))
                    .await;
            });
        })
        .join();
    }
}

/// A PostgreSQL store on fresh tables, its schema created; panics when the server is unreachable.
async fn pg_store(table: &str) -> PostgresLogStore {
    let store = PostgresLogStore::connect_with_table(&pg_url(), table).unwrap();
    if let Err(e) = store.ensure_schema().await {
        panic!("PostgreSQL at {} unreachable ({e}); start it or set AIGATE_SKIP_POSTGRES=1", pg_url());
    }
    store
}

/// A store under test, its gateway name, and what must outlive it.
struct Fixture {
    store: Arc<dyn LogStore>,
    gw: String,
    _dir: Option<TempDir>,
    _tables: Option<PgTables>,
}

async fn sqlite_fixture() -> Option<Fixture> {
    let dir = TempDir::new("sqlite");
    let backend = LogBackend::Sqlite { path: dir.path().join(LOG_SQLITE_FILE) };
    let store = open_log_store(&backend, &Clock::system()).unwrap();
    Some(Fixture { store, gw: unique("gw"), _dir: Some(dir), _tables: None })
}

/// The SQLite store with a new partition every two rows (an exact cap): every case on many
/// partitions.
async fn sqlite_partitioned_fixture() -> Option<Fixture> {
    let dir = TempDir::new("sqlite-parts");
    let store = SqliteLogStore::open_with_partition_rows(&dir.path().join(LOG_SQLITE_FILE), 2).unwrap();
    Some(Fixture { store: Arc::new(store), gw: unique("gw"), _dir: Some(dir), _tables: None })
}

async fn postgres_fixture() -> Option<Fixture> {
    if !pg_enabled() {
        return None;
    }
    let table = unique("logs");
    let tables = PgTables(table.clone());
    let store = pg_store(&table).await;
    Some(Fixture { store: Arc::new(store), gw: unique("gw"), _dir: None, _tables: Some(tables) })
}

/// A record with only the required fields set.
fn rec(id: &str, ms: u64) -> LogRecord {
    LogRecord {
        id: id.to_owned(),
        created_at_ms: ms,
        gateway: String::new(),
        provider: "openai".into(),
        path: "/v1/chat/completions".into(),
        status: 200,
        success: true,
        cache_status: "MISS".into(),
        duration_ms: 10.0,
        ..LogRecord::default()
    }
}

/// A record with every field set.
fn full(id: &str, ms: u64) -> LogRecord {
    LogRecord {
        id: id.to_owned(),
        event_id: Some("evt-1".into()),
        created_at_ms: ms,
        gateway: "ignored".into(),
        provider: "anthropic".into(),
        path: "/v1/messages".into(),
        requested_model: Some("claude".into()),
        served_model: Some("claude-3-5-sonnet-20241022".into()),
        status: 503,
        success: false,
        cache_status: "SHADOW-HIT".into(),
        stream: true,
        duration_ms: 1234.5,
        ttfb_ms: Some(12.25),
        upstream_ms: Some(1200.0),
        overhead_ms: Some(0.125),
        tokens_in: Some(1_000_000),
        tokens_out: Some(2),
        cached_tokens_in: Some(512),
        reasoning_tokens: Some(0),
        cost_usd: Some(0.000_123),
        saved_usd: Some(1.5),
        custom_cost: true,
        metadata: vec![
            ("zeta".into(), MetaValue::String("Zürich \"quoted\" 🚀".into())),
            ("alpha".into(), MetaValue::Number(-2.5)),
            ("int".into(), MetaValue::Number(7.0)),
            ("flag".into(), MetaValue::Bool(false)),
            ("empty".into(), MetaValue::String(String::new())),
        ],
        user_agent: Some("OpenAI/Python 1.0".into()),
        error: Some("upstream: 503 overloaded".into()),
        request_body: Some(Bytes::from_static(b"{\"messages\":[]}\x00\xff\xfe")),
        response_body: Some(Bytes::from(vec![7u8; 100_000])),
        feedback: Some(-1),
        score: Some(0.875),
        attempts: 4,
        step: Some(2),
        route: Some("support@3".into()),
        breaker: Some("open: openai".into()),
    }
}

/// What the store returns for `r` inserted into `gw`.
fn stored(r: &LogRecord, gw: &str) -> LogRecord {
    LogRecord { gateway: gw.to_owned(), ..r.clone() }
}

/// `stored` without the bodies (as listed).
fn listed(r: &LogRecord, gw: &str) -> LogRecord {
    LogRecord { request_body: None, response_body: None, ..stored(r, gw) }
}

/// Ids of every record matching `f`, following cursors, newest first.
async fn all_ids(s: &dyn LogStore, gw: &str, f: &LogFilter) -> Vec<String> {
    let mut f = f.clone();
    let mut out = Vec::new();
    loop {
        let page = s.list(gw, &f).await.unwrap();
        assert!(page.records.len() <= f.effective_limit() as usize);
        out.extend(page.records.into_iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => f.cursor = Some(c),
            None => return out,
        }
    }
}

const HOUR: u64 = 3_600_000;

/// The analytics of `gw` over `[from, to)`.
async fn analytics(s: &dyn LogStore, gw: &str, from: u64, to: u64, g: Granularity, by: GroupBy) -> Analytics {
    let q = AnalyticsQuery { from_ms: from, to_ms: to, granularity: g, group_by: by };
    s.analytics(gw, &q).await.unwrap()
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The exact nearest-rank percentile of `v`.
fn exact_percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[nearest_rank(p, v.len() as u64) as usize - 1]
}

/// Checks `got` against the aggregates computed here from `records` (percentiles within 10 %).
fn check_stats(got: &AnalyticsStats, records: &[&LogRecord], what: &str) {
    let n = records.len() as u64;
    let count = |f: &dyn Fn(&LogRecord) -> bool| records.iter().filter(|r| f(r)).count() as u64;
    let sum_u = |f: &dyn Fn(&LogRecord) -> Option<u64>| records.iter().filter_map(|r| f(r)).sum::<u64>();
    let sum_f = |f: &dyn Fn(&LogRecord) -> Option<f64>| records.iter().filter_map(|r| f(r)).sum::<f64>();
    let hits = count(&|r| r.cache_status == "HIT");
    let errors = count(&|r| !r.success);
    assert_eq!(got.requests, n, "{what}: requests");
    assert_eq!(got.errors, errors, "{what}: errors");
    assert_eq!(got.cache_hits, hits, "{what}: cache_hits");
    assert_eq!(got.shadow_hits, count(&|r| r.cache_status == "SHADOW-HIT"), "{what}: shadow_hits");
    assert!(approx(got.hit_rate, hits as f64 / n as f64), "{what}: hit_rate {}", got.hit_rate);
    assert!(approx(got.error_rate, errors as f64 / n as f64), "{what}: error_rate {}", got.error_rate);
    assert_eq!(got.tokens_in, sum_u(&|r| r.tokens_in), "{what}: tokens_in");
    assert_eq!(got.tokens_out, sum_u(&|r| r.tokens_out), "{what}: tokens_out");
    assert_eq!(got.cached_tokens_in, sum_u(&|r| r.cached_tokens_in), "{what}: cached_tokens_in");
    assert_eq!(got.reasoning_tokens, sum_u(&|r| r.reasoning_tokens), "{what}: reasoning_tokens");
    assert!(approx(got.cost_usd, sum_f(&|r| r.cost_usd)), "{what}: cost_usd {}", got.cost_usd);
    assert_eq!(got.cost_unknown, count(&|r| r.cost_usd.is_none() && r.cache_status != "HIT"), "{what}: unknown");
    assert!(approx(got.saved_usd, sum_f(&|r| r.saved_usd)), "{what}: saved_usd {}", got.saved_usd);
    let shadow = sum_f(&|r| r.cost_usd.filter(|_| r.cache_status == "SHADOW-HIT"));
    assert!(approx(got.shadow_saved_usd, shadow), "{what}: shadow_saved_usd {}", got.shadow_saved_usd);
    let durations: Vec<f64> = records.iter().map(|r| r.duration_ms).collect();
    let mean = durations.iter().sum::<f64>() / n as f64;
    assert!(approx(got.mean_ms.unwrap(), mean), "{what}: mean {:?} vs {mean}", got.mean_ms);
    for (p, est) in [(0.5, got.p50_ms), (0.95, got.p95_ms), (0.99, got.p99_ms)] {
        let exact = exact_percentile(&durations, p);
        let est = est.unwrap();
        assert!((est - exact).abs() <= 0.1 * exact, "{what}: p{p} {est} vs exact {exact}");
    }
}

/// 60 records over 3 hours (22:00 to 01:00 UTC, so across two days), 4 minutes per hour, 2 models,
/// 2 providers, metadata `user` = a / b (or absent), hits, shadow hits, errors and unknown costs.
fn analytics_fixture(base: u64) -> Vec<LogRecord> {
    (0..60u64)
        .map(|i| {
            let ms = base + (i % 3) * HOUR + ((i / 3) % 4) * MINUTE_MS + i;
            let mut r = rec(&format!("an-{i:02}"), ms);
            if i % 2 == 0 {
                r.served_model = Some("gpt-4o".into());
                r.requested_model = Some("alias".into());
            } else {
                r.requested_model = Some("claude".into());
            }
            r.provider = if i % 5 == 0 { "anthropic".into() } else { "openai".into() };
            if i % 10 != 9 {
                let user = if i % 7 < 3 { "a" } else { "b" };
                r.metadata =
                    vec![("user".into(), MetaValue::String(user.into())), ("n".into(), MetaValue::Number(1.0))];
            }
            r.cache_status = match i % 6 {
                0 => "HIT".into(),
                1 => "SHADOW-HIT".into(),
                _ => "MISS".into(),
            };
            if i % 8 == 3 {
                (r.status, r.success) = (502, false);
            }
            r.cost_usd = (i % 9 != 4).then(|| 0.001 * (i + 1) as f64);
            r.saved_usd = (i % 6 == 0).then_some(0.002);
            r.tokens_in = Some(i * 10);
            r.tokens_out = (i % 2 == 0).then_some(5);
            r.cached_tokens_in = (i % 4 == 0).then_some(3);
            r.reasoning_tokens = (i % 3 == 0).then_some(7);
            r.duration_ms = 1.0 + ((i * i) % 997) as f64 * 1.7;
            r
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The conformance cases
// ---------------------------------------------------------------------------------------------

mod cases {
    use super::*;

    pub async fn roundtrip_every_field(s: &dyn LogStore, gw: &str) {
        let t = now_ms();
        // Ids as the gateway makes them: UUIDv7 holding the record's time.
        let a = full(&log_id_at(t).to_string(), t);
        let b = rec(&log_id_at(t - 1).to_string(), t - 1);
        assert_eq!(s.insert_batch(gw, &[a.clone(), b.clone()]).await.unwrap(), 2);
        assert_eq!(s.get(gw, &a.id).await.unwrap().unwrap(), stored(&a, gw));
        assert_eq!(s.get(gw, &b.id).await.unwrap().unwrap(), stored(&b, gw));
        assert_eq!(s.get(gw, "missing").await.unwrap(), None);
        let page = s.list(gw, &LogFilter::default()).await.unwrap();
        assert_eq!(page.records, vec![listed(&a, gw), listed(&b, gw)]);
        assert_eq!(page.next_cursor, None);
        assert_eq!(s.count(gw).await.unwrap(), 2);
        assert_eq!(s.insert_batch(gw, &[]).await.unwrap(), 0);
    }

    pub async fn a_batch_of_rows_differing_one_field_at_a_time(s: &dyn LogStore, gw: &str) {
        // Each record differs from the one before it in one field (a store may bind only what
        // changed from row to row), then in the reverse direction.
        let t = now_ms();
        let mut r = full("", t);
        let steps: Vec<fn(&mut LogRecord)> = vec![
            |r| r.event_id = None,
            |r| r.provider = "openai".into(),
            |r| r.path = "/v1/embeddings".into(),
            |r| r.requested_model = None,
            |r| r.served_model = None,
            |r| r.status = 200,
            |r| r.success = true,
            |r| r.cache_status = "HIT".into(),
            |r| r.stream = false,
            |r| r.duration_ms = 3.5,
            |r| r.ttfb_ms = None,
            |r| r.upstream_ms = Some(2.0),
            |r| r.overhead_ms = None,
            |r| r.tokens_in = None,
            |r| r.tokens_out = Some(3),
            |r| r.cached_tokens_in = None,
            |r| r.reasoning_tokens = Some(9),
            |r| r.cost_usd = None,
            |r| r.saved_usd = Some(0.5),
            |r| r.custom_cost = false,
            |r| r.metadata = vec![("k".into(), MetaValue::Bool(true))],
            |r| r.metadata.clear(),
            |r| r.user_agent = None,
            |r| r.error = None,
            |r| r.request_body = None,
            |r| r.response_body = None,
            |r| r.feedback = Some(1),
            |r| r.score = None,
            |r| r.request_body = Some(Bytes::from_static(b"again")),
        ];
        let first = r.clone();
        let mut records = Vec::new();
        let mut push = |r: &mut LogRecord| {
            let ms = t + records.len() as u64;
            (r.id, r.created_at_ms) = (log_id_at(ms).to_string(), ms);
            records.push(r.clone());
        };
        push(&mut r);
        for step in &steps {
            step(&mut r);
            push(&mut r);
        }
        // Back towards the first record, one field at a time.
        let fields: Vec<fn(&mut LogRecord, &LogRecord)> = vec![
            |r, f| r.event_id.clone_from(&f.event_id),
            |r, f| r.status = f.status,
            |r, f| r.duration_ms = f.duration_ms,
            |r, f| r.ttfb_ms = f.ttfb_ms,
            |r, f| r.metadata.clone_from(&f.metadata),
            |r, f| r.response_body.clone_from(&f.response_body),
            |r, f| r.cost_usd = f.cost_usd,
            |r, f| r.error.clone_from(&f.error),
        ];
        for f in &fields {
            f(&mut r, &first);
            push(&mut r);
        }
        let n = records.len() as u64;
        assert_eq!(s.insert_batch(gw, &records).await.unwrap(), n);
        for want in &records {
            assert_eq!(s.get(gw, &want.id).await.unwrap().unwrap(), stored(want, gw), "{}", want.id);
        }
        let page = s.list(gw, &LogFilter { limit: Some(100), ..LogFilter::default() }).await.unwrap();
        let mut want: Vec<LogRecord> = records.iter().map(|r| listed(r, gw)).collect();
        want.reverse();
        assert_eq!(page.records, want);
    }

    pub async fn stored_values_are_bounded(s: &dyn LogStore, gw: &str) {
        let mut r = rec("bounded", now_ms());
        r.metadata = (0..8).map(|i| (format!("k{i}"), MetaValue::Number(f64::from(i)))).collect();
        r.metadata.insert(1, ("nan".into(), MetaValue::Number(f64::NAN)));
        r.duration_ms = f64::INFINITY;
        r.cost_usd = Some(f64::NAN);
        r.ttfb_ms = Some(f64::NEG_INFINITY);
        r.tokens_in = Some(u64::MAX);
        assert_eq!(s.insert_batch(gw, &[r]).await.unwrap(), 1);
        let got = s.get(gw, "bounded").await.unwrap().unwrap();
        let keys: Vec<&str> = got.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
        assert_eq!(got.duration_ms, 0.0);
        assert_eq!((got.cost_usd, got.ttfb_ms), (None, None));
        assert_eq!(got.tokens_in, Some(i64::MAX as u64));
        // The saturated count still filters without overflow.
        let f = LogFilter { min_tokens: Some(1), ..LogFilter::default() };
        assert_eq!(all_ids(s, gw, &f).await, ["bounded"]);
    }

    pub async fn duplicate_ids_are_skipped(s: &dyn LogStore, gw: &str) {
        let t = now_ms();
        assert_eq!(s.insert_batch(gw, &[rec("a", t), rec("b", t)]).await.unwrap(), 2);
        // A record is its id and time (the gateway's ids hold their time: they never meet twice).
        let mut b2 = rec("b", t);
        b2.status = 500;
        assert_eq!(s.insert_batch(gw, &[b2, rec("c", t), rec("c", t)]).await.unwrap(), 1);
        assert_eq!(s.count(gw).await.unwrap(), 3);
        assert_eq!(s.get(gw, "b").await.unwrap().unwrap().status, 200, "first write wins");
    }

    pub async fn pagination_is_stable_across_equal_timestamps(s: &dyn LogStore, gw: &str) {
        let base = now_ms();
        // 23 records over 5 timestamps; ids are not in timestamp or insertion order.
        let records: Vec<LogRecord> =
            (0..23u64).map(|i| rec(&format!("id-{:02}", (i * 7) % 23), base + i / 5)).collect();
        let (first, second) = records.split_at(11);
        assert_eq!(s.insert_batch(gw, second).await.unwrap(), 12);
        assert_eq!(s.insert_batch(gw, first).await.unwrap(), 11);
        let mut expected: Vec<(u64, String)> = records.iter().map(|r| (r.created_at_ms, r.id.clone())).collect();
        expected.sort_by(|a, b| b.cmp(a));
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();

        for limit in [1, 4, 5, 22, 23, 50] {
            let f = LogFilter { limit: Some(limit), ..LogFilter::default() };
            assert_eq!(all_ids(s, gw, &f).await, expected, "limit {limit}");
        }
        // An exact last page has no cursor.
        let page = s.list(gw, &LogFilter { limit: Some(23), ..LogFilter::default() }).await.unwrap();
        assert_eq!((page.records.len(), page.next_cursor), (23, None));

        // Records arriving between pages neither shift nor repeat what follows.
        let f = LogFilter { limit: Some(4), ..LogFilter::default() };
        let page = s.list(gw, &f).await.unwrap();
        let mut seen: Vec<String> = page.records.iter().map(|r| r.id.clone()).collect();
        let newest = vec![rec("id-99", base + 1_000), rec("id-00a", base + 4), rec("id-000", base)];
        assert_eq!(s.insert_batch(gw, &newest).await.unwrap(), 3);
        let rest = all_ids(s, gw, &LogFilter { cursor: page.next_cursor, ..f }).await;
        seen.extend(rest);
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "duplicates: {seen:?}");
        // Everything of the original set, in order; of the newcomers only the one sorting after the
        // cursor, (base, "id-000"), in its place.
        let mut want: Vec<(u64, String)> = records.iter().map(|r| (r.created_at_ms, r.id.clone())).collect();
        want.push((base, "id-000".into()));
        want.sort_by(|a, b| b.cmp(a));
        let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
        assert_eq!(seen, want);
    }

    /// Inserts five records covering every filter, r0 (oldest) to r4 (newest), out of order.
    async fn filter_fixture(s: &dyn LogStore, gw: &str, base: u64) {
        let meta = |v: &[(&str, MetaValue)]| v.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<Vec<_>>();
        let mut r0 = rec("r0", base);
        r0.cache_status = "HIT".into();
        r0.requested_model = Some("gpt-4o".into());
        r0.served_model = Some("gpt-4o".into());
        r0.cost_usd = Some(0.01);
        (r0.tokens_in, r0.tokens_out) = (Some(10), Some(20));
        r0.duration_ms = 100.0;
        r0.metadata = meta(&[
            ("user", MetaValue::String("alice".into())),
            ("tier", MetaValue::Number(1.0)),
            ("beta", MetaValue::Bool(true)),
        ]);
        r0.event_id = Some("e0".into());
        (r0.route, r0.step) = (Some("support@3".into()), Some(0));

        let mut r1 = rec("r1", base + 1);
        (r1.status, r1.success) = (500, false);
        r1.provider = "anthropic".into();
        r1.requested_model = Some("claude".into());
        r1.duration_ms = 2000.0;
        r1.metadata = meta(&[("user", MetaValue::String("bob".into()))]);

        let mut r2 = rec("r2", base + 2);
        r2.requested_model = Some("alias".into());
        r2.served_model = Some("gpt-4o-mini".into());
        r2.cost_usd = Some(0.5);
        r2.tokens_in = Some(1000);
        r2.duration_ms = 50.0;
        r2.metadata = meta(&[("tier", MetaValue::Number(2.0))]);
        r2.event_id = Some("e2".into());
        (r2.route, r2.step) = (Some("support@12".into()), Some(1));

        let mut r3 = rec("r3", base + 3);
        (r3.status, r3.success) = (429, false);
        r3.cache_status = "BYPASS".into();
        r3.requested_model = Some("gpt-4o".into());
        r3.cost_usd = Some(0.0);
        r3.tokens_out = Some(5);
        r3.duration_ms = 10.0;
        r3.metadata = meta(&[("user", MetaValue::String("1".into()))]);

        let mut r4 = rec("r4", base + 4);
        r4.cache_status = "SHADOW-HIT".into();
        r4.provider = "workers-ai".into();
        r4.served_model = Some("gpt-4o".into());
        r4.cost_usd = Some(0.02);
        (r4.tokens_in, r4.tokens_out) = (Some(100), Some(100));
        r4.duration_ms = 300.0;
        r4.metadata = meta(&[("beta", MetaValue::Bool(false))]);
        r4.event_id = Some("e0".into());
        // Another route whose name starts alike, and one whose name holds wildcard characters.
        (r4.route, r4.step) = (Some("support-v2@1".into()), Some(1));
        r3.route = Some("a_b%".into());
        r1.route = Some("axb@1".into());

        assert_eq!(s.insert_batch(gw, &[r3, r1, r4, r0, r2]).await.unwrap(), 5);
    }

    pub async fn each_filter_selects_its_records(s: &dyn LogStore, gw: &str) {
        let base = now_ms();
        filter_fixture(s, gw, base).await;
        let d = LogFilter::default;
        let meta = |k: &str, v: MetaValue| LogFilter { metadata: Some((k.to_owned(), v)), ..d() };
        let cases: Vec<(&str, LogFilter, &[&str])> = vec![
            ("all", d(), &["r4", "r3", "r2", "r1", "r0"]),
            ("time range", LogFilter { from_ms: Some(base + 1), to_ms: Some(base + 3), ..d() }, &["r2", "r1"]),
            ("from", LogFilter { from_ms: Some(base + 3), ..d() }, &["r4", "r3"]),
            ("status", LogFilter { status: Some(200), ..d() }, &["r4", "r2", "r0"]),
            ("status none", LogFilter { status: Some(404), ..d() }, &[]),
            ("failed", LogFilter { success: Some(false), ..d() }, &["r3", "r1"]),
            ("succeeded", LogFilter { success: Some(true), ..d() }, &["r4", "r2", "r0"]),
            ("cached", LogFilter { cached: Some(true), ..d() }, &["r0"]),
            ("not cached", LogFilter { cached: Some(false), ..d() }, &["r4", "r3", "r2", "r1"]),
            ("provider", LogFilter { provider: Some("openai".into()), ..d() }, &["r3", "r2", "r0"]),
            ("model served or requested", LogFilter { model: Some("gpt-4o".into()), ..d() }, &["r4", "r3", "r0"]),
            ("model requested only", LogFilter { model: Some("alias".into()), ..d() }, &["r2"]),
            ("model served only", LogFilter { model: Some("gpt-4o-mini".into()), ..d() }, &["r2"]),
            ("min cost", LogFilter { min_cost_usd: Some(0.015), ..d() }, &["r4", "r2"]),
            ("max cost (unknown never)", LogFilter { max_cost_usd: Some(0.015), ..d() }, &["r3", "r0"]),
            ("cost range", LogFilter { min_cost_usd: Some(0.01), max_cost_usd: Some(0.02), ..d() }, &["r4", "r0"]),
            ("min tokens", LogFilter { min_tokens: Some(100), ..d() }, &["r4", "r2"]),
            ("max tokens (unknown never)", LogFilter { max_tokens: Some(30), ..d() }, &["r3", "r0"]),
            ("min duration", LogFilter { min_duration_ms: Some(100.0), ..d() }, &["r4", "r1", "r0"]),
            ("max duration", LogFilter { max_duration_ms: Some(50.0), ..d() }, &["r3", "r2"]),
            ("meta string", meta("user", MetaValue::String("alice".into())), &["r0"]),
            ("meta string that looks numeric", meta("user", MetaValue::String("1".into())), &["r3"]),
            ("meta number", meta("tier", MetaValue::Number(1.0)), &["r0"]),
            ("meta number 2", meta("tier", MetaValue::Number(2.0)), &["r2"]),
            ("meta number vs string", meta("tier", MetaValue::String("1".into())), &[]),
            ("meta string vs number", meta("user", MetaValue::Number(1.0)), &[]),
            ("meta true", meta("beta", MetaValue::Bool(true)), &["r0"]),
            ("meta false", meta("beta", MetaValue::Bool(false)), &["r4"]),
            ("meta missing key", meta("nope", MetaValue::Bool(true)), &[]),
            ("event id", LogFilter { event_id: Some("e0".into()), ..d() }, &["r4", "r0"]),
            ("route, any version", LogFilter { route: Some("support".into()), ..d() }, &["r2", "r0"]),
            ("route version", LogFilter { route: Some("support@3".into()), ..d() }, &["r0"]),
            ("route name case", LogFilter { route: Some("Support".into()), ..d() }, &[]),
            ("route wildcards literal", LogFilter { route: Some("a_b%".into()), ..d() }, &["r3"]),
            ("route underscore literal", LogFilter { route: Some("a_b".into()), ..d() }, &[]),
            ("route star literal", LogFilter { route: Some("ax*".into()), ..d() }, &[]),
            ("route question mark literal", LogFilter { route: Some("a?b".into()), ..d() }, &[]),
            ("step", LogFilter { step: Some(1), ..d() }, &["r4", "r2"]),
            ("step 0", LogFilter { step: Some(0), ..d() }, &["r0"]),
            ("route and step", LogFilter { route: Some("support".into()), step: Some(1), ..d() }, &["r2"]),
            (
                "combined",
                LogFilter { provider: Some("openai".into()), status: Some(200), limit: Some(1), ..d() },
                &["r2", "r0"],
            ),
        ];
        for (name, f, want) in cases {
            assert_eq!(all_ids(s, gw, &f).await, want, "filter {name}: {f:?}");
        }
    }

    pub async fn delete_by_filter(s: &dyn LogStore, gw: &str) {
        filter_fixture(s, gw, now_ms()).await;
        let failed = LogFilter { success: Some(false), limit: Some(1), cursor: None, ..LogFilter::default() };
        assert_eq!(s.delete(gw, &failed).await.unwrap(), 2, "limit is ignored");
        assert_eq!(s.count(gw).await.unwrap(), 3);
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, ["r4", "r2", "r0"]);
        assert_eq!(s.delete(gw, &failed).await.unwrap(), 0);
        let meta = LogFilter { metadata: Some(("beta".into(), MetaValue::Bool(true))), ..LogFilter::default() };
        assert_eq!(s.delete(gw, &meta).await.unwrap(), 1);
        assert_eq!(s.get(gw, "r0").await.unwrap(), None);
        assert_eq!(s.delete(gw, &LogFilter::default()).await.unwrap(), 2);
        assert_eq!(s.count(gw).await.unwrap(), 0);
        assert!(s.list(gw, &LogFilter::default()).await.unwrap().records.is_empty());
    }

    pub async fn patch_feedback_and_score(s: &dyn LogStore, gw: &str) {
        s.insert_batch(gw, &[rec("p", now_ms())]).await.unwrap();
        assert!(s.patch(gw, "p", Some(1), None).await.unwrap());
        let got = s.get(gw, "p").await.unwrap().unwrap();
        assert_eq!((got.feedback, got.score), (Some(1), None));
        assert!(s.patch(gw, "p", None, Some(0.75)).await.unwrap());
        let got = s.get(gw, "p").await.unwrap().unwrap();
        assert_eq!((got.feedback, got.score), (Some(1), Some(0.75)));
        assert!(s.patch(gw, "p", Some(-1), None).await.unwrap());
        assert!(s.patch(gw, "p", None, None).await.unwrap(), "exists");
        let listed = s.list(gw, &LogFilter::default()).await.unwrap().records;
        assert_eq!((listed[0].feedback, listed[0].score), (Some(-1), Some(0.75)));
        assert!(!s.patch(gw, "missing", Some(1), None).await.unwrap());
        assert!(
            matches!(s.patch(gw, "p", Some(2), None).await, Err(StoreError::InvalidInput(m)) if m.starts_with("invalid"))
        );
        assert!(matches!(s.patch(gw, "p", Some(0), None).await, Err(StoreError::InvalidInput(_))));
        assert!(matches!(s.patch(gw, "p", None, Some(f64::NAN)).await, Err(StoreError::InvalidInput(_))));
        let got = s.get(gw, "p").await.unwrap().unwrap();
        assert_eq!((got.feedback, got.score), (Some(-1), Some(0.75)));
    }

    pub async fn retention_stop_inserting(s: &dyn LogStore, gw: &str) {
        let r = Retention { max_records: 10, at_cap: AtCap::StopInserting, max_age_ms: None };
        s.set_retention(gw, r);
        assert_eq!(s.retention(gw), Some(r));
        let t = now_ms();
        let batch = |from: u64, n: u64| (from..from + n).map(|i| rec(&format!("s{i:02}"), t + i)).collect::<Vec<_>>();
        assert_eq!(s.insert_batch(gw, &batch(0, 7)).await.unwrap(), 7);
        // A duplicate does not use room.
        let mut b = batch(6, 1);
        b.extend(batch(7, 5));
        assert_eq!(s.insert_batch(gw, &b).await.unwrap(), 3);
        assert_eq!(s.count(gw).await.unwrap(), 10);
        assert_eq!(s.insert_batch(gw, &batch(20, 2)).await.unwrap(), 0);
        assert_eq!(s.count(gw).await.unwrap(), 10);
        let mut want: Vec<String> = (0..10).rev().map(|i| format!("s{i:02}")).collect();
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, want);
        // Enforcing never trims with StopInserting; room made by deleting is used again.
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 0);
        let one = LogFilter { event_id: None, from_ms: Some(t + 9), ..LogFilter::default() };
        assert_eq!(s.delete(gw, &one).await.unwrap(), 1);
        assert_eq!(s.insert_batch(gw, &batch(30, 2)).await.unwrap(), 1);
        want.remove(0);
        want.insert(0, "s30".into());
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, want);
    }

    pub async fn retention_delete_oldest(s: &dyn LogStore, gw: &str) {
        s.set_retention(gw, Retention { max_records: 10, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        let t = now_ms();
        let batch = |from: u64, n: u64| (from..from + n).map(|i| rec(&format!("d{i:02}"), t + i)).collect::<Vec<_>>();
        assert_eq!(s.insert_batch(gw, &batch(0, 6)).await.unwrap(), 6);
        // Inserted out of time order: the newest by timestamp are kept.
        let mut b = batch(6, 8);
        b.reverse();
        assert_eq!(s.insert_batch(gw, &b).await.unwrap(), 8);
        assert_eq!(s.count(gw).await.unwrap(), 10);
        let want: Vec<String> = (4..14).rev().map(|i| format!("d{i:02}")).collect();
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, want);
        // An older record is inserted, then trimmed at once.
        assert_eq!(s.insert_batch(gw, &[rec("old", t - 1)]).await.unwrap(), 1);
        assert_eq!(s.get(gw, "old").await.unwrap(), None);
        assert_eq!(s.count(gw).await.unwrap(), 10);
        // Lowering the cap trims on enforcement.
        s.set_retention(gw, Retention { max_records: 4, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 6);
        assert_eq!(s.count(gw).await.unwrap(), 4);
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, ["d13", "d12", "d11", "d10"]);
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 0);
        // Clearing the retention removes the cap.
        s.set_retention(gw, Retention::default());
        assert_eq!(s.retention(gw), None);
        assert_eq!(s.insert_batch(gw, &batch(40, 3)).await.unwrap(), 3);
        assert_eq!(s.count(gw).await.unwrap(), 7);
    }

    pub async fn max_age(s: &dyn LogStore, gw: &str) {
        let t = now_ms();
        let old: Vec<LogRecord> = (0..3).map(|i| rec(&format!("old{i}"), t - 2 * HOUR - i)).collect();
        let new: Vec<LogRecord> = (0..2).map(|i| rec(&format!("new{i}"), t - 10_000 + i)).collect();
        s.insert_batch(gw, &old).await.unwrap();
        s.insert_batch(gw, &new).await.unwrap();
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 0, "no retention set");
        s.set_retention(gw, Retention { max_records: u64::MAX, at_cap: AtCap::DeleteOldest, max_age_ms: Some(HOUR) });
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 3);
        assert_eq!(s.count(gw).await.unwrap(), 2);
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, ["new1", "new0"]);
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 0);

        // At the cap with StopInserting, expired rows make room before a batch is refused.
        s.insert_batch(gw, &old).await.unwrap();
        s.set_retention(gw, Retention { max_records: 5, at_cap: AtCap::StopInserting, max_age_ms: Some(HOUR) });
        let more: Vec<LogRecord> = (0..4).map(|i| rec(&format!("more{i}"), t + i)).collect();
        assert_eq!(s.insert_batch(gw, &more).await.unwrap(), 3);
        assert_eq!(s.count(gw).await.unwrap(), 5);
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, ["more2", "more1", "more0", "new1", "new0"]);
    }

    pub async fn gateways_are_isolated(s: &dyn LogStore, gw: &str) {
        let (a, b) = (format!("{gw}-a"), format!("{gw}-b"));
        let t = now_ms();
        let mut xb = rec("x", t);
        xb.provider = "b-provider".into();
        assert_eq!(s.insert_batch(&a, &[rec("x", t), rec("y", t + 1)]).await.unwrap(), 2);
        assert_eq!(s.insert_batch(&b, &[xb.clone(), rec("z", t + 2)]).await.unwrap(), 2, "same id, other gateway");
        assert_eq!(s.get(&a, "x").await.unwrap().unwrap().provider, "openai");
        assert_eq!(s.get(&b, "x").await.unwrap().unwrap(), stored(&xb, &b));
        assert_eq!(s.get(&a, "z").await.unwrap(), None);
        assert_eq!(all_ids(s, &a, &LogFilter::default()).await, ["y", "x"]);
        assert_eq!(all_ids(s, &b, &LogFilter::default()).await, ["z", "x"]);
        assert!(!s.patch(&a, "z", Some(1), None).await.unwrap());
        assert!(s.patch(&a, "x", Some(1), None).await.unwrap());
        assert_eq!(s.get(&b, "x").await.unwrap().unwrap().feedback, None);

        // Retention of one gateway leaves the other alone.
        s.set_retention(&a, Retention { max_records: 1, at_cap: AtCap::DeleteOldest, max_age_ms: Some(1) });
        assert_eq!(s.retention(&b), None);
        assert_eq!(s.insert_batch(&a, &[rec("w", t + 3)]).await.unwrap(), 1);
        assert_eq!(s.count(&a).await.unwrap(), 1);
        assert_eq!(s.count(&b).await.unwrap(), 2);
        assert_eq!(s.enforce_retention(&b).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(s.enforce_retention(&a).await.unwrap(), 1, "max_age of 1 ms");
        assert_eq!(s.count(&b).await.unwrap(), 2);

        s.insert_batch(&a, &[rec("v", t)]).await.unwrap();
        assert_eq!(s.delete(&a, &LogFilter::default()).await.unwrap(), 1);
        assert_eq!(s.count(&a).await.unwrap(), 0);
        assert_eq!(s.count(&b).await.unwrap(), 2);
        assert_eq!(s.count(&format!("{gw}-never")).await.unwrap(), 0);
    }

    pub async fn large_deletions_run_in_chunks(s: &dyn LogStore, gw: &str) {
        let n = DELETE_CHUNK_ROWS + 10;
        let t = now_ms();
        let many = |tag: &str| (0..n).map(|i| rec(&format!("{tag}{i:06}"), t + i)).collect::<Vec<_>>();
        assert_eq!(s.insert_batch(gw, &many("a")).await.unwrap(), n);
        // Lowering a cap far below the count: trimmed over several transactions.
        s.set_retention(gw, Retention { max_records: 5, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        assert_eq!(s.enforce_retention(gw).await.unwrap(), n - 5);
        assert_eq!(s.count(gw).await.unwrap(), 5);
        let newest: Vec<String> = (n - 5..n).rev().map(|i| format!("a{i:06}")).collect();
        assert_eq!(all_ids(s, gw, &LogFilter::default()).await, newest);
        // Deleting more than a chunk by filter.
        let other = format!("{gw}-b");
        assert_eq!(s.insert_batch(&other, &many("b")).await.unwrap(), n);
        let f = LogFilter { from_ms: Some(t + 5), ..LogFilter::default() };
        assert_eq!(s.delete(&other, &f).await.unwrap(), n - 5);
        assert_eq!(s.count(&other).await.unwrap(), 5);
        assert_eq!(s.count(gw).await.unwrap(), 5);
    }

    pub async fn analytics_totals_groups_and_buckets(s: &dyn LogStore, gw: &str) {
        let day = now_ms() / DAY_MS * DAY_MS - 2 * DAY_MS;
        let base = day + 22 * HOUR;
        let records = analytics_fixture(base);
        let (first, second) = records.split_at(25);
        s.insert_batch(gw, second).await.unwrap();
        s.insert_batch(gw, first).await.unwrap();
        let all: Vec<&LogRecord> = records.iter().collect();
        let (from, to) = (base, base + 3 * HOUR);
        let by = |f: &dyn Fn(&LogRecord) -> bool| records.iter().filter(|r| f(r)).collect::<Vec<_>>();

        let a = analytics(s, gw, from, to, Granularity::Hour, GroupBy::None).await;
        assert_eq!((a.from_ms, a.to_ms, a.granularity, a.group_by.clone()), (from, to, Granularity::Hour, None));
        check_stats(&a.totals, &all, "totals");
        assert!(a.groups.is_empty());
        let starts: Vec<(u64, Option<String>)> = a.buckets.iter().map(|b| (b.start_ms, b.group.clone())).collect();
        assert_eq!(starts, [(base, None), (base + HOUR, None), (base + 2 * HOUR, None)]);
        for (h, b) in a.buckets.iter().enumerate() {
            let h = h as u64;
            check_stats(&b.stats, &by(&|r| r.created_at_ms / HOUR == base / HOUR + h), "hour bucket");
        }

        let a = analytics(s, gw, from, to, Granularity::Minute, GroupBy::None).await;
        assert_eq!(a.buckets.len(), 12);
        assert_eq!(a.buckets[1].start_ms, base + MINUTE_MS);
        assert_eq!(a.buckets[4].start_ms, base + HOUR);
        assert!(a.buckets.iter().all(|b| b.stats.requests == 5));
        check_stats(&a.totals, &all, "minute totals");

        let a = analytics(s, gw, day, day + 2 * DAY_MS, Granularity::Day, GroupBy::None).await;
        let days: Vec<(u64, u64)> = a.buckets.iter().map(|b| (b.start_ms, b.stats.requests)).collect();
        assert_eq!(days, [(day, 40), (day + DAY_MS, 20)]);
        check_stats(&a.buckets[0].stats, &by(&|r| r.created_at_ms < day + DAY_MS), "day 1");
        check_stats(&a.totals, &all, "day totals");
        // Day buckets whose start is in the range: the second day only.
        let a = analytics(s, gw, day + 1, day + 2 * DAY_MS, Granularity::Day, GroupBy::None).await;
        assert_eq!(a.totals.requests, 20);

        let a = analytics(s, gw, from, to, Granularity::Hour, GroupBy::Model).await;
        assert_eq!(a.group_by.as_deref(), Some("model"));
        check_stats(&a.totals, &all, "totals by model");
        let groups: Vec<(Option<&str>, u64)> =
            a.groups.iter().map(|g| (g.group.as_deref(), g.stats.requests)).collect();
        assert_eq!(groups, [(Some("claude"), 30), (Some("gpt-4o"), 30)]);
        check_stats(&a.groups[1].stats, &by(&|r| r.served_model.is_some()), "gpt-4o");
        assert_eq!(a.buckets.len(), 6);
        assert_eq!((a.buckets[0].start_ms, a.buckets[0].group.as_deref()), (base, Some("claude")));
        assert_eq!((a.buckets[1].start_ms, a.buckets[1].group.as_deref()), (base, Some("gpt-4o")));

        let a = analytics(s, gw, day, day + 2 * DAY_MS, Granularity::Day, GroupBy::Provider).await;
        let groups: Vec<(Option<&str>, u64)> =
            a.groups.iter().map(|g| (g.group.as_deref(), g.stats.requests)).collect();
        assert_eq!(groups, [(Some("openai"), 48), (Some("anthropic"), 12)]);
        check_stats(&a.groups[1].stats, &by(&|r| r.provider == "anthropic"), "anthropic");
        let starts: Vec<(u64, Option<&str>)> = a.buckets.iter().map(|b| (b.start_ms, b.group.as_deref())).collect();
        let want = [(day, "anthropic"), (day, "openai"), (day + DAY_MS, "anthropic"), (day + DAY_MS, "openai")];
        assert_eq!(starts, want.map(|(d, g)| (d, Some(g))));
        // from..to holds one day start (the second day's).
        let a = analytics(s, gw, from, to, Granularity::Day, GroupBy::Provider).await;
        assert_eq!(a.totals.requests, 20);
        assert_eq!(a.buckets.iter().map(|b| b.start_ms).collect::<Vec<_>>(), [day + DAY_MS, day + DAY_MS]);

        let a = analytics(s, gw, from, to, Granularity::Hour, "metadata.user".parse().unwrap()).await;
        assert_eq!(a.group_by.as_deref(), Some("metadata.user"));
        check_stats(&a.totals, &all, "totals by user (records without the key included)");
        let user = |u: &'static str| {
            move |r: &LogRecord| r.metadata.first().is_some_and(|(_, v)| *v == MetaValue::String(u.into()))
        };
        let (ua, ub) = (by(&user("a")), by(&user("b")));
        let groups: Vec<(Option<&str>, u64)> =
            a.groups.iter().map(|g| (g.group.as_deref(), g.stats.requests)).collect();
        assert_eq!(groups, [(Some("b"), ub.len() as u64), (Some("a"), ua.len() as u64)]);
        check_stats(&a.groups[1].stats, &ua, "user a");
        check_stats(&a.groups[0].stats, &ub, "user b");
        let n = analytics(s, gw, from, to, Granularity::Hour, GroupBy::Metadata("n".into())).await;
        assert_eq!(n.groups.iter().map(|g| g.group.as_deref()).collect::<Vec<_>>(), [Some("1")]);

        // A narrower range, another gateway, an empty range.
        let a = analytics(s, gw, base + HOUR, base + 2 * HOUR, Granularity::Hour, GroupBy::None).await;
        check_stats(&a.totals, &by(&|r| r.created_at_ms / HOUR == base / HOUR + 1), "one hour");
        let other = analytics(s, &format!("{gw}-other"), from, to, Granularity::Hour, GroupBy::Model).await;
        assert_eq!((other.totals.clone(), other.groups.len(), other.buckets.len()), (AnalyticsStats::default(), 0, 0));
        assert_eq!(analytics(s, gw, from, from, Granularity::Minute, GroupBy::None).await.totals.requests, 0);

        // Invalid queries.
        for (f, t, g) in [(to, from, Granularity::Hour), (0, 50_001 * MINUTE_MS, Granularity::Minute)] {
            let q = AnalyticsQuery { from_ms: f, to_ms: t, granularity: g, group_by: GroupBy::None };
            assert!(q.validate().is_err());
            match s.analytics(gw, &q).await {
                Err(StoreError::InvalidInput(m)) => assert!(m.starts_with("invalid"), "{m}"),
                other => panic!("{q:?}: {other:?}"),
            }
        }
    }

    pub async fn analytics_count_traffic_not_retention(s: &dyn LogStore, gw: &str) {
        let t = now_ms() / HOUR * HOUR - HOUR;
        let q =
            |g| AnalyticsQuery { from_ms: t - 10 * DAY_MS, to_ms: t + HOUR, granularity: g, group_by: GroupBy::None };
        let requests = || async { s.analytics(gw, &q(Granularity::Hour)).await.unwrap().totals.requests };
        assert_eq!(s.insert_batch(gw, &[rec("a", t), rec("b", t + 1)]).await.unwrap(), 2);
        // A duplicate (id and time), in the store or in the batch, is not counted twice.
        let mut b2 = rec("b", t + 1);
        b2.tokens_in = Some(1_000);
        assert_eq!(s.insert_batch(gw, &[b2, rec("c", t + 3), rec("c", t + 3)]).await.unwrap(), 1);
        assert_eq!(requests().await, 3);
        assert_eq!(s.analytics(gw, &q(Granularity::Hour)).await.unwrap().totals.tokens_in, 0);
        // Rollups only: counted, not stored.
        let mut extra = rec("not-kept", t + 5);
        extra.cost_usd = Some(0.25);
        s.add_to_rollups(gw, &[extra.clone(), rec("not-kept-2", t + 6)]).await.unwrap();
        s.add_to_rollups(gw, &[]).await.unwrap();
        assert_eq!(s.count(gw).await.unwrap(), 3);
        assert_eq!(s.get(gw, "not-kept").await.unwrap(), None);
        let before = s.analytics(gw, &q(Granularity::Minute)).await.unwrap();
        assert_eq!(before.totals.requests, 5);
        assert!(approx(before.totals.cost_usd, 0.25));
        assert_eq!(before.totals.cost_unknown, 4);
        // Records dropped at the cap are traffic too (a duplicate among them is not).
        s.set_retention(gw, Retention { max_records: 4, at_cap: AtCap::StopInserting, max_age_ms: None });
        assert_eq!(
            s.insert_batch(gw, &[rec("d", t + 7), rec("e", t + 8), rec("a", t), rec("e", t + 8)]).await.unwrap(),
            1
        );
        assert_eq!(requests().await, 7);
        // Deleting records and enforcing retention leave recent analytics alone.
        s.set_retention(gw, Retention { max_records: 1, at_cap: AtCap::DeleteOldest, max_age_ms: None });
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 3);
        assert_eq!(s.delete(gw, &LogFilter::default()).await.unwrap(), 1);
        assert_eq!(s.count(gw).await.unwrap(), 0);
        assert_eq!(requests().await, 7);
        assert_eq!(s.analytics(gw, &q(Granularity::Minute)).await.unwrap().totals.requests, 7);

        // Old minute rows are pruned by enforce_retention; hour rows stay.
        let old = t - 9 * DAY_MS;
        s.add_to_rollups(gw, &[rec("old", old)]).await.unwrap();
        assert_eq!(s.analytics(gw, &q(Granularity::Minute)).await.unwrap().totals.requests, 8);
        s.set_retention(gw, Retention::default());
        assert_eq!(s.enforce_retention(gw).await.unwrap(), 0);
        assert_eq!(s.analytics(gw, &q(Granularity::Minute)).await.unwrap().totals.requests, 7);
        assert_eq!(requests().await, 8);
        let days = s.analytics(gw, &q(Granularity::Day)).await.unwrap();
        assert_eq!(days.buckets.first().map(|b| (b.start_ms, b.stats.requests)), Some((old / DAY_MS * DAY_MS, 1)));
    }

    pub async fn analytics_concurrent_writers_sum_exactly(s: &dyn LogStore, gw: &str) {
        let t = now_ms() / MINUTE_MS * MINUTE_MS;
        let writer = |w: u64| async move {
            for b in 0..8u64 {
                let batch: Vec<LogRecord> = (0..25u64)
                    .map(|i| {
                        let mut r = rec(&format!("w{w}-{b}-{i}"), t + i);
                        r.tokens_in = Some(w * 100 + i);
                        r.duration_ms = (1 + i) as f64;
                        r
                    })
                    .collect();
                s.insert_batch(gw, &batch).await.unwrap();
                s.add_to_rollups(gw, &batch[..5]).await.unwrap();
            }
        };
        tokio::join!(writer(1), writer(2), writer(3));
        let q = |g| AnalyticsQuery { from_ms: t - HOUR, to_ms: t + HOUR, granularity: g, group_by: GroupBy::Model };
        for g in [Granularity::Minute, Granularity::Hour] {
            let a = s.analytics(gw, &q(g)).await.unwrap();
            assert_eq!(a.totals.requests, 3 * 8 * 30, "{g}");
            let tokens: u64 = [1u64, 2, 3]
                .iter()
                .map(|w| 8 * ((0..25).map(|i| w * 100 + i).sum::<u64>() + (0..5).map(|i| w * 100 + i).sum::<u64>()))
                .sum();
            assert_eq!(a.totals.tokens_in, tokens, "{g}");
            assert_eq!(a.groups.len(), 1);
            assert_eq!(a.groups[0].stats.requests, 3 * 8 * 30);
            assert_eq!(a.buckets.len(), 1);
            // Durations 1..=25 each 3*8 times, plus 1..=5 another 3*8 times: exact median 10.
            let p50 = a.totals.p50_ms.unwrap();
            assert!((p50 - 10.0).abs() <= 1.0, "{p50}");
        }
        assert_eq!(s.count(gw).await.unwrap(), 3 * 8 * 25);
    }

    pub async fn invalid_cursor_is_rejected(s: &dyn LogStore, gw: &str) {
        s.insert_batch(gw, &[rec("a", now_ms())]).await.unwrap();
        for bad in ["garbage", "", "MTIz"] {
            let f = LogFilter { cursor: Some(bad.into()), ..LogFilter::default() };
            assert!(f.validate().is_err(), "{bad:?}");
            match s.list(gw, &f).await {
                Err(StoreError::InvalidInput(m)) => assert!(m.starts_with("invalid cursor"), "{m}"),
                other => panic!("cursor {bad:?}: {other:?}"),
            }
        }
        let f = LogFilter { min_cost_usd: Some(f64::NAN), ..LogFilter::default() };
        assert!(matches!(s.delete(gw, &f).await, Err(StoreError::InvalidInput(_))));
        assert_eq!(s.count(gw).await.unwrap(), 1);
    }
}

/// Runs every conformance case against the stores made by `$fixture`, one test per case.
macro_rules! conformance {
    ($name:ident, $fixture:path) => {
        mod $name {
            use super::*;
            conformance!(@case $fixture, roundtrip_every_field);
            conformance!(@case $fixture, stored_values_are_bounded);
            conformance!(@case $fixture, a_batch_of_rows_differing_one_field_at_a_time);
            conformance!(@case $fixture, duplicate_ids_are_skipped);
            conformance!(@case $fixture, pagination_is_stable_across_equal_timestamps);
            conformance!(@case $fixture, each_filter_selects_its_records);
            conformance!(@case $fixture, delete_by_filter);
            conformance!(@case $fixture, patch_feedback_and_score);
            conformance!(@case $fixture, retention_stop_inserting);
            conformance!(@case $fixture, retention_delete_oldest);
            conformance!(@case $fixture, max_age);
            conformance!(@case $fixture, gateways_are_isolated);
            conformance!(@case $fixture, large_deletions_run_in_chunks);
            conformance!(@case $fixture, invalid_cursor_is_rejected);
            conformance!(@case $fixture, analytics_totals_groups_and_buckets);
            conformance!(@case $fixture, analytics_count_traffic_not_retention);
            conformance!(@case $fixture, analytics_concurrent_writers_sum_exactly);
        }
    };
    (@case $fixture:path, $case:ident) => {
        #[tokio::test]
        async fn $case() {
            let Some(f) = $fixture().await else { return };
            cases::$case(&*f.store, &f.gw).await;
        }
    };
}

conformance!(sqlite, sqlite_fixture);
conformance!(sqlite_partitioned, sqlite_partitioned_fixture);
conformance!(postgres, postgres_fixture);

// Backend selection and what is particular to one backend.
#[path = "log_conformance/backends.rs"]
mod backends;
