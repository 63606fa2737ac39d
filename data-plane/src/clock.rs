//! Time, in one place: a process clock in milliseconds for instants kept in atomics, the wall
//! clock in Unix milliseconds, and [`Stall`], a time limit on one wait for I/O that makes no
//! progress (the timer is made when a wait starts and dropped by progress, so I/O that never
//! waits never pays for one).

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::Context;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, Sleep};

/// Milliseconds since a process-wide origin, for instants kept in atomics.
pub fn millis(t: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| Instant::now() - Duration::from_secs(1));
    u64::try_from(t.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch, as the control plane and Redis count them.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A time limit on one wait for I/O that makes no progress.
#[derive(Default)]
pub struct Stall {
    /// Runs while the current wait lasts.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    /// The I/O moved: the next wait is timed afresh.
    pub fn progress(&mut self) {
        self.timer = None;
    }

    /// The I/O is waiting: whether it has now waited `limit` since the wait started. Until
    /// then, the task is woken when the limit passes.
    pub fn expired(&mut self, cx: &mut Context<'_>, limit: Duration) -> bool {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.timer = None;
        true
    }
}
