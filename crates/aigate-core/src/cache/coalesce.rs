//! Coalescing: identical cacheable requests that arrive while the first one (the leader) is still in
//! flight do not go upstream. They join the leader's [`Flight`] and receive its response as it is
//! relayed, from the first byte: the head, every chunk already relayed, then the rest live.
//!
//! A flight stays registered after its response completes, until the cache write has landed, so a
//! request arriving in between is served from the finished flight instead of missing. If the leader
//! fails before its response head (upstream error, non-2xx, client gone), its followers are told
//! and each goes upstream on its own. A follower waits for the head at most `coalesce_wait`.
//! Buffers are bounded by the gateway's `max_entry_size`: past it the flight stops retaining
//! chunks, leaves the registry (new requests lead their own flight) and only relays to the
//! followers it already has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aigate_store::{CacheKey, CachedResponse};
use bytes::Bytes;
use http::StatusCode;
use tokio::sync::mpsc;

/// Replayable response headers, shared between the flight, its followers and the entry.
pub type SharedHeaders = Arc<Vec<(String, Bytes)>>;

/// What a follower receives.
#[derive(Debug)]
pub enum FlightEvent {
    /// The response head.
    Head(StatusCode, SharedHeaders),
    /// A body chunk.
    Chunk(Bytes),
    /// The body ended cleanly.
    End,
    /// The leader failed; after a `Head`, the body is cut.
    Failed,
}

/// Receiving side for a follower.
pub type FlightReceiver = mpsc::UnboundedReceiver<FlightEvent>;

#[derive(Default)]
struct FlightState {
    head: Option<(StatusCode, SharedHeaders)>,
    chunks: Vec<Bytes>,
    bytes: usize,
    /// Still keeping chunks (for late followers and the cache entry).
    retaining: bool,
    finished: Option<Result<Arc<CachedResponse>, ()>>,
    followers: Vec<mpsc::UnboundedSender<FlightEvent>>,
}

/// One in-flight response that followers can join.
pub struct Flight {
    key: CacheKey,
    max_bytes: usize,
    state: Mutex<FlightState>,
}

/// How a request joins the registry.
pub enum Joined {
    /// First of its kind: go upstream and feed the flight.
    Leader(Arc<Flight>),
    /// Another request is in flight: wait for its events.
    Follower(FlightReceiver),
    /// The identical request just finished and is being written: serve this.
    Finished(Arc<CachedResponse>),
}

/// The registry of flights, keyed by cache key.
#[derive(Default)]
pub struct Inflight {
    map: Mutex<HashMap<CacheKey, Arc<Flight>>>,
}

impl Inflight {
    /// Joins or starts the flight for `key`.
    pub fn join(&self, key: CacheKey, max_bytes: usize) -> Joined {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(f) = map.get(&key) {
            let mut st = f.lock();
            match &st.finished {
                Some(Ok(entry)) => return Joined::Finished(entry.clone()),
                Some(Err(())) => {}
                None if st.retaining => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    if let Some((s, h)) = &st.head {
                        let _ = tx.send(FlightEvent::Head(*s, h.clone()));
                        for c in &st.chunks {
                            let _ = tx.send(FlightEvent::Chunk(c.clone()));
                        }
                    }
                    st.followers.push(tx);
                    return Joined::Follower(rx);
                }
                None => {}
            }
        }
        let flight = Flight::new(key, max_bytes);
        map.insert(key, flight.clone());
        Joined::Leader(flight)
    }

    /// Removes `flight` if it is still the registered one for its key.
    pub fn remove(&self, flight: &Arc<Flight>) {
        self.remove_by_key(&flight.key, flight);
    }

    /// Number of registered flights.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no flight is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Flight {
    /// A new flight that retains up to `max_bytes` of body.
    pub fn new(key: CacheKey, max_bytes: usize) -> Arc<Flight> {
        Arc::new(Flight { key, max_bytes, state: Mutex::new(FlightState { retaining: true, ..Default::default() }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlightState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// The cache key of this flight.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// Sets the response head and sends it to the followers.
    pub fn head(&self, status: StatusCode, headers: SharedHeaders) {
        let mut st = self.lock();
        st.followers.retain(|f| f.send(FlightEvent::Head(status, headers.clone())).is_ok());
        st.head = Some((status, headers));
    }

    /// Relays a chunk; returns false once the flight has stopped retaining (too large).
    pub fn chunk(&self, registry: &Inflight, chunk: &Bytes) -> bool {
        let mut st = self.lock();
        st.followers.retain(|f| f.send(FlightEvent::Chunk(chunk.clone())).is_ok());
        if !st.retaining {
            return false;
        }
        st.bytes += chunk.len();
        if st.bytes > self.max_bytes {
            st.retaining = false;
            st.chunks = Vec::new();
            drop(st);
            // Self-removal takes the registry lock; we no longer hold ours.
            registry.remove_by_key(&self.key, self);
            return false;
        }
        // Not a reference: the entry may live for hours, and a reference would keep the upstream
        // connection's whole read buffer alive with it (see `meter::detached`).
        st.chunks.push(crate::meter::detached(chunk));
        true
    }

    /// The chunks retained so far (for building the cache entry).
    pub fn take_chunks(&self) -> Option<Vec<Bytes>> {
        let st = self.lock();
        st.retaining.then(|| st.chunks.clone())
    }

    /// Ends the flight cleanly; `entry` is what late joiners get until the write lands.
    pub fn finish(&self, entry: Option<Arc<CachedResponse>>) {
        let mut st = self.lock();
        for f in st.followers.drain(..) {
            let _ = f.send(FlightEvent::End);
        }
        st.chunks = Vec::new();
        st.finished = Some(entry.ok_or(()));
    }

    /// Fails the flight: followers before the head go upstream, the others see a cut body.
    pub fn fail(&self) {
        let mut st = self.lock();
        if st.finished.is_some() {
            return;
        }
        for f in st.followers.drain(..) {
            let _ = f.send(FlightEvent::Failed);
        }
        st.chunks = Vec::new();
        st.finished = Some(Err(()));
    }
}

impl Inflight {
    fn remove_by_key(&self, key: &CacheKey, flight: &Flight) {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.get(key).is_some_and(|f| std::ptr::eq(Arc::as_ptr(f), flight)) {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> CacheKey {
        CacheKey([n; 32])
    }

    #[test]
    fn leader_followers_and_late_joiners() {
        let reg = Inflight::default();
        let Joined::Leader(f) = reg.join(k(1), 1000) else { panic!() };
        let Joined::Follower(mut early) = reg.join(k(1), 1000) else { panic!() };
        f.head(StatusCode::OK, Arc::new(vec![]));
        assert!(f.chunk(&reg, &Bytes::from_static(b"a")));
        let Joined::Follower(mut late) = reg.join(k(1), 1000) else { panic!() };
        assert!(f.chunk(&reg, &Bytes::from_static(b"b")));
        let entry = Arc::new(CachedResponse {
            status: 200,
            headers: vec![],
            chunks: f.take_chunks().unwrap(),
            created_at_ms: 0,
            expires_at_ms: 1,
        });
        f.finish(Some(entry));
        for rx in [&mut early, &mut late] {
            assert!(matches!(rx.try_recv(), Ok(FlightEvent::Head(..))));
            assert!(matches!(rx.try_recv(), Ok(FlightEvent::Chunk(c)) if c == "a"));
            assert!(matches!(rx.try_recv(), Ok(FlightEvent::Chunk(c)) if c == "b"));
            assert!(matches!(rx.try_recv(), Ok(FlightEvent::End)));
        }
        assert!(matches!(reg.join(k(1), 1000), Joined::Finished(_)));
        reg.remove(&f);
        assert!(reg.is_empty());
    }

    #[test]
    fn failure_and_overflow() {
        let reg = Inflight::default();
        let Joined::Leader(f) = reg.join(k(2), 3) else { panic!() };
        let Joined::Follower(mut rx) = reg.join(k(2), 3) else { panic!() };
        f.head(StatusCode::OK, Arc::new(vec![]));
        assert!(!f.chunk(&reg, &Bytes::from_static(b"toolong")));
        // Overflowed: unregistered, new requests lead their own flight; the follower still gets data.
        assert!(matches!(reg.join(k(2), 3), Joined::Leader(_)));
        assert!(f.take_chunks().is_none());
        f.fail();
        assert!(matches!(rx.try_recv(), Ok(FlightEvent::Head(..))));
        assert!(matches!(rx.try_recv(), Ok(FlightEvent::Chunk(_))));
        assert!(matches!(rx.try_recv(), Ok(FlightEvent::Failed)));
    }
}
