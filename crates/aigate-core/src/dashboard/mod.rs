//! The web console at `/dashboard`, served whenever `[admin] token` is set.
//!
//! Pages are a small server-rendered shell (navigation, the session's CSRF token) that
//! `assets/app.js` fills from the dashboard's data API under `/dashboard/api/`. That API is the
//! admin API (`/dashboard/api/X` answers what `/admin/X` answers) with the session cookie in place
//! of the bearer token, plus what only the console needs: the overview of every gateway, one log
//! record with its bodies as readable text, and the settings page. Every asset is embedded in the
//! binary; the pages load nothing from elsewhere (their Content-Security-Policy says so).
//!
//! URLs: `/dashboard/login`, `/dashboard` (overview), `/dashboard/gateways/{id}` (charts),
//! `.../logs`, `.../logs/{log_id}`, `.../tail`, `.../report`, `.../settings`.

mod api;
pub mod session;
pub mod settings;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::body::GatewayBody;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::state::AppState;
use session::Session;

/// What the dashboard keeps in the process: logged-out sessions, and the lock that keeps
/// settings changes one at a time.
#[derive(Default)]
pub struct DashboardState {
    /// Sessions ended before their expiry.
    pub sessions: session::Sessions,
    /// Held while a settings change is written and applied.
    pub save_lock: tokio::sync::Mutex<()>,
}

/// Largest login form or settings document accepted.
const MAX_FORM: usize = 16 * 1024;
/// Pause before answering a wrong admin token (slows guessing; the wait holds no thread).
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(400);

/// A page of the console and the gateway it is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Page {
    Overview,
    Gateway,
    Logs,
    Log,
    Tail,
    Report,
    Settings,
    NotFound,
}

impl Page {
    const TABS: [(Page, &'static str, &'static str); 6] = [
        (Page::Overview, "", "Overview"),
        (Page::Gateway, "", "Charts"),
        (Page::Logs, "/logs", "Logs"),
        (Page::Tail, "/tail", "Live tail"),
        (Page::Report, "/report", "Report"),
        (Page::Settings, "/settings", "Settings"),
    ];

    fn name(self) -> &'static str {
        match self {
            Page::Overview => "overview",
            Page::Gateway => "gateway",
            Page::Logs => "logs",
            Page::Log => "log",
            Page::Tail => "tail",
            Page::Report => "report",
            Page::Settings => "settings",
            Page::NotFound => "not-found",
        }
    }
}

/// Handles every request under `/dashboard`.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<GatewayBody> {
    let settings = state.settings.load_full();
    let Some(token) = settings.admin_token.clone() else {
        return GatewayError::NotFound(
            "the dashboard is served when the configuration sets [admin] token (see the README's Dashboard section)"
                .into(),
        )
        .into_response();
    };
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/dashboard").unwrap_or("").trim_end_matches('/').to_owned();
    if let Some(asset) = rest.strip_prefix("/assets/") {
        return asset_response(asset);
    }
    let now = state.clock.now_ms();
    let session = state.dashboard.sessions.verify(token.expose(), req.headers(), now);
    let result = match (rest.as_str(), session) {
        ("/login", s) => login(state, &settings, token.expose(), req, s).await,
        ("/logout", Some(s)) if req.method() == Method::POST => logout(state, token.expose(), req, &s).await,
        (api, Some(s)) if api.starts_with("/api/") => {
            let api = api.trim_start_matches("/api").to_owned();
            api::handle(state, token.expose(), &s, req, &api).await
        }
        (api, None) if api.starts_with("/api/") => Err(GatewayError::SessionRequired),
        (page, Some(s)) if req.method() == Method::GET || req.method() == Method::HEAD => {
            Ok(page_response(&settings, token.expose(), &s, page))
        }
        (_, Some(_)) => Err(GatewayError::MethodNotAllowed),
        // Without a session every page is the login form.
        (_, None) => Ok(redirect(&login_url(req.uri()))),
    };
    let mut resp = result.unwrap_or_else(GatewayError::into_response);
    security_headers(resp.headers_mut());
    resp
}

/// `/dashboard/login?next=...` for a page asked for without a session.
fn login_url(uri: &http::Uri) -> String {
    let next = uri.path_and_query().map_or("/dashboard", |pq| pq.as_str());
    let next: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
    format!("/dashboard/login?next={next}")
}

/// The page to go to after a login: a dashboard URL, nothing else (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if (n == "/dashboard" || n.starts_with("/dashboard/") || n.starts_with("/dashboard?"))
                && !n.contains("//")
                && !n.contains('\\')
                && !n.starts_with("/dashboard/login")
                && !n.starts_with("/dashboard/logout") =>
        {
            n.to_owned()
        }
        _ => "/dashboard".to_owned(),
    }
}

async fn login(
    state: &AppState,
    settings: &Settings,
    token: &str,
    req: Request<Incoming>,
    session: Option<Session>,
) -> Result<Response<GatewayBody>, GatewayError> {
    let query_next = req
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "next").map(|(_, v)| v.into_owned()));
    match *req.method() {
        Method::GET | Method::HEAD => {
            if session.is_some() {
                return Ok(redirect(&safe_next(query_next.as_deref())));
            }
            Ok(html(StatusCode::OK, login_page(&safe_next(query_next.as_deref()), None)))
        }
        Method::POST => {
            same_origin(req.headers())?;
            let secure = forwarded_https(req.headers());
            let form = read_form(req).await?;
            let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
            let next = safe_next(field("next"));
            let presented = field("token").unwrap_or("").trim();
            if !bool::from(token.as_bytes().ct_eq(presented.as_bytes())) {
                tokio::time::sleep(WRONG_TOKEN_DELAY).await;
                let msg = if presented.is_empty() {
                    "Enter the admin token."
                } else {
                    "That is not the admin token. It is the value of [admin] token in the configuration."
                };
                return Ok(html(StatusCode::UNAUTHORIZED, login_page(&next, Some(msg))));
            }
            let ttl = settings.dashboard.session_ttl;
            let (cookie, _) =
                state.dashboard.sessions.create(token, state.clock.now_ms(), ttl).ok_or(GatewayError::Internal)?;
            let mut r = redirect(&next);
            set_header(&mut r, http::header::SET_COOKIE, &session::set_cookie(&cookie, ttl, secure));
            Ok(r)
        }
        _ => Err(GatewayError::MethodNotAllowed),
    }
}

async fn logout(
    state: &AppState,
    token: &str,
    req: Request<Incoming>,
    s: &Session,
) -> Result<Response<GatewayBody>, GatewayError> {
    same_origin(req.headers())?;
    let form = read_form(req).await?;
    let csrf = form.iter().find(|(k, _)| k == "csrf").map_or("", |(_, v)| v.as_str());
    if !session::csrf_ok(token, s, csrf) {
        return Err(GatewayError::Forbidden("log out from the dashboard's Log out button".into()));
    }
    state.dashboard.sessions.revoke(s, state.clock.now_ms());
    let mut r = redirect("/dashboard/login");
    set_header(&mut r, http::header::SET_COOKIE, &session::clear_cookie());
    Ok(r)
}

/// Refuses a form posted from another site (the `Origin` header names another host).
fn same_origin(h: &http::HeaderMap) -> Result<(), GatewayError> {
    let Some(origin) = h.get(http::header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = h.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    if origin == "null" || origin_host != host {
        return Err(GatewayError::Forbidden(format!("a dashboard form was posted from another site ({origin})")));
    }
    Ok(())
}

fn forwarded_https(h: &http::HeaderMap) -> bool {
    h.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

async fn read_form(req: Request<Incoming>) -> Result<Vec<(String, String)>, GatewayError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .map_err(|_| GatewayError::BadRequest("the form could not be read or is larger than 16 KiB".into()))?
        .to_bytes();
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

/// The shell of a page, or a 404 page for a URL that is not one.
fn page_response(settings: &Settings, token: &str, s: &Session, rest: &str) -> Response<GatewayBody> {
    let view = View { settings, csrf: session::csrf_token(token, s) };
    let segs: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let (page, gateway, log_id) = match segs.as_slice() {
        [""] => (Page::Overview, None, None),
        ["gateways", gw] => (Page::Gateway, Some(*gw), None),
        ["gateways", gw, "logs"] => (Page::Logs, Some(*gw), None),
        ["gateways", gw, "logs", id] => (Page::Log, Some(*gw), Some(*id)),
        ["gateways", gw, "tail"] => (Page::Tail, Some(*gw), None),
        ["gateways", gw, "report"] => (Page::Report, Some(*gw), None),
        ["gateways", gw, "settings"] => (Page::Settings, Some(*gw), None),
        _ => return html(StatusCode::NOT_FOUND, view.not_found("There is no such dashboard page.")),
    };
    if let Some(gw) = gateway {
        if !settings.gateways.contains_key(gw) {
            let msg = format!("There is no gateway named \u{201c}{gw}\u{201d}.");
            return html(StatusCode::NOT_FOUND, view.not_found(&msg));
        }
    }
    html(StatusCode::OK, view.shell(page, gateway, log_id))
}

/// What every page's HTML is made from: the settings (gateways, navigation) and the session's
/// CSRF token (for the logout form and the script's changes).
struct View<'a> {
    settings: &'a Settings,
    csrf: String,
}

impl View<'_> {
    fn not_found(&self, msg: &str) -> String {
        let main =
            format!("<h1>Not found</h1><p>{}</p><p><a href=\"/dashboard\">Back to the overview</a></p>", escape(msg));
        self.layout("Not found", Page::NotFound, None, None, &main)
    }

    /// A page for the script to fill: its name, gateway and record in `data-` attributes.
    fn shell(&self, page: Page, gw: Option<&str>, log_id: Option<&str>) -> String {
        let title = match (page, gw) {
            (Page::Overview, _) | (_, None) => "Overview".to_owned(),
            (p, Some(g)) => {
                let tab = Page::TABS.iter().find(|(t, ..)| *t == p).map_or("Log record", |(_, _, label)| label);
                format!("{g} \u{b7} {tab}")
            }
        };
        let loading = "<p class=\"muted\" role=\"status\">Loading\u{2026}</p>";
        self.layout(&title, page, gw, log_id, loading)
    }

    fn layout(&self, title: &str, page: Page, gw: Option<&str>, log_id: Option<&str>, main: &str) -> String {
        let (settings, csrf) = (self.settings, &self.csrf);
        let mut names: Vec<&str> = settings.gateways.keys().map(String::as_str).collect();
        names.sort_unstable();
        let current = gw.unwrap_or(&settings.default_gateway);
        let options: String = names
            .iter()
            .map(|n| {
                let sel = if *n == current { " selected" } else { "" };
                format!("<option value=\"{0}\"{sel}>{0}</option>", escape(n))
            })
            .collect();
        let base = format!("/dashboard/gateways/{}", escape(current));
        let tabs: String = Page::TABS
            .iter()
            .map(|(p, suffix, label)| {
                let href = if *p == Page::Overview { "/dashboard".to_owned() } else { format!("{base}{suffix}") };
                let on = *p == page || (page == Page::Log && *p == Page::Logs);
                let aria = if on { " aria-current=\"page\"" } else { "" };
                format!("<a href=\"{href}\"{aria}>{label}</a>")
            })
            .collect();
        let v = env!("CARGO_PKG_VERSION");
        format!(
            r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · aigate</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/assets/uplot.min.css?v={v}">
<link rel="stylesheet" href="/dashboard/assets/app.css?v={v}">
<meta name="csrf-token" content="{csrf}">
</head>
<body data-page="{page}" data-gateway="{gateway}" data-log-id="{log_id}" data-default-gateway="{default}" data-account="{account}" data-authentication="{auth}">
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<a class="brand" href="/dashboard">aigate</a>
<label class="gwpick">Gateway <select id="gateway-select">{options}</select></label>
<nav aria-label="Pages">{tabs}</nav>
<form method="post" action="/dashboard/logout" class="logout"><input type="hidden" name="csrf" value="{csrf}"><button type="submit">Log out</button></form>
</header>
<main id="main" tabindex="-1">{main}</main>
<script src="/dashboard/assets/uplot.min.js?v={v}"></script>
<script src="/dashboard/assets/app.js?v={v}"></script>
</body>
</html>
"##,
            title = escape(title),
            page = page.name(),
            gateway = escape(gw.unwrap_or("")),
            log_id = escape(log_id.unwrap_or("")),
            default = escape(&settings.default_gateway),
            account = escape(settings.account_id.as_deref().unwrap_or("local")),
            auth = gw.and_then(|g| settings.gateways.get(g)).is_some_and(|g| g.authentication),
        )
    }
}

fn login_page(next: &str, error: Option<&str>) -> String {
    let error = error
        .map_or(String::new(), |e| format!("<p class=\"error\" role=\"alert\" id=\"login-error\">{}</p>", escape(e)));
    let v = env!("CARGO_PKG_VERSION");
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · aigate</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/assets/app.css?v={v}">
</head>
<body class="login">
<main id="main">
<form method="post" action="/dashboard/login" class="card login-card">
<h1>aigate</h1>
<p class="muted">Log in with the admin token (<code>[admin] token</code> in the configuration).</p>
{error}
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Log in</button>
</form>
</main>
</body>
</html>
"#,
        next = escape(next),
    )
}

/// The embedded assets: the console's script and style, and the charting library (uPlot, MIT,
/// vendored from npm `uplot`).
fn asset_response(name: &str) -> Response<GatewayBody> {
    let (bytes, ctype): (&'static [u8], &str) = match name {
        "app.js" => (include_bytes!("assets/app.js"), "text/javascript; charset=utf-8"),
        "app.css" => (include_bytes!("assets/app.css"), "text/css; charset=utf-8"),
        "uplot.min.js" => (include_bytes!("assets/uplot.min.js"), "text/javascript; charset=utf-8"),
        "uplot.min.css" => (include_bytes!("assets/uplot.min.css"), "text/css; charset=utf-8"),
        _ => return GatewayError::NotFound("no such dashboard asset".into()).into_response(),
    };
    let mut r = Response::new(GatewayBody::full(Bytes::from_static(bytes)));
    set_header(&mut r, http::header::CONTENT_TYPE, ctype);
    set_header(&mut r, http::header::CACHE_CONTROL, "public, max-age=3600");
    set_header(&mut r, http::header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    r
}

fn html(status: StatusCode, body: String) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(Bytes::from(body)));
    *r.status_mut() = status;
    set_header(&mut r, http::header::CONTENT_TYPE, "text/html; charset=utf-8");
    set_header(&mut r, http::header::CACHE_CONTROL, "no-store");
    r
}

fn redirect(to: &str) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    set_header(&mut r, http::header::LOCATION, to);
    set_header(&mut r, http::header::CACHE_CONTROL, "no-store");
    r
}

fn set_header(r: &mut Response<GatewayBody>, name: http::header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// Every dashboard answer: nothing loads from elsewhere, no framing, no referrer to other sites.
fn security_headers(h: &mut http::HeaderMap) {
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(http::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(http::header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

/// HTML-escapes text for element content and quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_only_leads_into_the_dashboard() {
        assert_eq!(safe_next(Some("/dashboard/gateways/prod/logs?model=x")), "/dashboard/gateways/prod/logs?model=x");
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/dashboard//evil",
            "/admin/tail",
            "/dashboardx",
            "/dashboard/login",
        ] {
            assert_eq!(safe_next(Some(bad)), "/dashboard", "{bad}");
        }
        assert_eq!(safe_next(None), "/dashboard");
    }

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
