//! The rate-limit store: one trait, [`RateLimitStore`], the rule it enforces ([`LimitSpec`]) and what
//! a check answers ([`Decision`], [`Reservation`]).
//!
//! A rule allows at most `limit` units per `period`, counted one of two ways ([`Technique`]), as in
//! Cloudflare's AI Gateway:
//!
//! - **fixed**: windows aligned to the Unix epoch (a 10 min period gives 12:00-12:10, 12:10-12:20, …);
//!   the counter restarts at each boundary. 10 requests at 12:09 and 10 at 12:11 all pass a limit of
//!   10 per 10 min.
//! - **sliding**: never more than `limit` in any `period` ending now, so the second ten above fail.
//!   Exact tracking of every request would need unbounded memory; instead the period is split into
//!   at most [`MAX_SUB_WINDOWS`] epoch-aligned sub-windows of [`LimitSpec::sub_window_ms`] ms each,
//!   and a sub-window counts for as long as *any* part of it overlaps `(now - period, now]`. That is
//!   conservative: the store never admits more than `limit` in any period, and it may refuse for at
//!   most one sub-window (`period / 60`) longer than an exact log would (units leave the count up to
//!   one sub-window late).
//!
//! Units are requests (cost 1) or tokens / cost (weights above 1). A request *reserves* an estimate
//! with [`RateLimitStore::acquire`] and, when its response ends, [`RateLimitStore::settle`]s the
//! reservation to the actual amount. The check-and-reserve is atomic, so concurrent requests can
//! overshoot the limit only by what settles above its estimate (what is in flight), never by a race.
//!
//! Implementations: [`crate::MemoryLimitStore`] (per process, the default) and
//! [`crate::RedisLimitStore`] (shared by replicas: each operation is one Lua script running on Redis's
//! own clock). Errors come back as [`StoreError`]; the caller decides whether a failing limiter
//! allows or denies.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::StoreError;

pub mod memory;
pub mod redis;

/// Most sub-windows a sliding period is split into (fewer when the period is shorter than this many
/// milliseconds).
pub const MAX_SUB_WINDOWS: u64 = 60;

/// How usage is counted over a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Technique {
    /// One counter per epoch-aligned window of `period`; restarts at each boundary.
    #[default]
    Fixed,
    /// At most `limit` in any `period` ending now (sub-window approximation, conservative).
    Sliding,
}

impl Technique {
    /// `fixed` or `sliding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Technique::Fixed => "fixed",
            Technique::Sliding => "sliding",
        }
    }
}

impl fmt::Display for Technique {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Technique {
    type Err = String;

    fn from_str(s: &str) -> Result<Technique, String> {
        match s.trim() {
            s if s.eq_ignore_ascii_case("fixed") => Ok(Technique::Fixed),
            s if s.eq_ignore_ascii_case("sliding") => Ok(Technique::Sliding),
            other => Err(format!("unknown rate-limit technique {other:?}: expected \"fixed\" or \"sliding\"")),
        }
    }
}

/// A rate-limit rule: at most `limit` units per `period_ms`, counted by `technique`.
///
/// A `period_ms` of 0 is treated as 1 ms by the stores (use [`LimitSpec::new`] to reject it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    /// Units allowed per period (requests, tokens or cost units). 0 denies every positive cost.
    pub limit: u64,
    /// The period in milliseconds.
    pub period_ms: u64,
    /// How the period is counted.
    pub technique: Technique,
}

impl LimitSpec {
    /// A validated rule: `period_ms` must be at least 1.
    pub fn new(limit: u64, period_ms: u64, technique: Technique) -> Result<LimitSpec, String> {
        if period_ms == 0 {
            return Err("rate-limit period must be at least 1 ms".into());
        }
        Ok(LimitSpec { limit, period_ms, technique })
    }

    /// The period in ms, at least 1.
    pub fn period(&self) -> u64 {
        self.period_ms.max(1)
    }

    /// Number of sub-windows of a sliding period: [`MAX_SUB_WINDOWS`], or the period in ms if smaller.
    pub fn sub_windows(&self) -> u64 {
        self.period().min(MAX_SUB_WINDOWS)
    }

    /// Length of one sliding sub-window in ms: `ceil(period / sub_windows)`.
    pub fn sub_window_ms(&self) -> u64 {
        self.period().div_ceil(self.sub_windows())
    }

    /// How many consecutive sub-windows can overlap `(now - period, now]` at once: `sub_windows + 1`
    /// (the oldest one may be only partly inside). The ring size of a sliding counter.
    pub fn ring_len(&self) -> u64 {
        self.sub_windows() + 1
    }
}

/// The answer of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the cost was admitted (and reserved).
    pub allowed: bool,
    /// The rule's limit.
    pub limit: u64,
    /// Usage counted in the current window after this call (including this cost if allowed). May
    /// exceed `limit` after settlements above their reservations.
    pub used: u64,
    /// `limit - used`, at least 0.
    pub remaining: u64,
    /// Ms until the window frees capacity: for fixed, until the window ends; for sliding, until the
    /// oldest sub-window still counted (with usage) stops counting. 0 when nothing is counted.
    pub reset_ms: u64,
    /// 0 if allowed; otherwise the best estimate of the ms until `cost` would fit, assuming no other
    /// traffic. A cost above `limit` never fits: then it is `period_ms`.
    pub retry_after_ms: u64,
    /// The reservation to settle when the actual amount is known; `Some` exactly when allowed by
    /// [`RateLimitStore::acquire`].
    pub reservation: Option<Reservation>,
}

/// What [`RateLimitStore::acquire`] reserved: settle it with [`RateLimitStore::settle`] once the
/// actual amount is known. Cheap to clone; the same reservation works with any store instance sharing
/// the same data (for Redis, any replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub(crate) key: Arc<str>,
    pub(crate) spec: LimitSpec,
    pub(crate) slot: u64,
    pub(crate) amount: u64,
}

impl Reservation {
    /// The limiter key it was taken under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The rule it was taken under.
    pub fn spec(&self) -> &LimitSpec {
        &self.spec
    }

    /// The counter it was added to: the fixed window index (`start / period`) or the sliding
    /// sub-window index (`start / sub_window_ms`), both counted from the Unix epoch.
    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// The amount reserved.
    pub fn amount(&self) -> u64 {
        self.amount
    }
}

/// A rate-limit backend: atomic check-and-reserve, settlement and inspection of per-key usage.
///
/// Keys are opaque strings built by the caller (e.g. `gw:prod:rule:per-user:user=alice`); a key used
/// with a different period or technique than before starts from zero. Implementations:
/// [`crate::MemoryLimitStore`] and [`crate::RedisLimitStore`].
#[async_trait::async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Atomically: if `used + cost <= limit`, adds `cost` and allows (with a reservation); otherwise
    /// denies and changes nothing.
    async fn acquire(&self, key: &str, spec: &LimitSpec, cost: u64) -> Result<Decision, StoreError>;

    /// Settles a reservation to the `actual` amount (smaller or larger than reserved; the count may
    /// then exceed the limit: the accepted overshoot of what was in flight). A no-op once the counter
    /// it went to no longer counts (fixed window over, sliding sub-window out of the period).
    async fn settle(&self, reservation: &Reservation, actual: u64) -> Result<(), StoreError>;

    /// Current usage without changing it: the decision a cost of 1 would get, without a reservation.
    async fn peek(&self, key: &str, spec: &LimitSpec) -> Result<Decision, StoreError>;

    /// Check-and-reserve of every rule of one request, all or nothing: the decisions in order, up to
    /// and including the first refusal if there is one, in which case nothing stays reserved.
    ///
    /// The default runs [`RateLimitStore::acquire`] rule by rule and gives earlier reservations back
    /// on a refusal; a store behind a network overrides it with one round trip for all of them.
    async fn acquire_all(&self, checks: &[Check<'_>]) -> Result<Vec<Decision>, StoreError> {
        let mut out: Vec<Decision> = Vec::with_capacity(checks.len());
        for c in checks {
            let d = match self.acquire(c.key, &c.spec, c.cost).await {
                Ok(d) => d,
                Err(e) => {
                    give_back(self, &mut out).await;
                    return Err(e);
                }
            };
            let refused = !d.allowed;
            out.push(d);
            if refused {
                give_back(self, &mut out).await;
                break;
            }
        }
        Ok(out)
    }

    /// Settles several reservations (see [`RateLimitStore::settle`]); stops at the first error. The
    /// default settles one by one; a store behind a network overrides it with one round trip.
    async fn settle_all(&self, settlements: &[(Reservation, u64)]) -> Result<(), StoreError> {
        for (r, actual) in settlements {
            self.settle(r, *actual).await?;
        }
        Ok(())
    }
}

/// Gives back the reservations of `decisions` (a later check of the same request was refused or
/// failed). Best effort: a failing store keeps them until their window ends.
async fn give_back<S: RateLimitStore + ?Sized>(store: &S, decisions: &mut [Decision]) {
    for r in decisions.iter_mut().filter_map(|d| d.reservation.take()) {
        let _ = store.settle(&r, 0).await;
    }
}

/// One rule's check of [`RateLimitStore::acquire_all`].
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    /// The limiter key.
    pub key: &'a str,
    /// The rule.
    pub spec: LimitSpec,
    /// The cost to reserve.
    pub cost: u64,
}

// ---------------------------------------------------------------------------------------------
// Window arithmetic shared by the implementations (the Redis scripts mirror it in Lua).
// ---------------------------------------------------------------------------------------------

/// Index of the oldest sliding sub-window that still overlaps `(now - period, now]`.
///
/// Sub-window `j` covers the ms `[j * sub, (j + 1) * sub)`; it overlaps while its last ms is after
/// `now - period`, i.e. while `now < leave_at(j)`.
pub(crate) fn oldest_sub_window(now: u64, period: u64, sub: u64) -> u64 {
    match (now + 1).checked_sub(period) {
        Some(d) => d / sub,
        None => 0,
    }
}

/// The first ms at which sliding sub-window `j` no longer counts: `(j + 1) * sub + period - 1`.
pub(crate) fn leave_at(j: u64, period: u64, sub: u64) -> u64 {
    (j + 1).saturating_mul(sub).saturating_add(period - 1)
}

/// Builds a decision from the usage after the call.
pub(crate) fn decision(limit: u64, allowed: bool, used: u64, reset_ms: u64, retry_after_ms: u64) -> Decision {
    Decision {
        allowed,
        limit,
        used,
        remaining: limit.saturating_sub(used),
        reset_ms,
        retry_after_ms: if allowed { 0 } else { retry_after_ms },
        reservation: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn technique_parse_and_serde() {
        assert_eq!("fixed".parse::<Technique>(), Ok(Technique::Fixed));
        assert_eq!(" Sliding ".parse::<Technique>(), Ok(Technique::Sliding));
        assert!("leaky".parse::<Technique>().unwrap_err().contains("leaky"));
        assert_eq!(serde_json::to_string(&Technique::Sliding).unwrap(), "\"sliding\"");
        assert_eq!(serde_json::from_str::<Technique>("\"fixed\"").unwrap(), Technique::Fixed);
        assert!(serde_json::from_str::<Technique>("\"Fixed\"").is_err());
        assert_eq!(Technique::Sliding.to_string(), "sliding");
    }

    #[test]
    fn sub_windows() {
        let s = LimitSpec::new(10, 600_000, Technique::Sliding).unwrap();
        assert_eq!((s.sub_windows(), s.sub_window_ms(), s.ring_len()), (60, 10_000, 61));
        let s = LimitSpec::new(10, 7, Technique::Sliding).unwrap();
        assert_eq!((s.sub_windows(), s.sub_window_ms()), (7, 1));
        let s = LimitSpec::new(10, 1_001, Technique::Sliding).unwrap();
        assert_eq!((s.sub_windows(), s.sub_window_ms()), (60, 17));
        assert!(LimitSpec::new(1, 0, Technique::Fixed).is_err());
        assert_eq!(LimitSpec { limit: 1, period_ms: 0, technique: Technique::Fixed }.period(), 1);
    }

    #[test]
    fn overlap_arithmetic() {
        // period 10, sub 2: at now = 20 the window is (10, 20], ms 11..=20: sub-windows 5 (10-11) to 10.
        assert_eq!(oldest_sub_window(20, 10, 2), 5);
        assert_eq!(leave_at(5, 10, 2), 21);
        assert_eq!(oldest_sub_window(21, 10, 2), 6);
        assert_eq!(oldest_sub_window(3, 10, 2), 0);
        // Never more sub-windows at once than the ring holds.
        for period in [1u64, 2, 7, 59, 60, 61, 119, 1_001, 600_000] {
            let s = LimitSpec { limit: 1, period_ms: period, technique: Technique::Sliding };
            for now in [0u64, 1, 5, 999, 1_000_003, 1_700_000_000_123] {
                let span = now / s.sub_window_ms() - oldest_sub_window(now, period, s.sub_window_ms()) + 1;
                assert!(span <= s.ring_len(), "period {period} now {now} span {span}");
            }
        }
    }
}
