//! Three `aigate serve` processes as replicas behind one mock upstream, sharing one Redis (cache
//! and limits) and one PostgreSQL (logs) on the same config: what one replica caches, counts,
//! spends, logs or purges, the others see.

use super::*;

/// The gateways of one run (names of their own: Redis keys and PostgreSQL rows are shared with
/// other tests and runs).
struct Names {
    /// Cache on.
    cache: String,
    /// 50 requests per hour.
    limit: String,
    /// A budget of 20 plain chats a day.
    budget: String,
    /// A high rate limit (so every replica connects to the limit store) and nothing else.
    plain: String,
}

/// The config every replica runs (beside its own `listen` and `data_dir`).
fn config(n: &Names, mock: &str, hook: &str, token_file: &std::path::Path) -> String {
    let (redis, pg) = ("redis://127.0.0.1:6379", postgres_url());
    format!(
        "[storage]\ncache = \"{redis}\"\nlimits = \"{redis}\"\nlogs = \"{pg}\"\n\
         [admin]\ntoken = {token_file:?}\n\
         [limits]\nalert_webhook = \"{hook}\"\n\
         [providers.openai]\nbase_url = \"{mock}/v1\"\n\
         [gateways.default]\n\
         [gateways.{c}]\n[gateways.{c}.cache]\nenabled = true\n\
         [gateways.{l}]\n[gateways.{l}.rate_limit]\nlimit = 50\nperiod = \"1h\"\n\
         [gateways.{b}]\n[[gateways.{b}.budgets]]\nname = \"daily\"\nlimit_usd = 0.00024\nperiod = \"day\"\n\
         [gateways.{p}]\n[gateways.{p}.rate_limit]\nlimit = 100000\nperiod = \"1h\"\n",
        c = n.cache,
        l = n.limit,
        b = n.budget,
        p = n.plain,
    )
}

/// The chat path of gateway `gw`.
fn chat(gw: &str) -> String {
    format!("/{gw}/openai/chat/completions")
}

/// `aigate` run as a command (`report`, `cache purge`) against replica `r`'s admin API.
async fn cli(r: &Aigate, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aigate"));
    cmd.args(args).args(["--url", &r.url(""), "--token", ADMIN_TOKEN]);
    cmd.env_remove("AIGATE_CONFIG").env_remove("AIGATE_ADMIN_TOKEN");
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

/// How many responses of each status, in order of status.
fn tally(statuses: &[u16]) -> std::collections::BTreeMap<u16, usize> {
    let mut t = std::collections::BTreeMap::new();
    for s in statuses {
        *t.entry(*s).or_default() += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_cache_limits_budgets_logs_and_purges() {
    if skip_redis() || skip_postgres() {
        return;
    }
    let u = unique_name("rep");
    let n = Names { cache: format!("{u}c"), limit: format!("{u}l"), budget: format!("{u}b"), plain: format!("{u}p") };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (hook, alerts) = webhook_receiver().await;
    let token_file = temp_dir("token").join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let toml = config(&n, &mock.url(), &hook, &token_file);
    let replicas = [Aigate::serve(&[], &toml).await, Aigate::serve(&[], &toml).await, Aigate::serve(&[], &toml).await];
    let [r1, r2, r3] = &replicas;
    // What each replica was sent, what each gateway was sent: every one must be a record.
    let mut sent_to = [0u64; 3];
    let mut sent: std::collections::BTreeMap<&str, u64> = Default::default();

    // Warm-up: each replica answers one request, so each has connected to Redis (limits) and
    // PostgreSQL before the bursts below (a connection slower than a store's timeout on a loaded
    // machine would fail open).
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(status_of(r, &chat(&n.plain), CHAT, &[]).await, 200);
        sent_to[i] += 1;
        records_stored(r, sent_to[i]).await;
    }
    *sent.entry(&n.plain).or_default() += 3;

    // 1. Cached through replica 1, a hit on replicas 2 and 3 (twice: Redis, then their memory
    // tier); the mock saw one request.
    let cache_status = |r: &reqwest::Response| r.headers()["aigate-cache"].to_str().unwrap().to_owned();
    let calls = mock.requests();
    let body = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{u}"}}]}}"#);
    let r = post(r1, &chat(&n.cache), &body, &[]).await;
    assert_eq!(cache_status(&r), "MISS");
    let first = r.bytes().await.unwrap();
    sent_to[0] += 1;
    wait_until("replica 1's cache write", async || metric(r1, "aigate_cache_writes_total").await >= 1.0).await;
    for (i, r) in [(1, r2), (2, r3)] {
        for _ in 0..2 {
            let resp = post(r, &chat(&n.cache), &body, &[]).await;
            assert_eq!(cache_status(&resp), "HIT", "replica {}", i + 1);
            assert_eq!(resp.bytes().await.unwrap(), first);
            sent_to[i] += 1;
        }
    }
    assert_eq!(mock.requests() - calls, 1, "the mock must see one request for five answers");
    *sent.entry(&n.cache).or_default() += 5;

    // 2. A limit of 50 requests holds exactly across the three: 150 at once, 50 to each.
    let calls = mock.requests();
    assert_eq!(concurrent_statuses(&[r1, r2, r3], &chat(&n.limit), CHAT, 150).await, (50, 100));
    assert_eq!(mock.requests() - calls, 50);
    for s in &mut sent_to {
        *s += 50;
    }
    *sent.entry(&n.limit).or_default() += 150;

    // 3. A budget of $0.00024 (20 plain chats of $0.000012, reserved and settled as 12
    // micro-dollars) alerts at 50, 80 and 100 %, each once whichever replicas cross it. Twelve at
    // once (60 %) through the three: several replicas settle past 50 %, one alert is sent.
    let budget_body = r#"{"model":"gpt-4o-mini","max_tokens":14,"messages":[{"role":"user","content":"hi"}]}"#;
    let budget_path = chat(&n.budget);
    let statuses =
        futures_util::future::join_all((0..12).map(|i| status_of(&replicas[i % 3], &budget_path, budget_body, &[])))
            .await;
    assert_eq!(statuses, [200; 12]);
    for (i, r) in replicas.iter().enumerate() {
        sent_to[i] += 4;
        records_stored(r, sent_to[i]).await;
    }
    // Then one at a time, round the replicas, to the end of the budget and one past it.
    let mut statuses = Vec::new();
    for i in 12..21 {
        statuses.push(status_of(&replicas[i % 3], &budget_path, budget_body, &[]).await);
        sent_to[i % 3] += 1;
        // Settled, and its alert check done, before the next.
        records_stored(&replicas[i % 3], sent_to[i % 3]).await;
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 200, 429], "the budget admits 20 across the replicas");
    *sent.entry(&n.budget).or_default() += 21;
    let mut fired = 0.0;
    for r in &replicas {
        fired += metric(r, "aigate_budget_alerts_total").await;
    }
    assert_eq!(fired, 3.0, "alerts fired across the replicas");
    wait_until("3 alerts at the webhook", async || alerts.lock().unwrap().len() >= 3).await;
    // Nothing more arrives (an alert fired twice would be POSTed right after the first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = alerts.lock().unwrap().clone();
    let thresholds: Vec<f64> = got.iter().map(|a| a["threshold"].as_f64().unwrap()).collect();
    assert_eq!(thresholds, [0.5, 0.8, 1.0], "{got:#?}");
    assert!(got.iter().all(|a| a["gateway"] == n.budget.as_str() && a["budget"] == "daily"), "{got:#?}");

    // 4. Mixed traffic, three of thirty failing upstream, through the three replicas.
    for i in 0..30 {
        let headers: &[(&str, &str)] = if i % 10 == 9 { &[("x-mock-status", "503")] } else { &[] };
        let status = status_of(&replicas[i % 3], &chat(&n.plain), CHAT, headers).await;
        assert_eq!(status, if i % 10 == 9 { 503 } else { 200 });
        sent_to[i % 3] += 1;
    }
    *sent.entry(&n.plain).or_default() += 30;

    // 5. Every record of every replica is in the one PostgreSQL store: each gateway's records,
    // read through one replica, are all the requests sent to it through the three.
    for (i, r) in replicas.iter().enumerate() {
        records_stored(r, sent_to[i]).await;
    }
    assert_eq!(sent_to.iter().sum::<u64>(), sent.values().sum::<u64>());
    for (gw, &count) in &sent {
        let recs = records(r3, gw, count as usize).await;
        if *gw == n.limit {
            assert_eq!(tally(&recs.iter().map(|x| x["status"].as_u64().unwrap() as u16).collect::<Vec<_>>()), {
                [(200, 50), (429, 100)].into_iter().collect()
            });
        }
    }
    // One `aigate report`, against replica 2: all 33 requests of the three, 3 errors.
    let out = cli(r2, &["report", "--gateway", &n.plain, "--since", "1h", "--format", "json"]).await;
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["requests"].as_u64(), v["errors"].as_u64()), (Some(33), Some(3)), "{v:#}");
    let out = cli(r1, &["report", "--gateway", &n.limit, "--since", "1h", "--format", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"].as_u64(), Some(150), "{v:#}");

    // 6. A purge through replica 2 empties the cache for all three, memory tiers included: the
    // next request on each is a MISS. (Each is answered 503 by the mock, and errors are never
    // cached, so no replica writes a new entry the next one could hit: no race to lose.)
    let out = cli(r2, &["cache", "purge", "--gateway", &n.cache]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let calls = mock.requests();
    for (i, r) in replicas.iter().enumerate() {
        let resp = post(r, &chat(&n.cache), &body, &[("x-mock-status", "503")]).await;
        let (status, cache) = (resp.status().as_u16(), cache_status(&resp));
        resp.bytes().await.unwrap();
        assert_eq!(
            (status, cache.as_str()),
            (503, "MISS"),
            "replica {} served an entry purged through replica 2",
            i + 1
        );
    }
    assert_eq!(mock.requests() - calls, 3);
    // Cached again through one, a hit on the others.
    assert_eq!(cache_status(&post(r3, &chat(&n.cache), &body, &[]).await), "MISS");
    wait_until("replica 3's cache write", async || metric(r3, "aigate_cache_writes_total").await >= 1.0).await;
    assert_eq!(cache_status(&post(r1, &chat(&n.cache), &body, &[]).await), "HIT");
}
