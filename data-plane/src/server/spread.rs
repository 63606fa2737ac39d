//! Spreads client connections evenly over the proxy's worker threads.
//!
//! Every worker accepts from the same listening socket, and the one that wakes first takes
//! every connection waiting in the backlog: a burst of new connections (a client pool starting,
//! a load generator) can land on one thread while the others idle. So a worker that serves more
//! than [`SLACK`] connections over the least busy one stops accepting until that is no longer
//! so, and the others, woken by the same new connections, take them. Nothing moves between
//! threads, so a connection costs no more than before, however short it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};

use prometheus::IntGauge;
use tokio::sync::Notify;

/// A worker accepts while it serves at most this many more connections than the least busy.
pub const SLACK: usize = 1;

/// The open connections of each worker.
pub struct Spread {
    /// All workers' (`lb_client_connections`).
    total: IntGauge,
    /// Each worker's (`lb_worker_connections`).
    loads: Box<[IntGauge]>,
    /// Workers accepting now; only they count, so a worker that failed to start or has stopped
    /// holds nobody back.
    serving: Box<[AtomicBool]>,
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
        self.spread.total.dec();
        self.spread.loads[self.worker].dec();
        self.spread.wake();
    }
}

/// Marks a worker as accepting while it lives.
pub struct Serving {
    spread: Arc<Spread>,
    worker: usize,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.spread.serving[self.worker].store(false, Ordering::SeqCst);
        self.spread.wake();
    }
}

impl Spread {
    /// One worker per gauge in `loads`, which counts its open connections; `total` counts
    /// them all.
    pub fn new(total: IntGauge, loads: Vec<IntGauge>) -> Arc<Spread> {
        assert!(!loads.is_empty(), "at least one worker");
        Arc::new(Spread {
            total,
            serving: loads.iter().map(|_| AtomicBool::new(false)).collect(),
            loads: loads.into_boxed_slice(),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    /// `worker` accepts connections until the returned guard drops.
    pub fn serve(self: &Arc<Self>, worker: usize) -> Serving {
        self.serving[worker].store(true, Ordering::SeqCst);
        self.wake();
        Serving {
            spread: Arc::clone(self),
            worker,
        }
    }

    /// Whether `worker` should accept now: it serves no more than [`SLACK`] connections over
    /// the least busy worker that is accepting.
    pub fn may_accept(&self, worker: usize) -> bool {
        let fewest = (0..self.loads.len())
            .filter(|&w| w == worker || self.serving[w].load(Ordering::SeqCst))
            .map(|w| self.load(w))
            .min();
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
        self.total.inc();
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

    fn gauge() -> IntGauge {
        IntGauge::new("connections", "open").unwrap()
    }

    /// `workers` workers, all accepting while the guards live.
    fn spread(workers: usize) -> (Arc<Spread>, Vec<Serving>) {
        let s = Spread::new(gauge(), (0..workers).map(|_| gauge()).collect());
        let serving = (0..workers).map(|w| s.serve(w)).collect();
        (s, serving)
    }

    #[test]
    fn a_worker_that_is_not_accepting_holds_nobody_back() {
        let s = Spread::new(gauge(), (0..2).map(|_| gauge()).collect());
        let serving = s.serve(0);
        let _held: Vec<Load> = (0..5).map(|_| s.take(0)).collect();
        assert!(s.may_accept(0), "worker 1 never started");
        let other = s.serve(1);
        assert!(!s.may_accept(0));
        drop(other);
        assert!(s.may_accept(0), "worker 1 stopped");
        drop(serving);
    }

    #[test]
    fn a_worker_ahead_of_the_least_busy_by_more_than_the_slack_waits() {
        let (s, _serving) = spread(2);
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
        let (s, _serving) = spread(3);
        let held: Vec<Load> = (0..9).map(|i| s.take(i % 3)).collect();
        assert_eq!((0..3).map(|w| s.load(w)).sum::<usize>(), 9);
        assert_eq!(s.total.get(), 9);
        drop(held);
        assert_eq!((0..3).map(|w| s.load(w)).collect::<Vec<_>>(), [0, 0, 0]);
        assert_eq!(s.total.get(), 0);
    }

    #[test]
    fn one_worker_always_accepts() {
        let (s, _serving) = spread(1);
        let _held: Vec<Load> = (0..10).map(|_| s.take(0)).collect();
        assert!(s.may_accept(0));
    }

    #[tokio::test]
    async fn a_waiting_worker_resumes_when_another_takes_a_connection() {
        let (s, _serving) = spread(2);
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
        let (s, _serving) = spread(2);
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
