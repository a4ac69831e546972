//! The pooled HTTP client that carries requests to providers: keep-alive HTTP/1.1, one shared
//! HTTP/2 connection per origin where TLS negotiates h2, rustls (ring) for HTTPS.
//!
//! Used by the upstream phase ([`crate::phases::upstream`]) and by budget alert webhooks.
//! Failure behaviour: a request that could not be sent comes back as a [`ClientError`] (the
//! caller maps it to 502); dropping the returned future or body closes the connection, which
//! cancels the upstream request.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use crate::config::UpstreamSettings;

/// The pooled upstream client (cheap to clone: one pool).
///
/// Why not hyper-util's `legacy::Client`: per request it clones itself, hashes the pool key with
/// SipHash twice, formats the `Host` header, races the pool checkout against a lazily built
/// connect future and spawns a task to return the connection, work a proxy of small requests pays
/// on every request. This pool keeps what the proxy needs: one
/// list of idle HTTP/1.1 connections per upstream origin (most recently used first), one shared
/// HTTP/2 connection per origin where TLS negotiates h2, the connection returned when the
/// response body ends, and one retry on a fresh connection when a reused one was closed before
/// the request went out (the keep-alive race). Connections come from hyper-util's connector
/// (TCP_NODELAY, connect timeout) wrapped in hyper-rustls; the HTTP work is hyper's own.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    connector: HttpsConnector<HttpConnector>,
    origins: Mutex<Vec<Origin>>,
    /// When idle connections past `idle_timeout` were last closed.
    swept: Mutex<Instant>,
    idle_timeout: Duration,
    max_idle: usize,
    /// Most connections open to one origin; more requests wait for one (within their timeout).
    max_per_origin: usize,
}

/// Most upstream origins the pool keeps. An origin can come from the client (Azure's resource
/// name is part of the host), so the pool is bounded: when full, origins without connections are
/// forgotten, and if none is, connections to a new origin are used once and closed.
const MAX_ORIGINS: usize = 1024;

/// Makes room for one more origin; false when every origin still has connections.
fn room_for_origin(origins: &mut Vec<Origin>, max_per_origin: usize) -> bool {
    if origins.len() >= MAX_ORIGINS {
        origins.retain(|o| {
            o.h2.as_ref().is_some_and(|h2| !h2.is_closed())
                || o.idle.iter().any(|(tx, _)| !tx.is_closed())
                || o.has_open_connections(max_per_origin)
        });
    }
    origins.len() < MAX_ORIGINS
}

/// The connections of one upstream origin (scheme and authority).
struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// `Host` of HTTP/1.1 requests (built once).
    host: HeaderValue,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<(http1::SendRequest<Full<Bytes>>, Instant)>,
    /// The HTTP/2 connection, shared by all requests.
    h2: Option<http2::SendRequest<Full<Bytes>>>,
    /// Room for connections to the origin, and word of one coming back to the pool.
    slots: Arc<Slots>,
}

/// The bound on an origin's connections: each open connection holds one permit of `room` for its
/// whole life (its task drops it when it closes); `returned` wakes a request waiting for a
/// connection when one goes back to the pool.
struct Slots {
    room: Arc<tokio::sync::Semaphore>,
    returned: tokio::sync::Notify,
}

/// What a request that found no idle connection gets: one that came back meanwhile, or room
/// for a new one (`None`: no bound, the pool is full of origins).
enum Slot {
    Idle(Conn, HeaderValue),
    New(Option<tokio::sync::OwnedSemaphorePermit>),
}

impl Origin {
    fn new(scheme: Scheme, authority: Authority, host: HeaderValue, max_connections: usize) -> Origin {
        let room = Arc::new(tokio::sync::Semaphore::new(max_connections));
        let slots = Arc::new(Slots { room, returned: tokio::sync::Notify::new() });
        Origin { scheme, authority, host, idle: Vec::new(), h2: None, slots }
    }

    /// Whether connections of the origin are open (in use: idle ones are in `idle`). Such an
    /// origin is kept, so that its bound still counts them.
    fn has_open_connections(&self, max_connections: usize) -> bool {
        self.slots.room.available_permits() < max_connections
    }
}

enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// Why an upstream request failed.
#[derive(Debug)]
pub enum ClientError {
    /// No connection could be made (DNS, TCP, TLS, HTTP/2 handshake).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed before the response head arrived.
    Send(hyper::Error),
    /// The request URI has no scheme or host.
    BadUri,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connect: {}", ErrorChain(e.as_ref())),
            ClientError::Send(e) => write!(f, "{}", ErrorChain(e)),
            ClientError::BadUri => f.write_str("the upstream URI has no scheme or host"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Builds the upstream client: pooled, keep-alive, TCP_NODELAY, rustls (ring) with the webpki roots.
pub fn build_client(s: &UpstreamSettings) -> Result<HttpClient, rustls::Error> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?;
    Ok(client_over(s, https))
}

/// [`build_client`] trusting the certificate authorities in `roots` instead of the webpki roots.
pub fn build_client_with_roots(
    s: &UpstreamSettings,
    roots: rustls::RootCertStore,
) -> Result<HttpClient, rustls::Error> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(client_over(s, hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls)))
}

fn client_over(
    s: &UpstreamSettings,
    tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(s.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // ALPN offers h2 and http/1.1; plain-HTTP upstreams get HTTP/1.1.
    let https = tls.https_or_http().enable_http1().enable_http2().wrap_connector(http);
    HttpClient {
        inner: Arc::new(ClientInner {
            connector: https,
            origins: Mutex::new(Vec::new()),
            swept: Mutex::new(Instant::now()),
            idle_timeout: s.pool_idle_timeout,
            max_idle: s.pool_max_idle_per_host,
            max_per_origin: s.max_connections_per_host,
        }),
    }
}

impl HttpClient {
    /// Sends `req` (absolute URI) and resolves with the response head; the body streams after.
    pub async fn request(&self, mut req: Request<Full<Bytes>>) -> Result<Response<UpstreamBody>, ClientError> {
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
            return Err(ClientError::BadUri);
        };
        let mut fresh_only = false;
        loop {
            let (conn, host, reused) = match (!fresh_only).then(|| self.checkout(&scheme, &authority)).flatten() {
                Some((conn, host)) => (conn, host, true),
                None => match self.slot(&scheme, &authority, fresh_only).await? {
                    Slot::Idle(conn, host) => (conn, host, true),
                    Slot::New(permit) => {
                        // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is a large future that
                        // runs once per connection; inline, every request's future would carry room
                        // for it.
                        let (conn, host) = Box::pin(self.connect(&uri, &scheme, &authority, permit)).await?;
                        (conn, host, false)
                    }
                },
            };
            match conn {
                Conn::H1(mut tx) => {
                    match tx.ready().await {
                        Ok(()) => {}
                        // Closed while idle: the next one.
                        Err(_) if reused => continue,
                        Err(e) => return Err(ClientError::Send(e)),
                    }
                    req.headers_mut().entry(http::header::HOST).or_insert_with(|| host.clone());
                    let pq = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
                    *req.uri_mut() = Uri::from(pq);
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            let ret = Return { client: self.inner.clone(), scheme, authority, host, tx };
                            return Ok(resp.map(|b| UpstreamBody::new(b, Some(ret))));
                        }
                        Err(mut e) => match e.take_message() {
                            // Not sent on a reused connection (closed by the server meanwhile):
                            // once more on a new one.
                            Some(mut back) if reused && !fresh_only => {
                                *back.uri_mut() = uri.clone();
                                req = back;
                                fresh_only = true;
                            }
                            _ => return Err(ClientError::Send(e.into_error())),
                        },
                    }
                }
                Conn::H2(mut tx) => {
                    match tx.ready().await {
                        Ok(()) => {}
                        Err(_) if reused => {
                            self.drop_h2(&scheme, &authority);
                            continue;
                        }
                        Err(e) => return Err(ClientError::Send(e)),
                    }
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(|b| UpstreamBody::new(b, None))),
                        Err(mut e) => match e.take_message() {
                            Some(back) if reused && !fresh_only => {
                                self.drop_h2(&scheme, &authority);
                                req = back;
                                fresh_only = true;
                            }
                            _ => return Err(ClientError::Send(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// An open pooled connection to the origin, if any (expired and closed ones are dropped).
    fn checkout(&self, scheme: &Scheme, authority: &Authority) -> Option<(Conn, HeaderValue)> {
        let mut origins = self.inner.origins.lock().unwrap_or_else(PoisonError::into_inner);
        let i = origins.iter().position(|o| o.authority == *authority && o.scheme == *scheme)?;
        let o = &mut origins[i];
        if let Some(h2) = o.h2.as_ref().filter(|h2| !h2.is_closed()) {
            return Some((Conn::H2(h2.clone()), o.host.clone()));
        }
        o.h2 = None;
        // The list is in the order connections came back: the expired ones are at its front.
        if let Some(expired) = Instant::now().checked_sub(self.inner.idle_timeout) {
            let n = o.idle.iter().take_while(|(_, since)| *since <= expired).count();
            o.idle.drain(..n);
        }
        while let Some((tx, _)) = o.idle.pop() {
            if !tx.is_closed() {
                return Some((Conn::H1(tx), o.host.clone()));
            }
        }
        None
    }

    /// Waits until a new connection to the origin may open, or one comes back to the pool (not
    /// for `fresh_only`, a retry that needs a new connection).
    async fn slot(&self, scheme: &Scheme, authority: &Authority, fresh_only: bool) -> Result<Slot, ClientError> {
        let host = host_header(scheme, authority)?;
        let Some(slots) = self.with_origin(scheme, authority, &host, |o| o.slots.clone()) else {
            return Ok(Slot::New(None));
        };
        loop {
            // Registered before looking, so a connection coming back in between is not missed.
            let returned = slots.returned.notified();
            let mut returned = std::pin::pin!(returned);
            returned.as_mut().enable();
            if !fresh_only {
                if let Some((conn, host)) = self.checkout(scheme, authority) {
                    return Ok(Slot::Idle(conn, host));
                }
            }
            if let Ok(permit) = slots.room.clone().try_acquire_owned() {
                return Ok(Slot::New(Some(permit)));
            }
            tokio::select! {
                permit = slots.room.clone().acquire_owned() => return Ok(Slot::New(permit.ok())),
                () = returned, if !fresh_only => {}
            }
        }
    }

    fn drop_h2(&self, scheme: &Scheme, authority: &Authority) {
        let mut origins = self.inner.origins.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = origins.iter_mut().find(|o| o.authority == *authority && o.scheme == *scheme) {
            o.h2 = None;
        }
    }

    /// A new connection (HTTP/2 when TLS negotiated it), its task spawned.
    async fn connect(
        &self,
        uri: &Uri,
        scheme: &Scheme,
        authority: &Authority,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(Conn, HeaderValue), ClientError> {
        let io = self.inner.connector.clone().call(uri.clone()).await.map_err(ClientError::Connect)?;
        let host = host_header(scheme, authority)?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| ClientError::Connect(Box::new(e)))?;
            spawn_connection(conn, "HTTP/2", permit);
            self.with_origin(scheme, authority, &host, |o| o.h2 = Some(tx.clone()));
            return Ok((Conn::H2(tx), host));
        }
        let (tx, conn) = http1::Builder::new()
            // LLM requests and answers are mostly small: one copy into one buffer and one write()
            // beats a vectored write of the head and body.
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| ClientError::Connect(Box::new(e)))?;
        spawn_connection(conn, "HTTP/1.1", permit);
        Ok((Conn::H1(tx), host))
    }

    /// `f` over the origin's entry, made if missing; `None` when the pool has no room for it.
    fn with_origin<T>(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        host: &HeaderValue,
        f: impl FnOnce(&mut Origin) -> T,
    ) -> Option<T> {
        let mut origins = self.inner.origins.lock().unwrap_or_else(PoisonError::into_inner);
        let i = match origins.iter().position(|o| o.authority == *authority && o.scheme == *scheme) {
            Some(i) => i,
            None if !room_for_origin(&mut origins, self.inner.max_per_origin) => return None,
            None => {
                origins.push(Origin::new(scheme.clone(), authority.clone(), host.clone(), self.inner.max_per_origin));
                origins.len() - 1
            }
        };
        Some(f(&mut origins[i]))
    }
}

/// Drives an upstream connection on its own task until it closes (hyper's design: the
/// connection reads and writes, the `SendRequest` hands it requests).
fn spawn_connection(
    conn: impl std::future::Future<Output = hyper::Result<()>> + Send + 'static,
    protocol: &'static str,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        // The connection's room under the origin's bound, given back when it closes.
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(protocol, error = %ErrorChain(&e), "upstream connection ended");
        }
    });
}

/// `Host` for an origin: the host, and the port unless it is the scheme's default.
fn host_header(scheme: &Scheme, authority: &Authority) -> Result<HeaderValue, ClientError> {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let value = match authority.port_u16() {
        Some(p) if p != default_port => format!("{}:{p}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::from_str(&value).map_err(|_| ClientError::BadUri)
}

/// An HTTP/1.1 connection to give back to the pool when its response body has ended.
struct Return {
    client: Arc<ClientInner>,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    tx: http1::SendRequest<Full<Bytes>>,
}

impl Return {
    fn give_back(self) {
        if self.tx.is_closed() {
            return;
        }
        let Return { client, scheme, authority, host, tx } = self;
        let now = Instant::now();
        let mut origins = client.origins.lock().unwrap_or_else(PoisonError::into_inner);
        // Idle connections past the idle timeout are closed here, at most once a second, for every
        // origin (checkout drops those of its own origin too).
        if let Ok(mut swept) = client.swept.try_lock() {
            if now.duration_since(*swept) >= Duration::from_secs(1) {
                *swept = now;
                let expired = now.checked_sub(client.idle_timeout);
                origins.retain_mut(|o| {
                    o.idle.retain(|(tx, since)| !tx.is_closed() && expired.is_none_or(|e| *since > e));
                    if o.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
                        o.h2 = None;
                    }
                    o.h2.is_some() || !o.idle.is_empty() || o.has_open_connections(client.max_per_origin)
                });
            }
        }
        let o = match origins.iter_mut().position(|o| o.authority == authority && o.scheme == scheme) {
            Some(i) => &mut origins[i],
            None if !room_for_origin(&mut origins, client.max_per_origin) => return,
            None => {
                origins.push(Origin::new(scheme, authority, host, client.max_per_origin));
                let last = origins.len() - 1;
                &mut origins[last]
            }
        };
        if o.idle.len() < client.max_idle {
            o.idle.push((tx, now));
            o.slots.returned.notify_one();
        }
    }
}

/// An upstream response body: hyper's, relayed as is; at its end the connection goes back to
/// the pool. Dropped before its end, the connection is closed (which cancels the upstream
/// request).
pub struct UpstreamBody {
    inner: Incoming,
    ret: Option<Return>,
    /// Turns the provider's format into OpenAI's as the bytes arrive (a translated request).
    translate: Option<Box<crate::translate::ResponseTranslator>>,
}

impl UpstreamBody {
    fn new(inner: Incoming, ret: Option<Return>) -> UpstreamBody {
        let mut b = UpstreamBody { inner, ret, translate: None };
        b.check_end();
        b
    }

    /// The body as `t` translates it.
    pub fn translated(mut self, t: crate::translate::ResponseTranslator) -> UpstreamBody {
        self.translate = Some(Box::new(t));
        self
    }

    fn check_end(&mut self) {
        if self.inner.is_end_stream() {
            if let Some(r) = self.ret.take() {
                r.give_back();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
            match &frame {
                None => {
                    if let Some(r) = this.ret.take() {
                        r.give_back();
                    }
                }
                Some(Ok(_)) => this.check_end(),
                // A failed body: the connection is not reused.
                Some(Err(_)) => this.ret = None,
            }
            let Some(t) = this.translate.as_mut() else {
                return Poll::Ready(frame);
            };
            match frame {
                // Trailers of a translated answer are dropped.
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        let out = t.data(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                }
                None => {
                    let out = t.end();
                    this.translate = None;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.translate.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.translate.is_some() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// Displays an error with its sources, without URLs (the hyper-util error does not include them).
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}
