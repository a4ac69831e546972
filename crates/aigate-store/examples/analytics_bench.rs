//! Analytics benchmark: seeds 1,000,000 records spread over 30 days (in batches of 1000 through
//! `insert_batch`, oldest first, as a gateway flushes them) and times analytics queries over the
//! 30 days. Target: under 200 ms per query.
//!
//! ```text
//! cargo run --release -p aigate-store --example analytics_bench
//! ```
//!
//! Runs on SQLite (a temporary file) and, when reachable, on PostgreSQL (tables
//! `aigate_bench_logs*`, dropped first) at `AIGATE_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; `AIGATE_SKIP_POSTGRES=1` skips it).
//! `AIGATE_BENCH_RECORDS` changes the record count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error;
use std::time::{Duration, Instant};

use aigate_store::log::analytics::DAY_MS;
use aigate_store::{
    AnalyticsQuery, Granularity, GroupBy, LogRecord, LogStore, MetaValue, PostgresLogStore, SqliteLogStore,
};

const BATCH: usize = 1000;
const DAYS: u64 = 30;
const BENCH_TABLE: &str = "aigate_bench_logs";

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

async fn run(name: &str, store: &dyn LogStore, n: u64) -> Result<(), Box<dyn Error>> {
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
    queries(store, start, end).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: u64 = std::env::var("AIGATE_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);

    let dir = std::env::temp_dir().join(format!("aigate-analytics-bench-{}", std::process::id()));
    let path = dir.join("logs.sqlite3");
    let sqlite = SqliteLogStore::open(&path)?;
    let result = run("sqlite", &sqlite, n).await;
    drop(sqlite);
    let _ = std::fs::remove_dir_all(&dir);
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
            run("postgres", &pg, n).await?;
            let size: i64 =
                client.query_one(&format!(r#"SELECT pg_total_relation_size('"{t}_rollups"')"#), &[]).await?.get(0);
            let rows: i64 = client.query_one(&format!(r#"SELECT count(*) FROM "{t}_rollups""#), &[]).await?.get(0);
            println!("postgres: {rows} rollup rows, {:.1} MB", size as f64 / 1e6);
        }
        Err(e) => println!("postgres at {url} unreachable ({e}): skipped"),
    }
    Ok(())
}
