//! One conformance suite for every [`RateLimitStore`]: memory (on a manual clock) and Redis (on its
//! own clock, with short periods and real sleeps; two store instances play two replicas); then the
//! backend-specific checks (Cloudflare's example to the millisecond, key bound, randomized invariants,
//! an unreachable Redis).
//!
//! Redis tests use the server on 127.0.0.1:6379 (override with `AIGATE_TEST_REDIS_URL`; it must share
//! this host's clock, since the suite aligns to window boundaries with the local clock) and FAIL when
//! it is unreachable, unless `AIGATE_SKIP_REDIS=1`. Each test uses its own keys (process id +
//! counter), so tests run in parallel and alongside other runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aigate_store::{
    build_limit_store, Check, Clock, Decision, LimitBackend, LimitSpec, MemoryLimitStore, RateLimitStore,
    RedisLimitStore, StoreError, Technique,
};

use common::{now_ms, unique};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn redis_url() -> String {
    std::env::var("AIGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Whether Redis tests run: always, unless `AIGATE_SKIP_REDIS=1` (then they pass vacuously, loudly).
fn redis_enabled() -> bool {
    if std::env::var("AIGATE_SKIP_REDIS").is_ok_and(|v| v == "1") {
        eprintln!("AIGATE_SKIP_REDIS=1: skipping a Redis test");
        return false;
    }
    true
}

/// 2023-11-14 22:00:00 UTC: a multiple of 10 minutes (call it 12:00).
const T0: u64 = 1_700_006_400_000;
const MIN: u64 = 60_000;

/// A store under test, a second instance sharing its data (another replica), a key prefix, and the
/// clock: manual for memory, Redis's (the real one) otherwise.
struct Fixture {
    store: Arc<dyn RateLimitStore>,
    twin: Arc<dyn RateLimitStore>,
    prefix: String,
    manual: Option<Clock>,
}

impl Fixture {
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// Now, Unix ms.
    fn now(&self) -> u64 {
        match &self.manual {
            Some(c) => c.now_ms(),
            None => now_ms(),
        }
    }

    async fn advance(&self, ms: u64) {
        match &self.manual {
            Some(c) => c.advance(Duration::from_millis(ms)),
            None => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    /// Moves to the next instant `t` with `t % period == offset` (at least `offset` ms into a window).
    async fn to_phase(&self, period: u64, offset: u64) {
        let now = self.now();
        let target = (now / period) * period + offset;
        let target = if target <= now { target + period } else { target };
        self.advance(target - now).await;
    }

    /// Periods used by time-dependent cases: long on the manual clock, short on a real one.
    fn short_period(&self) -> u64 {
        if self.manual.is_some() {
            10 * MIN
        } else {
            1_000
        }
    }

    /// A period that surely does not roll over during a time-independent case (the fixed window is
    /// entered afresh when less than 2 s of it remain).
    async fn long_period(&self) -> u64 {
        let p = 3_600_000;
        if self.now() % p > p - 2_000 {
            self.to_phase(p, 10).await;
        }
        p
    }
}

fn memory_fixture() -> Option<Fixture> {
    let clock = Clock::manual(T0);
    let store = build_limit_store(&LimitBackend::Memory, &clock).unwrap();
    Some(Fixture { twin: store.clone(), store, prefix: unique("mem"), manual: Some(clock) })
}

fn redis_fixture() -> Option<Fixture> {
    if !redis_enabled() {
        return None;
    }
    let store = Arc::new(RedisLimitStore::new(&redis_url(), Duration::from_secs(2)).unwrap());
    let twin = Arc::new(RedisLimitStore::new(&redis_url(), Duration::from_secs(2)).unwrap());
    Some(Fixture { store, twin, prefix: unique("redis"), manual: None })
}

fn spec(limit: u64, period_ms: u64, technique: Technique) -> LimitSpec {
    LimitSpec::new(limit, period_ms, technique).unwrap()
}

fn allowed(d: &Decision) -> bool {
    assert_eq!(d.allowed, d.reservation.is_some(), "{d:?}");
    assert_eq!(d.remaining, d.limit.saturating_sub(d.used), "{d:?}");
    if d.allowed {
        assert_eq!(d.retry_after_ms, 0, "{d:?}");
    }
    d.allowed
}

// ---------------------------------------------------------------------------------------------
// The conformance cases
// ---------------------------------------------------------------------------------------------

mod cases {
    use super::*;

    /// Cloudflare's example at the fixture's scale: limit 10 per period, ten requests at 0.9 period
    /// and ten at 1.1 period (12:09 and 12:11 for 10 min): fixed admits all 20, sliding denies the
    /// second ten.
    pub async fn cloudflare_example(f: &Fixture) {
        let p = f.short_period();
        let fixed = spec(10, p, Technique::Fixed);
        let sliding = spec(10, p, Technique::Sliding);
        let (kf, ks) = (f.key("fixed"), f.key("sliding"));
        f.to_phase(p, p * 9 / 10).await;
        for i in 0..10 {
            assert!(allowed(&f.store.acquire(&kf, &fixed, 1).await.unwrap()), "fixed #{i} at 0.9");
            assert!(allowed(&f.store.acquire(&ks, &sliding, 1).await.unwrap()), "sliding #{i} at 0.9");
        }
        assert!(!allowed(&f.store.acquire(&kf, &fixed, 1).await.unwrap()));
        assert!(!allowed(&f.store.acquire(&ks, &sliding, 1).await.unwrap()));
        f.advance(p / 5).await;
        for i in 0..10 {
            let d = f.store.acquire(&kf, &fixed, 1).await.unwrap();
            assert!(allowed(&d), "fixed #{i} at 1.1: {d:?}");
            assert_eq!(d.used, i + 1);
            let d = f.store.acquire(&ks, &sliding, 1).await.unwrap();
            assert!(!allowed(&d), "sliding #{i} at 1.1: {d:?}");
            assert_eq!((d.used, d.remaining), (10, 0));
            assert!(d.retry_after_ms > 0 && d.retry_after_ms <= p, "{d:?}");
        }
    }

    /// Fixed windows start at multiples of the period; the counter restarts exactly there.
    pub async fn fixed_windows_are_epoch_aligned(f: &Fixture) {
        let p = f.short_period();
        let s = spec(3, p, Technique::Fixed);
        let k = f.key("k");
        f.to_phase(p, p / 10).await;
        let start = f.now() / p * p;
        for _ in 0..3 {
            let d = f.store.acquire(&k, &s, 1).await.unwrap();
            assert!(allowed(&d));
            assert_eq!(d.reservation.as_ref().unwrap().slot(), start / p);
            assert!(d.reset_ms <= p * 9 / 10 && d.reset_ms >= p * 8 / 10, "{d:?}");
        }
        let d = f.store.acquire(&k, &s, 1).await.unwrap();
        assert!(!allowed(&d));
        assert_eq!(d.retry_after_ms, d.reset_ms);
        // Still denied shortly before the boundary, admitted right after it.
        f.advance(d.reset_ms - p / 5).await;
        assert!(!allowed(&f.store.acquire(&k, &s, 1).await.unwrap()));
        f.advance(p / 5 + p / 50).await;
        let d = f.store.acquire(&k, &s, 1).await.unwrap();
        assert!(allowed(&d), "{d:?}");
        assert_eq!(d.used, 1);
        assert_eq!(d.reservation.as_ref().unwrap().slot(), start / p + 1);
        assert!(d.reset_ms > p * 9 / 10, "{d:?}");
    }

    /// Sliding: capacity comes back when the oldest usage leaves the period, as retry-after says.
    pub async fn sliding_frees_oldest_first(f: &Fixture) {
        let p = f.short_period();
        let s = spec(4, p, Technique::Sliding);
        let k = f.key("k");
        assert!(allowed(&f.store.acquire(&k, &s, 1).await.unwrap()));
        f.advance(p / 2).await;
        let d = f.store.acquire(&k, &s, 3).await.unwrap();
        assert!(allowed(&d));
        assert_eq!(d.used, 4);
        // The first unit leaves about half a period later.
        assert!(d.reset_ms <= p / 2 + p / 60 && d.reset_ms > p / 3, "{d:?}");
        let d = f.store.acquire(&k, &s, 1).await.unwrap();
        assert!(!allowed(&d));
        assert_eq!(d.retry_after_ms, d.reset_ms, "freeing the first unit is enough");
        let d = f.store.acquire(&k, &s, 2).await.unwrap();
        assert!(!allowed(&d));
        assert!(d.retry_after_ms > p * 9 / 10 && d.retry_after_ms <= p + p / 60, "{d:?}");
        f.advance(d.reset_ms + p / 50).await;
        let d = f.store.acquire(&k, &s, 1).await.unwrap();
        assert!(allowed(&d), "{d:?}");
        assert_eq!(d.used, 4);
    }

    /// 200 concurrent acquisitions of 1 against a limit of 50, spread over two instances: exactly 50
    /// pass, for both techniques.
    pub async fn exactly_the_limit_under_concurrency(f: &Fixture) {
        let p = f.long_period().await;
        for technique in [Technique::Fixed, Technique::Sliding] {
            let s = spec(50, p, technique);
            let k = Arc::new(f.key(technique.as_str()));
            let mut tasks = Vec::new();
            for i in 0..200 {
                let store = if i % 2 == 0 { f.store.clone() } else { f.twin.clone() };
                let k = k.clone();
                tasks.push(tokio::spawn(async move { store.acquire(&k, &s, 1).await.unwrap().allowed }));
            }
            let mut admitted = 0;
            for t in tasks {
                admitted += u32::from(t.await.unwrap());
            }
            assert_eq!(admitted, 50, "{technique}");
            let d = f.twin.peek(&k, &s).await.unwrap();
            assert_eq!((d.used, d.remaining, d.allowed), (50, 0, false), "{technique}");
        }
    }

    /// Token weights: reserve an estimate, settle to the actual amount (below or above).
    pub async fn weighted_reserve_and_settle(f: &Fixture) {
        let p = f.long_period().await;
        for technique in [Technique::Fixed, Technique::Sliding] {
            let s = spec(5_000, p, technique);
            let k = f.key(technique.as_str());
            let d = f.store.acquire(&k, &s, 1_000).await.unwrap();
            assert!(allowed(&d));
            assert_eq!((d.used, d.remaining), (1_000, 4_000));
            let r = d.reservation.unwrap();
            assert_eq!((r.key(), r.amount(), *r.spec()), (k.as_str(), 1_000, s));
            // Another replica settles it to 200: 800 freed.
            f.twin.settle(&r, 200).await.unwrap();
            assert_eq!(f.store.peek(&k, &s).await.unwrap().used, 200);
            let d = f.store.acquire(&k, &s, 4_800).await.unwrap();
            assert!(allowed(&d));
            assert_eq!((d.used, d.remaining), (5_000, 0));
            assert!(!allowed(&f.store.acquire(&k, &s, 1).await.unwrap()));
            // A settlement above the reservation counts the excess, even past the limit.
            f.store.settle(&d.reservation.unwrap(), 5_100).await.unwrap();
            let d = f.store.peek(&k, &s).await.unwrap();
            assert_eq!((d.used, d.remaining, d.allowed), (5_300, 0, false), "{technique}");
            // A zero reservation (estimate unknown) settled later.
            let k0 = f.key(&format!("{technique}-zero"));
            let r0 = f.store.acquire(&k0, &s, 0).await.unwrap().reservation.unwrap();
            f.store.settle(&r0, 42).await.unwrap();
            assert_eq!(f.store.peek(&k0, &s).await.unwrap().used, 42);
        }
    }

    /// Settling after the reservation's window is over changes nothing.
    pub async fn settle_after_expiry_is_a_noop(f: &Fixture) {
        let p = f.short_period();
        for technique in [Technique::Fixed, Technique::Sliding] {
            let s = spec(100, p, technique);
            let k = f.key(technique.as_str());
            f.to_phase(p, p / 10).await;
            let r = f.store.acquire(&k, &s, 60).await.unwrap().reservation.unwrap();
            // Past the window (fixed) / past the period plus one sub-window (sliding).
            f.advance(p + p / 60 + p / 20).await;
            assert!(allowed(&f.store.acquire(&k, &s, 10).await.unwrap()));
            f.store.settle(&r, 1_000).await.unwrap();
            f.twin.settle(&r, 0).await.unwrap();
            let d = f.store.peek(&k, &s).await.unwrap();
            assert_eq!(d.used, 10, "{technique}: {d:?}");
        }
    }

    /// A denied acquisition consumes nothing; peeking consumes nothing.
    pub async fn deny_changes_nothing(f: &Fixture) {
        let p = f.long_period().await;
        for technique in [Technique::Fixed, Technique::Sliding] {
            let s = spec(10, p, technique);
            let k = f.key(technique.as_str());
            assert!(allowed(&f.store.acquire(&k, &s, 7).await.unwrap()));
            for _ in 0..3 {
                let d = f.store.acquire(&k, &s, 5).await.unwrap();
                assert!(!allowed(&d));
                assert_eq!((d.used, d.remaining), (7, 3));
                assert!(d.retry_after_ms > 0);
                let d = f.twin.peek(&k, &s).await.unwrap();
                assert_eq!((d.used, d.remaining, d.allowed), (7, 3, true));
                assert!(d.reservation.is_none());
            }
            // Larger than the whole limit: never fits, retry after a full period.
            let d = f.store.acquire(&k, &s, 11).await.unwrap();
            assert!(!allowed(&d));
            assert_eq!(d.retry_after_ms, p);
            // A denied first request does not create the key.
            let fresh = f.key(&format!("{technique}-fresh"));
            assert!(!allowed(&f.store.acquire(&fresh, &s, 11).await.unwrap()));
            assert_eq!(f.store.peek(&fresh, &s).await.unwrap().used, 0);
            let d = f.store.acquire(&k, &s, 3).await.unwrap();
            assert!(allowed(&d));
            assert_eq!((d.used, d.remaining), (10, 0));
        }
    }

    /// All the rules of a request at once: all reserved, or none when one refuses; settled
    /// together by another replica.
    pub async fn all_rules_or_none(f: &Fixture) {
        let p = f.long_period().await;
        let (fixed, sliding) = (spec(10, p, Technique::Fixed), spec(100, p, Technique::Sliding));
        let (ka, kb) = (f.key("a"), f.key("b"));
        let checks =
            |ca: u64, cb: u64| [Check { key: &ka, spec: fixed, cost: ca }, Check { key: &kb, spec: sliding, cost: cb }];
        let used =
            || async { (f.twin.peek(&ka, &fixed).await.unwrap().used, f.twin.peek(&kb, &sliding).await.unwrap().used) };
        let ds = f.store.acquire_all(&checks(4, 30)).await.unwrap();
        assert!(ds.len() == 2 && ds.iter().all(allowed), "{ds:?}");
        assert_eq!((ds[0].used, ds[1].used), (4, 30));
        // The second refuses: the first reserves nothing either.
        let ds = f.twin.acquire_all(&checks(4, 71)).await.unwrap();
        assert_eq!(ds.len(), 2, "{ds:?}");
        assert!(ds[0].allowed && ds[0].reservation.is_none(), "{ds:?}");
        assert!(!ds[1].allowed && ds[1].reservation.is_none() && ds[1].used == 30, "{ds:?}");
        assert_eq!(used().await, (4, 30));
        // The first refuses: the later rules are not checked.
        let ds = f.store.acquire_all(&checks(7, 1)).await.unwrap();
        assert!(ds.len() == 1 && !allowed(&ds[0]), "{ds:?}");
        assert_eq!(used().await, (4, 30));
        // Settled together, by another replica, below and above the reservations.
        let ds = f.store.acquire_all(&checks(6, 70)).await.unwrap();
        assert!(ds.iter().all(allowed), "{ds:?}");
        let settle: Vec<_> = ds.iter().zip([1, 75]).map(|(d, a)| (d.reservation.clone().unwrap(), a)).collect();
        f.twin.settle_all(&settle).await.unwrap();
        assert_eq!(used().await, (5, 105));
        assert!(f.store.acquire_all(&[]).await.unwrap().is_empty());
        f.store.settle_all(&[]).await.unwrap();
    }

    /// Keys and rules are independent: another key, or the same key under another period or
    /// technique, has its own count.
    pub async fn keys_and_rules_are_independent(f: &Fixture) {
        let p = f.long_period().await;
        let a = spec(2, p, Technique::Fixed);
        let (k1, k2) = (f.key("one"), f.key("two"));
        assert!(allowed(&f.store.acquire(&k1, &a, 2).await.unwrap()));
        assert!(!allowed(&f.store.acquire(&k1, &a, 1).await.unwrap()));
        assert!(allowed(&f.store.acquire(&k2, &a, 2).await.unwrap()));
        let b = spec(2, p / 2, Technique::Fixed);
        let c = spec(2, p, Technique::Sliding);
        assert_eq!(f.store.peek(&k1, &b).await.unwrap().used, 0);
        assert_eq!(f.store.peek(&k1, &c).await.unwrap().used, 0);
        // A zero limit denies every positive cost.
        let z = spec(0, p, Technique::Sliding);
        assert!(!allowed(&f.store.acquire(&k1, &z, 1).await.unwrap()));
    }
}

/// Runs every conformance case against the stores made by `$fixture`, one test per case.
macro_rules! conformance {
    ($name:ident, $fixture:path) => {
        mod $name {
            use super::*;
            conformance!(@case $fixture, cloudflare_example);
            conformance!(@case $fixture, fixed_windows_are_epoch_aligned);
            conformance!(@case $fixture, sliding_frees_oldest_first);
            conformance!(@case $fixture, exactly_the_limit_under_concurrency);
            conformance!(@case $fixture, weighted_reserve_and_settle);
            conformance!(@case $fixture, settle_after_expiry_is_a_noop);
            conformance!(@case $fixture, deny_changes_nothing);
            conformance!(@case $fixture, keys_and_rules_are_independent);
            conformance!(@case $fixture, all_rules_or_none);
        }
    };
    (@case $fixture:path, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some(f) = $fixture() else { return };
            cases::$case(&f).await;
        }
    };
}

conformance!(memory, memory_fixture);
conformance!(redis, redis_fixture);

// ---------------------------------------------------------------------------------------------
// Memory: exact figures on the manual clock, bounds, invariants
// ---------------------------------------------------------------------------------------------

fn manual_store(max_keys: usize) -> (MemoryLimitStore, Clock) {
    let clock = Clock::manual(T0);
    (MemoryLimitStore::new(max_keys).with_clock(clock.clone()), clock)
}

/// Cloudflare's example to the millisecond: 10 per 10 min, ten requests at 12:09, ten at 12:11.
#[test]
fn cloudflare_example_exact_figures() {
    let (s, clock) = manual_store(100);
    let fixed = spec(10, 10 * MIN, Technique::Fixed);
    let sliding = spec(10, 10 * MIN, Technique::Sliding);
    clock.set_ms(T0 + 9 * MIN);
    for i in 1..=10 {
        let d = s.acquire_sync("f", &fixed, 1);
        assert!(d.allowed && d.used == i && d.reset_ms == MIN, "{d:?}");
        let d = s.acquire_sync("s", &sliding, 1);
        // The 12:09:00-12:09:10 sub-window stops counting at 12:19:09.999 + 1 ms.
        assert!(d.allowed && d.used == i && d.reset_ms == 10 * MIN + 10_000 - 1, "{d:?}");
    }
    let d = s.acquire_sync("f", &fixed, 1);
    assert!(!d.allowed && d.retry_after_ms == MIN && d.reset_ms == MIN, "{d:?}");

    clock.set_ms(T0 + 11 * MIN);
    for i in 1..=10 {
        let d = s.acquire_sync("f", &fixed, 1);
        assert!(d.allowed && d.used == i && d.reset_ms == 9 * MIN, "{d:?}");
        assert_eq!(d.reservation.unwrap().slot(), (T0 + 10 * MIN) / (10 * MIN));
        let d = s.acquire_sync("s", &sliding, 1);
        let left = 8 * MIN + 10_000 - 1;
        assert!(!d.allowed && d.used == 10 && d.reset_ms == left && d.retry_after_ms == left, "{d:?}");
    }
    // One ms before the 12:09 sub-window leaves: still denied; at that ms: admitted.
    clock.set_ms(T0 + 19 * MIN + 10_000 - 2);
    let d = s.acquire_sync("s", &sliding, 1);
    assert!(!d.allowed && d.retry_after_ms == 1, "{d:?}");
    clock.set_ms(T0 + 19 * MIN + 10_000 - 1);
    let d = s.acquire_sync("s", &sliding, 10);
    assert!(d.allowed && d.used == 10, "{d:?}");
}

/// Retry-after walks sub-windows oldest first until enough capacity is freed.
#[test]
fn sliding_retry_after_walks_sub_windows() {
    let (s, clock) = manual_store(100);
    let sp = spec(10, 60_000, Technique::Sliding); // 60 sub-windows of 1 s
    for (at, cost) in [(0u64, 3u64), (5_000, 3), (20_000, 4)] {
        clock.set_ms(T0 + at);
        assert!(s.acquire_sync("k", &sp, cost).allowed);
    }
    clock.set_ms(T0 + 30_000);
    // Leaves at: 0 s -> 60.999 s, 5 s -> 65.999 s, 20 s -> 80.999 s (each + 1 s - 1 ms).
    let d = s.acquire_sync("k", &sp, 2);
    assert_eq!((d.allowed, d.reset_ms, d.retry_after_ms), (false, 30_999, 30_999));
    let d = s.acquire_sync("k", &sp, 5);
    assert_eq!((d.allowed, d.retry_after_ms), (false, 35_999));
    let d = s.acquire_sync("k", &sp, 10);
    assert_eq!((d.allowed, d.retry_after_ms), (false, 50_999));
    let d = s.acquire_sync("k", &sp, 11);
    assert_eq!((d.allowed, d.retry_after_ms), (false, 60_000));
    let d = s.peek_sync("k", &sp);
    assert_eq!((d.allowed, d.used, d.retry_after_ms), (false, 10, 30_999));
}

/// Randomized invariant against a brute-force log: sliding never admits more than `limit` in any
/// period, and refuses only when usage in the period plus one sub-window would exceed it.
#[test]
fn sliding_invariants_randomized() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for round in 0..40 {
        let period = [7u64, 60, 100, 1_001, 60_000][round % 5];
        let sp = spec(1 + rnd(20), period, Technique::Sliding);
        let sub = sp.sub_window_ms();
        let (s, clock) = manual_store(10);
        let mut log: Vec<(u64, u64)> = Vec::new(); // (time, cost) admitted
        let mut now = T0 + rnd(period);
        for _ in 0..400 {
            now += rnd(period / 5 + 2);
            clock.set_ms(now);
            let cost = rnd(4);
            let in_period: u64 = log.iter().filter(|(t, _)| *t + period > now).map(|(_, c)| c).sum();
            let in_wider: u64 = log.iter().filter(|(t, _)| *t + period + sub > now).map(|(_, c)| c).sum();
            let d = s.acquire_sync("k", &sp, cost);
            if d.allowed {
                log.push((now, cost));
                assert!(in_period + cost <= sp.limit, "admitted over the limit: {d:?}");
            } else {
                assert!(in_wider + cost > sp.limit, "refused without cause: {in_wider} + {cost}, {d:?}");
                // Retry-after is enough: at that time the request fits.
                if cost <= sp.limit {
                    let at = now + d.retry_after_ms;
                    let counted = |t: u64| (t / sub + 1) * sub + period - 1 > at;
                    let left: u64 = log.iter().filter(|(t, _)| counted(*t)).map(|(_, c)| c).sum();
                    assert!(left + cost <= sp.limit, "retry-after too short: {d:?}");
                }
            }
            assert!(d.used <= sp.limit);
        }
    }
}

/// The key bound holds: expired keys go first, then the least recently used; the rest keep counting.
#[test]
fn memory_is_bounded_by_keys() {
    // Under 256 keys: one shard, so the bound is exact (larger stores bound each shard).
    let (s, clock) = manual_store(200);
    assert_eq!(s.max_keys(), 200);
    assert_eq!(MemoryLimitStore::new(100_000).max_keys(), 99_968);
    let short = spec(5, 1_000, Technique::Fixed);
    let long = spec(5, 10 * MIN, Technique::Sliding);
    for i in 0..200 {
        assert!(s.acquire_sync(&format!("short{i}"), &short, 1).allowed);
    }
    assert_eq!(s.len(), 200);
    // The short windows are over: new keys replace them without forgetting any live usage.
    clock.advance(Duration::from_millis(1_000));
    for i in 0..200 {
        clock.advance(Duration::from_millis(1));
        assert!(s.acquire_sync(&format!("long{i}"), &long, 5).allowed);
    }
    assert_eq!((s.len(), s.evictions()), (200, 0));
    // Full of live keys: the least recently used are forgotten, never more than the bound held.
    clock.advance(Duration::from_millis(1));
    assert!(!s.acquire_sync("long0", &long, 1).allowed, "a refused key counts as used");
    for i in 0..50 {
        clock.advance(Duration::from_millis(1));
        assert!(s.acquire_sync(&format!("new{i}"), &long, 1).allowed);
        assert!(s.len() <= 200);
    }
    assert!(s.evictions() >= 50, "{}", s.evictions());
    assert!(!s.acquire_sync("long0", &long, 1).allowed, "recently refused key kept its usage");
    assert!(!s.acquire_sync("long199", &long, 1).allowed, "recent keys keep their usage");
    assert_eq!(s.peek_sync("long1", &long).used, 0, "the least recently used key was forgotten");
    clock.advance(Duration::from_millis(11 * MIN));
    let n = s.len();
    assert_eq!(s.purge_expired(), n);
    assert!(s.is_empty());
}

/// A clock stepping backwards or far forwards never panics and never over-admits.
#[test]
fn memory_clock_jumps() {
    let (s, clock) = manual_store(10);
    for technique in [Technique::Fixed, Technique::Sliding] {
        let sp = spec(3, 60_000, technique);
        let k = technique.as_str();
        assert!(s.acquire_sync(k, &sp, 3).allowed);
        clock.set_ms(clock.now_ms() - 5_000);
        assert!(!s.acquire_sync(k, &sp, 1).allowed || technique == Technique::Fixed);
        clock.set_ms(clock.now_ms() - 10 * MIN);
        let _ = s.acquire_sync(k, &sp, 1);
        let _ = s.peek_sync(k, &sp);
        clock.advance(Duration::from_millis(100 * MIN));
        assert!(s.acquire_sync(k, &sp, 3).allowed);
        assert!(!s.acquire_sync(k, &sp, 1).allowed);
        clock.set_ms(T0);
    }
    // Near the epoch and with a 1 ms period.
    let (s, clock) = manual_store(10);
    clock.set_ms(0);
    let sp = spec(1, 1, Technique::Sliding);
    assert!(s.acquire_sync("k", &sp, 1).allowed);
    assert!(!s.acquire_sync("k", &sp, 1).allowed);
    clock.set_ms(1);
    assert!(s.acquire_sync("k", &sp, 1).allowed);
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_down_fails_fast() {
    let s = RedisLimitStore::new("redis://127.0.0.1:1", Duration::from_millis(250)).expect("new never connects");
    let sp = spec(10, 60_000, Technique::Sliding);
    let r = MemoryLimitStore::new(10).acquire_sync("k", &sp, 1).reservation.unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let err = s.acquire("k", &sp, 1).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_) | StoreError::Timeout), "{err:?}");
        assert!(s.peek("k", &sp).await.is_err());
        assert!(s.settle(&r, 2).await.is_err());
        assert!(t.elapsed() < Duration::from_millis(900), "took {:?}", t.elapsed());
    }
    // Through the builder (production timeout), also fast.
    let s = build_limit_store(&LimitBackend::Redis { url: "redis://127.0.0.1:1".into() }, &Clock::system()).unwrap();
    assert_eq!(s.kind(), "redis");
    let t = Instant::now();
    assert!(s.acquire("k", &sp, 1).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    assert!(RedisLimitStore::new("not a url", Duration::from_millis(250)).is_err());
}

/// The layout in Redis: one hash per rule and key, expiring when nothing in it counts any more.
#[tokio::test]
async fn redis_keys_expire() {
    let Some(f) = redis_fixture() else { return };
    let k = f.key("ttl");
    let client = ::redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for technique in [Technique::Fixed, Technique::Sliding] {
        let sp = spec(10, 60_000, technique);
        f.store.acquire(&k, &sp, 1).await.unwrap();
        let rkey = aigate_store::limit::redis::redis_limit_key(&k, &sp);
        let pttl: i64 = ::redis::cmd("PTTL").arg(&rkey).query_async(&mut conn).await.unwrap();
        assert!(pttl > 0 && pttl <= 61_000, "{technique}: {pttl}");
        let _: () = ::redis::cmd("DEL").arg(&rkey).query_async(&mut conn).await.unwrap();
    }
}

#[test]
fn builder_picks_the_backend() {
    let build = |spec: &str| build_limit_store(&LimitBackend::parse(spec).unwrap(), &Clock::system()).unwrap().kind();
    assert_eq!(build("memory"), "memory");
    assert_eq!(build(" Memory "), "memory");
    assert_eq!(build("rediss://h:6380"), "redis");
    let err = LimitBackend::parse("memcached://x").unwrap_err();
    assert!(err.contains("memcached://x") && err.contains("redis://"), "{err}");
    let bad = LimitBackend::Redis { url: "redis://h:notaport".into() };
    assert!(build_limit_store(&bad, &Clock::system()).is_err());
}
