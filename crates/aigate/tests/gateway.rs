//! End-to-end tests of the request path through real sockets: a mock upstream and the gateway,
//! both on port 0, so tests run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aigate_core::{ServerHandle, Settings};
use aigate_testkit::{MockConfig, MockUpstream};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    mock: MockUpstream,
    gw: ServerHandle,
    http: reqwest::Client,
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.addr, path)
    }
}

/// Starts a mock and a gateway whose `openai`, `anthropic` and `local` providers point at the mock.
/// `extra` is appended to the TOML.
async fn env_with(extra: &str, mock_cfg: MockConfig) -> Env {
    let mock = MockUpstream::start(mock_cfg).await.unwrap();
    let data_dir = temp_dir("data");
    let toml = format!(
        r#"
listen = "127.0.0.1:0"
shutdown_grace = "5s"
data_dir = "{data_dir}"
{extra}
[providers.openai]
base_url = "{m}/v1"
[providers.anthropic]
base_url = "{m}"
[providers.local]
base_url = "{m}/v1"
"#,
        m = mock.url(),
        data_dir = data_dir.display()
    );
    let toml = if toml.contains("[gateways.default]") { toml } else { format!("{toml}\n[gateways.default]\n") };
    let settings = Settings::from_toml_with(&toml, &|name| match name {
        "GW_TOKEN" => Some("gw-secret-token".into()),
        "STORED_KEY" => Some("sk-stored-key-123".into()),
        _ => None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = aigate_core::start_on(settings, listener).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    Env { mock, gw, http }
}

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::AtomicUsize;
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "aigate-test-{}-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn env() -> Env {
    env_with("", MockConfig::default()).await
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn assert_log_id(resp: &reqwest::Response) {
    let id = resp.headers().get("cf-aig-log-id").expect("cf-aig-log-id").to_str().unwrap();
    let u = uuid_parse(id);
    assert_eq!(u, 7, "log id {id} is not a UUIDv7");
}

/// Returns the UUID version nibble of a hyphenated lowercase UUID.
fn uuid_parse(s: &str) -> u32 {
    assert_eq!(s.len(), 36, "{s}");
    assert_eq!(s, s.to_lowercase());
    s[14..15].chars().next().unwrap().to_digit(16).unwrap()
}

async fn error_body(resp: reqwest::Response) -> serde_json::Value {
    let v: serde_json::Value = resp.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e["code"].is_string(), "not OpenAI error shape: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_url_forms_reach_the_same_gateway() {
    let env = env().await;
    for path in
        ["/v1/acct123/default/openai/chat/completions", "/default/openai/chat/completions", "/v1/chat/completions"]
    {
        let resp = env
            .http
            .post(env.url(path))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-client")
            .body(CHAT)
            .send()
            .await
            .unwrap();
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
    let resp = env.http.post(env.url("/v1/acct/nope/openai/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_log_id(&resp);
    let v = error_body(resp).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"nope\"") && msg.contains("default, prod"), "{msg}");

    let resp = env.http.post(env.url("/prod/nosuch/chat/completions")).body(CHAT).send().await.unwrap();
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
    let url = env.url("/v1/acct/prod/openai/chat/completions");
    // No token, wrong token, wrong scheme: 401, and nothing reaches the upstream.
    for token in [None, Some("Bearer wrong"), Some("gw-secret-token"), Some("Bearer gw-secret-toke")] {
        let mut rb = env.http.post(&url).body(CHAT);
        if let Some(t) = token {
            rb = rb.header("cf-aig-authorization", t);
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{token:?}");
        let v = error_body(resp).await;
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(!v.to_string().contains("gw-secret-token"));
    }
    assert_eq!(env.mock.requests(), 0);
    // Right token, no client credential: the stored key is injected.
    let resp =
        env.http.post(&url).header("cf-aig-authorization", "Bearer gw-secret-token").body(CHAT).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let last = env.mock.last_request().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer sk-stored-key-123");
    assert!(last.headers.get("cf-aig-authorization").is_none(), "gateway token leaked upstream");
    // A client credential is replaced by the stored key.
    let resp = env
        .http
        .post(&url)
        .header("cf-aig-authorization", "Bearer gw-secret-token")
        .header("authorization", "Bearer sk-client-own")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(env.mock.last_request().unwrap().headers["authorization"], "Bearer sk-stored-key-123");
    // The unauthenticated default gateway stays open.
    let resp = env.http.post(env.url("/default/openai/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_query_and_events_pass_through() {
    let env = env().await;
    let resp = env
        .http
        .post(env.url("/default/local/some/endpoint?a=1&b=two%20words&c"))
        .header("content-type", "application/json")
        .header("x-custom-header", "kept")
        .header("openai-organization", "org-1")
        .header("cf-aig-event-id", "evt-42")
        .header("cf-aig-metadata", r#"{"user":"u1"}"#)
        .header("cf-skip-cache", "true")
        .header("connection", "keep-alive, x-hop-header")
        .header("x-hop-header", "should-go")
        .body(r#"{"echo":true}"#)
        .send()
        .await
        .unwrap();
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
    let resp = env
        .http
        .post(env.url("/v1/audio/transcriptions-raw"))
        .header("content-type", "application/octet-stream")
        .body(bin.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &bin[..]);

    let boundary = "----aigateboundary";
    let mut mp = Vec::new();
    mp.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    mp.extend_from_slice(&bin[..5000]);
    mp.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let resp = env
        .http
        .post(env.url("/v1/audio/transcriptions"))
        .header("content-type", &ct)
        .body(mp.clone())
        .send()
        .await
        .unwrap();
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
    let resp = env
        .http
        .post(env.url("/v1/a/default/anthropic/v1/messages"))
        .header("x-api-key", "sk-ant-client")
        .header("anthropic-version", "2023-06-01")
        .body(r#"{"model":"claude-3-5-haiku-latest","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    let last = env.mock.last_request().unwrap();
    assert_eq!(last.path_and_query, "/v1/messages");
    assert_eq!(last.headers["x-api-key"], "sk-ant-client");
    assert_eq!(last.headers["anthropic-version"], "2023-06-01");

    let resp = env
        .http
        .post(env.url("/v1/embeddings"))
        .body(r#"{"model":"text-embedding-3-small","input":["a","b"]}"#)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_413() {
    let env = env_with("max_request_body = \"1KB\"\n", MockConfig::default()).await;
    let big = vec![b'x'; 2000];
    let resp = env.http.post(env.url("/v1/chat/completions")).body(big.clone()).send().await.unwrap();
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
    let resp = env.http.post(env.url("/v1/chat/completions")).body(vec![b' '; 1000]).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_502_without_key() {
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let env = env_with(
        &format!("[providers.dead]\nbase_url = \"http://127.0.0.1:{port}/v1\"\n[gateways.default]\n[gateways.default.provider_keys]\ndead = \"env:STORED_KEY\"\n"),
        MockConfig::default(),
    )
    .await;
    let resp =
        env.http.post(env.url("/default/dead/chat/completions?key=sk-in-query")).body(CHAT).send().await.unwrap();
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
    let resp = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("cf-aig-request-timeout", "100")
        .header("x-mock-latency-ms", "2000")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(t0.elapsed() < Duration::from_millis(1500));
    let v = error_body(resp).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("100 ms"));
    // Per gateway default.
    let resp = env
        .http
        .post(env.url("/slow/openai/chat/completions"))
        .header("x-mock-latency-ms", "2000")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    // Timeout covers first byte only: a slow stream that started in time completes.
    let resp = env
        .http
        .post(env.url("/slow/openai/chat/completions"))
        .header("x-mock-chunk-delay-ms", "60")
        .header("x-mock-chunks", "5")
        .body(r#"{"model":"m","stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // Invalid header: 400 naming it.
    let resp = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("cf-aig-request-timeout", "soon")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v = error_body(resp).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("cf-aig-request-timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_unchanged() {
    let env = env().await;
    let resp =
        env.http.post(env.url("/v1/chat/completions")).header("x-mock-status", "429").body(CHAT).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "mock failure with status 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_first_chunk_arrives_before_upstream_finishes() {
    let env = env_with("", MockConfig { chunk_delay: Duration::from_millis(150), ..Default::default() }).await;
    let resp = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("x-mock-chunks", "6")
        .body(r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#)
        .send()
        .await
        .unwrap();
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
    let resp = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("x-mock-chunks", "200")
        .body(r#"{"model":"m","stream":true}"#)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(3);
    while env.mock.stats.cancelled_streams.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "upstream stream was not cancelled after the client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.mock.stats.completed_streams.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let env = env().await;
    // One after the other: plain JSON, a stream, a bodiless GET, an upstream error, an empty body.
    for _ in 0..3 {
        let r = env.http.post(env.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let r =
            env.http.post(env.url("/v1/chat/completions")).body(r#"{"model":"m","stream":true}"#).send().await.unwrap();
        assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
        let r = env.http.get(env.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let r = env
            .http
            .post(env.url("/v1/chat/completions"))
            .header("x-mock-status", "429")
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        r.bytes().await.unwrap();
    }
    assert_eq!(env.mock.requests(), 12);
    assert_eq!(env.mock.stats.connections.load(Ordering::SeqCst), 1, "one kept-alive upstream connection");

    // Concurrent requests open connections side by side; they are all reused afterwards.
    let burst = || {
        futures_util::future::join_all((0..8).map(|_| async {
            let r = env
                .http
                .post(env.url("/v1/chat/completions"))
                .header("x-mock-latency-ms", "50")
                .body(CHAT)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
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
    let send = || async {
        let r = env.http.post(env.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    };
    send().await;
    send().await;
    assert_eq!(env.mock.stats.connections.load(Ordering::SeqCst), 1);
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
    let resp = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("x-mock-cut-after", "3")
        .body(r#"{"model":"m","stream":true}"#)
        .send()
        .await
        .unwrap();
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
    let resp = env
        .http
        .post(env.url("/v1/chat/completions"))
        .header("x-mock-chunks", "8")
        .body(r#"{"model":"m","stream":true}"#)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let ready = env.http.get(env.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let addr = env.gw.addr;
    env.gw.shutdown();
    // New connections are refused once the listener is closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
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
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn aigate() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_aigate"));
        c.env_remove("AIGATE_CONFIG").env_remove("PROD_GATEWAY_TOKEN").env_remove("OPENAI_API_KEY");
        c
    }

    fn example() -> String {
        format!("{}/../../examples/aigate.toml", env!("CARGO_MANIFEST_DIR"))
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
    fn check_prints_what_the_example_configures_without_secrets() {
        let out = aigate()
            .args(["check", "--config", &example()])
            .env("PROD_GATEWAY_TOKEN", "tok-very-secret")
            .env("OPENAI_API_KEY", "sk-very-secret")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        for needle in
            ["listen: 127.0.0.1:8787", "prod", "default", "local-vllm", "http://127.0.0.1:8000/v1", "anthropic"]
        {
            assert!(text.contains(needle), "missing {needle}: {text}");
        }
        assert!(!text.contains("tok-very-secret") && !text.contains("sk-very-secret"), "{text}");
    }

    #[test]
    fn check_names_missing_env_key_and_line() {
        let out = aigate().args(["check", "--config", &example()]).env("OPENAI_API_KEY", "x").output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("line 15") && err.contains("gateways.prod.tokens[0]") && err.contains("PROD_GATEWAY_TOKEN"),
            "{err}"
        );
    }

    #[test]
    fn log_format_json_writes_json_lines() {
        use std::io::BufRead;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = aigate()
            .args(["--log-format", "json", "serve", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(std::env::temp_dir())
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

    #[test]
    fn serve_stops_cleanly_on_sigterm() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = aigate()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                break;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The response cache, end to end.
mod cache {
    use super::*;

    const CACHED: &str = "[gateways.default]\n[gateways.default.cache]\nenabled = true\n";

    async fn post(env: &Env, path: &str, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut rb = env.http.post(env.url(path)).header("content-type", "application/json").body(body.to_string());
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb.send().await.unwrap()
    }

    fn status(r: &reqwest::Response) -> (String, String) {
        let g = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        (g("cf-aig-cache-status"), g("aigate-cache"))
    }

    fn unique_chat() -> String {
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"unique {}"}}]}}"#,
            temp_dir("k").file_name().unwrap().to_string_lossy()
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_requests_hit_with_identical_body() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let a = post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-1")]).await;
        assert_eq!(status(&a), ("MISS".into(), "MISS".into()));
        let key = a.headers()["aigate-cache-key"].to_str().unwrap().to_string();
        let body_a = a.bytes().await.unwrap();
        // Key order and whitespace do not matter.
        let reordered =
            "{ \"messages\": [ {\"content\": \"hi\", \"role\": \"user\"} ],\n  \"model\": \"gpt-4o-mini\" }";
        let mut b = None;
        for _ in 0..50 {
            let r = post(&env, "/v1/chat/completions", reordered, &[("authorization", "Bearer sk-1")]).await;
            if status(&r).0 == "HIT" {
                b = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let b = b.expect("second request never hit");
        assert_eq!(status(&b), ("HIT".into(), "HIT".into()));
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
        assert_eq!(status(&m).0, "HIT");
        assert_eq!(env.mock.requests(), 1);
        // A different credential misses.
        let c = post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-2")]).await;
        assert_eq!(status(&c).0, "MISS");
        assert_eq!(env.mock.requests(), 2);
        // A different body misses.
        let d =
            post(&env, "/v1/chat/completions", &CHAT.replace("hi", "hi!"), &[("authorization", "Bearer sk-1")]).await;
        assert_eq!(status(&d).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateway_scope_shares_across_credentials() {
        let env = env_with(&format!("{CACHED}scope = \"gateway\"\n"), MockConfig::default()).await;
        post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-1")]).await.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[("authorization", "Bearer sk-2")]).await;
        assert_eq!(status(&r).0, "HIT");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn headers_skip_ttl_key_and_invalid_values() {
        let env = env_with(&format!("{CACHED}[gateways.nocache]\n"), MockConfig::default()).await;
        // skip-cache: neither read nor write.
        for h in ["cf-aig-skip-cache", "cf-skip-cache"] {
            let r = post(&env, "/v1/chat/completions", CHAT, &[(h, "true")]).await;
            assert_eq!(status(&r), ("MISS".into(), "BYPASS".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(status(&r).0, "MISS", "a skipped request must not have written");
        // Invalid values: 400 naming the header.
        for (h, v) in [("cf-aig-skip-cache", "maybe"), ("cf-aig-cache-ttl", "5"), ("cf-cache-ttl", "x")] {
            let r = post(&env, "/v1/chat/completions", CHAT, &[(h, v)]).await;
            assert_eq!(r.status(), 400);
            let v = error_body(r).await;
            assert!(v["error"]["message"].as_str().unwrap().contains(h));
        }
        // A gateway with the cache off says OFF, not MISS only.
        let r = post(&env, "/nocache/openai/chat/completions", CHAT, &[]).await;
        assert_eq!(status(&r), ("MISS".into(), "OFF".into()));
        // ... but cf-aig-cache-key caches there anyway (5 minutes).
        let before = env.mock.requests();
        let r = post(&env, "/nocache/openai/chat/completions", CHAT, &[("cf-aig-cache-key", "my-key")]).await;
        assert_eq!(status(&r).0, "MISS");
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let other_body = CHAT.replace("hi", "something else");
        let r = post(&env, "/nocache/openai/chat/completions", &other_body, &[("cf-aig-cache-key", "my-key")]).await;
        assert_eq!(status(&r).0, "HIT", "custom key replaces the computed key");
        assert_eq!(env.mock.requests(), before + 1);
        // Expiry: 5 minutes for a custom key; the gateway clock moves past it.
        env.gw.state.clock.advance(Duration::from_secs(301));
        let r = post(&env, "/nocache/openai/chat/completions", CHAT, &[("cf-aig-cache-key", "my-key")]).await;
        assert_eq!(status(&r).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ttl_header_and_default_ttl_expire() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let body = unique_chat();
        post(&env, "/v1/chat/completions", &body, &[("cf-aig-cache-ttl", "120")]).await.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        env.gw.state.clock.advance(Duration::from_secs(100));
        assert_eq!(status(&post(&env, "/v1/chat/completions", &body, &[]).await).0, "HIT");
        env.gw.state.clock.advance(Duration::from_secs(30));
        assert_eq!(status(&post(&env, "/v1/chat/completions", &body, &[]).await).0, "MISS", "expired after 120 s");
        // Default TTL 1h.
        let body2 = unique_chat();
        post(&env, "/v1/chat/completions", &body2, &[]).await.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        env.gw.state.clock.advance(Duration::from_secs(3500));
        assert_eq!(status(&post(&env, "/v1/chat/completions", &body2, &[]).await).0, "HIT");
        env.gw.state.clock.advance(Duration::from_secs(200));
        assert_eq!(status(&post(&env, "/v1/chat/completions", &body2, &[]).await).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_and_cut_streams_are_not_cached() {
        let env = env_with(CACHED, MockConfig::default()).await;
        for _ in 0..2 {
            let r = post(&env, "/v1/chat/completions", CHAT, &[("x-mock-status", "500")]).await;
            assert_eq!(r.status(), 500);
            r.bytes().await.unwrap();
        }
        assert_eq!(env.mock.requests(), 2);
        let stream_body = r#"{"model":"m","stream":true,"messages":[]}"#;
        for _ in 0..2 {
            let r = post(&env, "/v1/chat/completions", stream_body, &[("x-mock-cut-after", "3")]).await;
            assert_eq!(status(&r).0, "MISS");
            let _ = r.bytes().await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(env.mock.requests(), 4);
        // Non-cacheable endpoints bypass.
        let r = post(&env, "/v1/images/generations", "{}", &[]).await;
        assert_eq!(status(&r), ("MISS".into(), "BYPASS".into()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identical_requests_make_one_upstream_call() {
        let env = env_with(CACHED, MockConfig { latency: Duration::from_millis(300), ..Default::default() }).await;
        let body = unique_chat();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (http, url, body) = (env.http.clone(), env.url("/v1/chat/completions"), body.clone());
            tasks.push(tokio::spawn(async move {
                let r = http.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap()
            }));
        }
        let mut bodies = Vec::new();
        for t in tasks {
            bodies.push(t.await.unwrap());
        }
        assert!(bodies.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(env.mock.requests(), 1, "coalescing failed");
        // Streaming followers get the live stream from the first event.
        let sbody = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"coalesce me"}]}"#;
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (http, url) = (env.http.clone(), env.url("/v1/chat/completions"));
            tasks.push(tokio::spawn(async move {
                let r = http.post(url).header("x-mock-chunk-delay-ms", "30").body(sbody).send().await.unwrap();
                r.bytes().await.unwrap()
            }));
        }
        let mut sb = Vec::new();
        for t in tasks {
            sb.push(t.await.unwrap());
        }
        assert!(sb.windows(2).all(|w| w[0] == w[1]));
        assert!(String::from_utf8_lossy(&sb[0]).ends_with("data: [DONE]\n\n"));
        assert_eq!(env.mock.requests(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_leader_lets_followers_go_upstream() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let body = unique_chat();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (http, url, body) = (env.http.clone(), env.url("/v1/chat/completions"), body.clone());
            tasks.push(tokio::spawn(async move {
                http.post(url)
                    .header("x-mock-latency-ms", "200")
                    .header("x-mock-status", "503")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 503);
        }
        assert_eq!(env.mock.requests(), 5, "each follower goes upstream after the leader fails");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_hit_replays_the_same_events() {
        let env = env_with(CACHED, MockConfig { chunk_delay: Duration::from_millis(2), ..Default::default() }).await;
        let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"stream"}]}"#;
        let a = post(&env, "/v1/chat/completions", body, &[]).await;
        assert_eq!(status(&a).0, "MISS");
        let a = a.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = post(&env, "/v1/chat/completions", body, &[]).await;
        assert_eq!(status(&b).0, "HIT");
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
        let a = post(&env, "/default/anthropic/v1/messages", ab, &[]).await.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = post(&env, "/default/anthropic/v1/messages", ab, &[]).await;
        assert_eq!(status(&b).0, "HIT");
        assert_eq!(b.bytes().await.unwrap(), a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shadow_mode_counts_would_be_hits_but_answers_from_upstream() {
        let env = env_with(&format!("{CACHED}mode = \"shadow\"\n"), MockConfig::default()).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(status(&r), ("MISS".into(), "MISS".into()));
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = post(&env, "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(status(&r), ("MISS".into(), "SHADOW-HIT".into()));
        assert_eq!(env.mock.requests(), 2);
        assert_eq!(env.gw.state.cache.stats.shadow_hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_via_admin_api() {
        let env = env_with(
            &format!(
                "[admin]\ntoken = \"env:GW_TOKEN\"\n{CACHED}[gateways.other]\n[gateways.other.cache]\nenabled = true\n"
            ),
            MockConfig::default(),
        )
        .await;
        for gw in ["default", "other"] {
            post(&env, &format!("/{gw}/openai/chat/completions"), CHAT, &[]).await.bytes().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let url = env.url("/admin/gateways/default/cache");
        assert_eq!(env.http.delete(&url).send().await.unwrap().status(), 401);
        assert_eq!(env.http.delete(&url).bearer_auth("wrong").send().await.unwrap().status(), 401);
        let r = env.http.delete(&url).bearer_auth("gw-secret-token").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["purged"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(status(&post(&env, "/default/openai/chat/completions", CHAT, &[]).await).0, "MISS");
        assert_eq!(
            status(&post(&env, "/other/openai/chat/completions", CHAT, &[]).await).0,
            "HIT",
            "other gateway untouched"
        );
        // One key.
        let r = post(&env, "/other/openai/chat/completions", CHAT, &[]).await;
        let key = r.headers()["aigate-cache-key"].to_str().unwrap().to_string();
        let r = env
            .http
            .delete(env.url(&format!("/admin/gateways/other/cache?key={key}")))
            .bearer_auth("gw-secret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(status(&post(&env, "/other/openai/chat/completions", CHAT, &[]).await).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cli_cache_purge_talks_to_the_running_server() {
        let env = env_with(&format!("[admin]\ntoken = \"env:GW_TOKEN\"\n{CACHED}"), MockConfig::default()).await;
        post(&env, "/v1/chat/completions", CHAT, &[]).await.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(status(&post(&env, "/v1/chat/completions", CHAT, &[]).await).0, "HIT");
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
        let out = run("gw-secret-token").await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("purged 1 entry"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(status(&post(&env, "/v1/chat/completions", CHAT, &[]).await).0, "MISS");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_disabled_without_token() {
        let env = env_with(CACHED, MockConfig::default()).await;
        let r = env.http.delete(env.url("/admin/gateways/default/cache")).bearer_auth("x").send().await.unwrap();
        assert_eq!(r.status(), 404);
    }

    async fn start(toml: &str) -> ServerHandle {
        let settings = Settings::from_toml_with(toml, &|_| None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        aigate_core::start_on(settings, listener).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_entries_survive_a_restart() {
        let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
        let dir = temp_dir("restart");
        let toml = format!(
            "data_dir = {:?}\nshutdown_grace = \"2s\"\n[storage]\ncache = \"disk\"\n[providers.openai]\nbase_url = \"{}/v1\"\n{CACHED}",
            dir.display().to_string(),
            mock.url()
        );
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let gw = start(&toml).await;
        let r = http.post(format!("http://{}/v1/chat/completions", gw.addr)).body(CHAT).send().await.unwrap();
        assert_eq!(status(&r).0, "MISS");
        r.bytes().await.unwrap();
        gw.shutdown();
        gw.wait().await;
        let gw = start(&toml).await;
        let r = http.post(format!("http://{}/v1/chat/completions", gw.addr)).body(CHAT).send().await.unwrap();
        assert_eq!(status(&r).0, "HIT", "disk entry lost across restart");
        assert_eq!(mock.requests(), 1);
    }

    /// Redis tests run unless `AIGATE_SKIP_REDIS=1` (a missing Redis fails them otherwise).
    fn skip_redis() -> bool {
        let skip = std::env::var("AIGATE_SKIP_REDIS").is_ok_and(|v| v == "1");
        if skip {
            eprintln!("AIGATE_SKIP_REDIS=1: skipping a Redis test");
        }
        skip
    }

    fn redis_toml(mock: &MockUpstream, url: &str) -> String {
        format!(
            "data_dir = {:?}\n[storage]\ncache = \"{url}\"\n[providers.openai]\nbase_url = \"{}/v1\"\n{CACHED}",
            temp_dir("redis").display().to_string(),
            mock.url()
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_share_entries_through_redis() {
        if skip_redis() {
            return;
        }
        let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
        let toml = redis_toml(&mock, "redis://127.0.0.1:6379");
        let (a, b) = (start(&toml).await, start(&toml).await);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let body = unique_chat();
        let r = http.post(format!("http://{}/v1/chat/completions", a.addr)).body(body.clone()).send().await.unwrap();
        assert_eq!(status(&r).0, "MISS");
        r.bytes().await.unwrap();
        let mut hit = false;
        for _ in 0..50 {
            let r =
                http.post(format!("http://{}/v1/chat/completions", b.addr)).body(body.clone()).send().await.unwrap();
            if status(&r).0 == "HIT" {
                hit = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(hit, "the second replica never saw the first one's entry (is Redis running on 127.0.0.1:6379?)");
        assert_eq!(mock.requests(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_stopped_mid_test_keeps_requests_succeeding() {
        if skip_redis() {
            return;
        }
        // A Redis of our own, so stopping it does not disturb other tests.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let spawn_redis = || {
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server must be installed")
        };
        let mut redis = spawn_redis();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
        let gw = start(&redis_toml(&mock, &format!("redis://127.0.0.1:{port}"))).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{}/v1/chat/completions", gw.addr);
        let r = http.post(&url).body(unique_chat()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        redis.kill().unwrap();
        redis.wait().unwrap();
        for _ in 0..5 {
            let t0 = Instant::now();
            let r = http.post(&url).body(unique_chat()).send().await.unwrap();
            assert_eq!(r.status(), 200, "a dead cache store must not fail requests");
            assert!(t0.elapsed() < Duration::from_secs(2));
        }
        assert!(gw.state.cache.stats.store_errors.load(Ordering::Relaxed) > 0);
        // Redis comes back: the store reconnects by itself. Proof: an entry written through this
        // gateway is seen by a fresh gateway (empty memory tier) on the same Redis.
        let mut redis = spawn_redis();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let fresh = start(&redis_toml(&mock, &format!("redis://127.0.0.1:{port}"))).await;
        let mut hit = false;
        for _ in 0..40 {
            let body = unique_chat();
            let r = http.post(&url).body(body.clone()).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = http.post(format!("http://{}/v1/chat/completions", fresh.addr)).body(body).send().await.unwrap();
            if status(&r).0 == "HIT" {
                hit = true;
                break;
            }
        }
        let _ = redis.kill();
        let _ = redis.wait();
        assert!(hit, "the store did not recover after Redis came back");
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
    let first = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
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
    let r = env.http.post(env.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[path = "gateway/logs.rs"]
mod logs;

#[path = "gateway/limits.rs"]
mod limits;

#[path = "gateway/new_user.rs"]
mod new_user;
