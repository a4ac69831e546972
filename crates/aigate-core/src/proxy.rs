//! The request path, stage by stage, in order:
//!
//! ```text
//! client ─▶ routing ─▶ auth ─▶ body limit ─▶ upstream ─▶ stream back ─▶ client
//!           (404/400)  (401)   (413)          (502/504)   (relayed as it arrives)
//! ```
//!
//! Every response from a gateway route carries `cf-aig-log-id` (a UUIDv7) and echoes a client's
//! `cf-aig-event-id`. This module only orders the stages; each stage lives in its own module and
//! documents what it reads, writes and how it fails. Nothing here blocks, logs per request at info
//! level, or re-serialises a body: bodies travel as `Bytes`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::GatewayBody;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::headers::{CF_AIG_EVENT_ID, CF_AIG_LOG_ID, CF_AIG_REQUEST_TIMEOUT};
use crate::upstream::HttpClient;
use crate::{auth, routing, upstream};

/// What every request handler shares: the current settings (swappable for reload), the upstream
/// client and the readiness flag.
pub struct AppState {
    /// Current settings; replaced atomically on reload.
    pub settings: ArcSwap<Settings>,
    /// Pooled upstream client.
    pub client: HttpClient,
    /// False once shutdown has begun (`/readyz` answers 503).
    pub ready: AtomicBool,
}

impl AppState {
    /// Builds the state from validated settings.
    pub fn new(settings: Settings) -> Result<Arc<AppState>, rustls::Error> {
        let client = upstream::build_client(&settings.upstream)?;
        Ok(Arc::new(AppState { settings: ArcSwap::from_pointee(settings), client, ready: AtomicBool::new(true) }))
    }
}

/// Entry point for every HTTP request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<GatewayBody>, Infallible> {
    match req.uri().path() {
        "/healthz" => return Ok(plain(StatusCode::OK, "ok")),
        "/readyz" => {
            return Ok(if state.ready.load(Ordering::Relaxed) {
                plain(StatusCode::OK, "ready")
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            })
        }
        _ => {}
    }
    let log_id = uuid::Uuid::now_v7();
    let event_id = req.headers().get(CF_AIG_EVENT_ID).cloned();
    let mut resp = match proxy(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let h = resp.headers_mut();
    let mut buf = uuid::Uuid::encode_buffer();
    if let Ok(v) = HeaderValue::from_str(log_id.hyphenated().encode_lower(&mut buf)) {
        h.insert(CF_AIG_LOG_ID, v);
    }
    if let Some(ev) = event_id {
        h.insert(CF_AIG_EVENT_ID, ev);
    }
    Ok(resp)
}

async fn proxy(state: &AppState, req: Request<Incoming>) -> Result<Response<GatewayBody>, GatewayError> {
    let settings = state.settings.load();
    let (mut parts, body) = req.into_parts();

    // Stage 1: routing.
    let route = routing::resolve(&settings, parts.uri.path())?;
    // Stage 2: gateway authentication.
    auth::check(&route.gateway, &parts.headers)?;

    let timeout = request_timeout(&parts.headers, route.gateway.request_timeout)?;
    let uri = route
        .provider
        .upstream_uri(route.account_id, route.rest, parts.uri.query())
        .map_err(|e| GatewayError::BadRequest(format!("invalid provider path: {e}")))?;
    let provider = route.provider.clone();
    let stored_key = route.gateway.provider_keys.get(&provider.name).cloned();

    // Stage 3: request body, bounded.
    let body = read_body(body, settings.max_request_body).await?;

    // Stage 5: upstream.
    upstream::strip_request_headers(&mut parts.headers);
    if let Some(key) = &stored_key {
        upstream::inject_key(&mut parts.headers, &provider, key)?;
    }
    let out = upstream::build_request(parts.method, uri, parts.headers, body);
    let resp = upstream::send(&state.client, &provider, out, timeout).await?;

    // Stage 6: stream back, unchanged but for hop-by-hop headers.
    let (mut rparts, rbody) = resp.into_parts();
    upstream::strip_response_headers(&mut rparts.headers);
    rparts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(rparts, GatewayBody::Upstream(rbody)))
}

/// `cf-aig-request-timeout` (ms) or the gateway default.
fn request_timeout(headers: &http::HeaderMap, default: Duration) -> Result<Duration, GatewayError> {
    match headers.get(CF_AIG_REQUEST_TIMEOUT) {
        None => Ok(default),
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

/// Reads the whole request body, refusing more than `limit` bytes with 413 (early, from
/// `Content-Length`, when the client declares it).
async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, GatewayError> {
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

fn plain(status: StatusCode, text: &'static str) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
