//! Where a request goes when it has more than one place to go: fallback chains (Cloudflare's
//! Universal Endpoint, [`universal`]), dynamic routes (`model: "dynamic/NAME"`, [`dynamic`]), the
//! circuit breaker that skips an upstream that keeps failing ([`breaker`]) and the canary that
//! serves a share of a gateway's traffic with another gateway's settings ([`Canary`]).
//!
//! A chain is a list of [`Step`]s; the phases run the cache, limits and upstream phases once per
//! step until one answers 2xx ([`crate::phases`]). A request that uses none of this never builds a
//! chain: the route phase and the body's model say so before anything is allocated.

pub mod breaker;
pub mod dynamic;
pub mod universal;

use std::sync::Arc;
use std::time::Duration;

use aigate_store::MetaValue;
use bytes::Bytes;
use http::HeaderMap;

use crate::config::{Gateway, Settings};
use crate::headers::{CF_AIG_AUTHORIZATION, CF_AIG_METADATA};
use crate::providers::AuthStyle;

/// The most steps in one chain (a Universal request's array, a route's arm).
pub const MAX_STEPS: usize = 10;

/// One place a request may be sent: a provider, the request for it, and the step's own settings.
#[derive(Debug, Clone)]
pub struct Step {
    /// A configured provider, or `compat` (the model names the provider).
    pub provider: String,
    /// The provider path, e.g. `chat/completions`.
    pub endpoint: String,
    /// The body as the client would have sent it to that provider.
    pub body: Bytes,
    /// Headers that replace the request's for this step (Universal: a step's `headers`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Time to the first byte, instead of the request's.
    pub timeout: Option<Duration>,
    /// Retries, instead of the request's.
    pub retry: RetryOverride,
    /// The model, for `cf-aig-model` (dynamic routes).
    pub model: Option<String>,
}

/// A step's own retry settings (Universal's `config`, a route step's `max_attempts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryOverride {
    /// Attempts in all, 1 to 5.
    pub max_attempts: Option<u32>,
    /// Wait before the first retry.
    pub delay: Option<Duration>,
    /// How the wait grows.
    pub backoff: Option<crate::config::Backoff>,
}

/// A request's chain of steps.
#[derive(Debug)]
pub struct Chain {
    /// Tried in order until one answers 2xx.
    pub steps: Vec<Step>,
    /// `NAME@VERSION` of the dynamic route that built it.
    pub route: Option<String>,
}

/// What makes a caller stick to one side of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// The caller's credentials (gateway token and provider key).
    Credential,
    /// The value of a `cf-aig-metadata` key.
    Metadata(String),
}

impl Sticky {
    /// Parses `"credential"` or `"metadata.KEY"`.
    pub fn parse(s: &str) -> Result<Sticky, String> {
        match s {
            "credential" => Ok(Sticky::Credential),
            _ => match s.strip_prefix("metadata.") {
                Some(k) if !k.is_empty() => Ok(Sticky::Metadata(k.to_owned())),
                _ => Err(format!("{s:?} is not \"credential\" or \"metadata.KEY\"")),
            },
        }
    }
}

/// The request's `cf-aig-metadata`, parsed once when a split or a condition needs it.
#[derive(Default)]
pub struct Metadata<'h> {
    header: Option<&'h [u8]>,
    parsed: Option<Vec<(String, MetaValue)>>,
}

impl<'h> Metadata<'h> {
    /// The metadata of a request with these headers.
    pub fn of(headers: &'h HeaderMap) -> Metadata<'h> {
        Metadata { header: headers.get(CF_AIG_METADATA).map(|v| v.as_bytes()), parsed: None }
    }

    /// The value of `key`, as text.
    pub fn get(&mut self, key: &str) -> Option<String> {
        let header = self.header;
        let entries =
            self.parsed.get_or_insert_with(|| header.and_then(crate::logs::parse_metadata).unwrap_or_default());
        entries.iter().find(|(k, _)| k == key).map(|(_, v)| match v {
            MetaValue::String(s) => s.clone(),
            MetaValue::Number(n) => n.to_string(),
            MetaValue::Bool(b) => b.to_string(),
        })
    }
}

/// A point in `[0, 1)` for a split: the same for every request of a sticky caller (a hash of its
/// key, salted so that two splits do not pick the same callers), else random.
pub fn draw(sticky: Option<&Sticky>, salt: &str, headers: &HeaderMap, metadata: &mut Metadata<'_>) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(salt.as_bytes());
    h.update(&[0]);
    let keyed = match sticky {
        Some(Sticky::Credential) => {
            let mut any = false;
            for name in std::iter::once(CF_AIG_AUTHORIZATION.clone()).chain(AuthStyle::ALL.iter().map(|s| s.header())) {
                if let Some(v) = headers.get(name) {
                    h.update(v.as_bytes());
                    h.update(&[0]);
                    any = true;
                }
            }
            any
        }
        Some(Sticky::Metadata(key)) => match metadata.get(key) {
            Some(v) => {
                h.update(v.as_bytes());
                true
            }
            None => false,
        },
        None => false,
    };
    let x = if keyed {
        let bytes = h.finalize();
        u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]))
    } else {
        let mut raw = [0u8; 8];
        // No randomness from the OS (never seen on Linux): every request takes the first arm.
        getrandom::fill(&mut raw).ok();
        u64::from_le_bytes(raw)
    };
    // 53 random bits: exactly representable.
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// `[gateways.NAME.canary]`, validated.
#[derive(Debug, Clone)]
pub struct Canary {
    /// The gateway that serves the canary share.
    pub gateway: String,
    /// The share, 0 to 100.
    pub percent: f64,
    /// A caller stays on one side.
    pub sticky: Option<Sticky>,
}

impl Canary {
    /// The gateway a request addressed to `gateway` is served by: the canary gateway for
    /// `percent` % of requests, else `None` (the addressed one).
    pub fn choose(settings: &Settings, gateway: &Gateway, headers: &HeaderMap) -> Option<Arc<Gateway>> {
        let canary = gateway.canary.as_ref()?;
        let x = draw(canary.sticky.as_ref(), &gateway.name, headers, &mut Metadata::of(headers));
        if x * 100.0 < canary.percent {
            settings.gateways.get(&canary.gateway).cloned()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_draws_repeat_and_spread() {
        let mut h = HeaderMap::new();
        h.insert("cf-aig-metadata", r#"{"user":"u1"}"#.parse().unwrap());
        let s = Sticky::parse("metadata.user").unwrap();
        let a = draw(Some(&s), "r", &h, &mut Metadata::of(&h));
        assert_eq!(a, draw(Some(&s), "r", &h, &mut Metadata::of(&h)));
        assert_ne!(a, draw(Some(&s), "other-route", &h, &mut Metadata::of(&h)));
        let n = 20_000;
        let below = (0..n).filter(|_| draw(None, "r", &h, &mut Metadata::of(&h)) < 0.1).count();
        assert!((1600..2400).contains(&below), "{below}");
        assert!(Sticky::parse("metadata.").is_err() && Sticky::parse("user").is_err());
    }
}
