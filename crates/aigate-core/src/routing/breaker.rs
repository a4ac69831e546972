//! The circuit breaker (`[gateways.NAME.breaker]`): a provider that failed `failures` times in a
//! row within `window` (a 5xx answer, unreachable, or no answer in time, after retries) is
//! skipped for `cool_off`: a chain goes on to its next step, a request with no other step is
//! answered 503 at once. After the cool-off one request is let through as a probe; its success
//! closes the breaker, its failure opens it again. State is per gateway and provider, in this
//! process (a replica learns on its own that an upstream is down).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// `[gateways.NAME.breaker]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures in a row that open it.
    pub failures: u32,
    /// The window they must fall in.
    pub window: Duration,
    /// How long it stays open.
    pub cool_off: Duration,
}

impl BreakerSettings {
    /// Validates the file form; `key` names it in errors.
    pub fn validate(c: &BreakerConfig, key: &str) -> Result<BreakerSettings, String> {
        let s = BreakerSettings {
            failures: c.failures.unwrap_or(5),
            window: c.window.map_or(Duration::from_secs(60), |d| d.0),
            cool_off: c.cool_off.map_or(Duration::from_secs(30), |d| d.0),
        };
        if !(1..=1000).contains(&s.failures) {
            return Err(format!("{key}.failures: {} is not between 1 and 1000", s.failures));
        }
        if s.window.is_zero() || s.cool_off.is_zero() {
            return Err(format!("{key}: window and cool_off must be greater than zero"));
        }
        Ok(s)
    }
}

/// A breaker's state, as `/metrics` gives it (`aigate_breaker_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests pass.
    Closed,
    /// Requests are refused until the cool-off ends.
    Open,
    /// One probe request is in flight.
    HalfOpen,
}

impl State {
    /// 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// Whether a request may go to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes.
    Pass,
    /// Yes, as the probe of a half-open breaker.
    Probe,
    /// No: open for this much longer.
    Refuse(Duration),
}

#[derive(Debug, Clone, Copy)]
enum Circuit {
    Closed { failures: u32, first: Instant },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// Every breaker of the process, by gateway and provider.
#[derive(Debug, Default)]
pub struct Breakers {
    // A provider's entry is made at its first failure; a request to a healthy provider only
    // looks (one lock, no allocation).
    map: Mutex<HashMap<String, HashMap<String, Circuit>>>,
}

impl Breakers {
    /// Asks to send a request to `provider` through `gateway`; the new state when it changed.
    pub fn admit(&self, gateway: &str, provider: &str, s: &BreakerSettings, now: Instant) -> (Admit, Option<State>) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(c) = map.get_mut(gateway).and_then(|m| m.get_mut(provider)) else {
            return (Admit::Pass, None);
        };
        match *c {
            Circuit::Closed { .. } => (Admit::Pass, None),
            Circuit::Open { until } if now < until => (Admit::Refuse(until - now), None),
            Circuit::Open { .. } => {
                *c = Circuit::HalfOpen { since: now };
                (Admit::Probe, Some(State::HalfOpen))
            }
            // A probe that never reported (its client went away) is replaced after a cool-off.
            Circuit::HalfOpen { since } if now.duration_since(since) >= s.cool_off => {
                *c = Circuit::HalfOpen { since: now };
                (Admit::Probe, None)
            }
            Circuit::HalfOpen { since } => (Admit::Refuse(s.cool_off.saturating_sub(now.duration_since(since))), None),
        }
    }

    /// Reports how a request sent to `provider` ended; the new state when it changed.
    pub fn report(&self, gateway: &str, provider: &str, s: &BreakerSettings, ok: bool, now: Instant) -> Option<State> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            let c = map.get_mut(gateway)?.get_mut(provider)?;
            let was_closed = matches!(c, Circuit::Closed { .. });
            *c = Circuit::Closed { failures: 0, first: now };
            return (!was_closed).then_some(State::Closed);
        }
        let c = map
            .entry(gateway.to_owned())
            .or_default()
            .entry(provider.to_owned())
            .or_insert(Circuit::Closed { failures: 0, first: now });
        match *c {
            Circuit::Closed { failures, first } => {
                let (failures, first) = if failures == 0 || now.duration_since(first) > s.window {
                    (1, now)
                } else {
                    (failures + 1, first)
                };
                if failures >= s.failures {
                    *c = Circuit::Open { until: now + s.cool_off };
                    Some(State::Open)
                } else {
                    *c = Circuit::Closed { failures, first };
                    None
                }
            }
            Circuit::HalfOpen { .. } => {
                *c = Circuit::Open { until: now + s.cool_off };
                Some(State::Open)
            }
            Circuit::Open { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_probes_and_closes() {
        let s = BreakerSettings { failures: 3, window: Duration::from_secs(10), cool_off: Duration::from_secs(5) };
        let b = Breakers::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(b.admit("g", "p", &s, at(0)).0, Admit::Pass);
        assert_eq!(b.report("g", "p", &s, false, at(0)), None);
        assert_eq!(b.report("g", "p", &s, false, at(100)), None);
        // Failures spread wider than the window start over.
        assert_eq!(b.report("g", "p", &s, false, at(20_000)), None);
        assert_eq!(b.report("g", "p", &s, false, at(20_100)), None);
        assert_eq!(b.report("g", "p", &s, false, at(20_200)), Some(State::Open));
        assert_eq!(b.admit("g", "p", &s, at(21_000)).0, Admit::Refuse(Duration::from_millis(4200)));
        // Other gateways and providers are not affected.
        assert_eq!(b.admit("g2", "p", &s, at(21_000)).0, Admit::Pass);
        assert_eq!(b.admit("g", "q", &s, at(21_000)).0, Admit::Pass);
        // Cool-off over: one probe, others refused while it runs.
        assert_eq!(b.admit("g", "p", &s, at(25_200)), (Admit::Probe, Some(State::HalfOpen)));
        assert!(matches!(b.admit("g", "p", &s, at(25_300)).0, Admit::Refuse(_)));
        // The probe fails: open again; the next probe succeeds: closed.
        assert_eq!(b.report("g", "p", &s, false, at(25_400)), Some(State::Open));
        assert_eq!(b.admit("g", "p", &s, at(30_400)).0, Admit::Probe);
        assert_eq!(b.report("g", "p", &s, true, at(30_500)), Some(State::Closed));
        assert_eq!(b.admit("g", "p", &s, at(30_600)).0, Admit::Pass);
    }
}
