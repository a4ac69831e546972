//! `GET /admin/tail`: the live tail, finalised records as JSON lines while the client stays.

use std::sync::Arc;
use std::time::Duration;

use aigate_store::LogRecord;
use bytes::Bytes;
use http::Response;
use tokio::sync::{broadcast, mpsc};

use crate::body::GatewayBody;
use crate::error::GatewayError;
use crate::state::AppState;

/// Interval of the empty keep-alive lines of a live tail (they also reveal a gone client).
const TAIL_HEARTBEAT: Duration = Duration::from_secs(10);

/// `GET /admin/tail`: records as JSON lines while the client stays.
pub(super) fn tail(state: &AppState, query: &str) -> Result<Response<GatewayBody>, GatewayError> {
    let mut gateway: Option<String> = None;
    let mut errors_only = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "gateway" => gateway = Some(v.into_owned()),
            "errors" => errors_only = v == "true" || v == "1",
            _ => {}
        }
    }
    if let Some(g) = &gateway {
        let settings = state.settings.load();
        if !settings.gateways.contains_key(g) {
            return Err(GatewayError::UnknownGateway {
                gateway: g.clone(),
                known: crate::phases::route::known_gateways(&settings),
            });
        }
    }
    let mut rx = state.logs.subscribe();
    let mut stopping = state.stopping.subscribe();
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(TAIL_HEARTBEAT);
        heartbeat.tick().await;
        loop {
            let line = tokio::select! {
                r = rx.recv() => match r {
                    Ok(rec) => {
                        if gateway.as_deref().is_some_and(|g| g != rec.gateway) || (errors_only && rec.success) {
                            continue;
                        }
                        tail_line(&rec)
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => Bytes::from(format!("{{\"lagged\":{n}}}\n")),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = heartbeat.tick() => Bytes::from_static(b"\n"),
                _ = stopping.changed() => break,
                _ = tx.closed() => break,
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(GatewayBody::Channel(body_rx));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    Ok(r)
}

fn tail_line(r: &Arc<LogRecord>) -> Bytes {
    let mut v = serde_json::to_vec(r.as_ref()).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}
