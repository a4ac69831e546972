//! Rate limits, budgets, alerts and config reload, end to end.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_example_fixed_passes_sliding_refuses() {
    let extra = "[gateways.default]\n\
                 [gateways.fixed]\n[gateways.fixed.rate_limit]\nlimit = 10\nperiod = \"10m\"\ntechnique = \"fixed\"\n\
                 [gateways.sliding]\n[gateways.sliding.rate_limit]\nlimit = 10\nperiod = \"10m\"\ntechnique = \"sliding\"\n";
    let env = env_with(extra, MockConfig::default()).await;
    // Move the gateway's clock to hh:m9:00 of a 10-minute window ("12:09").
    let clock = &env.gw.state.clock;
    let now = clock.now_ms();
    let ten = 600_000;
    clock.advance(Duration::from_millis(ten - now % ten + 9 * 60_000));
    for gw in ["fixed", "sliding"] {
        for i in 0..10 {
            assert_eq!(status_of(&env, &format!("/{gw}/openai/chat/completions"), CHAT, &[]).await, 200, "{gw} #{i}");
        }
    }
    // "12:11": a new fixed window; the sliding window still holds the ten of 12:09.
    clock.advance(Duration::from_secs(120));
    for i in 0..10 {
        assert_eq!(status_of(&env, "/fixed/openai/chat/completions", CHAT, &[]).await, 200, "fixed #{i}");
    }
    let r = post(&env, "/sliding/openai/chat/completions", CHAT, &[]).await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    // The ten of 12:09 leave the window at 12:19 (plus at most one sub-window of 10 s).
    assert!((470..=490).contains(&retry), "retry-after {retry}");
    assert_eq!(h["x-ratelimit-limit-requests"], "10");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let v = error_body(r).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"rate_limit\"") && msg.contains("10 requests per 10m") && msg.contains("10 requests used"),
        "{msg}"
    );
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // 12:19:10: the first ten are out of the window.
    clock.advance(Duration::from_secs(8 * 60 + 10));
    assert_eq!(status_of(&env, "/sliding/openai/chat/completions", CHAT, &[]).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_responses_carry_the_tightest_rule() {
    let extra = "[gateways.default.rate_limit]\nlimit = 100\nperiod = \"1h\"\n\
                 [[gateways.default.limits]]\nname = \"per-user\"\nkey = \"metadata.user\"\nlimit = 3\nperiod = \"1h\"\n\
                 [gateways.default]\n";
    let env = env_with(extra, MockConfig::default()).await;
    let r = post(&env, "/v1/chat/completions", CHAT, &[("cf-aig-metadata", r#"{"user":"alice"}"#)]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "2");
    // Without the metadata the per-user rule does not apply.
    let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "100");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "98");
    for _ in 0..2 {
        assert_eq!(
            status_of(&env, "/v1/chat/completions", CHAT, &[("cf-aig-metadata", r#"{"user":"alice"}"#)]).await,
            200
        );
    }
    let r = post(&env, "/v1/chat/completions", CHAT, &[("cf-aig-metadata", r#"{"user":"alice"}"#)]).await;
    assert_eq!(r.status(), 429);
    assert!(error_body(r).await["error"]["message"].as_str().unwrap().contains("\"per-user\""));
    assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[("cf-aig-metadata", r#"{"user":"bob"}"#)]).await, 200);
    // The refused request did not consume the gateway-wide limit: 100 - 5 passed.
    let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "94");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_under_concurrency_in_memory() {
    let env = env_with(
        "[gateways.default.rate_limit]\nlimit = 50\nperiod = \"1h\"\n[gateways.default]\n",
        MockConfig::default(),
    )
    .await;
    assert_eq!(concurrent_statuses(&[&env], "/v1/chat/completions", CHAT, 200).await, (50, 150));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_across_two_replicas_on_redis() {
    if skip_redis() {
        return;
    }
    let gw = unique_name("rl");
    let extra = format!(
        "[storage]\nlimits = \"redis://127.0.0.1:6379\"\n[gateways.default]\n[gateways.{gw}]\n\
         [gateways.{gw}.rate_limit]\nlimit = 50\nperiod = \"1h\"\n\
         [gateways.{gw}w]\n[gateways.{gw}w.rate_limit]\nlimit = 1000000\nperiod = \"1h\"\n\
         [limits]\non_store_error = \"deny\"\n"
    );
    let a = env_with(&extra, MockConfig::default()).await;
    let b = env_with(&extra, MockConfig::default()).await;
    // Both replicas reach Redis before the burst: a first connection slower than the store's
    // 250 ms operation timeout (a loaded machine) fails open and would admit one request too many.
    for env in [&a, &b] {
        wait_until_within(Duration::from_secs(20), "the replica to reach Redis", async || {
            let errors = metric(env, "aigate_limit_store_errors_total").await;
            let ok = post(env, &format!("/{gw}w/openai/chat/completions"), CHAT, &[]).await.status() == 200;
            ok && metric(env, "aigate_limit_store_errors_total").await == errors
        })
        .await;
    }
    let calls = a.mock.requests() + b.mock.requests();
    let path = format!("/{gw}/openai/chat/completions");
    // Unshared counters would admit 50 per replica.
    let admitted = assert_exact(&[&a, &b], &path, 200, 50).await;
    assert_eq!(a.mock.requests() + b.mock.requests() - calls, admitted as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rules_reserve_then_settle_to_actual_usage() {
    // Each request reserves about 20 (prompt) + 500 (max_tokens) tokens; the mock's answer uses 33.
    let extra = "[[gateways.default.limits]]\nname = \"tokens\"\nmeasure = \"tokens\"\nlimit = 1000\nperiod = \"1h\"\n\
                 [gateways.default]\n";
    let env = env_with(extra, MockConfig::default()).await;
    let body = r#"{"model":"gpt-4o-mini","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    for i in 0..8 {
        let r = post(&env, "/v1/chat/completions", body, &[]).await;
        assert_eq!(r.status(), 200, "request {i}: settled reservations must free the estimate");
        r.bytes().await.unwrap();
        records_stored(&env, i + 1).await;
    }
    // Concurrent requests can overshoot only by what is in flight: ten at once against what is
    // left admit at most what fits their estimates.
    let used_before = {
        let r =
            post(&env, "/v1/chat/completions", r#"{"model":"gpt-4o-mini","max_tokens":1,"messages":[]}"#, &[]).await;
        let rem: u64 = r.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
        r.bytes().await.unwrap();
        records_stored(&env, 9).await;
        1000 - rem
    };
    let left = 1000 - used_before;
    let ok = concurrent_statuses(&[&env], "/v1/chat/completions", body, 10).await.0 as u64;
    let estimate = (body.len() as u64).div_ceil(4) + 500;
    assert!(ok >= 1 && ok <= left / estimate, "{ok} admitted with {left} left and an estimate of {estimate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_alerts_fire_once_per_threshold_and_the_budget_holds() {
    let (hook, got) = webhook_receiver().await;
    // A plain chat costs $0.00001125, counted as 12 micro-dollars; the budget is 48.
    let extra = format!(
        "[limits]\nalert_webhook = \"{hook}\"\n\
         [[gateways.default.budgets]]\nname = \"daily\"\nlimit_usd = 0.000048\nperiod = \"day\"\n\
         [gateways.default]\n"
    );
    let env = env_with(&extra, MockConfig::default()).await;
    let body = r#"{"model":"gpt-4o-mini","max_tokens":14,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(status_of(&env, "/v1/chat/completions", body, &[]).await);
        // Its settlement and alert check are done (one request at a time: alerts in order).
        records_stored(&env, i + 1).await;
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    let r = post(&env, "/v1/chat/completions", body, &[]).await;
    let v = error_body(r).await;
    assert_eq!(v["error"]["code"], "budget_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("budget \"daily\"") && msg.contains("per day"), "{msg}");
    // Every request's alert check is done: the alerts fired are all there are; wait until the
    // webhook has them all.
    records_stored(&env, 7).await;
    let fired = metric(&env, "aigate_budget_alerts_total").await as usize;
    wait_until("the alerts delivered to the webhook", async || got.lock().unwrap().len() >= fired).await;
    let alerts = got.lock().unwrap().clone();
    let thresholds: Vec<f64> = alerts.iter().map(|a| a["threshold"].as_f64().unwrap()).collect();
    assert_eq!(thresholds, [0.5, 0.8, 1.0], "{thresholds:?}");
    assert_eq!(alerts[0]["budget"], "daily");
    assert_eq!(alerts[0]["gateway"], "default");
    let metrics = env.http.get(env.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"aigate_budget_alerts_total{gateway="default",budget="daily",threshold="0.8"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_do_not_count_unless_configured() {
    let base = "[gateways.default.rate_limit]\nlimit = 2\nperiod = \"1h\"\n\
                [gateways.default.cache]\nenabled = true\n[gateways.default]\n";
    let env = env_with(base, MockConfig::default()).await;
    // A miss, its answer written to the cache, then hits.
    let statuses = async |env: &Env, n: usize| {
        let mut v = vec![status_of(env, "/v1/chat/completions", CHAT, &[]).await];
        cache_written(env, 1).await;
        for _ in 1..n {
            v.push(status_of(env, "/v1/chat/completions", CHAT, &[]).await);
        }
        v
    };
    assert_eq!(statuses(&env, 5).await, [200; 5], "hits must pass a spent limit");
    let env = env_with(&format!("[limits]\ncount_cache_hits = true\n{base}"), MockConfig::default()).await;
    assert_eq!(statuses(&env, 4).await, [200, 200, 429, 429]);
}

/// Two `aigate serve` processes share one Redis: 200 concurrent requests against a limit of 50
/// admit exactly 50 in total (fewer only by failed Redis calls, which refuse under "deny").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_across_two_processes_on_redis() {
    if skip_redis() {
        return;
    }
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = unique_name("rp");
    let toml = format!(
        "[storage]\nlimits = \"redis://127.0.0.1:6379\"\n[providers.openai]\nbase_url = \"{}/v1\"\n\
         [gateways.default]\n[gateways.{gw}]\n[gateways.{gw}.rate_limit]\nlimit = 50\nperiod = \"1h\"\n\
         [gateways.{gw}w]\n[gateways.{gw}w.rate_limit]\nlimit = 1000000\nperiod = \"1h\"\n\
         [limits]\non_store_error = \"deny\"\n",
        mock.url()
    );
    let (a, b) = (Aigate::serve(&[], &toml).await, Aigate::serve(&[], &toml).await);
    // Each process connected to Redis before the burst: a first connection slower than the
    // 250 ms operation timeout (a loaded machine) fails open and would admit one request too many.
    for p in [&a, &b] {
        wait_until_within(Duration::from_secs(20), "the process to reach Redis", async || {
            let errors = metric(p, "aigate_limit_store_errors_total").await;
            let ok = status_of(p, &format!("/{gw}w/openai/chat/completions"), CHAT, &[]).await == 200;
            ok && metric(p, "aigate_limit_store_errors_total").await == errors
        })
        .await;
    }
    let calls = mock.requests();
    let path = format!("/{gw}/openai/chat/completions");
    let admitted = assert_exact(&[&a, &b], &path, 200, 50).await;
    assert_eq!(mock.requests() - calls, admitted as u64);
}

/// Sends `n` requests at once spread over `targets`, and checks that a limit of `limit` held
/// across them: exactly `limit` admitted, fewer only by requests whose Redis call failed (slower
/// than the store's 250 ms timeout on a loaded machine), which `on_store_error = "deny"` answers
/// with 503; never more. Returns the number admitted.
async fn assert_exact(targets: &[&impl Target], path: &str, n: usize, limit: usize) -> usize {
    let statuses =
        futures_util::future::join_all((0..n).map(|i| status_of(targets[i % targets.len()], path, CHAT, &[]))).await;
    let count = |s| statuses.iter().filter(|&&x| x == s).count();
    let (admitted, refused, unavailable) = (count(200), count(429), count(503));
    assert_eq!(admitted + refused + unavailable, n, "unexpected statuses: {statuses:?}");
    assert!(admitted <= limit, "admitted {admitted} over a limit of {limit}");
    assert!(admitted + unavailable >= limit, "admitted {admitted} of {limit} with {unavailable} store errors");
    admitted
}

/// Redis stops while the gateway runs: requests follow `on_store_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_requests_follow_on_store_error() {
    if skip_redis() {
        return;
    }
    let port = free_port();
    let redis = RedisServer::start(port).await;
    let mut envs = Vec::new();
    for policy in ["allow", "deny"] {
        let extra = format!(
            "[storage]\nlimits = \"redis://127.0.0.1:{port}\"\n[limits]\non_store_error = \"{policy}\"\n\
             [gateways.default.rate_limit]\nlimit = 100\nperiod = \"1h\"\n[gateways.default]\n"
        );
        let env = env_with(&extra, MockConfig::default()).await;
        assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[]).await, 200, "{policy}: Redis up");
        envs.push((policy, env));
    }
    drop(redis);
    for (policy, env) in &envs {
        let expected = if *policy == "allow" { 200 } else { 503 };
        for _ in 0..3 {
            let t0 = Instant::now();
            assert_eq!(status_of(env, "/v1/chat/completions", CHAT, &[]).await, expected, "{policy}: Redis down");
            assert!(t0.elapsed() < Duration::from_secs(2), "a dead limit store must not hang requests");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_store_follows_on_store_error() {
    for (policy, expected) in [("allow", 200), ("deny", 503)] {
        let extra = format!(
            "[storage]\nlimits = \"redis://127.0.0.1:1\"\n[limits]\non_store_error = \"{policy}\"\n\
             [gateways.default.rate_limit]\nlimit = 1\nperiod = \"1h\"\n[gateways.default]\n"
        );
        let env = env_with(&extra, MockConfig::default()).await;
        for _ in 0..3 {
            let t0 = Instant::now();
            let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
            assert_eq!(r.status().as_u16(), expected, "{policy}");
            assert!(t0.elapsed() < Duration::from_secs(2));
            if expected == 503 {
                let v = error_body(r).await;
                assert_eq!(v["error"]["code"], "limit_store_unavailable");
            }
        }
        assert_eq!(metric(&env, "aigate_limit_store_errors_total").await, 3.0, "{policy}");
    }
}

/// SIGHUP applies an edited config to the next request; an invalid edit is refused and the running
/// config stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_applies_limits_and_refuses_invalid_files() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    // `extra` stands on line 3 of the file.
    let config = |limit: &str, extra: &str| {
        format!(
            "{extra}\n[providers.openai]\nbase_url = \"{}/v1\"\n\
             [gateways.default]\n[gateways.default.rate_limit]\nlimit = {limit}\nperiod = \"1h\"\n",
            mock.url()
        )
    };
    let mut server = Aigate::serve(&[], &config("100", "")).await;
    let limit_header = |r: &reqwest::Response| r.headers()["x-ratelimit-limit-requests"].to_str().unwrap().to_string();
    let path = "/v1/chat/completions";
    let r = post(&server, path, CHAT, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limit_header(&r), "100");

    // Tighten the limit: the next request sees it.
    server.write_config(&config("1", ""));
    server.signal("HUP");
    server.stderr_line("configuration reloaded").await;
    let r = post(&server, path, CHAT, &[]).await;
    assert_eq!(limit_header(&r), "1");
    // The new rule counts afresh (its own key per period): one passes, the next is refused.
    let statuses = [r.status().as_u16(), status_of(&server, path, CHAT, &[]).await];
    assert!(statuses.contains(&429), "{statuses:?}");

    // An invalid file is refused; the running config (limit 1) stays.
    server.write_config(&config("1", "bogus_key = true"));
    server.signal("HUP");
    let line = server.stderr_line("reload refused").await;
    assert!(line.contains("line 3"), "{line}");
    assert_eq!(status_of(&server, path, CHAT, &[]).await, 429);
}

/// Concurrent requests against a budget: what is admitted never costs more than the budget plus
/// what was in flight (here the estimate equals the cost, so exactly what fits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_under_concurrency() {
    // A plain chat costs $0.00001125, reserved and settled as 12 micro-dollars; 48 fit four.
    let extra = "[[gateways.default.budgets]]\nname = \"daily\"\nlimit_usd = 0.000048\nperiod = \"day\"\n\
                 [gateways.default]\n";
    let env = env_with(extra, MockConfig::default()).await;
    let body = r#"{"model":"gpt-4o-mini","max_tokens":14,"messages":[{"role":"user","content":"hi"}]}"#;
    let (ok, _) = concurrent_statuses(&[&env], "/v1/chat/completions", body, 20).await;
    assert_eq!(ok, 4, "the budget admits exactly what its estimates fit");
    assert_eq!(env.mock.requests(), 4);
    // Settled to the actual cost (once the records are stored), the budget stays spent.
    records_stored(&env, 20).await;
    assert_eq!(status_of(&env, "/v1/chat/completions", body, &[]).await, 429);
}
