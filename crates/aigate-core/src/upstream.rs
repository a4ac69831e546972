//! Stage 5, upstream: the pooled HTTP client (keep-alive, HTTP/1.1 and HTTP/2, rustls for HTTPS)
//! and the one function that sends a request to a provider.
//!
//! Reads: the route, the client's headers and body. Writes: the request that goes out, with
//! hop-by-hop headers, `Host` and every `cf-aig-*` header removed, and the stored provider key
//! injected (replacing any credential the client sent). Everything else passes unchanged.
//! Fails with 502 (unreachable, naming the provider, never a key or the URL: a Google key can sit
//! in the query) or 504 (no first byte within the timeout). Dropping the returned future or body
//! (client gone) drops the upstream connection, which cancels the upstream request.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Secret, UpstreamSettings};
use crate::error::GatewayError;
use crate::headers::{CF_AIG_PREFIX, HOP_BY_HOP, LEGACY_CF_HEADERS};
use crate::providers::{AuthStyle, Provider};

/// The pooled upstream client.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the upstream client: pooled, keep-alive, TCP_NODELAY, rustls (ring) with the webpki roots.
pub fn build_client(s: &UpstreamSettings) -> Result<HttpClient, rustls::Error> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(s.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        // LLM requests and answers are mostly small: one copy into one buffer and one write()
        // beats a vectored write of the head and body.
        .http1_writev(false)
        .pool_idle_timeout(s.pool_idle_timeout)
        .pool_max_idle_per_host(s.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Credential headers a client may send to a provider; all are replaced by a stored key.
const CREDENTIAL_HEADERS: &[AuthStyle] =
    &[AuthStyle::Bearer, AuthStyle::XApiKey, AuthStyle::ApiKey, AuthStyle::XGoogApiKey];

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

/// Replaces any client credential with the stored key, in the provider's auth style.
pub fn inject_key(headers: &mut HeaderMap, provider: &Provider, key: &Secret) -> Result<(), GatewayError> {
    for style in CREDENTIAL_HEADERS {
        headers.remove(style.header());
    }
    let mut v = HeaderValue::from_str(&provider.auth.value(key.expose())).map_err(|_| GatewayError::Internal)?;
    v.set_sensitive(true);
    headers.insert(provider.auth.header(), v);
    Ok(())
}

/// Sends the request; resolves when the upstream's response head arrives (first byte), or fails
/// with 504 after `timeout`.
pub async fn send(
    client: &HttpClient,
    provider: &Provider,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            let reason =
                if e.is_connect() { "connection failed" } else { "the connection failed before a response arrived" };
            tracing::debug!(provider = %provider.name, error = %ErrorChain(&e), "upstream request failed");
            Err(GatewayError::UpstreamUnreachable { provider: provider.name.clone(), reason })
        }
        Err(_) => Err(GatewayError::UpstreamTimeout {
            provider: provider.name.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// Builds the outgoing request from the client's parts.
pub fn build_request(method: http::Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}

/// Displays an error with its sources, without URLs (the hyper-util error does not include them).
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
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
