//! `aigate cache top` and `aigate cache warm`: the cache's insight and its warming, over the admin
//! API of a running server (warming sends its requests through the gateway's public routes, so the
//! gateway's rate limits, budgets and rules apply to them as to any request).

use std::path::PathBuf;

use anyhow::{bail, Context};
use base64::Engine as _;
use serde_json::Value;

use crate::remote::Server;

/// `aigate cache top`: the entries most hit, with totals.
pub async fn top(server: &Server, gateway: &str, since: &str, limit: usize, json: bool) -> anyhow::Result<()> {
    let q = vec![("since".to_string(), since.to_string()), ("limit".to_string(), limit.to_string())];
    let v = server.get_json(&format!("/admin/gateways/{gateway}/cache/top"), &q).await?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let t = &v["totals"];
    println!(
        "gateway {gateway}, last {since}: {} entries, {} bytes, hit rate {:.1}% ({} hits, {} misses), saved ${:.6}; \
         a longer TTL would have added {} hits (misses on expired entries)",
        t["entries"],
        t["bytes"],
        t["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
        t["hits"],
        t["misses"],
        t["saved_usd"].as_f64().unwrap_or(0.0),
        t["expired_misses"],
    );
    println!(
        "{:>6} {:>6} {:>9} {:>8} {:>10}  {:<16} {:<12} {:<22} prompt",
        "hits", "misses", "bytes", "age", "saved", "key", "endpoint", "model"
    );
    for e in v["entries"].as_array().into_iter().flatten() {
        let age = e["age_s"].as_u64().map_or_else(
            || "-".to_owned(),
            |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
        );
        println!(
            "{:>6} {:>6} {:>9} {:>8} {:>10}  {:<16} {:<12} {:<22} {}{}",
            // Numbers, not `Value`s: a `Value`'s Display ignores the column width.
            e["hits"].as_u64().unwrap_or(0),
            e["misses"].as_u64().unwrap_or(0),
            e["bytes"].as_u64().unwrap_or(0),
            age,
            format!("${:.6}", e["saved_usd"].as_f64().unwrap_or(0.0)),
            &e["key"].as_str().unwrap_or("")[..16.min(e["key"].as_str().unwrap_or("").len())],
            e["endpoint"].as_str().unwrap_or(""),
            e["model"].as_str().unwrap_or("-"),
            e["preview"].as_str().map_or_else(String::new, |p| format!("{p:?}")),
            if e["expired"] == true { " (expired)" } else { "" },
        );
    }
    Ok(())
}

/// Where `aigate cache warm` takes its requests from.
pub enum Source {
    /// The gateway's most repeated requests in the window, as its logs kept them.
    Logs { since: String, top: usize },
    /// A JSON Lines file: `{"path": "/GATEWAY/PROVIDER/…" or "PROVIDER/…", "body": {…}, "headers": {…}}`.
    File(PathBuf),
}

/// One request to send.
struct WarmRequest {
    path: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    cost_usd: Option<f64>,
    preview: String,
}

/// `aigate cache warm`: sends the requests through the gateway, one at a time, and stops at the
/// first answer that is not a 2xx (the gateway has already retried what it retries: a refused
/// request, a rate limit, a budget or a provider error ends the run).
pub async fn warm(
    server: &Server,
    gateway: &str,
    source: Source,
    dry_run: bool,
    extra_headers: &[String],
) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    for h in extra_headers {
        let (k, v) = h.split_once(':').with_context(|| format!("--header {h:?}: expected \"name: value\""))?;
        extra.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let requests = match source {
        Source::Logs { since, top } => from_logs(server, gateway, &since, top).await?,
        Source::File(path) => from_file(&path, gateway)?,
    };
    if requests.is_empty() {
        bail!("nothing to warm: no requests found");
    }
    if dry_run {
        let mut total = 0.0;
        let mut unknown = 0;
        for r in &requests {
            match r.cost_usd {
                Some(c) => total += c,
                None => unknown += 1,
            }
            let cost = r.cost_usd.map_or_else(|| "cost unknown".to_owned(), |c| format!("${c:.6}"));
            println!("POST {}  {cost}  {}", r.path, r.preview);
        }
        let unpriced = if unknown > 0 { format!(" ({unknown} without a known price)") } else { String::new() };
        println!("would send {} requests, estimated cost ${total:.6}{unpriced}", requests.len());
        return Ok(());
    }
    let (mut filled, mut cached) = (0, 0);
    for (i, r) in requests.iter().enumerate() {
        let mut rb = server.http().post(format!("{}{}", server.base(), r.path)).body(r.body.clone());
        if !r.headers.iter().chain(&extra).any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            rb = rb.header("content-type", "application/json");
        }
        for (k, v) in r.headers.iter().chain(&extra) {
            rb = rb.header(k, v);
        }
        let resp = rb.send().await.with_context(|| format!("cannot reach {}", server.base()))?;
        let status = resp.status();
        let cache = resp.headers().get("aigate-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = resp.bytes().await.unwrap_or_default();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            bail!(
                "stopped at request {} of {} ({}): {status}: {}; {filled} filled, {cached} already cached",
                i + 1,
                requests.len(),
                r.path,
                v["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        if cache == "HIT" {
            cached += 1;
        } else {
            filled += 1;
        }
        println!("{status} {cache:<6} POST {}  {}", r.path, r.preview);
    }
    println!("warmed gateway {gateway}: {filled} sent upstream, {cached} already cached");
    Ok(())
}

/// The most hit entries of the window whose request the logs kept with its body.
async fn from_logs(server: &Server, gateway: &str, since: &str, top: usize) -> anyhow::Result<Vec<WarmRequest>> {
    let q = vec![("since".to_string(), since.to_string()), ("limit".to_string(), top.to_string())];
    let v = server.get_json(&format!("/admin/gateways/{gateway}/cache/top"), &q).await?;
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut without_body = 0;
    for e in &entries {
        let Some(id) = e["log_id"].as_str() else {
            without_body += 1;
            continue;
        };
        let rec = match server.get_json(&format!("/admin/gateways/{gateway}/logs/{id}"), &[]).await {
            Ok(r) => r,
            Err(_) => {
                without_body += 1; // deleted by retention since
                continue;
            }
        };
        let Some(b64) = rec["request_body"].as_str() else {
            without_body += 1;
            continue;
        };
        let body = base64::engine::general_purpose::STANDARD.decode(b64).context("a logged body is not base64")?;
        let provider = rec["provider"].as_str().unwrap_or("");
        let path = rec["path"].as_str().unwrap_or("");
        let mut headers = Vec::new();
        if let Some(md) = rec["metadata"].as_object().filter(|m| !m.is_empty()) {
            headers.push(("cf-aig-metadata".to_owned(), Value::Object(md.clone()).to_string()));
        }
        out.push(WarmRequest {
            path: format!("/{gateway}/{provider}/{path}"),
            body,
            headers,
            cost_usd: e["cost_usd"].as_f64().or_else(|| rec["cost_usd"].as_f64()),
            preview: e["preview"].as_str().map_or_else(String::new, |p| format!("{p:?}")),
        });
    }
    if out.is_empty() && !entries.is_empty() {
        bail!(
            "the {} most repeated requests of gateway {gateway} have no logged body: set [gateways.{gateway}.logs] \
             bodies = true (and keep logs on), or warm from a file with --file",
            entries.len()
        );
    }
    if without_body > 0 {
        eprintln!("{without_body} of the {} entries have no logged body and are skipped", entries.len());
    }
    Ok(out)
}

/// Requests from a JSON Lines file.
fn from_file(path: &std::path::Path, gateway: &str) -> anyhow::Result<Vec<WarmRequest>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), n + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let p = v["path"].as_str().with_context(|| format!("{}: \"path\" (a string) is missing", at()))?;
        let path = if p.starts_with('/') { p.to_owned() } else { format!("/{gateway}/{p}") };
        let body = match &v["body"] {
            Value::Null => bail!("{}: \"body\" is missing", at()),
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        let mut headers = Vec::new();
        for (k, hv) in v["headers"].as_object().into_iter().flatten() {
            let hv = hv.as_str().map_or_else(|| hv.to_string(), str::to_owned);
            headers.push((k.clone(), hv));
        }
        let preview = aigate_core::cache::index::preview(&body).map_or_else(String::new, |p| format!("{p:?}"));
        out.push(WarmRequest { path, body, headers, cost_usd: None, preview });
    }
    Ok(out)
}
