//! The cache index: what this process knows of each gateway's cache entries, for insight (`GET
//! /admin/gateways/{id}/cache/top`, `aigate cache top`, the dashboard) without reading the store.
//!
//! An entry is described when the writer stores it ([`CacheIndex::on_write`]: creation, expiry,
//! size) and counted when a request looking it up is finalised by the log pipeline
//! ([`CacheIndex::on_request`]: hits, misses, cost saved, model, endpoint, metadata, a prompt
//! preview where the gateway logs bodies, the log id of the request that filled it). Both run off
//! the request path (the cache writer task and the log writer), behind one mutex.
//!
//! A miss on a key whose entry had expired is counted apart (`expired_misses`): what a longer TTL
//! would have served. Entries stay indexed after they expire for that reason, until the bound.
//!
//! Bounds: [`MAX_ENTRIES`] per gateway; past it the least recently seen tenth is forgotten.
//!
//! Several replicas: each process indexes the requests it served and the entries it wrote. With a
//! shared store (Redis), a replica's figures are its own share of the traffic, and an entry another
//! replica wrote shows here once a request here hits it (without creation time until then).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use aigate_store::CacheKey;
use serde::Serialize;

use super::CacheStatus;

/// Entries indexed per gateway.
pub const MAX_ENTRIES: usize = 10_000;

/// Characters of a prompt preview.
pub const PREVIEW_CHARS: usize = 80;

/// What is known of one entry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IndexEntry {
    /// The key, hex (what `aigate-cache-key` shows and `?key=` purges).
    pub key: String,
    /// Requests served from it (shadow mode: would have been).
    pub hits: u64,
    /// Requests that looked it up and went upstream.
    pub misses: u64,
    /// Misses that found it expired: what a longer TTL would have served.
    pub expired_misses: u64,
    /// Body bytes stored.
    pub bytes: u64,
    /// When it was stored, Unix ms (0: not stored by this process).
    pub created_at_ms: u64,
    /// When it expires, Unix ms (0: unknown).
    pub expires_at_ms: u64,
    /// The expiry of the entry this one replaced (a write may land before the miss that made it
    /// is counted).
    #[serde(skip)]
    pub prev_expires_at_ms: u64,
    /// Purged since it was stored (it stays indexed: what repeats is still worth knowing, and
    /// warming).
    pub purged: bool,
    /// When a request last looked it up, Unix ms.
    pub last_seen_ms: u64,
    /// What one upstream answer cost, USD, when priced.
    pub cost_usd: Option<f64>,
    /// What its hits saved, USD.
    pub saved_usd: f64,
    /// The requested model.
    pub model: Option<String>,
    /// The endpoint's name.
    pub endpoint: &'static str,
    /// The provider.
    pub provider: String,
    /// The provider path.
    pub path: String,
    /// `cf-aig-metadata` of the request that filled it.
    pub metadata: Vec<(String, String)>,
    /// The start of the prompt, where the gateway logs bodies.
    pub preview: Option<String>,
    /// The log id of the request that filled it, where the gateway keeps logs (its body, where
    /// logged, is what `aigate cache warm --from-logs` sends again).
    pub log_id: Option<String>,
}

/// What a finalised request tells the index.
#[derive(Debug)]
pub struct Seen<'a> {
    /// The gateway.
    pub gateway: &'a str,
    /// The key looked up.
    pub key: CacheKey,
    /// The outcome.
    pub status: CacheStatus,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Cost of an upstream answer (a miss), USD.
    pub cost_usd: Option<f64>,
    /// Saved by a hit, USD.
    pub saved_usd: Option<f64>,
    /// Requested model.
    pub model: Option<&'a str>,
    /// Endpoint name.
    pub endpoint: &'static str,
    /// Provider.
    pub provider: &'a str,
    /// Provider path.
    pub path: &'a str,
    /// Metadata, as text.
    pub metadata: &'a [(String, aigate_store::MetaValue)],
    /// The request body, where the gateway logs bodies (for the preview).
    pub body: Option<&'a [u8]>,
    /// The log id, where the record is kept.
    pub log_id: Option<&'a str>,
}

/// Totals over the entries a query selects.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Entries not yet expired.
    pub entries: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Hits.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// hits / (hits + misses), 0 without lookups.
    pub hit_rate: f64,
    /// Misses that found an expired entry: the hits a longer TTL would have added.
    pub expired_misses: u64,
    /// Saved by hits, USD.
    pub saved_usd: f64,
}

/// The answer of a top query.
#[derive(Debug, Clone, Serialize)]
pub struct Top {
    /// The gateway.
    pub gateway: String,
    /// The window's start, Unix ms (entries looked up or stored since).
    pub since_ms: u64,
    /// Totals over the window's entries.
    pub totals: Totals,
    /// The entries, most hit first.
    pub entries: Vec<TopEntry>,
}

/// One entry as a top query shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TopEntry {
    /// The entry.
    #[serde(flatten)]
    pub entry: IndexEntry,
    /// Seconds since it was stored (`None`: not stored by this process).
    pub age_s: Option<u64>,
    /// Whether it has expired.
    pub expired: bool,
}

/// The index of every gateway.
#[derive(Debug, Default)]
pub struct CacheIndex {
    gateways: Mutex<HashMap<String, HashMap<CacheKey, IndexEntry>>>,
}

impl CacheIndex {
    /// An entry was stored.
    pub fn on_write(&self, gateway: &str, key: &CacheKey, created_at_ms: u64, expires_at_ms: u64, bytes: u64) {
        self.with_entry(gateway, key, created_at_ms, |e| {
            e.prev_expires_at_ms = if e.purged { 0 } else { e.expires_at_ms };
            e.purged = false;
            e.created_at_ms = created_at_ms;
            e.expires_at_ms = expires_at_ms;
            e.bytes = bytes;
        });
    }

    /// A request that looked an entry up has finished.
    pub fn on_request(&self, s: &Seen<'_>) {
        let hit = matches!(s.status, CacheStatus::Hit | CacheStatus::ShadowHit);
        if !hit && s.status != CacheStatus::Miss {
            return;
        }
        self.with_entry(s.gateway, &s.key, s.at_ms, |e| {
            e.last_seen_ms = e.last_seen_ms.max(s.at_ms);
            if hit {
                e.hits += 1;
                e.saved_usd += s.saved_usd.unwrap_or(0.0);
            } else {
                e.misses += 1;
                let expired = |x: u64| x != 0 && x <= s.at_ms;
                let refilled = e.created_at_ms >= s.at_ms;
                if !e.purged && expired(e.expires_at_ms) || refilled && expired(e.prev_expires_at_ms) {
                    e.expired_misses += 1;
                }
                if s.cost_usd.is_some() {
                    e.cost_usd = s.cost_usd;
                }
            }
            if e.endpoint.is_empty() || !hit {
                e.model = s.model.map(str::to_owned);
                e.endpoint = s.endpoint;
                e.provider = s.provider.to_owned();
                e.path = s.path.to_owned();
                e.metadata = s.metadata.iter().map(|(k, v)| (k.clone(), meta_text(v))).collect();
                if let Some(id) = s.log_id.filter(|id| !id.is_empty()) {
                    e.log_id = Some(id.to_owned());
                }
                if let Some(p) = s.body.and_then(preview) {
                    e.preview = Some(p);
                }
            }
        });
    }

    /// Marks a gateway's entries (all, or `keys`) purged: they stay indexed, no longer counted as
    /// held, and a miss on one is not an expired miss.
    pub fn purged(&self, gateway: &str, keys: Option<&[CacheKey]>) {
        let mut g = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(m) = g.get_mut(gateway) else { return };
        match keys {
            None => m.values_mut().for_each(|e| e.purged = true),
            Some(keys) => {
                for k in keys {
                    if let Some(e) = m.get_mut(k) {
                        e.purged = true;
                    }
                }
            }
        }
    }

    /// The most hit entries of `gateway` looked up or stored since `since_ms`, at most `limit`,
    /// with totals over every such entry.
    pub fn top(&self, gateway: &str, since_ms: u64, now_ms: u64, limit: usize) -> Top {
        let g = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        let mut totals = Totals::default();
        let mut picked: Vec<&IndexEntry> = Vec::new();
        if let Some(m) = g.get(gateway) {
            for e in m.values().filter(|e| e.last_seen_ms.max(e.created_at_ms) >= since_ms) {
                if e.expires_at_ms > now_ms && !e.purged {
                    totals.entries += 1;
                    totals.bytes += e.bytes;
                }
                totals.hits += e.hits;
                totals.misses += e.misses;
                totals.expired_misses += e.expired_misses;
                totals.saved_usd += e.saved_usd;
                picked.push(e);
            }
        }
        let lookups = totals.hits + totals.misses;
        totals.hit_rate = if lookups == 0 { 0.0 } else { totals.hits as f64 / lookups as f64 };
        picked.sort_by(|a, b| {
            (b.hits, b.misses, b.last_seen_ms).cmp(&(a.hits, a.misses, a.last_seen_ms)).then(a.key.cmp(&b.key))
        });
        let entries = picked
            .into_iter()
            .take(limit)
            .map(|e| TopEntry {
                entry: e.clone(),
                age_s: (e.created_at_ms != 0).then(|| now_ms.saturating_sub(e.created_at_ms) / 1000),
                expired: !e.purged && e.expires_at_ms != 0 && e.expires_at_ms <= now_ms,
            })
            .collect();
        Top { gateway: gateway.to_owned(), since_ms, totals, entries }
    }

    fn with_entry(&self, gateway: &str, key: &CacheKey, now_ms: u64, f: impl FnOnce(&mut IndexEntry)) {
        let mut g = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        let m = match g.get_mut(gateway) {
            Some(m) => m,
            None => g.entry(gateway.to_owned()).or_default(),
        };
        if m.len() >= MAX_ENTRIES && !m.contains_key(key) {
            forget_oldest(m);
        }
        let e = m.entry(*key).or_insert_with(|| IndexEntry {
            key: key.to_hex(),
            last_seen_ms: now_ms,
            ..Default::default()
        });
        f(e);
    }
}

/// Forgets the least recently seen tenth of `m`.
fn forget_oldest(m: &mut HashMap<CacheKey, IndexEntry>) {
    let mut seen: Vec<(u64, CacheKey)> = m.iter().map(|(k, e)| (e.last_seen_ms.max(e.created_at_ms), *k)).collect();
    seen.sort_unstable();
    for (_, k) in seen.into_iter().take(MAX_ENTRIES / 10) {
        m.remove(&k);
    }
}

/// A metadata value as text: a string as is, anything else as JSON.
pub fn meta_text(v: &aigate_store::MetaValue) -> String {
    match v {
        aigate_store::MetaValue::String(s) => s.clone(),
        other => other.to_json().to_string(),
    }
}

/// The start of the prompt: the last user message (OpenAI and Anthropic `messages`), else
/// `input` or `prompt` (embeddings, completions, Responses), else Gemini's last `contents` text.
pub fn preview(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text_of = |c: &serde_json::Value| -> Option<String> {
        match c {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(parts) => {
                parts.iter().find_map(|p| p.get("text").and_then(|t| t.as_str()).or(p.as_str()).map(str::to_owned))
            }
            _ => None,
        }
    };
    let text = v
        .get("messages")
        .and_then(|m| m.as_array())
        .and_then(|m| m.iter().rev().find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user")))
        .and_then(|m| m.get("content"))
        .and_then(text_of)
        .or_else(|| v.get("input").and_then(text_of))
        .or_else(|| v.get("prompt").and_then(text_of))
        .or_else(|| {
            let last = v.get("contents")?.as_array()?.last()?;
            text_of(last.get("parts")?)
        })?;
    let mut out: String = text.chars().take(PREVIEW_CHARS).collect();
    if text.chars().nth(PREVIEW_CHARS).is_some() {
        out.push('…');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(status: CacheStatus, at_ms: u64) -> Seen<'static> {
        Seen {
            gateway: "g",
            key: CacheKey([1; 32]),
            status,
            at_ms,
            cost_usd: Some(0.01),
            saved_usd: Some(0.01),
            model: Some("gpt-4o"),
            endpoint: "chat",
            provider: "openai",
            path: "chat/completions",
            metadata: &[],
            body: Some(br#"{"messages":[{"role":"user","content":"hello there"}]}"#),
            log_id: Some("id-1"),
        }
    }

    #[test]
    fn counts_hits_misses_and_misses_on_expired_entries() {
        let ix = CacheIndex::default();
        ix.on_request(&seen(CacheStatus::Miss, 1_000));
        ix.on_write("g", &CacheKey([1; 32]), 1_000, 61_000, 42);
        ix.on_request(&seen(CacheStatus::Hit, 2_000));
        ix.on_request(&seen(CacheStatus::Hit, 3_000));
        ix.on_request(&seen(CacheStatus::Bypass, 3_000));
        // Expired at 61 s: this miss is one a longer TTL would have served, also when its own
        // write lands first.
        ix.on_write("g", &CacheKey([1; 32]), 70_500, 130_500, 42);
        ix.on_request(&seen(CacheStatus::Miss, 70_000));
        let top = ix.top("g", 0, 70_000, 10);
        let e = &top.entries[0];
        assert_eq!((e.entry.hits, e.entry.misses, e.entry.expired_misses), (2, 2, 1));
        assert!((e.entry.saved_usd - 0.02).abs() < 1e-9);
        assert_eq!(e.entry.preview.as_deref(), Some("hello there"));
        assert_eq!(e.entry.log_id.as_deref(), Some("id-1"));
        assert_eq!((top.totals.hits, top.totals.misses, top.totals.expired_misses), (2, 2, 1));
        assert_eq!(top.totals.entries, 1);
        assert_eq!(ix.top("g", 0, 200_000, 10).totals.entries, 0, "expired");
        assert_eq!(ix.top("g", 150_000, 150_000, 10).entries.len(), 0, "outside the window");
        ix.purged("g", None);
        let top = ix.top("g", 0, 70_000, 10);
        assert!(top.entries[0].entry.purged && top.totals.entries == 0);
        // A miss after a purge is not one a longer TTL would have served.
        ix.on_request(&seen(CacheStatus::Miss, 200_000));
        ix.on_write("g", &CacheKey([1; 32]), 200_100, 260_100, 42);
        let e = &ix.top("g", 0, 200_200, 10).entries[0];
        assert_eq!((e.entry.expired_misses, e.entry.purged), (1, false));
    }

    #[test]
    fn preview_takes_the_prompt() {
        assert_eq!(preview(br#"{"input":"embed me"}"#).as_deref(), Some("embed me"));
        let long = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(100));
        assert_eq!(preview(long.as_bytes()).unwrap().chars().count(), PREVIEW_CHARS + 1);
        assert_eq!(preview(br#"{"contents":[{"parts":[{"text":"gem"}]}]}"#).as_deref(), Some("gem"));
        assert_eq!(preview(b"not json"), None);
    }
}
