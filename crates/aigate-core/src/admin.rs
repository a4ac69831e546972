//! The admin API under `/admin/`, for operators rather than applications.
//!
//! Off unless `[admin] token` is configured (404); every call needs `Authorization: Bearer <token>`
//! (401 otherwise, compared in constant time). Endpoints:
//! - `DELETE /admin/gateways/{id}/cache`: purge a gateway's cache; `?key=<aigate-cache-key>` purges
//!   one entry, `?cache_key=<cf-aig-cache-key value>` the entry stored under a custom key.
//!   Answers `{"purged": n}`.
//! - `GET /admin/gateways/{id}/logs?filters`: a page of records, newest first, without bodies
//!   (`{"records": [...], "next_cursor": ...}`); `DELETE` with the same filters deletes
//!   (`{"deleted": n}`). Filters: `from`, `to` (Unix ms or RFC 3339), `status`, `success`,
//!   `cached`, `provider`, `model`, `min_cost`, `max_cost`, `min_tokens`, `max_tokens`,
//!   `min_duration_ms`, `max_duration_ms`, `event_id`, `metadata.KEY=VALUE` (VALUE a JSON literal
//!   or else a string), `limit`, `cursor`.
//! - `GET /admin/gateways/{id}/logs/{log_id}`: one record with its bodies (base64);
//!   `PATCH` with `{"feedback": 1 | -1, "score": n}` annotates it.
//! - `GET /admin/gateways/{id}/analytics?from=&to=&granularity=minute|hour|day&group_by=model|provider|metadata.KEY`:
//!   time buckets of requests, errors, hits, tokens, cost, savings and latency percentiles (default:
//!   the last 24 hours by hour; `since=7d` instead of `from`).
//! - `GET /admin/gateways/{id}/report?since=7d&min_hit_rate=&max_error_rate=&max_p95_ms=&min_requests=`:
//!   the rollout report with its go / no-go verdict (thresholds from the query, else the gateway's
//!   `[report]` section).
//! - `GET /admin/tail?gateway=G&errors=true`: a live stream of records as JSON lines (what
//!   `aigate tail` reads); a line `{"lagged": n}` says n records were skipped for a slow reader.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc};

use crate::body::GatewayBody;
use crate::cache::key;
use crate::error::error_response;
use crate::proxy::AppState;
use aigate_store::{AnalyticsQuery, CacheKey, Granularity, GroupBy, LogFilter, LogRecord, MetaValue};

use crate::report::{Report, Thresholds};

/// Largest admin request body (a PATCH document).
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Interval of the empty keep-alive lines of a live tail (they also reveal a gone client).
const TAIL_HEARTBEAT: Duration = Duration::from_secs(10);

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
        (&Method::GET, ["admin", "tail"]) => tail(state, req.uri().query().unwrap_or("")),
        (&Method::GET, ["admin", "gateways", gw, what @ ("analytics" | "report")]) => {
            let Some(gateway) = settings.gateways.get(*gw) else { return gateway_not_found(gw) };
            let now = state.clock.now_ms();
            let (q, thresholds) = match parse_analytics_query(req.uri().query().unwrap_or(""), now) {
                Ok(v) => v,
                Err(e) => return bad_request(&e),
            };
            if *what == "analytics" {
                return store_result(state.logs.store.analytics(gw, &q).await, serde_json::to_value);
            }
            let totals_only = AnalyticsQuery { granularity: Granularity::Hour, group_by: GroupBy::None, ..q };
            store_result(state.logs.store.analytics(gw, &totals_only).await, |a| {
                let t = gateway.report.overridden_by(thresholds);
                serde_json::to_value(Report::build(gw, q.from_ms, q.to_ms, gateway.cache.mode, &a.totals, t))
            })
        }
        (m, ["admin", "gateways", gw, "logs", rest @ ..]) if rest.len() <= 1 => {
            if !settings.gateways.contains_key(*gw) {
                return gateway_not_found(gw);
            }
            let gw = gw.to_string();
            let id = rest.first().map(|s| s.to_string());
            let query = req.uri().query().unwrap_or("").to_owned();
            match (m.clone(), id) {
                (Method::GET, None) => match parse_filter(&query) {
                    Ok(f) => store_result(state.logs.store.list(&gw, &f).await, serde_json::to_value),
                    Err(e) => bad_request(&e),
                },
                (Method::DELETE, None) => match parse_filter(&query) {
                    Ok(f) => store_result(state.logs.store.delete(&gw, &f).await, |n| {
                        Ok(serde_json::json!({ "deleted": n, "gateway": gw }))
                    }),
                    Err(e) => bad_request(&e),
                },
                (Method::GET, Some(id)) => match state.logs.store.get(&gw, &id).await {
                    Ok(Some(r)) => json(StatusCode::OK, serde_json::to_value(r).unwrap_or_default()),
                    Ok(None) => log_not_found(&id),
                    Err(e) => store_error(&e),
                },
                (Method::PATCH, Some(id)) => {
                    #[derive(serde::Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Patch {
                        feedback: Option<i8>,
                        score: Option<f64>,
                    }
                    let body = match http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY).collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => return bad_request("the body could not be read or is larger than 64 KiB"),
                    };
                    let patch: Patch = match serde_json::from_slice(&body) {
                        Ok(p) => p,
                        Err(e) => return bad_request(&format!("expected {{\"feedback\": 1 | -1, \"score\": n}}: {e}")),
                    };
                    if patch.feedback.is_some_and(|f| f != 1 && f != -1) {
                        return bad_request("feedback must be 1 or -1");
                    }
                    if patch.score.is_some_and(|s| !s.is_finite()) {
                        return bad_request("score must be a finite number");
                    }
                    match state.logs.store.patch(&gw, &id, patch.feedback, patch.score).await {
                        Ok(true) => json(StatusCode::OK, serde_json::json!({ "id": id, "updated": true })),
                        Ok(false) => log_not_found(&id),
                        Err(e) => store_error(&e),
                    }
                }
                _ => error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed on this admin endpoint",
                    "invalid_request_error",
                    "method_not_allowed",
                ),
            }
        }
        _ => error_response(StatusCode::NOT_FOUND, "no such admin endpoint", "invalid_request_error", "not_found"),
    }
}

fn gateway_not_found(gw: &str) -> Response<GatewayBody> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("gateway {gw:?} not found"),
        "invalid_request_error",
        "gateway_not_found",
    )
}

fn log_not_found(id: &str) -> Response<GatewayBody> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("log record {id:?} not found"),
        "invalid_request_error",
        "log_not_found",
    )
}

fn bad_request(msg: &str) -> Response<GatewayBody> {
    error_response(StatusCode::BAD_REQUEST, msg, "invalid_request_error", "bad_request")
}

fn store_error(e: &aigate_store::StoreError) -> Response<GatewayBody> {
    error_response(StatusCode::SERVICE_UNAVAILABLE, &format!("log store error: {e}"), "api_error", "store_unavailable")
}

fn store_result<T>(
    r: Result<T, aigate_store::StoreError>,
    to_json: impl FnOnce(T) -> Result<serde_json::Value, serde_json::Error>,
) -> Response<GatewayBody> {
    match r {
        Ok(v) => match to_json(v) {
            Ok(v) => json(StatusCode::OK, v),
            Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), "api_error", "internal"),
        },
        // Invalid filters (a bad cursor) come back from the store as errors too.
        Err(aigate_store::StoreError::InvalidInput(m)) => bad_request(&m),
        Err(e) => store_error(&e),
    }
}

/// Unix ms from `1700000000000` or an RFC 3339 time.
pub fn parse_time_ms(v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.trim().parse::<u64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(v.trim())
        .map_err(|_| format!("invalid time {v:?}: expected Unix milliseconds or RFC 3339"))?;
    let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("time {v:?} is before 1970"))?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Parses the log filters of a query string.
pub fn parse_filter(query: &str) -> Result<LogFilter, String> {
    let mut f = LogFilter::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let num = |name: &str| v.trim().parse::<f64>().map_err(|_| format!("{name}: {v:?} is not a number"));
        let int = |name: &str| v.trim().parse::<u64>().map_err(|_| format!("{name}: {v:?} is not a whole number"));
        let boolean = |name: &str| match v.as_ref() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(format!("{name}: {v:?} is not true or false")),
        };
        match k.as_ref() {
            "from" => f.from_ms = Some(parse_time_ms(&v)?),
            "to" => f.to_ms = Some(parse_time_ms(&v)?),
            "status" => f.status = Some(v.trim().parse().map_err(|_| format!("status: {v:?} is not a status code"))?),
            "success" => f.success = Some(boolean("success")?),
            "cached" => f.cached = Some(boolean("cached")?),
            "provider" => f.provider = Some(v.into_owned()),
            "model" => f.model = Some(v.into_owned()),
            "min_cost" => f.min_cost_usd = Some(num("min_cost")?),
            "max_cost" => f.max_cost_usd = Some(num("max_cost")?),
            "min_tokens" => f.min_tokens = Some(int("min_tokens")?),
            "max_tokens" => f.max_tokens = Some(int("max_tokens")?),
            "min_duration_ms" => f.min_duration_ms = Some(num("min_duration_ms")?),
            "max_duration_ms" => f.max_duration_ms = Some(num("max_duration_ms")?),
            "event_id" => f.event_id = Some(v.into_owned()),
            "limit" => f.limit = Some(u32::try_from(int("limit")?).unwrap_or(u32::MAX)),
            "cursor" => f.cursor = Some(v.into_owned()),
            key => match key.strip_prefix("metadata.") {
                Some(mk) if !mk.is_empty() => {
                    let value = serde_json::from_str::<serde_json::Value>(&v)
                        .ok()
                        .and_then(|j| MetaValue::from_json(&j))
                        .unwrap_or_else(|| MetaValue::String(v.clone().into_owned()));
                    f.metadata = Some((mk.to_owned(), value));
                }
                _ => return Err(format!("unknown filter {key:?}")),
            },
        }
    }
    f.validate()?;
    Ok(f)
}

/// The query of the analytics and report endpoints, and the report thresholds it sets.
pub fn parse_analytics_query(query: &str, now_ms: u64) -> Result<(AnalyticsQuery, Thresholds), String> {
    let mut from = None;
    let mut to = None;
    let mut since = None;
    let mut granularity = Granularity::Hour;
    let mut group_by = GroupBy::None;
    let mut t = Thresholds::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let num = |name: &str| v.trim().parse::<f64>().map_err(|_| format!("{name}: {v:?} is not a number"));
        match k.as_ref() {
            "from" => from = Some(parse_time_ms(&v)?),
            "to" => to = Some(parse_time_ms(&v)?),
            "since" => {
                let d = humantime::parse_duration(v.trim())
                    .map_err(|_| format!("since: {v:?} is not a duration like \"7d\" or \"24h\""))?;
                since = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            }
            "granularity" => granularity = v.parse().map_err(|e| format!("granularity: {e}"))?,
            "group_by" => group_by = v.parse().map_err(|e| format!("group_by: {e}"))?,
            "min_hit_rate" => t.min_hit_rate = Some(num("min_hit_rate")?),
            "max_error_rate" => t.max_error_rate = Some(num("max_error_rate")?),
            "max_p95_ms" => t.max_p95_ms = Some(num("max_p95_ms")?),
            "min_requests" => {
                t.min_requests =
                    Some(v.trim().parse().map_err(|_| format!("min_requests: {v:?} is not a whole number"))?)
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    let to_ms = to.unwrap_or(now_ms);
    let from_ms = match (from, since) {
        (Some(_), Some(_)) => return Err("give from or since, not both".into()),
        (Some(f), None) => f,
        (None, Some(s)) => to_ms.saturating_sub(s),
        (None, None) => to_ms.saturating_sub(86_400_000),
    };
    let q = AnalyticsQuery { from_ms, to_ms, granularity, group_by };
    q.validate()?;
    Ok((q, t))
}

/// `GET /admin/tail`: records as JSON lines while the client stays.
fn tail(state: &AppState, query: &str) -> Response<GatewayBody> {
    let mut gateway: Option<String> = None;
    let mut errors_only = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "gateway" => gateway = Some(v.into_owned()),
            "errors" => errors_only = v == "true" || v == "1",
            _ => {}
        }
    }
    if let Some(g) = &gateway {
        if !state.settings.load().gateways.contains_key(g) {
            return gateway_not_found(g);
        }
    }
    let mut rx = state.logs.subscribe();
    let mut stopping = state.stopping.subscribe();
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(TAIL_HEARTBEAT);
        heartbeat.tick().await;
        loop {
            let line = tokio::select! {
                r = rx.recv() => match r {
                    Ok(rec) => {
                        if gateway.as_deref().is_some_and(|g| g != rec.gateway) || (errors_only && rec.success) {
                            continue;
                        }
                        tail_line(&rec)
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => Bytes::from(format!("{{\"lagged\":{n}}}\n")),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = heartbeat.tick() => Bytes::from_static(b"\n"),
                _ = stopping.changed() => break,
                _ = tx.closed() => break,
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(GatewayBody::Channel(body_rx));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    r
}

fn tail_line(r: &Arc<LogRecord>) -> Bytes {
    let mut v = serde_json::to_vec(r.as_ref()).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
