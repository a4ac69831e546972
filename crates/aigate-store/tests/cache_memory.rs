//! The memory tier's cap counts what its entries really hold: filled with several times its cap of
//! streamed answers (many small chunks, several headers, as the gateway stores them), the heap it
//! keeps stays near the cap. Measured with dhat's heap statistics (this test binary uses dhat as
//! its allocator).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use aigate_store::{CacheKey, CachedResponse, MemoryCacheStore};
use bytes::Bytes;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// A streamed chat answer with `events` SSE events, each chunk its own allocation (the costliest
/// shape an entry can have: an entry decoded from disk or Redis, or built by the gateway, shares
/// one buffer between its chunks).
fn streamed_answer(i: u32, events: usize, now: u64) -> CachedResponse {
    let chunks: Vec<Bytes> = (0..events)
        .map(|j| {
            let ev = format!(
                "data: {{\"id\":\"chatcmpl-{i}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{j}\"}}}}]}}\n\n"
            );
            Bytes::copy_from_slice(ev.as_bytes())
        })
        .collect();
    CachedResponse {
        status: 200,
        headers: ["content-type", "x-request-id", "openai-processing-ms", "openai-version", "cache-control"]
            .iter()
            .map(|k| (k.to_string(), Bytes::copy_from_slice(b"text/event-stream; charset=utf-8")))
            .collect(),
        chunks,
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
    }
}

#[test]
fn the_memory_tier_holds_about_its_cap() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let cap: u64 = 4 << 20;
    let before = dhat::HeapStats::get().curr_bytes;
    let store = MemoryCacheStore::new(cap);
    let mut offered = 0u64;
    let mut i = 0u32;
    while offered < 3 * cap {
        let entry = streamed_answer(i, 60 + (i as usize % 80), now);
        offered += entry.body_len() as u64;
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        store.put_sync("gateway", &CacheKey(key), Arc::new(entry));
        i += 1;
        if i.is_multiple_of(256) {
            store.run_pending_tasks();
        }
    }
    store.run_pending_tasks();
    let held = (dhat::HeapStats::get().curr_bytes - before) as u64;
    let stats = store.stats_sync();
    eprintln!(
        "cap {cap} B: {} entries, counted {} B, heap held {held} B ({:.2} x the cap)",
        stats.entries,
        stats.bytes,
        held as f64 / cap as f64
    );
    assert!(stats.entries > 0);
    // moka's own fixed structures (its frequency sketch, deques) come on top of the entries.
    dhat::assert!(held <= cap + cap / 10 + (256 << 10), "the memory tier holds {held} B for a cap of {cap} B");
}
