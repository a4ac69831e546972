//! The HTTP service: every request the server accepts comes here. aigate's own routes (health,
//! readiness, metrics, the admin API) are answered directly; every other request is a gateway
//! request and runs through the phases ([`crate::phases`]).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::GatewayBody;
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
        p if p.starts_with("/admin/") => {
            return Ok(crate::admin::handle(&state, req).await.map(ResponseBody::plain));
        }
        _ => {}
    }
    let mut ex = Exchange::begin(&state, req.headers());
    let result = crate::phases::run(&state, req, &mut ex).await;
    Ok(finish(&state, ex, result))
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(GatewayBody::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.map(ResponseBody::plain)
}
