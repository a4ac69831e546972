//! The admin API under `/admin/`, for operators rather than applications.
//!
//! Off unless `[admin] token` is configured (404); every call needs `Authorization: Bearer <token>`
//! (401 otherwise, compared in constant time). Endpoints:
//! - `DELETE /admin/gateways/{id}/cache`: purge a gateway's cache; `?key=<aigate-cache-key>` purges
//!   one entry, `?cache_key=<cf-aig-cache-key value>` the entry stored under a custom key.
//!   Answers `{"purged": n}`. With `model=`, `endpoint=` (`chat`, `embeddings`, …), `metadata.KEY=`
//!   and `older_than=` (a duration: `1h`, `7d`), only the entries stored by requests that match
//!   every one of them, on every replica.
//! - `GET /admin/gateways/{id}/cache/top?since=24h&limit=50`: the entries most hit among those
//!   looked up or stored in the window, with totals (this process's cache index, never the store).
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
use aigate_store::{CacheKey, CacheStore as _};
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
                (&Method::GET, ["cache", "top"]) => cache_top(state, gateway, &query),
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
                (_, ["cache" | "analytics" | "report" | "logs"] | ["logs", _] | ["cache", "top"]) => {
                    Err(GatewayError::MethodNotAllowed)
                }
                _ => Err(GatewayError::NotFound("no such admin endpoint".into())),
            }
        }
        _ => Err(GatewayError::NotFound("no such admin endpoint".into())),
    }
}

/// `DELETE /admin/gateways/{id}/cache`: everything, one entry by digest (`key`), the entry of
/// a custom key (`cache_key`; only where the key is shared by every credential, `scope =
/// "gateway"`: otherwise each credential has its own entry, purged by its digest), or the entries a
/// filter matches (`model`, `endpoint`, `metadata.KEY`, `older_than`).
async fn purge(state: &AppState, gateway: &Gateway, query: &str) -> Result<Response<GatewayBody>, GatewayError> {
    let gw = &*gateway.name;
    let mut one: Option<CacheKey> = None;
    let mut filter = aigate_store::CacheFilter::default();
    let mut filtered = false;
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
            "model" => filter.model = Some(v.into_owned()),
            "endpoint" => {
                if crate::endpoint::Endpoint::from_name(&v).is_none() {
                    return Err(GatewayError::BadRequest(format!(
                        "endpoint: unknown endpoint {v:?}; expected one of {}",
                        crate::endpoint::Endpoint::NAMES.join(", ")
                    )));
                }
                filter.endpoint = Some(v.into_owned());
            }
            "older_than" => {
                let d = humantime::parse_duration(&v)
                    .map_err(|e| GatewayError::BadRequest(format!("older_than: {v:?} is not a duration like 1h or 7d: {e}")))?;
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                filter.created_before_ms = Some(state.clock.now_ms().saturating_sub(ms));
            }
            other => match other.strip_prefix("metadata.") {
                Some(mk) if !mk.is_empty() => filter.metadata.push((mk.to_owned(), v.into_owned())),
                _ => {
                    return Err(GatewayError::BadRequest(format!(
                        "unknown parameter {other:?}: expected key, cache_key, model, endpoint, metadata.KEY or older_than"
                    )))
                }
            },
        }
        filtered |= !matches!(k.as_ref(), "key" | "cache_key");
    }
    if filtered && one.is_some() {
        return Err(GatewayError::BadRequest("key and cache_key purge one entry: give no filter with them".into()));
    }
    let cache_err = |e| GatewayError::store("cache store", e);
    let n = if filtered {
        state.cache.purge_matching(gw, &filter).await.map_err(cache_err)?
    } else {
        state.cache.purge(gw, one.as_ref()).await.map_err(cache_err)?
    };
    json(&serde_json::json!({ "purged": n, "gateway": gw }))
}

/// Most entries a top query lists.
const MAX_TOP: usize = 1000;

/// `GET /admin/gateways/{id}/cache/top?since=24h&limit=50`.
fn cache_top(state: &AppState, gateway: &Gateway, query: &str) -> Result<Response<GatewayBody>, GatewayError> {
    let now = state.clock.now_ms();
    let (mut since, mut limit) = (std::time::Duration::from_secs(86_400), 50usize);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "since" => {
                since = humantime::parse_duration(&v).map_err(|e| {
                    GatewayError::BadRequest(format!("since: {v:?} is not a duration like 24h or 7d: {e}"))
                })?
            }
            "limit" => {
                limit = v.parse().ok().filter(|n| (1..=MAX_TOP).contains(n)).ok_or_else(|| {
                    GatewayError::BadRequest(format!("limit: {v:?} is not a number from 1 to {MAX_TOP}"))
                })?
            }
            other => {
                return Err(GatewayError::BadRequest(format!("unknown parameter {other:?}: expected since or limit")))
            }
        }
    }
    let since_ms = now.saturating_sub(u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    let top = state.cache.index.top(&gateway.name, since_ms, now, limit);
    let store = state.cache.store.stats();
    json(&serde_json::json!({
        "gateway": top.gateway,
        "since_ms": top.since_ms,
        "totals": top.totals,
        "store": { "kind": state.cache.store.kind(), "entries": store.entries, "bytes": store.bytes },
        "entries": top.entries,
    }))
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
