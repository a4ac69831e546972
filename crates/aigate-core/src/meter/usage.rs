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

// ---------------------------------------------------------------------------------------------
// SSE accumulator
// ---------------------------------------------------------------------------------------------

/// Where the SSE parser is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// In the field name; the count of bytes matched so far of `data` (0 = at line start).
    Name(u8),
    /// In the value of a `data` field; `first` while its optional leading space may still come.
    Data { first: bool },
    /// In a line that does not matter (another field, a comment).
    Skip,
}

/// Reads usage from an SSE response body fed chunk by chunk as it is relayed.
///
/// ```ignore
/// let mut acc = SseUsage::new(Endpoint::ChatCompletions);
/// for chunk in body { acc.feed(&chunk); /* relay chunk */ }
/// let usage = acc.finish();
/// ```
#[derive(Debug)]
pub struct SseUsage {
    shape: Shape,
    line: Line,
    /// The last byte seen was a CR ending a line; a following LF belongs to it.
    after_cr: bool,
    /// `data` of the current event (lines joined with `\n`), bounded by [`MAX_EVENT_BYTES`].
    data: Vec<u8>,
    /// `data` lines seen in the current event.
    data_lines: u32,
    /// `data` lost its beginning (the event was larger than the bound).
    truncated: bool,
    acc: Acc,
}

impl SseUsage {
    /// A reader for a stream from `endpoint` (one whose answer carries usage).
    pub fn new(endpoint: Endpoint) -> SseUsage {
        SseUsage {
            shape: endpoint.usage_format().unwrap_or(UsageFormat::OpenAi),
            line: Line::Name(0),
            after_cr: false,
            data: Vec::new(),
            data_lines: 0,
            truncated: false,
            acc: Acc::default(),
        }
    }

    /// Feeds the next chunk of the body, in order. Events may span chunks anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Name(k) => {
                    let b = chunk[i];
                    i += 1;
                    match b {
                        b'\n' | b'\r' => self.end_line(b),
                        b':' if k == 4 => {
                            self.start_data_line();
                            self.line = Line::Data { first: true };
                        }
                        _ if usize::from(k) < 4 && b == b"data"[usize::from(k)] => self.line = Line::Name(k + 1),
                        _ => self.line = Line::Skip,
                    }
                }
                Line::Data { first } => {
                    if first && chunk[i] == b' ' {
                        i += 1;
                        self.line = Line::Data { first: false };
                        continue;
                    }
                    let rest = &chunk[i..];
                    let end = memchr2(b'\n', b'\r', rest);
                    self.push_data(&rest[..end.unwrap_or(rest.len())]);
                    self.line = Line::Data { first: false };
                    match end {
                        Some(e) => {
                            i += e + 1;
                            self.end_line(rest[e]);
                        }
                        None => i = chunk.len(),
                    }
                }
                Line::Skip => {
                    let rest = &chunk[i..];
                    match memchr2(b'\n', b'\r', rest) {
                        Some(e) => {
                            i += e + 1;
                            self.end_line(rest[e]);
                        }
                        None => i = chunk.len(),
                    }
                }
            }
        }
    }

    /// The model named by the stream so far (the first event naming one, then any usage event).
    pub fn model(&self) -> Option<&str> {
        self.acc.model.as_deref()
    }

    /// The usage seen so far, without ending the stream.
    pub fn usage(&self) -> Option<Usage> {
        self.acc.usage(self.shape)
    }

    /// Ends the stream (an unterminated last event is still read) and gives its usage.
    pub fn finish(mut self) -> Option<Usage> {
        self.dispatch();
        self.acc.usage(self.shape)
    }

    /// Bytes currently buffered (for tests of the bound).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.data.capacity()
    }

    fn end_line(&mut self, terminator: u8) {
        self.after_cr = terminator == b'\r';
        match self.line {
            Line::Name(0) => self.dispatch(),
            // A line that is exactly `data`: a data field with an empty value.
            Line::Name(4) => self.start_data_line(),
            _ => {}
        }
        self.line = Line::Name(0);
    }

    fn start_data_line(&mut self) {
        if self.data_lines > 0 {
            self.push_data(b"\n");
        }
        self.data_lines = self.data_lines.saturating_add(1);
    }

    fn push_data(&mut self, bytes: &[u8]) {
        if self.data.len() + bytes.len() <= MAX_EVENT_BYTES {
            self.data.extend_from_slice(bytes);
            return;
        }
        if !self.truncated {
            self.truncated = true;
            // The model is named near the start of an event; take it before the start is dropped.
            if self.acc.model.is_none() {
                let head = 0..self.data.len();
                self.acc.model = first_key_string(&self.data, head, self.shape.model_key());
            }
        }
        if bytes.len() >= TAIL_BYTES {
            self.data.clear();
            self.data.extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
        } else {
            let drop = (self.data.len() + bytes.len()).saturating_sub(TAIL_BYTES);
            self.data.drain(..drop.min(self.data.len()));
            self.data.extend_from_slice(bytes);
        }
    }

    /// The current event is complete: read it if it can matter, then reset.
    fn dispatch(&mut self) {
        if self.data_lines > 0 && !self.data.is_empty() {
            if self.truncated {
                self.read_truncated();
            } else {
                self.read_event();
            }
        }
        self.data.clear();
        self.data_lines = 0;
        self.truncated = false;
        if self.data.capacity() > KEEP_CAPACITY {
            self.data = Vec::new();
        }
    }

    fn read_event(&mut self) {
        let data = &self.data;
        let has_usage = has_key_value(data, self.shape.usage_key(), b'{');
        let wants_model = self.acc.model.is_none() && memmem::find(data, b"\"model").is_some();
        if !has_usage && !wants_model {
            return;
        }
        match serde_json::from_slice::<Envelope>(data) {
            Ok(env) => self.acc.absorb(self.shape, env),
            Err(e) => tracing::trace!(error = %e, "skipping an SSE event that is not JSON"),
        }
    }

    /// Reads the usage object (and model) from the kept tail of an over-long event.
    fn read_truncated(&mut self) {
        let data = &self.data;
        let all = 0..data.len();
        if let Some(open) = last_key_value(data, all.clone(), self.shape.usage_key(), b'{') {
            if let Some(raw) = extract_object(data, open).and_then(|o| serde_json::from_slice::<RawUsage>(o).ok()) {
                self.acc.merge(raw);
            }
        }
        if self.acc.model.is_none() {
            self.acc.model = last_key_string(data, all, self.shape.model_key());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Injecting `stream_options.include_usage` and hiding its extra event
// ---------------------------------------------------------------------------------------------

/// For an OpenAI-style streaming request body (`"stream": true`, chat/completions or completions)
/// that does not set `stream_options.include_usage`, returns the body with
/// `"stream_options":{"include_usage":true}` added (or `"include_usage":true` added to an existing
/// `stream_options` object). Every other byte of the body is kept as it was (no reformatting, no
/// key reordering). `None` means "send the body unchanged": not a JSON object, not streaming,
/// `include_usage` already present (true or false: an explicit choice is respected), or a
/// `stream_options` that is not an object.
///
/// With it, the upstream sends one more event, a chunk with `"choices":[]` and the usage, which
/// [`InjectedUsageFilter`] removes; it also adds `"usage":null` to every other chunk, which the
/// filter leaves (the OpenAI SDKs treat the field as optional). Only send this to providers that
/// accept `stream_options` (OpenAI, Azure OpenAI, DeepSeek, xAI, …). Update `Content-Length`.
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        stream: Option<bool>,
        // Declared so that a duplicated key is an error rather than ambiguous.
        #[serde(default)]
        #[allow(dead_code)]
        stream_options: Option<IgnoredAny>,
    }
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    const OBJECT: &[u8] = br#"{"include_usage":true}"#;
    const FIELD: &[u8] = br#""include_usage":true"#;

    let probe: Probe = serde_json::from_slice(body).ok()?;
    if probe.stream != Some(true) {
        return None;
    }
    let top = find_member(body, b"stream_options")?;
    let splice = |at: std::ops::Range<usize>, insert: &[&[u8]]| {
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(&body[..at.start]);
        for part in insert {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&body[at.end..]);
        out
    };
    let Some(value) = top.value else {
        // `stream` is a member, so the object is not empty: append after the last member.
        return Some(splice(top.close..top.close, &[b",", MEMBER]));
    };
    match body[value.start] {
        b'n' => Some(splice(value, &[OBJECT])),
        b'{' => {
            let inner = find_member(&body[value.clone()], b"include_usage")?;
            if inner.value.is_some() {
                None
            } else if skip_ws(body, value.start + 1) == value.start + inner.close {
                Some(splice(value, &[OBJECT]))
            } else {
                Some(splice(value.start + 1..value.start + 1, &[FIELD, b","]))
            }
        }
        _ => None,
    }
}

/// A stateful filter over the SSE chunks of a stream whose request went through
/// [`inject_include_usage`]: it drops exactly the events whose data is a JSON object with
/// `"choices":[]` and a non-null `usage` object, and passes every other byte through unchanged,
/// in order (`data: [DONE]` included). Use it only when aigate injected `include_usage`; a client
/// that asked for usage itself must get the event.
///
/// Latency: complete events are passed on in the call that completes them; only the unfinished
/// tail of a chunk (an event the client could not dispatch yet anyway) is held back, at most
/// [`MAX_EVENT_BYTES`] (a longer event cannot be the small usage event and is passed through).
/// In the common case of chunks ending on event boundaries the chunk is returned as is, without
/// copying.
#[derive(Debug, Default)]
pub struct InjectedUsageFilter {
    scan: EventScan,
    /// The unfinished event at the end of the last chunk.
    pending: Vec<u8>,
    /// Passing the rest of an over-long event through.
    passthrough: bool,
    /// The last complete event was dropped (a LF completing its CR must be dropped too).
    last_dropped: bool,
    usage: Option<Usage>,
}

impl InjectedUsageFilter {
    /// A filter for one stream.
    pub fn new() -> InjectedUsageFilter {
        InjectedUsageFilter::default()
    }

    /// Filters the next chunk; returns what to send to the client (possibly empty).
    pub fn strip_injected_usage_event(&mut self, chunk: Bytes) -> Bytes {
        let mut out = Out::Empty;
        let mut i = 0;
        if self.scan.after_cr {
            self.scan.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
                if !self.pending.is_empty() {
                    self.pending.push(b'\n');
                } else if self.passthrough || !self.last_dropped {
                    out.range(&chunk, 0, 1);
                }
            }
        }
        if self.passthrough {
            match self.scan.next_end(&chunk, i) {
                Some(end) => {
                    out.range(&chunk, i, end);
                    i = end;
                    self.passthrough = false;
                    self.last_dropped = false;
                }
                None => {
                    out.range(&chunk, i, chunk.len());
                    return out.build(chunk);
                }
            }
        }
        while i < chunk.len() {
            let start = i;
            match self.scan.next_end(&chunk, i) {
                Some(end) => {
                    i = end;
                    if self.pending.is_empty() {
                        self.last_dropped = self.is_injected(&chunk[start..end]);
                        if !self.last_dropped {
                            out.range(&chunk, start, end);
                        }
                    } else {
                        self.pending.extend_from_slice(&chunk[start..end]);
                        let event = std::mem::take(&mut self.pending);
                        self.last_dropped = self.is_injected(&event);
                        if !self.last_dropped {
                            out.owned(&chunk, event);
                        }
                    }
                }
                None => {
                    self.pending.extend_from_slice(&chunk[start..]);
                    if self.pending.len() > MAX_EVENT_BYTES {
                        out.owned(&chunk, std::mem::take(&mut self.pending));
                        self.passthrough = true;
                    }
                    break;
                }
            }
        }
        out.build(chunk)
    }

    /// The end of the stream: returns the held-back unfinished last event, if any (dropped if it
    /// is the usage event).
    pub fn finish(&mut self) -> Bytes {
        let event = std::mem::take(&mut self.pending);
        if event.is_empty() || self.is_injected(&event) {
            Bytes::new()
        } else {
            Bytes::from(event)
        }
    }

    /// The usage read from the dropped event, if one was dropped.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    fn is_injected(&mut self, event: &[u8]) -> bool {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Probe {
            choices: Loose,
            usage: Obj<RawUsage>,
            model: Text,
        }
        if !has_key_value(event, USAGE_KEY, b'{') || memmem::find(event, b"\"choices\"").is_none() {
            return false;
        }
        let Some(data) = event_data(event) else { return false };
        let Ok(probe) = serde_json::from_slice::<Probe>(&data) else { return false };
        let (Loose::SeqLen(0), Some(raw)) = (probe.choices, probe.usage.0) else { return false };
        self.usage = raw.normalise(Shape::OpenAi, probe.model.0);
        true
    }
}

/// Output of one filter call: nothing, one range of the input chunk (no copy), or owned bytes.
enum Out {
    Empty,
    Range(usize, usize),
    Buf(Vec<u8>),
}

impl Out {
    fn range(&mut self, chunk: &[u8], s: usize, e: usize) {
        match self {
            Out::Empty => *self = Out::Range(s, e),
            Out::Range(_, b) if *b == s => *b = e,
            Out::Range(a, b) => {
                let mut v = chunk[*a..*b].to_vec();
                v.extend_from_slice(&chunk[s..e]);
                *self = Out::Buf(v);
            }
            Out::Buf(v) => v.extend_from_slice(&chunk[s..e]),
        }
    }

    fn owned(&mut self, chunk: &[u8], bytes: Vec<u8>) {
        match self {
            Out::Empty => *self = Out::Buf(bytes),
            Out::Range(a, b) => {
                let mut v = chunk[*a..*b].to_vec();
                v.extend_from_slice(&bytes);
                *self = Out::Buf(v);
            }
            Out::Buf(v) => v.extend_from_slice(&bytes),
        }
    }

    fn build(self, chunk: Bytes) -> Bytes {
        match self {
            Out::Empty => Bytes::new(),
            Out::Range(0, e) if e == chunk.len() => chunk,
            Out::Range(s, e) => chunk.slice(s..e),
            Out::Buf(v) => Bytes::from(v),
        }
    }
}

/// Finds event ends (the end of a blank line) across chunks.
#[derive(Debug, Clone, Copy)]
struct EventScan {
    at_line_start: bool,
    /// The previous chunk ended with a CR ending a line; a LF starting the next belongs to it.
    after_cr: bool,
}

impl Default for EventScan {
    fn default() -> Self {
        EventScan { at_line_start: true, after_cr: false }
    }
}

impl EventScan {
    /// The offset just past the blank line ending the current event, scanning from `i`.
    fn next_end(&mut self, buf: &[u8], mut i: usize) -> Option<usize> {
        while i < buf.len() {
            let Some(k) = memchr2(b'\n', b'\r', &buf[i..]) else {
                self.at_line_start = false;
                return None;
            };
            let blank = k == 0 && self.at_line_start;
            let pos = i + k;
            i = pos + 1;
            if buf[pos] == b'\r' {
                match buf.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.at_line_start = true;
            if blank {
                return Some(i);
            }
        }
        None
    }
}

/// The `data` of one complete SSE event (its lines joined with `\n`); `None` if it has none.
fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = event;
    while !rest.is_empty() {
        let end = memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        let value = match line.strip_prefix(b"data") {
            Some([]) => Some(&[][..]),
            Some([b':', v @ ..]) => Some(v.strip_prefix(b" ").unwrap_or(v)),
            _ => None,
        };
        if let Some(v) = value {
            match &mut data {
                None => data = Some(Cow::Borrowed(v)),
                Some(d) => {
                    let d = d.to_mut();
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
            }
        }
        let mut next = (end + 1).min(rest.len());
        if rest.get(end) == Some(&b'\r') && rest.get(end + 1) == Some(&b'\n') {
            next += 1;
        }
        rest = &rest[next..];
    }
    data
}

// ---------------------------------------------------------------------------------------------
// Byte-level JSON helpers (for bodies and events not worth, or not possible, to parse whole)
// ---------------------------------------------------------------------------------------------

/// The byte at `quote` is a `"` not escaped by a backslash.
fn unescaped(buf: &[u8], quote: usize) -> bool {
    buf[..quote].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0
}

/// If `buf[pos..]` starts with the key `key` (quotes included) used as an object key whose value
/// starts with `open`, the offset of that value.
fn key_value_at(buf: &[u8], pos: usize, key: &[u8], open: u8) -> Option<usize> {
    if !unescaped(buf, pos) {
        return None;
    }
    let colon = skip_ws(buf, pos + key.len());
    if buf.get(colon) != Some(&b':') {
        return None;
    }
    let value = skip_ws(buf, colon + 1);
    (buf.get(value) == Some(&open)).then_some(value)
}

/// Whether `buf` has the key `key` with a value starting with `open` (e.g. `"usage": {`). A quoted
/// key followed by a colon can only be a real key in valid JSON (quotes inside strings are escaped).
fn has_key_value(buf: &[u8], key: &[u8], open: u8) -> bool {
    memmem::find_iter(buf, key).any(|p| key_value_at(buf, p, key, open).is_some())
}

/// The offset of the value of the last `key` (starting with `open`) whose key lies in `window`.
fn last_key_value(buf: &[u8], window: std::ops::Range<usize>, key: &[u8], open: u8) -> Option<usize> {
    let mut end = window.end;
    while let Some(p) = memmem::rfind(&buf[window.start..end], key) {
        let p = window.start + p;
        if let Some(v) = key_value_at(buf, p, key, open) {
            return Some(v);
        }
        end = p;
    }
    None
}

/// The string value of the first `key` whose key lies in `window`.
fn first_key_string(buf: &[u8], window: std::ops::Range<usize>, key: &[u8]) -> Option<String> {
    memmem::find_iter(&buf[window.clone()], key)
        .filter_map(|p| key_value_at(buf, window.start + p, key, b'"'))
        .find_map(|v| read_string(buf, v))
}

/// The string value of the last `key` whose key lies in `window`.
fn last_key_string(buf: &[u8], window: std::ops::Range<usize>, key: &[u8]) -> Option<String> {
    let v = last_key_value(buf, window, key, b'"')?;
    read_string(buf, v)
}

fn read_string(buf: &[u8], quote: usize) -> Option<String> {
    let end = skip_string(buf, quote)?;
    serde_json::from_slice(&buf[quote..end]).ok()
}

/// The JSON object or array starting at `open`, up to its matching close.
fn extract_object(buf: &[u8], open: usize) -> Option<&[u8]> {
    let end = skip_value(buf, open)?;
    Some(&buf[open..end])
}

fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while i < buf.len() && matches!(buf[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `buf[i]` is `"`: the offset just past the closing quote.
fn skip_string(buf: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = memchr::memchr2(b'"', b'\\', buf.get(j..)?)?;
        j += k;
        if buf[j] == b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// The offset just past the JSON value starting at `i`.
fn skip_value(buf: &[u8], i: usize) -> Option<usize> {
    match *buf.get(i)? {
        b'"' => skip_string(buf, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < buf.len() {
                match buf[j] {
                    b'"' => {
                        j = skip_string(buf, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let end = buf[i..].iter().position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'));
            Some(i + end.unwrap_or(buf.len() - i))
        }
    }
}

/// The top-level `model` string of a JSON request body, by a walk over the top-level members (a
/// repeated key: the last one). `None` if the body is not a JSON object with a string `model`.
pub fn request_model(body: &[u8]) -> Option<String> {
    let span = find_member(body, b"model")?.value?;
    if body[span.start] != b'"' {
        return None;
    }
    serde_json::from_slice(&body[span]).ok()
}

/// A member of the top-level object of `buf`.
struct Member {
    /// The span of the value of the key looked for, if present.
    value: Option<std::ops::Range<usize>>,
    /// The offset of the object's closing `}`.
    close: usize,
}

/// Walks the members of the JSON object `buf` (already known to be valid JSON) looking for `key`.
fn find_member(buf: &[u8], key: &[u8]) -> Option<Member> {
    let mut found = None;
    let close = walk_members(buf, |k, value| {
        let raw = &buf[k.start + 1..k.end - 1];
        let is_key = if raw.contains(&b'\\') {
            match serde_json::from_slice::<String>(&buf[k]) {
                Ok(decoded) => decoded.as_bytes() == key,
                Err(_) => return false,
            }
        } else {
            raw == key
        };
        if is_key {
            found = Some(value);
        }
        true
    })?;
    Some(Member { value: found, close })
}

/// Calls `f(key, value)` for each member of the top-level object of `buf`, with the spans of the
/// quoted key and of the value, in order; returns the offset of the object's closing `}`. `None`
/// if `buf` does not start with an object of that shape, or when `f` returns false.
fn walk_members(
    buf: &[u8],
    mut f: impl FnMut(std::ops::Range<usize>, std::ops::Range<usize>) -> bool,
) -> Option<usize> {
    let mut i = skip_ws(buf, 0);
    if buf.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(buf, i);
        match buf.get(i)? {
            b'}' => return Some(i),
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(buf, i)?;
        let key = i..key_end;
        i = skip_ws(buf, key_end);
        if buf.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(buf, i + 1);
        let value_end = skip_value(buf, i)?;
        if !f(key, i..value_end) {
            return None;
        }
        i = skip_ws(buf, value_end);
        match buf.get(i)? {
            b',' => i += 1,
            b'}' => return Some(i),
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed, lenient views of provider JSON (only the fields usage needs; the rest is skipped)
// ---------------------------------------------------------------------------------------------

/// The top level of a response body or stream event, for every provider at once.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Envelope {
    model: Text,
    #[serde(rename = "modelVersion")]
    model_version: Text,
    usage: Obj<RawUsage>,
    #[serde(rename = "usageMetadata")]
    usage_metadata: Obj<RawUsage>,
    /// Groq streams.
    x_groq: Obj<Inner>,
    /// Anthropic `message_start`.
    message: Obj<Inner>,
    /// Responses API stream events.
    response: Obj<Inner>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Inner {
    model: Text,
    usage: Obj<RawUsage>,
}

impl Envelope {
    fn pick(self, shape: Shape) -> (Option<String>, Option<RawUsage>) {
        let (message, response, x_groq) = (self.message.0.unwrap_or_default(), self.response.0, self.x_groq.0);
        let (response_model, response_usage) = response.map(|r| (r.model.0, r.usage.0)).unwrap_or_default();
        let model = self.model.0.or(self.model_version.0).or(message.model.0).or(response_model);
        let usage = match shape {
            Shape::Google => self.usage_metadata.0,
            _ => self.usage.0.or(x_groq.and_then(|x| x.usage.0)).or(message.usage.0).or(response_usage),
        };
        (model, usage)
    }
}

/// Every usage field of every provider; which ones mean what depends on the [`Shape`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
struct RawUsage {
    prompt_tokens: Count,
    completion_tokens: Count,
    total_tokens: Count,
    prompt_tokens_details: Obj<Details>,
    completion_tokens_details: Obj<Details>,
    prompt_cache_hit_tokens: Count,
    prompt_cache_miss_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Obj<Details>,
    output_tokens_details: Obj<Details>,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    #[serde(rename = "promptTokenCount")]
    prompt_token_count: Count,
    #[serde(rename = "candidatesTokenCount")]
    candidates_token_count: Count,
    #[serde(rename = "cachedContentTokenCount")]
    cached_content_token_count: Count,
    #[serde(rename = "thoughtsTokenCount")]
    thoughts_token_count: Count,
    #[serde(rename = "toolUsePromptTokenCount")]
    tool_use_prompt_token_count: Count,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
struct Details {
    cached_tokens: Count,
    reasoning_tokens: Count,
}

macro_rules! usage_fields {
    ($m:ident) => {
        $m!(
            prompt_tokens,
            completion_tokens,
            total_tokens,
            prompt_tokens_details,
            completion_tokens_details,
            prompt_cache_hit_tokens,
            prompt_cache_miss_tokens,
            input_tokens,
            output_tokens,
            input_tokens_details,
            output_tokens_details,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            prompt_token_count,
            candidates_token_count,
            cached_content_token_count,
            thoughts_token_count,
            tool_use_prompt_token_count
        )
    };
}

impl RawUsage {
    /// Later values replace earlier ones field by field (every provider streams cumulative counts).
    fn merge(&mut self, new: RawUsage) {
        macro_rules! take {
            ($($f:ident),*) => { $( if new.$f.0.is_some() { self.$f = new.$f; } )* };
        }
        usage_fields!(take);
    }

    /// The usage object `buf` read by a walk over its members, for the common case of plain
    /// integer (or null) counts and plain keys, much cheaper than the typed parse, which would be
    /// most of the cost of metering a chat completion. `None` as soon as anything
    /// else appears (a float, a string count, an escaped or repeated key of interest): the typed
    /// parse then decides, so both always agree.
    fn scan(buf: &[u8]) -> Option<RawUsage> {
        let mut raw = RawUsage::default();
        let mut seen = 0u32;
        let mut once = |bit: u32| {
            let fresh = seen & (1 << bit) == 0;
            seen |= 1 << bit;
            fresh
        };
        let close = walk_members(buf, |k, v| {
            let key = &buf[k.start + 1..k.end - 1];
            let value = &buf[v];
            let (bit, slot) = match key {
                b"prompt_tokens" => (0, &mut raw.prompt_tokens),
                b"completion_tokens" => (1, &mut raw.completion_tokens),
                b"total_tokens" => (2, &mut raw.total_tokens),
                b"prompt_cache_hit_tokens" => (3, &mut raw.prompt_cache_hit_tokens),
                b"prompt_cache_miss_tokens" => (4, &mut raw.prompt_cache_miss_tokens),
                b"input_tokens" => (5, &mut raw.input_tokens),
                b"output_tokens" => (6, &mut raw.output_tokens),
                b"cache_creation_input_tokens" => (7, &mut raw.cache_creation_input_tokens),
                b"cache_read_input_tokens" => (8, &mut raw.cache_read_input_tokens),
                b"promptTokenCount" => (9, &mut raw.prompt_token_count),
                b"candidatesTokenCount" => (10, &mut raw.candidates_token_count),
                b"cachedContentTokenCount" => (11, &mut raw.cached_content_token_count),
                b"thoughtsTokenCount" => (12, &mut raw.thoughts_token_count),
                b"toolUsePromptTokenCount" => (13, &mut raw.tool_use_prompt_token_count),
                b"prompt_tokens_details" => return once(14) && scan_details(value, &mut raw.prompt_tokens_details),
                b"completion_tokens_details" => {
                    return once(15) && scan_details(value, &mut raw.completion_tokens_details)
                }
                b"input_tokens_details" => return once(16) && scan_details(value, &mut raw.input_tokens_details),
                b"output_tokens_details" => return once(17) && scan_details(value, &mut raw.output_tokens_details),
                k => return !k.contains(&b'\\'),
            };
            once(bit) && scan_count(value, slot)
        })?;
        (close + 1 == buf.len()).then_some(raw)
    }

    fn has_counts(&self) -> bool {
        macro_rules! any {
            ($($f:ident),*) => { false $( || self.$f.0.is_some() )* };
        }
        usage_fields!(any)
    }

    fn normalise(&self, shape: Shape, model: Option<String>) -> Option<Usage> {
        let n = |c: &Count| c.0.unwrap_or(0);
        let detail = |d: &Obj<Details>, f: fn(&Details) -> &Count| d.0.as_ref().and_then(|d| f(d).0);
        match shape {
            Shape::OpenAi => {
                let (hit, miss) = (self.prompt_cache_hit_tokens.0, self.prompt_cache_miss_tokens.0);
                let input = self.prompt_tokens.0.or(self.input_tokens.0).or_else(|| {
                    (hit.is_some() || miss.is_some()).then(|| hit.unwrap_or(0).saturating_add(miss.unwrap_or(0)))
                });
                let output = self.completion_tokens.0.or(self.output_tokens.0);
                if input.is_none() && output.is_none() {
                    return None;
                }
                let (input, mut output) = (input.unwrap_or(0), output.unwrap_or(0));
                let cached = [
                    detail(&self.prompt_tokens_details, |d| &d.cached_tokens),
                    detail(&self.input_tokens_details, |d| &d.cached_tokens),
                    hit,
                ]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
                let reasoning = detail(&self.completion_tokens_details, |d| &d.reasoning_tokens)
                    .or_else(|| detail(&self.output_tokens_details, |d| &d.reasoning_tokens))
                    .unwrap_or(0);
                // xAI: completion_tokens excludes reasoning; total = prompt + completion + reasoning.
                if reasoning > 0 && self.total_tokens.0 == Some(input.saturating_add(output).saturating_add(reasoning))
                {
                    output = output.saturating_add(reasoning);
                }
                Some(Usage::clamped(input, cached, 0, output, reasoning, model))
            }
            Shape::Anthropic => {
                let fields = [
                    &self.input_tokens,
                    &self.output_tokens,
                    &self.cache_read_input_tokens,
                    &self.cache_creation_input_tokens,
                ];
                if fields.iter().all(|c| c.0.is_none()) {
                    return None;
                }
                let (read, write) = (n(&self.cache_read_input_tokens), n(&self.cache_creation_input_tokens));
                let input = n(&self.input_tokens).saturating_add(read).saturating_add(write);
                Some(Usage::clamped(input, read, write, n(&self.output_tokens), 0, model))
            }
            Shape::Google => {
                if self.prompt_token_count.0.is_none() && self.candidates_token_count.0.is_none() {
                    return None;
                }
                let input = n(&self.prompt_token_count).saturating_add(n(&self.tool_use_prompt_token_count));
                let thoughts = n(&self.thoughts_token_count);
                let output = n(&self.candidates_token_count).saturating_add(thoughts);
                Some(Usage::clamped(input, n(&self.cached_content_token_count), 0, output, thoughts, model))
            }
        }
    }
}

/// Any JSON value, reduced to what the lenient fields below need.
#[derive(Debug, Default)]
enum Loose {
    #[default]
    Other,
    Num(Option<u64>),
    Str(String),
    SeqLen(usize),
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Num(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Num(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
                // `as` saturates; fractions are truncated.
                Ok(Loose::Num((v.is_finite() && v >= 0.0).then_some(v as u64)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Str(v.to_owned()))
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_none<E>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Loose, D2::Error> {
                Loose::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                let mut n = 0;
                while a.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Loose::SeqLen(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a plain count (digits, or `null`) into `slot` for [`RawUsage::scan`]; false otherwise.
fn scan_count(value: &[u8], slot: &mut Count) -> bool {
    if value == b"null" {
        *slot = Count(None);
        return true;
    }
    // Digits only, no leading zero (not JSON): at most 19 of them always fit in a u64.
    if value.is_empty()
        || value.len() > 19
        || !value.iter().all(u8::is_ascii_digit)
        || value.len() > 1 && value[0] == b'0'
    {
        return false;
    }
    *slot = Count(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()));
    slot.0.is_some()
}

/// Reads a details object (or `null`) for [`RawUsage::scan`]; false on anything unusual.
fn scan_details(value: &[u8], slot: &mut Obj<Details>) -> bool {
    if value == b"null" {
        *slot = Obj(None);
        return true;
    }
    let mut d = Details::default();
    let mut seen = [false; 2];
    let walked = walk_members(value, |k, v| {
        let (i, count) = match &value[k.start + 1..k.end - 1] {
            b"cached_tokens" => (0, &mut d.cached_tokens),
            b"reasoning_tokens" => (1, &mut d.reasoning_tokens),
            k => return !k.contains(&b'\\'),
        };
        !std::mem::replace(&mut seen[i], true) && scan_count(&value[v], count)
    });
    if walked.is_none_or(|close| close + 1 != value.len()) {
        return false;
    }
    *slot = Obj(Some(d));
    true
}

/// A token count: a non-negative number (or a numeric string); anything else is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Count(match Loose::deserialize(d)? {
            Loose::Num(n) => n,
            Loose::Str(s) => s.trim().parse().ok(),
            _ => None,
        }))
    }
}

/// A string; anything else is absent.
#[derive(Debug, Clone, Default)]
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Text(match Loose::deserialize(d)? {
            Loose::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        }))
    }
}

/// An object read as `T`; any other JSON value is absent.
#[derive(Debug, Clone, PartialEq)]
struct Obj<T>(Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(a)).map(|t| Obj(Some(t)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_unit<E>(self) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_none<E>(self) -> Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Obj<T>, D2::Error> {
                Obj::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Obj<T>, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Obj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            &include_bytes!(concat!("../../tests/fixtures/usage/", $name))[..]
        };
    }

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
