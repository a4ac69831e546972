//! How the SQLite log table's layout changes the cost of an insert: 200,000 live-like rows in
//! transactions of 1024 (as the log writer stores them; `BATCH` to change), raw rusqlite, one thread.
//!
//! `cargo run --release -p aigate-store --example schema_exp -- VARIANT`, with
//! - VARIANT 0: the schema-2 layout (unique (gateway, id), time index, event index on every row);
//!   1: the same with a 16-byte BLOB id; 2: the schema-3 layout (the event index partial);
//!   3: as 2 without the time index; 4: as 2 in a `WITHOUT ROWID` table keyed by (gateway, id);
//!   5: as 2 without the id index, the time index unique; 6: the schema-5 layout (`WITHOUT ROWID`,
//!   keyed by (gateway, created_at_ms, id), no other index but the partial event index); 7: as 5
//!   with a BLOB id; 8: as 6 with a BLOB id; 9: the schema-6 layout (a rowid table keyed by an
//!   integer `k` = time and slot, no other index but the partial event index);
//! - `PAGE` (page size, default 4096), `CKPT` (wal_autocheckpoint pages, default 1000), `JM`
//!   (journal mode, default WAL) and `BODIES=1` (312 + 608-byte bodies, as bench/run.sh sends).
//!
//! What it showed (docs/benchmarks.md): the page size matters most (4 KiB -> 32 KiB about halves
//! the cost with bodies), then the event index on rows without an event id, then the number of
//! b-trees a row goes into (variant 6 costs 1.8 us a record where 2 costs 2.6-2.9; a BLOB id adds
//! nothing once the id is not a key's first text column; rows in multi-row `VALUES` cost more),
//! then the kind of key: variant 9, one integer key, costs 1.35 us where 6 costs 1.9 (another VM).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use rusqlite::{params, Connection};
use std::time::Instant;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let variant: u32 = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(2);
    let page: u32 = env_or("PAGE", 4096);
    let ckpt: u32 = env_or("CKPT", 1000);
    let cache: i64 = env_or("CACHE", -2000);
    let batch: u64 = env_or("BATCH", 1024);
    let jm: String = env_or("JM", "WAL".to_owned());
    let bodies = std::env::var("BODIES").is_ok();
    let n: u64 = 200_000;
    let dir = std::env::temp_dir().join(format!("aigate-schema-exp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut conn = Connection::open(dir.join("x.db")).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA page_size={page}; PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode={jm}; \
         PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint={ckpt}; PRAGMA cache_size={cache};"
    ))
    .unwrap();
    let id_type = if matches!(variant, 1 | 7 | 8) { "BLOB" } else { "TEXT" };
    // Variant 4: the table keyed by (gateway, id), WITHOUT ROWID (no separate unique index);
    // 6: keyed by (gateway, created_at_ms, id), WITHOUT ROWID.
    // 9: a rowid table keyed by an integer k = gateway | ms | slot (schema 6).
    let (key, table_opts) = match variant {
        4 => (", PRIMARY KEY (gateway, id)", " WITHOUT ROWID"),
        6 | 8 => (", PRIMARY KEY (gateway, created_at_ms, id)", " WITHOUT ROWID"),
        9 => (", k INTEGER PRIMARY KEY", ""),
        _ => ("", ""),
    };
    conn.execute_batch(&format!(
        "CREATE TABLE logs (gateway TEXT NOT NULL, id {id_type} NOT NULL, event_id TEXT, created_at_ms INTEGER NOT NULL, \
         provider TEXT NOT NULL, path TEXT NOT NULL, requested_model TEXT, served_model TEXT, status INTEGER NOT NULL, \
         success INTEGER NOT NULL, cache_status TEXT NOT NULL, stream INTEGER NOT NULL, duration_ms REAL NOT NULL, \
         ttfb_ms REAL, upstream_ms REAL, overhead_ms REAL, tokens_in INTEGER, tokens_out INTEGER, \
         cached_tokens_in INTEGER, reasoning_tokens INTEGER, cost_usd REAL, saved_usd REAL, custom_cost INTEGER NOT NULL, \
         metadata TEXT, user_agent TEXT, error TEXT, feedback INTEGER, score REAL, request_body BLOB, response_body BLOB{key}){table_opts};"
    ))
    .unwrap();
    if variant < 4 {
        conn.execute_batch("CREATE UNIQUE INDEX logs_gateway_id ON logs(gateway, id);").unwrap();
    }
    conn.execute_batch("SELECT 1;").unwrap();
    let time_index = "CREATE INDEX t ON logs(gateway, created_at_ms, id);";
    match variant {
        0 | 1 => conn
            .execute_batch(&format!("{time_index} CREATE INDEX e ON logs(gateway, event_id, created_at_ms, id);"))
            .unwrap(),
        2 | 4 => conn
            .execute_batch(&format!(
                "{time_index} CREATE INDEX e ON logs(gateway, event_id, created_at_ms, id) WHERE event_id IS NOT NULL;"
            ))
            .unwrap(),
        // 5, 7: no (gateway, id) index; the time index is unique.
        5 | 7 => conn
            .execute_batch(
                "CREATE UNIQUE INDEX t ON logs(gateway, created_at_ms, id); \
                 CREATE INDEX e ON logs(gateway, event_id, created_at_ms, id) WHERE event_id IS NOT NULL;",
            )
            .unwrap(),
        6 | 8 => conn
            .execute_batch("CREATE INDEX e ON logs(gateway, event_id, created_at_ms, id) WHERE event_id IS NOT NULL;")
            .unwrap(),
        _ => conn
            .execute_batch("CREATE INDEX e ON logs(gateway, event_id, created_at_ms, id) WHERE event_id IS NOT NULL;")
            .unwrap(),
    }
    let req = vec![b'r'; 312];
    let resp: Vec<u8> = (0..608).map(|i| b"abcdefghijklmnopqrstuvwxyz {}\":,"[i % 32]).collect();
    let base = 1_764_000_000_000u64;
    let t0 = Instant::now();
    let mut i = 0u64;
    let conflict = match variant {
        5..=8 => "(gateway, created_at_ms, id)",
        9 => "(k)",
        _ => "(gateway, id)",
    };
    let k_param = if variant == 9 { ", ?31" } else { "" };
    while i < n {
        let tx = conn.transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached(&format!(
                    "INSERT INTO logs VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,\
                     ?21,?22,?23,?24,?25,?26,?27,?28,?29,?30{k_param}) ON CONFLICT {conflict} DO NOTHING",
                ))
                .unwrap();
            for j in i..i + batch {
                let ms = base + j / 20;
                let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
                let u = uuid::Uuid::new_v7(ts);
                let id = if matches!(variant, 1 | 7 | 8) {
                    rusqlite::types::Value::Blob(u.as_bytes().to_vec())
                } else {
                    rusqlite::types::Value::Text(u.to_string())
                };
                let (rq, rs) = if bodies { (Some(&req[..]), Some(&resp[..])) } else { (None, None) };
                let values: &[&dyn rusqlite::ToSql] = params![
                    "default",
                    id,
                    None::<String>,
                    ms as i64,
                    "openai",
                    "chat/completions",
                    "gpt-4o-mini",
                    "gpt-4o-mini-2024-07-18",
                    200,
                    true,
                    "MISS",
                    false,
                    1.2,
                    0.9,
                    0.8,
                    0.05,
                    19,
                    14,
                    0,
                    0,
                    0.0000112,
                    None::<f64>,
                    false,
                    None::<String>,
                    None::<String>,
                    None::<String>,
                    None::<i64>,
                    None::<f64>,
                    rq,
                    rs
                ];
                for (i, v) in values.iter().enumerate() {
                    st.raw_bind_parameter(i + 1, v).unwrap();
                }
                if variant == 9 {
                    st.raw_bind_parameter(31, ((ms << 12) | (j % 20)) as i64).unwrap();
                }
                st.raw_execute().unwrap();
            }
        }
        tx.commit().unwrap();
        i += batch;
    }
    let el = t0.elapsed();
    println!(
        "variant {variant}, page {page}, journal {jm}, autocheckpoint {ckpt}, bodies {bodies}: {:.2} us/record",
        el.as_secs_f64() * 1e6 / n as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
