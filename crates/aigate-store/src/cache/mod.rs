//! The response cache store: one trait, [`CacheStore`], and the entry type it holds.
//!
//! Keys are 32-byte digests computed by the cache stage (`aigate-core::cache`); the digest already
//! covers the gateway, so a key is globally unique. The namespace (`ns`, the gateway name) is passed
//! alongside so a whole gateway can be purged. Entries carry their own absolute expiry
//! (`expires_at_ms`, Unix milliseconds); a store never returns an expired entry.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::StoreError;

pub mod disk;
pub mod memory;
pub mod purge_bus;
pub mod redis;
pub mod tiered;

/// A cache key: a 32-byte digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[(b >> 4) as usize]));
            s.push(char::from(HEX[(b & 0xf) as usize]));
        }
        s
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<CacheKey> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = (b[2 * i] as char).to_digit(16)?;
            let lo = (b[2 * i + 1] as char).to_digit(16)?;
            *o = (hi * 16 + lo) as u8;
        }
        Some(CacheKey(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

/// A stored response: status, the headers worth replaying, and the body as the chunks it arrived
/// in (for SSE: one chunk per relayed frame, so a hit replays the same events in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResponse {
    /// HTTP status (2xx).
    pub status: u16,
    /// Replayed headers: lowercase name, raw value.
    pub headers: Vec<(String, Bytes)>,
    /// Body chunks in arrival order.
    pub chunks: Vec<Bytes>,
    /// When it was stored, Unix ms (for `Age`).
    pub created_at_ms: u64,
    /// When it expires, Unix ms.
    pub expires_at_ms: u64,
}

/// What an allocation costs beyond the bytes asked for (the allocator's rounding and headers),
/// counted once per chunk and header string.
const ALLOCATION_OVERHEAD: usize = 16;

/// The structures around an entry held in the memory tier: the shared entry itself, its key and
/// namespace, and the cache's bookkeeping of it (moka's node, its places in the access and
/// expiry orders).
pub const ENTRY_OVERHEAD: usize = 384;

/// Format version byte of [`CachedResponse::encode`].
const FORMAT_V1: u8 = 1;

impl CachedResponse {
    /// Total body bytes.
    pub fn body_len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    /// The bytes the entry holds in memory, what the memory tier's cap counts: the body, a slot
    /// per chunk (and the allocation a chunk of its own needs), the headers with their strings, and
    /// the entry's own structures (see [`ENTRY_OVERHEAD`]).
    pub fn weight(&self) -> usize {
        let chunks = self.chunks.capacity() * std::mem::size_of::<Bytes>() + self.chunks.len() * ALLOCATION_OVERHEAD;
        let headers = self.headers.capacity() * std::mem::size_of::<(String, Bytes)>()
            + self.headers.iter().map(|(k, v)| k.capacity() + v.len() + 2 * ALLOCATION_OVERHEAD).sum::<usize>();
        self.body_len() + chunks + headers + ENTRY_OVERHEAD
    }

    /// An entry whose body chunks are slices of one buffer: one allocation for the whole body
    /// instead of one per chunk (an SSE answer has hundreds of small ones).
    pub fn from_chunks(
        status: u16,
        headers: Vec<(String, Bytes)>,
        chunks: &[Bytes],
        created_at_ms: u64,
        expires_at_ms: u64,
    ) -> CachedResponse {
        let mut body = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
        for c in chunks {
            body.extend_from_slice(c);
        }
        let body = body.freeze();
        let mut at = 0;
        let chunks = chunks
            .iter()
            .map(|c| {
                let slice = body.slice(at..at + c.len());
                at += c.len();
                slice
            })
            .collect();
        CachedResponse { status, headers, chunks, created_at_ms, expires_at_ms }
    }

    /// The length of [`CachedResponse::encode`]'s output.
    fn encoded_len(&self) -> usize {
        1 + 2
            + 8
            + 8
            + 4
            + self.headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>()
            + 4
            + self.chunks.iter().map(|c| 4 + c.len()).sum::<usize>()
    }

    /// Whether it has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// Serialises to a compact binary form (for disk and Redis).
    ///
    /// Hand-written rather than a serde format: the layout is five fields and a few length-prefixed
    /// byte strings, and decoding can slice the body chunks out of the input `Bytes` without copying.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        b.put_u8(FORMAT_V1);
        b.put_u16(self.status);
        b.put_u64(self.created_at_ms);
        b.put_u64(self.expires_at_ms);
        b.put_u32(self.headers.len() as u32);
        for (k, v) in &self.headers {
            b.put_u32(k.len() as u32);
            b.put_slice(k.as_bytes());
            b.put_u32(v.len() as u32);
            b.put_slice(v);
        }
        b.put_u32(self.chunks.len() as u32);
        for c in &self.chunks {
            b.put_u32(c.len() as u32);
            b.put_slice(c);
        }
        b.freeze()
    }

    /// Parses [`CachedResponse::encode`]'s output.
    pub fn decode(mut b: Bytes) -> Result<CachedResponse, StoreError> {
        fn need(b: &Bytes, n: usize) -> Result<(), StoreError> {
            if b.remaining() < n {
                Err(StoreError::Corrupt("truncated cache entry".into()))
            } else {
                Ok(())
            }
        }
        fn take(b: &mut Bytes) -> Result<Bytes, StoreError> {
            need(b, 4)?;
            let n = b.get_u32() as usize;
            need(b, n)?;
            Ok(b.split_to(n))
        }
        need(&b, 1 + 2 + 8 + 8 + 4)?;
        if b.get_u8() != FORMAT_V1 {
            return Err(StoreError::Corrupt("unknown cache entry format".into()));
        }
        let status = b.get_u16();
        let created_at_ms = b.get_u64();
        let expires_at_ms = b.get_u64();
        let nh = b.get_u32() as usize;
        let mut headers = Vec::with_capacity(nh.min(256));
        for _ in 0..nh {
            let k = take(&mut b)?;
            let k = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("header name".into()))?;
            let v = take(&mut b)?;
            headers.push((k, v));
        }
        need(&b, 4)?;
        let nc = b.get_u32() as usize;
        let mut chunks = Vec::with_capacity(nc.min(65_536));
        for _ in 0..nc {
            chunks.push(take(&mut b)?);
        }
        Ok(CachedResponse { status, headers, chunks, created_at_ms, expires_at_ms })
    }
}

/// What is known of an entry besides its response: the request that filled it, as a filtered purge
/// ([`CacheFilter`]) matches it. Stored beside the entry by [`CacheStore::put_with_meta`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryMeta {
    /// The requested model, if the body named one.
    #[serde(default, rename = "m", skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The endpoint's name (`chat`, `embeddings`, …).
    #[serde(default, rename = "e")]
    pub endpoint: String,
    /// `cf-aig-metadata` entries of the request that filled it, values as text (a string as is,
    /// anything else as JSON: `7`, `true`).
    #[serde(default, rename = "md", skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<(String, String)>,
}

/// Which entries of a namespace a filtered purge removes: every condition given must hold. An
/// entry stored without [`EntryMeta`] matches only a filter on its age.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheFilter {
    /// The requested model.
    pub model: Option<String>,
    /// The endpoint's name.
    pub endpoint: Option<String>,
    /// Metadata entries (key, value as text).
    pub metadata: Vec<(String, String)>,
    /// Stored before this Unix ms.
    pub created_before_ms: Option<u64>,
}

impl CacheFilter {
    /// Whether the entry created at `created_at_ms` with `meta` matches.
    pub fn matches(&self, meta: Option<&EntryMeta>, created_at_ms: u64) -> bool {
        if self.created_before_ms.is_some_and(|t| created_at_ms >= t) {
            return false;
        }
        if self.model.is_none() && self.endpoint.is_none() && self.metadata.is_empty() {
            return true;
        }
        let Some(m) = meta else { return false };
        self.model.as_ref().is_none_or(|want| m.model.as_ref() == Some(want))
            && self.endpoint.as_ref().is_none_or(|want| &m.endpoint == want)
            && self.metadata.iter().all(|(k, v)| m.metadata.iter().any(|(mk, mv)| mk == k && mv == v))
    }
}

/// Size and eviction figures of a store (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStoreStats {
    /// Entries held (approximate for remote stores; 0 when unknown).
    pub entries: u64,
    /// Bytes held (approximate; 0 when unknown).
    pub bytes: u64,
    /// Entries evicted for size since start.
    pub evictions: u64,
}

/// A response cache backend.
///
/// Implementations: [`crate::MemoryCacheStore`] (bounded by bytes), [`crate::DiskCacheStore`]
/// (SQLite file under `data_dir`, bounded by size, survives restarts) and
/// [`crate::RedisCacheStore`] (shared by replicas, TTL by Redis expiry, large entries compressed).
/// Errors are returned, never panicked: the caller treats a failing store as a miss.
#[async_trait::async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `disk`, `redis`).
    fn kind(&self) -> &'static str;
    /// The entry under `key`, unless absent or expired.
    async fn get(&self, ns: &str, key: &CacheKey) -> Result<Option<Arc<CachedResponse>>, StoreError>;
    /// Stores `entry` until its `expires_at_ms`.
    async fn put(&self, ns: &str, key: &CacheKey, entry: Arc<CachedResponse>) -> Result<(), StoreError>;
    /// Stores `entry` with what a filtered purge matches on.
    async fn put_with_meta(
        &self,
        ns: &str,
        key: &CacheKey,
        entry: Arc<CachedResponse>,
        meta: &EntryMeta,
    ) -> Result<(), StoreError>;
    /// Removes one key, or every entry of the namespace when `key` is `None`; returns how many
    /// entries were removed (best effort for remote stores).
    async fn purge(&self, ns: &str, key: Option<&CacheKey>) -> Result<u64, StoreError>;
    /// Removes the entries of `ns` that `filter` matches; returns their keys.
    async fn purge_matching(&self, ns: &str, filter: &CacheFilter) -> Result<Vec<CacheKey>, StoreError>;
    /// Size figures.
    fn stats(&self) -> CacheStoreStats {
        CacheStoreStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_chunks_keeps_the_chunks_in_one_buffer() {
        let parts =
            [Bytes::from_static(b"data: a\n\n"), Bytes::from_static(b""), Bytes::from_static(b"data: [DONE]\n\n")];
        let e = CachedResponse::from_chunks(200, vec![], &parts, 1, 2);
        assert_eq!(e.chunks, parts.to_vec());
        assert_eq!(e.chunks[2].as_ptr(), e.chunks[0].as_ptr().wrapping_add(parts[0].len()));
        assert_eq!(CachedResponse::decode(e.encode()).unwrap(), e);
    }

    #[test]
    fn filter_matches_every_condition_given() {
        let meta = EntryMeta {
            model: Some("gpt-4o".into()),
            endpoint: "chat".into(),
            metadata: vec![("feature".into(), "resume".into()), ("n".into(), "7".into())],
        };
        let f = |model: Option<&str>, endpoint: Option<&str>, md: &[(&str, &str)], before: Option<u64>| CacheFilter {
            model: model.map(Into::into),
            endpoint: endpoint.map(Into::into),
            metadata: md.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            created_before_ms: before,
        };
        assert!(f(None, None, &[], None).matches(None, 5));
        assert!(f(Some("gpt-4o"), Some("chat"), &[("n", "7")], Some(6)).matches(Some(&meta), 5));
        assert!(!f(Some("gpt-4o"), None, &[], Some(5)).matches(Some(&meta), 5));
        assert!(!f(Some("gpt-4o-mini"), None, &[], None).matches(Some(&meta), 5));
        assert!(!f(None, Some("embeddings"), &[], None).matches(Some(&meta), 5));
        assert!(!f(None, None, &[("feature", "x")], None).matches(Some(&meta), 5));
        assert!(!f(Some("gpt-4o"), None, &[], None).matches(None, 5), "no meta: only an age filter matches");
        assert!(f(None, None, &[], Some(6)).matches(None, 5));
    }

    #[test]
    fn roundtrip() {
        let e = CachedResponse {
            status: 200,
            headers: vec![("content-type".into(), Bytes::from_static(b"text/event-stream"))],
            chunks: vec![Bytes::from_static(b"data: 1\n\n"), Bytes::from_static(b"data: [DONE]\n\n")],
            created_at_ms: 5,
            expires_at_ms: 10,
        };
        let d = CachedResponse::decode(e.encode()).unwrap();
        assert_eq!(d, e);
        assert!(CachedResponse::decode(e.encode().slice(0..20)).is_err());
        let k = CacheKey([7u8; 32]);
        assert_eq!(CacheKey::from_hex(&k.to_hex()), Some(k));
    }
}
