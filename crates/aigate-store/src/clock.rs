//! Wall-clock time in Unix milliseconds, injected into every store that reads the time (cache
//! expiry, rate-limit windows, log retention cutoffs), so that tests move time instead of sleeping.
//!
//! A [`Clock`] is a cheap handle (an `Arc` inside): clones share one offset, so a test that
//! advances its clock moves every store built with a clone of it. The system clock reads
//! `SystemTime` plus that offset (0 unless a test moved it); a manual clock
//! ([`Clock::manual`]) stands still until moved. Reading never fails: a system time before 1970
//! reads as 0, and the result saturates instead of overflowing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds, with an offset tests can move. `Default` is the system
/// clock.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether the clock stands still (time is the offset alone) rather than following the system
    /// clock.
    manual: bool,
    /// Milliseconds added to the base time (the system time, or 0 for a manual clock).
    offset_ms: AtomicI64,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock standing still at `start_ms` (Unix ms) until [`Clock::advance`] or [`Clock::set_ms`]
    /// moves it: for tests that need exact times.
    pub fn manual(start_ms: u64) -> Clock {
        let offset_ms = AtomicI64::new(i64::try_from(start_ms).unwrap_or(i64::MAX));
        Clock { inner: Arc::new(Inner { manual: true, offset_ms }) }
    }

    /// Now, Unix ms.
    pub fn now_ms(&self) -> u64 {
        let now = self.base_ms().saturating_add(self.inner.offset_ms.load(Ordering::Relaxed));
        u64::try_from(now).unwrap_or(0)
    }

    /// Moves the clock (and every clone of it) forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let _ = self.inner.offset_ms.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| Some(o.saturating_add(ms)));
    }

    /// Moves the clock (and every clone of it) to `ms`, forward or back: for tests of a clock that
    /// steps backwards. A system clock keeps running from there.
    pub fn set_ms(&self, ms: u64) {
        let ms = i64::try_from(ms).unwrap_or(i64::MAX);
        self.inner.offset_ms.store(ms.saturating_sub(self.base_ms()), Ordering::Relaxed);
    }

    /// The time the offset is added to: the system time, or 0 for a manual clock.
    fn base_ms(&self) -> i64 {
        if self.inner.manual {
            return 0;
        }
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        i64::try_from(wall.as_millis()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_offset() {
        let clock = Clock::system();
        let twin = clock.clone();
        let before = clock.now_ms();
        assert!(before > 1_600_000_000_000, "{before}");
        twin.advance(Duration::from_secs(3600));
        assert!(clock.now_ms() >= before + 3_600_000);
        clock.set_ms(5);
        assert!(twin.now_ms() < 1_000, "{}", twin.now_ms());
    }

    #[test]
    fn a_manual_clock_stands_still_until_moved() {
        let clock = Clock::manual(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(500));
        assert_eq!(clock.now_ms(), 1_500);
        clock.set_ms(200);
        assert_eq!(clock.clone().now_ms(), 200);
        clock.set_ms(0);
        assert_eq!(clock.now_ms(), 0);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now_ms(), i64::MAX as u64, "saturates");
    }
}
