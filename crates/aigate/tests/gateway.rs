//! End-to-end tests of the request path through real sockets: a mock upstream and the gateway,
//! both on port 0, so tests run in parallel. The helpers they share are in `gateway/common.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "gateway/common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aigate_testkit::{MockConfig, MockUpstream};
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_url_forms_reach_the_same_gateway() {
    let env = env().await;
    for path in
        ["/v1/acct123/default/openai/chat/completions", "/default/openai/chat/completions", "/v1/chat/completions"]
    {
        let resp = post(&env, path, CHAT, &[("authorization", "Bearer sk-client")]).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_log_id(&resp);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "{path}");
        let last = env.mock.last_request().unwrap();
        assert_eq!(last.path_and_query, "/v1/chat/completions", "{path}");
        assert_eq!(last.headers["authorization"], "Bearer sk-client");
        assert_eq!(&last.body[..], CHAT.as_bytes());
    }
    assert_eq!(env.mock.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_gateway_404_unknown_provider_400() {
    let env = env_with("[gateways.default]\n[gateways.prod]\n", MockConfig::default()).await;
    let resp = post(&env, "/v1/acct/nope/openai/chat/completions", CHAT, &[]).await;
    assert_eq!(resp.status(), 404);
    assert_log_id(&resp);
    let v = error_body(resp).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"nope\"") && msg.contains("default, prod"), "{msg}");

    let resp = post(&env, "/prod/nosuch/chat/completions", CHAT, &[]).await;
    assert_eq!(resp.status(), 400);
    let v = error_body(resp).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"nosuch\"") && msg.contains("openai") && msg.contains("anthropic"), "{msg}");
    assert_eq!(env.mock.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_gateway_and_stored_key() {
    let env = env_with(
        "[gateways.default]\n[gateways.prod]\nauthentication = true\ntokens = [\"env:GW_TOKEN\"]\n[gateways.prod.provider_keys]\nopenai = \"env:STORED_KEY\"\n",
        MockConfig::default(),
    )
    .await;
    let path = "/v1/acct/prod/openai/chat/completions";
    // No token, wrong token, wrong scheme: 401, and nothing reaches the upstream.
    for token in [None, Some("Bearer wrong"), Some("gw-secret-token"), Some("Bearer gw-secret-toke")] {
        let headers: Vec<_> = token.map(|t| ("cf-aig-authorization", t)).into_iter().collect();
        let resp = post(&env, path, CHAT, &headers).await;
        assert_eq!(resp.status(), 401, "{token:?}");
        let v = error_body(resp).await;
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(!v.to_string().contains("gw-secret-token"));
    }
    assert_eq!(env.mock.requests(), 0);
    // Right token, no client credential: the stored key is injected.
    let resp = post(&env, path, CHAT, &[("cf-aig-authorization", "Bearer gw-secret-token")]).await;
    assert_eq!(resp.status(), 200);
    let last = env.mock.last_request().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer sk-stored-key-123");
    assert!(last.headers.get("cf-aig-authorization").is_none(), "gateway token leaked upstream");
    // A client credential is replaced by the stored key.
    let resp = post(
        &env,
        path,
        CHAT,
        &[("cf-aig-authorization", "Bearer gw-secret-token"), ("authorization", "Bearer sk-client-own")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(env.mock.last_request().unwrap().headers["authorization"], "Bearer sk-stored-key-123");
    // The unauthenticated default gateway stays open.
    let resp = post(&env, "/default/openai/chat/completions", CHAT, &[]).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_query_and_events_pass_through() {
    let env = env().await;
    let resp = post(
        &env,
        "/default/local/some/endpoint?a=1&b=two%20words&c",
        r#"{"echo":true}"#,
        &[
            ("content-type", "application/json"),
            ("x-custom-header", "kept"),
            ("openai-organization", "org-1"),
            ("cf-aig-event-id", "evt-42"),
            ("cf-aig-metadata", r#"{"user":"u1"}"#),
            ("cf-skip-cache", "true"),
            ("connection", "keep-alive, x-hop-header"),
            ("x-hop-header", "should-go"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cf-aig-event-id"], "evt-42");
    assert_eq!(resp.headers()["x-mock-path"], "/v1/some/endpoint?a=1&b=two%20words&c");
    assert_eq!(resp.headers()["x-mock-method"], "POST");
    assert_eq!(resp.headers()["x-request-id"], "req_mock_0001", "upstream response headers come back");
    assert_log_id(&resp);
    assert_eq!(resp.text().await.unwrap(), r#"{"echo":true}"#);
    let last = env.mock.last_request().unwrap();
    assert_eq!(last.headers["x-custom-header"], "kept");
    assert_eq!(last.headers["openai-organization"], "org-1");
    assert_eq!(last.headers["content-type"], "application/json");
    for gone in ["cf-aig-event-id", "cf-aig-metadata", "cf-skip-cache", "x-hop-header"] {
        assert!(last.headers.get(gone).is_none(), "{gone} went upstream");
    }
    // Host is the upstream's, not the gateway's.
    assert_eq!(last.headers["host"].to_str().unwrap(), env.mock.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_multipart_and_get_bodies() {
    let env = env().await;
    let bin: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let resp = post(&env, "/v1/audio/transcriptions-raw", &bin, &[("content-type", "application/octet-stream")]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &bin[..]);

    let boundary = "----aigateboundary";
    let mut mp = Vec::new();
    mp.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    mp.extend_from_slice(&bin[..5000]);
    mp.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let resp = post(&env, "/v1/audio/transcriptions", &mp, &[("content-type", &ct)]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], ct.as_str());
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &mp[..]);

    let resp = env.http.get(env.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");

    let resp = env.http.delete(env.url("/v1/files/file-1")).send().await.unwrap();
    assert_eq!(resp.headers()["x-mock-method"], "DELETE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_and_embeddings() {
    let env = env().await;
    let resp = post(
        &env,
        "/v1/a/default/anthropic/v1/messages",
        r#"{"model":"claude-3-5-haiku-latest","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
        &[("x-api-key", "sk-ant-client"), ("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    let last = env.mock.last_request().unwrap();
    assert_eq!(last.path_and_query, "/v1/messages");
    assert_eq!(last.headers["x-api-key"], "sk-ant-client");
    assert_eq!(last.headers["anthropic-version"], "2023-06-01");

    let resp = post(&env, "/v1/embeddings", r#"{"model":"text-embedding-3-small","input":["a","b"]}"#, &[]).await;
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_413() {
    let env = env_with("max_request_body = \"1KB\"\n", MockConfig::default()).await;
    let big = vec![b'x'; 2000];
    let resp = post(&env, "/v1/chat/completions", &big, &[]).await;
    assert_eq!(resp.status(), 413);
    error_body(resp).await;
    // Chunked (no content-length): caught while reading.
    let stream = futures_util::stream::iter(
        big.chunks(100).map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c))).collect::<Vec<_>>(),
    );
    let resp =
        env.http.post(env.url("/v1/chat/completions")).body(reqwest::Body::wrap_stream(stream)).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(env.mock.requests(), 0);
    // At the limit passes.
    let resp = post(&env, "/v1/chat/completions", [b' '; 1000], &[]).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_502_without_key() {
    // A port that was free a moment ago: nothing listens there.
    let port = free_port();
    let env = env_with(
        &format!("[providers.dead]\nbase_url = \"http://127.0.0.1:{port}/v1\"\n[gateways.default]\n[gateways.default.provider_keys]\ndead = \"env:STORED_KEY\"\n"),
        MockConfig::default(),
    )
    .await;
    let resp = post(&env, "/default/dead/chat/completions?key=sk-in-query", CHAT, &[]).await;
    assert_eq!(resp.status(), 502);
    assert_log_id(&resp);
    let v = error_body(resp).await;
    let text = v.to_string();
    assert!(text.contains("dead"), "{text}");
    assert!(
        !text.contains("sk-stored-key-123") && !text.contains("sk-in-query") && !text.contains(&port.to_string()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_timeout_504() {
    let env =
        env_with("[gateways.default]\n[gateways.slow]\nrequest_timeout = \"150ms\"\n", MockConfig::default()).await;
    // Per request header.
    let t0 = Instant::now();
    let resp =
        post(&env, "/v1/chat/completions", CHAT, &[("cf-aig-request-timeout", "100"), ("x-mock-latency-ms", "2000")])
            .await;
    assert_eq!(resp.status(), 504);
    assert!(t0.elapsed() < Duration::from_millis(1500));
    let v = error_body(resp).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("100 ms"));
    // Per gateway default.
    let resp = post(&env, "/slow/openai/chat/completions", CHAT, &[("x-mock-latency-ms", "2000")]).await;
    assert_eq!(resp.status(), 504);
    // Timeout covers first byte only: a slow stream that started in time completes.
    let resp = post(
        &env,
        "/slow/openai/chat/completions",
        r#"{"model":"m","stream":true}"#,
        &[("x-mock-chunk-delay-ms", "60"), ("x-mock-chunks", "5")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // Invalid header: 400 naming it.
    let resp = post(&env, "/v1/chat/completions", CHAT, &[("cf-aig-request-timeout", "soon")]).await;
    assert_eq!(resp.status(), 400);
    let v = error_body(resp).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("cf-aig-request-timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_unchanged() {
    let env = env().await;
    let resp = post(&env, "/v1/chat/completions", CHAT, &[("x-mock-status", "429")]).await;
    assert_eq!(resp.status(), 429);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "mock failure with status 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_first_chunk_arrives_before_upstream_finishes() {
    let env = env_with("", MockConfig { chunk_delay: Duration::from_millis(150), ..Default::default() }).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#;
    let resp = post(&env, "/v1/chat/completions", body, &[("x-mock-chunks", "6")]).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    // The upstream has ~1 s of events left: it cannot have finished.
    assert_eq!(env.mock.stats.completed_streams.load(Ordering::SeqCst), 0, "first chunk was held back until the end");
    let mut all = first.to_vec();
    let mut chunks = 1;
    while let Some(c) = stream.next().await {
        all.extend_from_slice(&c.unwrap());
        chunks += 1;
    }
    assert!(chunks >= 6, "events were coalesced: {chunks} chunks");
    let text = String::from_utf8(all).unwrap();
    assert!(text.contains("\"usage\":{"));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_upstream() {
    let env = env_with("", MockConfig { chunk_delay: Duration::from_millis(30), ..Default::default() }).await;
    let resp = post(&env, "/v1/chat/completions", r#"{"model":"m","stream":true}"#, &[("x-mock-chunks", "200")]).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_until("the upstream stream to be cancelled after the client left", async || {
        env.mock.stats.cancelled_streams.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(env.mock.stats.completed_streams.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let env = env().await;
    // One after the other: plain JSON, a stream, a bodiless GET, an upstream error, an empty body.
    for _ in 0..3 {
        assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[]).await, 200);
        let r = post(&env, "/v1/chat/completions", r#"{"model":"m","stream":true}"#, &[]).await;
        assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
        let r = env.http.get(env.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[("x-mock-status", "429")]).await, 429);
    }
    assert_eq!(env.mock.requests(), 12);
    assert_eq!(env.mock.stats.connections.load(Ordering::SeqCst), 1, "one kept-alive upstream connection");

    // Concurrent requests open connections side by side; they are all reused afterwards.
    let burst = || {
        futures_util::future::join_all((0..8).map(|_| async {
            assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[("x-mock-latency-ms", "50")]).await, 200);
        }))
    };
    burst().await;
    let after_first = env.mock.stats.connections.load(Ordering::SeqCst);
    assert!((2..=9).contains(&after_first), "{after_first}");
    burst().await;
    assert_eq!(env.mock.stats.connections.load(Ordering::SeqCst), after_first, "the second burst reuses them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_expire() {
    let env = env_with("[upstream]\npool_idle_timeout = \"300ms\"\n", MockConfig::default()).await;
    let send = || async { assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[]).await, 200) };
    send().await;
    send().await;
    assert_eq!(env.mock.stats.connections.load(Ordering::SeqCst), 1);
    // Time must pass: the pool's idle clock is the system's.
    tokio::time::sleep(Duration::from_millis(600)).await;
    send().await;
    assert_eq!(env.mock.stats.connections.load(Ordering::SeqCst), 2, "an expired connection is not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_closed_by_the_server_is_replaced() {
    // A keep-alive server that answers one request per connection and then closes it quietly
    // (as servers do with idle connections).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let body = r#"{"ok":true}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                sock.write_all(head.as_bytes()).await.unwrap();
                sock.write_all(body.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(sock);
            });
        }
    });
    let env = env_with(&format!("[providers.closer]\nbase_url = \"http://{addr}\"\n"), MockConfig::default()).await;
    for i in 0..3 {
        let r = env.http.get(env.url(&format!("/default/closer/ping/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), r#"{"ok":true}"#);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_stream_is_not_completed_to_client() {
    let env = env().await;
    let resp = post(&env, "/v1/chat/completions", r#"{"model":"m","stream":true}"#, &[("x-mock-cut-after", "3")]).await;
    assert_eq!(resp.status(), 200);
    // The client sees an error, not a clean end, so it cannot mistake a cut stream for a whole one.
    let mut stream = resp.bytes_stream();
    let mut saw_error = false;
    while let Some(c) = stream.next().await {
        if c.is_err() {
            saw_error = true;
            break;
        }
    }
    assert!(saw_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_live_stream() {
    let env = env_with("", MockConfig { chunk_delay: Duration::from_millis(100), ..Default::default() }).await;
    let resp = post(&env, "/v1/chat/completions", r#"{"model":"m","stream":true}"#, &[("x-mock-chunks", "8")]).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let ready = env.http.get(env.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let addr = env.gw.addr;
    env.gw.shutdown();
    // New connections are refused once the listener is closed.
    wait_until("the gateway to stop accepting connections after shutdown", async || {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The live stream runs to its end.
    let mut rest = Vec::new();
    while let Some(c) = stream.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8(rest).unwrap().ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), env.gw.wait()).await.expect("server did not stop after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_cannot_escape_provider_base() {
    let env = env().await;
    // Raw request line: reqwest would normalise `..` away before sending.
    for path in ["/default/openai/../../secret", "/v1/chat/%2e%2e/x", "/default/openai/a%2Fb"] {
        let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 400"), "{path}: {text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    assert_eq!(env.mock.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let env = env().await;
    assert_eq!(env.http.get(env.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(env.http.get(env.url("/readyz")).send().await.unwrap().status(), 200);
}

/// The `aigate` binary as a user runs it.
mod cli {
    use std::process::{Command, Output, Stdio};

    use super::*;

    fn aigate() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_aigate"));
        c.env_remove("AIGATE_CONFIG").current_dir(temp_dir("cli"));
        c
    }

    /// A config of the tests' own (not an example's): they know what it holds and on which line.
    const CONFIG: &str = r#"listen = "127.0.0.1:8787"
data_dir = "./aigate-data"

[providers.local-vllm]
base_url = "http://127.0.0.1:8000/v1"

[gateways.default]

[gateways.prod]
authentication = true
tokens = ["env:AIGATE_TEST_GATEWAY_TOKEN"]

[gateways.prod.provider_keys]
openai = "env:AIGATE_TEST_OPENAI_KEY"
"#;

    /// `aigate check` on [`CONFIG`] with only the variables of `vars` set.
    fn check(vars: &[(&str, &str)]) -> Output {
        let path = temp_dir("cli").join("aigate.toml");
        std::fs::write(&path, CONFIG).unwrap();
        aigate()
            .args(["check", "--config", path.to_str().unwrap()])
            .env_remove("AIGATE_TEST_GATEWAY_TOKEN")
            .env_remove("AIGATE_TEST_OPENAI_KEY")
            .envs(vars.iter().copied())
            .output()
            .unwrap()
    }

    #[test]
    fn version_and_help() {
        let out = aigate().arg("--version").output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("aigate "));
        let out = aigate().arg("--help").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("serve") && text.contains("check"), "{text}");
    }

    #[test]
    fn check_prints_what_the_config_sets_without_secrets() {
        let out =
            check(&[("AIGATE_TEST_GATEWAY_TOKEN", "tok-very-secret"), ("AIGATE_TEST_OPENAI_KEY", "sk-very-secret")]);
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        // Built-in providers (anthropic) are listed beside the config's own.
        for needle in
            ["listen = \"127.0.0.1:8787\"", "prod", "default", "local-vllm", "http://127.0.0.1:8000/v1", "anthropic"]
        {
            assert!(text.contains(needle), "missing {needle}: {text}");
        }
        assert!(!text.contains("tok-very-secret") && !text.contains("sk-very-secret"), "{text}");
    }

    #[test]
    fn check_names_missing_env_key_and_line() {
        let out = check(&[("AIGATE_TEST_OPENAI_KEY", "x")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let line = CONFIG.lines().position(|l| l.contains("env:AIGATE_TEST_GATEWAY_TOKEN")).unwrap() + 1;
        assert!(
            err.contains(&format!("line {line}:"))
                && err.contains("gateways.prod.tokens[0]")
                && err.contains("AIGATE_TEST_GATEWAY_TOKEN"),
            "{err}"
        );
    }

    /// Every example config validates, given the environment variables it names (`env:NAME`).
    #[test]
    fn the_examples_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let vars: Vec<&str> = text
                .split("env:")
                .skip(1)
                .filter_map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next())
                .filter(|name| !name.is_empty())
                .collect();
            let out = aigate()
                .args(["check", "--config", path.to_str().unwrap()])
                .envs(vars.iter().map(|v| (v, "set-by-the-test")))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
        for name in ["aigate.toml", "quickstart.toml"] {
            assert!(checked.iter().any(|c| c == name), "{name} not found in {}", dir.display());
        }
    }

    #[test]
    fn log_format_json_writes_json_lines() {
        use std::io::BufRead;
        let mut child = aigate()
            .args(["--log-format", "json", "serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["level"], "INFO", "{line}");
        assert!(v["fields"]["message"].as_str().unwrap_or("").contains("listening"), "{line}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_stops_cleanly_on_sigterm() {
        let mut server = Aigate::serve(&[], "[gateways.default]\n").await;
        server.signal("TERM");
        let status = server.exit_status().await;
        assert!(status.success(), "exit status {status}");
    }
}

/// The response cache, end to end.
mod cache {
    use super::*;

    const CACHED: &str = "[gateways.default]\n[gateways.default.cache]\nenabled = true\n";

    /// The response's `cf-aig-cache-status` and `aigate-cache` headers.
    fn cache_status(r: &reqwest::Response) -> (String, String) {
        let g = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        (g("cf-aig-cache-status"), g("aigate-cache"))
    }

    /// A request that must miss; returns its body once the cache has written it (no other write
    /// may be pending).
    async fn cache_miss(env: &Env, path: &str, body: &str, headers: &[(&str, &str)]) -> bytes::Bytes {
        let writes = cache_writes(env);
        let r = post(env, path, body, headers).await;
        assert_eq!(cache_status(&r).0, "MISS", "{path} {body}");
        let answer = r.bytes().await.unwrap();
        cache_written(env, writes + 1).await;
        answer
    }

    fn unique_chat() -> String {
        format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"unique {}"}}]}}"#, unique_name("k"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_requests_hit_with_identical_body() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let a = post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-1")]).await;
        assert_eq!(cache_status(&a), ("MISS".into(), "MISS".into()));
        let key = a.headers()["aigate-cache-key"].to_str().unwrap().to_string();
        let body_a = a.bytes().await.unwrap();
        cache_written(&env, 1).await;
        // Key order and whitespace do not matter.
        let reordered =
            "{ \"messages\": [ {\"content\": \"hi\", \"role\": \"user\"} ],\n  \"model\": \"gpt-4o-mini\" }";
        let b = post(&env, "/v1/chat/completions", reordered, &[("authorization", "Bearer sk-1")]).await;
        assert_eq!(cache_status(&b), ("HIT".into(), "HIT".into()));
        assert_eq!(b.headers()["aigate-cache-key"].to_str().unwrap(), key);
        assert!(b.headers().get("age").is_some());
        assert_eq!(b.headers()["content-type"], "application/json");
        assert_eq!(b.headers()["x-request-id"], "req_mock_0001", "provider headers are replayed");
        assert_log_id(&b);
        assert_eq!(b.bytes().await.unwrap(), body_a);
        assert_eq!(env.mock.requests(), 1);
        // Gateway headers such as cf-aig-metadata and cf-aig-event-id are not part of the key.
        let m = post(
            &env,
            "/v1/chat/completions",
            CHAT,
            &[("authorization", "Bearer sk-1"), ("cf-aig-metadata", r#"{"user":"u9"}"#), ("cf-aig-event-id", "e1")],
        )
        .await;
        assert_eq!(cache_status(&m).0, "HIT");
        assert_eq!(env.mock.requests(), 1);
        // A different credential misses.
        let c = post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-2")]).await;
        assert_eq!(cache_status(&c).0, "MISS");
        assert_eq!(env.mock.requests(), 2);
        // A different body misses.
        let d =
            post(&env, "/v1/chat/completions", &CHAT.replace("hi", "hi!"), &[("authorization", "Bearer sk-1")]).await;
        assert_eq!(cache_status(&d).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateway_scope_shares_across_credentials() {
        let env = env_with(&format!("{CACHED}scope = \"gateway\"\n"), MockConfig::default()).await;
        cache_miss(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-1")]).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-2")]).await;
        assert_eq!(cache_status(&r).0, "HIT");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn headers_skip_ttl_key_and_invalid_values() {
        let env = env_with(&format!("{CACHED}[gateways.nocache]\n"), MockConfig::default()).await;
        // skip-cache: neither read nor write.
        for h in ["cf-aig-skip-cache", "cf-skip-cache"] {
            let r = post(&env, "/v1/chat/completions", CHAT, &[(h, "true")]).await;
            assert_eq!(cache_status(&r), ("MISS".into(), "BYPASS".into()));
            r.bytes().await.unwrap();
        }
        // The writer stores entries in order: once this request's answer is written, a skipped
        // request's would have been too.
        cache_miss(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_writes(&env), 1, "a skipped request wrote to the cache");
        // Invalid values: 400 naming the header.
        for (h, v) in [("cf-aig-skip-cache", "maybe"), ("cf-aig-cache-ttl", "5"), ("cf-cache-ttl", "x")] {
            let r = post(&env, "/v1/chat/completions", CHAT, &[(h, v)]).await;
            assert_eq!(r.status(), 400);
            let v = error_body(r).await;
            assert!(v["error"]["message"].as_str().unwrap().contains(h));
        }
        // A gateway with the cache off says OFF, not MISS only.
        let r = post(&env, "/nocache/openai/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_status(&r), ("MISS".into(), "OFF".into()));
        // ... but cf-aig-cache-key caches there anyway (5 minutes).
        let before = env.mock.requests();
        cache_miss(&env, "/nocache/openai/chat/completions", CHAT, &[("cf-aig-cache-key", "my-key")]).await;
        let other_body = CHAT.replace("hi", "something else");
        let r = post(&env, "/nocache/openai/chat/completions", &other_body, &[("cf-aig-cache-key", "my-key")]).await;
        assert_eq!(cache_status(&r).0, "HIT", "custom key replaces the computed key");
        assert_eq!(env.mock.requests(), before + 1);
        // Expiry: 5 minutes for a custom key; the gateway clock moves past it.
        env.gw.state.clock.advance(Duration::from_secs(301));
        let r = post(&env, "/nocache/openai/chat/completions", CHAT, &[("cf-aig-cache-key", "my-key")]).await;
        assert_eq!(cache_status(&r).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ttl_header_and_default_ttl_expire() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let body = unique_chat();
        cache_miss(&env, "/v1/chat/completions", &body, &[("cf-aig-cache-ttl", "120")]).await;
        env.gw.state.clock.advance(Duration::from_secs(100));
        assert_eq!(cache_status(&post(&env, "/v1/chat/completions", &body, &[]).await).0, "HIT");
        env.gw.state.clock.advance(Duration::from_secs(30));
        // Expired after 120 s: a miss (written again).
        cache_miss(&env, "/v1/chat/completions", &body, &[]).await;
        // Default TTL 1h.
        let body2 = unique_chat();
        cache_miss(&env, "/v1/chat/completions", &body2, &[]).await;
        env.gw.state.clock.advance(Duration::from_secs(3500));
        assert_eq!(cache_status(&post(&env, "/v1/chat/completions", &body2, &[]).await).0, "HIT");
        env.gw.state.clock.advance(Duration::from_secs(200));
        assert_eq!(cache_status(&post(&env, "/v1/chat/completions", &body2, &[]).await).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_and_cut_streams_are_not_cached() {
        let env = env_with(CACHED, MockConfig::default()).await;
        for _ in 0..2 {
            assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[("x-mock-status", "500")]).await, 500);
        }
        assert_eq!(env.mock.requests(), 2);
        let stream_body = r#"{"model":"m","stream":true,"messages":[]}"#;
        for _ in 0..2 {
            let r = post(&env, "/v1/chat/completions", stream_body, &[("x-mock-cut-after", "3")]).await;
            assert_eq!(cache_status(&r).0, "MISS");
            let _ = r.bytes().await;
        }
        assert_eq!(env.mock.requests(), 4);
        // Non-cacheable endpoints bypass.
        let r = post(&env, "/v1/images/generations", "{}", &[]).await;
        assert_eq!(cache_status(&r), ("MISS".into(), "BYPASS".into()));
        r.bytes().await.unwrap();
        // The writer stores entries in order: once a clean answer is written, an error's or a cut
        // stream's would have been too.
        cache_miss(&env, "/v1/chat/completions", stream_body, &[]).await;
        assert_eq!(cache_writes(&env), 1, "an error or a cut stream was written to the cache");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identical_requests_make_one_upstream_call() {
        let env = env_with(CACHED, MockConfig { latency: Duration::from_millis(300), ..Default::default() }).await;
        let body = unique_chat();
        let bodies = futures_util::future::join_all((0..50).map(|_| async {
            let r = post(&env, "/v1/chat/completions", &body, &[]).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }))
        .await;
        assert!(bodies.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(env.mock.requests(), 1, "coalescing failed");
        // Streaming followers get the live stream from the first event.
        let sbody = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"coalesce me"}]}"#;
        let sb = futures_util::future::join_all((0..10).map(|_| async {
            post(&env, "/v1/chat/completions", sbody, &[("x-mock-chunk-delay-ms", "30")]).await.bytes().await.unwrap()
        }))
        .await;
        assert!(sb.windows(2).all(|w| w[0] == w[1]));
        assert!(String::from_utf8_lossy(&sb[0]).ends_with("data: [DONE]\n\n"));
        assert_eq!(env.mock.requests(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_leader_lets_followers_go_upstream() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let body = unique_chat();
        let headers = [("x-mock-latency-ms", "200"), ("x-mock-status", "503")];
        let statuses =
            futures_util::future::join_all((0..5).map(|_| status_of(&env, "/v1/chat/completions", &body, &headers)))
                .await;
        assert_eq!(statuses, [503; 5]);
        assert_eq!(env.mock.requests(), 5, "each follower goes upstream after the leader fails");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_hit_replays_the_same_events() {
        let env = env_with(CACHED, MockConfig { chunk_delay: Duration::from_millis(2), ..Default::default() }).await;
        let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"stream"}]}"#;
        let a = cache_miss(&env, "/v1/chat/completions", body, &[]).await;
        let b = post(&env, "/v1/chat/completions", body, &[]).await;
        assert_eq!(cache_status(&b).0, "HIT");
        assert!(b.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let mut events = 0;
        let mut all = Vec::new();
        let mut s = b.bytes_stream();
        while let Some(c) = s.next().await {
            events += 1;
            all.extend_from_slice(&c.unwrap());
        }
        assert_eq!(all, a.to_vec());
        assert!(events > 1, "replayed as one blob");
        assert_eq!(env.mock.requests(), 1);
        // Anthropic streams too.
        let ab = r#"{"model":"claude-3-5-haiku-latest","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#;
        let a = cache_miss(&env, "/default/anthropic/v1/messages", ab, &[]).await;
        let b = post(&env, "/default/anthropic/v1/messages", ab, &[]).await;
        assert_eq!(cache_status(&b).0, "HIT");
        assert_eq!(b.bytes().await.unwrap(), a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shadow_mode_counts_would_be_hits_but_answers_from_upstream() {
        let env = env_with(&format!("{CACHED}mode = \"shadow\"\n"), MockConfig::default()).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_status(&r), ("MISS".into(), "MISS".into()));
        r.bytes().await.unwrap();
        cache_written(&env, 1).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_status(&r), ("MISS".into(), "SHADOW-HIT".into()));
        assert_eq!(env.mock.requests(), 2);
        assert_eq!(env.gw.state.cache.stats.shadow_hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_via_admin_api() {
        let env = env_with(
            &format!("{ADMIN}{CACHED}[gateways.other]\n[gateways.other.cache]\nenabled = true\n"),
            MockConfig::default(),
        )
        .await;
        for gw in ["default", "other"] {
            cache_miss(&env, &format!("/{gw}/openai/chat/completions"), CHAT, &[]).await;
        }
        let url = env.url("/admin/gateways/default/cache");
        assert_eq!(env.http.delete(&url).send().await.unwrap().status(), 401);
        assert_eq!(env.http.delete(&url).bearer_auth("wrong").send().await.unwrap().status(), 401);
        let r = env.http.delete(&url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["purged"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(cache_status(&post(&env, "/default/openai/chat/completions", CHAT, &[]).await).0, "MISS");
        assert_eq!(
            cache_status(&post(&env, "/other/openai/chat/completions", CHAT, &[]).await).0,
            "HIT",
            "other gateway untouched"
        );
        // One key.
        let r = post(&env, "/other/openai/chat/completions", CHAT, &[]).await;
        let key = r.headers()["aigate-cache-key"].to_str().unwrap().to_string();
        let r = env
            .http
            .delete(env.url(&format!("/admin/gateways/other/cache?key={key}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(cache_status(&post(&env, "/other/openai/chat/completions", CHAT, &[]).await).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cli_cache_purge_talks_to_the_running_server() {
        let env = env_with(&format!("{ADMIN}{CACHED}"), MockConfig::default()).await;
        cache_miss(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_status(&post(&env, "/v1/chat/completions", CHAT, &[]).await).0, "HIT");
        let url = format!("http://{}", env.gw.addr);
        let run = |token: &'static str| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_aigate"))
                    .args(["cache", "purge", "--gateway", "default", "--url", &url, "--token", token])
                    .env_remove("AIGATE_CONFIG")
                    .env_remove("AIGATE_ADMIN_TOKEN")
                    .output()
                    .unwrap()
            })
        };
        let out = run("wrong").await.unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
        let out = run(ADMIN_TOKEN).await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("purged 1 entry"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(cache_status(&post(&env, "/v1/chat/completions", CHAT, &[]).await).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_disabled_without_token() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let r = env.http.delete(env.url("/admin/gateways/default/cache")).bearer_auth("x").send().await.unwrap();
        assert_eq!(r.status(), 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_entries_survive_a_restart() {
        let env = env_with(&format!("[storage]\ncache = \"disk\"\n{CACHED}"), MockConfig::default()).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_status(&r).0, "MISS");
        r.bytes().await.unwrap();
        // (No wait for the write: shutting down drains the cache writer.)
        let env = env.restart().await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(cache_status(&r).0, "HIT", "disk entry lost across restart");
        assert_eq!(env.mock.requests(), 1);
    }

    /// The cache on Redis at `url`.
    fn redis_cache(url: &str) -> String {
        format!("[storage]\ncache = \"{url}\"\n{CACHED}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_share_entries_through_redis() {
        if skip_redis() {
            return;
        }
        let extra = redis_cache("redis://127.0.0.1:6379");
        let (a, b) = (env_with(&extra, MockConfig::default()).await, env_with(&extra, MockConfig::default()).await);
        let body = unique_chat();
        cache_miss(&a, "/v1/chat/completions", &body, &[]).await;
        let r = post(&b, "/v1/chat/completions", &body, &[]).await;
        assert_eq!(
            cache_status(&r).0,
            "HIT",
            "the second replica did not see the first one's entry (is Redis running on 127.0.0.1:6379?)"
        );
        assert_eq!(a.mock.requests() + b.mock.requests(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_stopped_mid_test_keeps_requests_succeeding() {
        if skip_redis() {
            return;
        }
        let port = free_port();
        let redis = RedisServer::start(port).await;
        let extra = redis_cache(&format!("redis://127.0.0.1:{port}"));
        let env = env_with(&extra, MockConfig::default()).await;
        assert_eq!(status_of(&env, "/v1/chat/completions", &unique_chat(), &[]).await, 200);
        drop(redis);
        for _ in 0..5 {
            let t0 = Instant::now();
            let status = status_of(&env, "/v1/chat/completions", &unique_chat(), &[]).await;
            assert_eq!(status, 200, "a dead cache store must not fail requests");
            assert!(t0.elapsed() < Duration::from_secs(2));
        }
        assert!(env.gw.state.cache.stats.store_errors.load(Ordering::Relaxed) > 0);
        // Redis comes back: the store reconnects by itself. Proof: an entry written through this
        // gateway is seen by a fresh gateway (empty memory tier) on the same Redis.
        let _redis = RedisServer::start(port).await;
        let fresh = env_with(&extra, MockConfig::default()).await;
        let what = "an entry written through the first gateway to reach a fresh one through Redis";
        wait_until_within(Duration::from_secs(10), what, async || {
            let body = unique_chat();
            assert_eq!(status_of(&env, "/v1/chat/completions", &body, &[]).await, 200);
            cache_status(&post(&fresh, "/v1/chat/completions", &body, &[]).await).0 == "HIT"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_body_gets_408() {
    let env = env_with("request_body_timeout = \"200ms\"\n", MockConfig::default()).await;
    let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let t0 = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(env.mock.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_for_a_slot() {
    let env = env_with("max_connections = 1\n", MockConfig::default()).await;
    // The gateway accepts connections in the order they were made: this one takes the slot.
    let first = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(400), env.http.get(env.url("/healthz")).send()).await;
    assert!(waiting.is_err(), "a second connection was served beyond max_connections = 1");
    drop(first);
    let r = tokio::time::timeout(Duration::from_secs(3), env.http.get(env.url("/healthz")).send()).await;
    assert_eq!(r.expect("served once the slot was free").unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_is_cut_off() {
    let env = env_with("header_read_timeout = \"300ms\"\n", MockConfig::default()).await;
    let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the connection was not closed after the header read timeout");
    assert!(t0.elapsed() >= Duration::from_millis(250) && t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // A complete request on a fresh connection is still served.
    assert_eq!(status_of(&env, "/v1/chat/completions", CHAT, &[]).await, 200);
}

#[path = "gateway/logs.rs"]
mod logs;

#[path = "gateway/limits.rs"]
mod limits;

#[path = "gateway/new_user.rs"]
mod new_user;

#[path = "gateway/dashboard.rs"]
mod dashboard;

#[path = "gateway/compat.rs"]
mod compat;

#[path = "gateway/retries.rs"]
mod retries;

#[path = "gateway/routing.rs"]
mod routing;

#[path = "gateway/report.rs"]
mod report;

#[path = "gateway/telemetry.rs"]
mod telemetry;

#[path = "gateway/replicas.rs"]
mod replicas;

#[path = "gateway/cache_rules.rs"]
mod cache_rules;
#[path = "gateway/faults.rs"]
mod faults;
