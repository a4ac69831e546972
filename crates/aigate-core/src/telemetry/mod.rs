//! OpenTelemetry export: a span per request and periodic metrics, sent over OTLP/HTTP (protobuf)
//! to `[telemetry] otlp_endpoint`, off the request path.
//!
//! ```text
//! request arrives ──▶ meter keeps the caller's trace context (traceparent / cf-aig-otel-*)
//! log writer finalises the record ──▶ Telemetry::record ──┬─▶ metrics aggregator (cumulative)
//!                                                         └─span encoded, try_send─▶ bounded queue ──▶ exporter task
//! exporter task: batches of `batch_size` spans (or what came within SPAN_LINGER) ──POST──▶ /v1/traces
//!                every `export_interval` ──POST──▶ /v1/metrics
//! ```
//!
//! - The request path only decodes the two trace headers into fixed arrays on the meter (nothing
//!   when they are absent). Spans are encoded from the finished [`LogRecord`] by the log writer,
//!   straight to protobuf ([`span`] says why), one buffer each; the exporter joins a batch of them
//!   into one export request without decoding them.
//! - A full queue drops the span and counts it (`aigate_otel_dropped_spans_total`); every export
//!   has a timeout; a failed export drops its spans (no retry: a collector that is down must not
//!   build a backlog) and logs a warning at most every 10 s. Requests never wait for any of it.
//! - Shutdown: after the log writer has finalised every record, the exporter sends what is queued
//!   and the metrics one last time, within [`SHUTDOWN_FLUSH`].
//!
//! Why not the `opentelemetry_sdk` pipeline: its batch processor runs on a thread of its own with a
//! blocking HTTP client (an async client in the tokio runtime is an experimental feature), it
//! counts dropped spans only in its own logs, and building a span for a request that already ended
//! (explicit times and a remote parent) goes through the tracing API's context machinery. Sending
//! the protobuf messages of `opentelemetry-proto` with aigate's own pooled client from one task
//! keeps the queue, the counters and the timeouts in view.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aigate_store::LogRecord;
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tokio::sync::{mpsc, watch};

use crate::client::HttpClient;
use crate::config::TelemetrySettings;
use crate::meter::Meter;
pub use context::TraceContext;
pub use span::SpanInput;

pub mod context;
mod metrics;
pub mod span;

/// How long a span waits for its batch to fill before it is sent anyway.
pub const SPAN_LINGER: Duration = Duration::from_millis(500);

/// The longest the exporter spends sending what is left at shutdown.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// Room reserved for an encoded span, so that it is written without growing its buffer: a chat
/// completion's span takes about 550 bytes, one with long model names, a route and an error more.
/// (The queue's `queue` spans hold at most this much each, unless a span is larger.)
const SPAN_CAPACITY: usize = 1024;

/// At most one warning about failing exports per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Counters of the exporter (exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct TelemetryStats {
    /// Spans the collector accepted.
    pub exported_spans: AtomicU64,
    /// Spans lost: the queue was full, or their export failed.
    pub dropped_spans: AtomicU64,
    /// Export requests (spans or metrics) that failed or timed out.
    pub export_errors: AtomicU64,
    /// Spans waiting for the exporter.
    pub queued: AtomicU64,
}

/// The export pipeline shared by the log writer (which records) and the exporter task.
pub struct Telemetry {
    /// Encoded spans (the body of an OTLP `Span` each).
    tx: mpsc::Sender<Vec<u8>>,
    ids: Ids,
    /// Taken by [`Telemetry::run_exporter`].
    exporter: Mutex<Option<Exporter>>,
    /// Counters.
    pub stats: Arc<TelemetryStats>,
    metrics: Arc<metrics::Aggregator>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Builds the pipeline; [`Telemetry::run_exporter`] must be spawned for anything to be sent.
    pub fn new(settings: &TelemetrySettings, client: HttpClient, stats: Arc<TelemetryStats>) -> Arc<Telemetry> {
        let (tx, rx) = mpsc::channel(settings.queue);
        let metrics = Arc::new(metrics::Aggregator::default());
        let kv = span::kv_str;
        let resource = Resource {
            attributes: vec![
                kv("service.name", &settings.service_name),
                kv("service.version", env!("CARGO_PKG_VERSION")),
            ],
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "aigate".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        };
        let (mut resource_field, mut scope_field) = (Vec::new(), Vec::new());
        span::encode_message(&mut resource_field, 1, &resource.encode_to_vec());
        span::encode_message(&mut scope_field, 1, &scope.encode_to_vec());
        let exporter = Exporter {
            rx,
            client,
            settings: settings.clone(),
            resource,
            scope,
            resource_field,
            scope_field,
            metrics: metrics.clone(),
            stats: stats.clone(),
            started_ns: unix_ns(),
            last_warn: None,
        };
        Arc::new(Telemetry {
            tx,
            ids: Ids(AtomicU64::new(seed())),
            exporter: Mutex::new(Some(exporter)),
            stats,
            metrics,
        })
    }

    /// Records a finished request: counts it in the metrics and queues its span, encoded (unless
    /// the caller's trace is not sampled). Never waits: a full queue drops the span.
    pub fn record(&self, record: &LogRecord, m: &Meter) {
        self.metrics.record(record, m.endpoint);
        if m.trace.is_some_and(|c| !c.sampled) {
            return;
        }
        let permit = match self.tx.try_reserve() {
            Ok(p) => p,
            Err(_) => {
                self.stats.dropped_spans.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let input = SpanInput { context: m.trace, log_id: m.id, endpoint: m.endpoint, record };
        let mut span = Vec::with_capacity(SPAN_CAPACITY);
        span::encode(&mut span, &input, self.ids.next(), self.ids.next());
        permit.send(span);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// The exporter loop; returns after `shutdown` once what was queued is sent (or
    /// [`SHUTDOWN_FLUSH`] has passed).
    pub async fn run_exporter(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut ex) = self.exporter.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        let batch = ex.settings.batch_size;
        let mut buf: Vec<Vec<u8>> = Vec::with_capacity(batch);
        let mut tick = tokio::time::interval(ex.settings.export_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: nothing to export yet.
        loop {
            tokio::select! {
                n = ex.rx.recv_many(&mut buf, batch) => {
                    if n == 0 {
                        break;
                    }
                    let linger = tokio::time::sleep(SPAN_LINGER);
                    tokio::pin!(linger);
                    while buf.len() < batch {
                        let room = batch - buf.len();
                        tokio::select! {
                            n = ex.rx.recv_many(&mut buf, room) => if n == 0 { break },
                            _ = &mut linger => break,
                        }
                    }
                    ex.export_spans(&mut buf).await;
                }
                _ = tick.tick() => ex.export_metrics().await,
                _ = shutdown.changed() => break,
            }
        }
        ex.rx.close();
        let flush = async {
            while ex.rx.recv_many(&mut buf, batch).await > 0 {
                ex.export_spans(&mut buf).await;
            }
            ex.export_metrics().await;
        };
        if tokio::time::timeout(SHUTDOWN_FLUSH, flush).await.is_err() {
            tracing::warn!("telemetry: the last spans and metrics could not be sent before shutdown");
        }
    }
}

/// The exporter task's own state.
struct Exporter {
    rx: mpsc::Receiver<Vec<u8>>,
    client: HttpClient,
    settings: TelemetrySettings,
    resource: Resource,
    scope: InstrumentationScope,
    /// `resource` and `scope` as the two fields of `ResourceSpans` and `ScopeSpans` that precede the
    /// spans, encoded once.
    resource_field: Vec<u8>,
    scope_field: Vec<u8>,
    metrics: Arc<metrics::Aggregator>,
    stats: Arc<TelemetryStats>,
    /// Start of the cumulative metrics, Unix ns.
    started_ns: u64,
    last_warn: Option<Instant>,
}

impl Exporter {
    async fn export_spans(&mut self, buf: &mut Vec<Vec<u8>>) {
        if buf.is_empty() {
            return;
        }
        let n = buf.len() as u64;
        self.stats.queued.fetch_sub(n, Ordering::Relaxed);
        let body = self.trace_request(buf);
        buf.clear();
        let url = self.settings.traces_url.clone();
        match self.post(&url, body).await {
            Ok(()) => {
                self.stats.exported_spans.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.dropped_spans.fetch_add(n, Ordering::Relaxed);
                self.failed("spans", &e);
            }
        }
    }

    /// An `ExportTraceServiceRequest` of the encoded `spans`: one `ResourceSpans` (the resource,
    /// one `ScopeSpans`: the scope, the spans).
    fn trace_request(&self, spans: &[Vec<u8>]) -> Vec<u8> {
        let scope_spans = self.scope_field.len() + spans.iter().map(|s| span::message_len(s.len())).sum::<usize>();
        let resource_spans = self.resource_field.len() + span::message_len(scope_spans);
        let mut out = Vec::with_capacity(span::message_len(resource_spans));
        span::encode_header(&mut out, 1, resource_spans);
        out.extend_from_slice(&self.resource_field);
        span::encode_header(&mut out, 2, scope_spans);
        out.extend_from_slice(&self.scope_field);
        for s in spans {
            span::encode_message(&mut out, 2, s);
        }
        out
    }

    async fn export_metrics(&mut self) {
        let metrics = self.metrics.export(self.started_ns, unix_ns());
        if metrics.is_empty() {
            return;
        }
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics { scope: Some(self.scope.clone()), metrics, ..Default::default() }],
                ..Default::default()
            }],
        };
        let url = self.settings.metrics_url.clone();
        if let Err(e) = self.post(&url, req.encode_to_vec()).await {
            self.failed("metrics", &e);
        }
    }

    /// POSTs one export request; an error is a short description (never a header value).
    async fn post(&self, url: &Uri, body: Vec<u8>) -> Result<(), String> {
        let mut req = Request::post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        for (name, value) in &self.settings.headers {
            if let Ok(v) = http::HeaderValue::from_str(value.expose()) {
                req.headers_mut().insert(name.clone(), v);
            }
        }
        let send = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            // Read to the end so the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        };
        match tokio::time::timeout(self.settings.timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}", humantime::format_duration(self.settings.timeout))),
        }
    }

    fn failed(&mut self, what: &str, error: &str) {
        self.stats.export_errors.fetch_add(1, Ordering::Relaxed);
        if self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_warn = Some(Instant::now());
            tracing::warn!(
                endpoint = %self.settings.endpoint,
                error,
                "telemetry: exporting {what} failed (spans of a failed export are dropped; requests are not affected)"
            );
        }
    }
}

/// Span and trace ids: SplitMix64 over a shared counter (ids need to be unique, not secret).
struct Ids(AtomicU64);

impl Ids {
    /// A random, non-zero id.
    fn next<const N: usize>(&self) -> [u8; N] {
        let mut out = [0u8; N];
        loop {
            for chunk in out.chunks_mut(8) {
                let mut z =
                    self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
            }
            if out.iter().any(|&b| b != 0) {
                return out;
            }
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A seed for the ids: from the OS, or the time if that fails.
fn seed() -> u64 {
    let mut raw = [0u8; 8];
    match getrandom::fill(&mut raw) {
        Ok(()) => u64::from_le_bytes(raw),
        Err(_) => unix_ns() ^ u64::from(std::process::id()) << 32,
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    use super::*;

    #[tokio::test]
    async fn a_batch_of_encoded_spans_is_one_export_request() {
        let settings = crate::config::Settings::from_toml("[telemetry]\notlp_endpoint = \"http://127.0.0.1:1\"\n")
            .expect("config");
        let client = crate::client::build_client(&settings.upstream).expect("client");
        let t = Telemetry::new(settings.telemetry.as_ref().expect("telemetry settings"), client, Default::default());
        let ex = t.exporter.lock().unwrap().take().unwrap();
        let records: Vec<LogRecord> = (0..200)
            .map(|i| LogRecord { gateway: format!("g{i}"), provider: "openai".into(), ..Default::default() })
            .collect();
        let spans: Vec<Vec<u8>> = records
            .iter()
            .map(|r| {
                let mut b = Vec::new();
                let input = SpanInput {
                    context: None,
                    log_id: uuid::Uuid::nil(),
                    endpoint: crate::endpoint::Endpoint::Other,
                    record: r,
                };
                span::encode(&mut b, &input, t.ids.next(), t.ids.next());
                b
            })
            .collect();
        let req = ExportTraceServiceRequest::decode(ex.trace_request(&spans).as_slice()).expect("decodes");
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        assert_eq!(rs.resource, Some(ex.resource.clone()));
        assert_eq!(rs.scope_spans.len(), 1);
        assert_eq!(rs.scope_spans[0].scope, Some(ex.scope.clone()));
        let got = &rs.scope_spans[0].spans;
        assert_eq!(got.len(), 200);
        for (i, s) in got.iter().enumerate() {
            let gw = s.attributes.iter().find(|a| a.key == "aigate.gateway").and_then(|a| a.value.clone());
            assert_eq!(gw, Some(span::any_str(&format!("g{i}"))));
        }
        let ids: std::collections::HashSet<_> = got.iter().map(|s| s.span_id.clone()).collect();
        assert_eq!(ids.len(), 200, "span ids are unique");
    }
}
