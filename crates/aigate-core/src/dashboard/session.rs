//! Dashboard sessions: a login with the admin token sets a cookie holding a random id, its expiry
//! and a MAC keyed by the admin token. Any replica that has the same admin token accepts it, a new
//! admin token ends every session, and nothing is stored per session except the ids logged out
//! early (kept until they would have expired anyway, at most [`MAX_REVOKED`]).
//!
//! Changes (POST, PUT, PATCH, DELETE) also need the session's CSRF token, derived from the same
//! key and the session id, sent as the `x-csrf-token` header or a `csrf` form field; the cookie
//! is `SameSite=Strict` besides.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::HeaderMap;

/// The cookie's name.
pub const COOKIE: &str = "aigate_session";
/// Most sessions remembered as logged out before their expiry; beyond it the oldest are dropped.
const MAX_REVOKED: usize = 10_000;

/// A valid session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The random id, hex.
    pub id: String,
    /// Expiry, Unix ms.
    pub expires_ms: u64,
}

/// The ids of sessions logged out before their expiry.
#[derive(Default)]
pub struct Sessions {
    revoked: Mutex<HashMap<String, u64>>,
}

impl Sessions {
    /// A new session for a successful login: its cookie value and the session.
    pub fn create(&self, admin_token: &str, now_ms: u64, ttl: Duration) -> Option<(String, Session)> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).ok()?;
        let id = hex(&raw);
        let expires_ms = now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mac = mac(admin_token, &id, expires_ms);
        Some((format!("{id}.{expires_ms}.{mac}"), Session { id, expires_ms }))
    }

    /// The session of a request's cookie, if it is genuine, unexpired and not logged out.
    pub fn verify(&self, admin_token: &str, headers: &HeaderMap, now_ms: u64) -> Option<Session> {
        let value = cookie(headers, COOKIE)?;
        let mut parts = value.splitn(3, '.');
        let (id, expires, presented) = (parts.next()?, parts.next()?, parts.next()?);
        let expires_ms: u64 = expires.parse().ok()?;
        let expected = blake3::Hash::from_hex(mac(admin_token, id, expires_ms)).ok()?;
        // blake3::Hash compares in constant time.
        if blake3::Hash::from_hex(presented).ok()? != expected || expires_ms <= now_ms {
            return None;
        }
        let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        if revoked.contains_key(id) {
            return None;
        }
        Some(Session { id: id.to_owned(), expires_ms })
    }

    /// Ends a session before its expiry.
    pub fn revoke(&self, session: &Session, now_ms: u64) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        revoked.retain(|_, exp| *exp > now_ms);
        if revoked.len() >= MAX_REVOKED {
            if let Some(oldest) = revoked.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                revoked.remove(&oldest);
            }
        }
        revoked.insert(session.id.clone(), session.expires_ms);
    }
}

/// The CSRF token of a session.
pub fn csrf_token(admin_token: &str, session: &Session) -> String {
    let mut h = blake3::Hasher::new_keyed(&key(admin_token));
    h.update(b"csrf.");
    h.update(session.id.as_bytes());
    h.finalize().to_hex()[..32].to_owned()
}

/// Whether `presented` is the session's CSRF token (constant time).
pub fn csrf_ok(admin_token: &str, session: &Session, presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(csrf_token(admin_token, session).as_bytes().ct_eq(presented.as_bytes()))
}

/// The `Set-Cookie` value of a session; `secure` when the dashboard is reached over HTTPS.
pub fn set_cookie(value: &str, ttl: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/dashboard; Max-Age={}; HttpOnly; SameSite=Strict{secure}", ttl.as_secs())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/dashboard; Max-Age=0; HttpOnly; SameSite=Strict")
}

fn key(admin_token: &str) -> [u8; 32] {
    blake3::derive_key("aigate dashboard session v1", admin_token.as_bytes())
}

fn mac(admin_token: &str, id: &str, expires_ms: u64) -> String {
    let mut h = blake3::Hasher::new_keyed(&key(admin_token));
    h.update(id.as_bytes());
    h.update(b".");
    h.update(expires_ms.to_string().as_bytes());
    h.finalize().to_hex().to_string()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, format!("other=1; {COOKIE}={v}").parse().unwrap_or_else(|_| unreachable!()));
        h
    }

    #[test]
    fn a_session_is_accepted_until_it_expires_or_is_revoked() {
        let s = Sessions::default();
        let (cookie, session) = s.create("tok", 1_000, Duration::from_secs(60)).unwrap_or_else(|| unreachable!());
        assert_eq!(session.id.len(), 32);
        assert_eq!(s.verify("tok", &with_cookie(&cookie), 1_001), Some(session.clone()));
        assert_eq!(s.verify("tok", &with_cookie(&cookie), 61_000), None, "expired");
        assert_eq!(s.verify("other token", &with_cookie(&cookie), 1_001), None, "another admin token");
        s.revoke(&session, 1_002);
        assert_eq!(s.verify("tok", &with_cookie(&cookie), 1_003), None, "logged out");
    }

    #[test]
    fn a_forged_or_extended_cookie_is_refused() {
        let s = Sessions::default();
        let (cookie, session) = s.create("tok", 1_000, Duration::from_secs(60)).unwrap_or_else(|| unreachable!());
        let mac = cookie.rsplit('.').next().unwrap_or_default();
        let extended = format!("{}.{}.{mac}", session.id, session.expires_ms + 1_000_000);
        assert_eq!(s.verify("tok", &with_cookie(&extended), 1_001), None);
        for bad in ["", "x", "a.b.c", "..", &format!("{}.{}.zz", session.id, session.expires_ms)] {
            assert_eq!(s.verify("tok", &with_cookie(bad), 1_001), None, "{bad:?}");
        }
        assert_eq!(s.verify("tok", &HeaderMap::new(), 1_001), None);
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let s = Sessions::default();
        let (_, a) = s.create("tok", 0, Duration::from_secs(60)).unwrap_or_else(|| unreachable!());
        let (_, b) = s.create("tok", 0, Duration::from_secs(60)).unwrap_or_else(|| unreachable!());
        assert!(csrf_ok("tok", &a, &csrf_token("tok", &a)));
        assert!(!csrf_ok("tok", &a, &csrf_token("tok", &b)));
        assert!(!csrf_ok("tok", &a, ""));
    }
}
