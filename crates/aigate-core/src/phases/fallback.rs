//! Phases 4 to 7 for a chain of steps (Cloudflare's Universal Endpoint, a dynamic route): each
//! step runs the cache, limits and upstream phases in turn until one answers 2xx; the last step's
//! answer (or error) goes back whatever it is. A step is skipped, and the next tried, when its
//! limits refuse it (Cloudflare's limit nodes), when its provider's circuit breaker is open, or
//! when its upstream fails (unreachable, no head in time, a non-2xx answer after the step's
//! retries). Nothing of a failed step reaches the client. Every answer carries `cf-aig-step` (the
//! index of the step that answered, or of the last one tried); a dynamic route's answers carry
//! `cf-aig-provider` and `cf-aig-model` too.
//!
//! A step has its own cache entry: its key is the request the step sends, as if the client had
//! sent it to that provider, so a dynamic route's step shares entries with direct requests.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response};

use super::authenticate;
use super::cache::{self, CacheOptions, Lookup};
use super::limits::limits;
use super::respond::respond;
use super::route::{for_step, Route};
use super::upstream::{request_timeout, retry_policy, upstream};
use super::Call;
use crate::body::GatewayBody;
use crate::config::{RetrySettings, Settings};
use crate::error::GatewayError;
use crate::headers::{CF_AIG_MODEL, CF_AIG_PROVIDER, CF_AIG_STEP};
use crate::meter::Meter;
use crate::routing::breaker::{Admit, State};
use crate::routing::{Chain, Step};
use crate::state::AppState;
use crate::translate;

/// What every step starts from: the request's own settings.
pub struct Defaults {
    /// `cf-aig-request-timeout` or the gateway's.
    pub timeout: Duration,
    /// `cf-aig-max-attempts` … or the gateway's.
    pub retry: RetrySettings,
    /// The request's cache headers.
    pub cache: CacheOptions,
}

/// Runs `chain` for the request `head` on `route`.
pub async fn run_chain(
    state: &AppState,
    settings: &Settings,
    route: &Route<'_>,
    head: &http::request::Parts,
    chain: Chain,
    defaults: Defaults,
    meter: &mut Meter,
) -> Result<Response<GatewayBody>, GatewayError> {
    let n = chain.steps.len();
    let dynamic = chain.route.is_some();
    // Every step's provider and endpoint are checked before the first is sent.
    for (i, step) in chain.steps.iter().enumerate() {
        for_step(settings, route, &step.provider, &step.endpoint).map_err(|e| name_step(i, e))?;
    }
    meter.route = chain.route;
    for (i, step) in chain.steps.iter().enumerate() {
        let is_last = i + 1 == n;
        meter.step = u32::try_from(i).ok();
        let result = run_step(state, settings, route, head, step, &defaults, is_last, meter).await;
        meter.rate_headers.push((CF_AIG_STEP, HeaderValue::from(i)));
        if dynamic {
            if let Ok(v) = HeaderValue::from_str(&meter.provider.name) {
                meter.rate_headers.push((CF_AIG_PROVIDER, v));
            }
            if let Some(v) = step.model.as_deref().and_then(|m| HeaderValue::from_str(m).ok()) {
                meter.rate_headers.push((CF_AIG_MODEL, v));
            }
        }
        match result {
            Outcome::Answer(r) => return r.map_err(|e| name_step(i, e)),
            Outcome::Next => state.metrics.record_fallback(&route.gateway.name, &meter.provider.name),
        }
    }
    // The last step always answers.
    Err(GatewayError::Internal)
}

/// A malformed step is the client's error, and names the step.
fn name_step(i: usize, e: GatewayError) -> GatewayError {
    match e {
        GatewayError::BadRequest(m) => GatewayError::BadRequest(format!("step {i}: {m}")),
        GatewayError::UnknownProvider { provider, known } => {
            GatewayError::BadRequest(format!("step {i}: provider {provider:?} is not known; known providers: {known}"))
        }
        e => e,
    }
}

// Returned once per step and matched at once: boxing the answer would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// The client's answer.
    Answer(Result<Response<GatewayBody>, GatewayError>),
    /// The step failed or was skipped; the next one is tried.
    Next,
}

/// One step: route, cache, limits, breaker, upstream.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    state: &AppState,
    settings: &Settings,
    route: &Route<'_>,
    head: &http::request::Parts,
    step: &Step,
    defaults: &Defaults,
    last: bool,
    meter: &mut Meter,
) -> Outcome {
    // Before anything is sent: an error is the client's answer, unless another step can serve.
    let fail = |e: GatewayError| if last { Outcome::Answer(Err(e)) } else { Outcome::Next };
    let mut step_route = match for_step(settings, route, &step.provider, &step.endpoint) {
        Ok(r) => r,
        Err(e) => return Outcome::Answer(Err(e)),
    };
    let (outgoing, translation) = match translate::prepare(settings, &mut step_route, &step.body) {
        Ok(Some((body, t))) => (body, Some(t)),
        Ok(None) => (step.body.clone(), None),
        Err(e) => return Outcome::Answer(Err(e)),
    };
    meter.retarget(&step_route, translation.is_some());
    let parts = step_head(head, step);
    // Precedence: the step's `config` over its headers over the request's over the gateway's.
    let settings_of_step = || -> Result<(Duration, RetrySettings, CacheOptions), GatewayError> {
        let (timeout, mut retry, cache) = if step.headers.is_empty() {
            (defaults.timeout, defaults.retry, defaults.cache.clone())
        } else {
            (
                request_timeout(&parts.headers, &step_route.gateway)?,
                retry_policy(&parts.headers, &step_route.gateway)?,
                CacheOptions::parse(&parts.headers)?,
            )
        };
        retry.max_attempts = step.retry.max_attempts.unwrap_or(retry.max_attempts);
        retry.delay = step.retry.delay.unwrap_or(retry.delay);
        retry.backoff = step.retry.backoff.unwrap_or(retry.backoff);
        Ok((step.timeout.unwrap_or(timeout), retry, cache))
    };
    let (timeout, retry, cache_options) = match settings_of_step() {
        Ok(s) => s,
        Err(e) => return Outcome::Answer(Err(e)),
    };

    if let Err(e) = breaker_admit(state, &step_route, meter) {
        return fail(e);
    }

    let caller = authenticate::caller(&step_route, &parts.headers);
    let call = Call {
        settings,
        route: &step_route,
        head: &parts,
        body: &step.body,
        caller: &caller,
        translation: translation.as_ref(),
    };
    let lookup = cache::lookup(state, &call, &cache_options, meter).await;
    let held_before = meter.held.len();
    if let Err(e) = limits(state, &call, lookup.is_hit(), meter).await {
        return fail(e);
    }
    let miss = match lookup {
        Lookup::Hit(answer) => return Outcome::Answer(Ok(answer)),
        Lookup::Follow(follow) => match follow.answer(meter).await {
            Some(answer) => return Outcome::Answer(Ok(answer)),
            None => None,
        },
        Lookup::Miss(handle) => Some(handle),
        Lookup::Skip => None,
    };
    let method = parts.method.clone();
    let headers = parts.headers.clone();
    let result =
        upstream(state, &step_route, (method, headers), outgoing, translation.as_ref(), retry, timeout, meter).await;
    breaker_report(state, &step_route, &result);
    match result {
        Ok(answer) if answer.status().is_success() || last => {
            Outcome::Answer(Ok(respond(answer, miss, step_route.endpoint, translation.as_ref(), meter)))
        }
        // A failed step's answer is dropped unread (its connection is not reused); its cache
        // flight ends with it (followers go upstream on their own). What it reserved is given
        // back: the client's request counts once, against the step that answers it.
        Ok(_) => {
            state.limits.release_now(meter.held.split_off(held_before)).await;
            Outcome::Next
        }
        Err(e) if !last => {
            state.limits.release_now(meter.held.split_off(held_before)).await;
            fail(e)
        }
        Err(e) => fail(e),
    }
}

/// The request head a step runs with: the request's, its headers overridden by the step's.
fn step_head(head: &http::request::Parts, step: &Step) -> http::request::Parts {
    let mut headers: HeaderMap = head.headers.clone();
    for (k, v) in &step.headers {
        headers.insert(k.clone(), v.clone());
    }
    // The step's body replaces the request's: its length is the step's own.
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(step.body.len()));
    let mut req = Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = head.uri.clone();
    *req.headers_mut() = headers;
    req.into_parts().0
}

/// Asks the route's circuit breaker (when the gateway has one) whether the request may go to its
/// provider: 503 `circuit_open` while it is open.
/// The record notes a probe (`half-open`) and every provider skipped (`open: NAME`).
pub fn breaker_admit(state: &AppState, route: &Route<'_>, meter: &mut Meter) -> Result<(), GatewayError> {
    let Some(b) = &route.gateway.breaker else { return Ok(()) };
    let (gw, provider) = (&route.gateway.name, route.provider.name.as_str());
    let (admit, changed) = state.breakers.admit(gw, provider, b, Instant::now());
    if let Some(s) = changed {
        state.metrics.record_breaker(gw, provider, s.code());
    }
    let note = match admit {
        Admit::Pass => return Ok(()),
        Admit::Probe => "half-open".to_owned(),
        Admit::Refuse(_) => format!("open: {provider}"),
    };
    meter.breaker = Some(match meter.breaker.take() {
        Some(before) => format!("{before}; {note}"),
        None => note,
    });
    if let Admit::Refuse(wait) = admit {
        state.metrics.record_breaker_skip(gw, provider);
        let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        return Err(GatewayError::CircuitOpen { provider: provider.to_owned(), retry_after_ms });
    }
    Ok(())
}

/// Tells the route's circuit breaker how the upstream request ended: a 5xx answer, an
/// unreachable provider or no answer in time is a failure; anything else (a 4xx is the
/// client's) a success.
pub fn breaker_report<B>(state: &AppState, route: &Route<'_>, result: &Result<Response<B>, GatewayError>) {
    let Some(b) = &route.gateway.breaker else { return };
    let (gw, provider) = (&route.gateway.name, route.provider.name.as_str());
    let ok = matches!(result, Ok(r) if !r.status().is_server_error());
    if let Some(s) = state.breakers.report(gw, provider, b, ok, Instant::now()) {
        state.metrics.record_breaker(gw, provider, s.code());
        if s == State::Open {
            tracing::warn!(gateway = %gw, provider, "circuit breaker open: the provider keeps failing");
        }
    }
}
