//! Fuzzing of everything that parses untrusted input (issue 19), with proptest on stable Rust.
//!
//! One property test per parser, each fed both arbitrary input (bytes, strings, JSON) and input
//! generated from valid seeds (real paths, real streams, the example configuration) then mutated.
//! Every target must never panic, never hang, and answer a malformed input with an `Err` that has
//! a message; where a stronger property holds it is checked too:
//! - routing: the upstream URI never leaves the provider's base URL, for any path, method, header
//!   and Universal or dynamic step (scheme, host and base path kept; no `.`/`..` segment, plain or
//!   percent-encoded, and no encoded separator below it);
//! - SSE: a stream split at any byte boundaries gives the same usage, model, filtered stream and
//!   translated stream as the same stream in one piece, and a valid stream's usage is the one it
//!   states;
//! - `cf-aig-*` headers: an accepted value is within the documented bounds.
//!
//! Case counts: `AIGATE_FUZZ_CASES` cases per target (default 192, about 6 s for the whole file
//! in a debug build, part of `cargo test --workspace`). The long run is `scripts/fuzz.sh`
//! (release build with overflow checks, `--profile fuzz`). A case slower than
//! `AIGATE_FUZZ_CASE_MS` (default 5000) fails as a hang; one still running after 60 s aborts the
//! process with the target's name. Failures are kept by proptest in
//! `proptest-regressions/fuzz.txt` (committed) and replayed first on every run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use aigate_core::config::{Settings, EMBEDDED_DEFAULT};
use aigate_core::endpoint::Endpoint;
use aigate_core::headers;
use aigate_core::logs::parse_metadata;
use aigate_core::meter::cost::CustomCost;
use aigate_core::meter::usage::{self, InjectedUsageFilter, SseUsage, Usage};
use aigate_core::meter::Meter;
use aigate_core::phases::cache::CacheOptions;
use aigate_core::phases::route::{self, Route};
use aigate_core::phases::upstream::{request_timeout, retry_policy};
use aigate_core::providers::{check_segment, Provider};
use aigate_core::routing::{self, universal, Canary, MAX_STEPS};
use aigate_core::translate::{
    self, anthropic, anthropic_client, gemini, Compat, Format, ResponseTranslator, Translation,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Harness: case counts, the per-case time check and the hang watchdog.

/// Cases per target: `AIGATE_FUZZ_CASES`, divided by `div` for the costly targets.
fn config(div: u32) -> ProptestConfig {
    let cases: u32 = std::env::var("AIGATE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(192);
    ProptestConfig {
        cases: (cases / div).max(4),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/fuzz.txt"))),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

/// Cases running now, by thread: when each started and its target.
static RUNNING: LazyLock<Mutex<HashMap<ThreadId, (Instant, &'static str)>>> = LazyLock::new(Mutex::default);
static WATCHDOG: OnceLock<()> = OnceLock::new();
/// A case still running after this is a hang: the process is aborted, naming the target.
const HANG: Duration = Duration::from_secs(60);

fn case_limit() -> Duration {
    let ms = std::env::var("AIGATE_FUZZ_CASE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    Duration::from_millis(ms)
}

/// Runs one case of `target`: a case slower than [`case_limit`] fails (proptest then shrinks
/// it), one that never ends is reported by the watchdog.
fn timed(target: &'static str, f: impl FnOnce() -> Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, (_, target))) = running.iter().find(|(_, (t, _))| t.elapsed() > HANG) {
                eprintln!("fuzz: a case of {target} has run for more than {HANG:?}: a hang");
                std::process::abort();
            }
        });
    });
    let id = std::thread::current().id();
    let start = Instant::now();
    RUNNING.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (start, target));
    let out = f();
    RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    let took = start.elapsed();
    assert!(took <= case_limit(), "{target}: a case took {took:?} (limit {:?})", case_limit());
    out
}

// ---------------------------------------------------------------------------------------------
// Shared settings.

const FUZZ_TOML: &str = r#"
[providers.local]
base_url = "http://127.0.0.1:8000/v1/"
[providers.bare]
base_url = "http://127.0.0.1:9"
[providers.tmpl]
base_url = "https://{region}.example.com/api/{version}"
[providers.acct]
base_url = "https://{account_id}.example.net/v1"

[gateways.default]
[gateways.prod]
[gateways.canary]
[gateways.prod.canary]
gateway = "canary"
percent = 30
sticky = "metadata.user"
[gateways.prod.routes.support]
steps = [ { provider = "openai", model = "gpt-4o-mini", timeout = "10s", max_attempts = 2 },
          { provider = "anthropic", model = "claude-3-5-haiku-latest" } ]
[gateways.prod.routes.ab]
sticky = "credential"
[[gateways.prod.routes.ab.arms]]
weight = 90
steps = [ { provider = "openai", model = "gpt-4o-mini" } ]
[[gateways.prod.routes.ab.arms]]
weight = 10
steps = [ { provider = "google-ai-studio", model = "gemini-2.0-flash" } ]
[[gateways.prod.routes.ab.arms]]
when = { "metadata.tier" = "free" }
steps = [ { provider = "groq", model = "llama" }, { provider = "local", model = "m" } ]
[[gateways.prod.routes.ab.arms]]
when = { "metadata.tier" = "free", "metadata.user" = "u1" }
weight = 3
steps = [ { provider = "mistral", model = "small" } ]
"#;

static SETTINGS: LazyLock<Settings> = LazyLock::new(|| Settings::from_toml_with(FUZZ_TOML, &|_| None).unwrap());
static SETTINGS_ACCOUNT: LazyLock<Settings> =
    LazyLock::new(|| Settings::from_toml_with(&format!("account_id = \"acct\"\n{FUZZ_TOML}"), &|_| None).unwrap());

// ---------------------------------------------------------------------------------------------
// The upstream-URI property.

/// Percent-decodes once (invalid escapes are kept as they are), as an upstream server would.
fn decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A path segment that cannot move up or sideways once the upstream decodes it.
fn safe_segment(seg: &str) -> Result<(), String> {
    let d = decoded(seg);
    if d == b"." || d == b".." || d.contains(&b'/') || d.contains(&b'\\') {
        return Err(format!("segment {seg:?} decodes to {:?}", String::from_utf8_lossy(&d)));
    }
    Ok(())
}

/// Matches `s` against a base URL part with `{placeholder}`s; a placeholder stands for a
/// non-empty run of characters outside `stop`. Returns what follows the match.
fn match_template<'s>(template: &str, mut s: &'s str, stop: &[char], fills: &mut Vec<&'s str>) -> Option<&'s str> {
    // Adjacent placeholders (`{a}{b}`) are filled by consecutive values: match them as one.
    let merged = template.replace("}{", "");
    let mut t = merged.as_str();
    while let Some(open) = t.find('{') {
        s = s.strip_prefix(&t[..open])?;
        let close = t[open..].find('}')? + open;
        let end = s.find(|c: char| stop.contains(&c)).unwrap_or(s.len());
        if end == 0 {
            return None;
        }
        fills.push(&s[..end]);
        s = &s[end..];
        t = &t[close + 1..];
    }
    s.strip_prefix(t)
}

/// The upstream URI is under the provider's base URL: same scheme, the base's host (its
/// placeholders filled with one DNS label each), the base path, then safe segments only.
fn within_base(p: &Provider, uri: &Uri) -> Result<(), String> {
    let (scheme, rest) = p.base_url.split_once("://").ok_or("base url")?;
    let (authority_t, path_t) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if uri.scheme_str() != Some(scheme) {
        return Err(format!("{uri}: scheme is not {scheme}"));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let mut fills = Vec::new();
    if match_template(authority_t, authority, &['.', ':', '@', '/', '[', ']'], &mut fills) != Some("") {
        return Err(format!("{uri}: host {authority:?} is not {authority_t:?}"));
    }
    let path = uri.path();
    let below =
        match_template(path_t, path, &['/'], &mut fills).ok_or_else(|| format!("{uri}: not under {path_t:?}"))?;
    if !(below.is_empty() || below.starts_with('/')) {
        return Err(format!("{uri}: {below:?} continues the base path's last segment"));
    }
    for seg in fills.into_iter().chain(below.split('/').skip(1)) {
        safe_segment(seg).map_err(|e| format!("{uri}: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Segments that mean something to the router, or to a path normaliser.
const SEGMENTS: &[&str] = &[
    "v1",
    "default",
    "prod",
    "canary",
    "nope",
    "openai",
    "anthropic",
    "azure-openai",
    "workers-ai",
    "google-ai-studio",
    "groq",
    "local",
    "bare",
    "tmpl",
    "acct",
    "compat",
    "chat",
    "completions",
    "messages",
    "responses",
    "embeddings",
    "models",
    "client",
    "v4",
    "accounts",
    "ai",
    "run",
    "@cf",
    "",
    ".",
    "..",
    "...",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "a%2fb",
    "\\",
    "%",
    "%2",
    "%%2e",
    "%252e",
    "x.y",
    "evil.com",
    "evil.com:80",
    "a@evil.com",
    "[::1]",
    "{x}",
    "v1beta",
    "gemini:generateContent",
    "a?b",
    "..?x",
    "#",
    "..#x",
    "a b",
    "é",
    "%00",
    "%zz",
];

fn segment() -> BoxedStrategy<String> {
    prop_oneof![
        6 => proptest::sample::select(SEGMENTS).prop_map(str::to_owned),
        2 => "[a-zA-Z0-9._~%:@!$&'()*+,;=-]{0,10}",
        1 => "\\PC{0,6}",
    ]
    .boxed()
}

fn segments(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 0..max).prop_map(|v| v.join("/"))
}

fn path_and_query() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(vec!["/", "/v1/", "/v1/acct/", "/client/v4/accounts/", "//", ""]),
        segments(8),
        proptest::option::of("[a-z0-9=&%./?-]{0,12}"),
    )
        .prop_map(|(lead, rest, q)| match q {
            Some(q) => format!("{lead}{rest}?{q}"),
            None => format!("{lead}{rest}"),
        })
}

fn method() -> impl Strategy<Value = Method> {
    proptest::sample::select(vec![
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::from_bytes(b"PURGE").unwrap(),
    ])
}

/// Header value bytes: meaningful values, printable text, or any bytes a header may carry.
fn header_value() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            "true", "false", "FALSE", "1", "0", "yes", "", " ", " 120 ", "59", "60", "2592000", "2592001",
            "-1", "+5", "5", "6", "5000", "5001", "18446744073709551615", "18446744073709551616", "1e3",
            "constant", "linear", "exponential", "Linear", "default", "prod", "canary", "nope",
            r#"{"user":"u1","tier":"free"}"#, r#"{"per_token_in":0.000001,"per_token_out":0.000002}"#,
            r#"{"per_token_in":1e308,"per_token_out":1e308,"per_cache_read_token":-0.0}"#,
            r#"{"per_token_in":-1,"per_token_out":0}"#, "Bearer t", "bearer  t ", "null", "[]",
        ]).prop_map(|s| s.as_bytes().to_vec()),
        2 => "[ -~]{0,24}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..32),
    ]
    .boxed()
}

const HEADER_NAMES: &[&str] = &[
    "cf-aig-skip-cache",
    "cf-skip-cache",
    "cf-aig-cache-ttl",
    "cf-cache-ttl",
    "cf-aig-cache-key",
    "cf-aig-request-timeout",
    "cf-aig-max-attempts",
    "cf-aig-retry-delay",
    "cf-aig-backoff",
    "cf-aig-metadata",
    "cf-aig-custom-cost",
    "cf-aig-collect-log",
    "cf-aig-collect-log-payload",
    "cf-aig-event-id",
    "cf-aig-gateway-id",
    "cf-aig-authorization",
    "authorization",
    "x-api-key",
];

fn header_map() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((proptest::sample::select(HEADER_NAMES), header_value()), 0..8).prop_map(|pairs| {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                h.append(HeaderName::from_static(name), v);
            }
        }
        h
    })
}

/// Keys that the translators and parsers look at.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "image_url",
    "url",
    "detail",
    "tool_calls",
    "tool_call_id",
    "id",
    "function",
    "name",
    "arguments",
    "tools",
    "tool_choice",
    "parameters",
    "description",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "temperature",
    "top_p",
    "response_format",
    "json_schema",
    "schema",
    "system",
    "tool_use",
    "tool_result",
    "input",
    "source",
    "media_type",
    "data",
    "thinking",
    "reasoning_effort",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_input_tokens",
    "parts",
    "inlineData",
    "functionCall",
    "provider",
    "endpoint",
    "headers",
    "query",
    "config",
    "requestTimeout",
    "maxAttempts",
    "retryDelay",
    "backoff",
    "user",
    "tier",
    "seed",
    "metadata",
    "stop_sequences",
];

const STRINGS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "tool",
    "developer",
    "function",
    "text",
    "image_url",
    "image",
    "tool_use",
    "tool_result",
    "auto",
    "none",
    "required",
    "any",
    "json_object",
    "json_schema",
    "data:image/png;base64,iVBORw0KGgo=",
    "https://x/y.png",
    "data:",
    "data:;base64,",
    "base64",
    "{\"a\":1}",
    "{",
    "",
    "openai",
    "anthropic",
    "compat",
    "chat/completions",
    "v1/messages",
    "..?x",
    "a/../b",
    "%2e%2e",
    "dynamic/support",
    "dynamic/ab",
    "dynamic/",
    "anthropic/claude",
    "google-ai-studio/gemini",
    "openai/gpt-4o",
    "é\u{0}\u{1f600}",
    "constant",
    "exponential",
    "free",
];

fn leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        proptest::sample::select(vec![0u64, 1, 2, 5, 6, 5000, 5001, u32::MAX as u64, u64::MAX]).prop_map(|n| json!(n)),
        proptest::sample::select(vec![0.5f64, -0.0, 1e308, -1e308, 1e-320, 2.5]).prop_map(|n| json!(n)),
        proptest::sample::select(STRINGS).prop_map(|s| json!(s)),
        "\\PC{0,12}".prop_map(Value::String),
    ]
    .boxed()
}

/// Any JSON, its object keys mostly those the code reads.
fn json_value() -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec(
                    (prop_oneof![4 => proptest::sample::select(KEYS).prop_map(str::to_owned), 1 => "\\PC{0,6}"], inner),
                    0..6
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A chat message, OpenAI's or Anthropic's shape, often well formed, with any JSON in places.
fn message() -> BoxedStrategy<Value> {
    let role = prop_oneof![
        4 => proptest::sample::select(vec!["user", "assistant", "system", "tool", "developer"]).prop_map(|s| json!(s)),
        1 => leaf(),
    ];
    let part = prop_oneof![
        ("\\PC{0,10}").prop_map(|t| json!({"type": "text", "text": t})),
        proptest::sample::select(vec!["https://x/y.png", "data:image/png;base64,AAAA", "data:x", "data:;base64,"])
            .prop_map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
        ("[a-z_]{0,6}", json_value())
            .prop_map(|(id, input)| json!({"type": "tool_use", "id": id, "name": "f", "input": input})),
        ("[a-z_]{0,6}", json_value())
            .prop_map(|(id, c)| json!({"type": "tool_result", "tool_use_id": id, "content": c})),
        json_value(),
    ];
    let content = prop_oneof![
        "\\PC{0,16}".prop_map(Value::String),
        proptest::collection::vec(part, 0..4).prop_map(Value::Array),
        leaf(),
    ];
    let call = ("[a-z_]{0,6}", proptest::sample::select(vec!["{\"a\":1}", "{", "", "[]", "null"]), json_value())
        .prop_map(|(id, args, junk)| json!({"id": id, "type": "function", "function": {"name": "f", "arguments": args}, "x": junk}));
    (
        role,
        proptest::option::of(content),
        proptest::option::of(proptest::collection::vec(call, 0..3)),
        proptest::option::of("[a-z_]{0,6}"),
    )
        .prop_map(|(role, content, calls, tool_call_id)| {
            let mut m = Map::new();
            m.insert("role".into(), role);
            if let Some(c) = content {
                m.insert("content".into(), c);
            }
            if let Some(c) = calls {
                m.insert("tool_calls".into(), Value::Array(c));
            }
            if let Some(id) = tool_call_id {
                m.insert("tool_call_id".into(), json!(id));
            }
            Value::Object(m)
        })
        .boxed()
}

/// A chat request (either format's fields), every field optional, some values anything.
fn chat_request() -> impl Strategy<Value = Map<String, Value>> {
    let tool = prop_oneof![
        json_value()
            .prop_map(|p| json!({"type": "function", "function": {"name": "f", "description": "d", "parameters": p}})),
        json_value().prop_map(|p| json!({"name": "f", "input_schema": p})),
        json_value(),
    ];
    (
        proptest::collection::vec(message(), 0..6),
        proptest::option::of(prop_oneof![json_value(), "\\PC{0,8}".prop_map(Value::String)]),
        proptest::option::of(proptest::collection::vec(tool, 0..3)),
        proptest::collection::vec((proptest::sample::select(KEYS), json_value()), 0..5),
    )
        .prop_map(|(messages, system, tools, extra)| {
            let mut m = Map::new();
            for (k, v) in extra {
                m.insert(k.to_owned(), v);
            }
            m.insert("messages".into(), Value::Array(messages));
            if let Some(s) = system {
                m.insert("system".into(), s);
            }
            if let Some(t) = tools {
                m.insert("tools".into(), Value::Array(t));
            }
            m
        })
}

/// Split points of a byte string of length `len` (sorted, deduplicated), from random fractions.
fn split(data: &[u8], cuts: &[f64]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|f| ((data.len() as f64) * f) as usize).collect();
    at.push(data.len());
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for end in at {
        out.push(data[start..end].to_vec());
        start = end;
    }
    out
}

fn cuts() -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        3 => proptest::collection::vec(0.0f64..1.0, 0..24),
        1 => proptest::collection::vec(0.0f64..1.0, 100..400), // byte by byte, nearly
    ]
}

/// Bytes of an SSE-ish stream: framing, keys and numbers the readers look for, and noise.
fn sse_noise() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => proptest::sample::select(vec![
            "data:", "data: ", "dat", "event: ", ": ping", "id: 1", "retry: 5", "\n", "\r", "\r\n", "\n\n",
            "\r\n\r\n", "{", "}", "[", "]", ",", ":", "\"usage\"", "\"usageMetadata\"", "\"model\"",
            "\"modelVersion\"", "\"choices\"", "[]", "null", "\"prompt_tokens\":", "\"completion_tokens\":",
            "\"input_tokens\":", "\"output_tokens\":", "\"promptTokenCount\":", "\"candidatesTokenCount\":",
            "\"type\":\"message_start\"", "\"message\":", "\"delta\":", "\"type\":\"content_block_delta\"",
            "\"text\":\"hi\"", "12", "-1", "1e400", "18446744073709551616", "\"m\"", "[DONE]", "\\",
            "\"", "\"candidates\"", "\"parts\"", "\"finishReason\":\"STOP\"", "\"tool_calls\"",
        ]).prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..6),
    ];
    proptest::collection::vec(piece, 0..120).prop_map(|v| v.concat())
}

/// A line ending, as SSE allows.
fn eol() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec!["\n", "\r\n", "\r"])
}

/// Joins events into an SSE body: `data:` with or without a space, optional `event:` lines and
/// comments, the chosen line ending.
fn sse_body(events: &[(Option<&str>, String)], eol: &str, space: bool, comments: bool) -> Vec<u8> {
    let mut out = String::new();
    if comments {
        out.push_str(&format!(": hello{eol}{eol}"));
    }
    for (name, data) in events {
        if let Some(n) = name {
            out.push_str(&format!("event: {n}{eol}"));
        }
        out.push_str(if space { "data: " } else { "data:" });
        out.push_str(data);
        out.push_str(eol);
        out.push_str(eol);
        if comments {
            out.push_str(&format!(": ping{eol}{eol}"));
        }
    }
    out.into_bytes()
}

/// A valid stream of one provider format, and the usage it states.
#[derive(Debug, Clone)]
struct ValidStream {
    endpoint: Endpoint,
    body: Vec<u8>,
    usage: Usage,
}

fn counts() -> impl Strategy<Value = (u64, u64, u64, u64, u64)> {
    (0u64..1_000_000, 0u64..1_000, 0u64..1_000, 0u64..1_000_000, 0u64..1_000)
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec("\\PC{0,12}", 0..6)
}

fn valid_stream() -> impl Strategy<Value = ValidStream> {
    (0..4usize, counts(), texts(), eol(), any::<bool>(), any::<bool>()).prop_map(
        |(kind, (input, cached, write, output, reasoning), texts, eol, space, comments)| {
            let model = "m-1".to_owned();
            let mut ev: Vec<(Option<&str>, String)> = Vec::new();
            let (endpoint, usage) = match kind {
                0 => {
                    for t in &texts {
                        ev.push((None, json!({"id":"c","object":"chat.completion.chunk","model":model,
                            "choices":[{"index":0,"delta":{"content":t},"finish_reason":null}],"usage":null}).to_string()));
                    }
                    ev.push((None, json!({"id":"c","model":model,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}).to_string()));
                    ev.push((None, json!({"id":"c","model":model,"choices":[],"usage":{"prompt_tokens":input,"completion_tokens":output,
                        "total_tokens":input+output,"prompt_tokens_details":{"cached_tokens":cached.min(input)},
                        "completion_tokens_details":{"reasoning_tokens":reasoning.min(output)}}}).to_string()));
                    ev.push((None, "[DONE]".into()));
                    let u = Usage { input_tokens: input, output_tokens: output, cached_input_tokens: cached.min(input),
                        cache_write_tokens: 0, reasoning_tokens: reasoning.min(output), model: Some(model.clone()) };
                    (Endpoint::ChatCompletions, u)
                }
                1 => {
                    ev.push((Some("message_start"), json!({"type":"message_start","message":{"id":"msg","type":"message","role":"assistant",
                        "model":model,"content":[],"stop_reason":null,"usage":{"input_tokens":input,"cache_read_input_tokens":cached,
                        "cache_creation_input_tokens":write,"output_tokens":1}}}).to_string()));
                    ev.push((Some("content_block_start"), json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}).to_string()));
                    ev.push((Some("ping"), json!({"type":"ping"}).to_string()));
                    for t in &texts {
                        ev.push((Some("content_block_delta"), json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":t}}).to_string()));
                    }
                    ev.push((Some("content_block_stop"), json!({"type":"content_block_stop","index":0}).to_string()));
                    ev.push((Some("message_delta"), json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},
                        "usage":{"output_tokens":output}}).to_string()));
                    ev.push((Some("message_stop"), json!({"type":"message_stop"}).to_string()));
                    let u = Usage { input_tokens: input + cached + write, output_tokens: output, cached_input_tokens: cached,
                        cache_write_tokens: write, reasoning_tokens: 0, model: Some(model.clone()) };
                    (Endpoint::AnthropicMessages, u)
                }
                2 => {
                    let n = texts.len().max(1);
                    for (i, t) in texts.iter().chain(std::iter::once(&String::new())).take(n).enumerate() {
                        let last = i + 1 == n;
                        let mut c = json!({"candidates":[{"content":{"role":"model","parts":[{"text":t}]},"index":0}],
                            "usageMetadata":{"promptTokenCount":input,"candidatesTokenCount":if last { output } else { 0 },
                            "cachedContentTokenCount":cached.min(input),"thoughtsTokenCount":reasoning,"totalTokenCount":input+output},
                            "modelVersion":model});
                        if last {
                            c["candidates"][0]["finishReason"] = json!("STOP");
                        }
                        ev.push((None, c.to_string()));
                    }
                    let u = Usage { input_tokens: input, output_tokens: output + reasoning, cached_input_tokens: cached.min(input),
                        cache_write_tokens: 0, reasoning_tokens: reasoning, model: Some(model.clone()) };
                    (Endpoint::GeminiGenerateContent, u)
                }
                _ => {
                    ev.push((Some("response.created"), json!({"type":"response.created","response":{"id":"r","model":model,"usage":null}}).to_string()));
                    for t in &texts {
                        ev.push((Some("response.output_text.delta"), json!({"type":"response.output_text.delta","delta":t}).to_string()));
                    }
                    ev.push((Some("response.completed"), json!({"type":"response.completed","response":{"id":"r","model":model,
                        "output":[{"type":"message","content":[{"type":"output_text","text":texts.concat()}]}],
                        "usage":{"input_tokens":input,"input_tokens_details":{"cached_tokens":cached.min(input)},
                        "output_tokens":output,"output_tokens_details":{"reasoning_tokens":reasoning.min(output)},"total_tokens":input+output}}}).to_string()));
                    let u = Usage { input_tokens: input, output_tokens: output, cached_input_tokens: cached.min(input),
                        cache_write_tokens: 0, reasoning_tokens: reasoning.min(output), model: Some(model.clone()) };
                    (Endpoint::Responses, u)
                }
            };
            ValidStream { endpoint, body: sse_body(&ev, eol, space, comments), usage }
        },
    )
}

const USAGE_ENDPOINTS: &[Endpoint] = &[
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::AnthropicMessages,
    Endpoint::GeminiGenerateContent,
    Endpoint::Models,
    Endpoint::Other,
];

/// Usage and model of a body read in `chunks`.
fn sse_usage(endpoint: Endpoint, chunks: &[Vec<u8>]) -> (Option<Usage>, Option<String>) {
    let mut r = SseUsage::new(endpoint);
    for c in chunks {
        r.feed(c);
        let _ = r.usage();
    }
    let model = r.model().map(str::to_owned);
    (r.finish(), model)
}

/// What an [`InjectedUsageFilter`] passes on and the usage it dropped, for a body in `chunks`.
fn filtered(chunks: &[Vec<u8>]) -> (Vec<u8>, Option<Usage>) {
    let mut f = InjectedUsageFilter::new();
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&f.strip_injected_usage_event(Bytes::from(c.clone())));
    }
    out.extend_from_slice(&f.finish());
    (out, f.usage().cloned())
}

/// Every translation a response may go through: (client writes Anthropic, provider format,
/// stream asked, include_usage).
fn translations() -> Vec<Translation> {
    let mut v = Vec::new();
    for anthropic_client in [false, true] {
        for format in [Format::OpenAi, Format::Anthropic, Format::Gemini] {
            for stream in [false, true] {
                for include_usage in [false, true] {
                    v.push(Translation { anthropic_client, format, stream, include_usage, model: "m".into() });
                }
            }
        }
    }
    v
}

/// A translated answer read in `chunks`.
fn translated(t: &Translation, status: u16, event_stream: bool, chunks: &[Vec<u8>]) -> Option<Vec<u8>> {
    let status = http::StatusCode::from_u16(status).unwrap();
    let mut r = ResponseTranslator::new(t, status, event_stream, 1_700_000_000)?;
    let _ = r.content_type();
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&r.data(c));
    }
    out.extend_from_slice(&r.end());
    Some(out)
}

/// A translated stream is SSE whose data lines are JSON (or `[DONE]`).
fn well_formed_sse(out: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(out).map_err(|e| format!("not UTF-8: {e}"))?;
    for line in text.split('\n') {
        if let Some(data) = line.strip_prefix("data: ") {
            if data != "[DONE]" {
                serde_json::from_str::<Value>(data).map_err(|e| format!("data line {data:?}: {e}"))?;
            }
        } else if !(line.is_empty() || line.starts_with("event: ")) {
            return Err(format!("unexpected line {line:?}"));
        }
    }
    Ok(())
}

/// A provider's valid stream for a translator (Anthropic, Gemini or OpenAI chunks), with noise.
fn provider_stream() -> impl Strategy<Value = (Format, Vec<u8>)> {
    let anthropic_event = prop_oneof![
        ("\\PC{0,8}").prop_map(|t| (
            "content_block_delta",
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":t}})
        )),
        (0u64..3, "[a-z]{0,4}").prop_map(|(i, id)| (
            "content_block_start",
            json!({"type":"content_block_start","index":i,
            "content_block":{"type":"tool_use","id":id,"name":"f","input":{}}})
        )),
        (0u64..3, proptest::sample::select(vec!["{\"a\"", ":1}", "", "{"])).prop_map(|(i, j)| (
            "content_block_delta",
            json!({"type":"content_block_delta","index":i,"delta":{"type":"input_json_delta","partial_json":j}})
        )),
        ("\\PC{0,8}").prop_map(|t| (
            "content_block_delta",
            json!({"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":t}})
        )),
        (0u64..3).prop_map(|i| ("content_block_stop", json!({"type":"content_block_stop","index":i}))),
        proptest::sample::select(vec!["end_turn", "max_tokens", "tool_use", "stop_sequence", "refusal", "x"]).prop_map(
            |r| (
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":r},"usage":{"output_tokens":7}})
            )
        ),
        Just(("ping", json!({"type":"ping"}))),
        Just(("error", json!({"type":"error","error":{"type":"overloaded_error","message":"busy"}}))),
        json_value().prop_map(|v| ("x", v)),
    ];
    let gemini_chunk = prop_oneof![
        ("\\PC{0,8}").prop_map(|t| json!({"candidates":[{"content":{"parts":[{"text":t}],"role":"model"},"index":0}]})),
        json_value()
            .prop_map(|a| json!({"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":a}}]}}]})),
        proptest::sample::select(vec!["STOP", "MAX_TOKENS", "SAFETY", "OTHER"])
            .prop_map(|r| json!({"candidates":[{"finishReason":r}],
            "usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4}})),
        json_value(),
    ];
    let openai_chunk = prop_oneof![
        ("\\PC{0,8}").prop_map(|t| json!({"id":"c","model":"m","choices":[{"index":0,"delta":{"content":t}}]})),
        (0u64..2, "[a-z]{0,3}", proptest::sample::select(vec!["{\"a\"", ":1}", ""])).prop_map(|(i, id, a)| json!({"id":"c",
            "choices":[{"index":0,"delta":{"tool_calls":[{"index":i,"id":id,"function":{"name":"f","arguments":a}}]}}]})),
        proptest::sample::select(vec!["stop", "length", "tool_calls", "content_filter"])
            .prop_map(|r| json!({"id":"c","choices":[{"index":0,"delta":{},"finish_reason":r}]})),
        Just(json!({"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}})),
        json_value(),
    ];
    prop_oneof![
        (proptest::collection::vec(anthropic_event, 0..12), eol(), any::<bool>()).prop_map(|(evs, eol, space)| {
            let mut all = vec![(
                Some("message_start"),
                json!({"type":"message_start","message":{"id":"msg","model":"claude",
                "usage":{"input_tokens":5,"output_tokens":1}}})
                .to_string(),
            )];
            all.extend(evs.into_iter().map(|(n, v)| (Some(n), v.to_string())));
            all.push((Some("message_stop"), json!({"type":"message_stop"}).to_string()));
            (Format::Anthropic, sse_body(&all, eol, space, false))
        }),
        (proptest::collection::vec(gemini_chunk, 0..10), eol(), any::<bool>()).prop_map(|(cs, eol, space)| (
            Format::Gemini,
            sse_body(&cs.into_iter().map(|c| (None, c.to_string())).collect::<Vec<_>>(), eol, space, false)
        )),
        (proptest::collection::vec(openai_chunk, 0..10), eol(), any::<bool>()).prop_map(|(cs, eol, space)| {
            let mut all: Vec<(Option<&str>, String)> = cs.into_iter().map(|c| (None, c.to_string())).collect();
            all.push((None, "[DONE]".into()));
            (Format::OpenAi, sse_body(&all, eol, space, false))
        }),
    ]
}

/// A TOML value that validation must refuse or bound.
const TOML_VALUES: &[&str] = &[
    "\"0s\"",
    "\"-1s\"",
    "\"1ns\"",
    "\"18446744073709551615s\"",
    "\"99999999999999999999h\"",
    "\"30d\"",
    "\"31d\"",
    "0",
    "-1",
    "1",
    "5",
    "6",
    "10000",
    "10001",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "0.0",
    "-0.0",
    "1.5",
    "\"1e400MB\"",
    "\"999999999999GB\"",
    "\"18446744073709551615GiB\"",
    "\"1.5KiB\"",
    "\"\"",
    "\"env:NOPE\"",
    "\"env:\"",
    "\"dynamic/x\"",
    "[]",
    "{}",
    "true",
    "false",
    "\"metadata.\"",
    "\"metadata.x\"",
    "\"credential\"",
    "\"http://\"",
    "\"https://{x}.a/{y}\"",
    "\"http://h/{a}{b}\"",
    "\"https://{account_id}.x\"",
    "\"http://[::1]:0\"",
    "\"redis://\"",
    "\"postgres://\"",
    "\"memory\"",
    "\"disk\"",
    "\"sqlite\"",
    "\"shadow\"",
    "\"fixed\"",
    "\"day\"",
    "\"24h\"",
    "\"tokens\"",
    "\"cost_usd\"",
    "\"x-goog-api-key\"",
    "[0.5, 2.0]",
    "[-1]",
    "{ provider = \"openai\", model = \"\" }",
    "[ { provider = \"nope\", model = \"m\" } ]",
    "[ { provider = \"openai\", model = \"m\", timeout = \"0s\" } ]",
    "\"default\"",
    "\"prod\"",
    "\"nope\"",
    "\"a b\"",
    "\"..\"",
    "\"é\"",
];

/// Lines that add sections or keys the seeds may lack.
const TOML_LINES: &[&str] = &[
    "[gateways.x]",
    "[gateways.\"\"]",
    "[gateways.prod.canary]",
    "gateway = \"prod\"",
    "gateway = \"default\"",
    "percent = 101",
    "percent = -1",
    "[gateways.default.routes.r]",
    "[[gateways.default.routes.r.arms]]",
    "weight = 0",
    "when = { \"tier\" = \"x\" }",
    "when = { \"metadata.\" = \"x\" }",
    "steps = []",
    "[[gateways.default.limits]]",
    "key = \"metadata.\"",
    "[[gateways.default.budgets]]",
    "alerts = [0.0]",
    "[providers.x]",
    "base_url = \"http://a/{b\"",
    "base_url = \"ftp://a\"",
    "base_url = \"http://a?x\"",
    "[gateways.default.breaker]",
    "failures = 0",
    "[pricing.models.\"x\"]",
    "input = -1.0",
    "output = nan",
    "[gateways.default.cache]",
    "ttl = \"1s\"",
    "[dashboard]",
    "session_ttl = \"1s\"",
    "account_id = \"\"",
    "default_gateway = \"nope\"",
    "[storage]",
    "cache = \"redis://\"",
    "[limits]",
    "alert_webhook = \"x\"",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Value(usize, &'static str),
    Insert(usize, &'static str),
    Truncate(f64),
    Byte(f64, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Duplicate),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        5 => (any::<usize>(), proptest::sample::select(TOML_VALUES)).prop_map(|(i, v)| Mutation::Value(i, v)),
        2 => (any::<usize>(), proptest::sample::select(TOML_LINES)).prop_map(|(i, l)| Mutation::Insert(i, l)),
        1 => (0.0f64..1.0).prop_map(Mutation::Truncate),
        1 => (0.0f64..1.0, any::<u8>()).prop_map(|(f, b)| Mutation::Byte(f, b)),
    ]
}

fn mutate(seed: &str, muts: &[Mutation]) -> String {
    let mut lines: Vec<String> = seed.lines().map(str::to_owned).collect();
    for m in muts {
        let n = lines.len().max(1);
        match m {
            Mutation::Delete(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Mutation::Swap(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Mutation::Value(i, v) if !lines.is_empty() => {
                // The i-th line with a value, from i on.
                if let Some(k) = (0..n).map(|k| (i + k) % n).find(|&k| lines[k].contains(" = ")) {
                    let key = lines[k].split(" = ").next().unwrap_or("").to_owned();
                    lines[k] = format!("{key} = {v}");
                }
            }
            Mutation::Insert(i, l) => lines.insert(i % (lines.len() + 1), (*l).to_owned()),
            Mutation::Truncate(f) => {
                let text = lines.join("\n");
                let mut cut = (text.len() as f64 * f) as usize;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                lines = text[..cut].lines().map(str::to_owned).collect();
            }
            Mutation::Byte(f, b) => {
                let mut text = lines.join("\n").into_bytes();
                let at = (text.len() as f64 * f) as usize;
                text.insert(at.min(text.len()), *b);
                lines = String::from_utf8_lossy(&text).lines().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

fn seed_config() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        include_str!("../../../examples/aigate.toml"),
        include_str!("../../../examples/quickstart.toml"),
        EMBEDDED_DEFAULT,
        FUZZ_TOML,
    ])
}

/// Only a fixed set of environment variables exists, so secrets resolve the same way everywhere.
fn env(name: &str) -> Option<String> {
    matches!(name, "PROD_GATEWAY_TOKEN" | "OPENAI_API_KEY" | "AIGATE_ADMIN_TOKEN").then(|| "secret".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Targets.

fn parse_uri(s: &str) -> Option<Uri> {
    s.parse::<Uri>().ok().filter(|u| u.path().starts_with('/'))
}

fn check_route(settings: &Settings, method: &Method, uri: &Uri, h: &HeaderMap) -> Result<(), TestCaseError> {
    match route::route(settings, method, uri, h) {
        Ok(r) => {
            within_base(&r.provider, &r.upstream).map_err(TestCaseError::fail)?;
            prop_assert!(settings.providers.contains_key(&r.provider.name));
            let _ = Endpoint::classify(&r.provider.name, method, r.rest);
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

/// The route of a Universal request on the `prod` gateway.
fn universal_base(uri: &Uri) -> Route<'_> {
    let r = route::route(&SETTINGS, &Method::POST, uri, &HeaderMap::new()).unwrap();
    assert_eq!(r.compat, Compat::Universal);
    r
}

static UNIVERSAL_URI: LazyLock<Uri> = LazyLock::new(|| Uri::from_static("/v1/acct/prod"));

fn check_step(base: &Route<'_>, provider: &str, endpoint: &str) -> Result<(), TestCaseError> {
    match route::for_step(&SETTINGS, base, provider, endpoint) {
        Ok(r) => {
            within_base(&r.provider, &r.upstream)
                .map_err(|e| TestCaseError::fail(format!("step {provider:?} {endpoint:?}: {e}")))?;
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1))]

    /// Any path, method and headers: a route or an error, never an upstream outside the base URL.
    #[test]
    fn route_any_path(path in path_and_query(), method in method(), h in header_map(), account in any::<bool>()) {
        timed("route", || {
            let Some(uri) = parse_uri(&path) else { return Ok(()) };
            check_route(if account { &SETTINGS_ACCOUNT } else { &SETTINGS }, &method, &uri, &h)
        })?;
    }

    /// Any printable path, not only router-shaped ones.
    #[test]
    fn route_any_text(path in "/[!-~]{0,60}", method in method()) {
        timed("route_text", || {
            let Some(uri) = parse_uri(&path) else { return Ok(()) };
            check_route(&SETTINGS, &method, &uri, &HeaderMap::new())
        })?;
    }

    /// A segment `check_segment` accepts cannot move up or sideways once decoded.
    #[test]
    fn segment_check(seg in prop_oneof![3 => "[.%2eEfFcC5\\\\a]{0,9}", 1 => "[^/]{0,12}"]) {
        timed("check_segment", || {
            match check_segment(&seg) {
                Ok(()) => safe_segment(&seg).map_err(TestCaseError::fail),
                Err(e) => { prop_assert!(!e.to_string().is_empty()); Ok(()) }
            }
        })?;
    }

    /// Upstream URIs of every provider for any path, account and query.
    #[test]
    fn upstream_uri_any(rest in segments(6), account in proptest::option::of(segment()), query in proptest::option::of("[a-z0-9=&%./?#-]{0,10}")) {
        timed("upstream_uri", || {
            for p in SETTINGS.providers.values() {
                if let Ok(u) = p.upstream_uri(account.as_deref(), &rest, query.as_deref()) {
                    within_base(p, &u).map_err(|e| TestCaseError::fail(format!("{}: {rest:?} {account:?}: {e}", p.name)))?;
                }
            }
            Ok(())
        })?;
    }

    /// The `cf-aig-*` header parsers: an error names the header; an accepted value is in bounds.
    #[test]
    fn cf_aig_headers(h in header_map()) {
        timed("headers", || {
            let gw = SETTINGS.gateways.get("prod").unwrap();
            match CacheOptions::parse(&h) {
                Ok(o) => {
                    if let Some(ttl) = o.ttl {
                        prop_assert!(ttl.is_zero() || (Duration::from_secs(60)..=aigate_core::cache::MAX_TTL).contains(&ttl));
                    }
                    if let Some(k) = &o.custom_key {
                        prop_assert!(!k.is_empty() && k.len() <= 1024);
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("cache") || e.to_string().contains("skip"), "{e}"),
            }
            match retry_policy(&h, gw) {
                Ok(r) => {
                    prop_assert!((1..=5).contains(&r.max_attempts));
                    prop_assert!(r.delay <= Duration::from_millis(5000));
                    for n in 0..8 { prop_assert!(r.wait(n) <= Duration::from_secs(5)); }
                }
                Err(e) => prop_assert!(e.to_string().contains("cf-aig-"), "{e}"),
            }
            match request_timeout(&h, gw) {
                Ok(t) => prop_assert!(!t.is_zero()),
                Err(e) => prop_assert!(e.to_string().contains("cf-aig-request-timeout"), "{e}"),
            }
            if let Some(v) = h.get(headers::CF_AIG_METADATA) {
                if let Some(md) = parse_metadata(v.as_bytes()) {
                    prop_assert!(md.len() <= aigate_store::MAX_METADATA);
                }
            }
            if let Some(v) = h.get(headers::CF_AIG_CUSTOM_COST) {
                check_custom_cost(v.as_bytes())?;
            }
            // The meter reads the event id, metadata, custom cost and the collect-log flags.
            let uri = Uri::from_static("/prod/openai/chat/completions");
            let r = route::route(&SETTINGS, &Method::POST, &uri, &h).unwrap();
            let m = Meter::new(uuid::Uuid::nil(), 0, Instant::now(), &r, &h);
            let is_false = |n: &HeaderName| h.get(n).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false"));
            prop_assert_eq!(m.collect_log, !is_false(&headers::CF_AIG_COLLECT_LOG));
            prop_assert_eq!(m.collect_payload, !is_false(&headers::CF_AIG_COLLECT_LOG_PAYLOAD));
            prop_assert_eq!(m.event_id.is_some(), h.contains_key(headers::CF_AIG_EVENT_ID));
            let _ = aigate_core::phases::authenticate::check(gw, &h);
            let _ = Canary::choose(&SETTINGS, gw, &h);
            let mut md = routing::Metadata::of(&h);
            let _ = (md.get("user"), md.get("tier"));
            for sticky in [None, Some(routing::Sticky::Credential), Some(routing::Sticky::Metadata("user".into()))] {
                let x = routing::draw(sticky.as_ref(), "salt", &h, &mut routing::Metadata::of(&h));
                prop_assert!((0.0..1.0).contains(&x), "{x}");
            }
            Ok(())
        })?;
    }

    /// `cf-aig-metadata`: Some exactly for a JSON object, at most MAX_METADATA scalar entries.
    #[test]
    fn metadata(v in prop_oneof![json_value().prop_map(|v| v.to_string().into_bytes()), proptest::collection::vec(any::<u8>(), 0..64)]) {
        timed("metadata", || {
            let parsed = parse_metadata(&v);
            let object = matches!(serde_json::from_slice::<Value>(&v), Ok(Value::Object(_)));
            prop_assert_eq!(parsed.is_some(), object);
            if let Some(md) = parsed {
                prop_assert!(md.len() <= aigate_store::MAX_METADATA);
            }
            Ok(())
        })?;
    }

    /// `cf-aig-custom-cost`.
    #[test]
    fn custom_cost(v in prop_oneof![
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (leaf(), leaf(), proptest::option::of(leaf())).prop_map(|(a, b, c)| {
            let mut o = json!({"per_token_in": a, "per_token_out": b});
            if let Some(c) = c { o["per_cache_read_token"] = c; }
            o.to_string().into_bytes()
        }),
        proptest::collection::vec(any::<u8>(), 0..48),
    ]) {
        timed("custom_cost", || check_custom_cost(&v))?;
    }

    /// The Universal Endpoint's body: any bytes, or arrays of steps with any fields; every step's
    /// route stays under its provider's base URL.
    #[test]
    fn universal_chain(body in prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        4 => proptest::collection::vec(universal_step(), 0..12).prop_map(|s| Value::Array(s).to_string().into_bytes()),
    ]) {
        timed("universal", || {
            let base = universal_base(&UNIVERSAL_URI);
            match universal::chain(&body) {
                Ok(c) => {
                    prop_assert!((1..=MAX_STEPS).contains(&c.steps.len()));
                    for s in &c.steps {
                        prop_assert!(!s.provider.is_empty() && !s.endpoint.starts_with('/'));
                        if let Some(n) = s.retry.max_attempts { prop_assert!((1..=5).contains(&n)); }
                        if let Some(t) = s.timeout { prop_assert!(!t.is_zero()); }
                        check_step(&base, &s.provider, &s.endpoint)?;
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })?;
    }

    /// A step's endpoint straight into the route of a step.
    #[test]
    fn step_route(provider in proptest::sample::select(vec!["openai", "anthropic", "compat", "workers-ai", "azure-openai", "local", "bare", "tmpl", "acct", "nope", ""]),
                  endpoint in segments(6)) {
        timed("for_step", || check_step(&universal_base(&UNIVERSAL_URI), provider, &endpoint))?;
    }

    /// Dynamic routes: any request and metadata; the chain is one of the route's arms.
    #[test]
    fn dynamic_route(req in chat_request(), h in header_map(), name in proptest::sample::select(vec!["support", "ab", "nope", ""])) {
        timed("dynamic", || {
            let gw = SETTINGS.gateways.get("prod").unwrap();
            let _ = routing::dynamic::route_name(&format!("dynamic/{name}"));
            match routing::dynamic::find(&gw.routes, &gw.name, name) {
                Ok(r) => match r.chain(&req, &h) {
                    Ok(c) => {
                        prop_assert!((1..=MAX_STEPS).contains(&c.steps.len()));
                        for s in &c.steps {
                            let body: Value = serde_json::from_slice(&s.body).unwrap();
                            let model = body["model"].as_str().unwrap();
                            let suffix = format!("/{}", s.model.as_deref().unwrap());
                            prop_assert!(model.ends_with(&suffix), "{model}");
                        }
                        let _ = (r.describe(), r.label());
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                },
                Err(e) => prop_assert!(e.to_string().contains("support")),
            }
            Ok(())
        })?;
    }

    /// A compat request's body of any shape, for every provider format: translated or refused.
    #[test]
    fn compat_prepare(
        mut req in chat_request(),
        model in prop_oneof![
            proptest::sample::select(vec!["anthropic/claude", "google-ai-studio/gemini", "openai/gpt", "groq/l", "workers-ai/@cf/x",
                "dynamic/support", "dynamic/nope", "nope/x", "", "anthropic/", "gpt-4o", "local/m"]).prop_map(str::to_owned),
            "\\PC{0,10}",
        ],
        path in proptest::sample::select(vec!["/prod/compat/chat/completions", "/prod/compat/v1/messages", "/prod/compat/responses",
            "/v1/chat/completions", "/client/v4/accounts/a/ai/v1/chat/completions"]),
        raw in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
    ) {
        timed("compat", || {
            req.insert("model".into(), json!(model));
            let body = Bytes::from(raw.clone().unwrap_or_else(|| serde_json::to_vec(&req).unwrap()));
            let uri = Uri::from_static(path);
            let mut r = route::route(&SETTINGS, &Method::POST, &uri, &HeaderMap::new()).unwrap();
            match translate::prepare(&SETTINGS, &mut r, &body) {
                Ok(Some((out, t))) => {
                    serde_json::from_slice::<Value>(&out).map_err(|e| TestCaseError::fail(format!("sent body is not JSON: {e}")))?;
                    within_base(&r.provider, &r.upstream).map_err(TestCaseError::fail)?;
                    prop_assert!(!t.model.is_empty() || model.is_empty());
                }
                Ok(None) => {}
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })?;
    }

    /// Request translation of any chat request to Anthropic's and Gemini's formats, and of any
    /// Anthropic request to OpenAI's.
    #[test]
    fn request_translation(req in chat_request(), max in any::<u64>()) {
        timed("translate_request", || {
            for out in [anthropic::request(&req, "m", max), gemini::request(&req), anthropic_client::request(&req, "m")] {
                match out {
                    Ok(v) => {
                        prop_assert!(v.is_object());
                        serde_json::to_vec(&v).unwrap();
                    }
                    Err(e) => prop_assert!(!e.is_empty()),
                }
            }
            Ok(())
        })?;
    }

    /// The meter's SSE reader on SSE-ish noise: the same usage and model however it is split.
    #[test]
    fn sse_usage_noise(body in sse_noise(), cuts in cuts()) {
        timed("sse_usage_noise", || {
            let chunks = split(&body, &cuts);
            for &ep in USAGE_ENDPOINTS {
                prop_assert_eq!(sse_usage(ep, &chunks), sse_usage(ep, std::slice::from_ref(&body)), "{:?}", ep);
            }
            Ok(())
        })?;
    }

    /// A valid stream of each format: its stated usage, however it is split.
    #[test]
    fn sse_usage_valid(s in valid_stream(), cuts in cuts()) {
        timed("sse_usage_valid", || {
            let chunks = split(&s.body, &cuts);
            let (usage, model) = sse_usage(s.endpoint, &chunks);
            prop_assert_eq!(usage.as_ref(), Some(&s.usage));
            prop_assert_eq!(model.as_deref(), Some("m-1"));
            prop_assert_eq!((usage, model), sse_usage(s.endpoint, std::slice::from_ref(&s.body)));
            Ok(())
        })?;
    }

    /// The filter that hides the usage event aigate asked for: same output and usage however the
    /// stream is split; on a valid OpenAI stream it drops exactly that event.
    #[test]
    fn usage_filter(body in prop_oneof![sse_noise(), valid_stream().prop_map(|s| s.body)], cuts in cuts()) {
        timed("usage_filter", || {
            let whole = filtered(std::slice::from_ref(&body));
            prop_assert_eq!(filtered(&split(&body, &cuts)), whole);
            Ok(())
        })?;
    }

    /// Whole JSON bodies: usage of any bytes and of any JSON, for every endpoint.
    #[test]
    fn json_usage(body in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        sse_noise(),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (json_value(), counts()).prop_map(|(v, (a, b, c, d, e))| json!({"model": "m", "x": v,
            "usage": {"prompt_tokens": a, "completion_tokens": d, "input_tokens": a, "output_tokens": d,
                "cache_read_input_tokens": b, "cache_creation_input_tokens": c, "prompt_cache_hit_tokens": b,
                "total_tokens": a + d + e, "completion_tokens_details": {"reasoning_tokens": e}},
            "usageMetadata": {"promptTokenCount": a, "candidatesTokenCount": d, "thoughtsTokenCount": e}}).to_string().into_bytes()),
    ]) {
        timed("json_usage", || {
            for &ep in USAGE_ENDPOINTS {
                if let Some(u) = usage::parse_json(ep, &body) {
                    prop_assert!(u.cached_input_tokens + u.cache_write_tokens <= u.input_tokens);
                    prop_assert!(u.reasoning_tokens <= u.output_tokens);
                }
            }
            let _ = usage::request_model(&body);
            if let Some(out) = usage::inject_include_usage(&body) {
                if let Ok(Value::Object(_)) = serde_json::from_slice::<Value>(&body) {
                    let v: Value = serde_json::from_slice(&out).map_err(|e| TestCaseError::fail(format!("injected body: {e}")))?;
                    prop_assert_eq!(&v["stream_options"]["include_usage"], &json!(true));
                }
            }
            Ok(())
        })?;
    }

    /// Response translation of any bytes, for every translation and status: the same output
    /// however the answer is split.
    #[test]
    fn response_translation_noise(body in prop_oneof![sse_noise(), json_value().prop_map(|v| v.to_string().into_bytes())],
                                  cuts in cuts(), status in proptest::sample::select(vec![200u16, 400, 429, 500]), event_stream in any::<bool>()) {
        timed("translate_response_noise", || {
            let chunks = split(&body, &cuts);
            for t in translations() {
                prop_assert_eq!(translated(&t, status, event_stream, &chunks), translated(&t, status, event_stream, std::slice::from_ref(&body)),
                    "{:?}", t);
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(config(2))]

    /// Response translation of valid-looking provider streams: split-invariant, and the output is
    /// well-formed SSE with JSON data.
    #[test]
    fn response_translation_streams((format, body) in provider_stream(), cuts in cuts()) {
        timed("translate_response_stream", || {
            let chunks = split(&body, &cuts);
            for t in translations().into_iter().filter(|t| t.format == format && t.stream) {
                let got = translated(&t, 200, true, &chunks);
                prop_assert_eq!(&got, &translated(&t, 200, true, std::slice::from_ref(&body)), "{:?}", t);
                if let Some(out) = got {
                    if t.anthropic_client == (format == Format::OpenAi) {
                        well_formed_sse(&out).map_err(|e| TestCaseError::fail(format!("{t:?}: {e}")))?;
                    }
                }
            }
            Ok(())
        })?;
    }

    /// Arbitrary text as a configuration file.
    #[test]
    fn config_any_text(text in prop_oneof![
        "\\PC{0,200}",
        proptest::collection::vec(prop_oneof![proptest::sample::select(TOML_LINES), proptest::sample::select(TOML_VALUES)], 0..20)
            .prop_map(|v| v.join("\n")),
    ]) {
        timed("config_text", || check_config(&text))?;
    }

    /// The example configurations, mutated: lines dropped, doubled, swapped, values replaced.
    #[test]
    fn config_mutated(seed in seed_config(), muts in proptest::collection::vec(mutation(), 1..8)) {
        timed("config_mutated", || check_config(&mutate(seed, &muts)))?;
    }
}

proptest! {
    #![proptest_config(config(16))]

    /// Events larger than the meter's bound (a Responses `response.completed` echoing a long
    /// answer): the usage is still read, however the stream is split.
    #[test]
    fn sse_usage_large_event(len in 60_000usize..200_000, (input, _, _, output, _) in counts(), cuts in cuts(), eol in eol()) {
        timed("sse_usage_large", || {
            let text = "x".repeat(len);
            let data = json!({"type":"response.completed","response":{"model":"m","output":[{"type":"message","content":[{"text":text}]}],
                "usage":{"input_tokens":input,"output_tokens":output}}}).to_string();
            let body = sse_body(&[(Some("response.completed"), data)], eol, true, false);
            let (usage, _) = sse_usage(Endpoint::Responses, &split(&body, &cuts));
            let u = usage.ok_or_else(|| TestCaseError::fail("no usage"))?;
            prop_assert_eq!((u.input_tokens, u.output_tokens), (input, output));
            let big = format!("{}\"usage\":{{\"prompt_tokens\":{input},\"completion_tokens\":{output}}}}}", &format!("{{\"model\":\"m\",\"data\":\"{text}\",")[..]);
            for &ep in USAGE_ENDPOINTS {
                let _ = usage::parse_json(ep, big.as_bytes());
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// A slow upstream: one long event dripped a few bytes at a time, then many small events in
    /// one read. Every stream reader must stay linear (the time check fails a quadratic one).
    #[test]
    fn stream_drip(len in 100_000usize..400_000, chunk in 1usize..64, small in 10_000usize..40_000, crlf in any::<bool>()) {
        timed("stream_drip", || {
            let eol = if crlf { "\r\n" } else { "\n" };
            let long = format!("data: {{\"x\":\"{}\"}}{eol}{eol}", "a".repeat(len)).into_bytes();
            let mut chunks: Vec<Vec<u8>> = long.chunks(chunk).map(<[u8]>::to_vec).collect();
            chunks.push(format!("data: {{}}{eol}{eol}").repeat(small).into_bytes());
            for t in translations().into_iter().filter(|t| t.stream) {
                let _ = translated(&t, 200, true, &chunks);
            }
            let _ = sse_usage(Endpoint::ChatCompletions, &chunks);
            let _ = filtered(&chunks);
            Ok(())
        })?;
    }
}

fn universal_step() -> impl Strategy<Value = Value> {
    let provider = prop_oneof![
        4 => proptest::sample::select(vec!["openai", "anthropic", "compat", "workers-ai", "azure-openai", "local", "tmpl", "acct", "nope", ""])
            .prop_map(|s| json!(s)),
        1 => leaf(),
    ];
    let endpoint = prop_oneof![4 => segments(6).prop_map(Value::String), 1 => leaf()];
    let headers = proptest::collection::vec(
        (prop_oneof![proptest::sample::select(HEADER_NAMES).prop_map(str::to_owned), "\\PC{0,6}"], leaf()),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect()));
    let config = proptest::collection::vec(
        (proptest::sample::select(vec!["requestTimeout", "maxAttempts", "retryDelay", "backoff", "x"]), leaf()),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    (
        provider,
        endpoint,
        proptest::option::of(headers),
        proptest::option::of(json_value()),
        proptest::option::of(config),
        json_value(),
    )
        .prop_map(|(provider, endpoint, headers, query, config, junk)| {
            let mut o = Map::new();
            o.insert("provider".into(), provider);
            o.insert("endpoint".into(), endpoint);
            if let Some(h) = headers {
                o.insert("headers".into(), h);
            }
            if let Some(q) = query {
                o.insert("query".into(), q);
            }
            if let Some(c) = config {
                o.insert("config".into(), c);
            }
            if junk.is_null() {
                o.insert("extra".into(), junk);
            }
            Value::Object(o)
        })
}

fn check_custom_cost(v: &[u8]) -> Result<(), TestCaseError> {
    match CustomCost::parse(v) {
        Ok(c) => {
            for rate in [Some(c.per_token_in), Some(c.per_token_out), c.per_cache_read_token, c.per_cache_write_token]
                .into_iter()
                .flatten()
            {
                prop_assert!(rate.is_finite() && rate >= 0.0);
            }
            let u = Usage {
                input_tokens: 1000,
                output_tokens: 10,
                cached_input_tokens: 10,
                cache_write_tokens: 5,
                reasoning_tokens: 1,
                model: None,
            };
            let cost = c.cost(&u);
            prop_assert!(!cost.is_nan() && cost >= 0.0, "{cost}");
        }
        Err(e) => prop_assert!(e.to_string().contains("cf-aig-custom-cost")),
    }
    Ok(())
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Settings::from_toml_with(text, &env) {
        Ok(s) => {
            prop_assert!(s.gateways.contains_key(&*s.default_gateway));
            // The router works on whatever was accepted.
            for path in ["/v1/chat/completions", "/v1/a/default/openai/models", "/default/anthropic/v1/messages"] {
                let uri = Uri::from_static(path);
                check_route(&s, &Method::POST, &uri, &HeaderMap::new())?;
            }
            for gw in s.gateways.values() {
                for r in gw.routes.values() {
                    let _ = r.chain(&Map::new(), &HeaderMap::new());
                }
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}
