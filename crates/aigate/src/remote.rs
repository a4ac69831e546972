//! Commands that talk to a running server over its admin API: `tail`, `logs`, `report` (and
//! `cache purge`, in main; `cache top` and `cache warm`, in `cache_cmd`). Output is one line per record for people, or JSON for scripts.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;

/// Where the server is and how to authenticate.
#[derive(clap::Args, Clone)]
pub struct Remote {
    /// The server's base URL (default: the configuration's listen address).
    #[arg(long)]
    pub url: Option<String>,
    /// Admin token (default: the configuration's `[admin] token`).
    #[arg(long, env = "AIGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TOML configuration file (for the listen address and admin token).
    #[arg(long, short, env = "AIGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// A resolved remote.
pub struct Server {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    /// Resolves the URL and token from flags, environment and configuration.
    pub fn resolve(&self) -> anyhow::Result<Server> {
        let settings = crate::load(self.config.as_deref())?;
        let base = self.url.clone().unwrap_or_else(|| format!("http://{}", settings.listen));
        let token = self
            .token
            .clone()
            .or_else(|| settings.admin_token.as_ref().map(|t| t.expose().to_string()))
            .context("no admin token: pass --token, set AIGATE_ADMIN_TOKEN or [admin] token")?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        Ok(Server { base: base.trim_end_matches('/').to_string(), token, http })
    }
}

impl Server {
    /// Sends a request and returns the response, or the server's error message.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
    ) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(query)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body: Value = resp.json().await.unwrap_or_default();
            anyhow::bail!("{status}: {}", body["error"]["message"].as_str().unwrap_or("no message"));
        }
        Ok(resp)
    }

    /// The server's base URL (no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The HTTP client (for requests to the gateway's public routes).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// GETs an admin path as JSON.
    pub async fn get_json(&self, path: &str, query: &[(String, String)]) -> anyhow::Result<Value> {
        Ok(self.request(reqwest::Method::GET, path, query).await?.json().await?)
    }
}

/// `aigate tail`: prints records as the server finalises them, until interrupted.
pub async fn tail(server: &Server, gateway: Option<&str>, errors: bool, json: bool) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(g) = gateway {
        query.push(("gateway".to_string(), g.to_string()));
    }
    if errors {
        query.push(("errors".to_string(), "true".to_string()));
    }
    let resp = server.request(reqwest::Method::GET, "/admin/tail", &query).await?;
    eprintln!("tailing {} (Ctrl-C to stop)", gateway.unwrap_or("all gateways"));
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("the server closed the tail")?);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue; // keep-alive
            }
            let v: Value = serde_json::from_slice(line).context("unreadable tail line")?;
            if let Some(n) = v.get("lagged") {
                eprintln!("... {n} records skipped (this terminal is slower than the traffic)");
            } else if json {
                println!("{}", String::from_utf8_lossy(line));
            } else {
                println!("{}", format_record(&v));
            }
        }
    }
    Ok(())
}

/// Filters of `aigate logs`.
#[derive(clap::Args, Default)]
pub struct LogFilters {
    /// Records from this time on (Unix ms, RFC 3339, or a duration ago like `1h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Records before this time (same forms).
    #[arg(long)]
    pub until: Option<String>,
    /// Only this HTTP status.
    #[arg(long)]
    pub status: Option<u16>,
    /// Only failed requests.
    #[arg(long, conflicts_with = "ok")]
    pub errors: bool,
    /// Only successful requests.
    #[arg(long)]
    pub ok: bool,
    /// Only cache hits (`true`) or only the rest (`false`).
    #[arg(long)]
    pub cached: Option<bool>,
    /// Only this provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// Only this model (requested or served).
    #[arg(long)]
    pub model: Option<String>,
    /// Only records whose metadata has KEY=VALUE.
    #[arg(long, value_name = "KEY=VALUE")]
    pub metadata: Option<String>,
    /// Only this event id.
    #[arg(long)]
    pub event_id: Option<String>,
    /// Most records to print.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

/// A time flag: a duration ago (`7d`), Unix ms or RFC 3339, as Unix ms.
pub fn time_arg(v: &str) -> anyhow::Result<String> {
    if let Ok(d) = humantime::parse_duration(v) {
        let now = aigate_store::Clock::system().now_ms();
        return Ok(now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).to_string());
    }
    Ok(v.to_string())
}

/// `aigate report`: the server computes the report (thresholds from `query`, else its config).
pub async fn report(
    server: &Server,
    gateway: &str,
    query: &[(String, String)],
) -> anyhow::Result<aigate_core::report::Report> {
    let v = server.get_json(&format!("/admin/gateways/{gateway}/report"), query).await?;
    serde_json::from_value(v).context("unexpected report from the server")
}

/// `aigate report --compare` / `--baseline-from`: the server compares the two sides.
pub async fn comparison(
    server: &Server,
    gateway: &str,
    query: &[(String, String)],
) -> anyhow::Result<aigate_core::report::Comparison> {
    let v = server.get_json(&format!("/admin/gateways/{gateway}/report"), query).await?;
    serde_json::from_value(v).context("unexpected comparison from the server")
}

/// `aigate logs`: prints matching records, newest first.
pub async fn logs(server: &Server, gateway: &str, f: &LogFilters, json: bool) -> anyhow::Result<()> {
    let mut q: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, v: String| q.push((k.to_string(), v));
    if let Some(v) = &f.since {
        push("from", time_arg(v)?);
    }
    if let Some(v) = &f.until {
        push("to", time_arg(v)?);
    }
    if let Some(v) = f.status {
        push("status", v.to_string());
    }
    if f.errors {
        push("success", "false".into());
    }
    if f.ok {
        push("success", "true".into());
    }
    if let Some(v) = f.cached {
        push("cached", v.to_string());
    }
    if let Some(v) = &f.provider {
        push("provider", v.clone());
    }
    if let Some(v) = &f.model {
        push("model", v.clone());
    }
    if let Some(v) = &f.metadata {
        let (k, val) = v.split_once('=').context("--metadata takes KEY=VALUE")?;
        push(&format!("metadata.{k}"), val.to_string());
    }
    if let Some(v) = &f.event_id {
        push("event_id", v.clone());
    }
    let mut left = f.limit;
    let mut cursor: Option<String> = None;
    while left > 0 {
        let mut query = q.clone();
        query.push(("limit".into(), left.min(1000).to_string()));
        if let Some(c) = &cursor {
            query.push(("cursor".into(), c.clone()));
        }
        let page = server.get_json(&format!("/admin/gateways/{gateway}/logs"), &query).await?;
        let records = page["records"].as_array().cloned().unwrap_or_default();
        for r in &records {
            if json {
                println!("{r}");
            } else {
                println!("{}", format_record(r));
            }
        }
        left = left.saturating_sub(u32::try_from(records.len()).unwrap_or(u32::MAX));
        match page["next_cursor"].as_str() {
            Some(c) if !records.is_empty() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(())
}

/// One line for a person: time, gateway, model, status, cache, tokens, cost, duration (and the
/// error, if any).
pub fn format_record(r: &Value) -> String {
    let time = r["created_at_ms"]
        .as_u64()
        .map(|ms| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string())
        .unwrap_or_default();
    let model = r["served_model"].as_str().or(r["requested_model"].as_str()).unwrap_or("-");
    let tokens = match (r["tokens_in"].as_u64(), r["tokens_out"].as_u64()) {
        (Some(i), Some(o)) => format!("{i}/{o} tok"),
        _ => "- tok".into(),
    };
    let cost = match (r["cost_usd"].as_f64(), r["saved_usd"].as_f64()) {
        (Some(c), Some(s)) if s > 0.0 => format!("${c:.6} (saved ${s:.6})"),
        (Some(c), _) => format!("${c:.6}"),
        (None, _) => "$?".into(),
    };
    let mut line = format!(
        "{time} {gw} {model} {status} {cache} {tokens} {cost} {dur:.1}ms",
        gw = r["gateway"].as_str().unwrap_or("-"),
        status = r["status"],
        cache = r["cache_status"].as_str().unwrap_or("-"),
        dur = r["duration_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(e) = r["error"].as_str() {
        line.push_str(" error: ");
        line.push_str(e);
    }
    line
}
