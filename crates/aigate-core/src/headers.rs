//! Header names aigate reads or writes, as constants.

use http::HeaderName;

/// Gateway token, `Bearer <token>` (request).
pub const CF_AIG_AUTHORIZATION: HeaderName = HeaderName::from_static("cf-aig-authorization");
/// Attempts in all for a failing upstream request (1-5).
pub const CF_AIG_MAX_ATTEMPTS: HeaderName = HeaderName::from_static("cf-aig-max-attempts");
/// Wait before a retry, ms (0-5000).
pub const CF_AIG_RETRY_DELAY: HeaderName = HeaderName::from_static("cf-aig-retry-delay");
/// How the wait grows: `constant`, `linear` or `exponential`.
pub const CF_AIG_BACKOFF: HeaderName = HeaderName::from_static("cf-aig-backoff");
/// The gateway of a request in Cloudflare's REST layout (`/client/v4/accounts/…/ai/v1/…`).
pub const CF_AIG_GATEWAY_ID: HeaderName = HeaderName::from_static("cf-aig-gateway-id");
/// The 0-based index of the fallback step that answered (response).
pub const CF_AIG_STEP: HeaderName = HeaderName::from_static("cf-aig-step");
/// The model a dynamic route sent the request to (response).
pub const CF_AIG_MODEL: HeaderName = HeaderName::from_static("cf-aig-model");
/// The provider a dynamic route sent the request to (response).
pub const CF_AIG_PROVIDER: HeaderName = HeaderName::from_static("cf-aig-provider");
/// The gateway whose settings served the request, when the addressed one has a canary (response).
pub const AIGATE_GATEWAY: HeaderName = HeaderName::from_static("aigate-gateway");
/// Log id of this request, a UUIDv7 (response).
pub const CF_AIG_LOG_ID: HeaderName = HeaderName::from_static("cf-aig-log-id");
/// Client-chosen event id, echoed back (request and response).
pub const CF_AIG_EVENT_ID: HeaderName = HeaderName::from_static("cf-aig-event-id");
/// Time to first byte in ms before 504 (request).
pub const CF_AIG_REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("cf-aig-request-timeout");
/// Prefix of every gateway header; all are consumed and never sent upstream.
pub const CF_AIG_PREFIX: &str = "cf-aig-";
/// Legacy gateway headers that are consumed too.
pub const LEGACY_CF_HEADERS: &[&str] = &["cf-cache-ttl", "cf-skip-cache"];

/// Hop-by-hop headers (RFC 9110 §7.6.1) that a proxy must not forward. Parsed once: removing by
/// `&str` would parse the name again on every request.
pub static HOP_BY_HOP: std::sync::LazyLock<[HeaderName; 9]> = std::sync::LazyLock::new(|| {
    [
        http::header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        http::header::PROXY_AUTHENTICATE,
        http::header::PROXY_AUTHORIZATION,
        http::header::TE,
        http::header::TRAILER,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
        HeaderName::from_static("proxy-connection"),
    ]
});
/// Cloudflare's cache status, `HIT` or `MISS` (response).
pub const CF_AIG_CACHE_STATUS: HeaderName = HeaderName::from_static("cf-aig-cache-status");
/// aigate's finer cache status: `HIT`, `MISS`, `BYPASS`, `OFF`, `SHADOW-HIT` (response).
pub const AIGATE_CACHE: HeaderName = HeaderName::from_static("aigate-cache");
/// The cache key digest of a cacheable request, usable with the purge API (response).
pub const AIGATE_CACHE_KEY: HeaderName = HeaderName::from_static("aigate-cache-key");
/// Response: the name of the cache rule that applied to the request (absent when none did).
pub const AIGATE_CACHE_RULE: HeaderName = HeaderName::from_static("aigate-cache-rule");
/// Skip the cache for this request (request).
pub const CF_AIG_SKIP_CACHE: HeaderName = HeaderName::from_static("cf-aig-skip-cache");
/// Legacy name of `cf-aig-skip-cache`.
pub const CF_SKIP_CACHE: HeaderName = HeaderName::from_static("cf-skip-cache");
/// TTL in seconds of this request's cache entry (request).
pub const CF_AIG_CACHE_TTL: HeaderName = HeaderName::from_static("cf-aig-cache-ttl");
/// Legacy name of `cf-aig-cache-ttl`.
pub const CF_CACHE_TTL: HeaderName = HeaderName::from_static("cf-cache-ttl");
/// Client-chosen cache key (request).
pub const CF_AIG_CACHE_KEY: HeaderName = HeaderName::from_static("cf-aig-cache-key");
/// Anthropic's credential header.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Azure OpenAI's credential header.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");
/// Google AI Studio's credential header.
pub const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
/// Flat JSON object of up to five entries attached to the request's log record.
pub const CF_AIG_METADATA: HeaderName = HeaderName::from_static("cf-aig-metadata");
/// Per-token prices overriding the price table for one request.
pub const CF_AIG_CUSTOM_COST: HeaderName = HeaderName::from_static("cf-aig-custom-cost");
/// `false` skips the request's log record.
pub const CF_AIG_COLLECT_LOG: HeaderName = HeaderName::from_static("cf-aig-collect-log");
/// `false` keeps the record without bodies.
pub const CF_AIG_COLLECT_LOG_PAYLOAD: HeaderName = HeaderName::from_static("cf-aig-collect-log-payload");

/// A header map from static pairs (tests).
#[cfg(test)]
pub(crate) fn map(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, http::HeaderValue::from_static(v));
    }
    h
}
