//! OTLP metrics: per-request counts, tokens, cost and duration, aggregated as requests finish (on
//! the log writer, like the Prometheus metrics) and exported cumulatively every `export_interval`.
//!
//! - `aigate.requests` (sum, `{request}`): requests.
//! - `gen_ai.client.token.usage` (histogram, `{token}`, `gen_ai.token.type` = `input`/`output`):
//!   tokens per request, as the GenAI conventions define it.
//! - `gen_ai.client.operation.duration` (histogram, `s`): request duration.
//! - `aigate.cost` (sum, `USD`): cost paid to providers (known prices only).
//!
//! Every series carries `aigate.gateway`, `gen_ai.system`, `gen_ai.operation.name` (when the
//! request is a model call), `gen_ai.request.model`, `http.response.status_code` and
//! `aigate.cache_status`. Models come from requests, so their number is bounded: past
//! [`MAX_SERIES`] series, new models are counted as `other`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
};

use aigate_store::LogRecord;

use super::span::{gen_ai_system, kv_int, kv_str, operation};
use crate::endpoint::Endpoint;

/// Series kept before new models are folded into `other`.
pub const MAX_SERIES: usize = 2000;

/// Upper bounds of the duration histogram, seconds (the GenAI conventions' advice).
const DURATION_BOUNDS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

/// Upper bounds of the token histogram (the GenAI conventions' advice).
const TOKEN_BOUNDS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

/// The attributes of a series.
#[derive(Debug, Clone)]
struct Key {
    gateway: Arc<str>,
    provider: String,
    operation: Option<&'static str>,
    model: String,
    status: u16,
    cache_status: String,
}

#[derive(Debug, Clone, Default)]
struct Hist {
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Hist {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
            self.min = v;
            self.max = v;
        }
        let i = bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn point(&self, attributes: Vec<KeyValue>, bounds: &[f64], start: u64, now: u64) -> HistogramDataPoint {
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: self.count,
            sum: Some(self.sum),
            bucket_counts: self.counts.clone(),
            explicit_bounds: bounds.to_vec(),
            min: Some(self.min),
            max: Some(self.max),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Series {
    requests: u64,
    cost_usd: f64,
    input_tokens: Hist,
    output_tokens: Hist,
    duration: Hist,
}

/// The cumulative metrics since start.
#[derive(Debug, Default)]
pub struct Aggregator {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Reused buffer of the lookup key (the label values joined), so that a known series costs
    /// no allocation.
    buf: String,
    series: HashMap<String, (Key, Series)>,
}

impl Aggregator {
    /// Counts one finished request.
    pub fn record(&self, e: &LogRecord, endpoint: Endpoint) {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner { buf, series } = &mut *guard;
        let op = operation(endpoint);
        let mut model = e.requested_model.as_deref().unwrap_or_default();
        // Joined by hand rather than with `write!`: this runs for every request, and the
        // formatting machinery cost more than the lookup itself.
        let lookup = |buf: &mut String, model: &str| {
            buf.clear();
            for part in [e.gateway.as_str(), &e.provider, op.unwrap_or_default(), model] {
                buf.push_str(part);
                buf.push('\0');
            }
            buf.push_str(itoa::Buffer::new().format(e.status));
            buf.push('\0');
            buf.push_str(&e.cache_status);
        };
        lookup(buf, model);
        if series.len() >= MAX_SERIES && !series.contains_key(buf.as_str()) {
            model = "other";
            lookup(buf, model);
        }
        let s = match series.get_mut(buf.as_str()) {
            Some((_, s)) => s,
            None => {
                let key = Key {
                    gateway: Arc::from(e.gateway.as_str()),
                    provider: e.provider.clone(),
                    operation: op,
                    model: model.to_owned(),
                    status: e.status,
                    cache_status: e.cache_status.clone(),
                };
                &mut series.entry(buf.clone()).or_insert((key, Series::default())).1
            }
        };
        s.requests += 1;
        s.cost_usd += e.cost_usd.unwrap_or(0.0);
        if let Some(t) = e.tokens_in {
            s.input_tokens.observe(&TOKEN_BOUNDS, t as f64);
        }
        if let Some(t) = e.tokens_out {
            s.output_tokens.observe(&TOKEN_BOUNDS, t as f64);
        }
        s.duration.observe(&DURATION_BOUNDS, e.duration_ms / 1e3);
    }

    /// The metrics as of `now` (cumulative since `start`, Unix ns); empty before any request.
    pub fn export(&self, start: u64, now: u64) -> Vec<Metric> {
        let snapshot: Vec<(Key, Series)> = {
            let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.series.values().cloned().collect()
        };
        if snapshot.is_empty() {
            return Vec::new();
        }
        let cumulative = AggregationTemporality::Cumulative as i32;
        let (mut requests, mut cost, mut tokens, mut duration) = (vec![], vec![], vec![], vec![]);
        for (k, s) in &snapshot {
            let attrs = attributes(k);
            let number = |v: number_data_point::Value| NumberDataPoint {
                attributes: attrs.clone(),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(v),
                ..Default::default()
            };
            requests.push(number(number_data_point::Value::AsInt(s.requests as i64)));
            cost.push(number(number_data_point::Value::AsDouble(s.cost_usd)));
            for (kind, h) in [("input", &s.input_tokens), ("output", &s.output_tokens)] {
                if h.count > 0 {
                    let mut a = attrs.clone();
                    a.push(kv_str("gen_ai.token.type", kind));
                    tokens.push(h.point(a, &TOKEN_BOUNDS, start, now));
                }
            }
            duration.push(s.duration.point(attrs, &DURATION_BOUNDS, start, now));
        }
        let metric = |name: &str, description: &str, unit: &str, data: metric::Data| Metric {
            name: name.to_owned(),
            description: description.to_owned(),
            unit: unit.to_owned(),
            data: Some(data),
            ..Default::default()
        };
        let sum = |data_points| {
            metric::Data::Sum(Sum { data_points, aggregation_temporality: cumulative, is_monotonic: true })
        };
        let hist =
            |data_points| metric::Data::Histogram(Histogram { data_points, aggregation_temporality: cumulative });
        let mut out = vec![
            metric("aigate.requests", "Requests through a gateway", "{request}", sum(requests)),
            metric("aigate.cost", "Cost paid to providers (known prices only)", "USD", sum(cost)),
            metric("gen_ai.client.operation.duration", "Request duration", "s", hist(duration)),
        ];
        if !tokens.is_empty() {
            out.push(metric("gen_ai.client.token.usage", "Tokens used per request", "{token}", hist(tokens)));
        }
        out
    }
}

fn attributes(k: &Key) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(7);
    a.push(kv_str("aigate.gateway", &k.gateway));
    a.push(kv_str("gen_ai.system", gen_ai_system(&k.provider)));
    if let Some(op) = k.operation {
        a.push(kv_str("gen_ai.operation.name", op));
    }
    if !k.model.is_empty() {
        a.push(kv_str("gen_ai.request.model", &k.model));
    }
    a.push(kv_int("http.response.status_code", i64::from(k.status)));
    a.push(kv_str("aigate.cache_status", &k.cache_status));
    a
}
