//! The log-store factory, and what is particular to the SQLite or the PostgreSQL store.

use super::*;

// ---------------------------------------------------------------------------------------------
// Backend selection
// ---------------------------------------------------------------------------------------------

#[test]
fn log_backend_parse() {
    let dir = Path::new("/var/lib/aigate");
    assert_eq!(LogBackend::parse(" SQLite ", dir).unwrap(), LogBackend::Sqlite { path: dir.join("logs.sqlite3") });
    for url in ["postgres://u@h/db", "postgresql://u:p@h:5433/db?sslmode=disable"] {
        assert_eq!(LogBackend::parse(url, dir).unwrap(), LogBackend::Postgres { url: url.into() });
    }
    for bad in ["", "memory", "mysql://h/db", "redis://h"] {
        assert!(LogBackend::parse(bad, dir).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn open_log_store_sqlite_persists_across_reopen() {
    let dir = TempDir::new("build");
    let backend = LogBackend::parse("sqlite", &dir.path().join("nested")).unwrap();
    let s = open_log_store(&backend, &Clock::system()).unwrap();
    assert_eq!(s.kind(), "sqlite");
    let r = full("persisted", now_ms());
    assert_eq!(s.insert_batch("gw", std::slice::from_ref(&r)).await.unwrap(), 1);
    drop(s);
    assert!(dir.path().join("nested").join(LOG_SQLITE_FILE).is_file());
    let s = open_log_store(&backend, &Clock::system()).unwrap();
    assert_eq!(s.get("gw", "persisted").await.unwrap().unwrap(), stored(&r, "gw"));
    assert_eq!(s.count("gw").await.unwrap(), 1);
}

/// `open` builds every store without waiting on the network: unreachable Redis and PostgreSQL
/// servers are contacted on first use only.
#[tokio::test]
async fn open_builds_every_store_without_the_network() {
    let dir = TempDir::new("open");
    let clock = Clock::system();
    let local = Backends {
        cache: CacheBackend::Disk { dir: dir.path().join("cache"), max_bytes: 1 << 20 },
        cache_memory: 1 << 20,
        limits: LimitBackend::Memory,
        logs: LogBackend::Sqlite { path: dir.path().join(LOG_SQLITE_FILE) },
    };
    let stores = aigate_store::open(&local, &clock).unwrap();
    assert_eq!((stores.cache.kind(), stores.limits.kind(), stores.logs.kind()), ("disk", "memory", "sqlite"));
    assert_eq!(stores.logs.insert_batch("gw", &[rec("a", now_ms())]).await.unwrap(), 1);
    let start = Instant::now();
    let remote = Backends {
        cache: CacheBackend::Redis { url: "redis://127.0.0.1:1".into() },
        cache_memory: 1 << 20,
        limits: LimitBackend::Redis { url: "redis://127.0.0.1:1".into() },
        logs: LogBackend::Postgres { url: "postgres://postgres@127.0.0.1:1/test".into() },
    };
    let stores = aigate_store::open(&remote, &clock).unwrap();
    assert_eq!((stores.cache.kind(), stores.limits.kind(), stores.logs.kind()), ("redis", "redis", "postgres"));
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
    let bad = Backends { logs: LogBackend::Postgres { url: "postgres://h:notaport/db".into() }, ..remote };
    assert!(aigate_store::open(&bad, &clock).is_err());
}

/// A log store reads its retention cutoffs through the clock it was given.
#[tokio::test]
async fn open_log_store_measures_max_age_on_the_injected_clock() {
    let dir = TempDir::new("log-clock");
    let clock = Clock::system();
    let s = open_log_store(&LogBackend::Sqlite { path: dir.path().join(LOG_SQLITE_FILE) }, &clock).unwrap();
    s.insert_batch("gw", &[rec("a", now_ms())]).await.unwrap();
    s.set_retention("gw", Retention { max_records: 100, at_cap: AtCap::DeleteOldest, max_age_ms: Some(3_600_000) });
    assert_eq!(s.enforce_retention("gw").await.unwrap(), 0);
    clock.advance(Duration::from_secs(3_601));
    assert_eq!(s.enforce_retention("gw").await.unwrap(), 1);
}

/// Every file under `dir`, concatenated.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(all_bytes(&p));
        } else {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    all
}

fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[tokio::test]
async fn sqlite_bodies_live_in_segment_files() {
    let dir = TempDir::new("bodies");
    let path = dir.path().join(LOG_SQLITE_FILE);
    let seg_dir = dir.path().join(format!("{LOG_SQLITE_FILE}.bodies"));
    let s = SqliteLogStore::open(&path).unwrap();
    let marker = b"{\"messages\":[]}\x00\xff\xfe";
    let (a, b, c) = (full("a", 1_000), full("b", 2_000), rec("c", 3_000));
    let mut only_resp = full("d", 4_000);
    only_resp.request_body = None;
    only_resp.response_body = Some(Bytes::new());
    let batch = [a.clone(), b.clone(), c.clone(), only_resp.clone()];
    assert_eq!(s.insert_batch("gw", &batch).await.unwrap(), 4);
    for r in &batch {
        assert_eq!(s.get("gw", &r.id).await.unwrap().unwrap(), stored(r, "gw"), "{}", r.id);
    }
    // The bodies are in one segment file, not in the database or its WAL.
    let segs: Vec<_> = std::fs::read_dir(&seg_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(occurrences(&std::fs::read(&segs[0]).unwrap(), marker), 2);
    assert_eq!(occurrences(&all_bytes(dir.path()), marker), 2, "bodies are written once");

    // Deleted on request: a's bodies are overwritten at once, b's stay.
    let f = LogFilter { to_ms: Some(1_500), ..LogFilter::default() };
    assert_eq!(s.delete("gw", &f).await.unwrap(), 1);
    assert_eq!(occurrences(&all_bytes(dir.path()), marker), 1);
    assert_eq!(s.get("gw", "b").await.unwrap().unwrap(), stored(&b, "gw"));

    // A second batch in the same segment; then retention removes every row with bodies: the
    // segment goes once it is no longer the one being written (here: at the next open).
    let e = full("e", 5_000);
    s.insert_batch("gw", std::slice::from_ref(&e)).await.unwrap();
    assert_eq!(std::fs::read_dir(&seg_dir).unwrap().count(), 1);
    s.set_retention("gw", Retention { max_records: 1, at_cap: AtCap::DeleteOldest, max_age_ms: None });
    s.enforce_retention("gw").await.unwrap();
    assert_eq!(all_ids(&s, "gw", &LogFilter::default()).await, ["e"]);
    assert_eq!(s.get("gw", "e").await.unwrap().unwrap(), stored(&e, "gw"));
    s.set_retention("gw", Retention { max_records: 1_000, at_cap: AtCap::DeleteOldest, max_age_ms: Some(1) });
    s.enforce_retention("gw").await.unwrap();
    assert_eq!(s.count("gw").await.unwrap(), 0);
    drop(s);
    let s = SqliteLogStore::open(&path).unwrap();
    assert_eq!(std::fs::read_dir(&seg_dir).unwrap().count(), 0, "an unused segment is removed");
    // New bodies go to a new segment and read back.
    let g = full("g", now_ms());
    s.insert_batch("gw", std::slice::from_ref(&g)).await.unwrap();
    assert_eq!(s.get("gw", "g").await.unwrap().unwrap(), stored(&g, "gw"));
    assert_eq!(std::fs::read_dir(&seg_dir).unwrap().count(), 1);
}

#[tokio::test]
async fn sqlite_unusable_path_is_an_error() {
    let dir = TempDir::new("bad");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let Err(err) = open_log_store(&LogBackend::Sqlite { path: file.join("logs.sqlite3") }, &Clock::system()) else {
        panic!("opened a database under a file");
    };
    assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    std::fs::write(dir.path().join("junk.sqlite3"), vec![0x42u8; 8192]).unwrap();
    assert!(SqliteLogStore::open(&dir.path().join("junk.sqlite3")).is_err());
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_create_the_schema_at_once_and_share_rows() {
    if !pg_enabled() {
        return;
    }
    let table = unique("mig");
    let _tables = PgTables(table.clone());
    let stores: Vec<PostgresLogStore> =
        (0..4).map(|_| PostgresLogStore::connect_with_table(&pg_url(), &table).unwrap()).collect();
    let runs = stores.iter().map(|s| {
        let s = s.clone();
        tokio::spawn(async move { s.ensure_schema().await })
    });
    for r in runs.collect::<Vec<_>>() {
        r.await.unwrap().unwrap();
    }
    // A later start finds the schema current.
    let again = pg_store(&table).await;
    assert_eq!(again.table(), table);
    assert_eq!(stores[0].insert_batch("gw", &[rec("a", now_ms())]).await.unwrap(), 1);
    assert_eq!(stores[1].get("gw", "a").await.unwrap().unwrap().id, "a");
    assert_eq!(again.count("gw").await.unwrap(), 1);
    // Concurrent batches from several replicas under one cap: the cap holds exactly.
    for s in &stores {
        s.set_retention("capped", Retention { max_records: 25, at_cap: AtCap::StopInserting, max_age_ms: None });
    }
    let t = now_ms();
    let inserts = stores.iter().enumerate().map(|(n, s)| {
        let s = s.clone();
        let batch: Vec<LogRecord> = (0..10).map(|i| rec(&format!("r{n}-{i}"), t + i)).collect();
        tokio::spawn(async move { s.insert_batch("capped", &batch).await })
    });
    let mut total = 0;
    for r in inserts.collect::<Vec<_>>() {
        total += r.await.unwrap().unwrap();
    }
    assert_eq!(total, 25);
    assert_eq!(again.count("capped").await.unwrap(), 25);
    assert_eq!(all_ids(&again, "capped", &LogFilter { limit: Some(1000), ..LogFilter::default() }).await.len(), 25);
}

/// Tables of another schema version (a development build's) are refused, never converted: every
/// operation fails with a message naming the tables and what to do.
#[tokio::test]
async fn postgres_table_of_another_schema_is_refused() {
    if !pg_enabled() {
        return;
    }
    let table = unique("old");
    let _tables = PgTables(table.clone());
    pg_store(&table).await;
    let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&format!(r#"UPDATE "{table}_schema" SET version = 1"#)).await.unwrap();
    let s = PostgresLogStore::connect_with_table(&pg_url(), &table).unwrap();
    let want = format!(
        "PostgreSQL table {table} has log schema 1; this aigate reads schema 2 or 3 only (the table comes from a \
         development build): drop the tables {table}, {table}_counts, {table}_rollups and {table}_schema (or \
         configure another table), and aigate creates new ones"
    );
    let err = s.ensure_schema().await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(m) if *m == want), "{err:?}");
    let err = s.insert_batch("gw", &[rec("a", now_ms())]).await.unwrap_err();
    assert!(err.to_string().contains(&want), "{err}");
    let version: i32 = client.query_one(&format!(r#"SELECT version FROM "{table}_schema""#), &[]).await.unwrap().get(0);
    assert_eq!(version, 1, "the tables are left as they were");
}

/// Version-2 tables (the first release's), as that release created them.
fn pg_v2_schema(t: &str) -> String {
    format!(
        r#"CREATE TABLE "{t}" (
               gateway TEXT NOT NULL, id TEXT COLLATE "C" NOT NULL, event_id TEXT, created_at_ms BIGINT NOT NULL,
               provider TEXT NOT NULL, path TEXT NOT NULL, requested_model TEXT, served_model TEXT,
               status INTEGER NOT NULL, success BOOLEAN NOT NULL, cache_status TEXT NOT NULL, stream BOOLEAN NOT NULL,
               duration_ms DOUBLE PRECISION NOT NULL, ttfb_ms DOUBLE PRECISION, upstream_ms DOUBLE PRECISION,
               overhead_ms DOUBLE PRECISION, tokens_in BIGINT, tokens_out BIGINT, cached_tokens_in BIGINT,
               reasoning_tokens BIGINT, cost_usd DOUBLE PRECISION, saved_usd DOUBLE PRECISION,
               custom_cost BOOLEAN NOT NULL, metadata JSONB, user_agent TEXT, error TEXT, feedback SMALLINT,
               score DOUBLE PRECISION, request_body BYTEA, response_body BYTEA, PRIMARY KEY (gateway, id)
           );
           CREATE INDEX "{t}_gateway_time" ON "{t}" (gateway, created_at_ms, id);
           CREATE INDEX "{t}_gateway_event" ON "{t}" (gateway, event_id, created_at_ms, id);
           CREATE TABLE "{t}_counts" (gateway TEXT PRIMARY KEY, n BIGINT NOT NULL);
           CREATE TABLE "{t}_rollups" (
               gateway TEXT NOT NULL, grain_ms BIGINT NOT NULL, dim TEXT NOT NULL, bucket_ms BIGINT NOT NULL,
               dim_value TEXT NOT NULL, requests BIGINT NOT NULL, errors BIGINT NOT NULL, cache_hits BIGINT NOT NULL,
               shadow_hits BIGINT NOT NULL, tokens_in BIGINT NOT NULL, tokens_out BIGINT NOT NULL,
               cached_tokens_in BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL, cost_unknown BIGINT NOT NULL,
               cost_usd DOUBLE PRECISION NOT NULL, saved_usd DOUBLE PRECISION NOT NULL,
               shadow_saved_usd DOUBLE PRECISION NOT NULL, duration_sum_ms DOUBLE PRECISION NOT NULL,
               hist JSONB NOT NULL, PRIMARY KEY (gateway, grain_ms, dim, bucket_ms, dim_value)
           );
           CREATE TABLE "{t}_schema" (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), version INTEGER NOT NULL);
           INSERT INTO "{t}_schema" (one, version) VALUES (true, 2);
           INSERT INTO "{t}" (gateway, id, created_at_ms, provider, path, status, success, cache_status, stream,
               duration_ms, custom_cost) VALUES ('gw', 'old', 1000, 'openai', '/v1/chat/completions', 200, true,
               'MISS', false, 10.0, false);
           INSERT INTO "{t}_counts" (gateway, n) VALUES ('gw', 1);"#
    )
}

/// Version-2 tables are converted in place by the first store to open them (replicas starting
/// together convert them once): the old row reads back as sent once with no step, route or
/// breaker; new rows carry the new fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_version_2_tables_are_converted_in_place() {
    if !pg_enabled() {
        return;
    }
    let table = unique("v2");
    let _tables = PgTables(table.clone());
    let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&pg_v2_schema(&table)).await.unwrap();
    let stores: Vec<PostgresLogStore> =
        (0..3).map(|_| PostgresLogStore::connect_with_table(&pg_url(), &table).unwrap()).collect();
    let runs = stores.iter().map(|s| {
        let s = s.clone();
        tokio::spawn(async move { s.ensure_schema().await })
    });
    for r in runs.collect::<Vec<_>>() {
        r.await.unwrap().unwrap();
    }
    let version: i32 = client.query_one(&format!(r#"SELECT version FROM "{table}_schema""#), &[]).await.unwrap().get(0);
    assert_eq!(version, 3);
    let s = &stores[0];
    assert_eq!(s.get("gw", "old").await.unwrap().unwrap(), LogRecord { gateway: "gw".into(), ..rec("old", 1000) });
    let new = full("new", now_ms());
    assert_eq!(s.insert_batch("gw", std::slice::from_ref(&new)).await.unwrap(), 1);
    assert_eq!(stores[1].get("gw", "new").await.unwrap().unwrap(), stored(&new, "gw"));
    let f = LogFilter { route: Some("support".into()), step: Some(2), ..LogFilter::default() };
    assert_eq!(all_ids(s, "gw", &f).await, ["new"]);
    assert_eq!(s.count("gw").await.unwrap(), 2);
    // A later start finds the schema current.
    assert_eq!(pg_store(&table).await.count("gw").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_rollups_sum_exactly() {
    if !pg_enabled() {
        return;
    }
    let table = unique("roll");
    let _tables = PgTables(table.clone());
    let first = pg_store(&table).await;
    let t = now_ms() / MINUTE_MS * MINUTE_MS;
    let writers = (0..4u64).map(|w| {
        let s = PostgresLogStore::connect_with_table(&pg_url(), &table).unwrap();
        tokio::spawn(async move {
            for b in 0..10u64 {
                let batch: Vec<LogRecord> = (0..20u64)
                    .map(|i| {
                        let mut r = rec(&format!("{w}-{b}-{i}"), t + i);
                        r.cost_usd = Some(0.5);
                        r.metadata = vec![("replica".into(), MetaValue::Number(w as f64))];
                        r
                    })
                    .collect();
                if b % 2 == 0 {
                    s.insert_batch("gw", &batch).await.unwrap();
                } else {
                    s.add_to_rollups("gw", &batch).await.unwrap();
                }
            }
        })
    });
    for w in writers.collect::<Vec<_>>() {
        w.await.unwrap();
    }
    let q = AnalyticsQuery {
        from_ms: t,
        to_ms: t + MINUTE_MS,
        granularity: Granularity::Minute,
        group_by: GroupBy::Metadata("replica".into()),
    };
    let a = first.analytics("gw", &q).await.unwrap();
    assert_eq!(a.totals.requests, 800);
    assert_eq!(a.totals.cost_usd, 400.0);
    assert_eq!(a.groups.iter().map(|g| g.stats.requests).collect::<Vec<_>>(), [200; 4]);
    assert_eq!(first.count("gw").await.unwrap(), 400);
}

#[tokio::test]
async fn postgres_unreachable_fails_without_hanging() {
    // Nothing listens on port 1: the store is still built, and every operation fails promptly.
    let url = "postgres://postgres@127.0.0.1:1/test";
    let start = Instant::now();
    let s = open_log_store(&LogBackend::Postgres { url: url.into() }, &Clock::system()).unwrap();
    assert_eq!(s.kind(), "postgres");
    let err = s.insert_batch("gw", &[rec("a", now_ms())]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_) | StoreError::Timeout), "{err:?}");
    assert!(s.list("gw", &LogFilter::default()).await.is_err());
    assert!(s.count("gw").await.is_err());
    assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());
}

#[test]
fn postgres_rejects_bad_configuration() {
    for table in ["", "Logs", "1logs", "logs-x", "logs\"; DROP TABLE x; --", &"a".repeat(41)] {
        assert!(PostgresLogStore::connect_with_table(&pg_url(), table).is_err(), "{table:?}");
    }
    assert!(PostgresLogStore::connect("postgres://h:notaport/db").is_err());
    assert_eq!(PostgresLogStore::connect(&pg_url()).unwrap().table(), aigate_store::DEFAULT_LOG_TABLE);
}
