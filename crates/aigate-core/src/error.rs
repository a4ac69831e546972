//! The one error type at the edge: every failure of the request path becomes a status code and an
//! OpenAI-shaped body `{"error":{"message","type","code"}}`. Messages name what went wrong (the
//! gateway, the provider, the header) and never carry credentials or internal details.

use http::{HeaderValue, Response, StatusCode};

use crate::body::GatewayBody;

/// Who is to blame, for metrics and retry decisions later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong.
    Downstream,
    /// The provider failed or was unreachable.
    Upstream,
    /// aigate itself.
    Internal,
}

/// The `x-ratelimit-*` headers that describe a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateHeaders {
    /// `x-ratelimit-*-requests`.
    Requests,
    /// `x-ratelimit-*-tokens`.
    Tokens,
}

/// A failure on the request path.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No such gateway.
    #[error("gateway {gateway:?} not found; configured gateways: {known}")]
    UnknownGateway {
        /// What was asked for.
        gateway: String,
        /// What exists.
        known: String,
    },
    /// The account id in a Cloudflare-layout URL does not match the configured one.
    #[error("account {account:?} not found")]
    UnknownAccount {
        /// What was asked for.
        account: String,
    },
    /// No such provider.
    #[error("provider {provider:?} is not known; known providers: {known}")]
    UnknownProvider {
        /// What was asked for.
        provider: String,
        /// What exists.
        known: String,
    },
    /// The gateway requires a token and none (or a wrong one) was sent.
    #[error("this gateway requires authentication: send cf-aig-authorization: Bearer <gateway token>")]
    Unauthorized,
    /// Body above the configured limit.
    #[error("request body is larger than the gateway's limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// A malformed request (bad header value, bad path).
    #[error("{0}")]
    BadRequest(String),
    /// The client took longer than `request_body_timeout` to send its body.
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout {
        /// The timeout that applied.
        timeout_ms: u64,
    },
    /// The client's request body could not be read.
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// The provider could not be reached.
    #[error("could not reach provider {provider:?}: {reason}")]
    UpstreamUnreachable {
        /// The provider name.
        provider: String,
        /// A short, credential-free reason.
        reason: &'static str,
    },
    /// No first byte from the provider in time.
    #[error("provider {provider:?} did not answer within {timeout_ms} ms")]
    UpstreamTimeout {
        /// The provider name.
        provider: String,
        /// The timeout that applied.
        timeout_ms: u64,
    },
    /// The provider's circuit breaker is open (it kept failing) and no other step was left.
    #[error("provider {provider:?} is failing: aigate stopped sending it requests for now (circuit breaker open); retry in {retry_after_ms} ms")]
    CircuitOpen {
        /// The provider name.
        provider: String,
        /// Ms until a probe request is let through.
        retry_after_ms: u64,
    },
    /// A rate limit or budget refused the request.
    #[error("{message}")]
    RateLimited {
        /// Names the rule, the limit, what was used and when it resets.
        message: String,
        /// `rate_limit_exceeded` or `budget_exceeded`.
        code: &'static str,
        /// Ms until the request could pass.
        retry_after_ms: u64,
        /// The rule's limit.
        limit: u64,
        /// What is left of it.
        remaining: u64,
        /// Ms until it frees capacity.
        reset_ms: u64,
        /// Which `x-ratelimit-*` headers describe the rule (none for a spend limit).
        headers: Option<RateHeaders>,
    },
    /// The rate-limit store failed and the gateway is set to deny then.
    #[error("the rate-limit store is unavailable; this gateway refuses requests until it is back (on_store_error = \"deny\")")]
    LimitStoreUnavailable,
    /// A WebSocket upgrade: not supported yet.
    #[error("WebSocket connections are not supported by this aigate; send the request as plain HTTP")]
    WebSocketUnsupported,
    /// No such route of aigate's own (the admin API, the dashboard).
    #[error("{0}")]
    NotFound(String),
    /// The admin API is off.
    #[error("the admin API is disabled: set [admin] token in the configuration")]
    AdminDisabled,
    /// The admin token is missing or wrong.
    #[error("admin endpoints need Authorization: Bearer <admin token>")]
    AdminUnauthorized,
    /// A dashboard data call without a valid session.
    #[error("no dashboard session, or it expired: log in at /dashboard/login")]
    SessionRequired,
    /// Refused whoever asks (a change without its CSRF token, a cross-site form).
    #[error("{0}")]
    Forbidden(String),
    /// Cannot be done in the current state (settings that are read-only).
    #[error("{0}")]
    Conflict(String),
    /// No log record with this id.
    #[error("log record {id:?} not found")]
    LogNotFound {
        /// The id asked for.
        id: String,
    },
    /// A method the endpoint does not serve.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// A store (cache, logs) failed while serving an admin call.
    #[error("{store} error: {message}")]
    StoreUnavailable {
        /// Which store.
        store: &'static str,
        /// What failed (never a credential).
        message: String,
    },
    /// Anything else.
    #[error("internal gateway error")]
    Internal,
}

impl GatewayError {
    /// A store error met while serving an admin call: bad input is the caller's 400, anything
    /// else a 503 naming the store.
    pub fn store(store: &'static str, e: aigate_store::StoreError) -> GatewayError {
        match e {
            aigate_store::StoreError::InvalidInput(m) => GatewayError::BadRequest(m),
            e => GatewayError::StoreUnavailable { store, message: e.to_string() },
        }
    }
}

impl GatewayError {
    /// Status code, OpenAI error `type`, and `code`.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use GatewayError::*;
        match self {
            UnknownGateway { .. } => (StatusCode::NOT_FOUND, "invalid_request_error", "gateway_not_found"),
            UnknownAccount { .. } => (StatusCode::NOT_FOUND, "invalid_request_error", "account_not_found"),
            UnknownProvider { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", "provider_not_found"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "authentication_error", "gateway_unauthorized"),
            BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", "bad_request"),
            BodyRead(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", "body_read_error"),
            BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "request_timeout"),
            UpstreamUnreachable { .. } => (StatusCode::BAD_GATEWAY, "api_error", "upstream_unreachable"),
            UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout"),
            CircuitOpen { .. } => (StatusCode::SERVICE_UNAVAILABLE, "api_error", "circuit_open"),
            RateLimited { code, .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", code),
            LimitStoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "api_error", "limit_store_unavailable"),
            WebSocketUnsupported => (StatusCode::NOT_IMPLEMENTED, "invalid_request_error", "websocket_unsupported"),
            NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            AdminDisabled => (StatusCode::NOT_FOUND, "invalid_request_error", "admin_disabled"),
            AdminUnauthorized => (StatusCode::UNAUTHORIZED, "authentication_error", "admin_unauthorized"),
            SessionRequired => (StatusCode::UNAUTHORIZED, "authentication_error", "session_required"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error", "forbidden"),
            Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error", "conflict"),
            LogNotFound { .. } => (StatusCode::NOT_FOUND, "invalid_request_error", "log_not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed"),
            StoreUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "api_error", "store_unavailable"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "api_error", "internal_error"),
        }
    }

    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            GatewayError::UpstreamUnreachable { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::CircuitOpen { .. } => Blame::Upstream,
            GatewayError::Internal | GatewayError::StoreUnavailable { .. } => Blame::Internal,
            _ => Blame::Downstream,
        }
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response<GatewayBody> {
        let (status, kind, code) = self.parts();
        let mut resp = error_response(status, &self.to_string(), kind, code);
        if let GatewayError::CircuitOpen { retry_after_ms, .. } = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_ms.div_ceil(1000).max(1)));
            return resp;
        }
        if let GatewayError::RateLimited { retry_after_ms, limit, remaining, reset_ms, headers, .. } = self {
            use crate::limits::headers::*;
            let h = resp.headers_mut();
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_ms.div_ceil(1000).max(1)));
            let [l, r, t] = match headers {
                Some(RateHeaders::Tokens) => [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS],
                Some(RateHeaders::Requests) => [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS],
                None => return resp,
            };
            h.insert(l, HeaderValue::from(limit));
            h.insert(r, HeaderValue::from(remaining));
            if let Ok(v) = HeaderValue::from_str(&crate::limits::format_reset(reset_ms)) {
                h.insert(t, v);
            }
        }
        resp
    }
}

/// Builds an OpenAI-shaped error response.
pub fn error_response(status: StatusCode, message: &str, kind: &str, code: &str) -> Response<GatewayBody> {
    let body = serde_json::json!({ "error": { "message": message, "type": kind, "code": code, "param": null } });
    let mut resp = Response::new(GatewayBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let e = GatewayError::UpstreamUnreachable { provider: "openai".into(), reason: "connection refused" };
        assert_eq!(e.parts().0, StatusCode::BAD_GATEWAY);
        assert_eq!(e.blame(), Blame::Upstream);
        let r = e.into_response();
        assert_eq!(r.status(), 502);
        let GatewayBody::Full(Some(b)) = r.into_body() else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], "upstream_unreachable");
        assert!(v["error"]["message"].as_str().unwrap().contains("openai"));
        assert_eq!(v["error"]["type"], "api_error");
    }
}
