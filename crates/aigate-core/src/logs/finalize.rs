//! Finalising: a finished request's [`Meter`] becomes its [`LogRecord`]: the requested and served
//! model, usage (from the stream reader, the captured JSON body or the cached entry), cost and
//! saving, metadata, error message, timings, bodies. The metrics are recorded and the request's
//! limit reservations settled here too. Runs on the log writer task or the spill thread, never on
//! the request path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use aigate_store::{LogRecord, MetaValue, MAX_METADATA};
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::sync::broadcast;

use super::{Finished, LogStats};
use crate::clock::Clock;
use crate::endpoint::Endpoint;
use crate::meter::cost::{CustomCost, PriceTable};
use crate::meter::usage::{self, SseUsage, Usage};
use crate::meter::Meter;
use crate::metrics::Metrics;

/// Turns meters into records; shared by the writer and the spill thread.
pub struct Finalizer {
    pub(super) prices: ArcSwap<PriceTable>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) limits: Arc<crate::limits::LimitLayer>,
    pub(super) tail: broadcast::Sender<Arc<LogRecord>>,
    pub(super) stats: Arc<LogStats>,
    /// Names spill files and paces warnings.
    pub(super) clock: Clock,
    /// OpenTelemetry export, when configured.
    pub(super) telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The cache index, told how each lookup ended.
    pub(super) cache_index: Arc<crate::cache::index::CacheIndex>,
}

impl Finalizer {
    /// Builds the record of a finished request, updates metrics and feeds the tail.
    pub fn finalize(&self, mut m: Box<Meter>) -> Finished {
        let (keep, record) = self.finalize_record(&mut m);
        Finished { gateway: m.gateway.to_string(), keep, record }
    }

    /// [`Finalizer::finalize`] in place (the meter is large: it is not moved); returns whether the
    /// record is kept, and the record.
    pub(super) fn finalize_record(&self, m: &mut Meter) -> (bool, LogRecord) {
        let keep = m.logs.enabled && m.collect_log;
        let bodies = keep && m.logs.bodies && m.collect_payload;
        // A record neither kept nor watched (logs off, `cf-aig-collect-log: false`) only feeds the
        // metrics and the analytics rollups: the fields they do not read (id, event id, path,
        // user agent, error message) are left empty rather than built.
        let tail = self.tail.receiver_count() > 0;
        let full = keep || tail;
        let end = m.end.unwrap_or_else(Instant::now);
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
        let head_out = m.head_out.unwrap_or(end);
        let success = (200..300).contains(&m.status) && m.completed && m.error.is_none();
        let hit = m.cache_status == crate::cache::CacheStatus::Hit;

        let requested_model = usage::request_model(&m.request_body);
        let response = response_bytes(m);
        let mut served_model = None;
        let mut usage: Option<Usage> = None;
        let ep = m.endpoint;
        if ep.usage_format().is_some() {
            if let Some(entry) = &m.hit_entry {
                usage = usage_of_chunks(ep, &entry.chunks, m.stream);
            } else if let Some(sse) = m.sse.take() {
                served_model = sse.model().map(str::to_owned);
                usage = sse.finish();
            } else if (200..300).contains(&m.status) && !m.capture_overflow {
                usage = usage::parse_json(ep, &response);
            }
        }
        if let Some(u) = &mut usage {
            if u.model.is_none() {
                u.model = served_model.clone().or_else(|| requested_model.clone());
            }
            served_model = u.model.clone().or(served_model);
        }
        let custom = m.custom_cost.as_ref().and_then(|v| CustomCost::parse(v.as_bytes()).ok());
        let prices = self.prices.load();
        let priced = usage.as_ref().and_then(|u| prices.cost_for(&m.provider.name, u, custom.as_ref()));
        let (cost_usd, saved_usd) = if hit {
            (Some(0.0), priced)
        } else if priced.is_some() {
            (priced, None)
        } else if !success || m.endpoint.usage_format().is_none() && m.request_body.is_empty() {
            // Failed requests are not billed; bodiless calls (model lists) cost nothing.
            (Some(0.0), None)
        } else {
            (None, None)
        };

        // An exported span carries the error message too.
        let error = if full || self.telemetry.is_some() {
            m.error.clone().or_else(|| (m.status >= 400).then(|| error_message(&response, m.status)))
        } else {
            None
        };
        let metadata = match &m.metadata {
            Some(v) => match parse_metadata(v.as_bytes()) {
                Some(md) => md,
                None => {
                    self.stats.invalid_metadata.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("cf-aig-metadata ignored: not a JSON object");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let cap = m.logs.max_body_size;
        let overhead = match (m.upstream_start, m.upstream_head) {
            (Some(us), Some(uh)) => ms(m.start, us) + ms(uh, head_out),
            (Some(us), None) => ms(m.start, us),
            _ => ms(m.start, head_out),
        };
        let record = LogRecord {
            id: if full { m.id.hyphenated().to_string() } else { String::new() },
            event_id: m.event_id.as_ref().filter(|_| full).and_then(|v| v.to_str().ok()).map(str::to_owned),
            created_at_ms: m.created_at_ms,
            gateway: m.gateway.to_string(),
            provider: m.provider.name.clone(),
            path: if full { m.path.clone() } else { String::new() },
            requested_model,
            served_model,
            status: m.status,
            success,
            cache_status: m.cache_status.aigate_value().to_owned(),
            stream: m.stream,
            duration_ms: ms(m.start, end),
            ttfb_ms: Some(ms(m.start, m.first_byte.unwrap_or(head_out))),
            upstream_ms: m.upstream_start.map(|s| ms(s, end)),
            overhead_ms: Some(overhead),
            tokens_in: usage.as_ref().map(|u| u.input_tokens),
            tokens_out: usage.as_ref().map(|u| u.output_tokens),
            cached_tokens_in: usage.as_ref().map(|u| u.cached_input_tokens),
            reasoning_tokens: usage.as_ref().map(|u| u.reasoning_tokens),
            cost_usd,
            saved_usd,
            custom_cost: custom.is_some(),
            metadata,
            user_agent: m.user_agent.as_ref().filter(|_| full).and_then(|v| v.to_str().ok()).map(str::to_owned),
            error,
            request_body: None,
            response_body: None,
            feedback: None,
            score: None,
            attempts: m.attempts,
            step: m.step,
            route: m.route.take(),
            breaker: m.breaker.take(),
        };
        self.metrics.record(&record);
        if let Some((rule, _)) = &m.cache_rule {
            self.metrics.record_cache_rule(&m.gateway, rule, m.cache_status.aigate_value());
        }
        if let Some((key, _)) = m.cache_key {
            self.cache_index.on_request(&crate::cache::index::Seen {
                gateway: &m.gateway,
                key,
                status: m.cache_status,
                at_ms: m.created_at_ms,
                cost_usd: record.cost_usd,
                saved_usd: record.saved_usd,
                model: record.requested_model.as_deref(),
                endpoint: m.endpoint.as_str(),
                provider: &m.provider.name,
                path: &m.path,
                metadata: &record.metadata,
                body: bodies.then_some(&m.request_body[..]),
                log_id: keep.then_some(record.id.as_str()),
            });
        }
        if let Some(t) = &self.telemetry {
            t.record(&record, m);
        }
        if !m.held.is_empty() {
            let count_hits = self.limits.options().count_cache_hits;
            let tokens = usage.as_ref().map(Usage::total_tokens);
            let settlements = std::mem::take(&mut m.held)
                .into_iter()
                .map(|h| {
                    let actual = crate::limits::actual_amount(
                        h.rule.measure,
                        h.reservation.amount(),
                        hit,
                        success,
                        tokens,
                        cost_usd,
                        count_hits,
                    );
                    (h, actual)
                })
                .collect();
            self.limits.settle(settlements);
        }
        if tail {
            let _ = self.tail.send(Arc::new(record.clone()));
        }
        let mut record = record;
        if bodies {
            record.request_body = Some(m.request_body.slice(..m.request_body.len().min(cap)));
            record.response_body = Some(response.slice(..response.len().min(cap)));
        }
        (keep, record)
    }
}

/// The response body as relayed (or as cached, for a hit), up to what was kept.
fn response_bytes(m: &Meter) -> Bytes {
    let chunks: &[Bytes] = match &m.hit_entry {
        Some(e) => &e.chunks,
        None => &m.captured,
    };
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut b = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
            for c in many {
                b.extend_from_slice(c);
            }
            b.freeze()
        }
    }
}

fn usage_of_chunks(ep: Endpoint, chunks: &[Bytes], stream: bool) -> Option<Usage> {
    if stream {
        let mut sse = SseUsage::new(ep);
        for c in chunks {
            sse.feed(c);
        }
        let model = sse.model().map(str::to_owned);
        sse.finish().map(|mut u| {
            u.model = u.model.or(model);
            u
        })
    } else {
        let mut b = BytesMut::new();
        for c in chunks {
            b.extend_from_slice(c);
        }
        usage::parse_json(ep, &b)
    }
}

/// The message of an error body (`{"error":{"message"}}`, `{"error":"…"}`, `{"message"}`), or
/// the start of the body as text.
fn error_message(body: &[u8], status: u16) -> String {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ErrorField {
        Object {
            #[serde(default)]
            message: Option<String>,
        },
        Text(String),
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        error: Option<ErrorField>,
        #[serde(default)]
        message: Option<String>,
    }
    if let Ok(p) = serde_json::from_slice::<Probe>(body) {
        match p.error {
            Some(ErrorField::Object { message: Some(m) }) | Some(ErrorField::Text(m)) => return truncate(m, 1000),
            _ => {}
        }
        if let Some(m) = p.message {
            return truncate(m, 1000);
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(1000)]).trim().to_owned();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        text
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// `cf-aig-metadata`: a flat JSON object; the first [`MAX_METADATA`] string, number or boolean
/// entries are kept, others dropped. `None` if the header is not a JSON object.
pub fn parse_metadata(v: &[u8]) -> Option<Vec<(String, MetaValue)>> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(v).ok()?;
    Some(map.iter().filter_map(|(k, v)| MetaValue::from_json(v).map(|mv| (k.clone(), mv))).take(MAX_METADATA).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keeps_five_scalars() {
        let md = parse_metadata(br#"{"a":"x","b":1,"c":true,"d":{"x":1},"e":[1],"f":null,"g":2.5,"h":"y","i":"z"}"#)
            .unwrap();
        let keys: Vec<&str> = md.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "g", "h"]);
        assert!(parse_metadata(b"not json").is_none());
        assert!(parse_metadata(b"[1,2]").is_none());
    }

    #[test]
    fn error_messages() {
        assert_eq!(error_message(br#"{"error":{"message":"bad key","type":"x"}}"#, 401), "bad key");
        assert_eq!(error_message(br#"{"error":"oops"}"#, 500), "oops");
        assert_eq!(error_message(b"", 502), "HTTP 502");
        assert_eq!(error_message(b"plain text", 500), "plain text");
    }

    #[test]
    fn request_model_probe() {
        assert_eq!(usage::request_model(br#" {"model":"gpt-4o","messages":[]}"#).as_deref(), Some("gpt-4o"));
        assert_eq!(usage::request_model(b"--multipart"), None);
        assert_eq!(usage::request_model(br#"{"messages":[{"model":"inner"}],"model":7}"#), None);
        assert_eq!(
            usage::request_model(br#"{"messages":[{"model":"inner"}],"model":"outer"}"#).as_deref(),
            Some("outer")
        );
    }
}
