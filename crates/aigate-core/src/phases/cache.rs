//! Phase 4, cache lookup: decides, before anything goes upstream, whether the answer comes from
//! the cache (**HIT**), from an identical request already in flight (**FOLLOW**), or from upstream
//! (**MISS**, with a handle that stores the answer after a clean end).
//!
//! Only endpoints whose answer is a function of the request are cached ([`crate::endpoint::Endpoint::cacheable`]):
//! chat, completions, embeddings, responses, Anthropic messages, Gemini generateContent, and
//! `GET models`. The key covers the gateway, provider, method, path, query, a canonical form of
//! the body and, with `scope = "credential"` (the default), the caller's credentials
//! ([`crate::cache::key`]).
//!
//! The gateway's cache rules ([`crate::cache::rules`]) are tried here, where the TTL is decided:
//! the first that matches sets the TTL of what is stored, or bypasses the cache (`enabled =
//! false`); the rule's name goes to the `aigate-cache-rule` header. Request headers win over a
//! rule (`cf-aig-skip-cache`, `cf-aig-cache-ttl`); rules take no part on a gateway whose cache is
//! off.
//!
//! Reads: the gateway's cache settings, the `cf-aig-skip-cache` / `cf-aig-cache-ttl` /
//! `cf-aig-cache-key` headers (and the legacy `cf-skip-cache` / `cf-cache-ttl`), the method, path,
//! query, body and credentials. Writes: the meter's cache status (`aigate-cache`: `HIT`, `MISS`,
//! `BYPASS`, `OFF`, `SHADOW-HIT`) and, on a hit, the entry it was served from.
//!
//! Failure behaviour: an invalid cache header is a 400 naming the header (checked before the body
//! is read); a store error is a miss.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aigate_store::CacheKey;
use http::{HeaderMap, HeaderName, HeaderValue, Response};

use super::Call;
use crate::body::GatewayBody;
use crate::cache::coalesce::{FlightReceiver, Joined};
use crate::cache::rules::RuleInput;
use crate::cache::{key, replay, CacheLayer, CacheStatus, EntryFacts, MissHandle, CUSTOM_KEY_DEFAULT_TTL, MAX_TTL};
use crate::config::{CacheMode, CacheScope};
use crate::error::GatewayError;
use crate::headers::{
    CF_AIG_CACHE_KEY, CF_AIG_CACHE_TTL, CF_AIG_METADATA, CF_AIG_SKIP_CACHE, CF_CACHE_TTL, CF_SKIP_CACHE,
};
use crate::meter::Meter;
use crate::state::AppState;

/// What the cache answers for a request.
// A hit is the common case on a warm cache: boxing its response would allocate once per hit.
#[allow(clippy::large_enum_variant)]
pub enum Lookup {
    /// Served from the cache.
    Hit(Response<GatewayBody>),
    /// An identical request is in flight: its answer is relayed as it arrives.
    Follow(Follow),
    /// Not in the cache: go upstream; the handle stores a clean answer.
    Miss(MissHandle),
    /// The cache takes no part (off, bypassed, or an endpoint that is never cached).
    Skip,
}

impl Lookup {
    /// Whether the answer comes from the cache, for the limits phase. A follower is not: if the
    /// request it follows fails, it goes upstream itself.
    pub fn is_hit(&self) -> bool {
        matches!(self, Lookup::Hit(_))
    }
}

/// A request waiting for an identical one in flight.
pub struct Follow {
    rx: FlightReceiver,
    wait: Duration,
    key: CacheKey,
    layer: Arc<CacheLayer>,
    /// The leader's stream holds a usage event aigate asked for, to be hidden.
    filtered: bool,
}

impl Follow {
    /// The leader's answer, once its head arrives; `None` when the leader failed or took longer
    /// than `coalesce_wait`: the request then goes upstream on its own, unstored.
    pub async fn answer(self, meter: &mut Meter) -> Option<Response<GatewayBody>> {
        let resp = replay::follow(self.rx, self.wait, &self.key).await?;
        self.layer.stats.coalesced.fetch_add(1, Ordering::Relaxed);
        meter.on_hit(None, self.filtered);
        Some(resp)
    }
}

/// Looks the request up.
pub async fn lookup(state: &AppState, call: &Call<'_>, options: &CacheOptions, meter: &mut Meter) -> Lookup {
    let plan = match plan(call, options, meter) {
        Ok(plan) => plan,
        Err(status) => {
            meter.cache_status = status;
            return Lookup::Skip;
        }
    };
    let layer = &state.cache;
    let stats = &layer.stats;
    let ns = &call.route.gateway.name;
    meter.cache_key = Some((plan.key, plan.ttl));
    let found = layer.lookup(ns, &plan.key).await;
    let max = usize::try_from(plan.max_entry_size).unwrap_or(usize::MAX);
    let facts = || EntryFacts {
        body: call.body.clone(),
        metadata: call.head.headers.get(CF_AIG_METADATA).cloned(),
        endpoint: call.route.endpoint,
    };
    let private = || MissHandle::private(plan.key, max, layer.clone(), ns.clone(), plan.ttl, facts());
    if plan.shadow {
        let status = if found.is_some() { CacheStatus::ShadowHit } else { CacheStatus::Miss };
        let counter = if found.is_some() { &stats.shadow_hits } else { &stats.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        meter.cache_status = status;
        return Lookup::Miss(private());
    }
    // Whether a stored stream holds a usage event aigate asked for: asked only when the answer
    // comes from the cache or from another request (a miss works it out once, upstream).
    let filtered =
        || super::upstream::usage_injection(call).is_some() || call.translation.is_some_and(|t| t.hides_usage());
    if let Some(entry) = found {
        stats.hits.fetch_add(1, Ordering::Relaxed);
        meter.on_hit(Some(entry.clone()), filtered());
        return Lookup::Hit(replay::hit_response(entry, &plan.key, layer.clock.now_ms()));
    }
    stats.misses.fetch_add(1, Ordering::Relaxed);
    meter.cache_status = CacheStatus::Miss;
    if !plan.coalesce {
        return Lookup::Miss(private());
    }
    match layer.inflight.join(plan.key, max) {
        Joined::Leader(flight) => {
            Lookup::Miss(MissHandle::registered(flight, layer.clone(), ns.clone(), plan.ttl, facts()))
        }
        Joined::Finished(entry) => {
            stats.coalesced.fetch_add(1, Ordering::Relaxed);
            meter.on_hit(Some(entry.clone()), filtered());
            Lookup::Hit(replay::hit_response(entry, &plan.key, layer.clock.now_ms()))
        }
        Joined::Follower(rx) => Lookup::Follow(Follow {
            rx,
            wait: plan.coalesce_wait,
            key: plan.key,
            layer: layer.clone(),
            filtered: filtered(),
        }),
    }
}

/// How the cache takes part in a request.
#[derive(Debug, Clone)]
struct Plan {
    /// The key.
    key: CacheKey,
    /// TTL of a stored entry.
    ttl: Duration,
    /// Shadow mode: never serve hits.
    shadow: bool,
    /// Join identical in-flight requests.
    coalesce: bool,
    /// Longest wait for a leader's head.
    coalesce_wait: Duration,
    /// Largest stored response.
    max_entry_size: u64,
}

/// Decides whether and how the cache takes part; when it does not, the status that says why
/// (`OFF`: the gateway's cache is off; `BYPASS`: skipped for this request, by a rule, or never
/// cached). The rule that applied goes to the meter.
fn plan(call: &Call<'_>, options: &CacheOptions, meter: &mut Meter) -> Result<Plan, CacheStatus> {
    let s = &call.route.gateway.cache;
    let custom = options.custom_key.as_deref();
    if s.mode == CacheMode::Off && custom.is_none() {
        return Err(CacheStatus::Off);
    }
    if options.skip || options.ttl == Some(Duration::ZERO) || !call.route.endpoint.cacheable() {
        return Err(CacheStatus::Bypass);
    }
    let rule = if s.mode == CacheMode::Off {
        None
    } else {
        s.rules.find(&RuleInput {
            endpoint: call.route.endpoint,
            path: call.route.rest,
            body: call.body,
            metadata: call.head.headers.get(CF_AIG_METADATA).map(HeaderValue::as_bytes),
        })
    };
    if let Some(r) = rule {
        meter.cache_rule = Some((r.name.clone(), r.header.clone()));
        if !r.enabled {
            return Err(CacheStatus::Bypass);
        }
    }
    let input = key::KeyInput {
        gateway: &call.route.gateway.name,
        provider: &call.route.provider.name,
        method: &call.head.method,
        path: call.route.rest,
        query: call.head.uri.query().unwrap_or(""),
        body: call.body,
        credentials: if s.scope == CacheScope::Gateway { &[] } else { call.caller.credentials() },
    };
    let key = match custom {
        Some(c) => key::custom(input.gateway, c, input.credentials),
        None => key::compute(&input),
    };
    let default_ttl = if s.mode == CacheMode::Off { CUSTOM_KEY_DEFAULT_TTL } else { s.ttl };
    Ok(Plan {
        key,
        ttl: options.ttl.or(rule.and_then(|r| r.ttl)).unwrap_or(default_ttl),
        shadow: s.mode == CacheMode::Shadow,
        coalesce: s.coalesce && s.mode != CacheMode::Shadow,
        coalesce_wait: s.coalesce_wait,
        max_entry_size: s.max_entry_size,
    })
}

/// Per-request cache headers.
#[derive(Debug, Default, Clone)]
pub struct CacheOptions {
    /// `cf-aig-skip-cache: true`.
    pub skip: bool,
    /// `cf-aig-cache-ttl` (`Some(ZERO)` means do not cache).
    pub ttl: Option<Duration>,
    /// `cf-aig-cache-key`.
    pub custom_key: Option<String>,
}

/// The first of `names` present, as (name, trimmed value).
fn header<'a, 'n>(h: &'a HeaderMap, names: &'n [HeaderName]) -> Result<Option<(&'n str, &'a str)>, GatewayError> {
    for name in names {
        if let Some(v) = h.get(name) {
            let n = name.as_str();
            let s = v.to_str().map_err(|_| GatewayError::BadRequest(format!("invalid {n}: not visible ASCII")))?;
            return Ok(Some((n, s.trim())));
        }
    }
    Ok(None)
}

impl CacheOptions {
    /// Reads the cache headers; an invalid value is a 400 naming the header.
    pub fn parse(h: &HeaderMap) -> Result<CacheOptions, GatewayError> {
        let mut o = CacheOptions::default();
        if let Some((n, v)) = header(h, &[CF_AIG_SKIP_CACHE, CF_SKIP_CACHE])? {
            o.skip = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(GatewayError::BadRequest(format!("invalid {n}: expected true or false"))),
            };
        }
        if let Some((n, v)) = header(h, &[CF_AIG_CACHE_TTL, CF_CACHE_TTL])? {
            let secs: u64 = v
                .parse()
                .map_err(|_| GatewayError::BadRequest(format!("invalid {n}: expected a number of seconds")))?;
            let d = Duration::from_secs(secs);
            if secs != 0 && (d < Duration::from_secs(60) || d > MAX_TTL) {
                return Err(GatewayError::BadRequest(format!(
                    "invalid {n}: {secs} is outside 60..={} seconds (0 disables caching for this request)",
                    MAX_TTL.as_secs()
                )));
            }
            o.ttl = Some(d);
        }
        if let Some((n, v)) = header(h, &[CF_AIG_CACHE_KEY])? {
            if v.is_empty() || v.len() > 1024 {
                return Err(GatewayError::BadRequest(format!("invalid {n}: expected 1 to 1024 characters")));
            }
            o.custom_key = Some(v.to_string());
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_refuse() {
        let o =
            CacheOptions::parse(&crate::headers::map(&[("cf-aig-skip-cache", "true"), ("cf-aig-cache-ttl", "120")]))
                .unwrap();
        assert!(o.skip);
        assert_eq!(o.ttl, Some(Duration::from_secs(120)));
        let o =
            CacheOptions::parse(&crate::headers::map(&[("cf-skip-cache", "false"), ("cf-cache-ttl", "0")])).unwrap();
        assert!(!o.skip);
        assert_eq!(o.ttl, Some(Duration::ZERO));
        for (k, v) in [
            ("cf-aig-skip-cache", "yes"),
            ("cf-aig-cache-ttl", "10"),
            ("cf-aig-cache-ttl", "abc"),
            ("cf-cache-ttl", "99999999"),
        ] {
            let e = CacheOptions::parse(&crate::headers::map(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }
}
