//! Purges that reach every replica's memory tier at once, through Redis pub/sub.
//!
//! With the cache on Redis each replica keeps a memory tier in front of it ([`crate::TieredCache`]).
//! Purging Redis alone would leave the other replicas serving their copies until the memory tier's
//! TTL cap ([`crate::REDIS_MEMORY_TTL_CAP`]). So a replica that purges also announces it:
//!
//! 1. it purges its own memory tier and Redis (what [`crate::TieredCache::purge`] always does);
//! 2. it `PUBLISH`es `{id}\n{key hex, comma-separated keys of a filtered purge, or *}\n{namespace}`
//!    on [`PURGE_CHANNEL`]; Redis answers with
//!    the number of subscribers that received it (every running replica, this one included);
//! 3. each replica's subscriber purges its memory tier, then acknowledges by incrementing
//!    `aigate:cache:purge-ack:{id}` (which expires after a minute);
//! 4. the announcing replica waits until the acknowledgements reach the subscriber count, at most
//!    [`PURGE_ACK_WAIT`]. When the purge call returns, no replica serves the old entries.
//!
//! Bounds: one subscriber connection per process; one small message and one counter per purge.
//! A read that fetched an entry from Redis just before the purge and stores it in its memory tier
//! just after the acknowledgement can keep it there for up to the TTL cap: the cap stays the
//! backstop.
//!
//! Failure behaviour: a replica whose subscriber is disconnected misses announcements, so on every
//! (re)subscription it empties its whole memory tier; it reconnects every
//! [`RESUBSCRIBE_INTERVAL`]. An announcement that cannot be published, or whose acknowledgements
//! do not all arrive in time, is logged and the purge still succeeds (Redis itself is purged; the
//! TTL cap bounds what other replicas may serve). Nothing panics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use crate::{CacheKey, MemoryCacheStore, RedisCacheStore, StoreError};

/// The pub/sub channel of purge announcements.
pub const PURGE_CHANNEL: &str = "aigate:cache:purge";

/// How long an announcing replica waits for every replica's acknowledgement.
pub const PURGE_ACK_WAIT: Duration = Duration::from_secs(1);

/// Delay before subscribing again after the subscription failed or ended.
pub const RESUBSCRIBE_INTERVAL: Duration = Duration::from_millis(500);

/// How often the announcing replica reads the acknowledgement counter.
const ACK_POLL: Duration = Duration::from_millis(5);

/// How long an acknowledgement counter lives in Redis.
const ACK_TTL_MS: u64 = 60_000;

/// Increments an acknowledgement counter and (re)sets its expiry, atomically.
const ACK_SCRIPT: &str = "local n = redis.call('INCR', KEYS[1]) redis.call('PEXPIRE', KEYS[1], ARGV[1]) return n";

/// The Redis key counting the acknowledgements of announcement `id`.
fn ack_key(id: &str) -> String {
    format!("aigate:cache:purge-ack:{id}")
}

/// An announcement's message: the keys comma-separated, or `*` for the whole namespace.
fn encode(id: &str, ns: &str, keys: Option<&[CacheKey]>) -> String {
    let keys = match keys {
        None => "*".to_owned(),
        Some(keys) => keys.iter().map(CacheKey::to_hex).collect::<Vec<_>>().join(","),
    };
    format!("{id}\n{keys}\n{ns}")
}

/// Parses [`encode`]'s output: (id, keys or all, namespace).
fn decode(msg: &[u8]) -> Option<(String, Option<Vec<CacheKey>>, String)> {
    let text = std::str::from_utf8(msg).ok()?;
    let mut parts = text.splitn(3, '\n');
    let (id, keys, ns) = (parts.next()?, parts.next()?, parts.next()?);
    let keys = if keys == "*" { None } else { Some(keys.split(',').map(CacheKey::from_hex).collect::<Option<_>>()?) };
    Some((id.to_owned(), keys, ns.to_owned()))
}

/// Keys per announcement of a filtered purge (about 65 KB of message).
const KEYS_PER_ANNOUNCEMENT: usize = 1000;

/// A replica's end of the purge announcements: it announces its own purges and, in a background
/// task, applies the others' to its memory tier. Dropping it stops the task.
pub struct PurgeBus {
    redis: RedisCacheStore,
    task: tokio::task::AbortHandle,
    /// Whether the subscriber is subscribed now.
    subscribed: Arc<AtomicBool>,
}

impl std::fmt::Debug for PurgeBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PurgeBus").field("redis", &self.redis).finish()
    }
}

impl Drop for PurgeBus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PurgeBus {
    /// Subscribes (in a task on the current Tokio runtime) on behalf of `memory`, the memory tier in
    /// front of `redis`. `None` outside a runtime (a command that does not serve).
    pub fn start(redis: RedisCacheStore, memory: MemoryCacheStore) -> Option<Arc<PurgeBus>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let subscribed = Arc::new(AtomicBool::new(false));
        let task = runtime.spawn(subscribe_forever(redis.clone(), memory, subscribed.clone())).abort_handle();
        Some(Arc::new(PurgeBus { redis, task, subscribed }))
    }

    /// Whether this replica receives announcements now (its memory tier was emptied when it
    /// subscribed, so it holds nothing purged elsewhere).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Tells every replica to purge `key` (or all of `ns`) from its memory tier and waits until
    /// they have (at most [`PURGE_ACK_WAIT`]); returns how many acknowledged.
    pub async fn announce(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        self.announce_message(ns, key.map(std::slice::from_ref)).await
    }

    /// Tells every replica to purge `keys` of `ns` from its memory tier (a filtered purge), in
    /// announcements of at most [`KEYS_PER_ANNOUNCEMENT`] keys; returns the fewest acknowledgements.
    pub async fn announce_keys(&self, ns: &str, keys: &[CacheKey]) -> Result<u64, StoreError> {
        let mut acked = u64::MAX;
        for chunk in keys.chunks(KEYS_PER_ANNOUNCEMENT) {
            acked = acked.min(self.announce_message(ns, Some(chunk)).await?);
        }
        Ok(if acked == u64::MAX { 0 } else { acked })
    }

    async fn announce_message(&self, ns: &str, keys: Option<&[CacheKey]>) -> Result<u64, StoreError> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let receivers: u64 =
            self.redis.query(redis::cmd("PUBLISH").arg(PURGE_CHANNEL).arg(encode(&id, ns, keys))).await?;
        let deadline = Instant::now() + PURGE_ACK_WAIT;
        loop {
            let acked: Option<u64> = self.redis.query(redis::cmd("GET").arg(ack_key(&id))).await?;
            let acked = acked.unwrap_or(0);
            if acked >= receivers {
                return Ok(acked);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    gateway = ns,
                    acked,
                    receivers,
                    "cache purge: not every replica acknowledged in time; the others serve their copies at most {:?}",
                    crate::REDIS_MEMORY_TTL_CAP
                );
                return Ok(acked);
            }
            tokio::time::sleep(ACK_POLL).await;
        }
    }
}

/// Subscribes to [`PURGE_CHANNEL`] and applies announcements to `memory`, again and again.
async fn subscribe_forever(redis: RedisCacheStore, memory: MemoryCacheStore, subscribed: Arc<AtomicBool>) {
    let mut failing = false;
    loop {
        match subscribe(&redis).await {
            Ok(pubsub) => {
                if failing {
                    tracing::info!("cache purge announcements: subscribed again");
                }
                failing = false;
                // Announcements made while unsubscribed are lost: forget everything held.
                memory.purge_all_sync();
                subscribed.store(true, Ordering::Release);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some((id, keys, ns)) = decode(msg.get_payload_bytes()) else {
                        tracing::debug!("cache purge announcements: malformed message ignored");
                        continue;
                    };
                    match keys {
                        None => {
                            memory.purge_sync(&ns, None);
                        }
                        Some(keys) => {
                            for k in &keys {
                                memory.purge_sync(&ns, Some(k));
                            }
                        }
                    }
                    let ack = redis::cmd("EVAL").arg(ACK_SCRIPT).arg(1).arg(ack_key(&id)).arg(ACK_TTL_MS).clone();
                    if let Err(e) = redis.query::<u64>(&ack).await {
                        tracing::debug!(error = %e, "cache purge announcements: acknowledgement failed");
                    }
                }
                subscribed.store(false, Ordering::Release);
                tracing::warn!("cache purge announcements: subscription ended; subscribing again");
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cache purge announcements: cannot subscribe; retrying in the background");
            }
            Err(e) => tracing::debug!(error = %e, "cache purge announcements: still cannot subscribe"),
        }
        tokio::time::sleep(RESUBSCRIBE_INTERVAL).await;
    }
}

/// A pub/sub connection subscribed to [`PURGE_CHANNEL`], within the connection timeout.
async fn subscribe(redis: &RedisCacheStore) -> Result<redis::aio::PubSub, StoreError> {
    tokio::time::timeout(crate::cache::redis::CONNECT_TIMEOUT, async {
        let mut pubsub = redis.client().get_async_pubsub().await?;
        pubsub.subscribe(PURGE_CHANNEL).await?;
        Ok::<_, redis::RedisError>(pubsub)
    })
    .await
    .map_err(|_| StoreError::Timeout)?
    .map_err(|e| StoreError::Unavailable(format!("redis: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_roundtrip() {
        let k = CacheKey([9u8; 32]);
        assert_eq!(
            decode(encode("a1", "prod", Some(&[k])).as_bytes()),
            Some(("a1".into(), Some(vec![k]), "prod".into()))
        );
        let two = [k, CacheKey([1u8; 32])];
        assert_eq!(
            decode(encode("a5", "p", Some(&two)).as_bytes()),
            Some(("a5".into(), Some(two.to_vec()), "p".into()))
        );
        assert_eq!(decode(encode("a2", "x\ny", None).as_bytes()), Some(("a2".into(), None, "x\ny".into())));
        assert_eq!(decode(b"a3\nnot-hex\nprod"), None);
        assert_eq!(decode(b"a4"), None);
    }
}
