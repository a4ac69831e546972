//! Phase 1, route: from the request path to the gateway, the provider, the provider path, the
//! [`Endpoint`] and the upstream URL.
//!
//! Four URL forms reach the same gateways:
//! 1. Cloudflare's layout `/v1/{account_id}/{gateway_id}/{provider}/{path}`;
//! 2. the short layout `/{gateway_id}/{provider}/{path}`;
//! 3. the plain OpenAI layout `/v1/{path}`, served by `default_gateway` and the `openai` provider;
//! 4. Cloudflare's REST layout `/client/v4/accounts/{account_id}/ai/v1/chat/completions`, the
//!    gateway named by `cf-aig-gateway-id` (the default gateway without it).
//!
//! A `/v1/...` path is read as form 1 when, after `/v1/`, its second segment names a configured
//! gateway or its third a known provider; otherwise it is form 3. The provider `compat` (forms 1
//! and 2), form 4, and `POST /v1/chat/completions` in form 3 take OpenAI's chat format for any
//! provider: the body's `provider/model` picks it, after the body is read ([`crate::translate`]).
//!
//! Reads: the method, path and query. Writes: the [`Route`] the later phases use. Fails closed,
//! before anything is read or sent: an unknown gateway (or account) answers 404, an unknown
//! provider 400, both naming what exists; an account id or provider path that could leave the
//! provider's base URL (`..`, encoded separators) answers 400.

use std::sync::Arc;

use http::Uri;

use crate::config::{Gateway, Settings};
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::headers::CF_AIG_GATEWAY_ID;
use crate::providers::{check_segment, Provider};
use crate::translate::Compat;

/// Which URL form a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlForm {
    /// `/v1/{account}/{gateway}/{provider}/...`
    Cloudflare,
    /// `/{gateway}/{provider}/...`
    Short,
    /// `/v1/...` on the default gateway and `openai`.
    OpenAi,
    /// `/client/v4/accounts/{account}/ai/v1/...`, the gateway from `cf-aig-gateway-id`.
    Rest,
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
    /// What the request is.
    pub endpoint: Endpoint,
    /// Where it goes: the provider's base URL with the provider path and query appended.
    pub upstream: Uri,
    /// Whether the provider is still to be chosen by the body's model.
    pub compat: Compat,
}

/// Routes a gateway request.
pub fn route<'p>(
    settings: &Settings,
    method: &http::Method,
    uri: &'p Uri,
    headers: &http::HeaderMap,
) -> Result<Route<'p>, GatewayError> {
    let (gateway, provider, account_id, rest, form) = resolve(settings, uri.path(), headers)?;
    let compat = match (provider, form) {
        ("", UrlForm::Cloudflare | UrlForm::Short) if rest.is_empty() => {
            if method != http::Method::POST {
                return Err(GatewayError::NotFound(format!(
                    "the Universal Endpoint is POST /v1/{{account}}/{{gateway}} with a JSON array of steps \
                     (asked for {method}); provider requests go to /v1/{{account}}/{{gateway}}/{{provider}}/..."
                )));
            }
            Compat::Universal
        }
        ("compat", _) | (_, UrlForm::Rest) => compat_of(method, rest)?,
        (_, UrlForm::OpenAi) if rest == "chat/completions" && method == http::Method::POST => Compat::IfPrefixed,
        _ => Compat::No,
    };
    // Until the body names the provider, a compat request is routed as one for OpenAI.
    let provider = if matches!(compat, Compat::No | Compat::IfPrefixed) { provider } else { "openai" };
    let (gateway, provider) = lookup(settings, gateway, provider)?;
    if let Some(account) = account_id {
        check_segment(account).map_err(|e| GatewayError::BadRequest(format!("invalid account id in the URL: {e}")))?;
    }
    let upstream = provider
        .upstream_uri(if compat == Compat::No { account_id } else { None }, rest, uri.query())
        .map_err(|e| GatewayError::BadRequest(format!("invalid provider path: {e}")))?;
    let endpoint = Endpoint::classify(&provider.name, method, rest);
    Ok(Route { gateway, provider, account_id, rest, form, endpoint, upstream, compat })
}

/// Which format a request to the API for every provider is written in, by its path.
fn compat_of(method: &http::Method, rest: &str) -> Result<Compat, GatewayError> {
    let compat = match rest {
        "chat/completions" => Compat::Chat,
        "messages" | "v1/messages" => Compat::Messages,
        "responses" | "v1/responses" => Compat::Responses,
        _ => Compat::No,
    };
    if compat == Compat::No || method != http::Method::POST {
        return Err(GatewayError::NotFound(format!(
            "the API for every provider is POST .../chat/completions, .../v1/messages or .../responses \
             (asked for {method} .../{rest})"
        )));
    }
    Ok(compat)
}

/// The route of one step of a chain: `provider` and `endpoint` on the request's gateway. The
/// provider `compat` keeps the request's format (a dynamic route's step; its body's model names
/// the provider), or takes the one `endpoint` names (a Universal step).
pub fn for_step<'p>(
    settings: &Settings,
    base: &Route<'p>,
    provider: &str,
    endpoint: &'p str,
) -> Result<Route<'p>, GatewayError> {
    if provider == "compat" {
        let compat = match base.compat {
            Compat::Universal => compat_of(&http::Method::POST, endpoint)?,
            Compat::IfPrefixed => Compat::Chat,
            c => c,
        };
        let rest = if base.compat == Compat::Universal { endpoint } else { base.rest };
        return Ok(Route { compat, rest, ..base.clone() });
    }
    let provider = settings.providers.get(provider).cloned().ok_or_else(|| GatewayError::UnknownProvider {
        provider: provider.to_string(),
        known: sorted(settings.providers.keys()),
    })?;
    let upstream = provider
        .upstream_uri(base.account_id, endpoint, None)
        .map_err(|e| GatewayError::BadRequest(format!("invalid endpoint: {e}")))?;
    let endpoint_kind = Endpoint::classify(&provider.name, &http::Method::POST, endpoint);
    Ok(Route {
        gateway: base.gateway.clone(),
        provider,
        account_id: base.account_id,
        rest: endpoint,
        form: base.form,
        endpoint: endpoint_kind,
        upstream,
        compat: Compat::No,
    })
}

/// The names in a gateway path: (gateway, provider, account id, provider path, form).
type Names<'s, 'p> = (&'s str, &'s str, Option<&'p str>, &'p str, UrlForm);

/// Splits a gateway path (the raw request path, starting with `/`) into its names.
fn resolve<'s, 'p: 's>(
    settings: &'s Settings,
    path: &'p str,
    headers: &'s http::HeaderMap,
) -> Result<Names<'s, 'p>, GatewayError> {
    if let Some(after) = path.strip_prefix("/client/v4/accounts/") {
        let (account, rest) = after.split_once('/').unwrap_or((after, ""));
        let rest = rest.strip_prefix("ai/v1/").ok_or_else(|| {
            GatewayError::NotFound(
                "Cloudflare's REST layout is /client/v4/accounts/{account}/ai/v1/chat/completions".into(),
            )
        })?;
        if let Some(required) = &settings.account_id {
            if required != account {
                return Err(GatewayError::UnknownAccount { account: account.to_string() });
            }
        }
        let gateway = match headers.get(CF_AIG_GATEWAY_ID) {
            Some(v) => v.to_str().map_err(|_| GatewayError::BadRequest("cf-aig-gateway-id is not text".into()))?,
            None => &settings.default_gateway,
        };
        return Ok((gateway, "compat", Some(account), rest, UrlForm::Rest));
    }
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
            || provider.is_some_and(|p| p == "compat" || settings.providers.contains_key(p));
        if is_cf {
            if let Some(required) = &settings.account_id {
                if required != account {
                    return Err(GatewayError::UnknownAccount { account: account.to_string() });
                }
            }
            let (gateway, provider) = (gateway.unwrap_or(""), provider.unwrap_or(""));
            return Ok((gateway, provider, Some(account), rest, UrlForm::Cloudflare));
        }
        return Ok((&settings.default_gateway, "openai", None, after_first, UrlForm::OpenAi));
    }

    let mut segs = after_first.splitn(2, '/');
    let provider = segs.next().unwrap_or("");
    let rest = segs.next().unwrap_or("");
    Ok((first, provider, None, rest, UrlForm::Short))
}

fn lookup(settings: &Settings, gateway: &str, provider: &str) -> Result<(Arc<Gateway>, Arc<Provider>), GatewayError> {
    let gw = settings.gateways.get(gateway).ok_or_else(|| GatewayError::UnknownGateway {
        gateway: gateway.to_string(),
        known: known_gateways(settings),
    })?;
    let pr = settings.providers.get(provider).ok_or_else(|| GatewayError::UnknownProvider {
        provider: provider.to_string(),
        known: sorted(settings.providers.keys()),
    })?;
    Ok((gw.clone(), pr.clone()))
}

/// The configured gateways' names, sorted and comma-separated (for error messages).
pub fn known_gateways(settings: &Settings) -> String {
    sorted(settings.gateways.keys())
}

fn sorted<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut v: Vec<&str> = names.map(String::as_str).collect();
    v.sort_unstable();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve<'p>(s: &Settings, path: &'p str) -> Result<Route<'p>, GatewayError> {
        let uri: &'p Uri = Box::leak(Box::new(path.parse::<Uri>().unwrap()));
        route(s, &http::Method::POST, uri, &http::HeaderMap::new())
    }

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
