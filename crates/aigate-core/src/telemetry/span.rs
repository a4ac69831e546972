//! A request's span: what the finished record says, in OpenTelemetry's GenAI semantic conventions
//! (`gen_ai.*`), plus aigate's own attributes (`aigate.*`), written straight to OTLP protobuf.
//!
//! Why by hand rather than through `opentelemetry-proto`'s message types: those own every string
//! (a `String` per attribute key and value, a `Vec` per id), so a span cost some forty allocations
//! and two passes (prost measures nested messages before writing them) for what is written once
//! and thrown away. The span is small and flat, its lengths are known before it is written, and the
//! protobuf wire format is a stable specification; the tests decode what is written here with the
//! `opentelemetry-proto` types (`cargo test`, and a real OTLP receiver in the gateway tests).

use aigate_store::LogRecord;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

use super::context::TraceContext;
use crate::endpoint::Endpoint;

/// What a span needs beyond the finished record.
#[derive(Debug, Clone, Copy)]
pub struct SpanInput<'a> {
    /// The caller's trace, if it sent one.
    pub context: Option<TraceContext>,
    /// `cf-aig-log-id`.
    pub log_id: uuid::Uuid,
    /// What the request was (its `gen_ai.operation.name`).
    pub endpoint: Endpoint,
    /// The finished record.
    pub record: &'a LogRecord,
}

/// Appends the body of an OTLP `Span` message (without its own tag and length) for `s`, with
/// `span_id` (and `new_trace_id` when the caller sent no trace).
pub fn encode(out: &mut Vec<u8>, s: &SpanInput<'_>, span_id: [u8; 8], new_trace_id: [u8; 16]) {
    let r = s.record;
    let op = operation(s.endpoint);
    let (trace_id, parent) = match &s.context {
        Some(c) => (c.trace_id, c.parent_span_id),
        None => (new_trace_id, None),
    };
    let mut w = Writer(out);
    w.bytes(1, &trace_id);
    w.bytes(2, &span_id);
    if let Some(p) = parent {
        w.bytes(4, &p);
    }
    // name: "{operation} {model}", the conventions' span name.
    match (op, &r.requested_model) {
        (Some(op), Some(model)) => {
            w.key(5, LEN);
            w.varint((op.len() + 1 + model.len()) as u64);
            w.raw(op.as_bytes());
            w.raw(b" ");
            w.raw(model.as_bytes());
        }
        (Some(op), None) => w.str(5, op),
        (None, _) => w.str(5, "aigate.request"),
    }
    // kind: CLIENT. The conventions' kind for a call to a model: the span stands for the model
    // call aigate makes for its caller (a server span of the gateway would add nothing to it).
    w.key(6, VARINT);
    w.varint(3);
    let start_ns = r.created_at_ms.saturating_mul(1_000_000);
    w.key(7, I64);
    w.raw(&start_ns.to_le_bytes());
    w.key(8, I64);
    w.raw(&start_ns.saturating_add((r.duration_ms * 1e6) as u64).to_le_bytes());

    const ATTRS: u32 = 9;
    if let Some(op) = op {
        w.attr(ATTRS, "gen_ai.operation.name", Value::Str(op));
    }
    let system = gen_ai_system(&r.provider);
    w.attr(ATTRS, "gen_ai.system", Value::Str(system));
    w.attr(ATTRS, "gen_ai.provider.name", Value::Str(system));
    if let Some(m) = &r.requested_model {
        w.attr(ATTRS, "gen_ai.request.model", Value::Str(m));
    }
    if let Some(m) = &r.served_model {
        w.attr(ATTRS, "gen_ai.response.model", Value::Str(m));
    }
    if let Some(t) = r.tokens_in {
        w.attr(ATTRS, "gen_ai.usage.input_tokens", Value::Int(t as i64));
    }
    if let Some(t) = r.tokens_out {
        w.attr(ATTRS, "gen_ai.usage.output_tokens", Value::Int(t as i64));
    }
    w.attr(ATTRS, "http.response.status_code", Value::Int(i64::from(r.status)));
    w.attr(ATTRS, "aigate.gateway", Value::Str(&r.gateway));
    w.attr(ATTRS, "aigate.provider", Value::Str(&r.provider));
    w.attr(ATTRS, "aigate.cache_status", Value::Str(&r.cache_status));
    let mut id = uuid::Uuid::encode_buffer();
    w.attr(ATTRS, "aigate.log_id", Value::Str(s.log_id.hyphenated().encode_lower(&mut id)));
    w.attr(ATTRS, "aigate.stream", Value::Bool(r.stream));
    if let Some(c) = r.cost_usd {
        w.attr(ATTRS, "aigate.cost_usd", Value::Double(c));
    }
    if r.attempts > 1 {
        w.attr(ATTRS, "aigate.attempts", Value::Int(i64::from(r.attempts)));
    }
    if let Some(step) = r.step {
        w.attr(ATTRS, "aigate.step", Value::Int(i64::from(step)));
    }
    if let Some(route) = &r.route {
        w.attr(ATTRS, "aigate.route", Value::Str(route));
    }
    if !r.success {
        // `error.type`: the status code when there is one, `_OTHER` (the conventions' catch-all)
        // for a request that ended without one (an aborted stream, no upstream reached).
        let kind = if r.status >= 400 { r.status.to_string() } else { "_OTHER".to_owned() };
        w.attr(ATTRS, "error.type", Value::Str(&kind));
        // status: { message, code: ERROR }
        let fallback;
        let message = match &r.error {
            Some(e) => e.as_str(),
            None => {
                fallback = format!("HTTP {}", r.status);
                fallback.as_str()
            }
        };
        w.key(15, LEN);
        w.varint((field_len(message.len()) + 2) as u64);
        w.str(2, message);
        w.key(3, VARINT);
        w.varint(2);
    }
    // flags: bit 0 sampled (every exported span is); bits 8-9: whether the parent is remote
    // (known, and yes: the parent is always the caller's).
    w.key(16, I32);
    w.raw(&(0x1u32 | 0x100 | if parent.is_some() { 0x200 } else { 0 }).to_le_bytes());
}

/// Appends the field `tag` holding the already-encoded message `body`.
pub fn encode_message(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    let mut w = Writer(out);
    w.bytes(tag, body);
}

/// Appends the tag and length of a message field of `len` bytes whose body follows.
pub fn encode_header(out: &mut Vec<u8>, tag: u32, len: usize) {
    let mut w = Writer(out);
    w.key(tag, LEN);
    w.varint(len as u64);
}

/// The bytes [`encode_message`] appends for a body of `len` bytes under a tag below 16.
pub fn message_len(len: usize) -> usize {
    field_len(len)
}

/// `gen_ai.operation.name` of an endpoint (`None`: not a model call, e.g. a file upload).
pub fn operation(ep: Endpoint) -> Option<&'static str> {
    match ep {
        Endpoint::ChatCompletions | Endpoint::Responses | Endpoint::AnthropicMessages => Some("chat"),
        Endpoint::Completions => Some("text_completion"),
        Endpoint::Embeddings => Some("embeddings"),
        Endpoint::GeminiGenerateContent => Some("generate_content"),
        Endpoint::Models | Endpoint::Other => None,
    }
}

/// `gen_ai.system`: the conventions' name of a built-in provider, else aigate's provider name.
pub fn gen_ai_system(provider: &str) -> &str {
    match provider {
        "google-ai-studio" => "gcp.gemini",
        "azure-openai" => "az.ai.openai",
        "mistral" => "mistral_ai",
        "grok" => "xai",
        "perplexity-ai" => "perplexity",
        other => other,
    }
}

/// An attribute (for the resource and the metrics, built once per export).
pub(super) fn kv_str(key: &str, v: &str) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(any_str(v)), ..Default::default() }
}

/// A string value.
pub(super) fn any_str(v: &str) -> AnyValue {
    AnyValue { value: Some(any_value::Value::StringValue(v.to_owned())) }
}

/// An integer attribute (for the metrics).
pub(super) fn kv_int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::IntValue(v)) }),
        ..Default::default()
    }
}

// Wire types of the protobuf encoding.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// An attribute's value (`AnyValue`'s variants used here).
#[derive(Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

impl Value<'_> {
    /// The length of the `AnyValue` message holding it.
    fn len(self) -> usize {
        match self {
            Value::Str(s) => field_len(s.len()),
            Value::Bool(_) => 2,
            Value::Int(i) => 1 + varint_len(i as u64),
            Value::Double(_) => 9,
        }
    }
}

/// The bytes of a length-delimited field of `len` bytes under a tag below 16.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 still takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, tag: u32, wire: u8) {
        self.varint(u64::from(tag) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.key(tag, LEN);
        self.varint(b.len() as u64);
        self.raw(b);
    }

    fn str(&mut self, tag: u32, s: &str) {
        self.bytes(tag, s.as_bytes());
    }

    /// A `KeyValue { key, value: AnyValue }` under `tag`.
    fn attr(&mut self, tag: u32, key: &str, v: Value<'_>) {
        let any = v.len();
        self.key(tag, LEN);
        self.varint((field_len(key.len()) + field_len(any)) as u64);
        self.str(1, key);
        self.key(2, LEN);
        self.varint(any as u64);
        match v {
            Value::Str(s) => self.str(1, s),
            Value::Bool(b) => {
                self.key(2, VARINT);
                self.varint(u64::from(b));
            }
            Value::Int(i) => {
                self.key(3, VARINT);
                self.varint(i as u64);
            }
            Value::Double(d) => {
                self.key(4, I64);
                self.raw(&d.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
    use prost::Message;

    use super::*;

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a any_value::Value> {
        s.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
    }

    fn decode(input: &SpanInput<'_>) -> Span {
        let mut buf = Vec::new();
        encode(&mut buf, input, [7; 8], [9; 16]);
        Span::decode(buf.as_slice()).expect("a valid Span message")
    }

    #[test]
    fn a_span_decodes_with_the_otlp_types() {
        let record = LogRecord {
            created_at_ms: 1_700_000_000_123,
            duration_ms: 12.5,
            gateway: "prod".into(),
            provider: "google-ai-studio".into(),
            requested_model: Some("gemini-2.0-flash".into()),
            served_model: Some("gemini-2.0-flash-001".into()),
            status: 200,
            success: true,
            cache_status: "MISS".into(),
            stream: true,
            tokens_in: Some(300),
            tokens_out: Some(1 << 40),
            cost_usd: Some(0.25),
            attempts: 2,
            step: Some(1),
            route: Some("r@0123abcd".into()),
            ..Default::default()
        };
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let input = SpanInput { context: None, log_id: id, endpoint: Endpoint::GeminiGenerateContent, record: &record };
        let s = decode(&input);
        assert_eq!(s.name, "generate_content gemini-2.0-flash");
        assert_eq!((&s.trace_id, &s.span_id, &s.parent_span_id), (&vec![9; 16], &vec![7; 8], &vec![]));
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_000_000);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_135_500_000);
        assert_eq!(s.flags, 0x101);
        assert_eq!(s.status, None);
        use any_value::Value as V;
        let str_ = |k| match attr(&s, k) {
            Some(V::StringValue(v)) => v.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(str_("gen_ai.system"), "gcp.gemini");
        assert_eq!(str_("gen_ai.provider.name"), "gcp.gemini");
        assert_eq!(str_("gen_ai.operation.name"), "generate_content");
        assert_eq!(str_("gen_ai.request.model"), "gemini-2.0-flash");
        assert_eq!(str_("gen_ai.response.model"), "gemini-2.0-flash-001");
        assert_eq!(str_("aigate.gateway"), "prod");
        assert_eq!(str_("aigate.cache_status"), "MISS");
        assert_eq!(str_("aigate.log_id"), "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(str_("aigate.route"), "r@0123abcd");
        assert_eq!(attr(&s, "gen_ai.usage.input_tokens"), Some(&V::IntValue(300)));
        assert_eq!(attr(&s, "gen_ai.usage.output_tokens"), Some(&V::IntValue(1 << 40)));
        assert_eq!(attr(&s, "http.response.status_code"), Some(&V::IntValue(200)));
        assert_eq!(attr(&s, "aigate.stream"), Some(&V::BoolValue(true)));
        assert_eq!(attr(&s, "aigate.cost_usd"), Some(&V::DoubleValue(0.25)));
        assert_eq!(attr(&s, "aigate.attempts"), Some(&V::IntValue(2)));
        assert_eq!(attr(&s, "aigate.step"), Some(&V::IntValue(1)));
        assert_eq!(attr(&s, "error.type"), None);
        assert_eq!(s.attributes.len(), 17);
    }

    #[test]
    fn a_failed_span_carries_its_error_and_the_callers_trace() {
        let long = "x".repeat(300); // a length that takes two varint bytes
        let record = LogRecord {
            provider: "openai".into(),
            status: 502,
            error: Some(long.clone()),
            cache_status: "MISS".into(),
            ..Default::default()
        };
        let context = TraceContext { trace_id: [0x4b; 16], parent_span_id: Some([0x11; 8]), sampled: true };
        let input =
            SpanInput { context: Some(context), log_id: uuid::Uuid::nil(), endpoint: Endpoint::Other, record: &record };
        let s = decode(&input);
        assert_eq!(s.name, "aigate.request");
        assert_eq!((&s.trace_id, &s.parent_span_id), (&vec![0x4b; 16], &vec![0x11; 8]));
        assert_eq!(s.flags, 0x301);
        let status = s.status.clone().unwrap();
        assert_eq!((status.message, status.code), (long, StatusCode::Error as i32));
        assert_eq!(attr(&s, "error.type"), Some(&any_value::Value::StringValue("502".into())));
        assert_eq!(attr(&s, "gen_ai.operation.name"), None);

        let aborted = LogRecord { status: 0, ..record.clone() };
        let s = decode(&SpanInput { record: &aborted, ..input });
        assert_eq!(attr(&s, "error.type"), Some(&any_value::Value::StringValue("_OTHER".into())));
        let refused = LogRecord { status: 429, error: None, ..record.clone() };
        assert_eq!(decode(&SpanInput { record: &refused, ..input }).status.unwrap().message, "HTTP 429");
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            Writer(&mut b).varint(v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }
}
