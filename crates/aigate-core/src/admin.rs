//! The admin API under `/admin/`, for operators rather than applications.
//!
//! Off unless `[admin] token` is configured (404); every call needs `Authorization: Bearer <token>`
//! (401 otherwise, compared in constant time). Endpoints:
//! - `DELETE /admin/gateways/{id}/cache`: purge a gateway's cache; `?key=<aigate-cache-key>` purges
//!   one entry, `?cache_key=<cf-aig-cache-key value>` the entry stored under a custom key.
//!   Answers `{"purged": n}`.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::body::GatewayBody;
use crate::cache::key;
use crate::error::error_response;
use crate::proxy::AppState;
use aigate_store::CacheKey;

/// Handles one admin request.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<GatewayBody> {
    let settings = state.settings.load();
    let Some(token) = &settings.admin_token else {
        return error_response(
            StatusCode::NOT_FOUND,
            "the admin API is disabled: set [admin] token in the configuration",
            "invalid_request_error",
            "admin_disabled",
        );
    };
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(token.expose().as_bytes().ct_eq(presented.as_bytes())) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "admin endpoints need Authorization: Bearer <admin token>",
            "authentication_error",
            "admin_unauthorized",
        );
    }
    let path = req.uri().path().trim_end_matches('/');
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method(), segs.as_slice()) {
        (&Method::DELETE, ["admin", "gateways", gw, "cache"]) => {
            if !settings.gateways.contains_key(*gw) {
                return error_response(
                    StatusCode::NOT_FOUND,
                    &format!("gateway {gw:?} not found"),
                    "invalid_request_error",
                    "gateway_not_found",
                );
            }
            let mut one: Option<CacheKey> = None;
            for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
                match k.as_ref() {
                    "key" => match CacheKey::from_hex(&v) {
                        Some(k) => one = Some(k),
                        None => {
                            return error_response(
                                StatusCode::BAD_REQUEST,
                                "key must be the 64-character hex digest from the aigate-cache-key header",
                                "invalid_request_error",
                                "bad_request",
                            )
                        }
                    },
                    "cache_key" => one = Some(key::custom(gw, &v)),
                    _ => {}
                }
            }
            match state.cache.purge(gw, one.as_ref()).await {
                Ok(n) => json(StatusCode::OK, serde_json::json!({ "purged": n, "gateway": gw })),
                Err(e) => error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cache store error: {e}"),
                    "api_error",
                    "store_unavailable",
                ),
            }
        }
        _ => error_response(StatusCode::NOT_FOUND, "no such admin endpoint", "invalid_request_error", "not_found"),
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
