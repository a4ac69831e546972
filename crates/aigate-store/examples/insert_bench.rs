//! Log insert cost: records per second through `SqliteLogStore::insert_batch` for live-like
//! batches (one gateway, the same minute). `cargo run --release -p aigate-store --example insert_bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aigate_store::{LogRecord, LogStore, MetaValue, SqliteLogStore};

fn record(i: u64, ms: u64) -> LogRecord {
    LogRecord {
        id: format!("0193b1c2-{i:04x}-7000-8000-{i:012x}"),
        event_id: None,
        created_at_ms: ms,
        gateway: "default".into(),
        provider: "openai".into(),
        path: "chat/completions".into(),
        requested_model: Some("gpt-4o-mini".into()),
        served_model: Some("gpt-4o-mini".into()),
        status: 200,
        success: true,
        cache_status: if i.is_multiple_of(3) { "HIT".into() } else { "MISS".into() },
        stream: false,
        duration_ms: 1.0 + (i % 100) as f64 / 10.0,
        ttfb_ms: Some(0.9),
        upstream_ms: Some(0.8),
        overhead_ms: Some(0.05),
        tokens_in: Some(19),
        tokens_out: Some(14),
        cached_tokens_in: Some(0),
        reasoning_tokens: Some(0),
        cost_usd: Some(0.00001125),
        saved_usd: None,
        custom_cost: false,
        metadata: if i.is_multiple_of(2) {
            vec![("user".into(), MetaValue::String(format!("u{}", i % 20)))]
        } else {
            vec![]
        },
        user_agent: Some("OpenAI/Python 1.50.0".into()),
        error: None,
        request_body: None,
        response_body: None,
        feedback: None,
        score: None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let batch: u64 = std::env::var("BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let dir = std::env::temp_dir().join(format!("aigate-insert-bench-{}", std::process::id()));
    let store = SqliteLogStore::open(&dir.join("logs.sqlite3")).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        let recs: Vec<LogRecord> = (i..(i + batch).min(n)).map(|j| record(j, now + j / 20)).collect();
        store.insert_batch("default", &recs).await.unwrap();
        i += batch;
    }
    let el = t0.elapsed();
    println!("{n} records, batch {batch}: {:.2} us/record", el.as_secs_f64() * 1e6 / n as f64);
    let _ = std::fs::remove_dir_all(&dir);
}
