//! Shared response cache in Redis, for several gateway replicas.
//!
//! Keys are `aigate:cache:{ns}:{hex digest}`; the value is one flag byte (`0` raw, `1` LZ4) followed
//! by [`CachedResponse::encode`]'s output, LZ4-compressed (`lz4_flex` block format with the size
//! prepended, as `compress_prepend_size` writes it) when it is larger than
//! [`COMPRESS_THRESHOLD`] bytes and compression actually shrinks it.
//!
//! Bounds: each entry is stored with `SET .. PX` (the time left on the store's clock,
//! [`RedisCacheStore::with_clock`]), so Redis expires it at `expires_at_ms`; the total
//! size is bounded by the Redis server's own `maxmemory` policy. Decoded entries are limited to
//! [`MAX_DECODED_BYTES`]. [`CacheStore::stats`] is unknown (all zeros).
//!
//! What a filtered purge matches on ([`EntryMeta`], with the entry's creation and expiry) is kept
//! per namespace in a hash, `aigate:cache-meta:{ns}` (field: the key's hex digest), beside a sorted
//! set of the fields by expiry, `aigate:cache-exp:{ns}`; [`PUT_SCRIPT`] writes the entry and both
//! at once and drops up to [`PRUNE_PER_PUT`] fields whose entry has expired, so the hash stays
//! about as large as the live entries. A filtered purge reads the hash (`HSCAN`), never the
//! entries.
//!
//! Failure behaviour: [`RedisCacheStore::new`] never connects, so it succeeds while Redis is down
//! (only a malformed URL fails). The connection (a [`ConnectionManager`], which reconnects by
//! itself once established) is created on first use, in a background task bounded by
//! [`CONNECT_TIMEOUT`]; the first operations wait for that first attempt (within their timeout).
//! Once an attempt has failed, operations return [`StoreError::Unavailable`] at once, and a new
//! attempt is started in the background no sooner than [`RECONNECT_MIN_INTERVAL`] after the last
//! failure, so a dead Redis is neither hammered nor adds latency. Every command is bounded by the
//! operation timeout and returns [`StoreError::Timeout`] past it; a namespace purge bounds each
//! `SCAN`/`UNLINK` round separately. Nothing panics.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

use crate::{CacheFilter, CacheKey, CacheStore, CachedResponse, Clock, EntryMeta, StoreError};

/// Encoded entries larger than this many bytes are LZ4-compressed.
pub const COMPRESS_THRESHOLD: usize = 1024;

/// Minimum delay between two attempts to create the connection.
pub const RECONNECT_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// Largest decompressed entry accepted from Redis.
pub const MAX_DECODED_BYTES: usize = 512 * 1024 * 1024;

/// Flag byte: the rest is [`CachedResponse::encode`]'s output as is.
pub const FLAG_RAW: u8 = 0;

/// Flag byte: the rest is LZ4-compressed with the uncompressed size prepended (u32 little endian).
pub const FLAG_LZ4: u8 = 1;

/// Expired fields removed from a namespace's meta hash by each write with meta.
pub const PRUNE_PER_PUT: usize = 32;

/// Writes an entry (`KEYS[1]`, value `ARGV[1]`, TTL `ARGV[2]` ms) and its meta (`ARGV[4]`) under
/// field `ARGV[3]` of the hash `KEYS[2]`, indexed by expiry `ARGV[5]` in the sorted set `KEYS[3]`;
/// then drops fields that expired before `ARGV[6]`.
const PUT_SCRIPT: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) \
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3]) \
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[6], 'LIMIT', 0, ARGV[7]) \
if #old > 0 then redis.call('HDEL', KEYS[2], unpack(old)) redis.call('ZREM', KEYS[3], unpack(old)) end \
return #old";

/// Fields read per `HSCAN` round of a filtered purge.
const HSCAN_COUNT: u32 = 500;

/// The meta hash of a namespace.
fn meta_key(ns: &str) -> String {
    format!("aigate:cache-meta:{ns}")
}

/// The expiry index of a namespace's meta hash.
fn exp_key(ns: &str) -> String {
    format!("aigate:cache-exp:{ns}")
}

/// A meta hash value: the entry's facts, creation and expiry.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredMeta {
    #[serde(flatten)]
    meta: EntryMeta,
    /// Created, Unix ms.
    c: u64,
    /// Expires, Unix ms.
    x: u64,
}

/// Keys scanned per `SCAN` round of a namespace purge.
const SCAN_COUNT: u32 = 500;

/// Timeout of one connection attempt (TCP, TLS and protocol handshakes), and the connection's own
/// response timeout (operations are bounded more tightly by the operation timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection's lifecycle.
enum ConnState {
    /// No connection; the last failed attempt, if any.
    Idle { last_failure: Option<(Instant, String)> },
    /// A background task is connecting; its channel closes when it is done. Operations wait for
    /// it only on the first attempt (`wait`); once Redis has failed, they fail fast while a retry
    /// runs, so an unreachable Redis adds no latency.
    Connecting { done: watch::Receiver<()>, wait: bool },
    /// Connected (the manager reconnects by itself from here on).
    Ready(Box<ConnectionManager>),
}

struct Inner {
    client: redis::Client,
    op_timeout: Duration,
    state: Mutex<ConnState>,
}

/// A cache store in Redis, shared by replicas. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisCacheStore {
    inner: Arc<Inner>,
    /// What "expired" means for an entry read back (Redis expires it on its own clock too).
    clock: Clock,
}

impl std::fmt::Debug for RedisCacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCacheStore")
            .field("addr", &self.inner.client.get_connection_info().addr)
            .field("op_timeout", &self.inner.op_timeout)
            .finish()
    }
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// The Redis key of an entry.
pub fn redis_key(ns: &str, key: &CacheKey) -> String {
    format!("aigate:cache:{ns}:{}", key.to_hex())
}

/// The `SCAN MATCH` pattern of every key of `ns` (glob characters of `ns` escaped).
fn ns_pattern(ns: &str) -> String {
    let mut p = String::with_capacity(ns.len() + 16);
    p.push_str("aigate:cache:");
    for c in ns.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push_str(":*");
    p
}

/// Encodes an entry as stored in Redis: flag byte + raw or LZ4 payload.
pub fn encode_value(entry: &CachedResponse) -> Vec<u8> {
    let raw = entry.encode();
    if raw.len() > COMPRESS_THRESHOLD {
        if let Ok(len) = u32::try_from(raw.len()) {
            let mut out = vec![0u8; 5 + lz4_flex::block::get_maximum_output_size(raw.len())];
            out[0] = FLAG_LZ4;
            out[1..5].copy_from_slice(&len.to_le_bytes());
            if let Ok(n) = lz4_flex::block::compress_into(&raw, &mut out[5..]) {
                if 5 + n < raw.len() + 1 {
                    out.truncate(5 + n);
                    return out;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(raw.len() + 1);
    out.push(FLAG_RAW);
    out.extend_from_slice(&raw);
    out
}

/// Decodes [`encode_value`]'s output.
pub fn decode_value(value: Vec<u8>) -> Result<CachedResponse, StoreError> {
    match value.first() {
        Some(&FLAG_RAW) => CachedResponse::decode(Bytes::from(value).slice(1..)),
        Some(&FLAG_LZ4) => {
            let (size, body) = lz4_flex::block::uncompressed_size(&value[1..])
                .map_err(|e| StoreError::Corrupt(format!("lz4 header: {e}")))?;
            if size > MAX_DECODED_BYTES {
                return Err(StoreError::Corrupt(format!("entry of {size} bytes is too large")));
            }
            let raw = lz4_flex::block::decompress(body, size).map_err(|e| StoreError::Corrupt(format!("lz4: {e}")))?;
            CachedResponse::decode(Bytes::from(raw))
        }
        Some(f) => Err(StoreError::Corrupt(format!("unknown value flag {f}"))),
        None => Err(StoreError::Corrupt("empty value".into())),
    }
}

impl RedisCacheStore {
    /// A store for the Redis at `url` (`redis://` or `rediss://`), bounding every command by
    /// `op_timeout`. Does not connect: fails only on a malformed URL.
    pub fn new(url: &str, op_timeout: Duration) -> Result<RedisCacheStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("redis url: {e}")))?;
        Ok(RedisCacheStore {
            inner: Arc::new(Inner { client, op_timeout, state: Mutex::new(ConnState::Idle { last_failure: None }) }),
            clock: Clock::system(),
        })
    }

    /// The same store on `clock` instead of the system clock (for the expiry of what it reads and
    /// the TTL of what it writes).
    pub fn with_clock(self, clock: Clock) -> RedisCacheStore {
        RedisCacheStore { clock, ..self }
    }

    /// The per-command timeout.
    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// The connection, creating it (in the background) if needed. Not bounded by itself: callers
    /// run it under the operation timeout.
    pub(crate) async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        loop {
            let mut rx = {
                let mut st = self.inner.state.lock().unwrap_or_else(PoisonError::into_inner);
                if let ConnState::Connecting { done, .. } = &*st {
                    // The connecting task ended without recording an outcome (it panicked or its
                    // runtime stopped): count it as a failed attempt.
                    if done.has_changed().is_err() {
                        let failure = (Instant::now(), "redis: connection attempt aborted".to_owned());
                        *st = ConnState::Idle { last_failure: Some(failure) };
                    }
                }
                match &*st {
                    ConnState::Ready(c) => return Ok((**c).clone()),
                    ConnState::Connecting { done, wait: true } => done.clone(),
                    ConnState::Connecting { wait: false, .. } => {
                        return Err(StoreError::Unavailable("redis: reconnecting".into()));
                    }
                    ConnState::Idle { last_failure } => {
                        if let Some((at, msg)) = last_failure {
                            if at.elapsed() < RECONNECT_MIN_INTERVAL {
                                return Err(StoreError::Unavailable(msg.clone()));
                            }
                        }
                        let wait = last_failure.is_none();
                        let (tx, rx) = watch::channel(());
                        *st = ConnState::Connecting { done: rx.clone(), wait };
                        let inner = self.inner.clone();
                        tokio::spawn(async move {
                            // One attempt per (re)connection: retrying is paced by this store
                            // (initial connection) and by the manager on the next command.
                            let config = ConnectionManagerConfig::new()
                                .set_connection_timeout(CONNECT_TIMEOUT)
                                .set_response_timeout(CONNECT_TIMEOUT)
                                .set_number_of_retries(0);
                            // The connection timeout covers the TCP connect only; bound the whole
                            // attempt (TLS and protocol handshakes too) so it cannot hang forever.
                            let res = tokio::time::timeout(
                                CONNECT_TIMEOUT,
                                ConnectionManager::new_with_config(inner.client.clone(), config),
                            )
                            .await
                            .unwrap_or_else(|_| {
                                Err(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))
                            });
                            let mut st = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
                            *st = match res {
                                Ok(c) => ConnState::Ready(Box::new(c)),
                                Err(e) if wait => {
                                    tracing::warn!(error = %e, "redis cache: cannot connect; retrying in the background");
                                    ConnState::Idle { last_failure: Some((Instant::now(), format!("redis: {e}"))) }
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "redis cache: still cannot connect");
                                    ConnState::Idle { last_failure: Some((Instant::now(), format!("redis: {e}"))) }
                                }
                            };
                            drop(st);
                            drop(tx);
                        });
                        if !wait {
                            return Err(StoreError::Unavailable("redis: reconnecting".into()));
                        }
                        rx
                    }
                }
            };
            // Returns (with an error) once the connecting task has dropped its sender.
            let _ = rx.changed().await;
        }
    }

    /// The client (for the purge announcements' own pub/sub connection).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// Runs one command on the connection, bounded by the operation timeout.
    pub(crate) async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        tokio::time::timeout(self.inner.op_timeout, async {
            let mut conn = self.conn().await?;
            cmd.query_async::<T>(&mut conn).await.map_err(redis_err)
        })
        .await
        .map_err(|_| StoreError::Timeout)?
    }
}

#[async_trait::async_trait]
impl CacheStore for RedisCacheStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, ns: &str, key: &CacheKey) -> Result<Option<Arc<CachedResponse>>, StoreError> {
        let value: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(redis_key(ns, key))).await?;
        let Some(value) = value else { return Ok(None) };
        let entry = decode_value(value)?;
        if entry.is_expired(self.clock.now_ms()) {
            return Ok(None);
        }
        Ok(Some(Arc::new(entry)))
    }

    async fn put(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>) -> Result<(), StoreError> {
        let k = redis_key(ns, key);
        let ttl_ms = entry.expires_at_ms.saturating_sub(self.clock.now_ms());
        if ttl_ms == 0 {
            // Already expired: storing it is pointless, but it must still replace what was there.
            return self.query::<()>(redis::cmd("DEL").arg(k)).await;
        }
        let value = encode_value(&entry);
        self.query::<()>(redis::cmd("SET").arg(k).arg(value).arg("PX").arg(ttl_ms)).await
    }

    async fn put_with_meta(
        &self,
        ns: &str,
        key: &CacheKey,
        entry: Arc<CachedResponse>,
        meta: &EntryMeta,
    ) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let ttl_ms = entry.expires_at_ms.saturating_sub(now);
        if ttl_ms == 0 {
            return self.purge(ns, Some(key)).await.map(|_| ());
        }
        let stored = StoredMeta { meta: meta.clone(), c: entry.created_at_ms, x: entry.expires_at_ms };
        let json = serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(format!("entry meta: {e}")))?;
        let cmd = redis::cmd("EVAL")
            .arg(PUT_SCRIPT)
            .arg(3)
            .arg(redis_key(ns, key))
            .arg(meta_key(ns))
            .arg(exp_key(ns))
            .arg(encode_value(&entry))
            .arg(ttl_ms)
            .arg(key.to_hex())
            .arg(json)
            .arg(entry.expires_at_ms)
            .arg(now)
            .arg(PRUNE_PER_PUT)
            .clone();
        self.query::<u64>(&cmd).await.map(|_| ())
    }

    async fn purge_matching(&self, ns: &str, filter: &CacheFilter) -> Result<Vec<CacheKey>, StoreError> {
        let (hash, exp) = (meta_key(ns), exp_key(ns));
        let now = self.clock.now_ms();
        let mut cursor: u64 = 0;
        let mut purged = Vec::new();
        loop {
            let (next, pairs): (u64, Vec<(String, String)>) =
                self.query(redis::cmd("HSCAN").arg(&hash).arg(cursor).arg("COUNT").arg(HSCAN_COUNT)).await?;
            let mut fields: Vec<&str> = Vec::new();
            let mut keys: Vec<String> = Vec::new();
            for (field, value) in &pairs {
                let Some(key) = CacheKey::from_hex(field) else { continue };
                let Ok(m) = serde_json::from_str::<StoredMeta>(value) else { continue };
                if m.x <= now {
                    fields.push(field);
                } else if filter.matches(Some(&m.meta), m.c) {
                    fields.push(field);
                    keys.push(redis_key(ns, &key));
                    purged.push(key);
                }
            }
            if !keys.is_empty() {
                self.query::<u64>(redis::cmd("UNLINK").arg(&keys)).await?;
            }
            if !fields.is_empty() {
                self.query::<u64>(redis::cmd("HDEL").arg(&hash).arg(&fields)).await?;
                self.query::<u64>(redis::cmd("ZREM").arg(&exp).arg(&fields)).await?;
            }
            if next == 0 {
                return Ok(purged);
            }
            cursor = next;
        }
    }

    async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError> {
        if let Some(key) = key {
            let hex = key.to_hex();
            self.query::<u64>(redis::cmd("HDEL").arg(meta_key(ns)).arg(&hex)).await?;
            self.query::<u64>(redis::cmd("ZREM").arg(exp_key(ns)).arg(&hex)).await?;
            return self.query(redis::cmd("DEL").arg(redis_key(ns, key))).await;
        }
        self.query::<u64>(redis::cmd("UNLINK").arg(meta_key(ns)).arg(exp_key(ns))).await?;
        let pattern = ns_pattern(ns);
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .query(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT))
                .await?;
            if !keys.is_empty() {
                let n: u64 = self.query(redis::cmd("UNLINK").arg(keys)).await?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: Vec<u8>) -> CachedResponse {
        CachedResponse {
            status: 200,
            headers: vec![("content-type".into(), Bytes::from_static(b"application/json"))],
            chunks: vec![Bytes::from(body)],
            created_at_ms: 1,
            expires_at_ms: u64::MAX,
        }
    }

    #[test]
    fn value_roundtrip_raw_and_lz4() {
        let small = entry(b"hello".to_vec());
        let v = encode_value(&small);
        assert_eq!(v[0], FLAG_RAW);
        assert_eq!(decode_value(v).unwrap(), small);

        let big = entry(b"abcdefgh".repeat(10_000));
        let v = encode_value(&big);
        assert_eq!(v[0], FLAG_LZ4);
        assert!(v.len() < big.encode().len());
        assert_eq!(decode_value(v).unwrap(), big);

        // Incompressible data above the threshold is stored raw.
        let mut x: u32 = 12345;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let v = encode_value(&entry(noise.clone()));
        assert_eq!(v[0], FLAG_RAW);
        assert_eq!(decode_value(v).unwrap(), entry(noise));

        assert!(decode_value(vec![]).is_err());
        assert!(decode_value(vec![9, 1, 2]).is_err());
        assert!(decode_value(vec![FLAG_LZ4, 0xff, 0xff, 0xff, 0x7f, 0]).is_err());
    }

    #[test]
    fn pattern_escapes_glob() {
        assert_eq!(ns_pattern("a*b"), "aigate:cache:a\\*b:*");
        assert_eq!(redis_key("gw", &CacheKey([0; 32])), format!("aigate:cache:gw:{}", "0".repeat(64)));
    }
}
