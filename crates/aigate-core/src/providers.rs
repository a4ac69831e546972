//! Providers: the built-in table (real base URLs and auth styles) and how a provider turns the
//! path a client sent into the upstream URL.
//!
//! The upstream URL is built from parts: scheme and host always come from the configured base URL,
//! and the client's path is only ever appended to the base path. A segment that is `.` or `..`
//! (also percent-encoded) or hides a `/` or `\` is refused, so a client cannot leave the base path or
//! reach another host. Base URLs may hold placeholders: `{account_id}` takes the account id of the
//! Cloudflare-layout URL, any other `{name}` takes the next leading segment of the client's path
//! (Azure's `{resource}/{deployment}`), checked against a strict character set.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, Uri};
use serde::Deserialize;

/// How the provider credential travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
    /// `x-goog-api-key: <key>` (Google AI Studio).
    XGoogApiKey,
}

impl AuthStyle {
    /// Every style, in a fixed order.
    pub const ALL: [AuthStyle; 4] = [AuthStyle::Bearer, AuthStyle::XApiKey, AuthStyle::ApiKey, AuthStyle::XGoogApiKey];

    /// The header that carries the credential.
    pub fn header(self) -> HeaderName {
        match self {
            AuthStyle::Bearer => http::header::AUTHORIZATION,
            AuthStyle::XApiKey => crate::headers::X_API_KEY,
            AuthStyle::ApiKey => crate::headers::API_KEY,
            AuthStyle::XGoogApiKey => crate::headers::X_GOOG_API_KEY,
        }
    }

    /// The value as the configuration writes it (`auth = "x-api-key"`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthStyle::Bearer => "bearer",
            AuthStyle::XApiKey => "x-api-key",
            AuthStyle::ApiKey => "api-key",
            AuthStyle::XGoogApiKey => "x-goog-api-key",
        }
    }

    /// The header value for `key`.
    pub fn value(self, key: &str) -> String {
        match self {
            AuthStyle::Bearer => format!("Bearer {key}"),
            _ => key.to_string(),
        }
    }
}

/// Why an upstream URL could not be built from the client's path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// `.`/`..` or an encoded separator.
    #[error("the path segment {0:?} is not allowed")]
    BadSegment(String),
    /// A placeholder segment (e.g. Azure's resource name) is missing or malformed.
    #[error("the path must start with {0}")]
    MissingSegment(String),
    /// The resulting URL is not valid.
    #[error("invalid upstream path")]
    Invalid,
}

/// A provider: where requests go and how they authenticate.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Name as it appears in URLs (`openai`, `anthropic`, ...).
    pub name: String,
    /// The base URL as configured (for display).
    pub base_url: String,
    /// Credential header style.
    pub auth: AuthStyle,
    scheme: Scheme,
    /// Authority, possibly with placeholders.
    authority: String,
    /// Base path without trailing slash, possibly with placeholders.
    base_path: String,
    /// Placeholders filled from leading path segments, in order.
    segment_placeholders: Vec<String>,
    /// Parsed authority when it has no placeholder (the common case: no per-request parsing).
    static_authority: Option<Authority>,
    /// Workers AI: model paths (`@cf/...`) live under `run/`.
    prefix_model_run: bool,
    /// Accepts `stream_options.include_usage` on chat and completions streams.
    stream_options: bool,
}

impl Provider {
    /// Parses a base URL (`http` or `https`, with optional placeholders).
    pub fn new(name: &str, base_url: &str, auth: AuthStyle) -> Result<Provider, String> {
        let (scheme, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (Scheme::HTTPS, r)
        } else if let Some(r) = base_url.strip_prefix("http://") {
            (Scheme::HTTP, r)
        } else {
            return Err(format!("{base_url:?} must start with http:// or https://"));
        };
        if rest.contains(['?', '#']) {
            return Err(format!("{base_url:?} must not have a query or fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut placeholders = Vec::new();
        for part in [authority, path] {
            let mut s = part;
            while let Some(open) = s.find('{') {
                let close = s[open..].find('}').ok_or_else(|| format!("{base_url:?} has an unclosed '{{'"))? + open;
                let ph = &s[open + 1..close];
                if ph != "account_id" {
                    placeholders.push(ph.to_string());
                }
                s = &s[close + 1..];
            }
        }
        // Check the URL parses with placeholders filled by a harmless value.
        let probe = fill(base_url, &|_| Some("x")).ok_or_else(|| format!("{base_url:?} is not a valid URL"))?;
        let probe: Uri = probe.parse().map_err(|_| format!("{base_url:?} is not a valid URL"))?;
        if probe.host().is_none() {
            return Err(format!("{base_url:?} has no host"));
        }
        let static_authority = if authority.contains('{') {
            None
        } else {
            Some(authority.parse::<Authority>().map_err(|_| format!("{base_url:?} has an invalid host"))?)
        };
        Ok(Provider {
            name: name.to_string(),
            base_url: base_url.to_string(),
            auth,
            scheme,
            authority: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
            segment_placeholders: placeholders,
            static_authority,
            prefix_model_run: name == "workers-ai",
            stream_options: matches!(name, "openai" | "azure-openai" | "deepseek" | "grok"),
        })
    }

    /// Whether the provider is known to accept `stream_options.include_usage`, so aigate may ask
    /// for usage on a stream whose client did not (and hide that event from the client).
    pub fn accepts_stream_options(&self) -> bool {
        self.stream_options
    }

    /// Builds the upstream URI for a client path (`rest`, percent-encoded, no leading slash, may be
    /// empty) and raw query.
    pub fn upstream_uri(&self, account_id: Option<&str>, rest: &str, query: Option<&str>) -> Result<Uri, PathError> {
        // A Universal step's endpoint may carry its own query (`…?api-version=…`): only what comes
        // before it is path. A fragment is never sent (`..#x` would leave `..` as the last segment).
        if rest.contains('#') {
            return Err(PathError::BadSegment(rest.to_string()));
        }
        let (rest, own_query) = match rest.split_once('?') {
            Some((path, q)) => (path, Some(q)),
            None => (rest, None),
        };
        let mut rest = rest.trim_start_matches('/');
        for seg in rest.split('/') {
            check_segment(seg)?;
        }
        // Fill placeholders from leading segments.
        let mut values: Vec<(&str, &str)> = Vec::with_capacity(self.segment_placeholders.len());
        for ph in &self.segment_placeholders {
            let (seg, tail) = rest.split_once('/').unwrap_or((rest, ""));
            if seg.is_empty()
                || !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                || seg.starts_with('.')
            {
                let all: Vec<String> = self.segment_placeholders.iter().map(|p| format!("{{{p}}}")).collect();
                return Err(PathError::MissingSegment(all.join("/")));
            }
            values.push((ph.as_str(), seg));
            rest = tail;
        }
        // An account id placed in the URL is one safe, non-empty segment (`accounts//ai` is no
        // account's path).
        if let Some(a) = account_id {
            let templated = self.static_authority.is_none() || self.base_path.contains('{');
            if templated && (a.is_empty() || a.contains(['/', '?', '#']) || check_segment(a).is_err()) {
                return Err(PathError::Invalid);
            }
        }
        let lookup = |name: &str| -> Option<&str> {
            if name == "account_id" {
                return Some(account_id.unwrap_or("default"));
            }
            values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        };
        let authority = match &self.static_authority {
            Some(a) => a.clone(),
            None => {
                let filled = fill(&self.authority, &lookup).ok_or(PathError::Invalid)?;
                // A value placed in the host is one DNS label: it may not add labels, a port or
                // user info (an account id of `@x` or `other.tenant` would change the host).
                let label =
                    |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if values.iter().any(|(_, v)| !label(v))
                    || (self.authority.contains("{account_id}") && !label(account_id.unwrap_or("default")))
                {
                    return Err(PathError::Invalid);
                }
                filled.parse::<Authority>().map_err(|_| PathError::Invalid)?
            }
        };
        let base_path = if self.base_path.contains('{') {
            fill(&self.base_path, &lookup).ok_or(PathError::Invalid)?
        } else {
            self.base_path.clone()
        };
        let mut pq = String::with_capacity(base_path.len() + rest.len() + query.map_or(0, str::len) + 6);
        pq.push_str(&base_path);
        if !rest.is_empty() {
            pq.push('/');
            if self.prefix_model_run && rest.starts_with('@') {
                pq.push_str("run/");
            }
            pq.push_str(rest);
        }
        if pq.is_empty() {
            pq.push('/');
        }
        for (i, q) in own_query.into_iter().chain(query).enumerate() {
            pq.push(if i == 0 { '?' } else { '&' });
            pq.push_str(q);
        }
        let pq: PathAndQuery = pq.parse().map_err(|_| PathError::Invalid)?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|_| PathError::Invalid)
    }
}

/// Refuses `.`, `..` (plain or percent-encoded) and encoded separators.
pub fn check_segment(seg: &str) -> Result<(), PathError> {
    // Scans bytes instead of lower-casing and replacing: this runs for every segment of every request.
    let b = seg.as_bytes();
    let mut dots = 0usize;
    let mut only_dots = true;
    let mut i = 0;
    while i < b.len() {
        // Only a `%` and two hex digits is an escape; a lone `%` is a plain byte (it must not hide
        // the two bytes after it from the checks, e.g. the backslash of `%\5`).
        if b[i] == b'%' && i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() {
            match (b[i + 1], b[i + 2].to_ascii_lowercase()) {
                (b'2', b'e') => dots += 1,
                (b'2', b'f') | (b'5', b'c') => return Err(PathError::BadSegment(seg.to_string())),
                _ => only_dots = false,
            }
            i += 3;
            continue;
        }
        match b[i] {
            b'.' => dots += 1,
            b'\\' => return Err(PathError::BadSegment(seg.to_string())),
            _ => only_dots = false,
        }
        i += 1;
    }
    if only_dots && (dots == 1 || dots == 2) {
        return Err(PathError::BadSegment(seg.to_string()));
    }
    Ok(())
}

/// Replaces `{name}` placeholders; `None` if one has no value.
fn fill<'a>(template: &str, lookup: &dyn Fn(&str) -> Option<&'a str>) -> Option<String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut s = template;
    while let Some(open) = s.find('{') {
        out.push_str(&s[..open]);
        let close = s[open..].find('}')? + open;
        out.push_str(lookup(&s[open + 1..close])?);
        s = &s[close + 1..];
    }
    out.push_str(s);
    Some(out)
}

/// The built-in providers, with their real base URLs and auth styles. Paths follow Cloudflare's
/// layout: e.g. `/anthropic/v1/messages`, `/groq/chat/completions`, `/grok/v1/chat/completions`.
pub fn builtin() -> Vec<Provider> {
    const TABLE: &[(&str, &str, AuthStyle)] = &[
        ("openai", "https://api.openai.com/v1", AuthStyle::Bearer),
        ("anthropic", "https://api.anthropic.com", AuthStyle::XApiKey),
        ("azure-openai", "https://{resource}.openai.azure.com/openai/deployments/{deployment}", AuthStyle::ApiKey),
        ("google-ai-studio", "https://generativelanguage.googleapis.com", AuthStyle::XGoogApiKey),
        ("groq", "https://api.groq.com/openai/v1", AuthStyle::Bearer),
        ("mistral", "https://api.mistral.ai", AuthStyle::Bearer),
        ("deepseek", "https://api.deepseek.com", AuthStyle::Bearer),
        ("grok", "https://api.x.ai", AuthStyle::Bearer),
        ("perplexity-ai", "https://api.perplexity.ai", AuthStyle::Bearer),
        ("cerebras", "https://api.cerebras.ai/v1", AuthStyle::Bearer),
        ("openrouter", "https://openrouter.ai/api", AuthStyle::Bearer),
        ("workers-ai", "https://api.cloudflare.com/client/v4/accounts/{account_id}/ai", AuthStyle::Bearer),
    ];
    TABLE.iter().filter_map(|(name, url, auth)| Provider::new(name, url, *auth).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Provider {
        builtin().into_iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn all_builtins_parse() {
        assert_eq!(builtin().len(), 12);
    }

    #[test]
    fn appends_path_and_query() {
        let u = p("openai").upstream_uri(None, "chat/completions", Some("a=1&b=%20")).unwrap();
        assert_eq!(u.to_string(), "https://api.openai.com/v1/chat/completions?a=1&b=%20");
        let u = p("anthropic").upstream_uri(None, "v1/messages", None).unwrap();
        assert_eq!(u.to_string(), "https://api.anthropic.com/v1/messages");
    }

    #[test]
    fn never_escapes_base() {
        let o = p("openai");
        // `%\5`, `%a\`: a `%` without two hex digits once hid the next two bytes (fuzzing, issue 19).
        for bad in ["../admin", "a/../../x", "%2e%2E/x", "a/%2F/b", "a%2fb", "..%5c", "a\\b", "%\\5", "x/%a\\/y"] {
            assert!(o.upstream_uri(None, bad, None).is_err(), "{bad}");
        }
        // A query or fragment in a Universal step's endpoint is not path: `..?x` and `..#x` once
        // sent `/v1/..` (fuzzing, issue 19). The endpoint's own query comes before the request's.
        for bad in ["..?x", "..#x", "a/..?b", "x#y"] {
            assert!(o.upstream_uri(None, bad, None).is_err(), "{bad}");
        }
        let u = o.upstream_uri(None, "chat/completions?api-version=1", Some("a=b")).unwrap();
        assert_eq!(u.to_string(), "https://api.openai.com/v1/chat/completions?api-version=1&a=b");
        // Things that look like URLs stay in the path, on the same host.
        for odd in ["http://evil.com/x", "//evil.com/x", "@evil.com"] {
            let u = o.upstream_uri(None, odd, None).unwrap();
            assert_eq!(u.host(), Some("api.openai.com"), "{odd}");
        }
    }

    #[test]
    fn azure_and_workers_placeholders() {
        let u = p("azure-openai")
            .upstream_uri(None, "myres/gpt4o/chat/completions", Some("api-version=2024-02-01"))
            .unwrap();
        assert_eq!(
            u.to_string(),
            "https://myres.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-02-01"
        );
        assert!(p("azure-openai").upstream_uri(None, "evil.com/x/chat", None).is_err());
        assert!(p("azure-openai").upstream_uri(None, "", None).is_err());
        // An account id placed in the host is one label: no user info, port or extra label
        // (fuzzing, issue 19).
        let acct = Provider::new("acct", "https://{account_id}.example.net/v1", AuthStyle::Bearer).unwrap();
        assert_eq!(acct.upstream_uri(Some("a1"), "x", None).unwrap().to_string(), "https://a1.example.net/v1/x");
        for bad in ["@cf", "evil.com", "a:1", "a%40b", "[::1]", ""] {
            assert!(acct.upstream_uri(Some(bad), "x", None).is_err(), "{bad}");
        }
        let u = p("workers-ai").upstream_uri(Some("acc1"), "@cf/meta/llama", None).unwrap();
        assert_eq!(u.to_string(), "https://api.cloudflare.com/client/v4/accounts/acc1/ai/run/@cf/meta/llama");
        for bad in ["", "..", "%2e", "a?b", "a/b"] {
            assert!(p("workers-ai").upstream_uri(Some(bad), "v1/chat/completions", None).is_err(), "{bad}");
        }
        let u = p("workers-ai").upstream_uri(Some("acc1"), "v1/chat/completions", None).unwrap();
        assert_eq!(u.to_string(), "https://api.cloudflare.com/client/v4/accounts/acc1/ai/v1/chat/completions");
    }

    #[test]
    fn custom_http_provider() {
        let pr = Provider::new("local", "http://127.0.0.1:8000/v1/", AuthStyle::Bearer).unwrap();
        assert_eq!(pr.upstream_uri(None, "models", None).unwrap().to_string(), "http://127.0.0.1:8000/v1/models");
        assert!(Provider::new("x", "127.0.0.1:8000", AuthStyle::Bearer).is_err());
    }
}
