//! One conformance suite for every [`CacheStore`]: memory, disk, Redis, and the tiered cache over
//! each; then the backend-specific checks (bounds, persistence, failure behaviour, compression).
//!
//! Redis tests use the server on 127.0.0.1:6379 (override with `AIGATE_TEST_REDIS_URL`) and FAIL
//! when it is unreachable, unless `AIGATE_SKIP_REDIS=1`. Each test uses its own namespaces (process
//! id + counter), so tests run in parallel and alongside other runs without interfering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigate_store::{
    build_cache, CacheBackend, CacheFilter, CacheKey, CacheStore, CachedResponse, Clock, DiskCacheStore, EntryMeta,
    MemoryCacheStore, RedisCacheStore, StoreError, TieredCache,
};
use bytes::Bytes;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

use common::{now_ms, unique, TempDir};

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

/// A store under test, its namespace base, and what must outlive it.
struct Fixture {
    store: Arc<dyn CacheStore>,
    ns: String,
    _dir: Option<TempDir>,
}

fn memory_fixture() -> Option<Fixture> {
    Some(Fixture { store: Arc::new(MemoryCacheStore::new(64 << 20)), ns: unique("mem"), _dir: None })
}

fn disk_fixture() -> Option<Fixture> {
    let dir = TempDir::new("disk");
    let store = DiskCacheStore::open(dir.path(), 64 << 20).unwrap();
    Some(Fixture { store: Arc::new(store), ns: unique("disk"), _dir: Some(dir) })
}

fn redis_fixture() -> Option<Fixture> {
    if !redis_enabled() {
        return None;
    }
    let store = RedisCacheStore::new(&redis_url(), Duration::from_secs(2)).unwrap();
    Some(Fixture { store: Arc::new(store), ns: unique("redis"), _dir: None })
}

fn tiered_memory_fixture() -> Option<Fixture> {
    let cache = build_cache(&CacheBackend::Memory, 64 << 20, &Clock::system()).unwrap();
    Some(Fixture { store: Arc::new(cache), ns: unique("tmem"), _dir: None })
}

fn tiered_disk_fixture() -> Option<Fixture> {
    let dir = TempDir::new("tdisk");
    let backend = CacheBackend::Disk { dir: dir.path().to_path_buf(), max_bytes: 64 << 20 };
    let cache = build_cache(&backend, 64 << 20, &Clock::system()).unwrap();
    assert_eq!(cache.kind(), "disk");
    Some(Fixture { store: Arc::new(cache), ns: unique("tdisk"), _dir: Some(dir) })
}

fn tiered_redis_fixture() -> Option<Fixture> {
    if !redis_enabled() {
        return None;
    }
    let redis: Arc<dyn CacheStore> = Arc::new(RedisCacheStore::new(&redis_url(), Duration::from_secs(2)).unwrap());
    let memory = MemoryCacheStore::new(64 << 20).with_ttl_cap(Duration::from_secs(10));
    Some(Fixture { store: Arc::new(TieredCache::new(memory, Some(redis))), ns: unique("tredis"), _dir: None })
}

fn key(tag: &str, n: u8) -> CacheKey {
    // Distinct per test (tag is unique) and per n.
    let mut k = [n; 32];
    for (i, b) in tag.bytes().enumerate() {
        k[i % 31] ^= b.rotate_left(i as u32 % 8);
    }
    k[31] = n;
    CacheKey(k)
}

fn entry_with(chunks: Vec<Bytes>, ttl_ms: i64) -> Arc<CachedResponse> {
    let now = now_ms();
    Arc::new(CachedResponse {
        status: 200,
        headers: vec![
            ("content-type".into(), Bytes::from_static(b"text/event-stream")),
            ("x-request-id".into(), Bytes::from_static(b"abc")),
        ],
        chunks,
        created_at_ms: now,
        expires_at_ms: now.saturating_add_signed(ttl_ms),
    })
}

fn entry(body: &str, ttl_ms: i64) -> Arc<CachedResponse> {
    entry_with(vec![Bytes::from(body.to_owned())], ttl_ms)
}

const MINUTE: i64 = 60_000;

/// A body of `len` bytes that compresses well but is not a single repeated byte.
fn compressible(len: usize) -> Vec<u8> {
    let text = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n";
    text.iter().copied().cycle().take(len).collect()
}

// ---------------------------------------------------------------------------------------------
// The conformance cases
// ---------------------------------------------------------------------------------------------

mod cases {
    use super::*;

    pub async fn roundtrip_multi_chunk(s: &dyn CacheStore, ns: &str) {
        let k = key(ns, 1);
        let e = entry_with(
            vec![Bytes::from_static(b"data: 1\n\n"), Bytes::from_static(b"data: 2\n\n"), Bytes::from_static(b"")],
            MINUTE,
        );
        s.put(ns, &k, e.clone()).await.unwrap();
        let got = s.get(ns, &k).await.unwrap().expect("hit");
        assert_eq!(*got, *e);
        assert_eq!(got.chunks.len(), 3);
    }

    pub async fn miss_on_unknown_key(s: &dyn CacheStore, ns: &str) {
        assert!(s.get(ns, &key(ns, 99)).await.unwrap().is_none());
        s.put(ns, &key(ns, 1), entry("x", MINUTE)).await.unwrap();
        assert!(s.get(ns, &key(ns, 2)).await.unwrap().is_none());
    }

    pub async fn expired_never_returned(s: &dyn CacheStore, ns: &str) {
        // Already expired when stored.
        let k = key(ns, 1);
        s.put(ns, &k, entry("old", -1_000)).await.unwrap();
        assert!(s.get(ns, &k).await.unwrap().is_none());

        // A live entry overwritten by an expired one is gone too.
        let k2 = key(ns, 2);
        s.put(ns, &k2, entry("live", MINUTE)).await.unwrap();
        s.put(ns, &k2, entry("dead", -1)).await.unwrap();
        assert!(s.get(ns, &k2).await.unwrap().is_none());

        // Expires while stored.
        let k3 = key(ns, 3);
        s.put(ns, &k3, entry("soon", 1_200)).await.unwrap();
        assert!(s.get(ns, &k3).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        assert!(s.get(ns, &k3).await.unwrap().is_none());
    }

    pub async fn purge_one_key(s: &dyn CacheStore, ns: &str) {
        let (k1, k2) = (key(ns, 1), key(ns, 2));
        s.put(ns, &k1, entry("one", MINUTE)).await.unwrap();
        s.put(ns, &k2, entry("two", MINUTE)).await.unwrap();
        assert_eq!(s.purge(ns, Some(&k1)).await.unwrap(), 1);
        assert!(s.get(ns, &k1).await.unwrap().is_none());
        assert_eq!(s.get(ns, &k2).await.unwrap().unwrap().chunks[0], Bytes::from_static(b"two"));
        assert_eq!(s.purge(ns, Some(&k1)).await.unwrap(), 0);
    }

    pub async fn purge_namespace_leaves_others(s: &dyn CacheStore, ns: &str) {
        let a = format!("{ns}-a");
        let b = format!("{ns}-b");
        for i in 0..3u8 {
            s.put(&a, &key(&a, i), entry("a", MINUTE)).await.unwrap();
        }
        for i in 0..2u8 {
            s.put(&b, &key(&b, i), entry("b", MINUTE)).await.unwrap();
        }
        assert_eq!(s.purge(&a, None).await.unwrap(), 3);
        for i in 0..3u8 {
            assert!(s.get(&a, &key(&a, i)).await.unwrap().is_none());
        }
        for i in 0..2u8 {
            assert!(s.get(&b, &key(&b, i)).await.unwrap().is_some(), "other namespace purged");
        }
        assert_eq!(s.purge(&a, None).await.unwrap(), 0);
        assert_eq!(s.purge(&b, None).await.unwrap(), 2);
    }

    pub async fn purge_matching_by_facts_and_age(s: &dyn CacheStore, ns: &str) {
        let meta = |model: &str, endpoint: &str, feature: &str| EntryMeta {
            model: Some(model.into()),
            endpoint: endpoint.into(),
            metadata: vec![("feature".into(), feature.into())],
        };
        let ks: Vec<CacheKey> = (0..4u8).map(|i| key(ns, i)).collect();
        s.put_with_meta(ns, &ks[0], entry("a", MINUTE), &meta("gpt-4o", "chat", "resume")).await.unwrap();
        s.put_with_meta(ns, &ks[1], entry("b", MINUTE), &meta("gpt-4o-mini", "chat", "resume")).await.unwrap();
        s.put_with_meta(ns, &ks[2], entry("c", MINUTE), &meta("gpt-4o", "embeddings", "search")).await.unwrap();
        s.put_with_meta(ns, &ks[3], entry("d", MINUTE), &meta("gpt-4o", "chat", "search")).await.unwrap();
        let other = format!("{ns}-other");
        s.put_with_meta(&other, &key(&other, 0), entry("o", MINUTE), &meta("gpt-4o", "chat", "resume")).await.unwrap();
        let f = |model: Option<&str>, endpoint: Option<&str>, feature: Option<&str>, before: Option<u64>| CacheFilter {
            model: model.map(Into::into),
            endpoint: endpoint.map(Into::into),
            metadata: feature.map(|v| vec![("feature".to_string(), v.to_string())]).unwrap_or_default(),
            created_before_ms: before,
        };
        let purged = s.purge_matching(ns, &f(Some("gpt-4o"), Some("chat"), Some("resume"), None)).await.unwrap();
        assert_eq!(purged, vec![ks[0]]);
        assert!(s.get(ns, &ks[0]).await.unwrap().is_none());
        assert!(s.get(ns, &ks[1]).await.unwrap().is_some());
        // Nothing was stored an hour ago; everything before now.
        let hour_ago = now_ms() - 3_600_000;
        assert!(s.purge_matching(ns, &f(None, None, None, Some(hour_ago))).await.unwrap().is_empty());
        let mut purged = s.purge_matching(ns, &f(Some("gpt-4o"), None, None, Some(now_ms() + 1))).await.unwrap();
        purged.sort_unstable();
        let mut want = vec![ks[2], ks[3]];
        want.sort_unstable();
        assert_eq!(purged, want);
        assert!(s.get(ns, &ks[1]).await.unwrap().is_some(), "gpt-4o-mini kept");
        assert!(s.get(&other, &key(&other, 0)).await.unwrap().is_some(), "other namespace kept");
        assert_eq!(s.purge(ns, None).await.unwrap(), 1);
        assert!(
            s.purge_matching(ns, &f(None, None, None, None)).await.unwrap().is_empty(),
            "the facts go with a purge"
        );
        s.purge(&other, None).await.unwrap();
    }

    pub async fn large_entry_roundtrip(s: &dyn CacheStore, ns: &str) {
        let body = compressible(300 * 1024);
        let chunks: Vec<Bytes> = body.chunks(7_000).map(Bytes::copy_from_slice).collect();
        let e = entry_with(chunks, MINUTE);
        assert!(e.encode().len() > 300 * 1024);
        let k = key(ns, 1);
        s.put(ns, &k, e.clone()).await.unwrap();
        assert_eq!(*s.get(ns, &k).await.unwrap().expect("hit"), *e);
    }

    pub async fn overwrite_replaces(s: &dyn CacheStore, ns: &str) {
        let k = key(ns, 1);
        s.put(ns, &k, entry("first", MINUTE)).await.unwrap();
        let second = entry_with(vec![Bytes::from_static(b"sec"), Bytes::from_static(b"ond")], 2 * MINUTE);
        s.put(ns, &k, second.clone()).await.unwrap();
        assert_eq!(*s.get(ns, &k).await.unwrap().unwrap(), *second);
    }
}

/// Runs every conformance case against the stores made by `$fixture`, one test per case.
macro_rules! conformance {
    ($name:ident, $fixture:path) => {
        mod $name {
            use super::*;
            conformance!(@case $fixture, roundtrip_multi_chunk);
            conformance!(@case $fixture, miss_on_unknown_key);
            conformance!(@case $fixture, expired_never_returned);
            conformance!(@case $fixture, purge_one_key);
            conformance!(@case $fixture, purge_namespace_leaves_others);
            conformance!(@case $fixture, large_entry_roundtrip);
            conformance!(@case $fixture, purge_matching_by_facts_and_age);
            conformance!(@case $fixture, overwrite_replaces);
        }
    };
    (@case $fixture:path, $case:ident) => {
        #[tokio::test]
        async fn $case() {
            let Some(f) = $fixture() else { return };
            cases::$case(&*f.store, &f.ns).await;
        }
    };
}

conformance!(memory, memory_fixture);
conformance!(disk, disk_fixture);
conformance!(redis, redis_fixture);
conformance!(tiered_memory, tiered_memory_fixture);
conformance!(tiered_disk, tiered_disk_fixture);
conformance!(tiered_redis, tiered_redis_fixture);

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_is_bounded_by_bytes() {
    let cap = 100_000u64;
    let s = MemoryCacheStore::new(cap);
    let body = "x".repeat(1_000);
    for i in 0..1_000u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        s.put_sync("gw", &CacheKey(k), entry(&body, MINUTE));
    }
    s.run_pending_tasks();
    let st = s.stats_sync();
    assert!(st.bytes <= cap, "weighted size {} over cap {cap}", st.bytes);
    assert!(st.bytes > 0);
    assert!(st.entries < 1_000);
    assert!(st.evictions > 0, "{st:?}");
    assert_eq!(s.stats(), st);
}

#[tokio::test]
async fn memory_ttl_cap_shortens_lifetime() {
    let s = MemoryCacheStore::new(1 << 20).with_ttl_cap(Duration::from_millis(300));
    let k = key("cap", 1);
    s.put_sync("gw", &k, entry("x", MINUTE));
    assert!(s.get_sync(&k).is_some());
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(s.get_sync(&k).is_none());
}

#[tokio::test]
async fn memory_hit_is_the_same_arc() {
    let s = MemoryCacheStore::new(1 << 20);
    let k = key("arc", 1);
    let e = entry("x", MINUTE);
    s.put_sync("gw", &k, e.clone());
    assert!(Arc::ptr_eq(&s.get_sync(&k).unwrap(), &e));
}

// ---------------------------------------------------------------------------------------------
// Disk
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn disk_survives_reopen() {
    let dir = TempDir::new("reopen");
    let k = key("reopen", 1);
    let e = entry_with(vec![Bytes::from_static(b"persisted"), Bytes::from_static(b"!")], MINUTE);
    {
        let s = DiskCacheStore::open(dir.path(), 1 << 20).unwrap();
        s.put("gw", &k, e.clone()).await.unwrap();
        s.put("gw", &key("reopen", 2), entry("short", 200)).await.unwrap();
        assert_eq!(s.stats().entries, 2);
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let s = DiskCacheStore::open(dir.path(), 1 << 20).unwrap();
    assert!(s.path().ends_with("cache.sqlite3"));
    assert_eq!(*s.get("gw", &k).await.unwrap().expect("survived"), *e);
    // The expired row was swept at open; the total was reloaded.
    let st = s.stats();
    assert_eq!(st.entries, 1);
    assert!(st.bytes > e.encode().len() as u64);
}

/// A cache file written before entries kept their facts gains the columns in place: its rows are
/// still served, and match only a purge by age (their creation reads as 0, long ago).
#[tokio::test]
async fn disk_file_without_fact_columns_is_upgraded_in_place() {
    let dir = TempDir::new("upgrade");
    let k = key("upgrade", 1);
    let e = entry("old", MINUTE);
    {
        let conn = rusqlite::Connection::open(dir.path().join("cache.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE cache (key BLOB PRIMARY KEY NOT NULL, ns TEXT NOT NULL, expires_at INTEGER NOT NULL, \
             size INTEGER NOT NULL, value BLOB NOT NULL);",
        )
        .unwrap();
        let value = e.encode();
        conn.execute(
            "INSERT INTO cache (key, ns, expires_at, size, value) VALUES (?1, 'gw', ?2, ?3, ?4)",
            rusqlite::params![&k.0[..], e.expires_at_ms as i64, value.len() as i64 + 64, &value[..]],
        )
        .unwrap();
    }
    let s = DiskCacheStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(*s.get("gw", &k).await.unwrap().expect("kept"), *e);
    let by_model = CacheFilter { model: Some("gpt-4o".into()), ..CacheFilter::default() };
    assert!(s.purge_matching("gw", &by_model).await.unwrap().is_empty());
    let meta = EntryMeta { model: Some("gpt-4o".into()), endpoint: "chat".into(), metadata: vec![] };
    s.put_with_meta("gw", &key("upgrade", 2), entry("new", MINUTE), &meta).await.unwrap();
    assert_eq!(s.purge_matching("gw", &by_model).await.unwrap(), vec![key("upgrade", 2)]);
    let old = CacheFilter { created_before_ms: Some(1), ..CacheFilter::default() };
    assert_eq!(s.purge_matching("gw", &old).await.unwrap(), vec![k]);
    assert_eq!(s.stats().entries, 0);
}

#[tokio::test]
async fn disk_stays_under_byte_cap() {
    let dir = TempDir::new("cap");
    let cap = 50_000u64;
    let s = DiskCacheStore::open(dir.path(), cap).unwrap();
    let body = "y".repeat(2_000);
    for i in 0..100u8 {
        // Later entries expire later, so the earliest are evicted first.
        s.put("gw", &key("cap", i), entry(&body, MINUTE + i64::from(i) * 10)).await.unwrap();
        assert!(s.stats().bytes <= cap);
    }
    let st = s.stats();
    assert!(st.bytes <= cap && st.bytes > cap / 2, "{st:?}");
    assert!(st.evictions > 0 && st.entries < 100, "{st:?}");
    assert_eq!(st.entries + st.evictions, 100);
    assert!(s.get("gw", &key("cap", 99)).await.unwrap().is_some(), "newest kept");
    assert!(s.get("gw", &key("cap", 0)).await.unwrap().is_none(), "soonest-expiring evicted");

    // The tracked figures match the file.
    drop(s);
    let s = DiskCacheStore::open(dir.path(), cap).unwrap();
    assert_eq!(s.stats().entries, st.entries);
    assert_eq!(s.stats().bytes, st.bytes);

    // An entry larger than the whole cap is not stored, and does not flush the others.
    let huge = entry(&"z".repeat(60_000), MINUTE);
    s.put("gw", &key("cap", 200), huge).await.unwrap();
    assert!(s.get("gw", &key("cap", 200)).await.unwrap().is_none());
    assert_eq!(s.stats().entries, st.entries);
}

#[tokio::test]
async fn disk_reclaims_expired_rows() {
    let dir = TempDir::new("reclaim");
    let s = DiskCacheStore::open(dir.path(), 1 << 20).unwrap();
    for i in 0..5u8 {
        s.put("gw", &key("reclaim", i), entry("short", 150)).await.unwrap();
    }
    s.put("gw", &key("reclaim", 9), entry("long", MINUTE)).await.unwrap();
    assert_eq!(s.stats().entries, 6);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(s.reclaim_expired().await.unwrap(), 5);
    assert_eq!(s.reclaim_expired().await.unwrap(), 0);
    assert_eq!(s.stats().entries, 1);
    // Really gone from the file.
    let conn = rusqlite::Connection::open(s.path()).unwrap();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM cache", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn disk_open_on_unusable_path_is_an_error() {
    let dir = TempDir::new("notadir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = DiskCacheStore::open(&file, 1 << 20).unwrap_err();
    assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    // A file that is not a database.
    let d2 = dir.path().join("garbage");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::write(d2.join("cache.sqlite3"), vec![0x42u8; 8192]).unwrap();
    let err = DiskCacheStore::open(&d2, 1 << 20).unwrap_err();
    assert!(matches!(err, StoreError::Io(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_down_fails_fast() {
    let s = RedisCacheStore::new("redis://127.0.0.1:1", Duration::from_millis(250)).expect("new never connects");
    let ns = unique("dead");
    let k = key(&ns, 1);
    for _ in 0..3 {
        let t = Instant::now();
        assert!(s.get(&ns, &k).await.is_err());
        assert!(s.put(&ns, &k, entry("x", MINUTE)).await.is_err());
        assert!(s.purge(&ns, None).await.is_err());
        assert!(s.purge(&ns, Some(&k)).await.is_err());
        assert!(t.elapsed() < Duration::from_millis(900), "took {:?}", t.elapsed());
    }

    // The tiered cache over a dead Redis still serves its memory tier.
    let cache =
        build_cache(&CacheBackend::Redis { url: "redis://127.0.0.1:1".into() }, 1 << 20, &Clock::system()).unwrap();
    let t = Instant::now();
    assert!(cache.put(&ns, &k, entry("x", MINUTE)).await.is_err());
    assert!(cache.memory_get(&k).is_some());
    assert!(cache.get(&ns, &k).await.unwrap().is_some());
    assert!(cache.get(&ns, &key(&ns, 2)).await.is_err());
    assert!(t.elapsed() < Duration::from_millis(900), "took {:?}", t.elapsed());

    // TLS URLs are supported; a TLS handshake with a plain-text server fails, quickly.
    if redis_enabled() {
        let tls_url = redis_url().replacen("redis://", "rediss://", 1);
        let s = RedisCacheStore::new(&tls_url, Duration::from_millis(250)).unwrap();
        let t = Instant::now();
        let err = s.get(&ns, &k).await.unwrap_err();
        eprintln!("rediss against plain text: {err}");
        assert!(s.get(&ns, &k).await.is_err());
        assert!(t.elapsed() < Duration::from_millis(900), "took {:?}", t.elapsed());
    }

    // A malformed URL is the only construction error.
    assert!(RedisCacheStore::new("not a url", Duration::from_millis(250)).is_err());
}

#[tokio::test]
async fn redis_recovers_when_it_comes_up() {
    if !redis_enabled() {
        return;
    }
    // A port with nothing listening yet; later a proxy to the real Redis listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s = RedisCacheStore::new(&format!("redis://127.0.0.1:{port}"), Duration::from_millis(250)).unwrap();
    let ns = unique("recover");
    let k = key(&ns, 1);
    assert!(s.get(&ns, &k).await.is_err());

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let target = redis_url().trim_start_matches("redis://").trim_end_matches('/').to_owned();
    let proxy = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });

    // Retries are paced (>= 500 ms apart) and run in the background: within a few seconds the
    // store works again, and no call ever blocks past its timeout.
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        let res = s.put(&ns, &k, entry("back", MINUTE)).await;
        assert!(t.elapsed() < Duration::from_millis(400), "took {:?}", t.elapsed());
        if res.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "store did not recover");
    assert!(s.get(&ns, &k).await.unwrap().is_some());
    s.purge(&ns, None).await.unwrap();
    proxy.abort();
}

#[tokio::test]
async fn redis_live_store_keeps_working() {
    if !redis_enabled() {
        return;
    }
    // The production settings (250 ms per command).
    let cache = build_cache(&CacheBackend::Redis { url: redis_url() }, 1 << 20, &Clock::system()).unwrap();
    assert_eq!(cache.kind(), "redis");
    let redis = cache.backing().unwrap().clone();
    let ns = unique("live");
    for i in 0..50u8 {
        let k = key(&ns, i);
        redis.put(&ns, &k, entry(&format!("v{i}"), MINUTE)).await.unwrap();
        assert_eq!(redis.get(&ns, &k).await.unwrap().unwrap().chunks[0], Bytes::from(format!("v{i}")));
    }
    // Read through the tiered cache: the backing hit is copied into memory.
    let k = key(&ns, 7);
    assert!(cache.memory_get(&k).is_none());
    assert!(cache.get(&ns, &k).await.unwrap().is_some());
    assert!(cache.memory_get(&k).is_some());
    assert_eq!(cache.purge(&ns, None).await.unwrap(), 50);
    assert!(cache.memory_get(&k).is_none());
}

#[tokio::test]
async fn redis_large_entries_are_compressed() {
    if !redis_enabled() {
        return;
    }
    let s = RedisCacheStore::new(&redis_url(), Duration::from_secs(2)).unwrap();
    let ns = unique("lz4");
    let small = entry("tiny", MINUTE);
    let big = entry_with(vec![Bytes::from(compressible(300 * 1024))], MINUTE);
    s.put(&ns, &key(&ns, 1), small.clone()).await.unwrap();
    s.put(&ns, &key(&ns, 2), big.clone()).await.unwrap();

    let client = ::redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw_small: Vec<u8> = ::redis::cmd("GET")
        .arg(aigate_store::cache::redis::redis_key(&ns, &key(&ns, 1)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw_small[0], aigate_store::cache::redis::FLAG_RAW);
    assert_eq!(&raw_small[1..], &small.encode()[..]);
    let big_key = aigate_store::cache::redis::redis_key(&ns, &key(&ns, 2));
    let raw_big: Vec<u8> = ::redis::cmd("GET").arg(&big_key).query_async(&mut conn).await.unwrap();
    assert_eq!(raw_big[0], aigate_store::cache::redis::FLAG_LZ4);
    assert!(raw_big.len() < big.encode().len() / 4, "{} vs {}", raw_big.len(), big.encode().len());
    // Expiry is Redis's: PTTL within the entry's lifetime.
    let pttl: i64 = ::redis::cmd("PTTL").arg(&big_key).query_async(&mut conn).await.unwrap();
    assert!(pttl > 0 && pttl <= MINUTE, "{pttl}");
    assert_eq!(*s.get(&ns, &key(&ns, 2)).await.unwrap().unwrap(), *big);

    // A corrupt value is an error, not a panic.
    let _: () = ::redis::cmd("SET").arg(&big_key).arg(&[7u8, 1, 2, 3][..]).query_async(&mut conn).await.unwrap();
    assert!(matches!(s.get(&ns, &key(&ns, 2)).await, Err(StoreError::Corrupt(_))));
    s.purge(&ns, None).await.unwrap();
}

#[tokio::test]
async fn redis_purge_namespace_scans_many_keys() {
    if !redis_enabled() {
        return;
    }
    let s = RedisCacheStore::new(&redis_url(), Duration::from_secs(2)).unwrap();
    let ns = unique("many");
    let other = format!("{ns}x");
    for i in 0..=255u8 {
        s.put(&ns, &key(&ns, i), entry("v", MINUTE)).await.unwrap();
    }
    s.put(&other, &key(&other, 1), entry("o", MINUTE)).await.unwrap();
    // Namespace names with glob characters only match themselves.
    let glob = format!("{ns}*");
    s.put(&glob, &key(&glob, 1), entry("g", MINUTE)).await.unwrap();
    assert_eq!(s.purge(&glob, None).await.unwrap(), 1);
    assert_eq!(s.purge(&ns, None).await.unwrap(), 256);
    assert!(s.get(&other, &key(&other, 1)).await.unwrap().is_some());
    assert_eq!(s.purge(&other, None).await.unwrap(), 1);
}

// ---------------------------------------------------------------------------------------------
// Tiered cache and the builder
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tiered_copies_backing_hits_into_memory() {
    let dir = TempDir::new("tiered");
    let disk = Arc::new(DiskCacheStore::open(dir.path(), 1 << 20).unwrap());
    let cache = TieredCache::new(MemoryCacheStore::new(1 << 20), Some(disk.clone() as Arc<dyn CacheStore>));
    let k = key("tiered", 1);
    disk.put("gw", &k, entry("from disk", MINUTE)).await.unwrap();
    assert!(cache.memory_get(&k).is_none());
    assert_eq!(cache.get("gw", &k).await.unwrap().unwrap().chunks[0], Bytes::from_static(b"from disk"));
    assert!(cache.memory_get(&k).is_some());
    // A write goes to both tiers.
    let k2 = key("tiered", 2);
    cache.put("gw", &k2, entry("both", MINUTE)).await.unwrap();
    assert!(cache.memory_get(&k2).is_some());
    assert!(disk.get("gw", &k2).await.unwrap().is_some());
    assert_eq!(cache.stats().entries, 2);
    assert_eq!(cache.memory_stats().entries, cache.memory().stats_sync().entries);
    assert_eq!(cache.backing_stats(), Some(disk.stats()));
}

/// Two replicas' caches on one Redis: a purge through one empties the other's memory tier before
/// it returns (one key, then a whole namespace); other namespaces keep their entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_purge_reaches_the_other_replicas_memory_tier() {
    if !redis_enabled() {
        return;
    }
    let backend = CacheBackend::Redis { url: redis_url() };
    let (a, b) = (
        build_cache(&backend, 1 << 20, &Clock::system()).unwrap(),
        build_cache(&backend, 1 << 20, &Clock::system()).unwrap(),
    );
    let (ns, other) = (unique("bus"), unique("busother"));
    let keys = [key(&ns, 1), key(&ns, 2), key(&other, 3)];
    // Both subscribed (a subscriber empties its memory tier when it subscribes).
    let start = Instant::now();
    while ![&a, &b].iter().all(|c| c.purge_bus().is_some_and(|bus| bus.is_subscribed())) {
        assert!(start.elapsed() < Duration::from_secs(5), "the purge subscribers did not subscribe");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (k, n) in keys.iter().zip([&ns, &ns, &other]) {
        a.put(n, k, entry("v", MINUTE)).await.unwrap();
        assert!(b.get(n, k).await.unwrap().is_some());
        assert!(b.memory_get(k).is_some(), "b holds a copy in memory");
    }
    a.purge(&ns, Some(&keys[0])).await.unwrap();
    assert!(b.memory_get(&keys[0]).is_none(), "one key purged through a, still in b's memory");
    assert!(b.memory_get(&keys[1]).is_some());
    a.purge(&ns, None).await.unwrap();
    assert!(b.memory_get(&keys[1]).is_none(), "a namespace purged through a, still in b's memory");
    assert!(b.memory_get(&keys[2]).is_some(), "another namespace was purged");
    b.purge(&other, None).await.unwrap();
    assert!(a.memory_get(&keys[2]).is_none());
}

#[test]
fn backend_parse() {
    let dir = Path::new("/var/lib/aigate");
    assert_eq!(CacheBackend::parse("memory", dir, 10), Ok(CacheBackend::Memory));
    assert_eq!(
        CacheBackend::parse(" disk ", dir, 10),
        Ok(CacheBackend::Disk { dir: dir.to_path_buf(), max_bytes: 10 })
    );
    assert_eq!(
        CacheBackend::parse("redis://10.0.0.1:6379/0", dir, 10),
        Ok(CacheBackend::Redis { url: "redis://10.0.0.1:6379/0".into() })
    );
    assert!(matches!(CacheBackend::parse("rediss://h:6380", dir, 10), Ok(CacheBackend::Redis { .. })));
    let err = CacheBackend::parse("memcached://x", dir, 10).unwrap_err();
    assert!(err.contains("memcached://x") && err.contains("redis://"), "{err}");
    assert!(CacheBackend::parse("", dir, 10).is_err());
}

#[test]
fn build_cache_per_backend() {
    let c = build_cache(&CacheBackend::Memory, 1 << 20, &Clock::system()).unwrap();
    assert_eq!(c.kind(), "memory");
    assert!(c.backing().is_none());
    assert_eq!(c.memory().max_bytes(), 1 << 20);
    assert_eq!(c.memory().ttl_cap(), None);

    let dir = TempDir::new("build");
    let c =
        build_cache(&CacheBackend::Disk { dir: dir.path().join("sub"), max_bytes: 1 << 20 }, 1 << 20, &Clock::system())
            .unwrap();
    assert_eq!(c.kind(), "disk");
    assert_eq!(c.memory().ttl_cap(), None);
    assert!(dir.path().join("sub").join("cache.sqlite3").exists());

    // Redis is not contacted at build time.
    let c = build_cache(&CacheBackend::Redis { url: "redis://127.0.0.1:1".into() }, 1 << 20, &Clock::system()).unwrap();
    assert_eq!(c.kind(), "redis");
    assert_eq!(c.memory().ttl_cap(), Some(Duration::from_secs(10)));
}

/// Every tier built by `build_cache` reads the time through the clock it was given: an entry
/// expires when that clock says so, without waiting.
#[tokio::test]
async fn build_cache_expires_entries_on_the_injected_clock() {
    let dir = TempDir::new("clock");
    let mut backends =
        vec![CacheBackend::Memory, CacheBackend::Disk { dir: dir.path().to_path_buf(), max_bytes: 1 << 20 }];
    if redis_enabled() {
        backends.push(CacheBackend::Redis { url: redis_url() });
    }
    for backend in backends {
        let clock = Clock::system();
        let cache = build_cache(&backend, 1 << 20, &clock).unwrap();
        let ns = unique("clock");
        let k = key(&ns, 1);
        cache.put(&ns, &k, entry("x", MINUTE)).await.unwrap();
        assert!(cache.get(&ns, &k).await.unwrap().is_some(), "{backend:?}");
        clock.advance(Duration::from_secs(61));
        assert!(cache.memory_get(&k).is_none(), "{backend:?}: memory tier");
        if let Some(backing) = cache.backing() {
            assert!(backing.get(&ns, &k).await.unwrap().is_none(), "{backend:?}: backing store");
        }
        assert!(cache.get(&ns, &k).await.unwrap().is_none(), "{backend:?}");
    }
}
