//! OpenTelemetry export, end to end: a real OTLP/HTTP receiver on port 0 decodes what aigate
//! sends (`opentelemetry-proto` messages), and a collector that is down or hangs never slows a
//! request.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, Metric};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;

use super::*;

/// What an OTLP/HTTP receiver got.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Each metrics export's metrics (the last one is cumulative over all requests).
    metrics: Vec<Vec<Metric>>,
    /// Values of the `authorization` header of every export.
    auth: Vec<String>,
    /// The resource's `service.name` of every export.
    service_names: Vec<String>,
}

/// An OTLP/HTTP (protobuf) receiver on 127.0.0.1:0.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Received>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Received::default()));
        let shared = got.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let got = shared.clone();
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let got = got.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let auth = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut g = got.lock().unwrap();
                        g.auth.extend(auth);
                        match path.as_str() {
                            "/otlp/v1/traces" => {
                                let r = ExportTraceServiceRequest::decode(body).unwrap();
                                for rs in r.resource_spans {
                                    g.service_names
                                        .push(service_name(rs.resource.as_ref().unwrap().attributes.as_ref()));
                                    g.spans.extend(rs.scope_spans.into_iter().flat_map(|s| s.spans));
                                }
                            }
                            "/otlp/v1/metrics" => {
                                let r = ExportMetricsServiceRequest::decode(body).unwrap();
                                for rm in r.resource_metrics {
                                    g.service_names
                                        .push(service_name(rm.resource.as_ref().unwrap().attributes.as_ref()));
                                    g.metrics.push(rm.scope_metrics.into_iter().flat_map(|s| s.metrics).collect());
                                }
                            }
                            other => panic!("unexpected OTLP path {other}"),
                        }
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(bytes::Bytes::new())))
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        Receiver { port, got }
    }

    /// Waits until a span with `aigate.log_id` = `log_id` has arrived and returns it.
    async fn span(&self, log_id: &str) -> Span {
        let mut found = None;
        wait_until(&format!("the span of {log_id}"), async || {
            found = self
                .got
                .lock()
                .unwrap()
                .spans
                .iter()
                .find(|s| str_attr(&s.attributes, "aigate.log_id") == Some(log_id))
                .cloned();
            found.is_some()
        })
        .await;
        found.unwrap()
    }
}

fn service_name(attrs: &[KeyValue]) -> String {
    str_attr(attrs, "service.name").unwrap_or_default().to_owned()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn log_id(r: &reqwest::Response) -> String {
    r.headers()["cf-aig-log-id"].to_str().unwrap().to_owned()
}

/// Sends `body` with `headers`; returns the status and the log id once the body was read.
async fn send(env: &Env, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let r = post(env, "/v1/chat/completions", body, headers).await;
    let (status, id) = (r.status().as_u16(), log_id(&r));
    r.bytes().await.unwrap();
    (status, id)
}

fn telemetry_config(endpoint: &str, extra: &str) -> String {
    format!("[telemetry]\notlp_endpoint = {endpoint:?}\nservice_name = \"aigate-test\"\n{extra}\n[telemetry.headers]\nauthorization = \"env:GW_TOKEN\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_the_genai_conventions_and_join_the_callers_trace() {
    let rx = Receiver::start().await;
    let endpoint = format!("http://127.0.0.1:{}/otlp/", rx.port);
    let env = env_with(&telemetry_config(&endpoint, "export_interval = \"200ms\""), MockConfig::default()).await;

    // Unsampled by the caller: no span (the metrics still count it).
    let unsampled_trace = "11111111111111111111111111111111";
    let (s, unsampled) =
        send(&env, CHAT, &[("traceparent", &format!("00-{unsampled_trace}-2222222222222222-00"))]).await;
    assert_eq!(s, 200);

    // A plain request: a root span of a new trace.
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let (s, plain) = send(&env, CHAT, &[]).await;
    assert_eq!(s, 200);
    let span = rx.span(&plain).await;
    assert_eq!(span.name, "chat gpt-4o-mini");
    assert_eq!(span.kind, SpanKind::Client as i32);
    assert_eq!(span.trace_id.len(), 16);
    assert!(span.trace_id.iter().any(|&b| b != 0));
    assert_eq!(span.span_id.len(), 8);
    assert!(span.parent_span_id.is_empty(), "a root span");
    assert!(span.start_time_unix_nano + 2_000_000 >= t0 && span.end_time_unix_nano >= span.start_time_unix_nano);
    assert!(span.status.as_ref().is_none_or(|s| s.code == StatusCode::Unset as i32), "{:?}", span.status);
    let a = &span.attributes;
    assert_eq!(str_attr(a, "gen_ai.operation.name"), Some("chat"));
    assert_eq!(str_attr(a, "gen_ai.system"), Some("openai"));
    assert_eq!(str_attr(a, "gen_ai.request.model"), Some("gpt-4o-mini"));
    assert_eq!(str_attr(a, "gen_ai.response.model"), Some("gpt-4o-mini"));
    assert_eq!(int_attr(a, "gen_ai.usage.input_tokens"), Some(19));
    assert_eq!(int_attr(a, "gen_ai.usage.output_tokens"), Some(14));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(200));
    assert_eq!(str_attr(a, "aigate.gateway"), Some("default"));
    assert_eq!(str_attr(a, "aigate.cache_status"), Some("OFF"), "the gateway has no cache");
    assert!(matches!(attr(a, "aigate.cost_usd"), Some(Value::DoubleValue(c)) if *c > 0.0), "{a:?}");

    // W3C traceparent: the span is a child of the caller's span, in the caller's trace.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (_, joined) = send(&env, CHAT, &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))]).await;
    let span = rx.span(&joined).await;
    assert_eq!(hex(&span.trace_id), trace);
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_ne!(hex(&span.span_id), "00f067aa0ba902b7");

    // Cloudflare's headers.
    let (_, cf) = send(
        &env,
        CHAT,
        &[
            ("cf-aig-otel-trace-id", "0af7651916cd43dd8448eb211c80319c"),
            ("cf-aig-otel-parent-span-id", "b7ad6b7169203331"),
        ],
    )
    .await;
    let span = rx.span(&cf).await;
    assert_eq!(hex(&span.trace_id), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(hex(&span.parent_span_id), "b7ad6b7169203331");

    // A failed request: error status, its code as error.type, the upstream's message.
    let (s, failed) = send(&env, CHAT, &[("x-mock-status", "500")]).await;
    assert_eq!(s, 500);
    let span = rx.span(&failed).await;
    let status = span.status.as_ref().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("mock failure"), "{}", status.message);
    assert_eq!(int_attr(&span.attributes, "http.response.status_code"), Some(500));
    assert_eq!(str_attr(&span.attributes, "error.type"), Some("500"));

    {
        let g = rx.got.lock().unwrap();
        assert!(g.spans.iter().all(|s| hex(&s.trace_id) != unsampled_trace), "an unsampled trace was exported");
        assert!(!g.spans.iter().any(|s| str_attr(&s.attributes, "aigate.log_id") == Some(unsampled.as_str())));
        assert!(g.auth.iter().all(|a| a == ADMIN_TOKEN) && !g.auth.is_empty(), "{:?}", g.auth);
        assert!(g.service_names.iter().all(|n| n == "aigate-test"), "{:?}", g.service_names);
    }

    // Metrics: cumulative, all five requests (the unsampled one too).
    let mut last = Vec::new();
    wait_until("metrics covering the five requests", async || {
        last = rx.got.lock().unwrap().metrics.last().cloned().unwrap_or_default();
        sum_of(&last, "aigate.requests") >= 5.0
    })
    .await;
    assert_eq!(sum_of(&last, "aigate.requests"), 5.0);
    let m = |name: &str| last.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no {name}: {last:#?}"));
    let Some(Data::Histogram(tokens)) = &m("gen_ai.client.token.usage").data else { panic!("not a histogram") };
    let input: f64 = tokens
        .data_points
        .iter()
        .filter(|p| str_attr(&p.attributes, "gen_ai.token.type") == Some("input"))
        .map(|p| p.sum.unwrap())
        .sum();
    assert_eq!(input, 19.0 * 4.0, "four successful requests of 19 input tokens");
    let Some(Data::Histogram(duration)) = &m("gen_ai.client.operation.duration").data else { panic!() };
    assert_eq!(duration.data_points.iter().map(|p| p.count).sum::<u64>(), 5);
    assert_eq!(m("gen_ai.client.operation.duration").unit, "s");
    assert!(sum_of(&last, "aigate.cost") > 0.0);
    let Some(Data::Sum(requests)) = &m("aigate.requests").data else { panic!() };
    let failed_points: i64 = requests
        .data_points
        .iter()
        .filter(|p| int_attr(&p.attributes, "http.response.status_code") == Some(500))
        .map(|p| match p.value {
            Some(number_data_point::Value::AsInt(v)) => v,
            _ => 0,
        })
        .sum();
    assert_eq!(failed_points, 1);
    assert!(metric(&env, "aigate_otel_exported_spans_total").await >= 4.0);
    assert_eq!(metric(&env, "aigate_otel_dropped_spans_total").await, 0.0);
}

/// The sum of a Sum metric's points.
fn sum_of(metrics: &[Metric], name: &str) -> f64 {
    let Some(Data::Sum(s)) = metrics.iter().find(|m| m.name == name).and_then(|m| m.data.as_ref()) else {
        return 0.0;
    };
    s.data_points
        .iter()
        .map(|p| match p.value {
            Some(number_data_point::Value::AsInt(v)) => v as f64,
            Some(number_data_point::Value::AsDouble(v)) => v,
            None => 0.0,
        })
        .sum()
}

/// Sends `n` requests one after the other; asserts each answers 200 within `each`.
async fn requests_answer_promptly(env: &Env, n: usize, each: Duration) {
    for _ in 0..n {
        let t = Instant::now();
        let (s, _) = send(env, CHAT, &[]).await;
        assert_eq!(s, 200);
        assert!(t.elapsed() < each, "a request took {:?}", t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_never_affects_requests() {
    // Nothing listens: every export fails at once.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let env = env_with(&telemetry_config(&endpoint, "export_interval = \"100ms\""), MockConfig::default()).await;
    requests_answer_promptly(&env, 50, Duration::from_millis(500)).await;
    wait_until("failed exports to be counted", async || {
        metric(&env, "aigate_otel_export_errors_total").await >= 1.0
            && metric(&env, "aigate_otel_dropped_spans_total").await >= 50.0
    })
    .await;
    assert_eq!(metric(&env, "aigate_otel_exported_spans_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_times_out_and_a_full_queue_drops() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    let extra = "batch_size = 2\nqueue = 4\ntimeout = \"300ms\"";
    let env = env_with(&telemetry_config(&endpoint, extra), MockConfig::default()).await;
    requests_answer_promptly(&env, 40, Duration::from_millis(500)).await;
    wait_until("a timed-out export and dropped spans", async || {
        metric(&env, "aigate_otel_export_errors_total").await >= 1.0
            && metric(&env, "aigate_otel_dropped_spans_total").await >= 30.0
    })
    .await;
    // Shutdown is not held up by the hanging collector beyond its bound.
    let t = Instant::now();
    env.gw.shutdown();
    env.gw.wait().await;
    assert!(t.elapsed() < Duration::from_secs(8), "shutdown took {:?}", t.elapsed());
}
