//! Phase 7, respond: the answer goes back to the client, relayed frame by frame as it arrives.
//!
//! An upstream answer passes unchanged but for hop-by-hop headers; on a cache miss a 2xx answer is
//! teed into the cache as it is relayed ([`crate::cache::MissHandle::tee`]). Every answer of a
//! gateway route, the errors of earlier phases included, then gets its gateway headers
//! ([`finish`]): `cf-aig-log-id` (a UUIDv7), the client's `cf-aig-event-id` echoed, the cache
//! status (`cf-aig-cache-status`, `aigate-cache`), the `x-ratelimit-*` headers of the tightest
//! rule; and its body is metered, so the request's record reaches the log pipeline when it ends.
//!
//! Reads: the upstream answer, the miss handle, the meter. Writes: the response. Never fails: an
//! error of an earlier phase becomes its OpenAI-shaped error response here.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Response};

use super::upstream::strip_response_headers;
use crate::body::GatewayBody;
use crate::cache::{replay::set_key_header, MissHandle};
use crate::client::UpstreamBody;
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::headers::{CF_AIG_CACHE_STATUS, CF_AIG_EVENT_ID, CF_AIG_LOG_ID};
use crate::meter::{Meter, ResponseBody};
use crate::state::AppState;
use crate::translate::{ResponseTranslator, Translation};

/// One request through a gateway route: its identity, and its meter once it is routed.
pub struct Exchange {
    /// The `cf-aig-log-id`.
    pub id: uuid::Uuid,
    /// Unix ms at arrival (the id's timestamp).
    pub created_at_ms: u64,
    /// Arrival.
    pub start: Instant,
    event_id: Option<HeaderValue>,
    meter: Option<Box<Meter>>,
}

impl Exchange {
    /// A request arriving now.
    pub fn begin(state: &AppState, headers: &http::HeaderMap) -> Exchange {
        let start = Instant::now();
        // The record's time is its id's UUIDv7 timestamp: the SQLite log store finds a record by
        // id through its time ([`aigate_store::log_id_at`]).
        let created_at_ms = state.clock.now_ms();
        Exchange {
            id: aigate_store::log_id_at(created_at_ms),
            created_at_ms,
            start,
            event_id: headers.get(CF_AIG_EVENT_ID).cloned(),
            meter: None,
        }
    }

    /// Starts metering the request.
    pub fn meter(&mut self, meter: Box<Meter>) -> &mut Meter {
        self.meter.insert(meter)
    }
}

/// Relays an upstream answer; a miss tees a 2xx answer into the cache.
pub fn respond(
    answer: Response<UpstreamBody>,
    miss: Option<MissHandle>,
    endpoint: Endpoint,
    translation: Option<&Translation>,
    meter: &Meter,
) -> Response<GatewayBody> {
    let (mut parts, mut body) = answer.into_parts();
    strip_response_headers(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    if let Some(t) = translation {
        let stream = is_event_stream(&parts.headers);
        if let Some(tr) = ResponseTranslator::new(t, parts.status, stream, meter.created_at_ms / 1000) {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            parts.headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(tr.content_type()));
            body = body.translated(tr);
        }
    }
    let key = miss.as_ref().map(|m| *m.key());
    let body = match miss {
        Some(miss) if parts.status.is_success() => {
            let stream = is_event_stream(&parts.headers);
            let terminal = if stream { endpoint.terminal_event() } else { None };
            miss.tee(parts.status, &parts.headers, body, terminal)
        }
        // A failed or non-2xx answer: the handle's drop fails the flight (followers go upstream).
        _ => GatewayBody::Upstream(body),
    };
    if let Some(key) = &key {
        set_key_header(&mut parts.headers, key);
    }
    meter.cache_status.write(&mut parts.headers);
    Response::from_parts(parts, body)
}

fn is_event_stream(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The response of a gateway request, with its gateway headers and its metered body.
pub fn finish(
    state: &AppState,
    ex: Exchange,
    result: Result<Response<GatewayBody>, GatewayError>,
) -> Response<ResponseBody> {
    let Exchange { id, event_id, mut meter, .. } = ex;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(m) = &mut meter {
                m.error = Some(e.to_string());
            }
            e.into_response()
        }
    };
    let h = resp.headers_mut();
    if !h.contains_key(CF_AIG_CACHE_STATUS) {
        crate::cache::CacheStatus::Bypass.write(h);
    }
    let mut buf = uuid::Uuid::encode_buffer();
    if let Ok(v) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)) {
        h.insert(CF_AIG_LOG_ID, v);
    }
    if let Some(ev) = event_id {
        h.insert(CF_AIG_EVENT_ID, ev);
    }
    match meter {
        Some(mut m) => {
            for (k, v) in std::mem::take(&mut m.rate_headers) {
                h.insert(k, v);
            }
            if let Some((_, v)) = &m.cache_rule {
                h.insert(crate::headers::AIGATE_CACHE_RULE, v.clone());
            }
            m.on_head(resp.status().as_u16(), resp.headers().get(http::header::CONTENT_TYPE));
            let logs: Arc<_> = state.logs.clone();
            resp.map(|b| ResponseBody::metered(b, m, logs))
        }
        None => resp.map(ResponseBody::plain),
    }
}
