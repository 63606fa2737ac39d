//! A time limit on one wait for I/O that makes no progress: the timer is made when a wait
//! starts and dropped by progress, so I/O that never waits never pays for one.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;

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
