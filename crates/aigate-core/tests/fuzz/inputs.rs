//! Shared settings, the upstream-URI property, and the strategies of paths, headers and JSON
//! requests the targets draw from.

use super::*;

// ---------------------------------------------------------------------------------------------
// Shared settings.

pub(super) const FUZZ_TOML: &str = r#"
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

pub(super) static SETTINGS: LazyLock<Settings> =
    LazyLock::new(|| Settings::from_toml_with(FUZZ_TOML, &|_| None).unwrap());
pub(super) static SETTINGS_ACCOUNT: LazyLock<Settings> =
    LazyLock::new(|| Settings::from_toml_with(&format!("account_id = \"acct\"\n{FUZZ_TOML}"), &|_| None).unwrap());

// ---------------------------------------------------------------------------------------------
// The upstream-URI property.

/// Percent-decodes once (invalid escapes are kept as they are), as an upstream server would.
pub(super) fn decoded(s: &str) -> Vec<u8> {
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
pub(super) fn safe_segment(seg: &str) -> Result<(), String> {
    let d = decoded(seg);
    if d == b"." || d == b".." || d.contains(&b'/') || d.contains(&b'\\') {
        return Err(format!("segment {seg:?} decodes to {:?}", String::from_utf8_lossy(&d)));
    }
    Ok(())
}

/// Matches `s` against a base URL part with `{placeholder}`s; a placeholder stands for a
/// non-empty run of characters outside `stop`. Returns what follows the match.
pub(super) fn match_template<'s>(
    template: &str,
    mut s: &'s str,
    stop: &[char],
    fills: &mut Vec<&'s str>,
) -> Option<&'s str> {
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
pub(super) fn within_base(p: &Provider, uri: &Uri) -> Result<(), String> {
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
pub(super) const SEGMENTS: &[&str] = &[
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

pub(super) fn segment() -> BoxedStrategy<String> {
    prop_oneof![
        6 => proptest::sample::select(SEGMENTS).prop_map(str::to_owned),
        2 => "[a-zA-Z0-9._~%:@!$&'()*+,;=-]{0,10}",
        1 => "\\PC{0,6}",
    ]
    .boxed()
}

pub(super) fn segments(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 0..max).prop_map(|v| v.join("/"))
}

pub(super) fn path_and_query() -> impl Strategy<Value = String> {
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

pub(super) fn method() -> impl Strategy<Value = Method> {
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
pub(super) fn header_value() -> BoxedStrategy<Vec<u8>> {
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

pub(super) const HEADER_NAMES: &[&str] = &[
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

pub(super) fn header_map() -> impl Strategy<Value = HeaderMap> {
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
pub(super) const KEYS: &[&str] = &[
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

pub(super) const STRINGS: &[&str] = &[
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

pub(super) fn leaf() -> BoxedStrategy<Value> {
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
pub(super) fn json_value() -> BoxedStrategy<Value> {
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
pub(super) fn message() -> BoxedStrategy<Value> {
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
pub(super) fn chat_request() -> impl Strategy<Value = Map<String, Value>> {
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
