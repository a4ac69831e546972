//! Stage 1, routing: from the request path to (gateway, provider, provider path).
//!
//! Three URL forms reach the same gateways:
//! 1. Cloudflare's layout `/v1/{account_id}/{gateway_id}/{provider}/{path}`;
//! 2. the short layout `/{gateway_id}/{provider}/{path}`;
//! 3. the plain OpenAI layout `/v1/{path}`, served by `default_gateway` and the `openai` provider.
//!
//! A `/v1/...` path is read as form 1 when, after `/v1/`, its second segment names a configured
//! gateway or its third a known provider; otherwise it is form 3.
//!
//! Reads: the path. Writes: the [`Route`] the later stages use. Fails closed: an unknown gateway
//! (or account) answers 404, an unknown provider 400, both naming what exists.

use std::sync::Arc;

use crate::config::{Gateway, Settings};
use crate::error::GatewayError;
use crate::providers::Provider;

/// Which URL form a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlForm {
    /// `/v1/{account}/{gateway}/{provider}/...`
    Cloudflare,
    /// `/{gateway}/{provider}/...`
    Short,
    /// `/v1/...` on the default gateway and `openai`.
    OpenAi,
}

/// A resolved gateway route.
#[derive(Debug, Clone)]
pub struct Route<'p> {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// The provider.
    pub provider: Arc<Provider>,
    /// Account id from a Cloudflare-layout URL.
    pub account_id: Option<&'p str>,
    /// The provider path (percent-encoded, no leading slash).
    pub rest: &'p str,
    /// The URL form used.
    pub form: UrlForm,
}

/// Resolves a gateway path. `path` is the raw request path (starts with `/`).
pub fn resolve<'p>(settings: &Settings, path: &'p str) -> Result<Route<'p>, GatewayError> {
    let trimmed = path.trim_start_matches('/');
    let mut it = trimmed.splitn(2, '/');
    let first = it.next().unwrap_or("");
    let after_first = it.next().unwrap_or("");

    if first == "v1" {
        let mut segs = after_first.splitn(4, '/');
        let account = segs.next().unwrap_or("");
        let gateway = segs.next();
        let provider = segs.next();
        let rest = segs.next().unwrap_or("");
        let is_cf = gateway.is_some_and(|g| settings.gateways.contains_key(g))
            || provider.is_some_and(|p| settings.providers.contains_key(p));
        if is_cf {
            let gateway = gateway.unwrap_or("");
            let provider = provider.unwrap_or("");
            if let Some(required) = &settings.account_id {
                if required != account {
                    return Err(GatewayError::UnknownAccount { account: account.to_string() });
                }
            }
            return build(settings, gateway, provider, Some(account), rest, UrlForm::Cloudflare);
        }
        let gateway = settings.default_gateway.clone();
        return build(settings, &gateway, "openai", None, after_first, UrlForm::OpenAi);
    }

    let mut segs = after_first.splitn(2, '/');
    let provider = segs.next().unwrap_or("");
    let rest = segs.next().unwrap_or("");
    build(settings, first, provider, None, rest, UrlForm::Short)
}

fn build<'p>(
    settings: &Settings,
    gateway: &str,
    provider: &str,
    account_id: Option<&'p str>,
    rest: &'p str,
    form: UrlForm,
) -> Result<Route<'p>, GatewayError> {
    let gw = settings.gateways.get(gateway).ok_or_else(|| GatewayError::UnknownGateway {
        gateway: gateway.to_string(),
        known: sorted(settings.gateways.keys()),
    })?;
    let pr = settings.providers.get(provider).ok_or_else(|| GatewayError::UnknownProvider {
        provider: provider.to_string(),
        known: sorted(settings.providers.keys()),
    })?;
    Ok(Route { gateway: gw.clone(), provider: pr.clone(), account_id, rest, form })
}

fn sorted<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut v: Vec<&str> = names.map(String::as_str).collect();
    v.sort_unstable();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::from_toml_with("[gateways.default]\n[gateways.prod]\n", &|_| None).unwrap()
    }

    #[test]
    fn three_forms() {
        let s = settings();
        let r = resolve(&s, "/v1/acct/prod/openai/chat/completions").unwrap();
        assert_eq!(
            (&*r.gateway.name, r.provider.name.as_str(), r.rest, r.form),
            ("prod", "openai", "chat/completions", UrlForm::Cloudflare)
        );
        assert_eq!(r.account_id, Some("acct"));
        let r = resolve(&s, "/prod/anthropic/v1/messages").unwrap();
        assert_eq!(
            (&*r.gateway.name, r.provider.name.as_str(), r.rest, r.form),
            ("prod", "anthropic", "v1/messages", UrlForm::Short)
        );
        let r = resolve(&s, "/v1/chat/completions").unwrap();
        assert_eq!(
            (&*r.gateway.name, r.provider.name.as_str(), r.rest, r.form),
            ("default", "openai", "chat/completions", UrlForm::OpenAi)
        );
        let r = resolve(&s, "/v1/models").unwrap();
        assert_eq!(r.rest, "models");
    }

    #[test]
    fn unknown_names() {
        let s = settings();
        // Third segment a known provider: Cloudflare layout with an unknown gateway.
        let e = resolve(&s, "/v1/acct/nope/openai/chat/completions").unwrap_err();
        assert!(matches!(e, GatewayError::UnknownGateway { .. }));
        assert!(e.to_string().contains("nope") && e.to_string().contains("default, prod"));
        let e = resolve(&s, "/v1/acct/prod/nosuch/x").unwrap_err();
        assert!(matches!(e, GatewayError::UnknownProvider { .. }));
        assert!(e.to_string().contains("nosuch") && e.to_string().contains("openai"));
        let e = resolve(&s, "/zzz/openai/x").unwrap_err();
        assert!(matches!(e, GatewayError::UnknownGateway { .. }));
    }

    #[test]
    fn account_id_enforced_when_configured() {
        let s = Settings::from_toml_with("account_id = \"a1\"\n[gateways.default]\n", &|_| None).unwrap();
        assert!(resolve(&s, "/v1/a1/default/openai/models").is_ok());
        assert!(matches!(resolve(&s, "/v1/a2/default/openai/models"), Err(GatewayError::UnknownAccount { .. })));
    }
}
