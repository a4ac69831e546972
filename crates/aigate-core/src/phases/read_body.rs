//! Phase 3, read body: the whole request body, bounded in size and time, as one `Bytes` that the
//! later phases share (cache key, limits, upstream, log record) without copying.
//!
//! Reads: the body and its `Content-Length`. Writes nothing. Fails closed: more than
//! `max_request_body` bytes answers 413 (at once when the client declares the length), a body
//! that does not arrive within `request_body_timeout` answers 408, a body the connection fails to
//! deliver answers 400.

use std::future::Future;
use std::task::Poll;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::config::Settings;
use crate::error::GatewayError;

/// Reads the body within the configured size and time.
pub async fn read_body(body: Incoming, settings: &Settings) -> Result<Bytes, GatewayError> {
    // Most bodies have fully arrived with the head: poll once before arming the timer.
    let mut reading = std::pin::pin!(collect(body, settings.max_request_body));
    match std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await {
        Poll::Ready(b) => b,
        Poll::Pending => match tokio::time::timeout(settings.request_body_timeout, reading).await {
            Ok(b) => b,
            Err(_) => {
                let timeout_ms = u64::try_from(settings.request_body_timeout.as_millis()).unwrap_or(u64::MAX);
                Err(GatewayError::BodyTimeout { timeout_ms })
            }
        },
    }
}

/// Collects the body, refusing more than `limit` bytes (early, from `Content-Length`, when the
/// client declares it).
async fn collect(body: Incoming, limit: u64) -> Result<Bytes, GatewayError> {
    if body.size_hint().lower() > limit {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::BodyTooLarge { limit }),
        Err(e) => Err(GatewayError::BodyRead(e.to_string())),
    }
}
