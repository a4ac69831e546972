//! What translating costs: a typical 1 KB chat request to Anthropic's and Gemini's formats, and
//! their answers (whole and streamed) back to OpenAI's. Target: a request and its answer under
//! 20 µs.
//!
//! ```text
//! cargo bench -p aigate-core --bench translate
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use aigate_core::translate::{anthropic, gemini, Format, ResponseTranslator, Translation};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::Value;

/// About 1 KB: a system prompt, a short history, one tool.
const REQUEST: &str = r#"{"model":"anthropic/claude-sonnet-4-5","max_tokens":512,"temperature":0.3,
"messages":[{"role":"system","content":"You are a concise assistant for a travel company. Answer in two sentences at most and never invent prices."},
{"role":"user","content":"I want to visit Lisbon in March. What is the weather like, and what should I pack for a week of walking?"},
{"role":"assistant","content":"March in Lisbon is mild, around 15 to 19 C with some rain. Pack layers, a light rain jacket and comfortable shoes."},
{"role":"user","content":"Great. Can you check the forecast for the first week of March and suggest two day trips that are easy by train?"}],
"tools":[{"type":"function","function":{"name":"get_forecast","description":"Weather forecast for a city and a date range",
"parameters":{"type":"object","properties":{"city":{"type":"string"},"from":{"type":"string","format":"date"},"to":{"type":"string","format":"date"}},"required":["city","from","to"]}}}]}"#;

const ANTHROPIC_ANSWER: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5",
"content":[{"type":"text","text":"Let me check the forecast for Lisbon in the first week of March, then I will suggest Sintra and Cascais, both under an hour by train from Rossio and Cais do Sodre."},
{"type":"tool_use","id":"toolu_01A09q90qw90lq917835lq9","name":"get_forecast","input":{"city":"Lisbon","from":"2027-03-01","to":"2027-03-07"}}],
"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":412,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":96}}"#;

fn anthropic_stream() -> Vec<u8> {
    let mut s = String::new();
    s.push_str("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":412,\"output_tokens\":1}}}\n\n");
    s.push_str("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    for w in
        ["March", " in", " Lisbon", " is", " mild,", " around", " 15", " to", " 19", " C", " with", " some", " rain."]
    {
        s.push_str(&format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{w}\"}}}}\n\n"));
    }
    s.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n");
    s.push_str("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":13}}\n\n");
    s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

const GEMINI_ANSWER: &str = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"March in Lisbon is mild, around 15 to 19 C with some rain. Sintra and Cascais are both under an hour by train."}]},"finishReason":"STOP","index":0}],
"usageMetadata":{"promptTokenCount":398,"candidatesTokenCount":31,"totalTokenCount":429},"modelVersion":"gemini-2.5-flash","responseId":"abc123"}"#;

fn translation(format: Format, stream: bool) -> Translation {
    Translation { anthropic_client: false, format, stream, include_usage: false, model: "m".into() }
}

/// The request as the gateway translates it: parsed, translated, serialized.
fn to_anthropic(body: &[u8]) -> Vec<u8> {
    let v: Value = serde_json::from_slice(body).unwrap();
    serde_json::to_vec(&anthropic::request(v.as_object().unwrap(), "claude-sonnet-4-5", 1024).unwrap()).unwrap()
}

fn to_gemini(body: &[u8]) -> Vec<u8> {
    let v: Value = serde_json::from_slice(body).unwrap();
    serde_json::to_vec(&gemini::request(v.as_object().unwrap()).unwrap()).unwrap()
}

fn answer(t: &Translation, body: &[u8], stream: bool) -> usize {
    let mut r = ResponseTranslator::new(t, http::StatusCode::OK, stream, 1).unwrap();
    r.data(body).len() + r.end().len()
}

fn bench(c: &mut Criterion) {
    let req = REQUEST.as_bytes();
    let stream = anthropic_stream();
    let whole = translation(Format::Anthropic, false);
    let streamed = translation(Format::Anthropic, true);
    let gem = translation(Format::Gemini, false);
    c.bench_function("baseline: parse and serialize the request as a Value", |b| {
        b.iter(|| serde_json::to_vec(&serde_json::from_slice::<Value>(black_box(req)).unwrap()).unwrap())
    });
    c.bench_function("request to anthropic (1 KB)", |b| b.iter(|| to_anthropic(black_box(req))));
    c.bench_function("answer from anthropic", |b| {
        b.iter(|| answer(&whole, black_box(ANTHROPIC_ANSWER.as_bytes()), false))
    });
    c.bench_function("request and answer, anthropic", |b| {
        b.iter(|| (to_anthropic(black_box(req)), answer(&whole, black_box(ANTHROPIC_ANSWER.as_bytes()), false)))
    });
    c.bench_function("stream from anthropic (18 events)", |b| b.iter(|| answer(&streamed, black_box(&stream), true)));
    c.bench_function("request and answer, gemini", |b| {
        b.iter(|| (to_gemini(black_box(req)), answer(&gem, black_box(GEMINI_ANSWER.as_bytes()), false)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
