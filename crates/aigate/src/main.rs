//! `aigate`: the command line. Thin: parse arguments, load the configuration, call into
//! `aigate-core`.

use std::path::PathBuf;
use std::process::ExitCode;

use aigate_core::Settings;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod cache_cmd;
mod remote;

/// mimalloc rather than glibc's malloc: the request path allocates and frees many small objects
/// (header maps, body chunks, futures, log records) across threads, which mimalloc's thread-local
/// free lists serve at a fraction of glibc's cost.
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
    /// go / no-go verdict. With --compare or --baseline-from, a candidate set beside a baseline
    /// instead, and the candidate's verdict. Exits 0 on go, 1 on no-go, 2 when the report cannot
    /// be made.
    Report {
        /// The gateway (the baseline of a comparison).
        #[arg(long)]
        gateway: String,
        /// The period, ending now or at --to: `7d`, `24h`, ... [default: 7d]
        #[arg(long, conflicts_with = "from")]
        since: Option<String>,
        /// The period's start instead (Unix ms, RFC 3339, or a duration ago like `2h`).
        #[arg(long)]
        from: Option<String>,
        /// The period's end (same forms; default now).
        #[arg(long)]
        to: Option<String>,
        /// Compare this gateway (a canary) with --gateway over the same period.
        #[arg(long, value_name = "GATEWAY")]
        compare: Option<String>,
        /// Compare the period with --gateway's own earlier one, from this time (same forms as --from).
        #[arg(long)]
        baseline_from: Option<String>,
        /// The baseline period's end (default: the period's start).
        #[arg(long, requires = "baseline_from")]
        baseline_to: Option<String>,
        /// Comparison: no-go when the candidate's error rate exceeds the baseline's by more than
        /// this, 0..1 [default: 0.01, one percentage point].
        #[arg(long)]
        max_error_rate_increase: Option<f64>,
        /// Comparison: no-go when the candidate's p95 exceeds the baseline's by more than this
        /// ratio [default: 0.2, 20 %].
        #[arg(long)]
        max_p95_increase: Option<f64>,
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
        /// No-go below this many requests (on each side of a comparison, default 100 there).
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
    /// Purge a gateway's cache: all entries, one, or those a filter matches.
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
        /// Only entries stored by requests for this model.
        #[arg(long, conflicts_with_all = ["key", "cache_key"])]
        model: Option<String>,
        /// Only entries of this endpoint (`chat`, `completions`, `embeddings`, `responses`,
        /// `messages`, `generate_content`, `models`).
        #[arg(long, conflicts_with_all = ["key", "cache_key"])]
        endpoint: Option<String>,
        /// Only entries whose request carried this `cf-aig-metadata` entry (repeatable).
        #[arg(long, value_name = "KEY=VALUE", conflicts_with_all = ["key", "cache_key"])]
        metadata: Vec<String>,
        /// Only entries stored longer ago than this (`1h`, `7d`).
        #[arg(long, conflicts_with_all = ["key", "cache_key"])]
        older_than: Option<String>,
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
    /// The requests that repeat most: each entry's hits, misses, size, age, savings, model and
    /// prompt, with totals (what the server's process has seen).
    Top {
        /// The gateway.
        #[arg(long)]
        gateway: String,
        /// Entries looked up or stored in this window.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Most entries listed.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The server's JSON answer as is.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Fills the cache by sending requests through the gateway (its limits and budgets apply);
    /// stops at the first request that fails.
    Warm {
        /// The gateway.
        #[arg(long)]
        gateway: String,
        #[command(flatten)]
        source: WarmSource,
        /// With --from-logs: requests looked up in this window.
        #[arg(long, default_value = "7d")]
        since: String,
        /// With --from-logs: how many of the most repeated requests.
        #[arg(long, default_value_t = 100)]
        top: usize,
        /// Print what would be sent and its estimated cost; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// A header added to every request, e.g. the provider credential (`"authorization: Bearer
        /// sk-…"`) when the gateway stores none (repeatable).
        #[arg(long, value_name = "NAME: VALUE")]
        header: Vec<String>,
        #[command(flatten)]
        remote: remote::Remote,
    },
}

/// Where `aigate cache warm` takes its requests from.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct WarmSource {
    /// The gateway's most repeated requests (its cache index), sent again with the bodies its logs
    /// kept (needs `[gateways.G.logs] bodies = true`).
    #[arg(long)]
    from_logs: bool,
    /// A JSON Lines file, one request a line: `{"path": "openai/chat/completions", "body": {…},
    /// "headers": {…}}` (a path without a leading `/` is under the gateway).
    #[arg(long)]
    file: Option<PathBuf>,
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
    if let Command::Report { gateway, format, remote, .. } = &cli.command {
        let server = remote.resolve()?;
        let query = report_query(&cli.command)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let comparison = query.iter().any(|(k, _)| k == "compare" || k == "baseline_from");
        let (go, text, json) = if comparison {
            let c = rt.block_on(remote::comparison(&server, gateway, &query))?;
            (c.is_go(), c.render(*format == ReportFormat::Markdown), serde_json::to_string_pretty(&c)?)
        } else {
            let r = rt.block_on(remote::report(&server, gateway, &query))?;
            (r.is_go(), r.render(*format == ReportFormat::Markdown), serde_json::to_string_pretty(&r)?)
        };
        match format {
            ReportFormat::Json => println!("{json}"),
            _ => print!("{text}"),
        }
        return Ok(if go { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    run_other(cli.command).map(|()| ExitCode::SUCCESS)
}

/// The admin API query of `aigate report`'s flags.
fn report_query(command: &Command) -> anyhow::Result<Vec<(String, String)>> {
    let Command::Report {
        since,
        from,
        to,
        compare,
        baseline_from,
        baseline_to,
        max_error_rate_increase,
        max_p95_increase,
        min_hit_rate,
        max_error_rate,
        max_p95_ms,
        min_requests,
        ..
    } = command
    else {
        anyhow::bail!("not a report command");
    };
    let mut query = Vec::new();
    let mut push = |k: &str, v: String| query.push((k.to_string(), v));
    match from {
        Some(f) => push("from", remote::time_arg(f)?),
        None => push("since", since.clone().unwrap_or_else(|| "7d".into())),
    }
    for (k, v) in [("to", to), ("baseline_from", baseline_from), ("baseline_to", baseline_to)] {
        if let Some(v) = v {
            push(k, remote::time_arg(v)?);
        }
    }
    if let Some(g) = compare {
        push("compare", g.clone());
    }
    for (k, v) in [
        ("min_hit_rate", min_hit_rate),
        ("max_error_rate", max_error_rate),
        ("max_p95_ms", max_p95_ms),
        ("max_error_rate_increase", max_error_rate_increase),
        ("max_p95_increase", max_p95_increase),
    ] {
        if let Some(v) = v {
            push(k, v.to_string());
        }
    }
    if let Some(v) = min_requests {
        push("min_requests", v.to_string());
    }
    Ok(query)
}

fn run_other(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { config } => {
            let settings = load(config.as_deref())?;
            print!("{}", describe(&settings, config.as_deref()));
            println!("configuration is valid");
            Ok(())
        }
        Command::Cache {
            command:
                CacheCommand::Purge { gateway, key, cache_key, model, endpoint, metadata, older_than, url, token, config },
        } => {
            let settings = load(config.as_deref())?;
            let base = url.unwrap_or_else(|| format!("http://{}", settings.listen));
            let token = token
                .or_else(|| settings.admin_token.as_ref().map(|t| t.expose().to_string()))
                .context("no admin token: pass --token, set AIGATE_ADMIN_TOKEN or [admin] token")?;
            let mut query: Vec<(String, String)> = Vec::new();
            for (k, v) in [
                ("key", key),
                ("cache_key", cache_key),
                ("model", model),
                ("endpoint", endpoint),
                ("older_than", older_than),
            ] {
                if let Some(v) = v {
                    query.push((k.to_owned(), v));
                }
            }
            for m in metadata {
                let (k, v) = m.split_once('=').with_context(|| format!("--metadata {m:?}: expected KEY=VALUE"))?;
                query.push((format!("metadata.{k}"), v.to_owned()));
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(purge(&base, &token, &gateway, &query))
        }
        Command::Cache { command: CacheCommand::Top { gateway, since, limit, json, remote } } => {
            let server = remote.resolve()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(cache_cmd::top(&server, &gateway, &since, limit, json))
        }
        Command::Cache { command: CacheCommand::Warm { gateway, source, since, top, dry_run, header, remote } } => {
            let server = remote.resolve()?;
            let source = match source.file {
                Some(f) => cache_cmd::Source::File(f),
                None => cache_cmd::Source::Logs { since, top },
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(cache_cmd::warm(&server, &gateway, source, dry_run, &header))
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
            let mut builder = if workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(workers);
                b
            };
            let rt = builder.max_blocking_threads(settings.blocking_threads).enable_all().build()?;
            rt.block_on(serve(settings, config, listen_override))
        }
    }
}

async fn purge(base: &str, token: &str, gateway: &str, query: &[(String, String)]) -> anyhow::Result<()> {
    let url = format!("{}/admin/gateways/{gateway}/cache", base.trim_end_matches('/'));
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .delete(&url)
        .query(query)
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
    // The signal handlers come first: a signal that arrives while the server starts must not find
    // the default action (which ends the process).
    let signals = Signals::install()?;
    let gateways = settings.gateways.len();
    let data_dir = settings.data_dir.clone();
    let handle = aigate_core::start(settings).await.context("cannot start the server")?;
    let data_dir = data_dir.canonicalize().or_else(|_| std::path::absolute(&data_dir)).unwrap_or(data_dir);
    tracing::info!(addr = %handle.addr, gateways, data_dir = %data_dir.display(), "aigate listening on http://{}", handle.addr);
    let state = handle.state.clone();
    let Signals { mut stop, hup } = signals;
    tokio::select! {
        _ = stop.recv() => {}
        _ = reload_on_sighup(hup, state, config, listen_override) => {}
    }
    tracing::info!("shutdown signal received");
    handle.shutdown();
    handle.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// The signals `serve` answers: SIGTERM and Ctrl-C stop it, SIGHUP reloads the configuration.
struct Signals {
    stop: tokio::sync::mpsc::Receiver<()>,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let (tx, stop) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(()).await;
        });
        Ok(Signals { stop, hup })
    }
}

/// Reloads the configuration file on every SIGHUP. An invalid file is refused with its error and
/// the running configuration stays.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    state: std::sync::Arc<aigate_core::state::AppState>,
    config: Option<PathBuf>,
    listen_override: bool,
) {
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
    std::future::pending::<()>().await
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

/// What `aigate check` prints: every setting in force, written as the configuration writes it
/// (defaults included). Secrets are never shown: only how many tokens there are and which
/// providers have stored keys; store URLs only by their kind (they can hold passwords).
fn describe(s: &Settings, path: Option<&std::path::Path>) -> String {
    use aigate_store::{CacheBackend, LimitBackend, LogBackend};
    use std::fmt::Write;
    let mut out = String::new();
    let source = path.map_or_else(|| "embedded default".to_string(), |p| p.display().to_string());
    let dur = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(out, "config: {source}");
    let _ = writeln!(out, "listen = \"{}\"", s.listen);
    let _ = writeln!(out, "data_dir = \"{}\"  # {}", s.data_dir.display(), absolute(&s.data_dir).display());
    let _ = writeln!(out, "default_gateway = \"{}\"", s.default_gateway);
    if let Some(a) = &s.account_id {
        let _ = writeln!(out, "account_id = \"{a}\"");
    }
    let _ = writeln!(out, "max_request_body = \"{}\"", size(s.max_request_body));
    let _ = writeln!(
        out,
        "max_connections = {}, header_read_timeout = \"{}\", request_body_timeout = \"{}\", shutdown_grace = \"{}\", blocking_threads = {}",
        s.max_connections,
        dur(s.header_read_timeout),
        dur(s.request_body_timeout),
        dur(s.shutdown_grace),
        s.blocking_threads
    );
    let b = &s.storage.backends;
    let cache = match &b.cache {
        CacheBackend::Memory => "\"memory\"".to_string(),
        CacheBackend::Disk { dir, max_bytes } => {
            format!("\"disk\", cache_disk = \"{}\"  # {}", size(*max_bytes), absolute(dir).display())
        }
        CacheBackend::Redis { .. } => "\"redis://…\"".to_string(),
    };
    let logs = match &b.logs {
        LogBackend::Sqlite { path } => format!("\"sqlite\"  # {}", absolute(path).display()),
        LogBackend::Postgres { .. } => "\"postgres://…\"".to_string(),
    };
    let limits = match &b.limits {
        LimitBackend::Memory => "\"memory\"",
        LimitBackend::Redis { .. } => "\"redis://…\"",
    };
    let _ = writeln!(out, "[storage]");
    let _ = writeln!(out, "  cache = {cache}");
    let _ = writeln!(out, "  cache_memory = \"{}\"", size(b.cache_memory));
    let _ = writeln!(out, "  logs = {logs}");
    let _ =
        writeln!(out, "  log_queue = {}, log_spill_max = \"{}\"", s.storage.log_queue, size(s.storage.log_spill_max));
    let _ = writeln!(out, "  limits = {limits}");
    let l = &s.limits;
    let _ = writeln!(out, "[limits]");
    let _ = writeln!(
        out,
        "  on_store_error = \"{}\", count_cache_hits = {}, default_max_tokens = {}, alert_webhook = {}",
        l.on_store_error.as_str(),
        l.count_cache_hits,
        l.default_max_tokens,
        if l.alert_webhook.is_some() { "(set)" } else { "(none)" }
    );
    let _ = writeln!(out, "[admin]");
    let _ =
        writeln!(out, "  token = {}", if s.admin_token.is_some() { "(set)" } else { "(none: the admin API is off)" });
    let _ = writeln!(
        out,
        "[dashboard]{}\n  read_only = {}, session_ttl = \"{}\"",
        if s.admin_token.is_some() { " at /dashboard" } else { " (off: needs [admin] token)" },
        s.dashboard.read_only,
        dur(s.dashboard.session_ttl)
    );
    match &s.telemetry {
        Some(t) => {
            let names: Vec<&str> = t.headers.iter().map(|(n, _)| n.as_str()).collect();
            let _ = writeln!(out, "[telemetry]  # OTLP/HTTP to {} and {}", t.traces_url, t.metrics_url);
            let _ = writeln!(
                out,
                "  otlp_endpoint = \"{}\", service_name = \"{}\", headers = [{}], batch_size = {}, queue = {}, export_interval = \"{}\", timeout = \"{}\"",
                t.endpoint,
                t.service_name,
                names.join(", "),
                t.batch_size,
                t.queue,
                dur(t.export_interval),
                dur(t.timeout)
            );
        }
        None => {
            let _ = writeln!(out, "[telemetry]\n  otlp_endpoint = (none: OpenTelemetry export is off)");
        }
    }
    let mut gws: Vec<_> = s.gateways.values().collect();
    gws.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(out, "gateways ({}):", gws.len());
    for g in gws {
        let mut keys: Vec<&str> = g.provider_keys.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let _ = writeln!(out, "[gateways.{}]", g.name);
        let _ = writeln!(
            out,
            "  authentication = {}, tokens = ({} set), provider_keys = [{}], request_timeout = \"{}\"",
            g.authentication,
            g.tokens.len(),
            keys.join(", "),
            dur(g.request_timeout)
        );
        let c = &g.cache;
        let _ = writeln!(
            out,
            "  cache: enabled = {}, mode = \"{}\", ttl = \"{}\", scope = \"{}\", max_entry_size = \"{}\", coalesce = {}",
            c.mode != aigate_core::config::CacheMode::Off,
            c.mode.as_str(),
            dur(c.ttl),
            c.scope.as_str(),
            size(c.max_entry_size),
            c.coalesce
        );
        for r in c.rules.rules() {
            let _ = writeln!(out, "  cache rule {}", r.describe());
        }
        let lg = &g.logs;
        let _ = writeln!(
            out,
            "  logs: enabled = {}, bodies = {}, max_records = {}",
            lg.enabled, lg.bodies, lg.retention.max_records
        );
        let rt = &g.retries;
        let _ = writeln!(
            out,
            "  retries: max_attempts = {}, delay = \"{}\", backoff = \"{}\"",
            rt.max_attempts,
            dur(rt.delay),
            rt.backoff.as_str()
        );
        for r in &g.rules {
            let only = r.model.as_ref().map(|m| format!(", model = \"{m}\"")).unwrap_or_default();
            match &r.budget {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "  budget \"{}\": limit_usd = {}, period = \"{}\", key = \"{}\"{only}",
                        r.name,
                        b.limit_usd,
                        b.period.label(),
                        r.key
                    );
                }
                None => {
                    let limit = match r.measure {
                        aigate_core::limits::Measure::CostUsd => format!("{}", r.limit as f64 / 1e6),
                        _ => r.limit.to_string(),
                    };
                    let _ = writeln!(
                        out,
                        "  limit \"{}\": measure = \"{}\", limit = {limit}, period = \"{}\", technique = \"{}\", key = \"{}\"{only}",
                        r.name,
                        r.measure.as_str(),
                        dur(std::time::Duration::from_millis(r.period_ms)),
                        r.technique.as_str(),
                        r.key
                    );
                }
            }
        }
        let mut routes: Vec<_> = g.routes.values().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        for r in routes {
            let _ = writeln!(out, "  route \"dynamic/{}\" ({}): {}", r.name, r.label(), r.describe());
        }
        if let Some(b) = &g.breaker {
            let _ = writeln!(
                out,
                "  breaker: failures = {}, window = \"{}\", cool_off = \"{}\"",
                b.failures,
                dur(b.window),
                dur(b.cool_off)
            );
        }
        if let Some(c) = &g.canary {
            let sticky = match &c.sticky {
                None => "per request".to_owned(),
                Some(aigate_core::routing::Sticky::Credential) => "credential".to_owned(),
                Some(aigate_core::routing::Sticky::Metadata(k)) => format!("metadata.{k}"),
            };
            let _ = writeln!(out, "  canary: {} % to gateway \"{}\", sticky = {sticky}", c.percent, c.gateway);
        }
    }
    let mut ps: Vec<_> = s.providers.values().collect();
    ps.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(out, "providers ({}):", ps.len());
    for p in ps {
        let _ = writeln!(out, "  {:<16} base_url = \"{}\", auth = \"{}\"", p.name, p.base_url, p.auth.as_str());
    }
    out
}

/// `path` made absolute against the working directory (for messages).
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A byte count as the configuration writes sizes (`25MB`, `256MB`, `2GB`).
fn size(bytes: u64) -> String {
    match bytes {
        0 => "0".to_string(),
        b if b % 1_000_000_000 == 0 => format!("{}GB", b / 1_000_000_000),
        b if b % 1_000_000 == 0 => format!("{}MB", b / 1_000_000),
        b if b % 1_000 == 0 => format!("{}KB", b / 1_000),
        b => b.to_string(),
    }
}
