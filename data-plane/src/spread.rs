//! Spreads client connections evenly over the proxy's worker threads.
//!
//! Every worker accepts from the same listening socket, and the one that wakes first takes
//! every connection waiting in the backlog: a burst of new connections (a client pool starting,
//! a load generator) can land on one thread while the others idle. So a worker that serves more
//! than [`SLACK`] connections over the least busy one stops accepting until that is no longer
//! so, and the others, woken by the same new connections, take them. Nothing moves between
//! threads, so a connection costs no more than before, however short it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering, fence};

use prometheus::IntGauge;
use tokio::sync::Notify;

/// A worker accepts while it serves at most this many more connections than the least busy.
pub const SLACK: usize = 1;

/// The open connections of each worker.
pub struct Spread {
    /// Also exported, as `lb_worker_connections`.
    loads: Box<[IntGauge]>,
    /// Workers waiting for the loads to change.
    waiting: AtomicUsize,
    changed: Notify,
}

/// Counts a connection against its worker while it is open.
pub struct Load {
    spread: Arc<Spread>,
    worker: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.spread.loads[self.worker].dec();
        self.spread.wake();
    }
}

impl Spread {
    /// One worker per gauge, which counts its open connections.
    pub fn new(loads: Vec<IntGauge>) -> Arc<Spread> {
        assert!(!loads.is_empty(), "at least one worker");
        Arc::new(Spread {
            loads: loads.into_boxed_slice(),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    /// Whether `worker` should accept now: it serves no more than [`SLACK`] connections over
    /// the least busy worker.
    pub fn may_accept(&self, worker: usize) -> bool {
        let fewest = (0..self.loads.len()).map(|w| self.load(w)).min();
        self.load(worker) <= fewest.unwrap_or(0) + SLACK
    }

    /// Returns once `worker` may accept.
    pub async fn turn(&self, worker: usize) {
        while !self.may_accept(worker) {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check again, so a change in between is not missed.
            changed.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            // Pairs with the fence in `wake`: either this check sees the new load, or that
            // side sees this worker waiting.
            fence(Ordering::SeqCst);
            if !self.may_accept(worker) {
                changed.await;
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Counts a connection against `worker` until the returned guard drops.
    pub fn take(self: &Arc<Self>, worker: usize) -> Load {
        self.loads[worker].inc();
        self.wake();
        Load {
            spread: Arc::clone(self),
            worker,
        }
    }

    /// Connections `worker` serves now.
    pub fn load(&self, worker: usize) -> usize {
        usize::try_from(self.loads[worker].get()).unwrap_or(0)
    }

    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(workers: usize) -> Arc<Spread> {
        Spread::new(
            (0..workers)
                .map(|_| IntGauge::new("connections", "open").unwrap())
                .collect(),
        )
    }

    #[test]
    fn a_worker_ahead_of_the_least_busy_by_more_than_the_slack_waits() {
        let s = spread(2);
        let _a = s.take(0);
        let _b = s.take(1);
        assert!(s.may_accept(0) && s.may_accept(1));
        let _c = s.take(0);
        assert!(s.may_accept(0), "one more is within the slack");
        let _d = s.take(0);
        assert!(!s.may_accept(0), "two more is not");
        assert!(s.may_accept(1));
    }

    #[test]
    fn closed_connections_leave_the_count() {
        let s = spread(3);
        let held: Vec<Load> = (0..9).map(|i| s.take(i % 3)).collect();
        assert_eq!((0..3).map(|w| s.load(w)).sum::<usize>(), 9);
        drop(held);
        assert_eq!((0..3).map(|w| s.load(w)).collect::<Vec<_>>(), [0, 0, 0]);
    }

    #[test]
    fn one_worker_always_accepts() {
        let s = spread(1);
        let _held: Vec<Load> = (0..10).map(|_| s.take(0)).collect();
        assert!(s.may_accept(0));
    }

    #[tokio::test]
    async fn a_waiting_worker_resumes_when_another_takes_a_connection() {
        let s = spread(2);
        let _a = s.take(0);
        let _b = s.take(0);
        let waiter = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.turn(0).await }
        });
        // The waiter is parked until worker 1 catches up.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let _c = s.take(1);
        waiter.await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_worker_resumes_when_its_own_connection_closes() {
        let s = spread(2);
        let a = s.take(0);
        let _b = s.take(0);
        let waiter = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.turn(0).await }
        });
        tokio::task::yield_now().await;
        drop(a);
        waiter.await.unwrap();
    }
}
