//! The response body type: either bytes aigate made (errors, health) or the upstream's body
//! relayed frame by frame as it arrives, with no buffering in between.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use aigate_store::CachedResponse;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::cache::coalesce::{FlightEvent, FlightReceiver};
use crate::cache::tee::Tee;
use crate::client::UpstreamBody;

/// Boxed error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body. An enum rather than a boxed trait object: no allocation per response.
pub enum GatewayBody {
    /// A complete body (taken on first poll).
    Full(Option<Bytes>),
    /// The upstream's body, relayed as it arrives.
    Upstream(UpstreamBody),
    /// The upstream's body, relayed as it arrives and teed into the cache.
    Tee(Box<Tee>),
    /// A cache hit: the stored chunks replayed in order, one frame each.
    Replay {
        /// The entry.
        entry: Arc<CachedResponse>,
        /// Next chunk to send.
        next: usize,
        /// Announce the length (`content-length`); off for event streams, which are replayed
        /// chunk by chunk as the original was.
        sized: bool,
    },
    /// A coalesced request: the leader's body as it is relayed.
    Follower(FlightReceiver),
    /// Chunks produced by a task (the admin live tail), until the sender is dropped.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
}

impl GatewayBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        GatewayBody::Full(Some(b.into()))
    }
    /// An empty body.
    pub fn empty() -> Self {
        GatewayBody::Full(None)
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            GatewayBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            GatewayBody::Upstream(inc) => Pin::new(inc).poll_frame(cx).map_err(Into::into),
            GatewayBody::Tee(t) => Pin::new(t.as_mut()).poll_frame(cx),
            GatewayBody::Replay { entry, next, .. } => {
                let chunk = entry.chunks.get(*next).cloned();
                *next += 1;
                Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
            }
            GatewayBody::Follower(rx) => match rx.poll_recv(cx) {
                Poll::Ready(Some(FlightEvent::Chunk(c))) => Poll::Ready(Some(Ok(Frame::data(c)))),
                Poll::Ready(Some(FlightEvent::End)) => Poll::Ready(None),
                Poll::Ready(Some(FlightEvent::Head(..))) => Poll::Ready(Some(Err("unexpected head".into()))),
                Poll::Ready(Some(FlightEvent::Failed) | None) => {
                    Poll::Ready(Some(Err("the coalesced upstream response failed".into())))
                }
                Poll::Pending => Poll::Pending,
            },
            GatewayBody::Channel(rx) => rx.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(b) => b.is_none(),
            GatewayBody::Upstream(inc) => inc.is_end_stream(),
            GatewayBody::Tee(t) => t.is_end_stream(),
            GatewayBody::Replay { entry, next, .. } => *next >= entry.chunks.len(),
            GatewayBody::Follower(_) | GatewayBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            GatewayBody::Upstream(inc) => inc.size_hint(),
            GatewayBody::Tee(t) => t.size_hint(),
            GatewayBody::Replay { entry, next, sized: true } => {
                SizeHint::with_exact(entry.chunks.iter().skip(*next).map(|c| c.len() as u64).sum())
            }
            GatewayBody::Replay { .. } => SizeHint::default(),
            GatewayBody::Follower(_) | GatewayBody::Channel(_) => SizeHint::default(),
        }
    }
}
