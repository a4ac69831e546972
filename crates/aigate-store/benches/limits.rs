//! Cost of one rate-limit check-and-reserve.
//!
//! Memory store: `acquire_sync` (the store's own work: clock read, shard lock, counter update,
//! reservation) and the `RateLimitStore::acquire` future polled once (adds the boxed future), for
//! fixed and sliding windows, on one hot key and spread over 10,000 keys. Redis: one `acquire` round
//! trip (EVALSHA) to 127.0.0.1:6379 (or `AIGATE_TEST_REDIS_URL`), skipped when Redis is unreachable.
//!
//! `cargo bench -p aigate-store --bench limits -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aigate_store::{LimitSpec, MemoryLimitStore, RateLimitStore, RedisLimitStore, Technique};
use criterion::{criterion_group, criterion_main, Criterion};

/// Polls a future that completes without waiting (the memory store's) to its output.
fn poll_ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn specs() -> [(&'static str, LimitSpec); 2] {
    // A limit that is never reached, so every call takes the admit path (the common one).
    let spec = |technique| LimitSpec { limit: u64::MAX / 2, period_ms: 60_000, technique };
    [("fixed", spec(Technique::Fixed)), ("sliding", spec(Technique::Sliding))]
}

fn memory(c: &mut Criterion) {
    let keys: Vec<String> = (0..10_000).map(|i| format!("gw:prod:rule:per-user:user={i}")).collect();
    let mut g = c.benchmark_group("memory_acquire");
    for (name, spec) in specs() {
        let store = MemoryLimitStore::new(100_000);
        g.bench_function(format!("{name}/one_key"), |b| {
            b.iter(|| black_box(store.acquire_sync(black_box("gw:prod:rule:global"), &spec, 1)))
        });
        let mut i = 0usize;
        g.bench_function(format!("{name}/10k_keys"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(store.acquire_sync(&keys[i], &spec, 1))
            })
        });
        let dyn_store: &dyn RateLimitStore = &store;
        g.bench_function(format!("{name}/one_key_via_trait"), |b| {
            b.iter(|| black_box(poll_ready(dyn_store.acquire(black_box("gw:prod:rule:global"), &spec, 1)).unwrap()))
        });
    }
    // A refused check (limit reached): no reservation.
    let store = MemoryLimitStore::new(1_000);
    let full = LimitSpec { limit: 1, period_ms: 60_000, technique: Technique::Sliding };
    store.acquire_sync("full", &full, 1);
    g.bench_function("sliding/denied", |b| b.iter(|| black_box(store.acquire_sync("full", &full, 1))));
    g.finish();
}

fn redis(c: &mut Criterion) {
    let url = std::env::var("AIGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = RedisLimitStore::new(&url, Duration::from_secs(1)).unwrap();
    let probe = LimitSpec { limit: 1, period_ms: 1_000, technique: Technique::Fixed };
    if let Err(e) = rt.block_on(store.peek("aigate-bench:probe", &probe)) {
        eprintln!("redis unreachable ({e}): skipping the Redis benchmark");
        return;
    }
    let mut g = c.benchmark_group("redis_acquire");
    for (name, spec) in specs() {
        let key = format!("aigate-bench:{}:{name}", std::process::id());
        g.bench_function(format!("{name}/one_key"), |b| {
            b.iter(|| black_box(rt.block_on(store.acquire(&key, &spec, 1)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, memory, redis);
criterion_main!(benches);
