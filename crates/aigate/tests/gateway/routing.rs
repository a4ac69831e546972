//! Fallback chains (the Universal Endpoint, dynamic routes), splits, the circuit breaker and the
//! canary, against the mock upstream: a provider whose base URL holds `status-503` always fails.

use super::*;

fn routes_toml() -> String {
    format!(
        r#"{ADMIN}
[providers.broken]
base_url = "{{mock}}/status-503/v1"
[gateways.default]
[gateways.default.routes.support]
steps = [ {{ provider = "broken", model = "gpt-4o-mini" }},
          {{ provider = "anthropic", model = "claude-3-5-haiku-latest" }} ]
[[gateways.default.routes.ab.arms]]
weight = 80
steps = [ {{ provider = "openai", model = "gpt-4o-mini" }} ]
[[gateways.default.routes.ab.arms]]
weight = 20
steps = [ {{ provider = "openai", model = "gpt-4.1-mini" }} ]
[[gateways.default.routes.ab.arms]]
when = {{ "metadata.tier" = "free" }}
steps = [ {{ provider = "openai", model = "gpt-3.5-turbo" }} ]
[gateways.default.routes.sticky]
sticky = "metadata.user"
[[gateways.default.routes.sticky.arms]]
steps = [ {{ provider = "openai", model = "a" }} ]
[[gateways.default.routes.sticky.arms]]
steps = [ {{ provider = "openai", model = "b" }} ]
[gateways.default.routes.down]
steps = [ {{ provider = "broken", model = "x", max_attempts = 2 }}, {{ provider = "broken", model = "y" }} ]
"#
    )
}

fn chat(model: &str, text: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_route_falls_back_to_its_next_step() {
    let env = env_with(&routes_toml(), MockConfig::default()).await;
    for path in ["/v1/chat/completions", "/v1/acct/default/compat/chat/completions", "/default/compat/chat/completions"]
    {
        let before = env.mock.requests();
        let r = post(&env, path, chat("dynamic/support", path), &[("authorization", "Bearer sk-client")]).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "cf-aig-step"), "1", "{path}");
        assert_eq!(header(&r, "cf-aig-provider"), "anthropic");
        assert_eq!(header(&r, "cf-aig-model"), "claude-3-5-haiku-latest");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "translated back to OpenAI's shape: {v}");
        assert_eq!(env.mock.requests() - before, 2, "the failing step, then Anthropic");
        let sent = env.mock.last_request().unwrap();
        assert_eq!(sent.path_and_query, "/v1/messages");
        assert_eq!(sent.headers["x-api-key"], "sk-client");
    }
    let recs = records(&env, "default", 3).await;
    assert_eq!(recs[0]["provider"], "anthropic");
    assert_eq!(recs[0]["requested_model"], "dynamic/support");
    assert_eq!(recs[0]["status"], 200);
    assert_eq!((recs[0]["step"].as_u64(), recs[0]["attempts"].as_u64()), (Some(1), Some(2)), "{:#?}", recs[0]);
    let route = recs[0]["route"].as_str().unwrap();
    assert!(route.starts_with("support@") && route.len() == "support@".len() + 8, "{route}");
    let by_route = admin_get(&env, "/admin/gateways/default/logs?route=support").await;
    assert_eq!(by_route["records"].as_array().unwrap().len(), 3);
    assert_eq!(metric(&env, "aigate_fallbacks_total").await, 3.0);

    // Every step failing: the last step's error, with its index, after each step's own attempts.
    let before = env.mock.requests();
    let r = post(&env, "/v1/chat/completions", chat("dynamic/down", "x"), &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "cf-aig-step"), "1");
    assert_eq!(header(&r, "cf-aig-model"), "y");
    assert_eq!(env.mock.requests() - before, 3, "two attempts at the first step, one at the second");

    // An unknown route names the gateway's routes.
    let r = post(&env, "/v1/chat/completions", chat("dynamic/nope", "x"), &[]).await;
    assert_eq!(r.status(), 400);
    let msg = error_body(r).await["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("\"nope\"") && msg.contains("ab, down, sticky, support"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_follows_its_weights_conditions_and_stickiness() {
    let env = env_with(&routes_toml(), MockConfig { chunk_delay: Duration::ZERO, ..MockConfig::default() }).await;
    let n = 400;
    let mut minority = 0;
    for i in 0..n {
        let r = post(&env, "/v1/chat/completions", chat("dynamic/ab", &i.to_string()), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "cf-aig-step"), "0");
        match header(&r, "cf-aig-model") {
            "gpt-4.1-mini" => minority += 1,
            "gpt-4o-mini" => {}
            m => panic!("unexpected arm {m}"),
        }
    }
    // 20 % of 400 is 80; binomial sd 8: a wide margin that still fails a broken split.
    assert!((48..=112).contains(&minority), "{minority} of {n} went to the 20 % arm");
    // An arm whose condition the request meets takes it.
    for i in 0..20 {
        let r = post(
            &env,
            "/v1/chat/completions",
            chat("dynamic/ab", &format!("f{i}")),
            &[("cf-aig-metadata", r#"{"tier":"free"}"#)],
        )
        .await;
        assert_eq!(header(&r, "cf-aig-model"), "gpt-3.5-turbo");
    }
    // A sticky split gives each user one arm, and different users both arms.
    let mut seen = std::collections::HashSet::new();
    for user in 0..16 {
        let meta = format!(r#"{{"user":"u{user}"}}"#);
        let mut models = std::collections::HashSet::new();
        for i in 0..5 {
            let r = post(
                &env,
                "/v1/chat/completions",
                chat("dynamic/sticky", &format!("{user}-{i}")),
                &[("cf-aig-metadata", &meta)],
            )
            .await;
            models.insert(header(&r, "cf-aig-model").to_owned());
        }
        assert_eq!(models.len(), 1, "user {user} moved between arms: {models:?}");
        seen.extend(models);
    }
    assert_eq!(seen.len(), 2, "16 users all on one arm: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_universal_endpoint_tries_its_steps_in_order() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.default.cache]\nenabled = true\n"),
        MockConfig::default(),
    )
    .await;
    let steps = serde_json::json!([
        {"provider": "openai", "endpoint": "chat/completions",
         "headers": {"authorization": "Bearer sk-1", "x-mock-status": "500"},
         "query": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}},
        {"provider": "anthropic", "endpoint": "v1/messages",
         "headers": {"x-api-key": "sk-ant"},
         "query": {"model": "claude-3-5-haiku-latest", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}}
    ])
    .to_string();
    for path in ["/v1/acct/default", "/default"] {
        let r = post(&env, path, &steps, &[]).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "cf-aig-step"), "1");
        if path == "/default" {
            // The second step answered from the cache; the first step carried its own headers.
            let sent = env.mock.last_request().unwrap();
            assert_eq!(
                (sent.path_and_query.as_str(), sent.headers["authorization"].to_str().unwrap()),
                ("/v1/chat/completions", "Bearer sk-1")
            );
        }
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["type"], "message", "the provider's own format: {v}");
    }
    // The first step's 500 was answered twice (a 5xx is not cached); the second step's answer was
    // cached per step: the repeat was a hit.
    let recs = records(&env, "default", 2).await;
    assert_eq!(recs[0]["cache_status"], "HIT", "{:#?}", recs[0]);
    assert_eq!(recs[0]["provider"], "anthropic");
    assert_eq!(recs[0]["path"], "v1/messages");
    assert_eq!(recs[1]["cache_status"], "MISS");

    // The step's headers override the request's: the first step answers when healthy.
    let ok = steps.replace("\"x-mock-status\":\"500\"", "\"x-mock-latency-ms\":\"0\"");
    let r = post(&env, "/v1/acct/default", &ok, &[("cf-aig-skip-cache", "true")]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step")), (200, "0"));
    // All failing: the last step's error and index.
    let bad = steps.replace("\"x-api-key\":\"sk-ant\"", "\"x-api-key\":\"sk-ant\",\"x-mock-status\":\"502\"");
    let r = post(&env, "/v1/acct/default", &bad, &[("cf-aig-skip-cache", "true")]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step")), (502, "1"));

    // A malformed body names the step and the field.
    for (body, want) in [
        (
            r#"[{"provider":"openai","endpoint":"chat/completions","query":{}},{"provider":"openai","query":{}}]"#,
            "step 1: endpoint: missing",
        ),
        (r#"[{"provider":"nosuch","endpoint":"x","query":{}}]"#, "step 0: provider \"nosuch\" is not known"),
        (
            r#"[{"provider":"openai","endpoint":"x","query":{},"config":{"maxAttempts":7}}]"#,
            "step 0: config.maxAttempts",
        ),
        (r#"{"model":"gpt-4o-mini"}"#, "JSON array of steps"),
    ] {
        let r = post(&env, "/v1/acct/default", body, &[]).await;
        assert_eq!(r.status(), 400, "{body}");
        let msg = error_body(r).await["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(want), "{msg} / {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_after_failures_probes_and_closes() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.default.breaker]\nfailures = 2\nwindow = \"10s\"\ncool_off = \"1s\"\n"),
        MockConfig::default(),
    )
    .await;
    let path = "/v1/acct/default/openai/chat/completions";
    for _ in 0..2 {
        assert_eq!(post(&env, path, CHAT, &[("x-mock-status", "500")]).await.status(), 500);
    }
    assert_eq!(metric(&env, "aigate_breaker_state").await, 1.0, "open");
    // Open: refused at once, the provider not asked.
    let before = env.mock.requests();
    let r = post(&env, path, CHAT, &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), "1");
    let e = error_body(r).await;
    assert_eq!(e["error"]["code"], "circuit_open");
    assert!(e["error"]["message"].as_str().unwrap().contains("\"openai\""));
    assert_eq!(env.mock.requests(), before);
    assert_eq!(metric(&env, "aigate_breaker_skips_total").await, 1.0);
    // Other providers are not affected.
    assert_eq!(post(&env, "/v1/acct/default/local/chat/completions", CHAT, &[]).await.status(), 200);
    // After the cool-off one probe goes through; it succeeds and the breaker closes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&env, path, CHAT, &[]).await.status(), 200);
    assert_eq!(metric(&env, "aigate_breaker_state").await, 0.0, "closed");
    assert_eq!(post(&env, path, CHAT, &[]).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_moves_a_chain_to_its_next_step() {
    let toml = format!(
        "{ADMIN}[providers.broken]\nbase_url = \"{{mock}}/status-503/v1\"\n[gateways.default]\n\
         [gateways.default.breaker]\nfailures = 1\ncool_off = \"60s\"\n\
         [gateways.default.routes.r]\nsteps = [ {{ provider = \"broken\", model = \"m\" }}, {{ provider = \"openai\", model = \"gpt-4o-mini\" }} ]\n"
    );
    let env = env_with(&toml, MockConfig::default()).await;
    let r = post(&env, "/v1/chat/completions", chat("dynamic/r", "1"), &[]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step")), (200, "1"));
    let before = env.mock.requests();
    let r = post(&env, "/v1/chat/completions", chat("dynamic/r", "2"), &[]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step")), (200, "1"));
    assert_eq!(env.mock.requests() - before, 1, "the open breaker's provider was skipped");
    let recs = records(&env, "default", 2).await;
    assert_eq!(recs[0]["breaker"], "open: broken", "{:#?}", recs[0]);
    assert_eq!((recs[0]["attempts"].as_u64(), recs[1]["attempts"].as_u64()), (Some(1), Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_serves_its_share_with_its_own_settings() {
    let toml = format!(
        "{ADMIN}[gateways.default]\n[gateways.prod]\n[gateways.prod.canary]\ngateway = \"prod-canary\"\npercent = 25\n\
         [gateways.prod-canary]\n[gateways.prod-canary.cache]\nenabled = true\n\
         [gateways.sticky]\n[gateways.sticky.canary]\ngateway = \"prod-canary\"\npercent = 50\nsticky = \"credential\"\n"
    );
    let env = env_with(&toml, MockConfig { chunk_delay: Duration::ZERO, ..MockConfig::default() }).await;
    let n = 200;
    let mut canary = 0;
    for _ in 0..n {
        // The same request each time: the canary gateway caches, prod does not.
        let r = post(&env, "/v1/acct/prod/openai/chat/completions", CHAT, &[]).await;
        assert_eq!(r.status(), 200);
        match header(&r, "aigate-gateway") {
            "prod-canary" => canary += 1,
            "prod" => {}
            g => panic!("served by {g:?}"),
        }
    }
    assert!((25..=75).contains(&canary), "{canary} of {n} through the 25 % canary");
    let recs = records(&env, "prod-canary", canary).await;
    assert!(recs.iter().filter(|r| r["cache_status"] == "HIT").count() >= canary - 1);
    records(&env, "prod", n - canary).await;
    // A gateway without a canary says nothing.
    let r = post(&env, "/v1/acct/default/openai/chat/completions", CHAT, &[]).await;
    assert_eq!(header(&r, "aigate-gateway"), "");
    // Sticky by credential: a caller stays on one side.
    for key in ["sk-a", "sk-b", "sk-c", "sk-d"] {
        let auth = format!("Bearer {key}");
        let mut sides = std::collections::HashSet::new();
        for _ in 0..6 {
            let r = post(&env, "/v1/acct/sticky/openai/chat/completions", CHAT, &[("authorization", &auth)]).await;
            sides.insert(header(&r, "aigate-gateway").to_owned());
        }
        assert_eq!(sides.len(), 1, "{key}: {sides:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_falls_back() {
    let toml = format!(
        "{ADMIN}[gateways.default]\n[gateways.default.routes.r]\n\
         steps = [ {{ provider = \"openai\", model = \"gpt-4o-mini\", timeout = \"200ms\" }}, {{ provider = \"anthropic\", model = \"claude-3-5-haiku-latest\" }} ]\n"
    );
    let env = env_with(&toml, MockConfig::default()).await;
    let t = Instant::now();
    let r = post(&env, "/v1/chat/completions", chat("dynamic/r", "slow"), &[("x-mock-latency-ms", "600")]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step")), (200, "1"));
    let took = t.elapsed();
    // The first step gave up after its 200 ms (it would have answered at 600 ms: step 0); the
    // second, under the gateway's timeout, waited its 600 ms.
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_limit_is_spent_is_skipped() {
    let toml = format!(
        "{ADMIN}[gateways.default]\n[[gateways.default.limits]]\nname = \"big-model\"\nlimit = 1\nperiod = \"1h\"\nmodel = \"openai/gpt-4o\"\n\
         [gateways.default.routes.r]\nsteps = [ {{ provider = \"openai\", model = \"gpt-4o\" }}, {{ provider = \"openai\", model = \"gpt-4o-mini\" }} ]\n"
    );
    let env = env_with(&toml, MockConfig::default()).await;
    let r = post(&env, "/v1/chat/completions", chat("dynamic/r", "1"), &[]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-model")), (200, "gpt-4o"));
    let before = env.mock.requests();
    let r = post(&env, "/v1/chat/completions", chat("dynamic/r", "2"), &[]).await;
    assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step"), header(&r, "cf-aig-model")), (200, "1", "gpt-4o-mini"));
    assert_eq!(env.mock.requests() - before, 1, "the limited step sent nothing");
    // The same model asked for directly is refused by its rule.
    let r = post(&env, "/v1/chat/completions", chat("openai/gpt-4o", "3"), &[]).await;
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_falls_back_counts_once_against_the_gateways_limit() {
    let toml = format!(
        "{ADMIN}[providers.broken]\nbase_url = \"{{mock}}/status-503/v1\"\n[gateways.default]\n\
         [gateways.default.rate_limit]\nlimit = 2\nperiod = \"1h\"\n\
         [gateways.default.routes.r]\nsteps = [ {{ provider = \"broken\", model = \"m\" }}, {{ provider = \"openai\", model = \"gpt-4o-mini\" }} ]\n"
    );
    let env = env_with(&toml, MockConfig::default()).await;
    for i in 0..2 {
        let r = post(&env, "/v1/chat/completions", chat("dynamic/r", &i.to_string()), &[]).await;
        assert_eq!((r.status().as_u16(), header(&r, "cf-aig-step")), (200, "1"), "request {i}");
        r.bytes().await.unwrap();
    }
    let r = post(&env, "/v1/chat/completions", chat("dynamic/r", "third"), &[]).await;
    assert_eq!(r.status(), 429, "two requests of two allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routing_config_is_refused_naming_the_key() {
    for (toml, want) in [
        (
            "[gateways.g.routes.r]\nsteps = [ { provider = \"nope\", model = \"m\" } ]\n",
            "gateways.g.routes.r.steps[0].provider",
        ),
        ("[gateways.g.canary]\ngateway = \"missing\"\npercent = 5\n", "gateways.g.canary.gateway"),
        ("[gateways.g.canary]\ngateway = \"g\"\npercent = 5\n", "its own canary"),
        ("[gateways.h]\n[gateways.g.canary]\ngateway = \"h\"\npercent = 500\n", "gateways.g.canary.percent"),
        ("[gateways.g.breaker]\nfailures = 0\n", "gateways.g.breaker.failures"),
    ] {
        let toml = format!("default_gateway = \"g\"\n{toml}");
        let e = aigate_core::Settings::from_toml(&toml).unwrap_err().to_string();
        assert!(e.contains(want), "{e} / {want}");
    }
}
