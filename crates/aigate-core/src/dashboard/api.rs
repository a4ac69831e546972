//! The dashboard's data API (`/dashboard/api/...`), for a logged-in session. A change (any method
//! but GET) needs the session's CSRF token in `x-csrf-token`. What the admin API answers is passed
//! to it; this module adds the overview, the readable log record and the settings.

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;

use super::session::{self, Session};
use super::settings;
use crate::admin::{json, log_store};
use crate::body::GatewayBody;
use crate::error::GatewayError;
use crate::state::AppState;
use aigate_store::{Analytics, AnalyticsQuery, Granularity, GroupBy, LogRecord};

pub(super) async fn handle(
    state: &AppState,
    token: &str,
    s: &Session,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<GatewayBody>, GatewayError> {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        let presented = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !session::csrf_ok(token, s, presented) {
            return Err(GatewayError::Forbidden(
                "this change needs the page's CSRF token (x-csrf-token); reload the dashboard page".into(),
            ));
        }
    }
    let by = format!("session {}", s.id.get(..8).unwrap_or(&s.id));
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let settings = state.settings.load_full();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["overview"]) => overview(state, req.uri().query().unwrap_or("")).await,
        (_, ["gateways", gw, rest @ ..]) if matches!(rest, ["settings"] | ["logs", _]) || method == Method::DELETE => {
            let gateway = settings.gateways.get(*gw).cloned().ok_or_else(|| GatewayError::UnknownGateway {
                gateway: gw.to_string(),
                known: crate::phases::route::known_gateways(&settings),
            })?;
            match (&method, rest) {
                (&Method::GET, ["settings"]) => json(&settings::view(state, &gateway).await?),
                (&Method::PUT, ["settings"]) => {
                    let body = http_body_util::Limited::new(req.into_body(), super::MAX_FORM)
                        .collect()
                        .await
                        .map_err(|_| GatewayError::BadRequest("the settings could not be read".into()))?
                        .to_bytes();
                    let wanted: settings::Values = serde_json::from_slice(&body)
                        .map_err(|e| GatewayError::BadRequest(format!("settings: {e}")))?;
                    let (view, warnings) = settings::save(state, &gateway, wanted, &by).await?;
                    json(&serde_json::json!({ "settings": view, "warnings": warnings }))
                }
                (&Method::GET, ["logs", id]) => match state.logs.store.get(gw, id).await.map_err(log_store)? {
                    Some(r) => json(&LogView::of(r)),
                    None => Err(GatewayError::LogNotFound { id: id.to_string() }),
                },
                (&Method::DELETE, what @ (["cache"] | ["logs"])) => {
                    let query = req.uri().query().unwrap_or("").to_owned();
                    let gw = gw.to_string();
                    let what = what[0];
                    let resp = crate::admin::route(state, req, path).await?;
                    let action = if what == "cache" { "cache purge" } else { "logs delete" };
                    let filters = if query.is_empty() { "everything".to_owned() } else { query };
                    settings::audit(state, &gw, action, filters, &by).await;
                    Ok(resp)
                }
                _ => crate::admin::route(state, req, path).await,
            }
        }
        _ => crate::admin::route(state, req, path).await,
    }
}

/// `GET /dashboard/api/overview?range=24h`: every gateway's analytics over the range.
async fn overview(state: &AppState, query: &str) -> Result<Response<GatewayBody>, GatewayError> {
    let range = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "range")
        .map_or_else(|| "24h".to_owned(), |(_, v)| v.into_owned());
    let (span_ms, granularity) = range_of(&range)?;
    let to_ms = state.clock.now_ms();
    let q = AnalyticsQuery { from_ms: to_ms.saturating_sub(span_ms), to_ms, granularity, group_by: GroupBy::None };
    let settings = state.settings.load_full();
    let mut names: Vec<&String> = settings.gateways.keys().collect();
    names.sort_unstable();
    let answers = futures_util::future::join_all(names.iter().map(|gw| state.logs.store.analytics(gw, &q))).await;
    #[derive(Serialize)]
    struct Card<'a> {
        name: &'a str,
        authentication: bool,
        cache_mode: &'static str,
        logs_enabled: bool,
        analytics: Analytics,
    }
    let mut cards = Vec::with_capacity(names.len());
    for (name, a) in names.iter().zip(answers) {
        let g = &settings.gateways[*name];
        cards.push(Card {
            name,
            authentication: g.authentication,
            cache_mode: g.cache.mode.as_str(),
            logs_enabled: g.logs.enabled,
            analytics: a.map_err(log_store)?,
        });
    }
    json(&serde_json::json!({ "range": range, "from_ms": q.from_ms, "to_ms": q.to_ms, "gateways": cards }))
}

/// The dashboard's ranges: their length and the bucket that draws them.
fn range_of(range: &str) -> Result<(u64, Granularity), GatewayError> {
    const H: u64 = 3_600_000;
    Ok(match range {
        "1h" => (H, Granularity::Minute),
        "24h" => (24 * H, Granularity::Hour),
        "7d" => (7 * 24 * H, Granularity::Hour),
        "30d" => (30 * 24 * H, Granularity::Day),
        other => return Err(GatewayError::BadRequest(format!("range: {other:?} is not 1h, 24h, 7d or 30d"))),
    })
}

/// One record for the log page: its fields, and its bodies as text.
#[derive(Serialize)]
struct LogView {
    #[serde(flatten)]
    record: LogRecord,
    request: Option<BodyView>,
    response: Option<BodyView>,
}

/// A body as a person reads it.
#[derive(Serialize, Debug, PartialEq)]
struct BodyView {
    /// Stored size, bytes.
    bytes: usize,
    /// `json` (pretty-printed), `events` (a stream, one entry per event), `text` or `binary`.
    kind: &'static str,
    /// The text (empty for `events` and `binary`).
    text: String,
    /// The events of a stream.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<EventView>,
}

/// One server-sent event.
#[derive(Serialize, Debug, PartialEq)]
struct EventView {
    /// Its `event:` name, if any.
    event: Option<String>,
    /// Its data, as sent.
    data: String,
}

impl LogView {
    fn of(mut record: LogRecord) -> LogView {
        let stream = record.stream;
        let request = record.request_body.take().map(|b| BodyView::of(&b, false));
        let response = record.response_body.take().map(|b| BodyView::of(&b, stream));
        LogView { record, request, response }
    }
}

impl BodyView {
    fn of(b: &Bytes, stream: bool) -> BodyView {
        let bytes = b.len();
        let Ok(text) = std::str::from_utf8(b) else {
            return BodyView { bytes, kind: "binary", text: String::new(), events: Vec::new() };
        };
        if stream {
            let events = events(text);
            if !events.is_empty() {
                return BodyView { bytes, kind: "events", text: String::new(), events };
            }
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => BodyView { bytes, kind: "json", text: pretty(&v), events: Vec::new() },
            Err(_) => BodyView { bytes, kind: "text", text: text.to_owned(), events: Vec::new() },
        }
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The events of a server-sent event stream.
fn events(text: &str) -> Vec<EventView> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if event.is_none() && data.is_empty() {
                return None;
            }
            // One line per event, as the provider sent it: a stream has many, pretty-printing each
            // would spread a short answer over pages.
            Some(EventView { event, data: data.join("\n") })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_readable_text() {
        let j = BodyView::of(&Bytes::from_static(br#"{"a":[1,2]}"#), false);
        assert_eq!((j.kind, j.text.as_str()), ("json", "{\n  \"a\": [\n    1,\n    2\n  ]\n}"));
        let s = BodyView::of(&Bytes::from_static(b"event: message_start\ndata: {\"x\":1}\n\ndata: [DONE]\n\n"), true);
        assert_eq!(s.kind, "events");
        assert_eq!(
            s.events,
            vec![
                EventView { event: Some("message_start".into()), data: "{\"x\":1}".into() },
                EventView { event: None, data: "[DONE]".into() },
            ]
        );
        assert_eq!(BodyView::of(&Bytes::from_static(b"plain"), false).kind, "text");
        assert_eq!(BodyView::of(&Bytes::from_static(&[0xff, 0xfe, 0]), false).kind, "binary");
    }
}
