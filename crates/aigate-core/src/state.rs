//! The state every request shares ([`AppState`]): the current settings, the upstream client, the
//! cache, the limits, the log pipeline and the metrics; built once at start, and reloaded in
//! place on SIGHUP ([`AppState::reload`]).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::cache::CacheLayer;
use crate::client::{self, HttpClient};
use crate::clock::Clock;
use crate::config::Settings;
use crate::limits::{LimitLayer, LimitStats};
use crate::logs::{LogPipeline, LogStats};
use crate::metrics::Metrics;
use crate::telemetry::{Telemetry, TelemetryStats};

/// What every request handler shares: the current settings (swappable for reload), the upstream
/// client, the cache and the readiness flag.
pub struct AppState {
    /// Current settings; replaced atomically on reload.
    pub settings: ArcSwap<Settings>,
    /// Pooled upstream client.
    pub client: HttpClient,
    /// The response cache.
    pub cache: Arc<CacheLayer>,
    /// Time source.
    pub clock: Clock,
    /// False once shutdown has begun (`/readyz` answers 503).
    pub ready: AtomicBool,
    /// Request logs: queue, writer, spill, live tail.
    pub logs: Arc<LogPipeline>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Rate limits and budgets.
    pub limits: Arc<LimitLayer>,
    /// Set to true when shutdown begins (ends live tails so connections can drain).
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// The web console's sessions and settings lock.
    pub dashboard: crate::dashboard::DashboardState,
    /// Circuit breakers by gateway and provider.
    pub breakers: crate::routing::breaker::Breakers,
    /// OpenTelemetry export, when `[telemetry] otlp_endpoint` is set.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// Why the state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS setup failed.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A store could not be opened.
    #[error("cannot open the stores: {0}")]
    Store(#[from] aigate_store::StoreError),
    /// The log store or its spill directory could not be opened.
    #[error("cannot open the log store: {0}")]
    Logs(String),
}

impl AppState {
    /// Builds the state from validated settings.
    pub fn new(settings: Settings) -> Result<Arc<AppState>, StartError> {
        let client = client::build_client(&settings.upstream)?;
        let clock = Clock::system();
        let stores = aigate_store::open(&settings.storage.backends, &clock)?;
        let cache = CacheLayer::new(stores.cache, clock.clone());
        let log_stats = Arc::new(LogStats::default());
        let limit_stats = Arc::new(LimitStats::default());
        let telemetry_stats = Arc::new(TelemetryStats::default());
        let telemetry = settings.telemetry.as_ref().map(|t| Telemetry::new(t, client.clone(), telemetry_stats.clone()));
        let metrics = Metrics::new(
            cache.clone(),
            log_stats.clone(),
            limit_stats.clone(),
            telemetry.as_ref().map(|_| telemetry_stats),
        );
        let limits = Arc::new(LimitLayer::new(
            stores.limits,
            settings.limits.clone(),
            limit_stats,
            clock.clone(),
            client.clone(),
            metrics.clone(),
        ));
        limits.start_settler();
        let logs = LogPipeline::new(
            &settings,
            stores.logs,
            log_stats,
            metrics.clone(),
            limits.clone(),
            clock.clone(),
            telemetry.clone(),
            cache.index.clone(),
        )
        .map_err(|e| StartError::Logs(format!("spill directory: {e}")))?;
        Ok(Arc::new(AppState {
            settings: ArcSwap::from_pointee(settings),
            client,
            cache,
            clock,
            ready: AtomicBool::new(true),
            logs,
            metrics,
            limits,
            stopping: tokio::sync::watch::Sender::new(false),
            dashboard: crate::dashboard::DashboardState::default(),
            breakers: Default::default(),
            telemetry,
        }))
    }
}

impl AppState {
    /// Applies a new configuration atomically: the next request sees all of it (gateways, tokens,
    /// provider keys, cache, logs and limit settings, prices). What is fixed at start (listen
    /// address, storage backends, connection limits, upstream pool, telemetry) keeps its running value; each
    /// such difference is returned as a warning.
    pub fn reload(&self, mut new: Settings) -> Vec<String> {
        let old = self.settings.load_full();
        let mut warnings = Vec::new();
        let mut fixed = |what: &str, changed: bool| {
            if changed {
                warnings.push(format!("{what} changed: it applies after a restart; the running value stays"));
            }
        };
        fixed("listen", new.listen != old.listen);
        fixed("data_dir", new.data_dir != old.data_dir);
        fixed("[storage]", new.storage != old.storage);
        fixed("[upstream]", new.upstream != old.upstream);
        fixed("max_connections", new.max_connections != old.max_connections);
        fixed("listen_backlog", new.listen_backlog != old.listen_backlog);
        fixed("header_read_timeout", new.header_read_timeout != old.header_read_timeout);
        fixed("blocking_threads", new.blocking_threads != old.blocking_threads);
        fixed("[telemetry]", new.telemetry != old.telemetry);
        new.listen = old.listen;
        new.data_dir = old.data_dir.clone();
        new.storage = old.storage.clone();
        new.upstream = old.upstream.clone();
        new.max_connections = old.max_connections;
        new.header_read_timeout = old.header_read_timeout;
        new.blocking_threads = old.blocking_threads;
        new.telemetry = old.telemetry.clone();
        self.logs.configure(&new);
        self.limits.configure(new.limits.clone());
        self.settings.store(Arc::new(new));
        warnings
    }
}
