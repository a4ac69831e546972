//! The tee: relays the upstream's body to the client frame by frame, exactly as without a cache,
//! while handing each chunk to the request's flight (followers, and the entry being built). When
//! the body ends cleanly (for a stream: after its terminal event) the entry is queued for writing;
//! an error, a missing terminal event or a client that leaves first means nothing is stored.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aigate_store::CachedResponse;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::coalesce::Flight;
use super::CacheLayer;
use crate::body::BoxError;
use crate::client::UpstreamBody;

/// Body wrapper that feeds a flight while relaying.
pub struct Tee {
    inner: UpstreamBody,
    flight: Arc<Flight>,
    layer: Arc<CacheLayer>,
    ns: Arc<str>,
    status: u16,
    headers: Arc<Vec<(String, Bytes)>>,
    ttl: Duration,
    marker: Option<&'static [u8]>,
    saw_marker: bool,
    done: bool,
}

impl Tee {
    /// Wraps `inner`; `flight` has its head set already.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: UpstreamBody,
        flight: Arc<Flight>,
        layer: Arc<CacheLayer>,
        ns: Arc<str>,
        status: u16,
        headers: Arc<Vec<(String, Bytes)>>,
        ttl: Duration,
        marker: Option<&'static [u8]>,
    ) -> Tee {
        Tee { inner, flight, layer, ns, status, headers, ttl, marker, saw_marker: false, done: false }
    }

    fn on_end(&mut self) {
        self.done = true;
        let clean = self.marker.is_none() || self.saw_marker;
        let chunks = if clean { self.flight.take_chunks() } else { None };
        match chunks {
            Some(chunks) => {
                let now = self.layer.clock.now_ms();
                let entry = Arc::new(CachedResponse {
                    status: self.status,
                    headers: self.headers.as_ref().clone(),
                    chunks,
                    created_at_ms: now,
                    expires_at_ms: now + u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX / 2),
                });
                self.flight.finish(Some(entry.clone()));
                self.layer.enqueue(self.ns.clone(), entry, self.flight.clone());
            }
            None => {
                self.flight.finish(None);
                self.layer.inflight.remove(&self.flight);
            }
        }
    }

    fn on_error(&mut self) {
        self.done = true;
        self.flight.fail();
        self.layer.inflight.remove(&self.flight);
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // The client left (or hyper gave up) before the end: nothing is stored.
        if !self.done {
            self.on_error();
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(m) = this.marker {
                        if !this.saw_marker && memchr::memmem::find(data, m).is_some() {
                            this.saw_marker = true;
                        }
                    }
                    this.flight.chunk(&this.layer.inflight, data);
                }
                // With a known length hyper stops polling after the last byte, so the end is
                // observed here rather than through a final `None`.
                if !this.done && this.inner.is_end_stream() {
                    this.on_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.on_error();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if !this.done {
                    this.on_end();
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
