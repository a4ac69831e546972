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
//!   `min_duration_ms`, `max_duration_ms`, `event_id`, `route` (a dynamic route's `NAME`, any
//!   version, or `NAME@VERSION`), `step` (the fallback step that answered), `metadata.KEY=VALUE`
//!   (VALUE a JSON literal or else a string), `limit`, `cursor`.
//! - `GET /admin/gateways/{id}/logs/{log_id}`: one record with its bodies (base64);
//!   `PATCH` with `{"feedback": 1 | -1, "score": n}` annotates it.
//! - `GET /admin/gateways/{id}/analytics?from=&to=&granularity=minute|hour|day&group_by=model|provider|metadata.KEY`:
//!   time buckets of requests, errors, hits, tokens, cost, savings and latency percentiles (default:
//!   the last 24 hours by hour; `since=7d` instead of `from`).
//! - `GET /admin/gateways/{id}/report?since=7d&min_hit_rate=&max_error_rate=&max_p95_ms=&min_requests=`:
//!   the rollout report with its go / no-go verdict (thresholds from the query, else the gateway's
//!   `[report]` section). With `compare=G` (gateway G over the same window) or
//!   `baseline_from=&baseline_to=` (this gateway over an earlier window; `baseline_to` defaults to
//!   the window's start), the comparison of the candidate with this gateway as baseline instead,
//!   margins `max_error_rate_increase` (default 0.01) and `max_p95_increase` (default 0.2).
//! - `GET /admin/tail?gateway=G&errors=true`: a live stream of records as JSON lines (what
//!   `aigate tail` reads); a line `{"lagged": n}` says n records were skipped for a slow reader.

mod query;
mod tail;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::body::GatewayBody;
use crate::cache::key;
use crate::config::{CacheScope, Gateway, Settings};
use crate::error::GatewayError;
use crate::report::{self, Comparison, Report};
use crate::state::AppState;
use aigate_store::CacheKey;
pub use query::{parse_analytics_query, parse_filter, parse_report_query, parse_time_ms, ReportQuery};

/// Largest admin request body (a PATCH document).
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Handles one admin request.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<GatewayBody> {
    serve(state, req).await.unwrap_or_else(GatewayError::into_response)
}

async fn serve(state: &AppState, req: Request<Incoming>) -> Result<Response<GatewayBody>, GatewayError> {
    let settings = state.settings.load_full();
    let token = settings.admin_token.as_ref().ok_or(GatewayError::AdminDisabled)?;
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(token.expose().as_bytes().ct_eq(presented.as_bytes())) {
        return Err(GatewayError::AdminUnauthorized);
    }
    let path = req.uri().path().trim_start_matches("/admin").to_owned();
    route(state, req, &path).await
}

/// Answers an authorised admin request; `path` is the part after `/admin` (`/gateways/G/logs`).
/// The dashboard's data API calls this too, after its own session check.
pub(crate) async fn route(
    state: &AppState,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<GatewayBody>, GatewayError> {
    let settings = state.settings.load_full();
    let path = path.trim_end_matches('/');
    let query = req.uri().query().unwrap_or("").to_owned();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segs.as_slice() {
        ["tail"] if method == Method::GET => tail::tail(state, &query),
        ["gateways", gw, rest @ ..] => {
            let gateway = settings.gateways.get(*gw).ok_or_else(|| GatewayError::UnknownGateway {
                gateway: gw.to_string(),
                known: crate::phases::route::known_gateways(&settings),
            })?;
            match (&method, rest) {
                (&Method::DELETE, ["cache"]) => purge(state, gateway, &query).await,
                (&Method::GET, ["analytics"]) => {
                    let (q, _) =
                        parse_analytics_query(&query, state.clock.now_ms()).map_err(GatewayError::BadRequest)?;
                    json(&state.logs.store.analytics(gw, &q).await.map_err(log_store)?)
                }
                (&Method::GET, ["report"]) => report(state, &settings, gateway, &query).await,
                (&Method::GET, ["logs"]) => json(
                    &state
                        .logs
                        .store
                        .list(gw, &parse_filter(&query).map_err(GatewayError::BadRequest)?)
                        .await
                        .map_err(log_store)?,
                ),
                (&Method::DELETE, ["logs"]) => {
                    let n = state
                        .logs
                        .store
                        .delete(gw, &parse_filter(&query).map_err(GatewayError::BadRequest)?)
                        .await
                        .map_err(log_store)?;
                    json(&serde_json::json!({ "deleted": n, "gateway": gw }))
                }
                (&Method::GET, ["logs", id]) => match state.logs.store.get(gw, id).await.map_err(log_store)? {
                    Some(r) => json(&r),
                    None => Err(GatewayError::LogNotFound { id: id.to_string() }),
                },
                (&Method::PATCH, ["logs", id]) => {
                    let id = id.to_string();
                    patch(state, gw, &id, req).await
                }
                (_, ["cache" | "analytics" | "report" | "logs"] | ["logs", _]) => Err(GatewayError::MethodNotAllowed),
                _ => Err(GatewayError::NotFound("no such admin endpoint".into())),
            }
        }
        _ => Err(GatewayError::NotFound("no such admin endpoint".into())),
    }
}

/// `DELETE /admin/gateways/{id}/cache`: everything, one entry by digest (`key`), or the entry of
/// a custom key (`cache_key`; only where the key is shared by every credential, `scope =
/// "gateway"`: otherwise each credential has its own entry, purged by its digest).
async fn purge(state: &AppState, gateway: &Gateway, query: &str) -> Result<Response<GatewayBody>, GatewayError> {
    let gw = &*gateway.name;
    let mut one: Option<CacheKey> = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "key" => {
                one = Some(CacheKey::from_hex(&v).ok_or_else(|| {
                    GatewayError::BadRequest(
                        "key must be the 64-character hex digest from the aigate-cache-key header".into(),
                    )
                })?)
            }
            "cache_key" if gateway.cache.scope == CacheScope::Gateway => one = Some(key::custom(gw, &v, &[])),
            "cache_key" => {
                return Err(GatewayError::BadRequest(format!(
                    "gateway {gw:?} keeps a custom cache key per credential (cache scope = \"credential\"): \
                     purge its entry by the digest of its aigate-cache-key response header (key=...), or the whole gateway"
                )))
            }
            _ => {}
        }
    }
    let n = state.cache.purge(gw, one.as_ref()).await.map_err(|e| GatewayError::store("cache store", e))?;
    json(&serde_json::json!({ "purged": n, "gateway": gw }))
}

/// `GET /admin/gateways/{id}/report`: the gateway's report, or its comparison with `compare`'s
/// gateway over the same window or with itself over the baseline window. Thresholds come from the
/// query, else the path gateway's `[report]` section (the one the candidate is to replace).
async fn report(
    state: &AppState,
    settings: &Settings,
    gateway: &Gateway,
    query: &str,
) -> Result<Response<GatewayBody>, GatewayError> {
    let now = state.clock.now_ms();
    let q = parse_report_query(query, now).map_err(GatewayError::BadRequest)?;
    let thresholds = gateway.report.overridden_by(q.thresholds);
    let totals = async |gw: &str, from_ms: u64, to_ms: u64| {
        let a = state.logs.store.analytics(gw, &report::totals_query(from_ms, to_ms, now)).await.map_err(log_store)?;
        Ok::<_, GatewayError>(a.totals)
    };
    let (from_ms, to_ms) = (q.window.from_ms, q.window.to_ms);
    if !q.is_comparison() {
        let t = totals(&gateway.name, from_ms, to_ms).await?;
        return json(&Report::build(&gateway.name, from_ms, to_ms, gateway.cache.mode, &t, thresholds));
    }
    let candidate = match &q.compare {
        Some(name) => settings.gateways.get(name.as_str()).ok_or_else(|| GatewayError::UnknownGateway {
            gateway: name.clone(),
            known: crate::phases::route::known_gateways(settings),
        })?,
        None => gateway,
    };
    let (base_from, base_to) = q.baseline.unwrap_or((from_ms, to_ms));
    let (b, c) = (totals(&gateway.name, base_from, base_to).await?, totals(&candidate.name, from_ms, to_ms).await?);
    let baseline = report::Window {
        gateway: &gateway.name,
        from_ms: base_from,
        to_ms: base_to,
        mode: gateway.cache.mode,
        stats: &b,
    };
    let candidate = report::Window { gateway: &candidate.name, from_ms, to_ms, mode: candidate.cache.mode, stats: &c };
    json(&Comparison::build(baseline, candidate, thresholds, q.margins))
}

/// `PATCH /admin/gateways/{id}/logs/{log_id}`: feedback and score on a record.
async fn patch(
    state: &AppState,
    gw: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<GatewayBody>, GatewayError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        feedback: Option<i8>,
        score: Option<f64>,
    }
    let body = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| GatewayError::BadRequest("the body could not be read or is larger than 64 KiB".into()))?
        .to_bytes();
    let patch: Patch = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::BadRequest(format!("expected {{\"feedback\": 1 | -1, \"score\": n}}: {e}")))?;
    if patch.feedback.is_some_and(|f| f != 1 && f != -1) {
        return Err(GatewayError::BadRequest("feedback must be 1 or -1".into()));
    }
    if patch.score.is_some_and(|s| !s.is_finite()) {
        return Err(GatewayError::BadRequest("score must be a finite number".into()));
    }
    if state.logs.store.patch(gw, id, patch.feedback, patch.score).await.map_err(log_store)? {
        json(&serde_json::json!({ "id": id, "updated": true }))
    } else {
        Err(GatewayError::LogNotFound { id: id.to_owned() })
    }
}

pub(crate) fn log_store(e: aigate_store::StoreError) -> GatewayError {
    GatewayError::store("log store", e)
}

/// A 200 with `v` as JSON.
pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<Response<GatewayBody>, GatewayError> {
    let body = serde_json::to_vec(v).map_err(|_| GatewayError::Internal)?;
    let mut r = Response::new(GatewayBody::full(Bytes::from(body)));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(r)
}
