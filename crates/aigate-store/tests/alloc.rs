//! The memory tier's hit path allocates nothing per request: a lookup is a hash, a probe and an
//! `Arc` clone. moka batches its bookkeeping (recency, expiry) and occasionally allocates while
//! applying a batch: about 8 blocks per 1,000 reads were measured, so the test bounds the amortised
//! figure at 1 block per 100 lookups. Measured with dhat's heap statistics (this test binary uses
//! dhat as its allocator).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use aigate_store::{CacheKey, CachedResponse, MemoryCacheStore, TieredCache};
use bytes::Bytes;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn memory_tier_hit_allocates_nothing() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let now = aigate_store::Clock::system().now_ms();
    let tiered = TieredCache::new(MemoryCacheStore::new(64 << 20), None);
    let key = CacheKey([42u8; 32]);
    let entry = Arc::new(CachedResponse {
        status: 200,
        headers: vec![("content-type".into(), Bytes::from_static(b"application/json"))],
        chunks: vec![Bytes::from(vec![b'x'; 700])],
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
    });
    tiered.memory().put_sync("gw", &key, entry);
    // Warm up: the first lookups may allocate moka's internal read buffers.
    for _ in 0..1000 {
        assert!(tiered.memory_get(&key).is_some());
    }
    let before = dhat::HeapStats::get();
    for _ in 0..10_000 {
        let hit = tiered.memory_get(&key).unwrap();
        assert_eq!(hit.status, 200);
    }
    let after = dhat::HeapStats::get();
    let blocks = after.total_blocks - before.total_blocks;
    eprintln!("{blocks} heap blocks allocated over 10,000 memory-tier hits");
    dhat::assert!(blocks <= 100, "{blocks} blocks for 10,000 hits: the hit path allocates per request");
}
