//! Stream and body targets: compat requests and their translation, SSE usage (noise, valid
//! streams, huge events, slow drips), the usage filter, JSON usage, response translation.

use super::*;

/// Split points of a byte string of length `len` (sorted, deduplicated), from random fractions.
pub(super) fn split(data: &[u8], cuts: &[f64]) -> Vec<Vec<u8>> {
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

pub(super) fn cuts() -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        3 => proptest::collection::vec(0.0f64..1.0, 0..24),
        1 => proptest::collection::vec(0.0f64..1.0, 100..400), // byte by byte, nearly
    ]
}

/// Bytes of an SSE-ish stream: framing, keys and numbers the readers look for, and noise.
pub(super) fn sse_noise() -> impl Strategy<Value = Vec<u8>> {
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
pub(super) fn eol() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec!["\n", "\r\n", "\r"])
}

/// Joins events into an SSE body: `data:` with or without a space, optional `event:` lines and
/// comments, the chosen line ending.
pub(super) fn sse_body(events: &[(Option<&str>, String)], eol: &str, space: bool, comments: bool) -> Vec<u8> {
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
pub(super) struct ValidStream {
    endpoint: Endpoint,
    body: Vec<u8>,
    usage: Usage,
}

pub(super) fn counts() -> impl Strategy<Value = (u64, u64, u64, u64, u64)> {
    (0u64..1_000_000, 0u64..1_000, 0u64..1_000, 0u64..1_000_000, 0u64..1_000)
}

pub(super) fn texts() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec("\\PC{0,12}", 0..6)
}

pub(super) fn valid_stream() -> impl Strategy<Value = ValidStream> {
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

pub(super) const USAGE_ENDPOINTS: &[Endpoint] = &Endpoint::ALL;

/// Usage and model of a body read in `chunks`.
pub(super) fn sse_usage(endpoint: Endpoint, chunks: &[Vec<u8>]) -> (Option<Usage>, Option<String>) {
    let mut r = SseUsage::new(endpoint);
    for c in chunks {
        r.feed(c);
        let _ = r.usage();
    }
    let model = r.model().map(str::to_owned);
    (r.finish(), model)
}

/// What an [`InjectedUsageFilter`] passes on and the usage it dropped, for a body in `chunks`.
pub(super) fn filtered(chunks: &[Vec<u8>]) -> (Vec<u8>, Option<Usage>) {
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
pub(super) fn translations() -> Vec<Translation> {
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
pub(super) fn translated(t: &Translation, status: u16, event_stream: bool, chunks: &[Vec<u8>]) -> Option<Vec<u8>> {
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
pub(super) fn well_formed_sse(out: &[u8]) -> Result<(), String> {
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
pub(super) fn provider_stream() -> impl Strategy<Value = (Format, Vec<u8>)> {
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

proptest! {
    #![proptest_config(config(1))]

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
