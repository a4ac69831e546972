//! Phase 6, upstream: the request that goes to the provider, and the one place it is sent.
//!
//! The request goes out as the client sent it, with hop-by-hop headers, `Host` and every
//! `cf-aig-*` header removed, `accept-encoding: identity` (aigate reads every answer as it passes),
//! and the gateway's stored provider key injected (replacing any credential the client sent). On a streamed chat or completions request to a provider that
//! accepts it, aigate adds `stream_options.include_usage` so the stream reports its usage (the
//! extra event is hidden from the client by the meter).
//!
//! [`upstream`] is where a request is sent, and sent again: a connection failure, a timeout before
//! the response head, a 5xx or a 429 is retried under the request's retry policy ([`retry_policy`]:
//! `cf-aig-max-attempts`, `cf-aig-retry-delay`, `cf-aig-backoff`, else the gateway's
//! `[retries]`), waiting as the backoff says, or as `Retry-After` says when longer, up to 5 s.
//! Nothing has reached the client before the head is accepted, so a retry is always safe. The
//! [`Outgoing`] request is cloned only for an attempt that may be followed by another.
//!
//! Reads: the route, the client's headers and body, `cf-aig-request-timeout`. Writes: the meter's
//! upstream timestamps, usage filter and attempt count. Fails with 502 (unreachable, naming the provider, never a
//! key or the URL: a Google key can sit in the query) or 504 (no response head within the
//! timeout). Dropping the returned future or body (client gone) drops the upstream connection,
//! which cancels the upstream request.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;

use super::route::Route;
use super::Call;
use crate::client::{ClientError, HttpClient, UpstreamBody};
use crate::config::{Backoff, Gateway, RetrySettings, Secret};
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::headers::{
    CF_AIG_BACKOFF, CF_AIG_MAX_ATTEMPTS, CF_AIG_PREFIX, CF_AIG_REQUEST_TIMEOUT, CF_AIG_RETRY_DELAY, HOP_BY_HOP,
    LEGACY_CF_HEADERS,
};
use crate::meter::usage::{inject_include_usage, InjectedUsageFilter};
use crate::meter::Meter;
use crate::providers::{AuthStyle, Provider};
use crate::state::AppState;
use crate::translate::{Format, Translation};

/// Everything one attempt sends; another attempt clones it (the body is shared, not copied).
#[derive(Debug, Clone)]
pub struct Outgoing {
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Outgoing {
    fn into_request(self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Sends the request to the provider and returns its response head (the body streams after),
/// retrying under `retry`.
#[allow(clippy::too_many_arguments)]
pub async fn upstream(
    state: &AppState,
    route: &Route<'_>,
    (method, headers): (http::Method, HeaderMap),
    body: Bytes,
    translation: Option<&Translation>,
    retry: RetrySettings,
    timeout: Duration,
    meter: &mut Meter,
) -> Result<Response<UpstreamBody>, GatewayError> {
    let out = prepare(route, method, headers, body, translation, meter)?;
    meter.upstream_start = Some(Instant::now());
    let mut out = Some(out);
    // Attempts sent so far.
    let mut n: u32 = 0;
    let result = loop {
        let last = n + 1 >= retry.max_attempts;
        let this = match (last, &mut out) {
            (false, Some(o)) => o.clone(),
            (_, o) => match o.take() {
                Some(o) => o,
                None => break Err(GatewayError::Internal),
            },
        };
        n += 1;
        let result = attempt(&state.client, &route.provider, this, timeout).await;
        let again = if last { None } else { retryable(&result) };
        match again {
            Some(retry_after) => {
                state.metrics.record_retry(&route.gateway.name, &route.provider.name);
                drop(result);
                tokio::time::sleep(retry.wait(n).max(retry_after).min(RetrySettings::MAX_DELAY)).await;
            }
            None => {
                meter.upstream_head = Some(Instant::now());
                break result;
            }
        }
    };
    // Added, not set: a fallback chain sends through here once per step.
    meter.attempts += n;
    result
}

/// Whether an attempt's outcome is worth another attempt, and the wait its `Retry-After` asks.
fn retryable(result: &Result<Response<UpstreamBody>, GatewayError>) -> Option<Duration> {
    match result {
        Err(GatewayError::UpstreamUnreachable { .. } | GatewayError::UpstreamTimeout { .. }) => Some(Duration::ZERO),
        Ok(r) if r.status().is_server_error() || r.status() == http::StatusCode::TOO_MANY_REQUESTS => {
            let secs =
                r.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
            Some(secs.map_or(Duration::ZERO, Duration::from_secs))
        }
        _ => None,
    }
}

/// The request's retry policy: `cf-aig-max-attempts` (1-5), `cf-aig-retry-delay` (0-5000 ms) and
/// `cf-aig-backoff` over the gateway's `[retries]`; a bad value is a 400 naming the header.
pub fn retry_policy(headers: &HeaderMap, gateway: &Gateway) -> Result<RetrySettings, GatewayError> {
    let mut r = gateway.retries;
    let text = |name: &HeaderName| -> Result<Option<&str>, GatewayError> {
        headers
            .get(name)
            .map(|v| v.to_str().map(str::trim).map_err(|_| GatewayError::BadRequest(format!("{name} is not text"))))
            .transpose()
    };
    if let Some(v) = text(&CF_AIG_MAX_ATTEMPTS)? {
        r.max_attempts = v.parse().ok().filter(|n| (1..=RetrySettings::MAX_ATTEMPTS).contains(n)).ok_or_else(|| {
            GatewayError::BadRequest(format!("{CF_AIG_MAX_ATTEMPTS}: {v:?} is not a number from 1 to 5"))
        })?;
    }
    if let Some(v) = text(&CF_AIG_RETRY_DELAY)? {
        let ms: u64 = v.parse().ok().filter(|ms| *ms <= 5000).ok_or_else(|| {
            GatewayError::BadRequest(format!(
                "{CF_AIG_RETRY_DELAY}: {v:?} is not a number of milliseconds from 0 to 5000"
            ))
        })?;
        r.delay = Duration::from_millis(ms);
    }
    if let Some(v) = text(&CF_AIG_BACKOFF)? {
        r.backoff = match v {
            "constant" => Backoff::Constant,
            "linear" => Backoff::Linear,
            "exponential" => Backoff::Exponential,
            _ => {
                return Err(GatewayError::BadRequest(format!(
                    "{CF_AIG_BACKOFF}: {v:?} is not constant, linear or exponential"
                )))
            }
        };
    }
    Ok(r)
}

/// The request as it goes upstream (see the module docs).
fn prepare(
    route: &Route<'_>,
    method: http::Method,
    mut headers: HeaderMap,
    body: Bytes,
    translation: Option<&Translation>,
    meter: &mut Meter,
) -> Result<Outgoing, GatewayError> {
    let provider = &route.provider;
    strip_request_headers(&mut headers);
    // Answers are read as they pass (usage, the cache, stored bodies, translation): the provider
    // is asked for them uncompressed, whatever the client accepts. (`insert` replaces the
    // client's value; stripping it would take `strip`'s slower path of several removals.)
    headers.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let stored = route.gateway.provider_keys.get(&provider.name);
    if let Some(key) = stored {
        inject_key(&mut headers, provider, key)?;
    }
    if let Some(t) = translation {
        translated_headers(&mut headers, provider, t, body.len(), stored.is_some())?;
        if t.hides_usage() {
            meter.filter = Some(InjectedUsageFilter::new());
        }
    }
    let body = match usage_injection_for(provider, route.endpoint, &body) {
        Some(with_usage) => {
            meter.filter = Some(InjectedUsageFilter::new());
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(with_usage.len()));
            Bytes::from(with_usage)
        }
        None => body,
    };
    Ok(Outgoing { method, uri: route.upstream.clone(), headers, body })
}

/// One attempt: resolves when the upstream's response head arrives, or fails with 504 after
/// `timeout`.
async fn attempt(
    client: &HttpClient,
    provider: &Provider,
    out: Outgoing,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, GatewayError> {
    match tokio::time::timeout(timeout, client.request(out.into_request())).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            let reason = match e {
                ClientError::Connect(_) | ClientError::BadUri => "connection failed",
                ClientError::Send(_) => "the connection failed before a response arrived",
            };
            tracing::debug!(provider = %provider.name, error = %e, "upstream request failed");
            Err(GatewayError::UpstreamUnreachable { provider: provider.name.clone(), reason })
        }
        Err(_) => Err(GatewayError::UpstreamTimeout {
            provider: provider.name.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// `cf-aig-request-timeout` (ms) or the gateway default: how long to wait for the response head.
pub fn request_timeout(headers: &HeaderMap, gateway: &Gateway) -> Result<Duration, GatewayError> {
    match headers.get(CF_AIG_REQUEST_TIMEOUT) {
        None => Ok(gateway.request_timeout),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
            .ok_or_else(|| {
                GatewayError::BadRequest(
                    "invalid cf-aig-request-timeout: expected a positive number of milliseconds".into(),
                )
            }),
    }
}

/// The body to send with `include_usage` added, when aigate asks for streamed usage for this
/// call (the cache phase asks too: a stored stream then holds that event, hidden on replay).
pub fn usage_injection(call: &Call<'_>) -> Option<Vec<u8>> {
    usage_injection_for(&call.route.provider, call.route.endpoint, call.body)
}

fn usage_injection_for(provider: &Provider, endpoint: Endpoint, body: &[u8]) -> Option<Vec<u8>> {
    if !endpoint.accepts_stream_options() || !provider.accepts_stream_options() {
        return None;
    }
    // Cheap pre-check: only a body that mentions "stream" can be a streaming request.
    memchr::memmem::find(body, b"\"stream\"")?;
    inject_include_usage(body)
}

/// Removes what must not go upstream: hop-by-hop headers (and those `Connection` names), `Host`,
/// and the gateway's own headers. In place, after one pass over the names: most requests carry
/// none of these but `Host`, and removing each candidate by name would hash it against the map.
pub fn strip_request_headers(headers: &mut HeaderMap) {
    strip(headers, |k| {
        k == http::header::HOST
            || k.as_str().starts_with(CF_AIG_PREFIX)
            || LEGACY_CF_HEADERS.contains(&k.as_str())
            || HOP_BY_HOP.contains(k)
    });
}

/// Removes hop-by-hop headers from a response before it goes back to the client.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    strip(headers, |k| HOP_BY_HOP.contains(k));
}

/// Removes the names `doomed` selects, and those a `Connection` header lists.
fn strip(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let mut found = 0usize;
    let mut first = None;
    for k in headers.keys() {
        if doomed(k) {
            found += 1;
            first.get_or_insert_with(|| k.clone());
        }
    }
    if found == 0 {
        return;
    }
    if headers.contains_key(http::header::CONNECTION) {
        remove_connection_listed(headers);
    }
    if found == 1 {
        if let Some(k) = first {
            headers.remove(k);
        }
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|k| doomed(k)).cloned().collect();
    for k in names {
        headers.remove(k);
    }
}

fn remove_connection_listed(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(http::header::CONNECTION).and_then(|v| v.to_str().ok()).map(str::to_owned) {
        for name in conn.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                headers.remove(n);
            }
        }
    }
}

/// The headers of a request translated for `provider`: the client's key (sent as its SDK sends
/// it: `Authorization: Bearer`, `x-api-key`, `x-goog-api-key`) moves to the provider's own header
/// unless a stored key replaced it, the body's new length, and the API version Anthropic requires.
fn translated_headers(
    headers: &mut HeaderMap,
    provider: &Provider,
    t: &Translation,
    len: usize,
    stored: bool,
) -> Result<(), GatewayError> {
    if !stored {
        let key = AuthStyle::ALL.iter().find_map(|style| {
            let v = headers.get(style.header())?.to_str().ok()?;
            let k = if *style == AuthStyle::Bearer {
                v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))?
            } else {
                v
            };
            Some(Secret::new(k.trim()))
        });
        if let Some(key) = key {
            inject_key(headers, provider, &key)?;
        }
    }
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    if t.format == Format::Anthropic {
        if !headers.contains_key("anthropic-version") {
            headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        }
    } else {
        headers.remove("anthropic-version");
        headers.remove("anthropic-beta");
    }
    Ok(())
}

/// Replaces any client credential with the stored key, in the provider's auth style.
pub fn inject_key(headers: &mut HeaderMap, provider: &Provider, key: &Secret) -> Result<(), GatewayError> {
    for style in AuthStyle::ALL {
        headers.remove(style.header());
    }
    let mut v = HeaderValue::from_str(&provider.auth.value(key.expose())).map_err(|_| GatewayError::Internal)?;
    v.set_sensitive(true);
    headers.insert(provider.auth.header(), v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_and_injects() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("host", "gw".parse().unwrap());
        h.insert("cf-aig-authorization", "Bearer gwtoken".parse().unwrap());
        h.insert("cf-aig-metadata", "{}".parse().unwrap());
        h.insert("cf-skip-cache", "true".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("authorization", "Bearer client".parse().unwrap());
        h.insert("x-custom", "kept".parse().unwrap());
        strip_request_headers(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(h["x-custom"], "kept");
        let p = crate::providers::builtin().into_iter().find(|p| p.name == "anthropic").unwrap();
        inject_key(&mut h, &p, &Secret::new("sk-ant")).unwrap();
        assert!(h.get("authorization").is_none());
        assert_eq!(h["x-api-key"], "sk-ant");
    }
}
