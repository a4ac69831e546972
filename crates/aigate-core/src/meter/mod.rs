//! Metering on the request path: what a request did, gathered as it goes and handed to the log
//! pipeline ([`crate::logs`]) when its response ends.
//!
//! The request path only collects raw material here: timestamps (`Instant`s), the bytes it already
//! has (the request body and response chunks, copied when small: see [`detached`]; the cached entry
//! of a hit) and a few header values. Everything that costs (parsing the request's
//! model, reading usage from a JSON response, pricing, metadata, building the record, metrics) is
//! done by the pipeline's writer, off the path. The two exceptions are streamed responses, whose
//! usage is read event by event as they are relayed ([`SseUsage`], a byte scanner) so that a long
//! stream need not be held, and the filter that hides the usage event aigate asked for
//! ([`InjectedUsageFilter`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use aigate_store::CachedResponse;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, GatewayBody};
use crate::cache::CacheStatus;
use crate::config::LogSettings;
use crate::endpoint::Endpoint;
use crate::headers::{
    CF_AIG_COLLECT_LOG, CF_AIG_COLLECT_LOG_PAYLOAD, CF_AIG_CUSTOM_COST, CF_AIG_EVENT_ID, CF_AIG_METADATA,
};
use crate::logs::LogPipeline;
use crate::phases::route::Route;
use usage::{InjectedUsageFilter, SseUsage};

/// A usage fixture's bytes (`tests/fixtures/usage/`), for the tests of `cost` and `usage`.
#[cfg(test)]
macro_rules! fixture {
    ($name:literal) => {
        &include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/usage/", $name))[..]
    };
}

pub mod cost;
pub mod usage;

/// Most bytes of a non-streamed response kept to read its usage from: larger JSON answers of the
/// metered endpoints do not exist in practice, and a larger one is then simply not metered.
pub const USAGE_CAPTURE_MAX: usize = 4 * 1024 * 1024;

/// Chunks up to this size are copied into the meter rather than referenced. A received chunk is
/// a slice of its connection's read buffer: holding a reference until the log writer gets to it
/// (up to [`crate::logs::LINGER`] and more) keeps that whole buffer alive, so hyper has to
/// allocate a fresh one for the connection's next read. Copying a few hundred bytes is much
/// cheaper than that; large chunks are referenced (hyper reads them into buffers of their own).
pub const COPY_CHUNK_MAX: usize = 16 * 1024;

/// `data` as the meter keeps it: a copy when small (see [`COPY_CHUNK_MAX`]), else a reference.
pub fn detached(data: &Bytes) -> Bytes {
    if data.len() <= COPY_CHUNK_MAX {
        Bytes::copy_from_slice(data)
    } else {
        data.clone()
    }
}

/// A copy of a request header's value (a parsed value references the connection's read buffer;
/// see [`detached`]).
fn detached_header(h: &HeaderMap, name: &http::HeaderName) -> Option<HeaderValue> {
    h.get(name).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
}

fn header_is_false(h: &HeaderMap, name: &http::HeaderName) -> bool {
    h.get(name).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false"))
}

/// Bytes of an error response kept to read its message from.
pub const ERROR_CAPTURE_MAX: usize = 64 * 1024;

/// One request's raw measurements. Boxed, it is the only allocation metering adds per request.
#[derive(Debug)]
pub struct Meter {
    /// The `cf-aig-log-id`.
    pub id: uuid::Uuid,
    /// Unix ms at arrival.
    pub created_at_ms: u64,
    /// Arrival.
    pub start: Instant,
    /// The gateway's name.
    pub gateway: Arc<str>,
    /// The gateway's log settings at the time of the request.
    pub logs: LogSettings,
    /// The provider.
    pub provider: Arc<crate::providers::Provider>,
    /// Provider path (`chat/completions`, …).
    pub path: String,
    /// What the request is (which usage format its answer has, if any).
    pub endpoint: Endpoint,
    /// The request body as received (a reference, not a copy).
    pub request_body: Bytes,
    /// `cf-aig-event-id`.
    pub event_id: Option<HeaderValue>,
    /// `cf-aig-metadata`.
    pub metadata: Option<HeaderValue>,
    /// `cf-aig-custom-cost`.
    pub custom_cost: Option<HeaderValue>,
    /// `User-Agent`.
    pub user_agent: Option<HeaderValue>,
    /// `cf-aig-collect-log` was not `false`.
    pub collect_log: bool,
    /// `cf-aig-collect-log-payload` was not `false`.
    pub collect_payload: bool,
    /// Response status.
    pub status: u16,
    /// Cache outcome.
    pub cache_status: CacheStatus,
    /// The response is an event stream.
    pub stream: bool,
    /// When the upstream request was sent.
    pub upstream_start: Option<Instant>,
    /// When the upstream's response head arrived.
    pub upstream_head: Option<Instant>,
    /// When the response head left aigate.
    pub head_out: Option<Instant>,
    /// When the first body byte left aigate.
    pub first_byte: Option<Instant>,
    /// When the response ended.
    pub end: Option<Instant>,
    /// What went wrong, if anything (never holds a credential).
    pub error: Option<String>,
    /// The response body was relayed to its end.
    pub completed: bool,
    /// Response chunks kept (for usage and/or the stored body).
    pub captured: Vec<Bytes>,
    /// Bytes in `captured`.
    pub captured_bytes: usize,
    /// Most bytes to keep in `captured`.
    pub capture_limit: usize,
    /// More was relayed than kept.
    pub capture_overflow: bool,
    /// Streamed usage reader.
    pub sse: Option<SseUsage>,
    /// Hides the usage event aigate asked the upstream for.
    pub filter: Option<InjectedUsageFilter>,
    /// The cached entry a hit was served from (its usage is what the hit saved).
    pub hit_entry: Option<Arc<CachedResponse>>,
    /// Rate-limit and budget reservations, settled when the response ends.
    pub held: Vec<crate::limits::Held>,
    /// Headers the phases add to the response: `x-ratelimit-*`, `cf-aig-step`, `aigate-gateway`.
    pub rate_headers: Vec<(http::HeaderName, HeaderValue)>,
    /// Times the request was sent upstream, summed over fallback steps (0: never sent).
    pub attempts: u32,
    /// The 0-based fallback step that answered; `None` for a request without steps.
    pub step: Option<u32>,
    /// The dynamic route that served the request, as `NAME@VERSION`.
    pub route: Option<String>,
    /// A short circuit-breaker note on the upstream (`half-open`, `open: openai`).
    pub breaker: Option<String>,
    /// The caller's trace (`traceparent` or `cf-aig-otel-*`), for the exported span.
    pub trace: Option<crate::telemetry::TraceContext>,
    /// The cache rule that applied: its name and its `aigate-cache-rule` header value.
    pub cache_rule: Option<(Arc<str>, HeaderValue)>,
    /// The key the cache looked up and the TTL an answer is stored with (for the cache index).
    pub cache_key: Option<(aigate_store::CacheKey, std::time::Duration)>,
}

impl Meter {
    /// The request goes to the provider its model names (the API for every provider): the record
    /// names that provider, and its path starts with `compat/`, which says the request went
    /// through that API (translated unless the provider speaks the client's format).
    pub fn reroute(&mut self, route: &Route<'_>) {
        self.provider = route.provider.clone();
        self.endpoint = route.endpoint;
        self.path = format!("compat/{}", route.rest);
    }

    /// A step of a chain is tried: the record names its provider and endpoint (the last step tried
    /// is the one recorded). A step through the API for every provider is recorded as `compat/…`.
    pub fn retarget(&mut self, route: &Route<'_>, translated: bool) {
        self.provider = route.provider.clone();
        self.endpoint = route.endpoint;
        self.path = if translated { format!("compat/{}", route.rest) } else { route.rest.to_owned() };
        self.filter = None;
    }

    /// The meter of a routed request that arrived at `start` (Unix ms `created_at_ms`).
    pub fn new(
        id: uuid::Uuid,
        created_at_ms: u64,
        start: Instant,
        route: &Route<'_>,
        headers: &HeaderMap,
    ) -> Box<Meter> {
        Box::new(Meter {
            id,
            created_at_ms,
            start,
            gateway: route.gateway.name.clone(),
            logs: route.gateway.logs.clone(),
            provider: route.provider.clone(),
            path: route.rest.to_owned(),
            endpoint: route.endpoint,
            request_body: Bytes::new(),
            event_id: detached_header(headers, &CF_AIG_EVENT_ID),
            metadata: detached_header(headers, &CF_AIG_METADATA),
            custom_cost: detached_header(headers, &CF_AIG_CUSTOM_COST),
            user_agent: detached_header(headers, &http::header::USER_AGENT),
            collect_log: !header_is_false(headers, &CF_AIG_COLLECT_LOG),
            collect_payload: !header_is_false(headers, &CF_AIG_COLLECT_LOG_PAYLOAD),
            status: 0,
            cache_status: CacheStatus::Bypass,
            stream: false,
            upstream_start: None,
            upstream_head: None,
            head_out: None,
            first_byte: None,
            end: None,
            error: None,
            completed: false,
            captured: Vec::new(),
            captured_bytes: 0,
            capture_limit: 0,
            capture_overflow: false,
            sse: None,
            filter: None,
            hit_entry: None,
            held: Vec::new(),
            rate_headers: Vec::new(),
            attempts: 0,
            step: None,
            route: None,
            breaker: None,
            trace: crate::telemetry::TraceContext::from_headers(headers),
            cache_rule: None,
            cache_key: None,
        })
    }

    /// Prepares the response-side measurements once the response head is known.
    pub fn on_head(&mut self, status: u16, content_type: Option<&HeaderValue>) {
        self.head_out = Some(Instant::now());
        self.status = status;
        self.stream = content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let bodies = self.logs.bodies && self.collect_payload && self.logs.enabled && self.collect_log;
        let body_cap = if bodies { self.logs.max_body_size } else { 0 };
        if self.hit_entry.is_some() {
            // The entry holds the whole body already.
            self.capture_limit = 0;
        } else if self.stream {
            if self.endpoint.usage_format().is_some() {
                self.sse = Some(SseUsage::new(self.endpoint));
            }
            self.capture_limit = body_cap;
        } else if self.endpoint.usage_format().is_some() && (200..300).contains(&status) {
            self.capture_limit = body_cap.max(USAGE_CAPTURE_MAX);
        } else if status >= 400 {
            // Enough to read the error message from.
            self.capture_limit = body_cap.max(ERROR_CAPTURE_MAX);
        } else {
            self.capture_limit = body_cap;
        }
        if !self.stream {
            self.filter = None;
        }
    }

    /// The response comes from the cache (`entry`) or from an identical request in flight (`None`);
    /// `filtered`: the stored stream may hold a usage event aigate asked for, to be hidden.
    pub fn on_hit(&mut self, entry: Option<Arc<CachedResponse>>, filtered: bool) {
        self.cache_status = CacheStatus::Hit;
        self.hit_entry = entry;
        if filtered {
            self.filter = Some(InjectedUsageFilter::new());
        }
    }

    /// What the limits phase let through.
    pub fn admitted(&mut self, a: crate::limits::Admission) {
        self.held.extend(a.held);
        // Usually the first headers: moved in, not copied.
        if self.rate_headers.is_empty() {
            self.rate_headers = a.headers;
        } else {
            self.rate_headers.extend(a.headers);
        }
    }

    fn on_data(&mut self, data: &Bytes) {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
        if let Some(sse) = &mut self.sse {
            sse.feed(data);
        }
        if self.capture_limit > 0 {
            if self.captured_bytes + data.len() <= self.capture_limit {
                self.captured_bytes += data.len();
                self.captured.push(detached(data));
            } else {
                let room = self.capture_limit - self.captured_bytes;
                if room > 0 {
                    self.captured.push(detached(&data.slice(..room)));
                    self.captured_bytes += room;
                }
                self.capture_overflow = true;
            }
        }
    }
}

/// The body of every response: the gateway's body, metered when the request went through a
/// gateway. Without a meter it is exactly the inner body.
pub struct ResponseBody {
    inner: GatewayBody,
    tap: Option<Tap>,
}

struct Tap {
    /// `None` once handed to the pipeline.
    meter: Option<Box<Meter>>,
    pipeline: Arc<LogPipeline>,
    inner_done: bool,
}

impl ResponseBody {
    /// An unmetered body.
    pub fn plain(inner: GatewayBody) -> ResponseBody {
        ResponseBody { inner, tap: None }
    }

    /// A metered body: `meter` goes to `pipeline` when the body ends or is dropped.
    pub fn metered(inner: GatewayBody, meter: Box<Meter>, pipeline: Arc<LogPipeline>) -> ResponseBody {
        ResponseBody { inner, tap: Some(Tap { meter: Some(meter), pipeline, inner_done: false }) }
    }
}

impl From<GatewayBody> for ResponseBody {
    fn from(b: GatewayBody) -> Self {
        ResponseBody::plain(b)
    }
}

impl Tap {
    fn finish(&mut self, completed: bool) {
        if let Some(mut m) = self.meter.take() {
            m.end = Some(Instant::now());
            m.completed = completed;
            if !completed && m.error.is_none() {
                m.error = Some("the client closed the connection before the response ended".into());
            }
            self.pipeline.submit(m);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(tap) = &mut self.tap {
            // A body hyper never had to poll (empty, or ended with its last frame) is complete.
            let ended = tap.inner_done || self.inner.is_end_stream();
            tap.finish(ended);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(tap) = &mut this.tap else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        loop {
            let Some(meter) = tap.meter.as_deref_mut() else {
                return Poll::Ready(None);
            };
            if tap.inner_done {
                // Only a filter's held-back tail can remain.
                let rest = meter.filter.as_mut().map(InjectedUsageFilter::finish).unwrap_or_default();
                tap.finish(true);
                return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            meter.on_data(&data);
                            let data = match &mut meter.filter {
                                Some(f) => f.strip_injected_usage_event(data),
                                None => data,
                            };
                            if this.inner.is_end_stream() {
                                tap.inner_done = true;
                            }
                            if data.is_empty() {
                                continue;
                            }
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    if tap.inner_done && meter.filter.is_none() {
                        tap.finish(true);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    meter.error = Some(format!("the response body failed: {e}"));
                    tap.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => tap.inner_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.tap.as_ref().map(|t| t.meter.as_deref()) {
            None => self.inner.is_end_stream(),
            Some(None) => true,
            // A filter may still hold a tail; the end is reported by a final `None`.
            Some(Some(m)) if m.filter.is_some() => false,
            Some(Some(_)) => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.tap.as_ref().and_then(|t| t.meter.as_deref()) {
            Some(m) if m.filter.is_some() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_chunks_are_copied_large_ones_referenced() {
        // A read buffer as hyper would hold it, and a response chunk sliced out of it.
        let buffer = Bytes::from(vec![b'x'; 64 * 1024]);
        let small = buffer.slice(..600);
        let kept = detached(&small);
        assert_eq!(kept, small);
        assert_ne!(kept.as_ptr(), small.as_ptr(), "a small chunk must not keep the buffer alive");
        let large = buffer.slice(..COPY_CHUNK_MAX + 1);
        assert_eq!(detached(&large).as_ptr(), large.as_ptr(), "a large chunk is not copied");
    }
}
