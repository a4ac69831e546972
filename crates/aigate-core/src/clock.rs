//! Wall-clock time in Unix milliseconds, with an offset tests can move forward (cache expiry is
//! then tested without sleeping).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The gateway's clock.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicU64,
}

impl Clock {
    /// Now, Unix ms.
    pub fn now_ms(&self) -> u64 {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        u64::try_from(wall.as_millis()).unwrap_or(u64::MAX / 2) + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves the clock forward (tests).
    pub fn advance(&self, d: Duration) {
        self.offset_ms.fetch_add(u64::try_from(d.as_millis()).unwrap_or(0), Ordering::Relaxed);
    }
}
