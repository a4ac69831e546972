//! Retries: a failing upstream request is sent again under the request's `cf-aig-max-attempts`,
//! `cf-aig-retry-delay` and `cf-aig-backoff`, or the gateway's `[retries]`.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_and_metered_once() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let h = [("cf-aig-max-attempts", "3"), ("x-mock-fail-first", "2")];
    let r = post(&env, "/v1/chat/completions", CHAT, &h).await;
    assert_eq!(r.status(), 200);
    assert_eq!(env.mock.requests(), 3, "two failures, then the answer");
    let recs = records(&env, "default", 1).await;
    assert_eq!((recs[0]["status"].as_u64(), recs[0]["tokens_in"].as_u64()), (Some(200), Some(19)));
    assert_eq!(metric(&env, "aigate_upstream_retries_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_failure_is_answered_when_attempts_run_out() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let h = [("cf-aig-max-attempts", "2"), ("x-mock-fail-first", "5"), ("x-mock-status", "500")];
    let r = post(&env, "/v1/chat/completions", CHAT, &h).await;
    assert_eq!(r.status(), 500);
    assert_eq!(env.mock.requests(), 2);
    // A 4xx other than 429 is the client's problem: not retried.
    let h = [("cf-aig-max-attempts", "5"), ("x-mock-status", "400")];
    assert_eq!(post(&env, "/v1/chat/completions", CHAT, &h).await.status(), 400);
    assert_eq!(env.mock.requests(), 3);
    // Without a policy, nothing is retried.
    let h = [("x-mock-status", "503")];
    assert_eq!(post(&env, "/v1/chat/completions", CHAT, &h).await.status(), 503);
    assert_eq!(env.mock.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_and_retry_after_set_the_wait() {
    let env = env_with(
        "[gateways.default]\n[gateways.default.retries]\nmax_attempts = 3\ndelay = \"100ms\"\nbackoff = \"exponential\"\n",
        MockConfig::default(),
    )
    .await;
    let t = Instant::now();
    let r = post(&env, "/v1/chat/completions", CHAT, &[("x-mock-fail-first", "2")]).await;
    assert_eq!(r.status(), 200);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300), "100 ms then 200 ms: {took:?}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    // The request's headers override the gateway's policy; a longer Retry-After wins.
    let env2 = common::env().await;
    let t = Instant::now();
    let h = [
        ("cf-aig-max-attempts", "2"),
        ("cf-aig-retry-delay", "0"),
        ("x-mock-fail-first", "1"),
        ("x-mock-status", "429"),
        ("x-mock-retry-after", "1"),
    ];
    assert_eq!(post(&env2, "/v1/chat/completions", CHAT, &h).await.status(), 200);
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_is_retried_then_named() {
    let port = free_port();
    let env = env_with(
        &format!("[providers.dead]\nbase_url = \"http://127.0.0.1:{port}/v1\"\n{ADMIN}"),
        MockConfig::default(),
    )
    .await;
    let h = [("cf-aig-max-attempts", "3"), ("cf-aig-retry-delay", "10"), ("cf-aig-backoff", "linear")];
    let r = post(&env, "/v1/acct/default/dead/chat/completions", CHAT, &h).await;
    assert_eq!(r.status(), 502);
    assert!(error_body(r).await["error"]["message"].as_str().unwrap().contains("dead"));
    assert_eq!(metric(&env, "aigate_upstream_retries_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_retry_headers_are_refused_naming_the_header() {
    let env = env().await;
    for (name, value) in [
        ("cf-aig-max-attempts", "0"),
        ("cf-aig-max-attempts", "6"),
        ("cf-aig-retry-delay", "5001"),
        ("cf-aig-retry-delay", "soon"),
        ("cf-aig-backoff", "fibonacci"),
    ] {
        let r = post(&env, "/v1/chat/completions", CHAT, &[(name, value)]).await;
        assert_eq!(r.status(), 400, "{name}: {value}");
        assert!(error_body(r).await["error"]["message"].as_str().unwrap().starts_with(name));
    }
    assert_eq!(env.mock.requests(), 0);
}

/// The log record counts the times a request went upstream: 3 for two retries then an answer, 1
/// for a plain request, 0 for a cache hit, every attempt of one that failed throughout. No fallback
/// steps or dynamic routes here: `step`, `route` and `breaker` are null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_counts_the_attempts() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.default.cache]\nenabled = true\n"),
        MockConfig::default(),
    )
    .await;
    let log_id = |r: &reqwest::Response| r.headers()["cf-aig-log-id"].to_str().unwrap().to_string();
    let retried_chat = CHAT.replace("hi", "retried");
    let h = [("cf-aig-max-attempts", "3"), ("x-mock-fail-first", "2")];
    let r = post(&env, "/v1/chat/completions", &retried_chat, &h).await;
    assert_eq!(r.status(), 200);
    let retried = log_id(&r);
    r.bytes().await.unwrap();
    let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(r.headers()["cf-aig-cache-status"], "MISS");
    let plain = log_id(&r);
    r.bytes().await.unwrap();
    cache_written(&env, 2).await;
    let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(r.headers()["cf-aig-cache-status"], "HIT");
    let hit = log_id(&r);
    r.bytes().await.unwrap();
    let failing_chat = CHAT.replace("hi", "failing");
    let h = [("cf-aig-max-attempts", "2"), ("x-mock-status", "500")];
    let r = post(&env, "/v1/chat/completions", &failing_chat, &h).await;
    assert_eq!(r.status(), 500);
    let failed = log_id(&r);
    r.bytes().await.unwrap();
    assert_eq!(env.mock.requests(), 6, "3 + 1 + 0 + 2");

    records(&env, "default", 4).await;
    for (id, attempts, status) in [(&retried, 3, 200), (&plain, 1, 200), (&hit, 0, 200), (&failed, 2, 500)] {
        let rec = admin_get(&env, &format!("/admin/gateways/default/logs/{id}")).await;
        assert_eq!((rec["attempts"].as_u64(), rec["status"].as_u64()), (Some(attempts), Some(status)), "{rec}");
        for field in ["step", "route", "breaker"] {
            assert!(rec[field].is_null(), "{field}: {rec}");
        }
    }
    // The route and step filters parse; no record has either.
    let v = admin_get(&env, "/admin/gateways/default/logs?route=support&step=0").await;
    assert_eq!(v["records"].as_array().unwrap().len(), 0);
    let r = env.http.get(env.url("/admin/gateways/default/logs?step=first")).bearer_auth(ADMIN_TOKEN).send().await;
    assert_eq!(r.unwrap().status(), 400);
}
