//! Token usage: what a provider says a request consumed, read from its response and normalised
//! into one [`Usage`] that [`crate::meter::cost`] can price without knowing the provider.
//!
//! Entry points, all pure (no I/O, no locks) and cheap enough for the request path:
//! - [`parse_json`] reads a complete (non-streamed) JSON response body;
//! - [`SseUsage`] is fed an SSE response body chunk by chunk as it is relayed and gives the usage at
//!   the end ([`SseUsage::finish`]);
//! - [`inject_include_usage`] rewrites an OpenAI streaming request so the upstream reports usage, and
//!   [`InjectedUsageFilter`] removes the extra usage-only event that this adds from what the client sees.
//!
//! # Normalisation
//!
//! Every provider counts differently; [`Usage`] has one representation in which each token is in
//! exactly one billed category, so a price applied per category can never count a token twice:
//!
//! | field | meaning |
//! |---|---|
//! | `input_tokens` | **all** input tokens: uncached, cache reads and cache writes |
//! | `cached_input_tokens` | the part of `input_tokens` read from the provider's prompt cache |
//! | `cache_write_tokens` | the part of `input_tokens` written to the prompt cache (Anthropic) |
//! | `output_tokens` | **all** output tokens, reasoning included |
//! | `reasoning_tokens` | the part of `output_tokens` spent on reasoning ("thinking"); informational |
//!
//! Uncached input is `input_tokens - cached_input_tokens - cache_write_tokens`
//! ([`Usage::uncached_input_tokens`]). The subsets are clamped so they never exceed their total.
//!
//! How each provider counts, and how it is mapped:
//! - **OpenAI** chat/completions, completions, embeddings: `prompt_tokens` *includes*
//!   `prompt_tokens_details.cached_tokens`; `completion_tokens` *includes*
//!   `completion_tokens_details.reasoning_tokens`. Mapped as is (embeddings have no output).
//!   Streamed, usage comes only when the request set `stream_options.include_usage`, in a final
//!   chunk whose `choices` is `[]` (every other chunk then carries `"usage":null`).
//! - **OpenAI-compatible** providers (Azure OpenAI, Groq, Mistral, DeepSeek, xAI, Cerebras, …)
//!   use the same fields, with these quirks: **DeepSeek** reports `prompt_cache_hit_tokens` and
//!   `prompt_cache_miss_tokens` (their sum is `prompt_tokens`; hits are cached input); **Groq**
//!   streams put usage in `x_groq.usage` of the last chunk; **xAI** reports `completion_tokens`
//!   *without* reasoning tokens (`total_tokens = prompt + completion + reasoning`), which is
//!   recognised by exactly that equation and the reasoning tokens are then added to output;
//!   **Mistral** sends usage in its last stream chunk unasked.
//! - **OpenAI Responses API**: `input_tokens` *includes* `input_tokens_details.cached_tokens`;
//!   `output_tokens` *includes* `output_tokens_details.reasoning_tokens`. Streamed, in
//!   `response.usage` of the `response.completed` (or `.incomplete`/`.failed`) event.
//! - **Anthropic** messages: `input_tokens` *excludes* `cache_read_input_tokens` and
//!   `cache_creation_input_tokens`, so `input_tokens` here is their sum. Streamed: `message_start`
//!   carries model, input and cache counts and an initial `output_tokens`; `message_delta` carries
//!   the final *cumulative* `output_tokens` (newer API versions also repeat cumulative input/cache
//!   counts there); a later value replaces an earlier one, it is never added. Anthropic does not
//!   report thinking tokens separately, so `reasoning_tokens` is 0.
//! - **Google AI Studio** (`usageMetadata`): `promptTokenCount` *includes*
//!   `cachedContentTokenCount`; `candidatesTokenCount` *excludes* `thoughtsTokenCount`;
//!   `toolUsePromptTokenCount` is input. So input = prompt + tool-use prompt, output = candidates +
//!   thoughts, reasoning = thoughts. Every streamed chunk carries the cumulative counts; the last
//!   wins. The non-SSE stream form (a JSON array of chunks) is accepted by [`parse_json`].
//!
//! Not distinguished: audio/image tokens (counted with text of the same direction) and Anthropic's
//! 1-hour cache writes (counted with 5-minute ones).
//!
//! # Streams
//!
//! [`SseUsage`] follows the SSE framing (`\n`, `\r\n` or `\r` line ends, multi-line `data`, events
//! split anywhere across chunks) but buffers only the `data` of the current event, at most
//! [`MAX_EVENT_BYTES`]. It JSON-parses only events that can matter: one carrying a `"usage"` (or
//! `"usageMetadata"`) key whose value is an object — this covers `message_start`, `message_delta`
//! and `response.completed` — plus the first event naming the model. An event larger than the
//! bound (a Responses `response.completed` echoes the whole output) keeps only its last part, from
//! which the usage object, which comes last in every provider's shape, is cut out and parsed.
//!
//! # Failure behaviour
//!
//! Parsing never panics and never buffers without bound. Input that is not the expected shape
//! gives `None` from [`parse_json`] and [`SseUsage::finish`]; a malformed SSE event is skipped and
//! the stream is still read. Counts of the wrong JSON type are treated as absent. A stream cut
//! short gives the usage seen so far (for Anthropic, the input counts and the output count of
//! `message_start`).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use bytes::Bytes;

use crate::endpoint::{Endpoint, UsageFormat};
use memchr::{memchr2, memmem};
use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Largest SSE event `data` [`SseUsage`] and [`InjectedUsageFilter`] hold whole; beyond it only
/// the tail is kept (by [`SseUsage`]) or the event is passed through unexamined (by the filter).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// What an over-long event is trimmed to.
const TAIL_BYTES: usize = 32 * 1024;
/// Plain bodies up to this size are parsed fully; larger ones (big embedding responses) are
/// scanned for their usage object instead.
const FULL_PARSE_LIMIT: usize = 256 * 1024;
/// How far from either end of a large body the model name is looked for.
const MODEL_WINDOW: usize = 8 * 1024;
/// Buffers that grew past this are released after the event instead of kept for reuse.
const KEEP_CAPACITY: usize = 16 * 1024;

const USAGE_KEY: &[u8] = b"\"usage\"";
const USAGE_METADATA_KEY: &[u8] = b"\"usageMetadata\"";
const MODEL_KEY: &[u8] = b"\"model\"";
const MODEL_VERSION_KEY: &[u8] = b"\"modelVersion\"";

/// Token usage of one request, normalised across providers (see the module docs for the rules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// All input tokens: uncached, cache reads and cache writes.
    pub input_tokens: u64,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
    /// Part of `input_tokens` read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Part of `input_tokens` written to the provider's prompt cache (Anthropic
    /// `cache_creation_input_tokens`).
    pub cache_write_tokens: u64,
    /// Part of `output_tokens` spent on reasoning.
    pub reasoning_tokens: u64,
    /// The model that served the request, as the response names it (often a dated snapshot).
    pub model: Option<String>,
}

impl Usage {
    /// Builds a usage from the normalised counts, clamping each subset to its total.
    fn clamped(input: u64, cached: u64, write: u64, output: u64, reasoning: u64, model: Option<String>) -> Usage {
        let cached = cached.min(input);
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            cache_write_tokens: write.min(input - cached),
            reasoning_tokens: reasoning.min(output),
            model,
        }
    }

    /// Input tokens that were neither read from nor written to the prompt cache.
    pub fn uncached_input_tokens(&self) -> u64 {
        self.input_tokens.saturating_sub(self.cached_input_tokens).saturating_sub(self.cache_write_tokens)
    }

    /// Input plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// The usage formats are the endpoint's ([`Endpoint::usage_format`]); called shapes here.
type Shape = UsageFormat;

impl Shape {
    fn usage_key(self) -> &'static [u8] {
        match self {
            Shape::Google => USAGE_METADATA_KEY,
            _ => USAGE_KEY,
        }
    }

    fn model_key(self) -> &'static [u8] {
        match self {
            Shape::Google => MODEL_VERSION_KEY,
            _ => MODEL_KEY,
        }
    }
}

/// Reads the usage of a complete, non-streamed JSON response body. `None` if the body is not
/// JSON, has no usage, or its usage has none of the expected counts.
///
/// Bodies up to 256 KiB are parsed fully (only the usage and model fields are materialised).
/// Larger ones, typically embeddings, are not parsed: the last `"usage"` object in the body (it
/// comes after the content in every provider's shape) is cut out and parsed, and the model is
/// looked for near either end.
pub fn parse_json(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    let shape = endpoint.usage_format()?;
    let first = *body.iter().find(|b| !b.is_ascii_whitespace())?;
    if body.len() > FULL_PARSE_LIMIT {
        return scan_large(shape, body);
    }
    if first == b'{' {
        if let Some(u) = top_level_usage(shape, body) {
            return Some(u);
        }
    }
    parse_full(shape, body, first)
}

/// [`parse_json`] by a full (typed, lenient) parse.
fn parse_full(shape: Shape, body: &[u8], first: u8) -> Option<Usage> {
    let mut acc = Acc::default();
    if first == b'[' {
        // Google `streamGenerateContent` without `alt=sse`: an array of chunks.
        let items: Vec<Obj<Envelope>> = serde_json::from_slice(body).ok()?;
        for env in items.into_iter().filter_map(|o| o.0) {
            acc.absorb(shape, env);
        }
    } else {
        acc.absorb(shape, serde_json::from_slice(body).ok()?);
    }
    acc.usage(shape)
}

/// The usage of a response body that is one JSON object with a top-level usage object: a
/// structural walk over the top-level members (strings are skipped with `memchr`, nothing is
/// decoded but the usage object and the model name) instead of a full parse, several times
/// faster on a typical chat completion. `None` whenever the walk is unsure (no top-level usage
/// with counts, an escaped or repeated key of interest, trailing bytes): the caller then parses
/// fully, so both paths agree on every body the full parse accepts.
fn top_level_usage(shape: Shape, body: &[u8]) -> Option<Usage> {
    let usage_key = &shape.usage_key()[1..shape.usage_key().len() - 1];
    let (mut model, mut model_version, mut usage) = (None, None, None);
    let close = walk_members(body, |k, value| {
        let key = &body[k.start + 1..k.end - 1];
        if key.contains(&b'\\') {
            return false;
        }
        let slot = match key {
            b"model" => &mut model,
            b"modelVersion" => &mut model_version,
            k if k == usage_key => &mut usage,
            _ => return true,
        };
        // A repeated key: the full parse decides.
        slot.replace(value).is_none()
    })?;
    if skip_ws(body, close + 1) != body.len() {
        return None;
    }
    let usage = usage?;
    if body[usage.start] != b'{' {
        return None;
    }
    let raw = RawUsage::scan(&body[usage.clone()]).or_else(|| serde_json::from_slice(&body[usage]).ok())?;
    if !raw.has_counts() {
        return None;
    }
    let string = |span: Option<std::ops::Range<usize>>| {
        span.filter(|r| body[r.start] == b'"').and_then(|r| serde_json::from_slice::<String>(&body[r]).ok())
    };
    raw.normalise(shape, string(model).or_else(|| string(model_version)))
}

fn scan_large(shape: Shape, body: &[u8]) -> Option<Usage> {
    let open = last_key_value(body, 0..body.len(), shape.usage_key(), b'{')?;
    let raw: RawUsage = serde_json::from_slice(extract_object(body, open)?).ok()?;
    let head = 0..body.len().min(MODEL_WINDOW);
    let tail = body.len().saturating_sub(MODEL_WINDOW)..body.len();
    let model = match shape {
        Shape::Google => last_key_string(body, tail, MODEL_VERSION_KEY),
        _ => first_key_string(body, head, MODEL_KEY).or_else(|| last_key_string(body, tail, MODEL_KEY)),
    };
    raw.normalise(shape, model)
}

/// Usage and model accumulated over the events of one response.
#[derive(Debug, Default)]
struct Acc {
    raw: RawUsage,
    seen: bool,
    model: Option<String>,
}

impl Acc {
    fn absorb(&mut self, shape: Shape, env: Envelope) {
        let (model, usage) = env.pick(shape);
        if model.is_some() {
            self.model = model;
        }
        if let Some(u) = usage {
            self.merge(u);
        }
    }

    fn merge(&mut self, u: RawUsage) {
        if u.has_counts() {
            self.raw.merge(u);
            self.seen = true;
        }
    }

    fn usage(&self, shape: Shape) -> Option<Usage> {
        if !self.seen {
            return None;
        }
        self.raw.normalise(shape, self.model.clone())
    }
}

mod inject;
mod json;
mod raw;
mod sse;

pub use inject::{inject_include_usage, InjectedUsageFilter};
use json::*;
pub use json::{for_each_member, member_value, request_model, value_is};
use raw::*;
pub use sse::SseUsage;

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, cached: u64, write: u64, reasoning: u64, model: &str) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            cache_write_tokens: write,
            reasoning_tokens: reasoning,
            model: Some(model.to_string()),
        }
    }

    fn stream(endpoint: Endpoint, chunks: &[&[u8]]) -> Option<Usage> {
        let mut s = SseUsage::new(endpoint);
        for c in chunks {
            s.feed(c);
        }
        s.finish()
    }

    /// Splits `body` in two at every byte and in many chunks at pseudo-random points, and
    /// checks that every split reads the same usage.
    fn assert_split_invariant(endpoint: Endpoint, body: &[u8], expected: &Usage) {
        for k in 0..=body.len() {
            let got = stream(endpoint, &[&body[..k], &body[k..]]);
            assert_eq!(got.as_ref(), Some(expected), "split at {k}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(stream(endpoint, &bytes).as_ref(), Some(expected), "byte at a time");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let mut chunks = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let n = (seed % 97) as usize + 1;
                let (a, b) = rest.split_at(n.min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            assert_eq!(stream(endpoint, &chunks).as_ref(), Some(expected), "random chunks");
        }
    }

    #[test]
    fn openai_chat_cached_prompt() {
        // prompt_tokens includes the cached tokens: input 1000 of which 400 cached.
        let got = parse_json(Endpoint::ChatCompletions, fixture!("openai_chat.json")).unwrap();
        assert_eq!(got, usage(1000, 200, 400, 0, 0, "gpt-4o-mini-2024-07-18"));
        assert_eq!(got.uncached_input_tokens(), 600);
        assert_eq!(got.total_tokens(), 1200);
    }

    #[test]
    fn openai_chat_reasoning() {
        let got = parse_json(Endpoint::ChatCompletions, fixture!("openai_chat_reasoning.json")).unwrap();
        // completion_tokens (846) already includes the 768 reasoning tokens.
        assert_eq!(got, usage(1117, 846, 1024, 0, 768, "o4-mini-2025-04-16"));
    }

    #[test]
    fn openai_completions_and_embeddings() {
        let got = parse_json(Endpoint::Completions, fixture!("openai_completions.json")).unwrap();
        assert_eq!(got, usage(5, 7, 0, 0, 0, "gpt-3.5-turbo-instruct-0914"));
        let got = parse_json(Endpoint::Embeddings, fixture!("openai_embeddings.json")).unwrap();
        assert_eq!(got, usage(8, 0, 0, 0, 0, "text-embedding-3-small"));
    }

    #[test]
    fn responses_plain() {
        let got = parse_json(Endpoint::Responses, fixture!("openai_responses.json")).unwrap();
        assert_eq!(got, usage(1337, 300, 1024, 0, 256, "o4-mini-2025-04-16"));
    }

    #[test]
    fn anthropic_plain_adds_cache_tokens_to_input() {
        // input_tokens (21) excludes the 12000 cache reads and 1800 cache writes; the tool_use
        // input has its own "usage" object, which must not be taken for the response's.
        let got = parse_json(Endpoint::AnthropicMessages, fixture!("anthropic_messages.json")).unwrap();
        assert_eq!(got, usage(13_821, 15, 12_000, 1_800, 0, "claude-sonnet-4-5-20250929"));
        assert_eq!(got.uncached_input_tokens(), 21);
    }

    #[test]
    fn openai_compatible_providers() {
        let got = parse_json(Endpoint::ChatCompletions, fixture!("mistral_chat.json")).unwrap();
        assert_eq!(got, usage(16, 34, 0, 0, 0, "mistral-small-latest"));
        // DeepSeek: prompt = hit + miss; hits are cached.
        let got = parse_json(Endpoint::ChatCompletions, fixture!("deepseek_chat.json")).unwrap();
        assert_eq!(got, usage(1200, 600, 1024, 0, 400, "deepseek-reasoner"));
        let only_hit_miss = br#"{"model":"deepseek-chat","usage":{"prompt_cache_hit_tokens":100,"prompt_cache_miss_tokens":50,"completion_tokens":10}}"#;
        assert_eq!(
            parse_json(Endpoint::ChatCompletions, only_hit_miss),
            Some(usage(150, 10, 100, 0, 0, "deepseek-chat"))
        );
        // xAI: completion_tokens (9) excludes the 94 reasoning tokens (total 135 = 32 + 9 + 94).
        let got = parse_json(Endpoint::ChatCompletions, fixture!("xai_chat.json")).unwrap();
        assert_eq!(got, usage(32, 103, 6, 0, 94, "grok-3-mini"));
    }

    #[test]
    fn google_plain_and_json_array_stream() {
        // candidatesTokenCount (350) excludes thoughtsTokenCount (1000); promptTokenCount includes cached.
        let got = parse_json(Endpoint::GeminiGenerateContent, fixture!("google_generate.json")).unwrap();
        assert_eq!(got, usage(4200, 1350, 4000, 0, 1000, "gemini-2.5-flash"));
        let array = br#"[{"candidates":[],"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7},"modelVersion":"gemini-2.0-flash"},
                         {"candidates":[],"usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":5,"toolUsePromptTokenCount":3,"totalTokenCount":15},"modelVersion":"gemini-2.0-flash"}]"#;
        assert_eq!(parse_json(Endpoint::GeminiGenerateContent, array), Some(usage(10, 5, 0, 0, 0, "gemini-2.0-flash")));
    }

    #[test]
    fn openai_stream_every_split() {
        let expected = usage(2048, 85, 1536, 0, 0, "gpt-4o-mini-2024-07-18");
        assert_split_invariant(Endpoint::ChatCompletions, fixture!("openai_chat_stream.sse"), &expected);
        // The same with CRLF line ends.
        let crlf = String::from_utf8(fixture!("openai_chat_stream.sse").to_vec()).unwrap().replace('\n', "\r\n");
        assert_split_invariant(Endpoint::ChatCompletions, crlf.as_bytes(), &expected);
    }

    #[test]
    fn anthropic_stream_every_split() {
        // message_start: input 21 + cache 12000 read + 1800 written, output 1; message_delta: output 15.
        let expected = usage(13_821, 15, 12_000, 1_800, 0, "claude-sonnet-4-5-20250929");
        assert_split_invariant(Endpoint::AnthropicMessages, fixture!("anthropic_messages_stream.sse"), &expected);
    }

    #[test]
    fn anthropic_stream_cut_after_message_start_keeps_input() {
        let body = fixture!("anthropic_messages_stream.sse");
        let cut = memmem::find(body, b"event: content_block_start").unwrap();
        assert_eq!(
            stream(Endpoint::AnthropicMessages, &[&body[..cut]]),
            Some(usage(13_821, 1, 12_000, 1_800, 0, "claude-sonnet-4-5-20250929"))
        );
    }

    #[test]
    fn anthropic_cumulative_message_delta_replaces_counts() {
        // Newer API versions repeat cumulative input/cache counts in message_delta.
        let body = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"model":"claude-haiku-4-5","usage":{"input_tokens":10,"cache_read_input_tokens":0,"cache_creation_input_tokens":0,"output_tokens":1}}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"input_tokens":12,"cache_read_input_tokens":100,"cache_creation_input_tokens":0,"output_tokens":77,"server_tool_use":{"web_search_requests":1}}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{},"usage":{"output_tokens":80}}"#,
            "\n\n"
        );
        assert_eq!(
            stream(Endpoint::AnthropicMessages, &[body.as_bytes()]),
            Some(usage(112, 80, 100, 0, 0, "claude-haiku-4-5"))
        );
    }

    #[test]
    fn responses_stream() {
        let expected = usage(1337, 300, 1024, 0, 256, "o4-mini-2025-04-16");
        assert_split_invariant(Endpoint::Responses, fixture!("openai_responses_stream.sse"), &expected);
    }

    #[test]
    fn groq_mistral_google_streams() {
        let got = stream(Endpoint::ChatCompletions, &[fixture!("groq_chat_stream.sse")]);
        assert_eq!(got, Some(usage(40, 10, 0, 0, 0, "llama-3.3-70b-versatile")));
        let got = stream(Endpoint::ChatCompletions, &[fixture!("mistral_chat_stream.sse")]);
        assert_eq!(got, Some(usage(9, 4, 0, 0, 0, "mistral-large-latest")));
        // Google: cumulative usageMetadata in every chunk, CRLF framing; output = 9 + 40 thoughts.
        let expected = usage(12, 49, 0, 0, 40, "gemini-2.5-flash");
        assert_split_invariant(Endpoint::GeminiGenerateContent, fixture!("google_stream.sse"), &expected);
    }

    #[test]
    fn stream_without_usage_names_the_model_only() {
        // A chat stream requested without include_usage.
        let body = concat!(
            r#"data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            "\n\n",
            r#"data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            "\n\ndata: [DONE]\n\n"
        );
        let mut s = SseUsage::new(Endpoint::ChatCompletions);
        s.feed(body.as_bytes());
        assert_eq!(s.model(), Some("gpt-4o-2024-08-06"));
        assert_eq!(s.usage(), None);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn sse_framing_details() {
        // Comments, other fields, multi-line data, CR-only line ends, no space after `data:`,
        // a final event without its blank line.
        let body = concat!(
            ": keep-alive\r",
            "retry: 1000\r",
            "id: 7\r",
            "data:{\"model\":\"gpt-4.1-mini\",\r",
            "data: \"choices\":[],\r",
            "data: \"usage\":\r",
            "data: {\"prompt_tokens\":3,\"completion_tokens\":4}}\r",
            "\r",
            "data: {\"model\":\"other\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}"
        );
        assert_eq!(stream(Endpoint::ChatCompletions, &[body.as_bytes()]), Some(usage(5, 6, 0, 0, 0, "other")));
        let first_only = &body[..body.find("\r\r").unwrap() + 2];
        assert_eq!(
            stream(Endpoint::ChatCompletions, &[first_only.as_bytes()]),
            Some(usage(3, 4, 0, 0, 0, "gpt-4.1-mini"))
        );
    }

    #[test]
    fn bad_input_gives_none_and_never_panics() {
        for e in [Endpoint::ChatCompletions, Endpoint::AnthropicMessages, Endpoint::GeminiGenerateContent] {
            for body in [
                &b""[..],
                b"   ",
                b"not json",
                b"{",
                b"[1,2",
                b"null",
                b"[]",
                b"{}",
                br#"{"usage":null}"#,
                br#"{"usage":"lots"}"#,
                br#"{"usage":{}}"#,
                br#"{"usage":{"prompt_tokens":-5,"input_tokens":[1]}}"#,
                br#"{"error":{"message":"rate limited","type":"rate_limit_error"}}"#,
                b"\xff\xfe\x00garbage",
            ] {
                assert_eq!(parse_json(e, body), None, "{e:?} {:?}", String::from_utf8_lossy(body));
                assert_eq!(stream(e, &[b"data: ", body, b"\n\n"]), None);
            }
        }
        // Pseudo-random bytes.
        let mut seed = 42u64;
        let noise: Vec<u8> = (0..20_000)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let alphabet = b"data: {}\"usage\":\r\n[]x";
                alphabet[(seed >> 40) as usize % alphabet.len()]
            })
            .collect();
        for e in [Endpoint::ChatCompletions, Endpoint::Responses] {
            let _ = parse_json(e, &noise);
            let _ = stream(e, &[&noise]);
        }
    }

    #[test]
    fn the_top_level_walk_agrees_with_the_full_parse() {
        let bodies: &[(Endpoint, &[u8])] = &[
            (Endpoint::ChatCompletions, fixture!("openai_chat.json")),
            (Endpoint::ChatCompletions, fixture!("openai_chat_reasoning.json")),
            (Endpoint::Completions, fixture!("openai_completions.json")),
            (Endpoint::Embeddings, fixture!("openai_embeddings.json")),
            (Endpoint::Responses, fixture!("openai_responses.json")),
            (Endpoint::AnthropicMessages, fixture!("anthropic_messages.json")),
            (Endpoint::ChatCompletions, fixture!("mistral_chat.json")),
            (Endpoint::ChatCompletions, fixture!("deepseek_chat.json")),
            (Endpoint::ChatCompletions, fixture!("xai_chat.json")),
            (Endpoint::GeminiGenerateContent, fixture!("google_generate.json")),
        ];
        for (e, body) in bodies {
            let fast = top_level_usage(e.usage_format().unwrap(), body);
            assert!(fast.is_some(), "{e:?}: the walk should read this body");
            assert_eq!(fast, parse_full(e.usage_format().unwrap(), body, b'{'), "{e:?}");
        }
        // Where the walk is unsure it defers (None), and parse_json gives the full parse's answer.
        for body in [
            // usage nested only (not top level), a repeated key, an escaped key, trailing bytes,
            // a model that is not a string, usage without counts beside Groq's.
            &br#"{"choices":[{"usage":{"prompt_tokens":1,"completion_tokens":1}}],"model":"m"}"#[..],
            br#"{"model":"a","model":"b","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            br#"{"model":"esc","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            br#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}} x"#,
            br#"{"model":7,"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            br#"{"usage":{},"x_groq":{"usage":{"prompt_tokens":3,"completion_tokens":4}}}"#,
            br#"{"message":{"model":"claude","usage":{"input_tokens":5,"output_tokens":6}}}"#,
        ] {
            let full = parse_full(Shape::OpenAi, body, b'{');
            if let Some(fast) = top_level_usage(Shape::OpenAi, body) {
                assert_eq!(Some(fast), full, "{}", String::from_utf8_lossy(body));
            }
            assert_eq!(parse_json(Endpoint::ChatCompletions, body), full, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn skip_string_ends_every_string_where_serde_does() {
        // Strings of every length up to 72 bytes, with escapes (a quote, a backslash, a unicode
        // escape) at every position, and unterminated ones.
        for len in 0..72 {
            for (at, esc) in (0..=len).flat_map(|at| [(at, &br#"\""#[..]), (at, br"\\"), (at, br"\u0022")]) {
                let mut s = vec![b'x'; len];
                s.splice(at..at, esc.iter().copied());
                let mut buf = b"\"".to_vec();
                buf.extend_from_slice(&s);
                buf.extend_from_slice(br#"","next":1"#);
                let end = skip_string(&buf, 0);
                let decoded: String = serde_json::from_slice(&buf[..end.unwrap()]).unwrap();
                assert_eq!(decoded.len(), len + 1, "len {len}, escape at {at}");
                assert_eq!(&buf[end.unwrap()..end.unwrap() + 1], b",");
                assert_eq!(skip_string(&buf[..buf.len() - 10], 0), None, "unterminated: len {len}, at {at}");
            }
        }
    }

    #[test]
    fn the_usage_scan_agrees_with_the_typed_parse() {
        let typed = |b: &[u8]| serde_json::from_slice::<RawUsage>(b).ok();
        let usage_of = |body: &[u8], key: &[u8]| {
            let span = find_member(body, key).and_then(|m| m.value).unwrap();
            body[span].to_vec()
        };
        // Every provider fixture's usage object: read by the scan itself, and the same.
        for (body, key) in [
            (fixture!("openai_chat.json"), &b"usage"[..]),
            (fixture!("openai_chat_reasoning.json"), b"usage"),
            (fixture!("openai_completions.json"), b"usage"),
            (fixture!("openai_embeddings.json"), b"usage"),
            (fixture!("openai_responses.json"), b"usage"),
            (fixture!("anthropic_messages.json"), b"usage"),
            (fixture!("mistral_chat.json"), b"usage"),
            (fixture!("deepseek_chat.json"), b"usage"),
            (fixture!("xai_chat.json"), b"usage"),
            (fixture!("google_generate.json"), b"usageMetadata"),
        ] {
            let u = usage_of(body, key);
            let scanned = RawUsage::scan(&u);
            assert!(scanned.is_some(), "{}", String::from_utf8_lossy(&u));
            assert_eq!(scanned, typed(&u), "{}", String::from_utf8_lossy(&u));
        }
        // Plain cases the scan reads, and unusual ones it leaves to the typed parse (None).
        let read: &[&[u8]] = &[
            br#"{}"#,
            br#"{ "prompt_tokens" : 0 , "completion_tokens":null, "other":{"a":[1,"}"]}, "x":"\"" }"#,
            br#"{"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":4,"audio":0}}"#,
            br#"{"input_tokens":9999999999999999999,"output_tokens":1}"#,
        ];
        let deferred: &[&[u8]] = &[
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt_tokens":"12"}"#,
            br#"{"prompt_tokens":-1}"#,
            br#"{"prompt_tokens":012}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            br#"{"prompt\u005ftokens":3}"#,
            br#"{"prompt_tokens_details":7}"#,
            br#"{"completion_tokens_details":{"reasoning_tokens":1,"reasoning_tokens":2}}"#,
            br#"{"completion_tokens_details":{"reasoning_tokens":"2"}}"#,
            br#"{"prompt_tokens":1} "#,
        ];
        for u in read {
            assert!(RawUsage::scan(u).is_some(), "{}", String::from_utf8_lossy(u));
            assert_eq!(RawUsage::scan(u), typed(u), "{}", String::from_utf8_lossy(u));
        }
        for u in deferred {
            assert_eq!(RawUsage::scan(u), None, "{}", String::from_utf8_lossy(u));
        }
    }

    #[test]
    fn lenient_field_types() {
        // A numeric string counts, a fraction is truncated; a negative number, a string where an
        // object belongs or a number where a string belongs is absent and spoils nothing else.
        let body = br#"{"model":7,"usage":{"prompt_tokens":"12","completion_tokens":3.9,"prompt_tokens_details":"n/a","completion_tokens_details":{"reasoning_tokens":-1}}}"#;
        let got = parse_json(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!((got.input_tokens, got.output_tokens, got.reasoning_tokens, got.model), (12, 3, 0, None));
        // Subsets are clamped to their totals.
        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":50},"completion_tokens_details":{"reasoning_tokens":9}}}"#;
        let got = parse_json(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!((got.cached_input_tokens, got.reasoning_tokens, got.uncached_input_tokens()), (10, 2, 0));
    }

    #[test]
    fn buffer_stays_bounded() {
        let mut s = SseUsage::new(Endpoint::ChatCompletions);
        s.feed(br#"data: {"model":"gpt-4o","choices":[{"delta":{"content":""#);
        let filler = vec![b'a'; 10_000];
        for _ in 0..100 {
            s.feed(&filler);
            assert!(s.buffered() <= 2 * MAX_EVENT_BYTES, "{}", s.buffered());
        }
        s.feed(b"\"}}]}\n\n");
        assert!(s.buffered() <= KEEP_CAPACITY);
        s.feed(br#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        s.feed(b"\n\n");
        assert_eq!(s.finish(), Some(usage(1, 2, 0, 0, 0, "gpt-4o")));
    }

    #[test]
    fn oversized_response_completed_event_still_gives_usage() {
        // response.completed echoes the whole output: make it far larger than the event bound.
        let text = "word \\\"usage\\\": {} ".repeat(20_000);
        let body = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"model\":\"gpt-5-2025-08-07\",\"usage\":null}}}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\"model\":\"gpt-5-2025-08-07\",\
             \"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"tools\":[],\
             \"usage\":{{\"input_tokens\":50,\"input_tokens_details\":{{\"cached_tokens\":0}},\"output_tokens\":60000,\
             \"output_tokens_details\":{{\"reasoning_tokens\":128}},\"total_tokens\":60050}},\"user\":null,\"metadata\":{{}}}}}}\n\n"
        );
        assert!(body.len() > 4 * MAX_EVENT_BYTES);
        let expected = usage(50, 60_000, 0, 0, 128, "gpt-5-2025-08-07");
        let chunks: Vec<&[u8]> = body.as_bytes().chunks(1000).collect();
        assert_eq!(stream(Endpoint::Responses, &chunks), Some(expected.clone()));
        // And as a plain body larger than the full-parse limit.
        let start = body.find("{\"type\":\"response.completed\"").unwrap();
        let plain = &body[start + "{\"type\":\"response.completed\",\"response\":".len()..body.len() - 3];
        assert!(plain.len() > FULL_PARSE_LIMIT);
        assert_eq!(parse_json(Endpoint::Responses, plain.as_bytes()), Some(expected));
    }

    #[test]
    fn large_embeddings_body_is_scanned() {
        let item = r#"{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,-0.0028842222]}"#;
        let data = vec![item; 5_000].join(",");
        let body = format!(
            r#"{{"object":"list","data":[{data}],"model":"text-embedding-3-large","usage":{{"prompt_tokens":40000,"total_tokens":40000}}}}"#
        );
        assert!(body.len() > FULL_PARSE_LIMIT);
        assert_eq!(
            parse_json(Endpoint::Embeddings, body.as_bytes()),
            Some(usage(40_000, 0, 0, 0, 0, "text-embedding-3-large"))
        );
    }

    #[test]
    fn inject_include_usage_rewrites_only_what_it_must() {
        let inject = |s: &str| inject_include_usage(s.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            inject(r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"}"}]}"#).as_deref(),
            Some(
                r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"}"}],"stream_options":{"include_usage":true}}"#
            )
        );
        // Formatting, number spelling and key order are kept.
        assert_eq!(
            inject("{\n  \"stream\" : true,\n  \"temperature\": 0.70,\n  \"n\": 1e0\n}\n").as_deref(),
            Some("{\n  \"stream\" : true,\n  \"temperature\": 0.70,\n  \"n\": 1e0\n,\"stream_options\":{\"include_usage\":true}}\n")
        );
        assert_eq!(
            inject(r#"{"stream":true,"stream_options":{}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            inject(r#"{"stream":true,"stream_options": { }}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options": {"include_usage":true}}"#)
        );
        assert_eq!(
            inject(r#"{"stream_options":{"continuous_usage_stats":false},"stream":true}"#).as_deref(),
            Some(r#"{"stream_options":{"include_usage":true,"continuous_usage_stats":false},"stream":true}"#)
        );
        assert_eq!(
            inject(r#"{"stream":true,"stream_options":null}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        for unchanged in [
            r#"{"model":"gpt-4o","messages":[]}"#,
            r#"{"stream":false}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":null}}"#,
            r#"{"stream":true,"stream_options":"yes"}"#,
            r#"{"stream":true,"stream":true}"#,
            r#"{"stream":true,"stream_options":{},"stream_options":{}}"#,
            r#"{"stream":true"#,
            r#"[{"stream":true}]"#,
            "",
        ] {
            assert_eq!(inject(unchanged), None, "{unchanged}");
        }
        // The result is valid JSON with the flag set.
        let out = inject(r#"{"stream":true,"messages":[{"role":"user","content":"a \"quoted\" }"}]}"#).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], serde_json::Value::Bool(true));
        assert_eq!(v["messages"][0]["content"], "a \"quoted\" }");
    }

    fn filter_all(chunks: &[&[u8]]) -> (Vec<u8>, InjectedUsageFilter) {
        let mut f = InjectedUsageFilter::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&f.strip_injected_usage_event(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&f.finish());
        (out, f)
    }

    #[test]
    fn filter_drops_the_usage_event_at_every_split() {
        let body = fixture!("openai_chat_stream.sse");
        let want = fixture!("openai_chat_stream_stripped.sse");
        let expected = usage(2048, 85, 1536, 0, 0, "gpt-4o-mini-2024-07-18");
        for k in 0..=body.len() {
            let (out, f) = filter_all(&[&body[..k], &body[k..]]);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want), "split at {k}");
            assert_eq!(f.usage(), Some(&expected));
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(filter_all(&bytes).0, want);
        // Three-way splits around the usage event.
        let at = memmem::find(body, b"data: {\"id\":\"chatcmpl-CC7xYz\",\"object\":\"chat.completion.chunk\",\"created\":1756300200,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_560af6e559\",\"choices\":[]").unwrap();
        for a in at.saturating_sub(3)..at + 40 {
            for b in a..(a + 400).min(body.len()) {
                assert_eq!(filter_all(&[&body[..a], &body[a..b], &body[b..]]).0, want, "{a} {b}");
            }
        }
    }

    #[test]
    fn filter_handles_crlf_and_cr() {
        for eol in ["\r\n", "\r"] {
            let body = String::from_utf8(fixture!("openai_chat_stream.sse").to_vec()).unwrap().replace('\n', eol);
            let want =
                String::from_utf8(fixture!("openai_chat_stream_stripped.sse").to_vec()).unwrap().replace('\n', eol);
            for k in 0..=body.len() {
                let (out, _) = filter_all(&[&body.as_bytes()[..k], &body.as_bytes()[k..]]);
                assert_eq!(String::from_utf8(out).unwrap(), want, "{eol:?} split at {k}");
            }
        }
    }

    #[test]
    fn filter_passes_aligned_chunks_without_copying() {
        let mut f = InjectedUsageFilter::new();
        let chunk = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n");
        let out = f.strip_injected_usage_event(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
        // A chunk ending mid-event is passed up to its last complete event, the rest held.
        let out = f.strip_injected_usage_event(Bytes::from_static(b"data: [DONE]\n\ndata: {\"cho"));
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        assert_eq!(&f.finish()[..], b"data: {\"cho");
    }

    #[test]
    fn filter_keeps_other_empty_choice_events() {
        // Azure's prompt filter results come with "choices":[] but no usage; a usage chunk that
        // still has choices (Mistral style) is not the injected one either.
        let body = concat!(
            "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: [DONE]\n\n"
        );
        let (out, f) = filter_all(&[body.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), body);
        assert_eq!(f.usage(), None);
    }

    #[test]
    fn filter_drops_an_unterminated_usage_event_at_the_end() {
        let (out, f) = filter_all(&[
            b"data: {\"choices\":[{}]}\n\n",
            b"data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":2}}",
        ]);
        assert_eq!(&out[..], b"data: {\"choices\":[{}]}\n\n");
        assert_eq!(f.usage(), Some(&usage(2, 0, 0, 0, 0, "m")));
    }

    #[test]
    fn filter_passes_oversized_events_through() {
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "z".repeat(3 * MAX_EVENT_BYTES)
        );
        let body = format!("{big}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1}}}}\n\ndata: [DONE]\n\n");
        let chunks: Vec<&[u8]> = body.as_bytes().chunks(4096).collect();
        let (out, f) = filter_all(&chunks);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{big}data: [DONE]\n\n"));
        assert!(f.usage().is_some());
    }
}
