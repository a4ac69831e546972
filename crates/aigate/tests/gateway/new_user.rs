//! The holes a new user trying the gateway hit, each pinned by a test.

use super::*;

/// Sends `request` as written (no client normalises its path) and reads the whole answer; the
/// request must ask for `connection: close`. Returns the status and the raw answer.
async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Whether the server closes `s` within `within` (reads return end of file or an error).
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_whatever_the_protocol() {
    let env = env_with("max_connections = 4\nheader_read_timeout = \"1s\"\n", MockConfig::default()).await;
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // An empty SETTINGS frame: a complete HTTP/2 connection start that then sends no request.
    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    let starts: [&[u8]; 4] = [
        b"",                                 // says nothing at all
        &H2_PREFACE[..10],                   // a part of the HTTP/2 preface
        b"GET /healthz HTTP/1.1\r\nhost: x", // a part of an HTTP/1.1 head
        &[H2_PREFACE, SETTINGS].concat(),    // an HTTP/2 connection, idle
    ];
    let mut silent = Vec::new();
    for start in starts {
        let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
        s.write_all(start).await.unwrap();
        silent.push(s);
    }
    // Every slot is taken by a silent socket; a health check gets one once they are closed.
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), env.http.get(env.url("/healthz")).send()).await;
    assert_eq!(r.expect("/healthz unreachable: silent connections hold every slot").unwrap().status(), 200);
    assert!(t0.elapsed() >= Duration::from_millis(500), "served before a slot was freed: {:?}", t0.elapsed());
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(3)).await, "silent connection {i} was not closed");
    }

    // A kept-alive HTTP/1.1 connection that goes idle after a request is closed too.
    let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "an idle kept-alive connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_segment_cannot_leave_the_provider_base() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let extra = format!("[providers.workers-ai]\nbase_url = \"{}/accounts/{{account_id}}/ai\"\n", mock.url());
    let env = env_with(&extra, MockConfig::default()).await;
    for path in
        ["/v1/../default/workers-ai/y", "/v1/..%2f..%2fadmin/default/workers-ai/z", "/v1/.%2E/default/workers-ai/y"]
    {
        let req = format!("POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{{}}");
        let (status, text) = raw(env.gw.addr, &req).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("account"), "{path}: the error names the account segment: {text}");
    }
    assert_eq!(mock.requests(), 0, "a request with a traversing account id went upstream");
    // A plain account id still works.
    let req =
        "POST /v1/acct-1/default/workers-ai/y HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
    assert_eq!(raw(env.gw.addr, req).await.0, 200);
    assert_eq!(mock.last_request().unwrap().path_and_query, "/accounts/acct-1/ai/y");
}

async fn cache_status(env: &Env, method: http::Method, path: &str, headers: &[(&str, &str)]) -> String {
    let mut rb = env.http.request(method.clone(), env.url(path));
    if method == http::Method::POST {
        rb = rb.header("content-type", "application/json").body(CHAT);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let status = r.headers()["aigate-cache"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_cache_key_is_namespaced_by_the_credential() {
    let env = env_with(
        "[gateways.default]\n[gateways.default.cache]\nenabled = true\n\
         [gateways.shared]\n[gateways.shared.cache]\nenabled = true\nscope = \"gateway\"\n",
        MockConfig::default(),
    )
    .await;
    let a = [("authorization", "Bearer sk-tenant-a"), ("cf-aig-cache-key", "k1")];
    let b = [("authorization", "Bearer sk-tenant-b"), ("cf-aig-cache-key", "k1")];
    let none = [("cf-aig-cache-key", "k1")];
    let post = http::Method::POST;
    let get = http::Method::GET;
    assert_eq!(cache_status(&env, post.clone(), "/default/openai/chat/completions", &a).await, "MISS");
    cache_written(&env, 1).await;
    assert_eq!(cache_status(&env, post.clone(), "/default/openai/chat/completions", &a).await, "HIT");
    // Another credential, or none, never reads tenant a's answer.
    assert_eq!(cache_status(&env, post.clone(), "/default/openai/chat/completions", &b).await, "MISS");
    assert_eq!(cache_status(&env, post.clone(), "/default/openai/chat/completions", &none).await, "MISS");
    let a_models = [("authorization", "Bearer sk-tenant-a"), ("cf-aig-cache-key", "models")];
    assert_eq!(cache_status(&env, get.clone(), "/default/openai/models", &a_models).await, "MISS");
    cache_written(&env, 4).await;
    assert_eq!(
        cache_status(&env, get.clone(), "/default/openai/models", &[("cf-aig-cache-key", "models")]).await,
        "MISS"
    );
    // scope = "gateway" shares a custom key across credentials.
    assert_eq!(cache_status(&env, post.clone(), "/shared/openai/chat/completions", &a).await, "MISS");
    cache_written(&env, 6).await;
    assert_eq!(cache_status(&env, post.clone(), "/shared/openai/chat/completions", &b).await, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_end_event_is_split_across_reads_is_cached() {
    let env = env_with("[gateways.default]\n[gateways.default.cache]\nenabled = true\n", MockConfig::default()).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"split"}]}"#;
    let send = || {
        env.http
            .post(env.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-mock-split-events", "true")
            .header("x-mock-chunk-delay-ms", "5")
            .body(body)
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.headers()["aigate-cache"], "MISS");
    let first = r.text().await.unwrap();
    assert!(first.ends_with("data: [DONE]\n\n"), "{first}");
    cache_written(&env, 1).await;
    let r = send().await.unwrap();
    assert_eq!(r.headers()["aigate-cache"], "HIT");
    assert_eq!(r.text().await.unwrap(), first);
    assert_eq!(env.mock.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rule_below_default_max_tokens_admits_what_fits() {
    let env = env_with(
        "[gateways.default]\n[[gateways.default.limits]]\nname = \"tpm\"\nmeasure = \"tokens\"\nlimit = 500\nperiod = \"1m\"\n",
        MockConfig::default(),
    )
    .await;
    // A chat without max_tokens on an empty window is admitted, then settled to its usage.
    let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Once settled, a chat that says how much it may generate fits in what is left.
    let small = r#"{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = env.http.post(env.url("/v1/chat/completions")).body(small).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(!text.contains("resets in 0ms"), "{text}");
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{text}");
        assert!(Instant::now() < deadline, "the first chat's reservation was never settled: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Endpoints that generate nothing are not refused by a token rule, whatever is used.
    for _ in 0..3 {
        let r = env.http.get(env.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let embed = r#"{"model":"text-embedding-3-small","input":"hello"}"#;
    let r = post(&env, "/v1/embeddings", embed, &[]).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // A chat that may generate more than is left is refused, with a message that says why and
    // what to do.
    let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
    assert_eq!(r.status(), 429);
    let text = r.text().await.unwrap();
    assert!(text.contains("max_tokens") && !text.contains("resets in 0ms"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_never_exceeds_the_window() {
    for technique in ["fixed", "sliding"] {
        let extra = format!(
            "[gateways.default]\n[gateways.default.rate_limit]\nlimit = 1\nperiod = \"60s\"\ntechnique = \"{technique}\"\n"
        );
        let env = env_with(&extra, MockConfig::default()).await;
        let clock = &env.gw.state.clock;
        // At the start of a fixed window (its whole length is then left).
        clock.advance(Duration::from_millis(60_000 - clock.now_ms() % 60_000));
        assert_eq!(env.http.post(env.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status(), 200);
        let r = env.http.post(env.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{technique}: Retry-After {retry} for a 60 s window");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusal_shows_real_amounts_and_no_request_headers() {
    let env = env_with(
        "[gateways.default]\n[[gateways.default.budgets]]\nname = \"tiny\"\nlimit_usd = 0.00001\nperiod = \"day\"\n",
        MockConfig::default(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let refusal = loop {
        let r = env.http.post(env.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        assert!(Instant::now() < deadline, "the budget never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let h = refusal.headers().clone();
    for name in ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"] {
        assert!(h.get(name).is_none(), "a budget refusal sent {name}: {:?}", h.get(name));
    }
    assert!(h.get("retry-after").is_some());
    let v = error_body(refusal).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert!(!msg.contains("$0.00 ") && !msg.contains("$0.00,") && !msg.contains("$0.00;"), "{msg}");
    assert!(msg.contains("$0.00001"), "the limit is shown as configured: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_answers_an_index_that_links_the_dashboard() {
    let env = env_with("[gateways.default]\n[gateways.prod]\n", MockConfig::default()).await;
    let r = env.http.get(env.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["name"], "aigate");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["gateways"], serde_json::json!(["default", "prod"]));
    for link in ["/healthz", "/readyz", "/metrics", "/dashboard"] {
        assert!(v["links"].as_object().unwrap().values().any(|l| l == link), "{v}");
    }
    // Without an admin token the dashboard is off, and says what turns it on.
    for path in ["/dashboard", "/dashboard/gateways/prod"] {
        let r = env.http.get(env.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v = error_body(r).await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("[admin] token") && !msg.contains("gateway \"\""), "{path}: {msg}");
    }
    assert_eq!(env.mock.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_refused_clearly() {
    let env = env().await;
    let req = "GET /v1/acct/default/openai/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\n\
               upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (status, text) = raw(env.gw.addr, req).await;
    assert_eq!(status, 501, "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "websocket_unsupported");
    assert!(v["error"]["message"].as_str().unwrap().contains("WebSocket"));
    assert_eq!(env.mock.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_numbers_keep_their_form() {
    let env = env_with("[admin]\ntoken = \"env:GW_TOKEN\"\n", MockConfig::default()).await;
    let r = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("cf-aig-metadata", r#"{"n":7,"big":-9007199254740991,"ratio":1.5,"s":"7"}"#)
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["cf-aig-log-id"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    let url = env.url(&format!("/admin/gateways/default/logs/{id}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let r = env.http.get(&url).bearer_auth("gw-secret-token").send().await.unwrap();
        if r.status() == 200 {
            break r.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "the record was never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let md = &v["metadata"];
    assert!(md["n"].is_i64() && md["n"] == 7, "{md}");
    assert!(md["big"].is_i64() && md["big"] == -9_007_199_254_740_991_i64, "{md}");
    assert_eq!(md["ratio"], 1.5);
    assert_eq!(md["s"], "7");
    assert!(!text.contains("7.0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_pool_is_bounded() {
    // The disk cache and the SQLite log store work on the blocking pool: a burst of misses would
    // start a thread for each request waiting on them, up to tokio's default of 512.
    let mock =
        MockUpstream::start(MockConfig { latency: Duration::from_millis(50), ..MockConfig::default() }).await.unwrap();
    let toml = format!(
        "blocking_threads = 4\n[providers.openai]\nbase_url = \"{}/v1\"\n\
         [gateways.default]\n[gateways.default.cache]\nenabled = true\n",
        mock.url()
    );
    let gw = Aigate::serve(&["--log-format", "json"], &toml).await;
    let threads = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap()
    };
    let idle = threads();
    let mut peak = idle;
    for round in 0..3 {
        let sends = (0..96).map(|i| {
            let body = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{round}-{i}"}}]}}"#);
            let gw = &gw;
            async move { post(gw, "/v1/chat/completions", body, &[]).await.status() }
        });
        for status in futures_util::future::join_all(sends).await {
            assert_eq!(status, 200);
        }
        peak = peak.max(threads());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Runtime workers, the blocking pool, and the log spill thread.
    assert!(peak <= cpus + 4 + 2, "{peak} threads after bursts of misses (idle: {idle}, blocking_threads = 4)");
}

mod cli {
    use std::io::{BufRead, Read};
    use std::process::{Command, Stdio};

    fn aigate() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_aigate"));
        c.env_remove("AIGATE_CONFIG");
        c
    }

    #[test]
    fn serve_logs_the_absolute_data_dir() {
        let dir = super::temp_dir("cwd");
        let mut child = aigate()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want = dir.canonicalize().unwrap().join("aigate-data").display().to_string();
        let mut seen = String::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = false;
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(&want) {
                found = true;
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(found, "the absolute data_dir {want} is not in the start-up log:\n{seen}");
    }

    #[test]
    fn check_prints_the_configuration_syntax() {
        let dir = super::temp_dir("check");
        let path = dir.join("aigate.toml");
        std::fs::write(
            &path,
            "[limits]\non_store_error = \"deny\"\n\
             [providers.claude]\nbase_url = \"https://api.anthropic.com\"\nauth = \"x-api-key\"\n\
             [gateways.default]\n[gateways.default.cache]\nenabled = true\nscope = \"gateway\"\n\
             [[gateways.default.limits]]\nname = \"per-user\"\nkey = \"metadata.user_id\"\nlimit = 10\nperiod = \"1m\"\n\
             [[gateways.default.budgets]]\nlimit_usd = 5\nperiod = \"month\"\n",
        )
        .unwrap();
        let out = aigate().args(["check", "--config"]).arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        for rust_name in ["XApiKey", "Metadata(", "Deny", "Gateway", "Month", "Sliding", "Requests"] {
            assert!(!text.contains(rust_name), "`{rust_name}` is a Rust name, not configuration: {text}");
        }
        for syntax in
            ["x-api-key", "on_store_error = \"deny\"", "key = \"metadata.user_id\"", "scope = \"gateway\"", "month"]
        {
            assert!(text.contains(syntax), "missing {syntax:?}: {text}");
        }
    }

    #[test]
    fn a_missing_config_file_is_reported_once() {
        let out = aigate().args(["check", "--config", "/nonexistent/aigate.toml"]).output().unwrap();
        assert!(!out.status.success());
        let mut err = String::new();
        out.stderr.as_slice().read_to_string(&mut err).unwrap();
        assert!(err.contains("/nonexistent/aigate.toml"), "{err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_accepts_gzip_still_gets_metered() {
    // SDKs send `Accept-Encoding: gzip`; a provider that compressed its answer would hide the
    // usage from the meter. aigate asks for the answer uncompressed.
    let env = env_with(ADMIN, MockConfig::default()).await;
    let r = post(&env, "/v1/chat/completions", CHAT, &[("accept-encoding", "gzip, deflate, br")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(env.mock.last_request().unwrap().headers["accept-encoding"], "identity");
    let recs = records(&env, "default", 1).await;
    assert_eq!(recs[0]["tokens_in"], 19);
}
