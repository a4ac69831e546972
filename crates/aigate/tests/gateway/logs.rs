//! Request logs, usage, cost, metrics and the live tail, end to end.

use super::*;

/// Hand-computed: gpt-4o-mini is $0.15 / $0.60 per million input / output tokens; the mock
/// answers a chat with 19 prompt and 14 completion tokens.
const PLAIN_CHAT_COST: f64 = 19.0 * 0.15e-6 + 14.0 * 0.60e-6;
/// A streamed chat of the mock's default 8 events: 19 prompt, 8 completion tokens.
const STREAM_CHAT_COST: f64 = 19.0 * 0.15e-6 + 8.0 * 0.60e-6;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + b.abs() * 1e-9
}

async fn record(env: &Env, gw: &str, id: &str) -> serde_json::Value {
    admin_get(env, &format!("/admin/gateways/{gw}/logs/{id}")).await
}

fn log_id(r: &reqwest::Response) -> String {
    r.headers()["cf-aig-log-id"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_request_record_has_every_field() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let r = post(
        &env,
        "/v1/acct/default/openai/chat/completions",
        CHAT,
        &[
            ("authorization", "Bearer sk-client-secret"),
            ("cf-aig-event-id", "evt-1"),
            ("cf-aig-metadata", r#"{"user":"alice","n":3,"ok":true,"nested":{"x":1}}"#),
            ("user-agent", "test-agent/1.0"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = log_id(&r);
    r.bytes().await.unwrap();
    let recs = records(&env, "default", 1).await;
    let rec = &recs[0];
    assert_eq!(rec["id"], id.as_str());
    // The id is a UUIDv7 holding the record's time (the SQLite store finds records by it).
    let (secs, nanos) = uuid::Uuid::parse_str(&id).unwrap().get_timestamp().unwrap().to_unix();
    assert_eq!(rec["created_at_ms"].as_u64(), Some(secs * 1000 + u64::from(nanos / 1_000_000)), "{rec}");
    assert_eq!(rec["event_id"], "evt-1");
    assert_eq!(rec["gateway"], "default");
    assert_eq!(rec["provider"], "openai");
    assert_eq!(rec["path"], "chat/completions");
    assert_eq!(rec["requested_model"], "gpt-4o-mini");
    assert_eq!(rec["served_model"], "gpt-4o-mini");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["success"], true);
    assert_eq!(rec["cache_status"], "OFF");
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["tokens_in"], 19);
    assert_eq!(rec["tokens_out"], 14);
    assert_eq!(rec["cached_tokens_in"], 0);
    assert_eq!(rec["reasoning_tokens"], 0);
    assert!(close(rec["cost_usd"].as_f64().unwrap(), PLAIN_CHAT_COST), "{rec}");
    assert!(rec["saved_usd"].is_null());
    assert_eq!(rec["custom_cost"], false);
    assert_eq!(rec["metadata"], serde_json::json!({"n": 3, "ok": true, "user": "alice"}));
    assert_eq!(rec["user_agent"], "test-agent/1.0");
    assert!(rec["error"].is_null());
    let d = rec["duration_ms"].as_f64().unwrap();
    let ttfb = rec["ttfb_ms"].as_f64().unwrap();
    let up = rec["upstream_ms"].as_f64().unwrap();
    let over = rec["overhead_ms"].as_f64().unwrap();
    assert!(d > 0.0 && ttfb > 0.0 && ttfb <= d && up > 0.0 && up <= d && over >= 0.0 && over < d, "{rec}");
    // Bodies are off by default.
    let full = record(&env, "default", &id).await;
    assert!(full.get("request_body").is_none_or(|b| b.is_null()), "{full}");

    // Filters.
    let v = admin_get(&env, "/admin/gateways/default/logs?event_id=evt-1&metadata.user=alice&success=true").await;
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    let v = admin_get(&env, "/admin/gateways/default/logs?metadata.user=bob").await;
    assert_eq!(v["records"].as_array().unwrap().len(), 0);
    let r =
        env.http.get(env.url("/admin/gateways/default/logs?bogus=1")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_is_counted_without_showing_the_client_an_extra_event() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&env, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    // aigate asked the upstream for usage ...
    let sent: serde_json::Value = serde_json::from_slice(&env.mock.last_request().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // ... and the client, who did not, never sees the usage event.
    assert!(!text.contains(r#""prompt_tokens""#), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let rec = &records(&env, "default", 1).await[0];
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["tokens_in"], 19);
    assert_eq!(rec["tokens_out"], 8);
    assert!(close(rec["cost_usd"].as_f64().unwrap(), STREAM_CHAT_COST), "{rec}");

    // A client that asks for usage gets it, unchanged.
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let text = post(&env, "/v1/chat/completions", body, &[]).await.text().await.unwrap();
    assert!(text.contains(r#""prompt_tokens":19"#), "{text}");
    let recs = records(&env, "default", 2).await;
    assert_eq!(recs[0]["tokens_out"], 8);

    // Anthropic streams carry usage in their events.
    let body = r#"{"model":"claude-3-5-haiku-latest","stream":true,"max_tokens":10,"messages":[]}"#;
    let r = post(&env, "/default/anthropic/v1/messages", body, &[("x-api-key", "k")]).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let recs = records(&env, "default", 3).await;
    assert_eq!(recs[0]["provider"], "anthropic");
    assert!(recs[0]["tokens_in"].as_u64().unwrap() > 0 && recs[0]["tokens_out"].as_u64().unwrap() > 0, "{}", recs[0]);
    assert!(recs[0]["cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hit_costs_nothing_and_records_what_it_saved() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.default.cache]\nenabled = true\n"),
        MockConfig::default(),
    )
    .await;
    // A miss, its answer written to the cache, a hit; the same streamed.
    post(&env, "/v1/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
    cache_written(&env, 1).await;
    post(&env, "/v1/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
    let stream = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"s"}]}"#;
    let miss = post(&env, "/v1/chat/completions", stream, &[]).await.text().await.unwrap();
    cache_written(&env, 2).await;
    let hit = post(&env, "/v1/chat/completions", stream, &[]).await.text().await.unwrap();
    // The replayed stream hides the usage event too.
    assert!(!hit.contains(r#""prompt_tokens""#), "{hit}");
    assert_eq!(miss, hit);
    let recs = records(&env, "default", 4).await;
    let (stream_hit, stream_miss, hit, miss) = (&recs[0], &recs[1], &recs[2], &recs[3]);
    assert_eq!(miss["cache_status"], "MISS");
    assert!(close(miss["cost_usd"].as_f64().unwrap(), PLAIN_CHAT_COST));
    assert_eq!(hit["cache_status"], "HIT");
    assert_eq!(hit["cost_usd"], 0.0);
    assert!(close(hit["saved_usd"].as_f64().unwrap(), PLAIN_CHAT_COST), "{hit}");
    assert!(hit["upstream_ms"].is_null());
    assert_eq!(stream_miss["cache_status"], "MISS");
    assert_eq!(stream_hit["cache_status"], "HIT");
    assert_eq!(stream_hit["cost_usd"], 0.0);
    assert!(close(stream_hit["saved_usd"].as_f64().unwrap(), STREAM_CHAT_COST), "{stream_hit}");
    assert_eq!(stream_hit["tokens_out"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_timed_out_requests_are_recorded_with_their_error() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let r = post(&env, "/v1/chat/completions", CHAT, &[("x-mock-status", "503")]).await;
    assert_eq!(r.status(), 503);
    r.bytes().await.unwrap();
    let r = post(
        &env,
        "/v1/chat/completions",
        CHAT,
        &[("x-mock-latency-ms", "2000"), ("cf-aig-request-timeout", "100"), ("authorization", "Bearer sk-secret-x")],
    )
    .await;
    assert_eq!(r.status(), 504);
    r.bytes().await.unwrap();
    let recs = records(&env, "default", 2).await;
    let (timeout, failed) = (&recs[0], &recs[1]);
    assert_eq!(failed["status"], 503);
    assert_eq!(failed["success"], false);
    assert!(!failed["error"].as_str().unwrap().is_empty());
    assert_eq!(failed["cost_usd"], 0.0);
    assert_eq!(timeout["status"], 504);
    assert_eq!(timeout["success"], false);
    let e = timeout["error"].as_str().unwrap();
    assert!(e.contains("100"), "{e}");
    assert!(!e.contains("sk-secret-x"));
    assert!(timeout["tokens_in"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_capped_and_credentials_never_stored() {
    let extra = format!(
        "{ADMIN}[gateways.default]\n[gateways.prod]\nauthentication = true\ntokens = [\"env:GW_TOKEN\"]\n\
         [gateways.prod.provider_keys]\nopenai = \"env:STORED_KEY\"\n\
         [gateways.prod.logs]\nbodies = true\nmax_body_size = \"100B\"\n"
    );
    let env = env_with(&extra, MockConfig::default()).await;
    let r = post(
        &env,
        "/prod/openai/chat/completions",
        CHAT,
        &[("cf-aig-authorization", "Bearer gw-secret-token"), ("authorization", "Bearer sk-client-abc")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = log_id(&r);
    let answer = r.bytes().await.unwrap();
    // Payload off for one request: record without bodies.
    let r = post(
        &env,
        "/prod/openai/chat/completions",
        CHAT,
        &[("cf-aig-authorization", "Bearer gw-secret-token"), ("cf-aig-collect-log-payload", "false")],
    )
    .await;
    let id2 = log_id(&r);
    r.bytes().await.unwrap();
    // Log off for one request: no record.
    post(
        &env,
        "/prod/openai/chat/completions",
        CHAT,
        &[("cf-aig-authorization", "Bearer gw-secret-token"), ("cf-aig-collect-log", "false")],
    )
    .await
    .bytes()
    .await
    .unwrap();
    // Unauthenticated: recorded as a failure.
    let r = post(&env, "/prod/openai/chat/completions", CHAT, &[("cf-aig-authorization", "Bearer wrong")]).await;
    assert_eq!(r.status(), 401);
    r.bytes().await.unwrap();
    // Records are stored in order: were the one not to keep stored, it would be there once the
    // 401 (the newest) is, and make four.
    let recs = records(&env, "prod", 3).await;
    assert_eq!(recs[0]["status"], 401);

    let full = record(&env, "prod", &id).await;
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
    let req = b64(&full["request_body"]);
    let resp = b64(&full["response_body"]);
    assert_eq!(req, &CHAT.as_bytes()[..100.min(CHAT.len())]);
    assert_eq!(resp, &answer[..100]);
    let no_payload = record(&env, "prod", &id2).await;
    assert!(no_payload.get("request_body").is_none_or(|b| b.is_null()), "{no_payload}");

    // No credential anywhere in the store.
    env.gw.shutdown();
    let data_dir = env.gw.state.settings.load().data_dir.clone();
    // Every file under the data directory: the database, its WAL and the body segments.
    let mut all = Vec::new();
    let mut dirs = vec![data_dir.clone()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                all.extend(std::fs::read(&p).unwrap());
            }
        }
    }
    assert!(memchr::memmem::find(&all, &answer[..100]).is_some(), "the scan covers the stored bodies");
    for secret in ["sk-client-abc", "gw-secret-token", "sk-stored-key-123", "Bearer wrong"] {
        assert!(memchr::memmem::find(&all, secret.as_bytes()).is_none(), "{secret} found in the log store");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_cost_and_unknown_models() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let unknown = r#"{"model":"my-own-model-x","messages":[]}"#;
    post(&env, "/v1/chat/completions", unknown, &[]).await.bytes().await.unwrap();
    records(&env, "default", 1).await;
    post(
        &env,
        "/v1/chat/completions",
        unknown,
        &[("cf-aig-custom-cost", r#"{"per_token_in":0.001,"per_token_out":0.002}"#)],
    )
    .await
    .bytes()
    .await
    .unwrap();
    let recs = records(&env, "default", 2).await;
    assert!(recs[1]["cost_usd"].is_null(), "unknown model must cost null: {}", recs[1]);
    assert_eq!(recs[1]["tokens_in"], 19);
    assert!(close(recs[0]["cost_usd"].as_f64().unwrap(), 19.0 * 0.001 + 14.0 * 0.002), "{}", recs[0]);
    assert_eq!(recs[0]["custom_cost"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    post(&env, "/v1/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
    records(&env, "default", 1).await;
    let text = env.http.get(env.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in [
        r#"aigate_requests_total{gateway="default",provider="openai",model="gpt-4o-mini",status_class="2xx",cache_status="OFF"} 1"#,
        r#"aigate_tokens_total{gateway="default",provider="openai",model="gpt-4o-mini",kind="input"} 19"#,
        "aigate_cost_usd_total{",
        "aigate_request_duration_seconds_bucket{",
        "aigate_time_to_first_byte_seconds_count{",
        "aigate_gateway_overhead_seconds_sum{",
        "aigate_cache_entries ",
        "aigate_log_queue_depth 0",
        "aigate_log_records_spilled_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_shows_requests_sent_after_it_started() {
    let env = env_with(&format!("{ADMIN}[gateways.default]\n[gateways.other]\n"), MockConfig::default()).await;
    let resp = env.http.get(env.url("/admin/tail?gateway=default")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // (The tail is subscribed before its response head is sent.)
    let mut lines = resp.bytes_stream();
    post(&env, "/other/openai/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
    let r = post(&env, "/default/openai/chat/completions", CHAT, &[]).await;
    let id = log_id(&r);
    r.bytes().await.unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(5), lines.next()).await.unwrap().unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(chunk.trim_ascii()).unwrap();
    assert_eq!(v["id"], id.as_str(), "the other gateway's request must be filtered out");
    assert_eq!(v["gateway"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_no_record() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = env.http.clone();
        let url = env.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i % 50)).await;
            let r = http.post(url).header("x-mock-latency-ms", "20").body(CHAT).send().await.ok()?;
            let ok = r.headers().contains_key("cf-aig-log-id");
            r.bytes().await.ok()?;
            ok.then_some(())
        }));
    }
    wait_until("requests in flight", async || env.mock.requests() >= 20).await;
    env.gw.shutdown();
    let data_dir = env.gw.state.settings.load().data_dir.clone();
    let mut answered = 0u64;
    for t in tasks {
        if t.await.unwrap().is_some() {
            answered += 1;
        }
    }
    env.gw.wait().await;
    assert!(answered > 0);
    let store = aigate_store::SqliteLogStore::open(&data_dir.join(aigate_store::LOG_SQLITE_FILE)).unwrap();
    use aigate_store::LogStore as _;
    assert_eq!(store.count("default").await.unwrap(), answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_store_spills_to_disk_and_replays_later() {
    let env = env_with(&format!("{ADMIN}[storage]\nlog_queue = 4\n"), MockConfig::default()).await;
    post(&env, "/v1/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
    records(&env, "default", 1).await;
    // Another process holds the database's write lock: the writer stalls (then fails).
    let path = env.gw.state.settings.load().data_dir.join(aigate_store::LOG_SQLITE_FILE);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Requests keep coming. Once the writer has taken a batch and waits on the lock, the queue (4)
    // fills and what does not fit is spilled to disk.
    let started = Instant::now();
    let mut sent = 0;
    wait_until("records spilled to disk", async || {
        assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[]).await, 200);
        sent += 1;
        metric(&env, "aigate_log_records_spilled_total").await > 0.0
    })
    .await;
    // Requests were not held up by the stalled store.
    assert!(started.elapsed() < Duration::from_secs(4), "{sent} requests in {:?}", started.elapsed());
    conn.execute_batch("COMMIT").unwrap();
    drop(conn);
    // Replayed once the store is back (the writer's lock wait ends, the next maintenance replays
    // the spill files): nothing lost, nothing doubled.
    let mut n = 0;
    wait_until_within(Duration::from_secs(20), "the spilled records to be replayed", async || {
        n = admin_get(&env, "/admin/gateways/default/logs?limit=1000").await["records"].as_array().unwrap().len();
        n > sent
    })
    .await;
    assert_eq!(n, 1 + sent, "records of {} requests", 1 + sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tail_and_logs() {
    use std::io::BufRead as _;
    let env = env_with(ADMIN, MockConfig::default()).await;
    let base = format!("http://{}", env.gw.addr);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
        .args(["tail", "--gateway", "default", "--url", &base, "--token", ADMIN_TOKEN])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The tail announces itself on stderr once connected.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    tokio::task::spawn_blocking(move || err.read_line(&mut first).map(|_| first)).await.unwrap().unwrap();
    let r = post(&env, "/v1/chat/completions", CHAT, &[("x-mock-status", "500")]).await;
    r.bytes().await.unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let line = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            let mut l = String::new();
            out.read_line(&mut l).map(|_| l)
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(line.contains(" default gpt-4o-mini 500 OFF "), "{line}");
    assert!(line.contains("error:"), "{line}");

    post(&env, "/v1/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
    records(&env, "default", 2).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
        .args(["logs", "--gateway", "default", "--ok", "--json", "--url", &base, "--token", ADMIN_TOKEN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_and_report_on_real_traffic() {
    let env = env_with(
        &format!("{ADMIN}[gateways.default]\n[gateways.default.cache]\nenabled = true\n"),
        MockConfig::default(),
    )
    .await;
    let chat = |i: usize| format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"q{i}"}}]}}"#);
    for i in 0..4 {
        post(&env, "/v1/chat/completions", &chat(i), &[]).await.bytes().await.unwrap();
    }
    cache_written(&env, 4).await;
    for i in 0..6 {
        let r = post(&env, "/v1/chat/completions", &chat(i % 4), &[]).await;
        assert_eq!(r.headers()["cf-aig-cache-status"], "HIT");
        r.bytes().await.unwrap();
    }
    post(&env, "/v1/chat/completions", &chat(99), &[("x-mock-status", "503")]).await.bytes().await.unwrap();
    // Not kept as a record, still counted in analytics.
    post(&env, "/v1/chat/completions", &chat(0), &[("cf-aig-collect-log", "false")]).await.bytes().await.unwrap();
    records(&env, "default", 11).await;
    // The record not kept reaches the rollups with its batch, maybe the next one.
    let path = "/admin/gateways/default/analytics?since=2h&granularity=minute&group_by=model";
    let mut a = serde_json::Value::Null;
    wait_until("12 requests in the analytics", async || {
        a = admin_get(&env, path).await;
        a["totals"]["requests"].as_u64() >= Some(12)
    })
    .await;
    let t = &a["totals"];
    assert_eq!(t["requests"], 12, "{a:#}");
    assert_eq!(t["cache_hits"], 7);
    assert_eq!(t["errors"], 1);
    assert!(close(t["cost_usd"].as_f64().unwrap(), 4.0 * PLAIN_CHAT_COST), "{t}");
    assert!(close(t["saved_usd"].as_f64().unwrap(), 7.0 * PLAIN_CHAT_COST), "{t}");
    assert!(t["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(a["groups"][0]["group"], "gpt-4o-mini");
    assert!(!a["buckets"].as_array().unwrap().is_empty());
    let r = env.http.get(env.url("/admin/gateways/default/analytics?granularity=week")).bearer_auth(ADMIN_TOKEN);
    assert_eq!(r.send().await.unwrap().status(), 400);

    let base = format!("http://{}", env.gw.addr);
    let report = |extra: &[&str]| {
        let mut args = vec!["report", "--gateway", "default", "--since", "2h", "--url", &base, "--token", ADMIN_TOKEN];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_aigate")).args(args).output().unwrap()
    };
    let out = report(&["--format", "json", "--min-hit-rate", "0.5"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 12);
    assert_eq!(v["upstream_calls"], 5);
    assert!(close(v["hit_rate"].as_f64().unwrap(), 7.0 / 12.0));
    assert!(close(v["cost_without_gateway_usd"].as_f64().unwrap(), 11.0 * PLAIN_CHAT_COST), "{v}");
    assert!(close(v["saved_pct"].as_f64().unwrap(), 7.0 / 11.0), "{v}");
    assert_eq!(v["verdict"], "go");
    let out = report(&["--max-error-rate", "0.01"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Verdict: NO-GO") && text.contains("FAIL error_rate"), "{text}");
    assert!(text.contains("Cache hit rate") && text.contains("58.3 %"), "{text}");
    let out = report(&["--format", "markdown"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout).unwrap().contains("| Requests | 12 |"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
        .args(["report", "--gateway", "nope", "--url", &base, "--token", ADMIN_TOKEN])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Two gateway processes (replicas) sharing the local PostgreSQL: records of both land in one
/// store and analytics count them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_postgres_log_store() {
    if std::env::var("AIGATE_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        eprintln!("AIGATE_SKIP_POSTGRES=1: skipping");
        return;
    }
    let url =
        std::env::var("AIGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    // A gateway name of its own: other runs share the table.
    let gw = unique_name("pg");
    let extra = format!("{ADMIN}[storage]\nlogs = \"{url}\"\n[gateways.{gw}]\n[gateways.default]\n");
    let a = env_with(&extra, MockConfig::default()).await;
    let b = env_with(&extra, MockConfig::default()).await;
    for env in [&a, &b] {
        for _ in 0..3 {
            let r = post(env, &format!("/{gw}/openai/chat/completions"), CHAT, &[]).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }
    records(&a, &gw, 6).await;
    let v = admin_get(&b, &format!("/admin/gateways/{gw}/analytics?since=2h")).await;
    assert_eq!(v["totals"]["requests"], 6, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_and_deletion() {
    let env = env_with(ADMIN, MockConfig::default()).await;
    for model in ["gpt-4o-mini", "gpt-4o"] {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        post(&env, "/v1/chat/completions", &body, &[]).await.bytes().await.unwrap();
    }
    let recs = records(&env, "default", 2).await;
    let id = recs[0]["id"].as_str().unwrap().to_string();
    let url = env.url(&format!("/admin/gateways/default/logs/{id}"));
    let r = env.http.patch(&url).bearer_auth(ADMIN_TOKEN).body(r#"{"feedback":1,"score":0.75}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let rec = record(&env, "default", &id).await;
    assert_eq!(rec["feedback"], 1);
    assert_eq!(rec["score"], 0.75);
    let r = env.http.patch(&url).bearer_auth(ADMIN_TOKEN).body(r#"{"feedback":3}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = env
        .http
        .delete(env.url("/admin/gateways/default/logs?model=gpt-4o"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["deleted"], 1, "{v}");
    let left = records(&env, "default", 1).await;
    assert_eq!(left[0]["requested_model"], "gpt-4o-mini");
    let r = env.http.get(env.url("/admin/gateways/default/logs/nope")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404);
}
