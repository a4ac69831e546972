//! The listener: accepts connections (HTTP/1.1 and h2c), serves each with [`service::handle`], and
//! shuts down gracefully: stop accepting, mark not ready, let in-flight requests and streams finish
//! up to the grace period, then return.
//!
//! Bounds: at most `max_connections` connections at once (the next accept waits for a slot); a
//! connection with no request in progress is closed `header_read_timeout` after it opened or last
//! went idle, whatever the protocol, so silent sockets cannot hold the slots.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::meter::ResponseBody;
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
    let listener = bind(settings.listen, settings.listen_backlog)?;
    start_on(settings, listener)
}

/// A listener on `addr` whose queue of connections not yet accepted holds `backlog` (the
/// kernel caps it at `net.core.somaxconn`): a burst of thousands of new connections waits there
/// instead of being dropped and retried by the clients a second later.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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
    idle_timeout: Duration,
) {
    // At most `max_connections` connections are served at once; the next accept waits for a slot.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Small heads and bodies: one copy into one buffer and one write() beat a vectored write. The
    // head timeout is the connection's own idle timeout ([`Connection::idle`]), for every protocol.
    builder.http1().writev(false).keep_alive(true).header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // Each connection task holds a receiver: shutdown waits until all of them are gone.
    let (drain_tx, drain_rx) = watch::channel(false);
    // The cache writer runs until every connection has drained, then flushes its queue.
    let (writer_stop, writer_rx) = watch::channel(false);
    let writer = tokio::spawn(state.cache.clone().run_writer(writer_rx.clone()));
    let log_writer = tokio::spawn(state.logs.clone().run_writer(writer_rx));
    // The exporter stops after the log writer, which hands it the last records' spans.
    let (exporter_stop, exporter_rx) = watch::channel(false);
    let exporter = state.telemetry.clone().map(|t| tokio::spawn(t.run_exporter(exporter_rx)));

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
                let conn = Connection { state: state.clone(), activity: Arc::new(Activity::new()), idle_timeout };
                tokio::spawn(conn.serve(stream, builder.clone(), drain_rx.clone(), permit));
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(drain_rx);
    state.ready.store(false, Ordering::Relaxed);
    state.stopping.send_replace(true);
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down: draining in-flight requests");
    let _ = drain_tx.send(true);
    if tokio::time::timeout(grace, drain_tx.closed()).await.is_err() {
        tracing::warn!("grace period ended with requests still in flight");
    }
    let _ = writer_stop.send(true);
    let _ = writer.await;
    let _ = log_writer.await;
    let _ = exporter_stop.send(true);
    if let Some(exporter) = exporter {
        let _ = exporter.await;
    }
}

/// One client connection.
struct Connection {
    state: Arc<AppState>,
    activity: Arc<Activity>,
    idle_timeout: Duration,
}

/// How long an idle connection being closed may take to say goodbye (an HTTP/2 GOAWAY) before it
/// is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl Connection {
    /// Serves the connection until it ends, goes idle past the timeout, or shutdown drains it.
    async fn serve(
        self,
        stream: tokio::net::TcpStream,
        builder: Arc<auto::Builder<TokioExecutor>>,
        mut drain: watch::Receiver<bool>,
        _slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Connection { state, activity, idle_timeout } = self;
        let tracked = activity.clone();
        let svc = service_fn(move |req| {
            let busy = tracked.begin();
            let st = state.clone();
            async move {
                // Boxed: hyper keeps room for one request's future in every connection for the
                // connection's whole life, and this future is several KB; boxed, an idle connection
                // holds a pointer and the room is taken only while a request runs.
                let resp = Box::pin(service::handle(st, req)).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked { body, _busy: busy }))
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = activity.idle(idle_timeout) => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
            }
            _ = drain.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// What a connection is doing: requests in progress, and since when it has had none. Every
/// connection must send a complete request head within the idle timeout of opening and of going
/// idle, whatever the protocol (HTTP/1.1 or HTTP/2, and while the protocol is still being told).
#[derive(Debug)]
struct Activity {
    /// Requests from their head to the end of their response body.
    busy: AtomicUsize,
    /// When the connection last went idle, ns after `opened`.
    idle_since_ns: AtomicU64,
    opened: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity { busy: AtomicUsize::new(0), idle_since_ns: AtomicU64::new(0), opened: Instant::now() }
    }

    /// A request's head has arrived; it is in progress until the guard is dropped.
    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_nanos(self.idle_since_ns.load(Ordering::Relaxed))
    }

    /// Resolves once the connection has been idle for `timeout`. The timer is armed once per
    /// period, not per request.
    async fn idle(&self, timeout: Duration) {
        loop {
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            let deadline = if busy { Instant::now() + timeout } else { self.idle_since() + timeout };
            tokio::time::sleep_until(deadline.into()).await;
            if self.busy.load(Ordering::Relaxed) == 0 && self.idle_since() + timeout <= Instant::now() {
                return;
            }
        }
    }
}

/// A request in progress on a connection.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        let ns = u64::try_from(a.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.idle_since_ns.store(ns, Ordering::Relaxed);
        a.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in progress until it ends.
    struct Tracked {
        #[pin]
        body: ResponseBody,
        _busy: Busy,
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = <ResponseBody as http_body::Body>::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
