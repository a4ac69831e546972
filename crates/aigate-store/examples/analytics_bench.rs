//! Analytics benchmark: seeds 1,000,000 records spread over 30 days (in batches of 1000 through
//! `insert_batch`, oldest first, as a gateway flushes them) and times analytics queries over the
//! 30 days. Target: under 200 ms per query.
//!
//! It then times what a dashboard's logs explorer asks for: a page of 50 records, newest first
//! (`LogStore::list`), with no filter, by model, cache hits only, by a metadata value, failures of
//! the last 24 hours of the seeded range, and the second page (by the first page's cursor).
//! Target: under 300 ms per query on the median; a `PASS`/`FAIL` line per backend says.
//!
//! ```text
//! cargo run --release -p aigate-store --example analytics_bench
//! ```
//!
//! Runs on SQLite (a temporary file) and, when reachable, on PostgreSQL (tables
//! `aigate_bench_logs*`, dropped first) at `AIGATE_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; `AIGATE_SKIP_POSTGRES=1` skips it).
//! `AIGATE_BENCH_RECORDS` changes the record count. `AIGATE_BENCH_KEEP=path` creates the SQLite
//! database at `path` (which must not exist yet) and keeps it at the end, so a gateway can reuse
//! the file later (the records are in gateway `bench`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aigate_store::log::analytics::DAY_MS;
use aigate_store::{
    AnalyticsQuery, Granularity, GroupBy, LogFilter, LogPage, LogRecord, LogStore, MetaValue, PostgresLogStore,
    SqliteLogStore,
};

const BATCH: usize = 1000;
const DAYS: u64 = 30;
const BENCH_TABLE: &str = "aigate_bench_logs";
/// Median a logs-explorer page must stay under.
const LIST_TARGET_MS: f64 = 300.0;
/// Page size of the logs explorer.
const PAGE: u32 = 50;

/// A small deterministic generator (xorshift64*), so both backends get the same records.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn record(rng: &mut Rng, i: u64, ms: u64) -> LogRecord {
    const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3.1-8b"];
    const PROVIDERS: [&str; 3] = ["openai", "anthropic", "workers-ai"];
    let m = rng.below(4) as usize;
    let cache_status = match rng.below(10) {
        0 | 1 => "HIT",
        2 => "SHADOW-HIT",
        _ => "MISS",
    };
    let success = rng.below(50) != 0;
    // Log-normal-ish durations: 5 ms to a few seconds.
    let duration_ms = 5.0 * (rng.unit() * 7.0).exp();
    LogRecord {
        id: format!("bench-{i:09}"),
        event_id: None,
        created_at_ms: ms,
        gateway: String::new(),
        provider: PROVIDERS[m.min(2)].into(),
        path: "/v1/chat/completions".into(),
        requested_model: Some(MODELS[m].into()),
        served_model: Some(MODELS[m].into()),
        status: if success { 200 } else { 502 },
        success,
        cache_status: cache_status.into(),
        stream: rng.below(2) == 0,
        duration_ms,
        ttfb_ms: Some(duration_ms / 3.0),
        upstream_ms: None,
        overhead_ms: Some(0.2),
        tokens_in: Some(rng.below(4000)),
        tokens_out: Some(rng.below(1000)),
        cached_tokens_in: None,
        reasoning_tokens: None,
        cost_usd: (rng.below(20) != 0).then(|| rng.unit() * 0.01),
        saved_usd: (cache_status == "HIT").then_some(0.004),
        custom_cost: false,
        metadata: vec![("user".into(), MetaValue::String(format!("user-{}", rng.below(20))))],
        user_agent: Some("bench".into()),
        error: None,
        request_body: None,
        response_body: None,
        feedback: None,
        score: None,
        attempts: u32::from(cache_status != "HIT"),
        step: None,
        route: None,
        breaker: None,
    }
}

fn now_ms() -> u64 {
    aigate_store::Clock::system().now_ms()
}

async fn seed(store: &dyn LogStore, n: u64, start: u64, end: u64) -> Result<Duration, Box<dyn Error>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let step = (end - start) as f64 / n as f64;
    let began = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    for i in 0..n {
        batch.push(record(&mut rng, i, start + (i as f64 * step) as u64));
        if batch.len() == BATCH || i + 1 == n {
            store.insert_batch("bench", &batch).await?;
            batch.clear();
        }
        if (i + 1) % 200_000 == 0 {
            println!("  seeded {} records, {:.1} s", i + 1, began.elapsed().as_secs_f64());
        }
    }
    Ok(began.elapsed())
}

async fn queries(store: &dyn LogStore, start: u64, end: u64) -> Result<(), Box<dyn Error>> {
    let cases = [
        (Granularity::Hour, GroupBy::None),
        (Granularity::Hour, GroupBy::Model),
        (Granularity::Day, GroupBy::None),
        (Granularity::Day, GroupBy::Model),
        (Granularity::Day, GroupBy::Metadata("user".into())),
    ];
    for (granularity, group_by) in cases {
        let q = AnalyticsQuery { from_ms: start, to_ms: end, granularity, group_by: group_by.clone() };
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..7 {
            let t = Instant::now();
            last = Some(store.analytics("bench", &q).await?);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let a = last.unwrap();
        println!(
            "  30 days, {granularity:>4}, group by {:<13} {:>7.2} ms median ({:>7.2} min, {:>7.2} max) \
             [{} requests, {} buckets, {} groups, p50 {:.1} ms, p99 {:.1} ms]",
            group_by.to_string(),
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            a.totals.requests,
            a.buckets.len(),
            a.groups.len(),
            a.totals.p50_ms.unwrap_or(0.0),
            a.totals.p99_ms.unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Whether `r` is the newest-first successor of `prev` in `(created_at_ms, id)` order.
fn older(r: &LogRecord, prev: &LogRecord) -> bool {
    (r.created_at_ms, r.id.as_str()) < (prev.created_at_ms, prev.id.as_str())
}

/// How long before `end` record `r` was created, hours.
fn hours_before(end: u64, r: &LogRecord) -> f64 {
    end.saturating_sub(r.created_at_ms) as f64 / 3_600_000.0
}

/// Checks a page: not empty, at most [`PAGE`] records, newest first, every one matching `keep`, and a
/// short page the last one.
fn check_page(page: &LogPage, keep: &dyn Fn(&LogRecord) -> bool) -> Result<(), String> {
    let n = page.records.len();
    if n == 0 || n > PAGE as usize || (n < PAGE as usize && page.next_cursor.is_some()) {
        return Err(format!("{n} records, next cursor {:?}", page.next_cursor));
    }
    if let Some(r) = page.records.iter().find(|r| !keep(r)) {
        return Err(format!("record {} does not match the filter", r.id));
    }
    if page.records.windows(2).any(|w| !older(&w[1], &w[0])) {
        return Err("records not newest first".into());
    }
    Ok(())
}

/// Times the logs explorer's pages (7 runs each, like the analytics queries); returns the slowest
/// median, with its case. `end` is the end of the seeded range.
async fn list_queries(store: &dyn LogStore, end: u64) -> Result<(&'static str, f64), Box<dyn Error>> {
    let page = |f: LogFilter| LogFilter { limit: Some(PAGE), ..f };
    let first = store.list("bench", &page(LogFilter::default())).await?;
    check_page(&first, &|_| true).map_err(|e| format!("first page: {e}"))?;
    if first.next_cursor.is_none() {
        return Err("first page: no next cursor".into());
    }
    let (model, user) = ("claude-3-5-sonnet", "user-7");
    let last_of_first = first.records.last().unwrap().clone();
    let (from, to) = (end - DAY_MS, end);
    type Keep = Box<dyn Fn(&LogRecord) -> bool>;
    let cases: [(&'static str, LogFilter, Keep); 6] = [
        ("first page, no filter", page(LogFilter::default()), Box::new(|_| true)),
        (
            "model = claude-3-5-sonnet",
            page(LogFilter { model: Some(model.into()), ..LogFilter::default() }),
            Box::new(move |r| r.served_model.as_deref() == Some(model) || r.requested_model.as_deref() == Some(model)),
        ),
        (
            "cached = true",
            page(LogFilter { cached: Some(true), ..LogFilter::default() }),
            Box::new(|r| r.cache_status == "HIT"),
        ),
        (
            "metadata user = user-7",
            page(LogFilter { metadata: Some(("user".into(), MetaValue::String(user.into()))), ..LogFilter::default() }),
            Box::new(move |r| r.metadata.iter().any(|(k, v)| k == "user" && *v == MetaValue::String(user.into()))),
        ),
        (
            "success = false, last 24 h",
            page(LogFilter { success: Some(false), from_ms: Some(from), to_ms: Some(to), ..LogFilter::default() }),
            Box::new(move |r| !r.success && (from..to).contains(&r.created_at_ms)),
        ),
        (
            "second page (cursor)",
            page(LogFilter { cursor: first.next_cursor.clone(), ..LogFilter::default() }),
            Box::new(move |r| older(r, &last_of_first)),
        ),
    ];
    let mut slowest = ("", 0.0);
    for (label, filter, keep) in &cases {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..7 {
            let t = Instant::now();
            last = Some(store.list("bench", filter).await?);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let p = last.unwrap();
        let check = match check_page(&p, keep.as_ref()) {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("WRONG: {e}"),
        };
        let median = times[times.len() / 2];
        println!(
            "  list, {label:<31} {median:>7.2} ms median ({:>7.2} min, {:>7.2} max) \
             [{} records, {:.1} h to {:.1} h before the end, next cursor {}, check {check}]",
            times[0],
            times[times.len() - 1],
            p.records.len(),
            p.records.first().map_or(0.0, |r| hours_before(end, r)),
            p.records.last().map_or(0.0, |r| hours_before(end, r)),
            if p.next_cursor.is_some() { "yes" } else { "no" },
        );
        if check != "ok" {
            return Err(format!("list, {label}: {check}").into());
        }
        if median > slowest.1 {
            slowest = (*label, median);
        }
    }
    Ok(slowest)
}

/// `analyze`: a PostgreSQL client whose table statistics are brought up to date after seeding.
async fn run(
    name: &str,
    store: &dyn LogStore,
    n: u64,
    analyze: Option<&tokio_postgres::Client>,
) -> Result<(), Box<dyn Error>> {
    let end = now_ms() / DAY_MS * DAY_MS;
    let start = end - DAYS * DAY_MS;
    println!("{name}: seeding {n} records over {DAYS} days in batches of {BATCH}");
    let took = seed(store, n, start, end).await?;
    println!(
        "{name}: seeded in {:.1} s ({:.0} records/s); {} rows held",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        store.count("bench").await?
    );
    if let Some(client) = analyze {
        // A server runs autovacuum by default, which analyzes a table this size within a minute of
        // the load; a test server may run without it, and without statistics the planner scans
        // every row for a filtered page. The bench measures the server as deployed.
        client.batch_execute(&format!(r#"ANALYZE "{BENCH_TABLE}""#)).await?;
    }
    queries(store, start, end).await?;
    let slowest = list_queries(store, end).await?;
    println!(
        "{name}: logs explorer: {} (slowest median {:.2} ms {}; target < {LIST_TARGET_MS:.0} ms per query on the \
         median)",
        if slowest.1 < LIST_TARGET_MS { "PASS" } else { "FAIL" },
        slowest.1,
        slowest.0,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: u64 = std::env::var("AIGATE_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);

    let keep = std::env::var_os("AIGATE_BENCH_KEEP").filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = std::env::temp_dir().join(format!("aigate-analytics-bench-{}", std::process::id()));
    let path = match &keep {
        // Seeding into an existing file would mix its rows with these: refused.
        Some(p) if p.exists() => {
            return Err(format!("AIGATE_BENCH_KEEP: {} exists already; move it away first", p.display()).into())
        }
        Some(p) => p.clone(),
        None => dir.join("logs.sqlite3"),
    };
    let sqlite = SqliteLogStore::open(&path)?;
    let result = run("sqlite", &sqlite, n, None).await;
    drop(sqlite);
    if keep.is_some() {
        println!("sqlite: database kept at {} (gateway \"bench\")", path.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result?;

    if std::env::var("AIGATE_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let url =
        std::env::var("AIGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            let t = BENCH_TABLE;
            client
                .batch_execute(&format!(r#"DROP TABLE IF EXISTS "{t}", "{t}_counts", "{t}_rollups", "{t}_schema""#))
                .await?;
            let pg = PostgresLogStore::connect_with_table(&url, BENCH_TABLE)?;
            pg.ensure_schema().await?;
            run("postgres", &pg, n, Some(&client)).await?;
            let size: i64 =
                client.query_one(&format!(r#"SELECT pg_total_relation_size('"{t}_rollups"')"#), &[]).await?.get(0);
            let rows: i64 = client.query_one(&format!(r#"SELECT count(*) FROM "{t}_rollups""#), &[]).await?.get(0);
            println!("postgres: {rows} rollup rows, {:.1} MB", size as f64 / 1e6);
        }
        Err(e) => println!("postgres at {url} unreachable ({e}): skipped"),
    }
    Ok(())
}
