//! Answers from the cache: a stored entry replayed ([`hit_response`]), or the answer of an
//! identical request in flight relayed to a follower ([`follow`]); and which upstream headers are
//! worth storing ([`replay_headers`]).

use std::sync::Arc;
use std::time::Duration;

use aigate_store::{CacheKey, CachedResponse};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::coalesce::{FlightEvent, FlightReceiver};
use super::CacheStatus;
use crate::body::GatewayBody;
use crate::headers::AIGATE_CACHE_KEY;

/// Headers never replayed from the cache: per-response or per-connection facts.
fn replayable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(matches!(
        n,
        "date"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "set-cookie"
            | "age"
            | "server"
            | "alt-svc"
            | "cf-ray"
            | "via"
            | "trailer"
            | "upgrade"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("cf-aig-")
        || n.starts_with("aigate-"))
}

/// The headers of an upstream response worth storing.
pub fn replay_headers(h: &HeaderMap) -> Vec<(String, Bytes)> {
    h.iter()
        .filter(|(k, _)| replayable(k))
        .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

fn apply_headers(h: &mut HeaderMap, stored: &[(String, Bytes)]) {
    for (k, v) in stored {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
            h.append(k, v);
        }
    }
}

/// A response served from a stored entry.
pub fn hit_response(entry: Arc<CachedResponse>, key: &CacheKey, now_ms: u64) -> Response<GatewayBody> {
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
    let age = now_ms.saturating_sub(entry.created_at_ms) / 1000;
    let sized = !entry.headers.iter().any(|(k, v)| k == "content-type" && v.starts_with(b"text/event-stream"));
    let mut resp = Response::new(GatewayBody::Replay { entry: entry.clone(), next: 0, sized });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    apply_headers(h, &entry.headers);
    h.insert(http::header::AGE, HeaderValue::from(age));
    set_key_header(h, key);
    CacheStatus::Hit.write(h);
    resp
}

/// Writes `aigate-cache-key` (the digest; usable with the purge API).
pub fn set_key_header(h: &mut HeaderMap, key: &CacheKey) {
    if let Ok(v) = HeaderValue::from_str(&key.to_hex()) {
        h.insert(AIGATE_CACHE_KEY, v);
    }
}

/// Waits for a leader's head; `None` means go upstream alone (leader failed or too slow).
pub async fn follow(mut rx: FlightReceiver, wait: Duration, key: &CacheKey) -> Option<Response<GatewayBody>> {
    let first = tokio::time::timeout(wait, rx.recv()).await.ok().flatten()?;
    let FlightEvent::Head(status, headers) = first else { return None };
    let mut resp = Response::new(GatewayBody::Follower(rx));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    apply_headers(h, &headers);
    h.insert(http::header::AGE, HeaderValue::from_static("0"));
    set_key_header(h, key);
    CacheStatus::Hit.write(h);
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_headers_drop_per_response_facts() {
        let h = crate::headers::map(&[
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
            ("date", "x"),
            ("x-ratelimit-remaining-requests", "9"),
            ("content-length", "10"),
        ]);
        let names: Vec<String> = replay_headers(&h).into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, vec!["content-type".to_string(), "x-request-id".to_string()]);
    }
}
