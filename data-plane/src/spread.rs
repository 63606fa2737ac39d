//! Spreads client connections evenly over the proxy's worker threads.
//!
//! Every worker accepts from the same listening socket, and the one that wakes first takes
//! every connection waiting in the backlog: a burst of new connections (a client pool starting,
//! a load generator) can land on one thread while the others idle. So a worker that accepts a
//! connection while it serves more than one connection over the least busy worker hands it
//! over, as HAProxy does. A hand-over is one message to the other thread's event loop, once per
//! connection; keep-alive connections then stay where they are.

use prometheus::IntGauge;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A worker keeps a connection while it serves at most this many more than the least busy one.
const SLACK: usize = 1;

/// The open connections of each worker and the way to hand one over.
pub struct Spread {
    /// Also exported, as `lb_worker_connections`.
    loads: Box<[IntGauge]>,
    inboxes: Box<[UnboundedSender<Handoff>]>,
}

/// A connection accepted by one worker for another to serve.
pub struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
    pub load: Load,
}

/// Counts a connection against its worker while it is open.
pub struct Load {
    spread: Arc<Spread>,
    worker: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.spread.loads[self.worker].dec();
    }
}

impl Spread {
    /// One worker per gauge, which counts its open connections; one inbox per worker, in
    /// worker order.
    pub fn new(loads: Vec<IntGauge>) -> (Arc<Spread>, Vec<UnboundedReceiver<Handoff>>) {
        assert!(!loads.is_empty(), "at least one worker");
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            loads.iter().map(|_| unbounded_channel()).unzip();
        let spread = Spread {
            loads: loads.into_boxed_slice(),
            inboxes: inboxes.into_boxed_slice(),
        };
        (Arc::new(spread), receivers)
    }

    /// The worker that should serve a connection `worker` just accepted: itself, unless it
    /// serves more than [`SLACK`] connections over the least busy worker.
    pub fn place(&self, worker: usize) -> usize {
        let mine = self.load(worker);
        let (least, fewest) = (0..self.loads.len())
            .map(|w| (w, self.load(w)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((worker, mine));
        if mine > fewest + SLACK { least } else { worker }
    }

    /// Counts a connection against `worker` until the returned guard drops.
    pub fn take(self: &Arc<Self>, worker: usize) -> Load {
        self.loads[worker].inc();
        Load {
            spread: Arc::clone(self),
            worker,
        }
    }

    /// Hands a connection to `worker`; gives it back if that worker has stopped.
    pub fn send(&self, worker: usize, handoff: Handoff) -> Result<(), Handoff> {
        self.inboxes[worker].send(handoff).map_err(|e| e.0)
    }

    /// Connections `worker` serves now.
    pub fn load(&self, worker: usize) -> usize {
        usize::try_from(self.loads[worker].get()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(workers: usize) -> (Arc<Spread>, Vec<UnboundedReceiver<Handoff>>) {
        Spread::new(
            (0..workers)
                .map(|_| IntGauge::new("connections", "open").unwrap())
                .collect(),
        )
    }

    /// Places `n` connections all accepted by worker 0, as in a burst, keeping the guards.
    fn burst(spread: &Arc<Spread>, n: usize) -> (Vec<Load>, usize) {
        let mut moved = 0;
        let loads = (0..n)
            .map(|_| {
                let to = spread.place(0);
                moved += usize::from(to != 0);
                spread.take(to)
            })
            .collect();
        (loads, moved)
    }

    #[test]
    fn a_burst_on_one_worker_ends_spread_over_all() {
        let (spread, _inboxes) = spread(4);
        let (_held, moved) = burst(&spread, 64);
        let loads: Vec<usize> = (0..4).map(|w| spread.load(w)).collect();
        assert_eq!(loads.iter().sum::<usize>(), 64);
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= SLACK + 1, "{loads:?}");
        assert!(moved >= 64 - loads[0], "{moved} moved, {loads:?}");
    }

    #[test]
    fn balanced_workers_keep_their_connections() {
        let (spread, _inboxes) = spread(2);
        let _a = spread.take(0);
        let _b = spread.take(1);
        assert_eq!((spread.place(0), spread.place(1)), (0, 1));
        let _c = spread.take(0);
        assert_eq!(spread.place(0), 0, "one more is within the slack");
        let _d = spread.take(0);
        assert_eq!(spread.place(0), 1, "two more is not");
    }

    #[test]
    fn closed_connections_leave_the_count() {
        let (spread, _inboxes) = spread(2);
        let (held, _) = burst(&spread, 10);
        assert_eq!(spread.load(0) + spread.load(1), 10);
        drop(held);
        assert_eq!((spread.load(0), spread.load(1)), (0, 0));
    }

    #[test]
    fn one_worker_keeps_everything() {
        let (spread, _inboxes) = spread(1);
        let (_held, moved) = burst(&spread, 10);
        assert_eq!((spread.load(0), moved), (10, 0));
    }

    #[tokio::test]
    async fn a_handoff_to_a_stopped_worker_comes_back() {
        let (spread, mut inboxes) = spread(2);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let handoff = Handoff {
            stream,
            peer,
            permit,
            load: spread.take(1),
        };
        drop(inboxes.remove(1));
        let back = spread.send(1, handoff).expect_err("worker 1 has stopped");
        assert_eq!(back.peer, client.local_addr().unwrap());
    }
}
