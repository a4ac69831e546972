//! The request path, stage by stage, in order:
//!
//! ```text
//! client ─▶ routing ─▶ auth ─▶ body limit ─▶ cache ─▶ upstream ─▶ stream back ─▶ client
//!           (404/400)  (401)   (413)          (HIT?)   (502/504)   (relayed; teed on a miss)
//! ```
//!
//! Every response from a gateway route carries `cf-aig-log-id` (a UUIDv7) and echoes a client's
//! `cf-aig-event-id`. This module only orders the stages; each stage lives in its own module and
//! documents what it reads, writes and how it fails. Nothing here blocks, logs per request at info
//! level, or re-serialises a body: bodies travel as `Bytes`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::GatewayBody;
use crate::cache::coalesce::{Flight, Joined};
use crate::cache::tee::{stream_terminal_marker, Tee};
use crate::cache::{CacheLayer, CacheOptions, CacheStatus, Plan};
use crate::clock::Clock;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::headers::{
    CF_AIG_AUTHORIZATION, CF_AIG_COLLECT_LOG, CF_AIG_COLLECT_LOG_PAYLOAD, CF_AIG_CUSTOM_COST, CF_AIG_EVENT_ID,
    CF_AIG_LOG_ID, CF_AIG_METADATA, CF_AIG_REQUEST_TIMEOUT,
};
use crate::limits::{self, LimitLayer, LimitStats};
use crate::logs::{LogPipeline, LogStats};
use crate::meter::{Meter, ResponseBody};
use crate::metrics::Metrics;
use crate::providers::AuthStyle;
use crate::upstream::HttpClient;
use crate::usage::{Endpoint, InjectedUsageFilter};
use crate::{admin, auth, cache, routing, upstream};

/// What every request handler shares: the current settings (swappable for reload), the upstream
/// client, the cache and the readiness flag.
pub struct AppState {
    /// Current settings; replaced atomically on reload.
    pub settings: ArcSwap<Settings>,
    /// Pooled upstream client.
    pub client: HttpClient,
    /// The response cache.
    pub cache: Arc<CacheLayer>,
    /// Time source.
    pub clock: Arc<Clock>,
    /// False once shutdown has begun (`/readyz` answers 503).
    pub ready: AtomicBool,
    /// Request logs: queue, writer, spill, live tail.
    pub logs: Arc<LogPipeline>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Rate limits and budgets.
    pub limits: Arc<LimitLayer>,
    /// Set to true when shutdown begins (ends live tails so connections can drain).
    pub stopping: tokio::sync::watch::Sender<bool>,
}

/// Why the state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS setup failed.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A store could not be opened.
    #[error("cannot open the cache store: {0}")]
    Store(#[from] aigate_store::StoreError),
    /// The log store or its spill directory could not be opened.
    #[error("cannot open the log store: {0}")]
    Logs(String),
    /// The rate-limit store could not be set up.
    #[error("cannot set up the rate-limit store: {0}")]
    Limits(String),
}

impl AppState {
    /// Builds the state from validated settings.
    pub fn new(settings: Settings) -> Result<Arc<AppState>, StartError> {
        let client = upstream::build_client(&settings.upstream)?;
        let clock = Arc::new(Clock::default());
        let store = aigate_store::build_cache(&settings.storage.cache, settings.storage.cache_memory, &clock)?;
        let cache = CacheLayer::new(store, clock.clone());
        let log_store = aigate_store::open_log_store(&settings.storage.logs, &clock)
            .map_err(|e| StartError::Logs(e.to_string()))?;
        let log_stats = Arc::new(LogStats::default());
        let limit_stats = Arc::new(LimitStats::default());
        let metrics = Metrics::new(cache.clone(), log_stats.clone(), limit_stats.clone());
        let limit_backend = aigate_store::LimitBackend::parse(&settings.storage.limits).map_err(StartError::Limits)?;
        let limit_store =
            aigate_store::build_limit_store(&limit_backend, &clock).map_err(|e| StartError::Limits(e.to_string()))?;
        let limits = Arc::new(LimitLayer::new(
            limit_store,
            settings.limits.clone(),
            limit_stats,
            clock.clone(),
            client.clone(),
            metrics.clone(),
        ));
        let logs = LogPipeline::new(&settings, log_store, log_stats, metrics.clone(), limits.clone())
            .map_err(|e| StartError::Logs(format!("spill directory: {e}")))?;
        Ok(Arc::new(AppState {
            settings: ArcSwap::from_pointee(settings),
            client,
            cache,
            clock,
            ready: AtomicBool::new(true),
            logs,
            metrics,
            limits,
            stopping: tokio::sync::watch::Sender::new(false),
        }))
    }
}

impl AppState {
    /// Applies a new configuration atomically: the next request sees all of it (gateways, tokens,
    /// provider keys, cache, logs and limit settings, prices). What is fixed at start (listen
    /// address, storage backends, connection limits, upstream pool) keeps its running value; each
    /// such difference is returned as a warning.
    pub fn reload(&self, mut new: Settings) -> Vec<String> {
        let old = self.settings.load_full();
        let mut warnings = Vec::new();
        let mut fixed = |what: &str, changed: bool| {
            if changed {
                warnings.push(format!("{what} changed: it applies after a restart; the running value stays"));
            }
        };
        fixed("listen", new.listen != old.listen);
        fixed("data_dir", new.data_dir != old.data_dir);
        fixed("[storage]", new.storage != old.storage);
        fixed("[upstream]", new.upstream != old.upstream);
        fixed("max_connections", new.max_connections != old.max_connections);
        fixed("header_read_timeout", new.header_read_timeout != old.header_read_timeout);
        new.listen = old.listen;
        new.data_dir = old.data_dir.clone();
        new.storage = old.storage.clone();
        new.upstream = old.upstream.clone();
        new.max_connections = old.max_connections;
        new.header_read_timeout = old.header_read_timeout;
        self.logs.configure(&new);
        self.limits.configure(new.limits.clone());
        self.settings.store(Arc::new(new));
        warnings
    }
}

/// Entry point for every HTTP request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    match req.uri().path() {
        "/healthz" => return Ok(plain(StatusCode::OK, "ok").map(ResponseBody::plain)),
        "/readyz" => {
            let r = if state.ready.load(Ordering::Relaxed) {
                plain(StatusCode::OK, "ready")
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            };
            return Ok(r.map(ResponseBody::plain));
        }
        "/metrics" => {
            let mut r = Response::new(GatewayBody::full(state.metrics.encode()));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return Ok(r.map(ResponseBody::plain));
        }
        p if p.starts_with("/admin/") => return Ok(admin::handle(&state, req).await.map(ResponseBody::plain)),
        _ => {}
    }
    let start = std::time::Instant::now();
    // The record's time is its id's UUIDv7 timestamp: the SQLite log store finds a record by id
    // through its time ([`aigate_store::log_id_at`]).
    let created_at_ms = state.clock.now_ms();
    let log_id = aigate_store::log_id_at(created_at_ms);
    let event_id = req.headers().get(CF_AIG_EVENT_ID).cloned();
    let mut meter: Option<Box<Meter>> = None;
    let mut resp = match proxy(&state, req, (log_id, created_at_ms), start, &mut meter).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(m) = &mut meter {
                m.error = Some(e.to_string());
            }
            e.into_response()
        }
    };
    let h = resp.headers_mut();
    if !h.contains_key(crate::headers::CF_AIG_CACHE_STATUS) {
        CacheStatus::Bypass.write(h);
    }
    let mut buf = uuid::Uuid::encode_buffer();
    if let Ok(v) = HeaderValue::from_str(log_id.hyphenated().encode_lower(&mut buf)) {
        h.insert(CF_AIG_LOG_ID, v);
    }
    if let Some(ev) = event_id {
        h.insert(CF_AIG_EVENT_ID, ev);
    }
    Ok(match meter {
        Some(mut m) => {
            for (k, v) in std::mem::take(&mut m.rate_headers) {
                resp.headers_mut().insert(k, v);
            }
            m.on_head(resp.status().as_u16(), resp.headers().get(http::header::CONTENT_TYPE));
            let logs = state.logs.clone();
            resp.map(|b| ResponseBody::metered(b, m, logs))
        }
        None => resp.map(ResponseBody::plain),
    })
}

/// Providers known to accept `stream_options.include_usage` (so aigate can ask for usage on a
/// stream whose client did not, and hide that event from the client).
fn accepts_stream_options(provider: &str) -> bool {
    matches!(provider, "openai" | "azure-openai" | "deepseek" | "grok")
}

/// The body to send upstream with `include_usage` added, when aigate should ask for it.
fn injected_usage_body(provider: &str, endpoint: Option<Endpoint>, body: &[u8]) -> Option<Vec<u8>> {
    if !matches!(endpoint, Some(Endpoint::ChatCompletions | Endpoint::Completions)) || !accepts_stream_options(provider)
    {
        return None;
    }
    // Cheap pre-check: only a body that mentions "stream" can be a streaming request.
    memchr::memmem::find(body, b"\"stream\"")?;
    crate::usage::inject_include_usage(body)
}

/// A copy of a request header's value for the meter (a parsed value references the connection's
/// read buffer; see [`crate::meter::detached`]).
fn detached_header(h: &http::HeaderMap, name: &http::HeaderName) -> Option<HeaderValue> {
    h.get(name).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
}

fn header_is_false(h: &http::HeaderMap, name: &http::HeaderName) -> bool {
    h.get(name).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false"))
}

async fn proxy(
    state: &AppState,
    req: Request<Incoming>,
    (log_id, created_at_ms): (uuid::Uuid, u64),
    start: std::time::Instant,
    slot: &mut Option<Box<Meter>>,
) -> Result<Response<GatewayBody>, GatewayError> {
    // An owned snapshot: the request may live for minutes, longer than arc-swap's guards should.
    let settings = state.settings.load_full();
    let (mut parts, body) = req.into_parts();

    // Stage 1: routing.
    let route = routing::resolve(&settings, parts.uri.path())?;
    // From here on the request belongs to a gateway: it is metered and logged.
    let endpoint = Endpoint::from_path(&route.provider.name, route.rest);
    let meter = slot.insert(Box::new(Meter {
        id: log_id,
        created_at_ms,
        start,
        gateway: route.gateway.name.clone(),
        logs: route.gateway.logs.clone(),
        provider: route.provider.clone(),
        path: route.rest.to_owned(),
        endpoint,
        request_body: Bytes::new(),
        event_id: detached_header(&parts.headers, &CF_AIG_EVENT_ID),
        metadata: detached_header(&parts.headers, &CF_AIG_METADATA),
        custom_cost: detached_header(&parts.headers, &CF_AIG_CUSTOM_COST),
        user_agent: detached_header(&parts.headers, &http::header::USER_AGENT),
        collect_log: !header_is_false(&parts.headers, &CF_AIG_COLLECT_LOG),
        collect_payload: !header_is_false(&parts.headers, &CF_AIG_COLLECT_LOG_PAYLOAD),
        status: 0,
        cache_status: CacheStatus::Bypass,
        stream: false,
        upstream_start: None,
        upstream_head: None,
        head_out: None,
        first_byte: None,
        end: None,
        error: None,
        completed: false,
        captured: Vec::new(),
        captured_bytes: 0,
        capture_limit: 0,
        capture_overflow: false,
        sse: None,
        filter: None,
        hit_entry: None,
        held: Vec::new(),
        rate_headers: Vec::new(),
    }));
    // Stage 2: gateway authentication.
    auth::check(&route.gateway, &parts.headers)?;

    let timeout = request_timeout(&parts.headers, route.gateway.request_timeout)?;
    let uri = route
        .provider
        .upstream_uri(route.account_id, route.rest, parts.uri.query())
        .map_err(|e| GatewayError::BadRequest(format!("invalid provider path: {e}")))?;
    let provider = route.provider.clone();
    let stored_key = route.gateway.provider_keys.get(&provider.name).cloned();

    let cache_options = CacheOptions::parse(&parts.headers)?;

    // Stage 3: request body, bounded.
    // Most bodies have fully arrived with the head: poll once before arming the body timer.
    let mut reading = std::pin::pin!(read_body(body, settings.max_request_body));
    let body = match std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await {
        Poll::Ready(b) => b?,
        Poll::Pending => match tokio::time::timeout(settings.request_body_timeout, reading).await {
            Ok(b) => b?,
            Err(_) => {
                let timeout_ms = u64::try_from(settings.request_body_timeout.as_millis()).unwrap_or(u64::MAX);
                return Err(GatewayError::BodyTimeout { timeout_ms });
            }
        },
    };
    meter.request_body = crate::meter::detached(&body);

    // Stage 4: cache. Decide HIT or MISS before anything goes upstream.
    // The client's credentials: part of the cache key and of `credential` limit keys.
    let mut creds: [&[u8]; 5] = [&[]; 5];
    let mut n = 0;
    if let Some(k) = &stored_key {
        creds[n] = k.expose().as_bytes();
        n += 1;
    } else {
        for style in [AuthStyle::Bearer, AuthStyle::XApiKey, AuthStyle::ApiKey, AuthStyle::XGoogApiKey] {
            if let Some(v) = parts.headers.get(style.header()) {
                creds[n] = v.as_bytes();
                n += 1;
            }
        }
    }
    if let Some(v) = parts.headers.get(CF_AIG_AUTHORIZATION) {
        creds[n] = v.as_bytes();
        n += 1;
    }
    let creds = &creds[..n];

    // Stage 4: cache. Decide HIT or MISS before anything goes upstream.
    let cache_off = route.gateway.cache.mode == crate::config::CacheMode::Off && cache_options.custom_key.is_none();
    let cache_plan = if cache_off {
        Plan::Skip(CacheStatus::Off)
    } else {
        cache::plan(&cache::PlanInput {
            settings: &route.gateway.cache,
            options: &cache_options,
            request: cache::key::KeyInput {
                gateway: &route.gateway.name,
                provider: &provider.name,
                method: &parts.method,
                path: route.rest,
                query: parts.uri.query().unwrap_or(""),
                body: &body,
                credentials: creds,
            },
        })
    };
    let ns = route.gateway.name.clone();
    let rules = &route.gateway.rules;
    let mut facts = limits::Facts::new(&provider.name, &body, &parts.headers, creds, &settings.prices);
    let mut status = CacheStatus::Off;
    if let Plan::Skip(s) = &cache_plan {
        status = *s;
    }
    if let Plan::Use(u) = &cache_plan {
        status = CacheStatus::Miss;
        let found = state.cache.lookup(&ns, &u.key).await;
        if u.shadow {
            if found.is_some() {
                status = CacheStatus::ShadowHit;
                state.cache.stats.shadow_hits.fetch_add(1, Ordering::Relaxed);
            } else {
                state.cache.stats.misses.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(entry) = found {
            state.cache.stats.hits.fetch_add(1, Ordering::Relaxed);
            meter.on_hit(Some(entry.clone()), injected_usage_body(&provider.name, endpoint, &body).is_some());
            // Stage 4b: limits (a hit counts only against request rules, and only if configured).
            meter.admitted(state.limits.admit(&ns, rules, &mut facts, true).await?);
            return Ok(cache::hit_response(entry, &u.key, state.clock.now_ms()));
        } else {
            state.cache.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
    }
    meter.cache_status = status;

    // Stage 4b: limits, before anything goes upstream (or waits for an identical request).
    meter.admitted(state.limits.admit(&ns, rules, &mut facts, false).await?);
    drop(facts);

    let mut flight: Option<FlightGuard> = None;
    if let Plan::Use(u) = &cache_plan {
        let max = usize::try_from(u.max_entry_size).unwrap_or(usize::MAX);
        if u.coalesce {
            match state.cache.inflight.join(u.key, max) {
                Joined::Leader(f) => flight = Some(FlightGuard::registered(f, state.cache.clone())),
                Joined::Finished(entry) => {
                    state.cache.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                    meter.on_hit(Some(entry.clone()), injected_usage_body(&provider.name, endpoint, &body).is_some());
                    return Ok(cache::hit_response(entry, &u.key, state.clock.now_ms()));
                }
                Joined::Follower(rx) => {
                    // On `None` the leader failed or was too slow: go upstream alone, unstored.
                    if let Some(resp) = cache::follow(rx, u.coalesce_wait, &u.key).await {
                        state.cache.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        meter.on_hit(None, injected_usage_body(&provider.name, endpoint, &body).is_some());
                        return Ok(resp);
                    }
                }
            }
        } else {
            flight = Some(FlightGuard::private(u.key, max, state.cache.clone()));
        }
    }

    // Stage 5: upstream.
    upstream::strip_request_headers(&mut parts.headers);
    if let Some(key) = &stored_key {
        upstream::inject_key(&mut parts.headers, &provider, key)?;
    }
    // Ask for usage on a stream whose client did not (the extra event is hidden from the client).
    let body = match injected_usage_body(&provider.name, endpoint, &body) {
        Some(with_usage) => {
            meter.filter = Some(InjectedUsageFilter::new());
            parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(with_usage.len()));
            Bytes::from(with_usage)
        }
        None => body,
    };
    let out = upstream::build_request(parts.method, uri, parts.headers, body);
    meter.upstream_start = Some(std::time::Instant::now());
    let resp = upstream::send(&state.client, &provider, out, timeout).await?;
    meter.upstream_head = Some(std::time::Instant::now());

    // Stage 6: stream back, unchanged but for hop-by-hop headers; tee into the cache on a miss.
    let (mut rparts, rbody) = resp.into_parts();
    upstream::strip_response_headers(&mut rparts.headers);
    rparts.version = http::Version::HTTP_11;
    let body = match (flight, &cache_plan) {
        (Some(guard), Plan::Use(u)) if rparts.status.is_success() => {
            let f = guard.into_flight();
            let headers = Arc::new(cache::replay_headers(&rparts.headers));
            f.head(rparts.status, headers.clone());
            let ct = rparts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let marker = stream_terminal_marker(route.rest, ct);
            let tee = Tee::new(rbody, f, state.cache.clone(), ns, rparts.status.as_u16(), headers, u.ttl, marker);
            GatewayBody::Tee(Box::new(tee))
        }
        // A failed or non-2xx response: the guard's drop fails the flight (followers go upstream).
        _ => GatewayBody::Upstream(rbody),
    };
    if let Plan::Use(u) = &cache_plan {
        cache::set_key_header(&mut rparts.headers, &u.key);
    }
    status.write(&mut rparts.headers);
    Ok(Response::from_parts(rparts, body))
}

/// Owns a flight until the tee takes it; dropped earlier (upstream error, non-2xx), it fails the
/// flight so followers go upstream on their own.
struct FlightGuard {
    flight: Arc<Flight>,
    cache: Arc<CacheLayer>,
    armed: bool,
}

impl FlightGuard {
    fn registered(flight: Arc<Flight>, cache: Arc<CacheLayer>) -> Self {
        FlightGuard { flight, cache, armed: true }
    }

    /// A flight nobody can join (shadow mode, coalescing off): it only builds the entry.
    fn private(key: aigate_store::CacheKey, max: usize, cache: Arc<CacheLayer>) -> Self {
        FlightGuard { flight: Flight::new(key, max), cache, armed: true }
    }

    fn into_flight(mut self) -> Arc<Flight> {
        self.armed = false;
        self.flight.clone()
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.armed {
            self.flight.fail();
            self.cache.inflight.remove(&self.flight);
        }
    }
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
