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
    facts: super::EntryFacts,
    marker: Option<&'static [u8]>,
    saw_marker: bool,
    /// The last bytes relayed (fewer than the marker's length), so that a marker split across
    /// two reads is found.
    carry: Carry,
    done: bool,
}

/// Longest terminal event looked for.
const MAX_MARKER: usize = 32;

/// Up to `MAX_MARKER - 1` bytes kept from the end of the previous chunk.
#[derive(Default)]
struct Carry {
    buf: [u8; MAX_MARKER],
    len: usize,
}

impl Carry {
    /// Whether `marker` ends in `chunk`, wholly or after a start kept from earlier chunks; then
    /// keeps the end of `chunk` for the next call.
    fn find(&mut self, marker: &[u8], chunk: &[u8]) -> bool {
        if memchr::memmem::find(chunk, marker).is_some() {
            return true;
        }
        let keep = marker.len().saturating_sub(1).min(MAX_MARKER - 1);
        let head = &chunk[..chunk.len().min(keep)];
        let mut joined = [0u8; 2 * MAX_MARKER];
        joined[..self.len].copy_from_slice(&self.buf[..self.len]);
        joined[self.len..self.len + head.len()].copy_from_slice(head);
        if memchr::memmem::find(&joined[..self.len + head.len()], marker).is_some() {
            return true;
        }
        // The new tail: the last `keep` bytes of what was kept followed by the chunk.
        let total = self.len + chunk.len();
        let start = total.saturating_sub(keep);
        let mut tail = [0u8; MAX_MARKER];
        let mut n = 0;
        for i in start..total {
            tail[n] = if i < self.len { self.buf[i] } else { chunk[i - self.len] };
            n += 1;
        }
        self.buf = tail;
        self.len = n;
        false
    }
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
        facts: super::EntryFacts,
    ) -> Tee {
        let marker = marker.filter(|m| !m.is_empty() && m.len() <= MAX_MARKER);
        Tee {
            inner,
            flight,
            layer,
            ns,
            status,
            headers,
            ttl,
            facts,
            marker,
            saw_marker: false,
            carry: Carry::default(),
            done: false,
        }
    }

    fn on_end(&mut self) {
        self.done = true;
        let clean = self.marker.is_none() || self.saw_marker;
        let chunks = if clean { self.flight.take_chunks() } else { None };
        match chunks {
            Some(chunks) => {
                let now = self.layer.clock.now_ms();
                let expires_at_ms = now + u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX / 2);
                let headers = self.headers.as_ref().clone();
                let entry = Arc::new(CachedResponse::from_chunks(self.status, headers, &chunks, now, expires_at_ms));
                self.flight.finish(Some(entry.clone()));
                self.layer.enqueue(self.ns.clone(), entry, self.flight.clone(), self.facts.clone());
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
                        if !this.saw_marker && this.carry.find(m, data) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_split_anywhere_is_found() {
        let stream = b"data: {\"x\":1}\n\ndata: [DONE]\n\n";
        let marker = b"[DONE]";
        for cut1 in 0..stream.len() {
            for cut2 in cut1..stream.len() {
                let mut c = Carry::default();
                let parts = [&stream[..cut1], &stream[cut1..cut2], &stream[cut2..]];
                assert!(parts.iter().any(|p| c.find(marker, p)), "cuts {cut1} {cut2}");
            }
        }
        // One byte at a time.
        let mut c = Carry::default();
        assert!(stream.iter().any(|b| c.find(marker, std::slice::from_ref(b))));
        // Never found where it is not.
        let mut c = Carry::default();
        assert!(!b"data: [DON".chunks(3).any(|p| c.find(marker, p)));
        assert!(!c.find(marker, b"E ]"));
    }
}
