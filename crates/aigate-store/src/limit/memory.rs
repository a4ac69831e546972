//! In-process rate-limit store: a sharded map from key to counter, bounded by a number of keys.
//!
//! State per key: a fixed-window counter (window index + count, ~100 bytes with the key) or a ring of
//! [`LimitSpec::ring_len`] sub-window counters for sliding (at most 61 × 8 bytes plus the key). Each
//! operation locks one shard (a `std::sync::Mutex`, held for a few hundred nanoseconds, never across
//! an await), so the check-and-reserve is atomic and contention is spread over up to [`MAX_SHARDS`]
//! shards. The hot path allocates only when a key is first seen (the key itself, and the ring for
//! sliding); a [`Reservation`] shares the stored key.
//!
//! Bounds: at most `max_keys` keys, split evenly over the shards (each holds `max_keys / shards`, so
//! with uneven hashing a shard may start evicting slightly before the total is reached). When a shard
//! is full, keys whose counters no longer count anything
//! (fixed window over, every sliding sub-window out of the period) are dropped first: that loses no
//! information. If the shard is still full, the least recently used sixteenth of its keys is evicted:
//! their usage is forgotten and they start again from zero (fail open for keys idle the longest).
//! Refusing new keys instead would let one client spraying keys lock every new user out, and counting
//! nothing for new keys would let that client bypass its own limit; forgetting long-idle keys is the
//! smallest harm. Size `max_keys` above the number of keys active within one period; evictions are
//! counted ([`MemoryLimitStore::evictions`]).
//!
//! Time comes from an injected [`crate::Clock`] ([`MemoryLimitStore::with_clock`], the system clock
//! by default), so tests drive it by hand. An acquire costs a shard lock and a counter update; a
//! sliding one also sums the up to 61 counters of its ring (`benches/limits.rs` measures both). A
//! clock stepping backwards never panics: counts of windows "in the future" are ignored or reset.
//!
//! Failure behaviour: none; every operation is infallible and the async methods always return `Ok`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::limit::{decision, leave_at, oldest_sub_window};
use crate::{Clock, Decision, LimitSpec, RateLimitStore, Reservation, StoreError, Technique};

/// Default key bound of [`crate::build_limit_store`]'s memory store (about 65 MB of sliding state when
/// full: ~650 bytes per key with its ring).
pub const DEFAULT_LIMIT_MAX_KEYS: usize = 100_000;

/// Most shards of a store (fewer for small bounds, at least 256 keys per shard).
pub const MAX_SHARDS: usize = 64;

/// The counters of one key.
enum State {
    /// Usage of the fixed window with index `window` (`start / period`).
    Fixed { window: u64, count: u64 },
    /// Sliding sub-window counters: `counts[j % len]` holds sub-window `j` for the `len` indices up to
    /// and including `head` (the newest written).
    Sliding { head: u64, counts: Box<[u64]> },
}

/// One key's entry.
struct Entry {
    /// The key (shared with the map and with reservations).
    key: Arc<str>,
    /// The rule's period and technique the counters were made for; another rule restarts from zero.
    period: u64,
    technique: Technique,
    /// From this Unix ms on, the counters count nothing (safe to drop).
    expires_at: u64,
    /// Last acquire, Unix ms (for eviction).
    last_used: u64,
    state: State,
}

impl Entry {
    fn matches(&self, spec: &LimitSpec) -> bool {
        self.period == spec.period() && self.technique == spec.technique
    }
}

/// Usage of the sub-window `j` in a sliding ring whose newest index is `head`.
fn ring_get(counts: &[u64], head: u64, j: u64) -> u64 {
    let len = counts.len() as u64;
    if j <= head && head - j < len {
        counts[(j % len) as usize]
    } else {
        0
    }
}

/// Iterates the usage of sub-windows `from..=to` (oldest first), with their indices.
fn ring_iter(counts: &[u64], head: u64, from: u64, to: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    (from..=to).map(move |j| (j, ring_get(counts, head, j)))
}

/// What the current counters say at `now` for a cost: usage, reset and retry-after.
struct Eval {
    used: u64,
    reset_ms: u64,
    retry_after_ms: u64,
}

fn eval_fixed(window: u64, count: u64, spec: &LimitSpec, now: u64, cost: u64) -> Eval {
    let period = spec.period();
    let w = now / period;
    let used = if window == w { count } else { 0 };
    let reset_ms = (w + 1).saturating_mul(period) - now;
    Eval { used, reset_ms, retry_after_ms: if used.saturating_add(cost) <= spec.limit { 0 } else { reset_ms } }
}

fn eval_sliding(counts: &[u64], head: u64, spec: &LimitSpec, now: u64, cost: u64) -> Eval {
    let (period, sub) = (spec.period(), spec.sub_window_ms());
    let (oldest, cur) = (oldest_sub_window(now, period, sub), now / sub);
    let len = counts.len() as u64;
    if head >= cur + len {
        // Written more than a period "in the future" (the clock stepped back): void.
        return Eval { used: 0, reset_ms: 0, retry_after_ms: 0 };
    }
    // Sub-windows after `cur` hold usage from before a small backward clock step: still counted.
    let (from, to) = (oldest.max((head + 1).saturating_sub(len)), cur.max(head));
    // The usage and the oldest non-empty sub-window (when the usage starts leaving), in one pass
    // over the ring from `from` to `head` (later sub-windows hold nothing yet): this runs for every
    // rule of every request, so it steps an index rather than taking a remainder per slot.
    let (mut used, mut first) = (0u64, None);
    if from <= head {
        let mut i = (from % len) as usize;
        for j in from..=head {
            let c = counts[i];
            if c > 0 {
                used = used.saturating_add(c);
                first.get_or_insert(j);
            }
            i = if i + 1 == counts.len() { 0 } else { i + 1 };
        }
    }
    let reset_ms = first.map_or(0, |j| leave_at(j, period, sub) - now);
    let mut retry_after_ms = 0;
    if used.saturating_add(cost) > spec.limit {
        // Walk oldest first until enough leaves the period for `cost` to fit (or everything has).
        let mut left = used;
        for (j, c) in ring_iter(counts, head, from, to) {
            if c == 0 {
                continue;
            }
            left -= c;
            retry_after_ms = leave_at(j, period, sub) - now;
            if left.saturating_add(cost) <= spec.limit {
                break;
            }
        }
    }
    Eval { used, reset_ms, retry_after_ms }
}

fn eval(entry: Option<&Entry>, spec: &LimitSpec, now: u64, cost: u64) -> Eval {
    let mut ev = match (entry, spec.technique) {
        (Some(e), _) if e.matches(spec) => match &e.state {
            State::Fixed { window, count } => eval_fixed(*window, *count, spec, now, cost),
            State::Sliding { head, counts } => eval_sliding(counts, *head, spec, now, cost),
        },
        (_, Technique::Fixed) => eval_fixed(u64::MAX, 0, spec, now, cost),
        (_, Technique::Sliding) => Eval { used: 0, reset_ms: 0, retry_after_ms: 0 },
    };
    if cost > spec.limit {
        // Never fits: a full period is the honest answer (a client may not retry at once).
        ev.retry_after_ms = spec.period();
    }
    ev
}

/// Adds `cost` at `now` to an entry made for `spec` (its counters already evaluated at `now`).
/// Returns the counter index it went to.
fn add(entry: &mut Entry, spec: &LimitSpec, now: u64, cost: u64) -> u64 {
    let period = spec.period();
    match &mut entry.state {
        State::Fixed { window, count } => {
            let w = now / period;
            if *window != w {
                *window = w;
                *count = 0;
            }
            *count = count.saturating_add(cost);
            entry.expires_at = (w + 1).saturating_mul(period);
            w
        }
        State::Sliding { head, counts } => {
            let sub = spec.sub_window_ms();
            let cur = now / sub;
            let len = counts.len() as u64;
            if cur > *head {
                if cur - *head >= len {
                    counts.fill(0);
                } else {
                    for j in *head + 1..=cur {
                        counts[(j % len) as usize] = 0;
                    }
                }
                *head = cur;
            } else if *head - cur >= len {
                // The clock stepped back more than a period: start over.
                counts.fill(0);
                *head = cur;
            }
            let c = &mut counts[(cur % len) as usize];
            *c = c.saturating_add(cost);
            entry.expires_at = entry.expires_at.max(leave_at(cur, period, sub));
            cur
        }
    }
}

fn new_state(spec: &LimitSpec) -> State {
    match spec.technique {
        Technique::Fixed => State::Fixed { window: u64::MAX, count: 0 },
        Technique::Sliding => State::Sliding { head: 0, counts: vec![0; spec.ring_len() as usize].into_boxed_slice() },
    }
}

/// One shard: key -> entry.
type Shard = Mutex<HashMap<Arc<str>, Entry>>;

/// An in-process rate-limit store, bounded by a number of keys (see the module docs).
pub struct MemoryLimitStore {
    shards: Box<[Shard]>,
    hasher: RandomState,
    shard_cap: usize,
    clock: Clock,
    evictions: AtomicU64,
}

impl std::fmt::Debug for MemoryLimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimitStore")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys())
            .field("evictions", &self.evictions())
            .finish()
    }
}

impl MemoryLimitStore {
    /// A store holding at most `max_keys` keys (at least 1), on the system clock.
    pub fn new(max_keys: usize) -> MemoryLimitStore {
        let max_keys = max_keys.max(1);
        let shards = (max_keys / 256).clamp(1, MAX_SHARDS).next_power_of_two().min(MAX_SHARDS);
        // Rounds down: the total never exceeds max_keys (it may fall short by less than `shards`).
        let shard_cap = (max_keys / shards).max(1);
        MemoryLimitStore {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            shard_cap,
            clock: Clock::system(),
            evictions: AtomicU64::new(0),
        }
    }

    /// The same store on `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> MemoryLimitStore {
        self.clock = clock;
        self
    }

    /// The key bound actually applied (`max_keys` rounded down to a multiple of the shard count).
    pub fn max_keys(&self) -> usize {
        self.shard_cap * self.shards.len()
    }

    /// Keys held, including ones whose counters no longer count.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys whose live usage was forgotten because the store was full, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Drops every key whose counters count nothing any more; returns how many. Optional: a full
    /// shard does this by itself before evicting.
    pub fn purge_expired(&self) -> usize {
        let now = self.clock.now_ms();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, e| e.expires_at > now);
            removed += before - map.len();
        }
        removed
    }

    fn shard(&self, key: &str) -> &Shard {
        let i = self.hasher.hash_one(key) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    /// [`RateLimitStore::acquire`] without the future.
    pub fn acquire_sync(&self, key: &str, spec: &LimitSpec, cost: u64) -> Decision {
        let now = self.clock.now_ms();
        let mut map = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        let ev = eval(map.get(key), spec, now, cost);
        if ev.used.saturating_add(cost) > spec.limit {
            // A key being refused is in use: keep it from looking idle to eviction.
            if let Some(e) = map.get_mut(key) {
                e.last_used = now;
            }
            return decision(spec.limit, false, ev.used, ev.reset_ms, ev.retry_after_ms);
        }
        if !map.contains_key(key) {
            self.make_room(&mut map, now);
            let key: Arc<str> = Arc::from(key);
            let entry = Entry {
                key: key.clone(),
                period: spec.period(),
                technique: spec.technique,
                expires_at: 0,
                last_used: now,
                state: new_state(spec),
            };
            map.insert(key, entry);
        }
        let Some(entry) = map.get_mut(key) else {
            // Unreachable: inserted above under the same lock.
            return decision(spec.limit, false, ev.used, ev.reset_ms, ev.retry_after_ms);
        };
        if !entry.matches(spec) {
            entry.period = spec.period();
            entry.technique = spec.technique;
            entry.expires_at = 0;
            entry.state = new_state(spec);
        }
        entry.last_used = now;
        let slot = add(entry, spec, now, cost);
        let after = eval(Some(entry), spec, now, 0);
        let mut d = decision(spec.limit, true, after.used, after.reset_ms, 0);
        d.reservation = Some(Reservation { key: entry.key.clone(), spec: *spec, slot, amount: cost });
        d
    }

    /// [`RateLimitStore::settle`] without the future.
    pub fn settle_sync(&self, reservation: &Reservation, actual: u64) {
        let now = self.clock.now_ms();
        let spec = &reservation.spec;
        let mut map = self.shard(&reservation.key).lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = map.get_mut(&*reservation.key) else { return };
        if !entry.matches(spec) {
            return;
        }
        let (period, j) = (spec.period(), reservation.slot);
        let counter = match &mut entry.state {
            State::Fixed { window, count } => (*window == j && now / period == j).then_some(count),
            State::Sliding { head, counts } => {
                let sub = spec.sub_window_ms();
                let len = counts.len() as u64;
                let live = j >= oldest_sub_window(now, period, sub) && j <= *head && *head - j < len;
                live.then(|| &mut counts[(j % len) as usize])
            }
        };
        if let Some(c) = counter {
            *c = c.saturating_sub(reservation.amount).saturating_add(actual);
        }
    }

    /// [`RateLimitStore::peek`] without the future.
    pub fn peek_sync(&self, key: &str, spec: &LimitSpec) -> Decision {
        let now = self.clock.now_ms();
        let map = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        let ev = eval(map.get(key), spec, now, 1);
        decision(spec.limit, ev.used.saturating_add(1) <= spec.limit, ev.used, ev.reset_ms, ev.retry_after_ms)
    }

    /// Frees a place in a full shard: expired keys first, else the least recently used sixteenth.
    fn make_room(&self, map: &mut HashMap<Arc<str>, Entry>, now: u64) {
        if map.len() < self.shard_cap {
            return;
        }
        map.retain(|_, e| e.expires_at > now);
        if map.len() < self.shard_cap {
            return;
        }
        let batch = (self.shard_cap / 16).max(1);
        let mut by_age: Vec<(u64, Arc<str>)> = map.values().map(|e| (e.last_used, e.key.clone())).collect();
        by_age.select_nth_unstable_by_key(batch - 1, |(t, _)| *t);
        for (_, k) in &by_age[..batch] {
            map.remove(k);
        }
        self.evictions.fetch_add(batch as u64, Ordering::Relaxed);
        tracing::debug!(evicted = batch, "rate-limit memory store full: forgot the least recently used keys");
    }
}

#[async_trait::async_trait]
impl RateLimitStore for MemoryLimitStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, key: &str, spec: &LimitSpec, cost: u64) -> Result<Decision, StoreError> {
        Ok(self.acquire_sync(key, spec, cost))
    }

    async fn settle(&self, reservation: &Reservation, actual: u64) -> Result<(), StoreError> {
        self.settle_sync(reservation, actual);
        Ok(())
    }

    async fn peek(&self, key: &str, spec: &LimitSpec) -> Result<Decision, StoreError> {
        Ok(self.peek_sync(key, spec))
    }
}
