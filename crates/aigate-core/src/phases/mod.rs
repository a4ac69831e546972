//! The request path of a gateway request, as an ordered list of phases:
//!
//! ```text
//!        1 route ─▶ 2 authenticate ─▶ 3 read body ─▶ 4 cache lookup ─▶ 5 limits ─▶ 6 upstream ─▶ 7 respond
//! fails: 404/400     401                413/408        (400 bad header)   429/503     502/504
//!                                                      HIT ────────────────┴─▶ respond (replay)
//!                                                      FOLLOW ─────────────┴─▶ respond (relay the leader's)
//!                                                      MISS ──────────────────────────────▶ respond (tee)
//! ```
//!
//! Each phase lives in the module named after it, owns its logic and its failure behaviour, and
//! says in its module docs what it reads and writes. [`run`] strings them together and reads as
//! that list. Every failure is a [`GatewayError`], turned into an OpenAI-shaped error by the respond
//! phase. From the route phase on, the request is metered: its [`Meter`] collects what happened
//! and goes to the log pipeline when the response ends. A request in OpenAI's format for any
//! provider learns its provider once its body is read ([`crate::translate::prepare`]); the
//! phases after see the resolved route.

pub mod authenticate;
pub mod cache;
pub mod fallback;
pub mod limits;
pub mod read_body;
pub mod respond;
pub mod route;
pub mod upstream;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::GatewayBody;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::headers::AIGATE_GATEWAY;
use crate::meter::{detached, Meter};
use crate::routing::{dynamic, universal, Canary, Chain};
use crate::state::AppState;
use crate::translate::{self, Compat, Translation};
use authenticate::Caller;
use cache::{CacheOptions, Lookup};
use limits::limits;
use read_body::read_body;
use respond::{respond, Exchange};
use route::{route, Route};
use upstream::{request_timeout, retry_policy, upstream};

/// A gateway request as the cache and limits phases see it: routed, authenticated, body read.
pub struct Call<'a> {
    /// The settings the request runs under (a snapshot: a reload does not change them midway).
    pub settings: &'a Settings,
    /// Where it goes.
    pub route: &'a Route<'a>,
    /// Its method, URI and headers.
    pub head: &'a http::request::Parts,
    /// Its body.
    pub body: &'a Bytes,
    /// Its credentials.
    pub caller: &'a Caller<'a>,
    /// How it is translated for its provider (a request in OpenAI's format for another provider).
    pub translation: Option<&'a Translation>,
}

/// Runs the phases for one gateway request, up to the response head; `ex` receives the meter
/// once the request is routed.
pub async fn run(
    state: &AppState,
    req: Request<Incoming>,
    ex: &mut Exchange,
) -> Result<Response<GatewayBody>, GatewayError> {
    // An owned snapshot: the request may live for minutes, longer than arc-swap's guards should.
    let settings = state.settings.load_full();
    let (head, body) = req.into_parts();

    let mut route = route(&settings, &head.method, &head.uri, &head.headers)?;
    // A canary serves its share with its own gateway's settings, and logs it there.
    let addressed = match Canary::choose(&settings, &route.gateway, &head.headers) {
        Some(canary) => Some(std::mem::replace(&mut route.gateway, canary)),
        None => None,
    };
    let meter = ex.meter(Meter::new(ex.id, ex.created_at_ms, ex.start, &route, &head.headers));
    if addressed.is_some() || route.gateway.canary.is_some() {
        if let Ok(v) = http::HeaderValue::from_str(&route.gateway.name) {
            meter.rate_headers.push((AIGATE_GATEWAY, v));
        }
    }
    authenticate::check(addressed.as_ref().unwrap_or(&route.gateway), &head.headers)?;
    let timeout = request_timeout(&head.headers, &route.gateway)?;
    let retry = retry_policy(&head.headers, &route.gateway)?;
    let cache_options = CacheOptions::parse(&head.headers)?;
    let body = read_body(body, &settings).await?;
    meter.request_body = detached(&body);
    if let Some(chain) = chain(&route, &head.headers, &body)? {
        let defaults = fallback::Defaults { timeout, retry, cache: cache_options };
        // Boxed: a chain's state is large, and without the box every request's future would carry
        // room for it (and copy it when the future moves).
        return Box::pin(fallback::run_chain(state, &settings, &route, &head, chain, defaults, meter)).await;
    }
    // A request in OpenAI's format for another provider: its model names the provider.
    let (outgoing, translation) = match translate::prepare(&settings, &mut route, &body)? {
        Some((translated, t)) => {
            meter.reroute(&route);
            (translated, Some(t))
        }
        None => (body.clone(), None),
    };
    let caller = authenticate::caller(&route, &head.headers);

    let call = Call {
        settings: &settings,
        route: &route,
        head: &head,
        body: &body,
        caller: &caller,
        translation: translation.as_ref(),
    };
    let lookup = cache::lookup(state, &call, &cache_options, meter).await;
    limits(state, &call, lookup.is_hit(), meter).await?;
    let miss = match lookup {
        Lookup::Hit(answer) => return Ok(answer),
        Lookup::Follow(follow) => match follow.answer(meter).await {
            Some(answer) => return Ok(answer),
            None => None,
        },
        Lookup::Miss(handle) => Some(handle),
        Lookup::Skip => None,
    };

    fallback::breaker_admit(state, &route, meter)?;
    let (method, headers) = (head.method, head.headers);
    let answer =
        upstream(state, &route, (method, headers), outgoing, translation.as_ref(), retry, timeout, meter).await;
    fallback::breaker_report(state, &route, &answer);
    Ok(respond(answer?, miss, route.endpoint, translation.as_ref(), meter))
}

/// The chain of steps a request asks for: a Universal request's array, or the dynamic route its
/// model names. `None` for every other request, which pays one comparison (and a scan of the body
/// only on a gateway with routes).
fn chain(route: &Route<'_>, headers: &http::HeaderMap, body: &Bytes) -> Result<Option<Chain>, GatewayError> {
    if route.compat == Compat::Universal {
        return universal::chain(body).map(Some);
    }
    if route.compat == Compat::No
        || route.gateway.routes.is_empty()
        || memchr::memmem::find(body, b"\"dynamic/").is_none()
    {
        return Ok(None);
    }
    let Ok(serde_json::Value::Object(req)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(None);
    };
    let Some(name) = req.get("model").and_then(|m| m.as_str()).and_then(dynamic::route_name) else {
        return Ok(None);
    };
    let r = dynamic::find(&route.gateway.routes, &route.gateway.name, name)?;
    r.chain(&req, headers).map(Some)
}
