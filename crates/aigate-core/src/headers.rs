//! Header names aigate reads or writes, as constants.

use http::HeaderName;

/// Gateway token, `Bearer <token>` (request).
pub const CF_AIG_AUTHORIZATION: HeaderName = HeaderName::from_static("cf-aig-authorization");
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) that a proxy must not forward.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];
/// Cloudflare's cache status, `HIT` or `MISS` (response).
pub const CF_AIG_CACHE_STATUS: HeaderName = HeaderName::from_static("cf-aig-cache-status");
/// aigate's finer cache status: `HIT`, `MISS`, `BYPASS`, `OFF`, `SHADOW-HIT` (response).
pub const AIGATE_CACHE: HeaderName = HeaderName::from_static("aigate-cache");
/// The cache key digest of a cacheable request, usable with the purge API (response).
pub const AIGATE_CACHE_KEY: HeaderName = HeaderName::from_static("aigate-cache-key");
