//! The log pipeline: every metered request becomes a [`LogRecord`], off the request path.
//!
//! ```text
//! request path ──try_send──▶ bounded queue ──▶ writer task ──▶ finalise ──▶ LogStore (batches)
//!       │ (queue full)                             │                  └──▶ metrics, live tail
//!       └────────▶ spill thread ──▶ data_dir/log-spill/*.jsonl ──(replayed by the writer)──┘
//! ```
//!
//! Finalising also hands each record to the OpenTelemetry exporter ([`crate::telemetry`]) when
//! one is configured.
//!
//! - The request path only calls [`LogPipeline::submit`]: a `try_send` of the boxed [`Meter`].
//!   It never waits. When the queue is full the meter goes to the spill thread (a bounded
//!   channel), which finalises it and appends it to a spill file; if even that channel is full,
//!   or the spill files reached `storage.log_spill_max`, the record is dropped and counted.
//! - The writer takes what is queued in batches (up to [`BATCH`]), finalises each record (request
//!   model, usage, cost, metadata, bodies), records metrics, feeds the live tail, and stores the
//!   batch per gateway in one transaction. A failing store sends the batch to the spill files
//!   instead; the writer replays spill files when the store is healthy and the queue is calm.
//! - Shutdown: after connections drained, the writer drains the queue, the spill thread closes its
//!   file, and the writer makes one bounded attempt to replay spill files. Whatever is left stays
//!   on disk and is replayed at the next start.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aigate_store::{LogRecord, LogStore, Retention, StoreError};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use crate::clock::Clock;
use crate::config::Settings;
use crate::meter::Meter;
use crate::metrics::Metrics;
pub use finalize::parse_metadata;
use finalize::Finalizer;
use spill::{recover_spill_files, spill_loop, SpillItem};
pub use spill::{SPILL_CHANNEL, SPILL_DIR, SPILL_FILE_MAX, SPILL_IDLE};

mod finalize;
mod spill;

/// Most records the writer stores in one transaction.
pub const BATCH: usize = 1024;

/// How long the writer waits for a batch to fill once it has a first record. A store's cost per
/// record falls with the batch (commit and WAL work is per transaction), so under load waiting a
/// little is much cheaper than writing at once; at low traffic it only delays when a record
/// becomes visible. Larger batches stop paying off once a batch's meters and records no longer
/// stay in the CPU's caches.
pub const LINGER: Duration = Duration::from_millis(100);

/// Records finalised between two yields of the writer task.
const FINALIZE_SLICE: usize = 32;

/// Records finalised between two yields while more than a batch waits in the queue. The writer
/// yields to every ready connection between slices, so with short slices under heavy load it
/// could finalise no faster than requests arrive and the queue would spill; longer slices let it
/// catch up, at the price of holding a runtime thread a little longer.
const BACKLOG_FINALIZE_SLICE: usize = 256;

/// Live tail events buffered per subscriber before it is told it lagged.
pub const TAIL_BUFFER: usize = 4096;

/// How often the writer runs maintenance (spill replay; retention every minute).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(2);

/// Counters of the pipeline (exported as metrics).
#[derive(Debug, Default)]
pub struct LogStats {
    /// Records waiting in the queue.
    pub depth: AtomicU64,
    /// Records stored.
    pub written: AtomicU64,
    /// Records sent to spill files.
    pub spilled: AtomicU64,
    /// Spilled records stored later.
    pub replayed: AtomicU64,
    /// Records lost.
    pub dropped: AtomicU64,
    /// Store errors.
    pub store_errors: AtomicU64,
    /// Bytes of spill files on disk.
    pub spill_bytes: AtomicU64,
    /// Requests whose `cf-aig-metadata` was not a valid flat JSON object.
    pub invalid_metadata: AtomicU64,
    /// Unix ms of the last store error warning (one per 10 s).
    last_warn_ms: AtomicU64,
}

impl LogStats {
    /// Records waiting for the writer.
    pub fn queue_depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }
}

/// A finalised record and whether it is kept (analytics count it either way).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    /// Gateway name.
    pub gateway: String,
    /// Store the record (false: `cf-aig-collect-log: false` or logs off; it still counts in
    /// analytics).
    pub keep: bool,
    /// The record.
    pub record: LogRecord,
}

/// One gateway's records of a batch.
struct Group {
    gateway: Arc<str>,
    /// Stored (and counted in analytics).
    kept: Vec<LogRecord>,
    /// Counted in analytics only.
    counted: Vec<LogRecord>,
}

/// A batch's records by gateway. Batches hold one or a few gateways: a short list beats a map,
/// and the gateway's name is compared by pointer first (records of one gateway share it).
struct Groups {
    groups: Vec<Group>,
    /// Records in the batch: a group's first record reserves room for all (no regrowing).
    records: usize,
}

impl Groups {
    fn with_capacity(records: usize) -> Groups {
        Groups { groups: Vec::with_capacity(2), records }
    }

    fn push(&mut self, gateway: &Arc<str>, keep: bool, record: LogRecord) {
        let i = match self.groups.iter().position(|g| Arc::ptr_eq(&g.gateway, gateway) || g.gateway == *gateway) {
            Some(i) => i,
            None => {
                self.groups.push(Group { gateway: gateway.clone(), kept: Vec::new(), counted: Vec::new() });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[i];
        let list = if keep { &mut g.kept } else { &mut g.counted };
        if list.capacity() == 0 {
            list.reserve_exact(self.records);
        }
        list.push(record);
    }
}

/// The pipeline: queue, writer, spill and live tail.
pub struct LogPipeline {
    tx: mpsc::Sender<Box<Meter>>,
    rx: Mutex<Option<mpsc::Receiver<Box<Meter>>>>,
    spill_tx: std_mpsc::SyncSender<SpillItem>,
    spill_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    spill_dir: PathBuf,
    /// Counters.
    pub stats: Arc<LogStats>,
    /// The store.
    pub store: Arc<dyn LogStore>,
    finalizer: Arc<Finalizer>,
    retentions: Mutex<Vec<(String, Retention)>>,
    queue_capacity: usize,
}

impl std::fmt::Debug for LogPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogPipeline").field("store", &self.store.kind()).finish_non_exhaustive()
    }
}

impl LogPipeline {
    /// Builds the pipeline and starts its spill thread; [`LogPipeline::run_writer`] must be spawned.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &Settings,
        store: Arc<dyn LogStore>,
        stats: Arc<LogStats>,
        metrics: Arc<Metrics>,
        limits: Arc<crate::limits::LimitLayer>,
        clock: Clock,
        telemetry: Option<Arc<crate::telemetry::Telemetry>>,
        cache_index: Arc<crate::cache::index::CacheIndex>,
    ) -> std::io::Result<Arc<LogPipeline>> {
        let (tx, rx) = mpsc::channel(settings.storage.log_queue);
        let (tail, _) = broadcast::channel(TAIL_BUFFER);
        let finalizer = Arc::new(Finalizer {
            prices: ArcSwap::new(settings.prices.clone()),
            metrics,
            tail,
            stats: stats.clone(),
            limits,
            clock,
            telemetry,
            cache_index,
        });
        let spill_dir = settings.data_dir.join(SPILL_DIR);
        std::fs::create_dir_all(&spill_dir)?;
        stats.spill_bytes.store(recover_spill_files(&spill_dir)?, Ordering::Relaxed);
        let (spill_tx, spill_rx) = std_mpsc::sync_channel(SPILL_CHANNEL);
        let spill_thread = {
            let dir = spill_dir.clone();
            let fin = finalizer.clone();
            let max = settings.storage.log_spill_max;
            std::thread::Builder::new()
                .name("aigate-log-spill".into())
                .spawn(move || spill_loop(&spill_rx, &dir, &fin, max))?
        };
        let p = Arc::new(LogPipeline {
            tx,
            rx: Mutex::new(Some(rx)),
            spill_tx,
            spill_thread: Mutex::new(Some(spill_thread)),
            spill_dir,
            stats,
            store,
            finalizer,
            retentions: Mutex::new(Vec::new()),
            queue_capacity: settings.storage.log_queue,
        });
        p.configure(settings);
        Ok(p)
    }

    /// Applies (re)loadable settings: prices and per-gateway retention.
    pub fn configure(&self, settings: &Settings) {
        self.finalizer.prices.store(settings.prices.clone());
        let mut r: Vec<(String, Retention)> =
            settings.gateways.values().map(|g| (g.name.to_string(), g.logs.retention)).collect();
        r.sort_by(|a, b| a.0.cmp(&b.0));
        for (gw, ret) in &r {
            self.store.set_retention(gw, *ret);
        }
        *self.retentions.lock().unwrap_or_else(PoisonError::into_inner) = r;
    }

    /// Hands a finished request over. Never waits: a full queue spills, a full spill drops.
    pub fn submit(&self, meter: Box<Meter>) {
        match self.tx.try_send(meter) {
            Ok(()) => {
                self.stats.depth.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) => {
                if self.spill_tx.try_send(SpillItem::Meter(m)).is_err() {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A live feed of finalised records (without bodies).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LogRecord>> {
        self.finalizer.tail.subscribe()
    }

    /// The writer loop; returns after `shutdown` once everything queued is stored or spilled.
    pub async fn run_writer(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        let mut buf: Vec<Box<Meter>> = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention: Option<Instant> = None;
        let mut healthy = true;
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    if buf.len() < BATCH {
                        let linger = tokio::time::sleep(LINGER);
                        tokio::pin!(linger);
                        while buf.len() < BATCH {
                            let room = BATCH - buf.len();
                            tokio::select! {
                                n = rx.recv_many(&mut buf, room) => if n == 0 { break },
                                _ = &mut linger => break,
                            }
                        }
                    }
                    healthy = self.write(&mut buf).await;
                }
                _ = tick.tick() => {
                    let calm = self.stats.queue_depth() < (self.queue_capacity as u64) / 2;
                    if healthy && calm {
                        healthy = self.replay_spill(Duration::from_millis(500)).await;
                    }
                    if last_retention.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_retention = Some(Instant::now());
                        self.enforce_retention().await;
                    }
                }
                _ = shutdown.changed() => {
                    rx.close();
                    while let Some(m) = rx.recv().await {
                        buf.push(m);
                        if buf.len() >= BATCH {
                            self.write(&mut buf).await;
                        }
                    }
                    self.write(&mut buf).await;
                    break;
                }
            }
        }
        self.flush_spill();
        if self.stats.spill_bytes.load(Ordering::Relaxed) > 0 {
            self.replay_spill(Duration::from_secs(5)).await;
        }
        if let Some(t) = self.spill_thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            drop(t); // detached: it waits for more items; the process is exiting.
        }
    }

    /// Waits until the spill thread has written and closed its current file.
    pub fn flush_spill(&self) {
        let (ack_tx, ack_rx) = std_mpsc::sync_channel(1);
        if self.spill_tx.send(SpillItem::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(Duration::from_secs(30));
        }
    }

    /// Finalises and stores a batch; returns whether the store accepted it. (The meters stay boxed:
    /// they were boxed once on the request path and moving them out would copy each.)
    #[allow(clippy::vec_box)]
    async fn write(&self, buf: &mut Vec<Box<Meter>>) -> bool {
        if buf.is_empty() {
            return true;
        }
        self.stats.depth.fetch_sub(buf.len() as u64, Ordering::Relaxed);
        // Finalising costs a few µs a record and runs on a runtime thread: yield between slices so
        // a batch of 1024 never holds requests up for milliseconds (longer slices under a backlog,
        // see BACKLOG_FINALIZE_SLICE).
        let mut groups = Groups::with_capacity(buf.len());
        let slice = if self.stats.queue_depth() > BATCH as u64 { BACKLOG_FINALIZE_SLICE } else { FINALIZE_SLICE };
        for (i, mut m) in buf.drain(..).enumerate() {
            if i > 0 && i % slice == 0 {
                tokio::task::yield_now().await;
            }
            let (keep, record) = self.finalizer.finalize_record(&mut m);
            groups.push(&m.gateway, keep, record);
        }
        match self.store_groups(groups.groups).await {
            Ok(n) => {
                self.stats.written.fetch_add(n, Ordering::Relaxed);
                true
            }
            Err((e, unstored)) => {
                self.store_failed(&e);
                let n = unstored.len() as u64;
                if self.spill_tx.try_send(SpillItem::Records(unstored)).is_err() {
                    self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                }
                false
            }
        }
    }

    /// Stores finished records (grouped by gateway first).
    async fn store_finished(&self, finished: Vec<Finished>) -> Result<u64, (StoreError, Vec<Finished>)> {
        let mut groups = Groups::with_capacity(finished.len());
        let mut gateway: Arc<str> = Arc::from("");
        for f in finished {
            if *gateway != *f.gateway {
                gateway = f.gateway.into();
            }
            groups.push(&gateway, f.keep, f.record);
        }
        self.store_groups(groups.groups).await
    }

    /// Stores records per gateway (records not kept go to the analytics rollups only); returns how
    /// many rows were inserted, or the error with what was not stored.
    async fn store_groups(&self, groups: Vec<Group>) -> Result<u64, (StoreError, Vec<Finished>)> {
        let mut inserted = 0;
        let mut groups = groups.into_iter();
        while let Some(Group { gateway: gw, kept, counted }) = groups.next() {
            let kept = Arc::new(kept);
            let result = async {
                if !kept.is_empty() {
                    inserted += self.store.insert_shared(&gw, kept.clone()).await?;
                }
                // Records not kept still count in analytics.
                if !counted.is_empty() {
                    self.store.add_to_rollups(&gw, &counted).await?;
                }
                Ok::<(), StoreError>(())
            }
            .await;
            if let Err(e) = result {
                // This gateway's records and the rest go to the spill files (a kept record that
                // did get in is skipped on replay: ids are unique).
                let mut unstored = Vec::new();
                let back = |gw: &str, recs: Vec<LogRecord>, keep: bool, out: &mut Vec<Finished>| {
                    out.extend(recs.into_iter().map(|record| Finished { gateway: gw.to_owned(), keep, record }));
                };
                back(&gw, Arc::try_unwrap(kept).unwrap_or_else(|a| a.as_ref().clone()), true, &mut unstored);
                back(&gw, counted, false, &mut unstored);
                for g in groups {
                    back(&g.gateway, g.kept, true, &mut unstored);
                    back(&g.gateway, g.counted, false, &mut unstored);
                }
                return Err((e, unstored));
            }
        }
        Ok(inserted)
    }

    fn store_failed(&self, e: &StoreError) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        let now = self.finalizer.clock.now_ms();
        let last = self.stats.last_warn_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self.stats.last_warn_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(store = self.store.kind(), error = %e, "log store failing: records go to spill files");
        }
    }

    async fn enforce_retention(&self) {
        let gateways: Vec<String> =
            self.retentions.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(g, _)| g.clone()).collect();
        for gw in gateways {
            if let Err(e) = self.store.enforce_retention(&gw).await {
                self.store_failed(&e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite store whose writes fail on the `fail_on`-th call (1-based; 0: never).
    struct Flaky {
        inner: aigate_store::SqliteLogStore,
        calls: AtomicU64,
        fail_on: AtomicU64,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StoreError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.fail_on.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("flaky: this write fails".into()));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl LogStore for Flaky {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        async fn insert_batch(&self, gateway: &str, records: &[LogRecord]) -> Result<u64, StoreError> {
            self.check()?;
            self.inner.insert_batch(gateway, records).await
        }
        async fn add_to_rollups(&self, gateway: &str, records: &[LogRecord]) -> Result<(), StoreError> {
            self.check()?;
            self.inner.add_to_rollups(gateway, records).await
        }
        async fn analytics(
            &self,
            gateway: &str,
            q: &aigate_store::AnalyticsQuery,
        ) -> Result<aigate_store::Analytics, StoreError> {
            self.inner.analytics(gateway, q).await
        }
        async fn list(&self, gateway: &str, f: &aigate_store::LogFilter) -> Result<aigate_store::LogPage, StoreError> {
            self.inner.list(gateway, f).await
        }
        async fn get(&self, gateway: &str, id: &str) -> Result<Option<LogRecord>, StoreError> {
            self.inner.get(gateway, id).await
        }
        async fn delete(&self, gateway: &str, f: &aigate_store::LogFilter) -> Result<u64, StoreError> {
            self.inner.delete(gateway, f).await
        }
        async fn patch(&self, gateway: &str, id: &str, fb: Option<i8>, score: Option<f64>) -> Result<bool, StoreError> {
            self.inner.patch(gateway, id, fb, score).await
        }
        async fn count(&self, gateway: &str) -> Result<u64, StoreError> {
            self.inner.count(gateway).await
        }
        fn set_retention(&self, gateway: &str, retention: Retention) {
            self.inner.set_retention(gateway, retention);
        }
        fn retention(&self, gateway: &str) -> Option<Retention> {
            self.inner.retention(gateway)
        }
        async fn enforce_retention(&self, gateway: &str) -> Result<u64, StoreError> {
            self.inner.enforce_retention(gateway).await
        }
    }

    fn counted_record(i: u64, ms: u64) -> Finished {
        let record = LogRecord {
            id: format!("0193b1c2-{i:04x}-7000-8000-{i:012x}"),
            created_at_ms: ms,
            gateway: "default".into(),
            provider: "openai".into(),
            path: "chat/completions".into(),
            requested_model: Some("gpt-4o-mini".into()),
            status: 200,
            success: true,
            cache_status: "MISS".into(),
            duration_ms: 1.0,
            tokens_in: Some(1),
            tokens_out: Some(1),
            cost_usd: Some(0.0),
            ..LogRecord::default()
        };
        Finished { gateway: "default".into(), keep: false, record }
    }

    #[tokio::test]
    async fn a_spill_file_replayed_in_part_is_not_counted_twice() {
        let dir = std::env::temp_dir().join(format!("aigate-spill-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let toml = format!("data_dir = {:?}\n[gateways.default]\n", dir.display().to_string());
        let settings = Settings::from_toml(&toml).unwrap();
        let state = crate::state::AppState::new(Settings::from_toml(&toml).unwrap()).unwrap();
        let flaky = Arc::new(Flaky {
            inner: aigate_store::SqliteLogStore::open(&dir.join("flaky.sqlite3")).unwrap(),
            calls: AtomicU64::new(0),
            fail_on: AtomicU64::new(2), // the second chunk of the file
        });
        let store: Arc<dyn LogStore> = flaky.clone();
        let p = LogPipeline::new(
            &settings,
            store,
            Arc::new(LogStats::default()),
            state.metrics.clone(),
            state.limits.clone(),
            state.clock.clone(),
            None,
            state.cache.index.clone(),
        )
        .unwrap();
        // Records counted in analytics only (logs off): nothing dedupes them on a second replay.
        let n = BATCH as u64 + 500;
        let now = state.clock.now_ms();
        let mut file = Vec::new();
        for i in 0..n {
            serde_json::to_writer(&mut file, &counted_record(i, now)).unwrap();
            file.push(b'\n');
        }
        std::fs::write(dir.join(SPILL_DIR).join("spill-0000000000001-000001.jsonl"), &file).unwrap();

        assert!(!p.replay_spill(Duration::from_secs(5)).await, "the second chunk fails");
        flaky.fail_on.store(0, Ordering::SeqCst);
        assert!(p.replay_spill(Duration::from_secs(5)).await);
        assert!(spill::list_spill_files(&dir.join(SPILL_DIR)).unwrap().is_empty());

        let q = aigate_store::AnalyticsQuery {
            from_ms: now - 3_600_000,
            to_ms: now + 3_600_000,
            granularity: aigate_store::Granularity::Hour,
            group_by: aigate_store::GroupBy::None,
        };
        let a = flaky.inner.analytics("default", &q).await.unwrap();
        assert_eq!(a.totals.requests, n, "each spilled record counted once");
        assert_eq!(p.stats.replayed.load(Ordering::Relaxed), n);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
