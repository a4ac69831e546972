//! A request's span: what the finished record says, in OpenTelemetry's GenAI semantic conventions
//! (`gen_ai.*`), plus aigate's own attributes (`aigate.*`).

use std::sync::Arc;

use aigate_store::LogRecord;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, status, Span, Status};

use super::context::TraceContext;
use crate::endpoint::Endpoint;
use crate::meter::Meter;

/// What the exporter needs of one finished request: built by the log writer from the record, then
/// queued to the exporter, which turns it into a protobuf [`Span`].
#[derive(Debug)]
pub struct SpanEvent {
    /// The caller's trace, if it sent one.
    pub context: Option<TraceContext>,
    /// `cf-aig-log-id`.
    pub log_id: uuid::Uuid,
    /// Arrival, Unix ns.
    pub start_ns: u64,
    /// End of the response, Unix ns.
    pub end_ns: u64,
    /// What the request was (its `gen_ai.operation.name`).
    pub endpoint: Endpoint,
    /// The gateway's name.
    pub gateway: Arc<str>,
    /// aigate's provider name.
    pub provider: String,
    /// The model the request asked for.
    pub requested_model: Option<String>,
    /// The model that answered.
    pub served_model: Option<String>,
    /// Response status.
    pub status: u16,
    /// 2xx and relayed to its end.
    pub success: bool,
    /// `HIT`, `MISS`, … as in `cf-aig-cache-status`.
    pub cache_status: String,
    /// The response was an event stream.
    pub stream: bool,
    /// Usage, when the answer reported it.
    pub tokens_in: Option<u64>,
    /// Usage, when the answer reported it.
    pub tokens_out: Option<u64>,
    /// USD; `None` when the price is unknown.
    pub cost_usd: Option<f64>,
    /// What went wrong, for the span's status message.
    pub error: Option<String>,
    /// Times sent upstream.
    pub attempts: u32,
    /// The fallback step that answered.
    pub step: Option<u32>,
    /// The dynamic route, `NAME@VERSION`.
    pub route: Option<String>,
}

impl SpanEvent {
    /// The event of a finished request (`context` as captured on arrival).
    pub fn new(r: &LogRecord, m: &Meter) -> SpanEvent {
        let start_ns = r.created_at_ms.saturating_mul(1_000_000);
        SpanEvent {
            context: m.trace,
            log_id: m.id,
            start_ns,
            end_ns: start_ns.saturating_add((r.duration_ms * 1e6) as u64),
            endpoint: m.endpoint,
            gateway: m.gateway.clone(),
            provider: r.provider.clone(),
            requested_model: r.requested_model.clone(),
            served_model: r.served_model.clone(),
            status: r.status,
            success: r.success,
            cache_status: r.cache_status.clone(),
            stream: r.stream,
            tokens_in: r.tokens_in,
            tokens_out: r.tokens_out,
            cost_usd: r.cost_usd,
            error: r.error.clone(),
            attempts: r.attempts,
            step: r.step,
            route: r.route.clone(),
        }
    }

    /// The protobuf span, with `span_id` (and `trace_id` when the caller sent no trace).
    pub fn to_proto(&self, span_id: [u8; 8], new_trace_id: [u8; 16]) -> Span {
        let op = operation(self.endpoint);
        let name = match (op, &self.requested_model) {
            (Some(op), Some(model)) => format!("{op} {model}"),
            (Some(op), None) => op.to_owned(),
            (None, _) => "aigate.request".to_owned(),
        };
        let mut a = Vec::with_capacity(20);
        if let Some(op) = op {
            a.push(kv_str("gen_ai.operation.name", op));
        }
        let system = gen_ai_system(&self.provider);
        a.push(kv_str("gen_ai.system", system));
        a.push(kv_str("gen_ai.provider.name", system));
        if let Some(m) = &self.requested_model {
            a.push(kv_str("gen_ai.request.model", m));
        }
        if let Some(m) = &self.served_model {
            a.push(kv_str("gen_ai.response.model", m));
        }
        if let Some(t) = self.tokens_in {
            a.push(kv_int("gen_ai.usage.input_tokens", t as i64));
        }
        if let Some(t) = self.tokens_out {
            a.push(kv_int("gen_ai.usage.output_tokens", t as i64));
        }
        a.push(kv_int("http.response.status_code", i64::from(self.status)));
        a.push(kv_str("aigate.gateway", &self.gateway));
        a.push(kv_str("aigate.provider", &self.provider));
        a.push(kv_str("aigate.cache_status", &self.cache_status));
        a.push(kv_str("aigate.log_id", &self.log_id.hyphenated().to_string()));
        a.push(kv("aigate.stream", any_value::Value::BoolValue(self.stream)));
        if let Some(c) = self.cost_usd {
            a.push(kv("aigate.cost_usd", any_value::Value::DoubleValue(c)));
        }
        if self.attempts > 1 {
            a.push(kv_int("aigate.attempts", i64::from(self.attempts)));
        }
        if let Some(s) = self.step {
            a.push(kv_int("aigate.step", i64::from(s)));
        }
        if let Some(r) = &self.route {
            a.push(kv_str("aigate.route", r));
        }
        let status = if self.success {
            None
        } else {
            // `error.type`: the status code when there is one, `_OTHER` (the conventions' catch-all)
            // for a request that ended without one (an aborted stream, no upstream reached).
            let kind = if self.status >= 400 { self.status.to_string() } else { "_OTHER".to_owned() };
            a.push(kv_str("error.type", &kind));
            let message = self.error.clone().unwrap_or_else(|| format!("HTTP {}", self.status));
            Some(Status { message, code: status::StatusCode::Error as i32 })
        };
        let (trace_id, parent) = match &self.context {
            Some(c) => (c.trace_id, c.parent_span_id),
            None => (new_trace_id, None),
        };
        Span {
            trace_id: trace_id.to_vec(),
            span_id: span_id.to_vec(),
            parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
            // Bit 0: sampled (every exported span is); bits 8-9: whether the parent is remote
            // (known, and yes: the parent is always the caller's).
            flags: 0x1 | 0x100 | if parent.is_some() { 0x200 } else { 0 },
            name,
            // The conventions' kind for a call to a model: the span stands for the model call aigate
            // makes for its caller (a server span of the gateway would add nothing to it).
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: self.start_ns,
            end_time_unix_nano: self.end_ns,
            attributes: a,
            status,
            ..Default::default()
        }
    }
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

pub(super) fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

pub(super) fn kv_str(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.to_owned()))
}

pub(super) fn kv_int(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}
