//! One OpenAI-format API for every provider: a chat completions request whose `model` is written
//! `provider/model` goes to that provider, translated to its own format where it has one
//! (Anthropic, Google AI Studio's Gemini), with the provider prefix removed where it speaks
//! OpenAI's format already (Groq, Mistral, DeepSeek, OpenRouter, a configured provider, …). The
//! answer comes back in OpenAI's shape, streams translated event by event as they arrive.
//!
//! Entry points (the route phase marks them, see [`Compat`]): `…/{gateway}/compat/chat/completions`
//! in both URL layouts, Cloudflare's REST layout `/client/v4/accounts/{account}/ai/v1/chat/completions`
//! (gateway from `cf-aig-gateway-id`), and `/v1/chat/completions` on the default gateway when the
//! model names a known provider.
//!
//! The request is resolved after its body is read ([`prepare`]): the route's provider and upstream
//! URL become the model's provider's; the cache key stays the client's request. The answer is
//! translated before the cache tee and the meter ([`ResponseTranslator`]), so both see OpenAI's
//! format: a hit replays the translated answer, and usage is read the OpenAI way.

pub mod anthropic;
pub mod anthropic_client;
pub mod gemini;
mod openai;

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Settings;
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::phases::route::Route;

/// Whether a route's provider is chosen by the request's model, and in which format the client
/// writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// The provider is in the URL.
    No,
    /// OpenAI chat completions; the model must be `provider/model`.
    Chat,
    /// Anthropic Messages (`…/v1/messages`); the model must be `provider/model`.
    Messages,
    /// OpenAI's Responses API (`…/responses`), for OpenAI-format providers.
    Responses,
    /// `/v1/chat/completions` on the default gateway: `provider/model` picks a provider, a plain
    /// model name goes to OpenAI as before.
    IfPrefixed,
    /// Cloudflare's Universal Endpoint: the body is an array of steps, each naming its provider
    /// ([`crate::routing::universal`]).
    Universal,
}

/// The provider's request format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI's: only the model name changes.
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google AI Studio's `generateContent`.
    Gemini,
}

/// How a request was translated, for its answer.
#[derive(Debug, Clone)]
pub struct Translation {
    /// The client's format: OpenAI chat (`false`) or Anthropic Messages (`true`).
    pub anthropic_client: bool,
    /// The provider's format.
    pub format: Format,
    /// The client asked for a stream.
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The provider's model.
    pub model: String,
}

impl Translation {
    /// Whether the answer carries a usage chunk the client did not ask for (the meter reads it,
    /// the client does not see it): a translated stream always reports its usage.
    pub fn hides_usage(&self) -> bool {
        !self.anthropic_client && self.format != Format::OpenAi && self.stream && !self.include_usage
    }
}

/// The path of the chat (or Responses) endpoint under a provider's base URL.
fn chat_path(provider: &str, responses: bool) -> &'static str {
    match (provider, responses) {
        ("anthropic", _) => "v1/messages",
        // Their configured base URLs stop before the version.
        ("mistral" | "grok" | "openrouter", false) => "v1/chat/completions",
        ("mistral" | "grok" | "openrouter", true) => "v1/responses",
        (_, false) => "chat/completions",
        (_, true) => "responses",
    }
}

/// Resolves a compat request: points `route` at the model's provider and answers the body to send
/// and how to translate the answer. `None`: not a compat request (or a plain model on
/// `/v1/chat/completions`), sent as it is.
pub fn prepare(
    settings: &Settings,
    route: &mut Route<'_>,
    body: &Bytes,
) -> Result<Option<(Bytes, Translation)>, GatewayError> {
    if matches!(route.compat, Compat::No | Compat::Universal)
        || (route.compat == Compat::IfPrefixed && !may_name_a_provider(body))
    {
        return Ok(None);
    }
    let bad = GatewayError::BadRequest;
    let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(body) else {
        return match route.compat {
            Compat::IfPrefixed => Ok(None),
            _ => Err(bad("the body must be a JSON request".into())),
        };
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    let known = |name: &str| settings.providers.contains_key(name);
    let (provider_name, provider_model) = match model.split_once('/') {
        Some((p, m)) if known(p) && !m.is_empty() => (p.to_owned(), m.to_owned()),
        _ if model.starts_with(crate::routing::dynamic::PREFIX) => {
            // A gateway with routes takes this request as a chain before it gets here.
            let name = &model[crate::routing::dynamic::PREFIX.len()..];
            return Err(crate::routing::dynamic::find(&route.gateway.routes, &route.gateway.name, name)
                .err()
                .unwrap_or(GatewayError::Internal));
        }
        _ if route.compat == Compat::IfPrefixed => return Ok(None),
        _ => {
            let mut names: Vec<&str> = settings.providers.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(bad(format!(
                "model: {model:?} must be written provider/model, e.g. anthropic/claude-sonnet-4-5 or \
                 openai/gpt-4o-mini; known providers: {}",
                names.join(", ")
            )));
        }
    };
    let provider = settings.providers.get(&provider_name).cloned().ok_or(GatewayError::Internal)?;
    let format = match provider.name.as_str() {
        "anthropic" => Format::Anthropic,
        "google-ai-studio" => Format::Gemini,
        "azure-openai" | "workers-ai" => {
            return Err(bad(format!(
                "model: provider {provider_name:?} is not reachable through the OpenAI format yet; \
                 send its own format to /{{gateway}}/{provider_name}/..."
            )))
        }
        _ => Format::OpenAi,
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = stream
        && req.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let anthropic_client = route.compat == Compat::Messages;
    let not_for = |what: &str| {
        Err(bad(format!(
            "model: provider {provider_name:?} is not reachable with {what}; use POST .../chat/completions"
        )))
    };
    let (out, path, endpoint) = match (route.compat, format) {
        (Compat::Responses, Format::OpenAi) => {
            req.insert("model".into(), json!(provider_model));
            (Value::Object(req), chat_path(&provider.name, true).to_owned(), Endpoint::Responses)
        }
        (Compat::Responses, _) => return not_for("the Responses API"),
        (Compat::Messages, Format::Anthropic) => {
            req.insert("model".into(), json!(provider_model));
            (Value::Object(req), chat_path(&provider.name, false).to_owned(), Endpoint::AnthropicMessages)
        }
        (Compat::Messages, Format::OpenAi) => {
            let out = anthropic_client::request(&req, &provider_model).map_err(bad)?;
            (out, chat_path(&provider.name, false).to_owned(), Endpoint::AnthropicMessages)
        }
        (Compat::Messages, _) => return not_for("Anthropic's Messages format"),
        (_, Format::OpenAi) => {
            req.insert("model".into(), json!(provider_model));
            (Value::Object(req), chat_path(&provider.name, false).to_owned(), Endpoint::ChatCompletions)
        }
        (_, Format::Anthropic) => {
            let out = anthropic::request(&req, &provider_model, settings.limits.default_max_tokens).map_err(bad)?;
            (out, chat_path(&provider.name, false).to_owned(), Endpoint::ChatCompletions)
        }
        (_, Format::Gemini) => {
            if provider_model.contains(['/', '?', '#', '%', ':']) || provider_model.starts_with('.') {
                return Err(bad(format!("model: {provider_model:?} is not a Gemini model name")));
            }
            let method = if stream { "streamGenerateContent" } else { "generateContent" };
            (
                gemini::request(&req).map_err(bad)?,
                format!("v1beta/models/{provider_model}:{method}"),
                Endpoint::ChatCompletions,
            )
        }
    };
    let query = (format == Format::Gemini && stream).then_some("alt=sse");
    route.upstream = provider
        .upstream_uri(None, &path, query)
        .map_err(|e| GatewayError::BadRequest(format!("provider {provider_name:?}: {e}")))?;
    route.provider = provider;
    route.endpoint = endpoint;
    let body = serde_json::to_vec(&out).map_err(|_| GatewayError::Internal)?;
    let t = Translation { anthropic_client, format, stream, include_usage, model: provider_model };
    Ok(Some((Bytes::from(body), t)))
}

/// Whether a body can carry a `provider/model` model: some `"model"` key has a string value with a
/// slash. A scan, not a parse: every plain `/v1/chat/completions` request asks, and nearly all
/// answer no.
fn may_name_a_provider(body: &[u8]) -> bool {
    // Built once: building a searcher costs more than scanning a small body with it.
    static MODEL_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"model\""));
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    MODEL_KEY.find_iter(body).any(|at| {
        let mut rest = body[at + 7..].iter().skip_while(|b| ws(b));
        if rest.next() != Some(&b':') {
            return false;
        }
        let mut rest = rest.skip_while(|b| ws(b));
        if rest.next() != Some(&b'"') {
            return false;
        }
        // Up to the closing quote; an escaped character makes it a candidate (the parse decides).
        for &b in rest {
            match b {
                b'/' | b'\\' => return true,
                b'"' => return false,
                _ => {}
            }
        }
        false
    })
}

/// Token counts of an answer, in OpenAI's terms.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens, cached included.
    pub prompt: u64,
    /// Output tokens, reasoning included.
    pub completion: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cached: u64,
    /// Reasoning tokens.
    pub reasoning: u64,
}

impl Usage {
    fn to_json(self) -> Value {
        serde_json::to_value(self.out()).unwrap_or(Value::Null)
    }

    /// OpenAI's `usage` object.
    fn out(self) -> UsageOut {
        UsageOut {
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            total_tokens: self.prompt + self.completion,
            prompt_tokens_details: CachedTokens { cached_tokens: self.cached },
            completion_tokens_details: ReasoningTokens { reasoning_tokens: self.reasoning },
        }
    }
}

// OpenAI's chat completion, written straight from the translated answer's borrowed parts (no
// intermediate JSON tree: the answer path is per request).

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedTokens,
    completion_tokens_details: ReasoningTokens,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: Cow<'a, str>,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: UsageOut,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    finish_reason: &'static str,
    logprobs: Option<()>,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall<'a>>,
}

#[derive(Serialize)]
struct ToolCall<'a> {
    id: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
}

#[derive(Serialize)]
struct Function<'a> {
    name: &'a str,
    arguments: &'a str,
}

/// Appends one `chat.completion.chunk` event.
fn chunk(out: &mut Vec<u8>, id: &str, model: &str, created: u64, delta: Value, finish: Option<&str>) {
    let v = json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    });
    event(out, &v);
}

/// The end of a translated stream: the finish chunk, the usage chunk (hidden from a client that
/// did not ask for it, see [`Translation::hides_usage`]) and `[DONE]`.
fn end_stream(out: &mut Vec<u8>, id: &str, model: &str, created: u64, finish: &str, usage: &Usage) {
    chunk(out, id, model, created, json!({}), Some(finish));
    usage_chunk(out, id, model, created, usage);
    out.extend_from_slice(b"data: [DONE]\n\n");
}

/// The usage chunk OpenAI sends last when asked (`choices` empty).
fn usage_chunk(out: &mut Vec<u8>, id: &str, model: &str, created: u64, usage: &Usage) {
    let v = json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [], "usage": usage.to_json(),
    });
    event(out, &v);
}

/// A `data: <data>` URL's media type and base64 data.
fn data_url(url: &str) -> Option<(&str, &str)> {
    let (meta, data) = url.strip_prefix("data:")?.split_once(',')?;
    Some((meta.strip_suffix(";base64")?, data))
}

fn event(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing a Value to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

/// Largest answer a translation buffers (a whole, non-streamed answer is translated at its end).
const MAX_WHOLE: usize = 32 * 1024 * 1024;
/// Longest stream event a translation keeps while waiting for its end.
const MAX_EVENT: usize = 4 * 1024 * 1024;

/// Turns a provider's answer into OpenAI's format as its bytes arrive.
pub enum ResponseTranslator {
    /// A stream: complete events are translated as they arrive.
    AnthropicStream {
        /// Bytes of the event not complete yet.
        pending: Vec<u8>,
        /// The translation state.
        stream: Box<anthropic::Stream>,
    },
    /// A Gemini stream (`alt=sse`): each chunk translated as it arrives.
    GeminiStream {
        /// Bytes of the event not complete yet.
        pending: Vec<u8>,
        /// The translation state.
        stream: Box<gemini::Stream>,
    },
    /// An OpenAI stream for a client of Anthropic's format.
    ToAnthropicStream {
        /// Bytes of the event not complete yet.
        pending: Vec<u8>,
        /// The translation state.
        stream: Box<anthropic_client::Stream>,
    },
    /// A whole answer (a JSON body, or an error), translated at its end.
    Whole {
        /// The client writes Anthropic's format.
        anthropic_client: bool,
        /// The body so far.
        buf: Vec<u8>,
        /// A 2xx answer (else an error).
        success: bool,
        /// The format it is in.
        format: Format,
        /// Unix seconds, for `created`.
        created: u64,
        /// The provider's model (Gemini's answer may not name it).
        model: String,
    },
}

impl ResponseTranslator {
    /// The translator of an answer with `status`, or `None` when it passes unchanged.
    pub fn new(t: &Translation, status: http::StatusCode, event_stream: bool, created: u64) -> Option<Self> {
        let stream = status.is_success() && event_stream;
        match (t.anthropic_client, t.format) {
            (false, Format::OpenAi) | (true, Format::Anthropic) => None,
            (true, _) if stream => {
                Some(ResponseTranslator::ToAnthropicStream { pending: Vec::new(), stream: Box::default() })
            }
            (false, Format::Anthropic) if stream => Some(ResponseTranslator::AnthropicStream {
                pending: Vec::new(),
                stream: Box::new(anthropic::Stream::new(created)),
            }),
            (false, Format::Gemini) if stream => Some(ResponseTranslator::GeminiStream {
                pending: Vec::new(),
                stream: Box::new(gemini::Stream::new(&t.model, created)),
            }),
            _ => Some(ResponseTranslator::Whole {
                anthropic_client: t.anthropic_client,
                buf: Vec::new(),
                success: status.is_success(),
                format: t.format,
                created,
                model: t.model.clone(),
            }),
        }
    }

    /// The content type of the translated answer.
    pub fn content_type(&self) -> &'static str {
        match self {
            ResponseTranslator::AnthropicStream { .. }
            | ResponseTranslator::GeminiStream { .. }
            | ResponseTranslator::ToAnthropicStream { .. } => "text/event-stream; charset=utf-8",
            ResponseTranslator::Whole { .. } => "application/json",
        }
    }

    /// Translates the next bytes; answers what to send (possibly nothing yet).
    pub fn data(&mut self, input: &[u8]) -> Bytes {
        let mut out = Vec::new();
        match self {
            ResponseTranslator::AnthropicStream { pending, stream } => {
                each_event(pending, input, |data| stream.event(data, &mut out));
            }
            ResponseTranslator::GeminiStream { pending, stream } => {
                each_event(pending, input, |data| stream.event(data, &mut out));
            }
            ResponseTranslator::ToAnthropicStream { pending, stream } => {
                each_event(pending, input, |data| stream.event(data, &mut out));
            }
            ResponseTranslator::Whole { buf, .. } => {
                if buf.len() + input.len() <= MAX_WHOLE {
                    buf.extend_from_slice(input);
                }
            }
        }
        Bytes::from(out)
    }

    /// The end of the answer: what is left to send.
    pub fn end(&mut self) -> Bytes {
        let mut out = Vec::new();
        match self {
            ResponseTranslator::AnthropicStream { pending, stream } => {
                if let Some(data) = event_data(pending) {
                    stream.event(&data, &mut out);
                }
                pending.clear();
                stream.end(&mut out);
            }
            ResponseTranslator::GeminiStream { pending, stream } => {
                if let Some(data) = event_data(pending) {
                    stream.event(&data, &mut out);
                }
                pending.clear();
                stream.end(&mut out);
            }
            ResponseTranslator::ToAnthropicStream { pending, stream } => {
                if let Some(data) = event_data(pending) {
                    stream.event(&data, &mut out);
                }
                pending.clear();
                stream.end(&mut out);
            }
            ResponseTranslator::Whole { anthropic_client, buf, success, format, created, model } => {
                let buf = std::mem::take(buf);
                // An answer that is not what it should be is passed on as the provider sent it.
                if !*anthropic_client && *success {
                    match format {
                        Format::Anthropic => {
                            return anthropic::response(&buf, *created).map_or(Bytes::from(buf), Bytes::from)
                        }
                        Format::Gemini => {
                            return gemini::response(&buf, model, *created).map_or(Bytes::from(buf), Bytes::from)
                        }
                        Format::OpenAi => {}
                    }
                }
                let Ok(v) = serde_json::from_slice::<Value>(&buf) else {
                    return Bytes::from(buf);
                };
                let translated = match (format, *success) {
                    (_, true) if *anthropic_client => anthropic_client::response(&v),
                    (_, false) if *anthropic_client => anthropic_client::error(&v),
                    (Format::Anthropic, _) => anthropic::error(&v),
                    (Format::Gemini, _) => gemini::error(&v),
                    (Format::OpenAi, _) => v,
                };
                return Bytes::from(serde_json::to_vec(&translated).unwrap_or(buf));
            }
        }
        Bytes::from(out)
    }
}

/// Calls `f` with the data of every event complete once `input` follows the `pending` bytes of a
/// stream, and keeps the unfinished rest (at most [`MAX_EVENT`] bytes) for the next read. With
/// nothing pending (reads usually end on an event boundary) the events are read from `input`
/// itself, without a copy.
fn each_event(pending: &mut Vec<u8>, input: &[u8], mut f: impl FnMut(&[u8])) {
    if pending.is_empty() {
        let done = complete_events(input, 0, &mut f);
        pending.extend_from_slice(&input[done..]);
    } else {
        // The pending bytes hold no event end: only one that takes some of `input` can be new,
        // and it starts at most 3 bytes before it. Scanning from there keeps a long event that
        // arrives a few bytes at a time linear (rescanning it all was quadratic; issue 19).
        let scanned = pending.len().saturating_sub(3);
        pending.extend_from_slice(input);
        let done = complete_events(pending, scanned, &mut f);
        pending.drain(..done);
    }
    if pending.len() > MAX_EVENT {
        pending.clear();
    }
}

/// Calls `f` with the data of each complete event of `buf`, whose first `scanned` bytes are known
/// to start no event end; answers the bytes they take.
fn complete_events(buf: &[u8], scanned: usize, f: &mut impl FnMut(&[u8])) -> usize {
    let mut start = 0;
    let mut from = scanned;
    while let Some((len, with_blank)) = event_end(&buf[start..], from - start) {
        if let Some(data) = event_data(&buf[start..start + len]) {
            f(&data);
        }
        start += with_blank;
        from = start;
    }
    start
}

/// The end of the first complete event in `b` (`\n\n` or `\r\n\r\n`), looked for from `from`:
/// (length without the blank line, length with it). One pass over the line feeds, so that many
/// events in one read stay linear too.
fn event_end(b: &[u8], from: usize) -> Option<(usize, usize)> {
    let from = from.min(b.len());
    for i in memchr::memchr_iter(b'\n', &b[from..]) {
        let p = from + i;
        match b.get(p + 1) {
            Some(b'\n') => return Some((p, p + 2)),
            Some(b'\r') if p >= 1 && b[p - 1] == b'\r' && b.get(p + 2) == Some(&b'\n') => return Some((p - 1, p + 3)),
            _ => {}
        }
    }
    None
}

/// The `data:` of an event: the one `data:` line as it is, several joined by newlines.
fn event_data(ev: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in ev.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            data = Some(match data {
                None => Cow::Borrowed(v),
                Some(d) => {
                    let mut joined = d.into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(v);
                    Cow::Owned(joined)
                }
            });
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_body_with_a_slashed_model_is_parsed() {
        for (body, may) in [
            (&br#"{"model":"gpt-4o-mini","messages":[]}"#[..], false),
            (br#"{"model" : "anthropic/claude-x"}"#, true),
            (br#"{"messages":[{"content":"the \"model\": \"a/b\""}],"model":"gpt-4o"}"#, false),
            (br#"{"tools":[{"parameters":{"properties":{"model":{"type":"string"}}}}],"model":"groq/llama"}"#, true),
            (br#"{"model":"x\u002fy"}"#, true),
            (b"not json", false),
        ] {
            assert_eq!(may_name_a_provider(body), may, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn stream_events_split_across_reads_translate_once_whole() {
        let t = Translation {
            anthropic_client: false,
            format: Format::Anthropic,
            stream: true,
            include_usage: true,
            model: "c".into(),
        };
        let mut r = ResponseTranslator::new(&t, http::StatusCode::OK, true, 1).unwrap_or_else(|| unreachable!());
        let wire = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":3}}}\r\n\r\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hé\"}}\n\n\
                    event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut out = Vec::new();
        for piece in wire.as_bytes().chunks(7) {
            out.extend_from_slice(&r.data(piece));
        }
        out.extend_from_slice(&r.end());
        let text = String::from_utf8(out).unwrap_or_default();
        assert_eq!(text.matches("\"content\":\"Hé\"").count(), 1, "{text}");
        assert_eq!(text.matches("data: [DONE]").count(), 1, "{text}");
        assert!(text.contains("\"prompt_tokens\":3"), "{text}");
    }

    #[test]
    fn an_error_answer_comes_back_in_openai_shape() {
        let t = Translation {
            anthropic_client: false,
            format: Format::Anthropic,
            stream: false,
            include_usage: false,
            model: "c".into(),
        };
        let mut r = ResponseTranslator::new(&t, http::StatusCode::TOO_MANY_REQUESTS, false, 1)
            .unwrap_or_else(|| unreachable!());
        let _ = r.data(br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#);
        let v: Value = serde_json::from_slice(&r.end()).unwrap_or_default();
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }

    /// A long event arriving a few bytes at a time is scanned once, not once per read (it was
    /// quadratic: 512 KiB in 4-byte reads took minutes; found by fuzzing, issue 19); many events
    /// in one read likewise. Both line ends, and a blank line split across reads.
    #[test]
    fn event_boundaries_are_found_in_linear_time() {
        let mut seen = Vec::new();
        let mut pending = Vec::new();
        let long = format!("data: {{\"x\":\"{}\"}}\r\n\r\n", "a".repeat(512 * 1024));
        for chunk in long.as_bytes().chunks(4) {
            each_event(&mut pending, chunk, |d| seen.push(d.len()));
        }
        assert_eq!(seen, [512 * 1024 + 8]);
        assert!(pending.is_empty());
        let many = "data: {}\n\n".repeat(200_000);
        each_event(&mut pending, many.as_bytes(), |d| seen.push(d.len()));
        assert_eq!(seen.len(), 200_001);
        for (a, b) in [("data: 1\r\n\r", "\ndata: 2\n"), ("data: 1\n", "\ndata: 2\n"), ("data: 1\r\n", "\r\ndata: 2\n")]
        {
            let mut got = Vec::new();
            let mut pending = Vec::new();
            each_event(&mut pending, a.as_bytes(), |d| got.push(d.to_vec()));
            each_event(&mut pending, b.as_bytes(), |d| got.push(d.to_vec()));
            assert_eq!(got, [b"1".to_vec()], "{a:?} {b:?}");
            assert_eq!(pending, b"data: 2\n");
        }
    }
}

/// Property tests: a request translated to Anthropic's format and back, or an answer translated
/// from it and back, keeps its meaning.
#[cfg(test)]
mod roundtrip {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::{anthropic, anthropic_client};

    /// One turn of a conversation: user text, assistant text, or an assistant tool call with its
    /// result.
    #[derive(Debug, Clone)]
    enum Turn {
        User(String),
        Assistant(String),
        Call { id: String, name: String, city: String, result: String },
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 ,.?!éü\"\\\\]{1,40}"
    }

    fn turn() -> impl Strategy<Value = Turn> {
        prop_oneof![
            text().prop_map(Turn::User),
            text().prop_map(Turn::Assistant),
            ("call_[a-z0-9]{4}", "[a-z_]{1,12}", text(), text()).prop_map(|(id, name, city, result)| Turn::Call {
                id,
                name,
                city,
                result
            }),
        ]
    }

    /// An OpenAI chat request of `turns` (after a system message and a first user message).
    fn openai_request(system: &str, turns: &[Turn], max_tokens: u64, temperature: f64, stop: &str) -> Value {
        let mut messages =
            vec![json!({"role": "system", "content": system}), json!({"role": "user", "content": "start"})];
        for t in turns {
            match t {
                Turn::User(s) => messages.push(json!({"role": "user", "content": s})),
                Turn::Assistant(s) => messages.push(json!({"role": "assistant", "content": s})),
                Turn::Call { id, name, city, result } => {
                    let args = json!({"city": city}).to_string();
                    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                        {"id": id, "type": "function", "function": {"name": name, "arguments": args}}]}));
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
                }
            }
        }
        json!({"model": "anthropic/claude-x", "messages": messages, "max_tokens": max_tokens,
               "temperature": temperature, "stop": [stop]})
    }

    /// What a conversation means, whatever the format: (role, text) and (call id, name, args) and
    /// (result id, text) in order, adjacent texts of one role joined.
    fn meaning(messages: &[Value]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let say = |out: &mut Vec<(String, String)>, role: &str, text: &str| match out.last_mut() {
            Some((r, t)) if r == role => t.push_str(text),
            _ => out.push((role.to_owned(), text.to_owned())),
        };
        for m in messages {
            let role = m["role"].as_str().unwrap_or("").to_owned();
            if role == "tool" {
                out.push(("result".into(), format!("{} {}", m["tool_call_id"], m["content"])));
                continue;
            }
            if let Some(s) = m["content"].as_str() {
                say(&mut out, &role, s);
            }
            for p in m["content"].as_array().into_iter().flatten() {
                if let Some(t) = p["text"].as_str() {
                    say(&mut out, &role, t);
                }
            }
            for c in m["tool_calls"].as_array().into_iter().flatten() {
                let args: Value =
                    serde_json::from_str(c["function"]["arguments"].as_str().unwrap_or("")).unwrap_or(Value::Null);
                out.push(("call".into(), format!("{} {} {}", c["id"], c["function"]["name"], args)));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn a_request_there_and_back_keeps_its_meaning(
            system in text(),
            turns in prop::collection::vec(turn(), 0..8),
            max_tokens in 1u64..100_000,
            temperature in 0.0f64..2.0,
            stop in "[A-Z]{1,5}",
        ) {
            let original = openai_request(&system, &turns, max_tokens, temperature, &stop);
            let to_anthropic = anthropic::request(original.as_object().unwrap_or_else(|| unreachable!()), "claude-x", 1024)
                .map_err(TestCaseError::fail)?;
            let back = anthropic_client::request(to_anthropic.as_object().unwrap_or_else(|| unreachable!()), "claude-x")
                .map_err(TestCaseError::fail)?;
            let a = meaning(original["messages"].as_array().unwrap_or(&Vec::new()));
            let b = meaning(back["messages"].as_array().unwrap_or(&Vec::new()));
            prop_assert_eq!(a, b);
            prop_assert_eq!(&back["max_tokens"], &original["max_tokens"]);
            prop_assert_eq!(&back["temperature"], &original["temperature"]);
            prop_assert_eq!(&back["stop"], &original["stop"]);
        }

        #[test]
        fn an_answer_there_and_back_keeps_its_meaning(
            says in text(),
            call in prop::option::of(("toolu_[a-z0-9]{4}", "[a-z_]{1,12}", text())),
            stop in prop::sample::select(vec!["end_turn", "max_tokens", "tool_use", "refusal"]),
            input in 0u64..100_000, cached in 0u64..1000, output in 0u64..100_000,
        ) {
            let mut content = vec![json!({"type": "text", "text": says})];
            if let Some((id, name, city)) = &call {
                content.push(json!({"type": "tool_use", "id": id, "name": name, "input": {"city": city}}));
            }
            let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": content, "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": input, "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0, "output_tokens": output}});
            let openai: Value = serde_json::from_slice(&anthropic::response(message.to_string().as_bytes(), 1)
                .map_err(|e| TestCaseError::fail(e.to_string()))?).unwrap_or_default();
            let back = anthropic_client::response(&openai);
            prop_assert_eq!(&back["content"], &message["content"]);
            prop_assert_eq!(&back["stop_reason"], &message["stop_reason"]);
            prop_assert_eq!(&back["usage"], &message["usage"]);
        }
    }
}
