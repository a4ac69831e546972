//! The HTTP service: every request the server accepts comes here. aigate's own routes (the index
//! at `/`, health, readiness, metrics, the admin API, and the web console at `/dashboard`) are
//! answered directly; a WebSocket upgrade is refused with 501 (not supported yet);
//! every other request is a gateway request and runs through the phases ([`crate::phases`]).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::GatewayBody;
use crate::error::GatewayError;
use crate::meter::ResponseBody;
use crate::phases::respond::{finish, Exchange};
use crate::state::AppState;

/// Entry point for every HTTP request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    match req.uri().path() {
        "/healthz" => return Ok(plain(StatusCode::OK, "ok")),
        "/readyz" => {
            return Ok(if state.ready.load(Ordering::Relaxed) {
                plain(StatusCode::OK, "ready")
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            });
        }
        "/metrics" => {
            let mut r = Response::new(GatewayBody::full(state.metrics.encode()));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return Ok(r.map(ResponseBody::plain));
        }
        "/" => return Ok(index(&state).map(ResponseBody::plain)),
        p if p.starts_with("/admin/") => {
            return Ok(crate::admin::handle(&state, req).await.map(ResponseBody::plain));
        }
        p if p == "/dashboard" || p.starts_with("/dashboard/") => {
            return Ok(crate::dashboard::handle(&state, req).await.map(ResponseBody::plain));
        }
        _ => {}
    }
    if is_websocket_upgrade(req.headers()) {
        let mut r = GatewayError::WebSocketUnsupported.into_response();
        // The client asked for another protocol on this connection: end it after the answer.
        r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(r.map(ResponseBody::plain));
    }
    let mut ex = Exchange::begin(&state, req.headers());
    let result = crate::phases::run(&state, req, &mut ex).await;
    Ok(finish(&state, ex, result))
}

/// `GET /`: what this server is, its gateways and where to look next.
fn index(state: &AppState) -> Response<GatewayBody> {
    let settings = state.settings.load();
    let mut gateways: Vec<&str> = settings.gateways.keys().map(String::as_str).collect();
    gateways.sort_unstable();
    let body = serde_json::json!({
        "name": "aigate",
        "version": env!("CARGO_PKG_VERSION"),
        "default_gateway": &*settings.default_gateway,
        "gateways": gateways,
        "links": {
            "health": "/healthz",
            "readiness": "/readyz",
            "metrics": "/metrics",
            "admin_api": "/admin/",
            "dashboard": "/dashboard",
            "openai_base_url": "/v1",
            "docs": concat!(env!("CARGO_PKG_REPOSITORY"), "#readme"),
        },
    });
    let mut r = Response::new(GatewayBody::full(body.to_string()));
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A request asking to switch the connection to the WebSocket protocol.
fn is_websocket_upgrade(h: &http::HeaderMap) -> bool {
    h.get(http::header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(GatewayBody::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.map(ResponseBody::plain)
}
