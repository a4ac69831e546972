//! `aigate`: the command line. Thin: parse arguments, load the configuration, call into
//! `aigate-core`.

use std::path::PathBuf;
use std::process::ExitCode;

use aigate_core::Settings;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod remote;

/// mimalloc rather than glibc's malloc: the request path allocates and frees many small objects
/// (header maps, body chunks, futures, log records), and glibc's malloc took ~11 % of the
/// process's instructions per proxied request; mimalloc's thread-local free lists cut the
/// process's instructions per request by that much (callgrind, docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A self-hosted, Cloudflare-compatible AI gateway: cache, meter, rate-limit and log LLM requests.
#[derive(Parser)]
#[command(name = "aigate", version, about, long_about = None)]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (on the embedded default configuration unless --config is given).
    Serve {
        /// TOML configuration file.
        #[arg(long, short, env = "AIGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Override the listen address of the configuration.
        #[arg(long)]
        listen: Option<String>,
        /// Runtime worker threads (default: the CPUs this process may run on). With one, aigate
        /// runs a single-threaded runtime, which is faster on one core.
        #[arg(long, env = "AIGATE_WORKER_THREADS")]
        worker_threads: Option<usize>,
    },
    /// Validate a configuration and print what it configures.
    Check {
        /// TOML configuration file.
        #[arg(long, short, env = "AIGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage the response cache of a running server.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Follow a running server's requests live, one line each (like `wrangler tail`).
    Tail {
        /// Only this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Only failed requests.
        #[arg(long)]
        errors: bool,
        /// Print each record as a JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// The rollout report of a gateway: traffic, hit rate, errors, latency, cost and savings, and a
    /// go / no-go verdict. Exits 0 on go, 1 on no-go, 2 when the report cannot be made.
    Report {
        /// The gateway.
        #[arg(long)]
        gateway: String,
        /// The period, ending now: `7d`, `24h`, ...
        #[arg(long, default_value = "7d")]
        since: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// No-go below this cache hit rate, 0..1 (the would-be rate of a shadow-mode gateway).
        #[arg(long)]
        min_hit_rate: Option<f64>,
        /// No-go above this error rate, 0..1.
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// No-go above this p95 latency, ms.
        #[arg(long)]
        max_p95_ms: Option<f64>,
        /// No-go below this many requests.
        #[arg(long)]
        min_requests: Option<u64>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Query a gateway's request logs, newest first.
    Logs {
        /// The gateway.
        #[arg(long, default_value = "default")]
        gateway: String,
        #[command(flatten)]
        filters: remote::LogFilters,
        /// Print each record as a JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Purge a gateway's cache (all entries, or one).
    Purge {
        /// The gateway.
        #[arg(long)]
        gateway: String,
        /// One entry, by the digest in its `aigate-cache-key` response header.
        #[arg(long, conflicts_with = "cache_key")]
        key: Option<String>,
        /// One entry, by the `cf-aig-cache-key` it was stored under.
        #[arg(long)]
        cache_key: Option<String>,
        /// The server's base URL (default: the configuration's listen address).
        #[arg(long)]
        url: Option<String>,
        /// Admin token (default: the configuration's `[admin] token`).
        #[arg(long, env = "AIGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// TOML configuration file.
        #[arg(long, short, env = "AIGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReportFormat {
    Text,
    Markdown,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let report = matches!(cli.command, Command::Report { .. });
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // `report` keeps 1 for no-go, so a deployment script can tell the two apart.
            if report {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Report { gateway, since, format, min_hit_rate, max_error_rate, max_p95_ms, min_requests, remote } =
        cli.command
    {
        let server = remote.resolve()?;
        let mut query = vec![("since".to_string(), since)];
        for (k, v) in [("min_hit_rate", min_hit_rate), ("max_error_rate", max_error_rate), ("max_p95_ms", max_p95_ms)] {
            if let Some(v) = v {
                query.push((k.to_string(), v.to_string()));
            }
        }
        if let Some(v) = min_requests {
            query.push(("min_requests".to_string(), v.to_string()));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let report = rt.block_on(remote::report(&server, &gateway, &query))?;
        match format {
            ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            f => print!("{}", report.render(f == ReportFormat::Markdown)),
        }
        return Ok(if report.is_go() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    run_other(cli.command).map(|()| ExitCode::SUCCESS)
}

fn run_other(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { config } => {
            let settings = load(config.as_deref())?;
            print!("{}", describe(&settings, config.as_deref()));
            println!("configuration is valid");
            Ok(())
        }
        Command::Cache { command: CacheCommand::Purge { gateway, key, cache_key, url, token, config } } => {
            let settings = load(config.as_deref())?;
            let base = url.unwrap_or_else(|| format!("http://{}", settings.listen));
            let token = token
                .or_else(|| settings.admin_token.as_ref().map(|t| t.expose().to_string()))
                .context("no admin token: pass --token, set AIGATE_ADMIN_TOKEN or [admin] token")?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(purge(&base, &token, &gateway, key.as_deref(), cache_key.as_deref()))
        }
        Command::Tail { gateway, errors, json, remote } => {
            let server = remote.resolve()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                tokio::select! {
                    r = remote::tail(&server, gateway.as_deref(), errors, json) => r,
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            })
        }
        Command::Logs { gateway, filters, json, remote } => {
            let server = remote.resolve()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(remote::logs(&server, &gateway, &filters, json))
        }
        Command::Report { .. } => unreachable!("handled in run"),
        Command::Serve { config, listen, worker_threads } => {
            let mut settings = load(config.as_deref())?;
            let listen_override = listen.is_some();
            if let Some(l) = listen {
                settings.listen =
                    l.parse().with_context(|| format!("--listen {l:?} is not an address like 127.0.0.1:8787"))?;
            }
            let workers = worker_threads
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let rt = if workers == 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?
            };
            rt.block_on(serve(settings, config, listen_override))
        }
    }
}

async fn purge(
    base: &str,
    token: &str,
    gateway: &str,
    key: Option<&str>,
    cache_key: Option<&str>,
) -> anyhow::Result<()> {
    let url = format!("{}/admin/gateways/{gateway}/cache", base.trim_end_matches('/'));
    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(k) = key {
        query.push(("key", k));
    }
    if let Some(k) = cache_key {
        query.push(("cache_key", k));
    }
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .delete(&url)
        .query(&query)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("purge failed ({status}): {}", body["error"]["message"].as_str().unwrap_or("no message"));
    }
    println!("purged {} entr{} from gateway {gateway}", body["purged"], if body["purged"] == 1 { "y" } else { "ies" });
    Ok(())
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Settings> {
    Ok(match path {
        Some(p) => Settings::from_file(p)?,
        None => Settings::embedded_default()?,
    })
}

async fn serve(settings: Settings, config: Option<PathBuf>, listen_override: bool) -> anyhow::Result<()> {
    let gateways = settings.gateways.len();
    let handle = aigate_core::start(settings).await.context("cannot start the server")?;
    tracing::info!(addr = %handle.addr, gateways, "aigate listening on http://{}", handle.addr);
    let state = handle.state.clone();
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = reload_on_sighup(state, config, listen_override) => {}
    }
    tracing::info!("shutdown signal received");
    handle.shutdown();
    handle.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the configuration file on every SIGHUP. An invalid file is refused with its error and
/// the running configuration stays.
async fn reload_on_sighup(
    state: std::sync::Arc<aigate_core::state::AppState>,
    config: Option<PathBuf>,
    listen_override: bool,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return std::future::pending().await;
        };
        while hup.recv().await.is_some() {
            let Some(path) = config.clone() else {
                tracing::warn!("SIGHUP: no configuration file to reload (running the embedded default)");
                continue;
            };
            let loaded = tokio::task::spawn_blocking(move || Settings::from_file(&path)).await;
            match loaded {
                Ok(Ok(mut new)) => {
                    if listen_override {
                        new.listen = state.settings.load().listen;
                    }
                    for w in state.reload(new) {
                        tracing::warn!("configuration reload: {w}");
                    }
                    tracing::info!("configuration reloaded");
                }
                Ok(Err(e)) => tracing::error!("configuration reload refused, the running configuration stays: {e}"),
                Err(e) => tracing::error!("configuration reload failed: {e}"),
            }
        }
    }
    std::future::pending::<()>().await;
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// What `aigate check` prints. Secrets are never shown: only how many tokens and which
/// providers have stored keys.
fn describe(s: &Settings, path: Option<&std::path::Path>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let source = path.map_or_else(|| "embedded default".to_string(), |p| p.display().to_string());
    let _ = writeln!(out, "config: {source}");
    let _ = writeln!(out, "listen: {}", s.listen);
    let _ = writeln!(out, "data_dir: {}", s.data_dir.display());
    let _ = writeln!(out, "default_gateway: {}", s.default_gateway);
    let _ = writeln!(out, "max_request_body: {} bytes", s.max_request_body);
    let cache_store = match &s.storage.cache {
        aigate_store::CacheBackend::Memory => "memory".to_string(),
        aigate_store::CacheBackend::Disk { dir, max_bytes } => {
            format!("disk ({}, up to {max_bytes} bytes)", dir.display())
        }
        aigate_store::CacheBackend::Redis { .. } => "redis".to_string(),
    };
    let _ = writeln!(out, "cache store: {cache_store}; memory tier {} bytes", s.storage.cache_memory);
    // Store URLs can hold passwords: only their kind is printed.
    let log_store = match &s.storage.logs {
        aigate_store::LogBackend::Sqlite { path } => format!("sqlite ({})", path.display()),
        aigate_store::LogBackend::Postgres { .. } => "postgres".to_string(),
    };
    let _ = writeln!(out, "log store: {log_store}; queue {} records", s.storage.log_queue);
    let limit_store = if s.storage.limits == "memory" { "memory" } else { "redis" };
    let _ = writeln!(
        out,
        "limit store: {limit_store}; on_store_error: {:?}; cache hits count: {}; alert webhook: {}",
        s.limits.on_store_error,
        s.limits.count_cache_hits,
        if s.limits.alert_webhook.is_some() { "set" } else { "none" }
    );
    let _ = writeln!(out, "admin API: {}", if s.admin_token.is_some() { "on" } else { "off (no [admin] token)" });
    let mut gws: Vec<_> = s.gateways.values().collect();
    gws.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(out, "gateways ({}):", gws.len());
    for g in gws {
        let mut keys: Vec<&str> = g.provider_keys.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let auth = if g.authentication { format!("on ({} token(s))", g.tokens.len()) } else { "off".to_string() };
        let keys = if keys.is_empty() { "none".to_string() } else { keys.join(", ") };
        let cache = match g.cache.mode {
            aigate_core::config::CacheMode::Off => "off".to_string(),
            mode => format!(
                "{} (ttl {}, scope {:?})",
                if mode == aigate_core::config::CacheMode::Shadow { "shadow" } else { "on" },
                humantime::format_duration(g.cache.ttl),
                g.cache.scope
            ),
        };
        let logs = if g.logs.enabled {
            format!(
                "on (bodies {}, max {} records)",
                if g.logs.bodies { "on" } else { "off" },
                g.logs.retention.max_records
            )
        } else {
            "off".to_string()
        };
        let _ = writeln!(
            out,
            "  {:<16} authentication: {auth}; stored provider keys: {keys}; request_timeout: {}; cache: {cache}; logs: {logs}",
            g.name,
            humantime::format_duration(g.request_timeout)
        );
        for r in &g.rules {
            let what = match (&r.budget, r.measure) {
                (Some(b), _) => format!("budget ${} per {:?}", b.limit_usd, b.period),
                (None, m) => format!(
                    "{} {m:?} per {} ({})",
                    r.limit,
                    humantime::format_duration(std::time::Duration::from_millis(r.period_ms)),
                    r.technique
                ),
            };
            let _ = writeln!(out, "    limit {:<12} {what}, key {:?}", &*r.name, r.key);
        }
    }
    let mut ps: Vec<_> = s.providers.values().collect();
    ps.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(out, "providers ({}):", ps.len());
    for p in ps {
        let _ = writeln!(out, "  {:<16} {} ({:?})", p.name, p.base_url, p.auth);
    }
    out
}
