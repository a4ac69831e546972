//! The listener: accepts connections (HTTP/1.1 and h2c), serves each with [`service::handle`], and
//! shuts down gracefully: stop accepting, mark not ready, let in-flight requests and streams finish
//! up to the grace period, then return.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::service;
use crate::state::AppState;

/// A running server.
pub struct ServerHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state (settings, client).
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the server has stopped (after [`ServerHandle::shutdown`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds `settings.listen` and starts serving.
pub async fn start(settings: Settings) -> std::io::Result<ServerHandle> {
    let listener = TcpListener::bind(settings.listen).await?;
    start_on(settings, listener)
}

/// Starts serving on an already bound listener (tests bind port 0).
pub fn start_on(settings: Settings, listener: TcpListener) -> std::io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let grace = settings.shutdown_grace;
    let max_connections = settings.max_connections;
    let header_read_timeout = settings.header_read_timeout;
    let state = AppState::new(settings).map_err(std::io::Error::other)?;
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(serve(listener, state.clone(), rx, grace, max_connections, header_read_timeout));
    Ok(ServerHandle { addr, state, shutdown: tx, task })
}

async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    max_connections: usize,
    header_read_timeout: Duration,
) {
    // At most `max_connections` connections are served at once; the next accept waits for a slot.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Small heads and bodies: one copy into one buffer and one write() beat a vectored write.
    builder.http1().timer(LazyTimer).header_read_timeout(header_read_timeout).writev(false).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // The cache writer runs until every connection has drained, then flushes its queue.
    let (writer_stop, writer_rx) = watch::channel(false);
    let writer = tokio::spawn(state.cache.clone().run_writer(writer_rx.clone()));
    let log_writer = tokio::spawn(state.logs.clone().run_writer(writer_rx));

    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let svc = service_fn(move |req| service::handle(st.clone(), req));
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    state.ready.store(false, Ordering::Relaxed);
    state.stopping.send_replace(true);
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period ended with requests still in flight");
    }
    let _ = writer_stop.send(true);
    let _ = writer.await;
    let _ = log_writer.await;
}

/// The timer behind hyper's HTTP/1 header-read timeout, made lazy. hyper arms that timeout before
/// parsing every request head and drops it as soon as the head parses, which for a head that is
/// already buffered (nearly always) is at once: registering a tokio timer each time cost about a
/// tenth of the proxy's throughput. A [`LazySleep`] registers its tokio timer only when first
/// polled, which hyper does only when it actually has to wait for the rest of a head.
#[derive(Clone, Copy, Debug)]
struct LazyTimer;

impl hyper::rt::Timer for LazyTimer {
    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(LazySleep { deadline, inner: None })
    }
}

/// A sleep that becomes a tokio timer on first poll.
struct LazySleep {
    deadline: std::time::Instant,
    inner: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl std::future::Future for LazySleep {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.get_mut();
        let deadline = this.deadline;
        this.inner.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into()))).as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for LazySleep {}
