//! aigate-testkit: a mock LLM upstream for tests, demos and benchmarks.
//!
//! The mock speaks enough of OpenAI's and Anthropic's APIs for real SDKs to work against it:
//! chat completions (JSON and SSE, with usage when asked), completions, embeddings, models and
//! Anthropic messages (JSON and SSE). Any other path echoes the request body back with its method
//! and path in `x-mock-method` / `x-mock-path`, which lets tests check pass-through of arbitrary
//! endpoints and binary bodies.
//!
//! Faults are chosen per request with headers (they pass through the gateway untouched):
//! - `x-mock-status: 503`: answer with that status and the provider's error body;
//! - `x-mock-fail-first: N`: the mock's first N requests fail (503, or `x-mock-status`), later
//!   ones succeed; `x-mock-retry-after: S` adds `Retry-After` to the failures;
//! - `x-mock-latency-ms: N`: wait before the response head;
//! - `x-mock-chunk-delay-ms: N`: wait between SSE events;
//! - `x-mock-chunks: N`: number of content events in a stream (default 8);
//! - `x-mock-cut-after: N`: abort a stream after N events (a truncated response);
//! - `x-mock-split-events: true`: send each SSE event in two writes cut in its middle;
//! - `x-mock-drop: true`: close the connection without answering;
//! - a path segment `status-NNN` (e.g. a provider's base URL `http://mock/status-503/v1`): every
//!   request to it fails with that status, so one mock serves a failing and a healthy provider.
//!
//! The mock counts requests, completed and cancelled streams, and can record each request for
//! assertions ([`MockConfig::record`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Mock settings.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Delay before every response head.
    pub latency: Duration,
    /// Delay between SSE events.
    pub chunk_delay: Duration,
    /// Record every request (method, path, headers, body) for tests. Off for benchmarks.
    pub record: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig { latency: Duration::ZERO, chunk_delay: Duration::from_millis(5), record: true }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path_and_query: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Counters shared by the mock and the test.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Streams that ran to the end.
    pub completed_streams: AtomicU64,
    /// Streams whose reader went away before the end.
    pub cancelled_streams: AtomicU64,
    /// Recorded requests (when `record` is on).
    pub recorded: Mutex<Vec<RecordedRequest>>,
}

/// A running mock upstream.
pub struct MockUpstream {
    /// Bound address.
    pub addr: SocketAddr,
    /// Counters.
    pub stats: Arc<MockStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(cfg: MockConfig) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, cfg)
    }

    /// Starts on a bound listener.
    pub fn start_on(listener: TcpListener, cfg: MockConfig) -> std::io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let task = tokio::spawn(serve(listener, Arc::new(cfg), stats.clone()));
        Ok(MockUpstream { addr, stats, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// The last recorded request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.stats.recorded.lock().ok().and_then(|r| r.last().cloned())
    }
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, cfg: Arc<MockConfig>, stats: Arc<MockStats>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let (cfg, stats) = (cfg.clone(), stats.clone());
        let svc = service_fn(move |req| handle(req, cfg.clone(), stats.clone()));
        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// Response body of the mock: complete bytes or a channel of SSE events.
pub enum MockBody {
    /// Complete body.
    Full(Option<Bytes>),
    /// Events from a producer task; an `Err` aborts the response.
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }
    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            MockBody::Full(b) => http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            MockBody::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

#[derive(Deserialize, Default)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    /// Anthropic tools: a request with tools is answered with a call of the first one.
    #[serde(default)]
    tools: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok())
}

/// The words a mock completion is made of.
const WORDS: &[&str] =
    &["Hello", "!", " This", " is", " the", " aigate", " mock", " upstream", ".", " How", " can", " I", " help", "?"];

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<MockConfig>,
    stats: Arc<MockStats>,
) -> Result<Response<MockBody>, std::io::Error> {
    let ordinal = stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(std::io::Error::other)?.to_bytes();
    if cfg.record {
        let rec = RecordedRequest {
            method: parts.method.clone(),
            path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        if let Ok(mut r) = stats.recorded.lock() {
            r.push(rec);
        }
    }
    let h = &parts.headers;
    if h.get("x-mock-drop").is_some() {
        return Err(std::io::Error::other("dropped on request"));
    }
    let latency = header_u64(h, "x-mock-latency-ms").map(Duration::from_millis).unwrap_or(cfg.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // `x-mock-fail-first: N`: this mock's first N requests fail (503, or `x-mock-status`), then
    // it answers: a provider having a bad moment, for retries.
    let failing = header_u64(h, "x-mock-fail-first").is_none_or(|n| ordinal <= n);
    // A path segment `status-NNN` (a provider whose base URL holds it) fails every request.
    let path_status = parts.uri.path().split('/').find_map(|s| s.strip_prefix("status-")?.parse::<u64>().ok());
    let status = header_u64(h, "x-mock-status")
        .or(path_status)
        .or_else(|| h.get("x-mock-fail-first").map(|_| 503))
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|_| failing);
    if let Some(status) = status {
        let message = format!("mock failure with status {}", status.as_u16());
        // Each provider's own error shape.
        let body = if parts.uri.path().ends_with("/messages") {
            serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}})
        } else if parts.uri.path().contains("GenerateContent") || parts.uri.path().contains("generateContent") {
            serde_json::json!({"error": {"code": status.as_u16(), "message": message, "status": "UNAVAILABLE"}})
        } else {
            serde_json::json!({"error": {"message": message, "type": "server_error", "code": null, "param": null}})
        };
        let mut r = json(status, body.to_string());
        if let Some(v) = h.get("x-mock-retry-after") {
            r.headers_mut().insert(http::header::RETRY_AFTER, v.clone());
        }
        return Ok(r);
    }
    let chunk_delay = header_u64(h, "x-mock-chunk-delay-ms").map(Duration::from_millis).unwrap_or(cfg.chunk_delay);
    let chunks = header_u64(h, "x-mock-chunks").unwrap_or(8).clamp(1, 10_000) as usize;
    let cut_after = header_u64(h, "x-mock-cut-after").map(|n| n as usize);
    let split = h.get("x-mock-split-events").is_some_and(|v| v == "true");
    let path = parts.uri.path();
    let req: ChatRequest =
        if body.is_empty() { ChatRequest::default() } else { serde_json::from_slice(&body).unwrap_or_default() };
    let model = req.model.clone().unwrap_or_else(|| "gpt-4o-mini".to_string());

    let gemini = path.rsplit_once("/models/").map(|(_, m)| m.split_once(':').unwrap_or((m, "")));
    let resp = if let Some((model, method @ ("generateContent" | "streamGenerateContent"))) = gemini {
        let tool = req
            .tools
            .first()
            .and_then(|t| t.get("functionDeclarations"))
            .and_then(|d| d.get(0))
            .and_then(|d| d.get("name"))
            .and_then(|n| n.as_str());
        if method == "streamGenerateContent" {
            sse(gemini_events(model, chunks, tool), chunk_delay, cut_after, split, stats)
        } else {
            json(StatusCode::OK, gemini_response(model, tool))
        }
    } else if path.ends_with("/chat/completions") && parts.method == Method::POST {
        let tool =
            req.tools.first().and_then(|t| t.get("function")).and_then(|f| f.get("name")).and_then(|n| n.as_str());
        let usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        match (req.stream, tool) {
            (true, Some(name)) => sse(openai_tool_events(&model, name, usage), chunk_delay, cut_after, split, stats),
            (true, None) => sse(openai_chat_events(&model, chunks, usage), chunk_delay, cut_after, split, stats),
            (false, Some(name)) => json(StatusCode::OK, chat_tool_completion(&model, name)),
            (false, None) => json(StatusCode::OK, chat_completion(&model)),
        }
    } else if path.ends_with("/completions") && parts.method == Method::POST {
        json(StatusCode::OK, text_completion(&model))
    } else if path.ends_with("/embeddings") && parts.method == Method::POST {
        let n = match &req.input {
            Some(serde_json::Value::Array(a)) => a.len().max(1),
            _ => 1,
        };
        json(StatusCode::OK, embeddings(&model, n))
    } else if path.ends_with("/models") && parts.method == Method::GET {
        json(StatusCode::OK, models())
    } else if path.ends_with("/messages") && parts.method == Method::POST {
        let model = req.model.unwrap_or_else(|| "claude-3-5-haiku-latest".into());
        let tool = req.tools.first().and_then(|t| t.get("name")).and_then(|n| n.as_str());
        match (req.stream, tool) {
            (true, Some(name)) => sse(anthropic_tool_events(&model, name), chunk_delay, cut_after, split, stats),
            (true, None) => sse(anthropic_events(&model, chunks), chunk_delay, cut_after, split, stats),
            (false, Some(name)) => json(StatusCode::OK, anthropic_tool_message(&model, name)),
            (false, None) => json(StatusCode::OK, anthropic_message(&model)),
        }
    } else {
        let mut r = Response::new(MockBody::Full(Some(body)));
        let ct =
            h.get(http::header::CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/octet-stream"));
        r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        if let Ok(v) = HeaderValue::from_str(parts.method.as_str()) {
            r.headers_mut().insert("x-mock-method", v);
        }
        if let Some(v) = parts.uri.path_and_query().and_then(|p| HeaderValue::from_str(p.as_str()).ok()) {
            r.headers_mut().insert("x-mock-path", v);
        }
        r
    };
    let mut resp = resp;
    resp.headers_mut().insert("x-request-id", HeaderValue::from_static("req_mock_0001"));
    resp.headers_mut().insert("openai-processing-ms", HeaderValue::from_static("1"));
    Ok(resp)
}

fn json(status: StatusCode, body: String) -> Response<MockBody> {
    let mut r = Response::new(MockBody::Full(Some(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Streams `events` as SSE, one event per write, `delay` apart; aborts after `cut_after` events.
/// With `split`, each event goes out in two writes cut in its middle (`delay` apart too), as a
/// network may deliver it.
fn sse(
    events: Vec<String>,
    delay: Duration,
    cut_after: Option<usize>,
    split: bool,
    stats: Arc<MockStats>,
) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for (i, ev) in events.into_iter().enumerate() {
            if cut_after == Some(i) {
                let _ = tx.send(Err(std::io::Error::other("stream cut by x-mock-cut-after"))).await;
                return;
            }
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let ev = Bytes::from(ev);
            let parts = if split {
                let mid = ev.len() / 2;
                vec![ev.slice(..mid), ev.slice(mid..)]
            } else {
                vec![ev]
            };
            for (j, part) in parts.into_iter().enumerate() {
                if j > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(Ok(part)).await.is_err() {
                    stats.cancelled_streams.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        // Everything was handed to the reader; dropping `tx` ends the body.
        stats.completed_streams.fetch_add(1, Ordering::SeqCst);
    });
    let mut r = Response::new(MockBody::Stream(rx));
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn word(i: usize) -> &'static str {
    WORDS[i % WORDS.len()]
}

/// The text a completion of `chunks` pieces says.
pub fn completion_text(chunks: usize) -> String {
    (0..chunks).map(word).collect()
}

const CREATED: u64 = 1_767_225_600;

fn chat_completion(model: &str) -> String {
    let text = completion_text(WORDS.len());
    serde_json::json!({
        "id": "chatcmpl-mock0001",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": WORDS.len(), "total_tokens": 19 + WORDS.len(),
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        "service_tier": "default",
        "system_fingerprint": "fp_mock"
    })
    .to_string()
}

/// A chat completion that calls `tool` (a request with tools).
fn chat_tool_completion(model: &str, tool: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-mock0002", "object": "chat.completion", "created": CREATED, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
            "tool_calls": [{"id": "call_mock01", "type": "function", "function": {"name": tool, "arguments": TOOL_INPUT}}]},
            "logprobs": null, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 45, "completion_tokens": 15, "total_tokens": 60}
    })
    .to_string()
}

/// A streamed chat completion that calls `tool`, its arguments in two pieces.
fn openai_tool_events(model: &str, tool: &str, usage: bool) -> Vec<String> {
    let chunk = |choices: serde_json::Value| {
        let v = serde_json::json!({"id": "chatcmpl-mock0002", "object": "chat.completion.chunk", "created": CREATED,
            "model": model, "choices": choices});
        format!("data: {v}\n\n")
    };
    let (a, b) = TOOL_INPUT.split_at(TOOL_INPUT.len() / 2);
    let mut out = vec![
        chunk(
            serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [{"index": 0,
            "id": "call_mock01", "type": "function", "function": {"name": tool, "arguments": ""}}]}, "finish_reason": null}]),
        ),
        chunk(
            serde_json::json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}, "finish_reason": null}]),
        ),
        chunk(
            serde_json::json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": b}}]}, "finish_reason": null}]),
        ),
        chunk(serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
    ];
    if usage {
        let v = serde_json::json!({"id": "chatcmpl-mock0002", "object": "chat.completion.chunk", "created": CREATED,
            "model": model, "choices": [], "usage": {"prompt_tokens": 45, "completion_tokens": 15, "total_tokens": 60}});
        out.push(format!("data: {v}\n\n"));
    }
    out.push("data: [DONE]\n\n".to_string());
    out
}

fn openai_chat_events(model: &str, chunks: usize, usage: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(chunks + 4);
    let base = |delta: serde_json::Value, finish: serde_json::Value| {
        let mut v = serde_json::json!({"id": "chatcmpl-mock0001", "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if usage {
            v["usage"] = serde_json::Value::Null;
        }
        format!("data: {v}\n\n")
    };
    out.push(base(serde_json::json!({"role": "assistant", "content": "", "refusal": null}), serde_json::Value::Null));
    for i in 0..chunks {
        out.push(base(serde_json::json!({"content": word(i)}), serde_json::Value::Null));
    }
    out.push(base(serde_json::json!({}), serde_json::json!("stop")));
    if usage {
        let v = serde_json::json!({"id": "chatcmpl-mock0001", "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock", "choices": [],
            "usage": {"prompt_tokens": 19, "completion_tokens": chunks, "total_tokens": 19 + chunks,
                      "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}});
        out.push(format!("data: {v}\n\n"));
    }
    out.push("data: [DONE]\n\n".to_string());
    out
}

fn text_completion(model: &str) -> String {
    serde_json::json!({"id": "cmpl-mock0001", "object": "text_completion", "created": CREATED, "model": model,
        "choices": [{"text": completion_text(WORDS.len()), "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": WORDS.len(), "total_tokens": 5 + WORDS.len()}})
    .to_string()
}

fn embeddings(model: &str, n: usize) -> String {
    let data: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.0023, -0.0093, 0.0158, -0.0041, 0.0112, 0.0, 0.5, -0.25]}))
        .collect();
    serde_json::json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 8 * n, "total_tokens": 8 * n}}).to_string()
}

fn models() -> String {
    let data: Vec<serde_json::Value> = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": CREATED, "owned_by": "aigate-mock"}))
        .collect();
    serde_json::json!({"object": "list", "data": data}).to_string()
}

fn anthropic_message(model: &str) -> String {
    serde_json::json!({"id": "msg_mock0001", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": completion_text(WORDS.len())}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": WORDS.len(), "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
    .to_string()
}

/// A Gemini `generateContent` answer: text, or a call of `tool`.
fn gemini_response(model: &str, tool: Option<&str>) -> String {
    let input: serde_json::Value = serde_json::from_str(TOOL_INPUT).unwrap_or_default();
    let parts = match tool {
        Some(name) => serde_json::json!([{"functionCall": {"name": name, "args": input}}]),
        None => serde_json::json!([{"text": completion_text(WORDS.len())}]),
    };
    serde_json::json!({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": WORDS.len(), "totalTokenCount": 11 + WORDS.len()},
        "modelVersion": model, "responseId": "mock-gemini-0001"})
    .to_string()
}

/// Gemini's `streamGenerateContent?alt=sse`: `data:` chunks only, the last with the finish reason
/// and the usage; no end event.
fn gemini_events(model: &str, chunks: usize, tool: Option<&str>) -> Vec<String> {
    let ev = |v: serde_json::Value| format!("data: {v}\r\n\r\n");
    if let Some(name) = tool {
        let input: serde_json::Value = serde_json::from_str(TOOL_INPUT).unwrap_or_default();
        return vec![ev(
            serde_json::json!({"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": name, "args": input}}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 9, "totalTokenCount": 39}, "modelVersion": model, "responseId": "mock-gemini-0002"}),
        )];
    }
    (0..chunks)
        .map(|i| {
            let mut v = serde_json::json!({"candidates": [{"content": {"role": "model", "parts": [{"text": word(i)}]}, "index": 0}],
                "modelVersion": model, "responseId": "mock-gemini-0001"});
            if i + 1 == chunks {
                v["candidates"][0]["finishReason"] = serde_json::json!("STOP");
                v["usageMetadata"] = serde_json::json!({"promptTokenCount": 11, "candidatesTokenCount": chunks, "totalTokenCount": 11 + chunks});
            }
            ev(v)
        })
        .collect()
}

/// The input of every mock tool call.
const TOOL_INPUT: &str = r#"{"city":"Paris","unit":"celsius"}"#;

fn anthropic_tool_message(model: &str, tool: &str) -> String {
    let input: serde_json::Value = serde_json::from_str(TOOL_INPUT).unwrap_or_default();
    serde_json::json!({"id": "msg_mock0002", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_mock01", "name": tool, "input": input}],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 40, "output_tokens": 18, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
    .to_string()
}

fn anthropic_tool_events(model: &str, tool: &str) -> Vec<String> {
    let ev = |name: &str, v: serde_json::Value| format!("event: {name}\ndata: {v}\n\n");
    let (a, b) = TOOL_INPUT.split_at(TOOL_INPUT.len() / 2);
    vec![
        ev(
            "message_start",
            serde_json::json!({"type": "message_start", "message": {"id": "msg_mock0002", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "usage": {"input_tokens": 40, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_mock01", "name": tool, "input": {}}}),
        ),
        ev(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": a}}),
        ),
        ev(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": b}}),
        ),
        ev("content_block_stop", serde_json::json!({"type": "content_block_stop", "index": 0})),
        ev(
            "message_delta",
            serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 18}}),
        ),
        ev("message_stop", serde_json::json!({"type": "message_stop"})),
    ]
}

fn anthropic_events(model: &str, chunks: usize) -> Vec<String> {
    let ev = |name: &str, v: serde_json::Value| format!("event: {name}\ndata: {v}\n\n");
    let mut out = vec![
        ev(
            "message_start",
            serde_json::json!({"type": "message_start", "message": {"id": "msg_mock0001", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
        ),
        ev(
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for i in 0..chunks {
        out.push(ev("content_block_delta", serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word(i)}})));
    }
    out.push(ev("content_block_stop", serde_json::json!({"type": "content_block_stop", "index": 0})));
    out.push(ev("message_delta", serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": chunks}})));
    out.push(ev("message_stop", serde_json::json!({"type": "message_stop"})));
    out
}
