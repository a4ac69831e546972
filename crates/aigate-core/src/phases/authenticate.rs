//! Phase 2, authenticate: who the caller is.
//!
//! On a gateway with `authentication = true`, the request must carry
//! `cf-aig-authorization: Bearer <token>` matching one of the gateway's tokens. Tokens are
//! compared in constant time (`subtle`), every configured token is compared so the time does not
//! tell which one matched, and the header is never logged.
//!
//! The caller's credentials ([`Caller`]) are the provider credential the request will use (the
//! gateway's stored key for the provider, else the credential headers the client sent) and its
//! gateway token: what the cache key covers under `scope = "credential"` and what `credential`
//! limit keys count per.
//!
//! Reads: the `cf-aig-authorization` and credential headers, the gateway's tokens and stored keys.
//! Writes nothing. Fails closed with 401.

use http::HeaderMap;
use subtle::ConstantTimeEq;

use super::route::Route;
use crate::config::Gateway;
use crate::error::GatewayError;
use crate::headers::CF_AIG_AUTHORIZATION;
use crate::providers::AuthStyle;

/// The credential material of a request, borrowed from its headers and its gateway.
pub struct Caller<'a> {
    parts: [&'a [u8]; 5],
    n: usize,
}

impl<'a> Caller<'a> {
    /// The provider credential(s) and the gateway token, in a fixed order.
    pub fn credentials(&self) -> &[&'a [u8]] {
        &self.parts[..self.n]
    }

    fn push(&mut self, v: &'a [u8]) {
        self.parts[self.n] = v;
        self.n += 1;
    }
}

/// The caller's credentials, once [`check`] has passed (the provider is known: a request in
/// OpenAI's format for another provider learns it from its body).
pub fn caller<'a>(route: &'a Route<'_>, headers: &'a HeaderMap) -> Caller<'a> {
    let mut caller = Caller { parts: [&[]; 5], n: 0 };
    if let Some(k) = route.gateway.provider_keys.get(&route.provider.name) {
        caller.push(k.expose().as_bytes());
    } else {
        for style in AuthStyle::ALL {
            if let Some(v) = headers.get(style.header()) {
                caller.push(v.as_bytes());
            }
        }
    }
    if let Some(v) = headers.get(CF_AIG_AUTHORIZATION) {
        caller.push(v.as_bytes());
    }
    caller
}

/// Checks the gateway token, before the body is read.
pub fn check(gateway: &Gateway, headers: &HeaderMap) -> Result<(), GatewayError> {
    if !gateway.authentication {
        return Ok(());
    }
    let presented = headers
        .get(CF_AIG_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(GatewayError::Unauthorized)?;
    let mut ok = subtle::Choice::from(0u8);
    for t in &gateway.tokens {
        ok |= t.expose().as_bytes().ct_eq(presented.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::time::Duration;

    fn gw(auth: bool) -> Gateway {
        Gateway {
            name: "g".into(),
            authentication: auth,
            tokens: vec![Secret::new("t1"), Secret::new("t2")],
            provider_keys: Default::default(),
            request_timeout: Duration::from_secs(1),
            cache: crate::config::validate_cache_for_tests(),
            logs: crate::config::validate_logs_for_tests(),
            report: Default::default(),
            rules: Vec::new(),
            retries: crate::config::RetrySettings::NONE,
            routes: Default::default(),
            canary: None,
            breaker: None,
        }
    }

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(CF_AIG_AUTHORIZATION, v.parse().unwrap());
        m
    }

    #[test]
    fn cases() {
        assert!(check(&gw(false), &HeaderMap::new()).is_ok());
        assert!(check(&gw(true), &HeaderMap::new()).is_err());
        assert!(check(&gw(true), &h("Bearer t2")).is_ok());
        assert!(check(&gw(true), &h("Bearer t3")).is_err());
        assert!(check(&gw(true), &h("t1")).is_err());
        assert!(check(&gw(true), &h("Bearer t")).is_err());
    }
}
