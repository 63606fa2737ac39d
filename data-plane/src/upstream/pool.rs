//! Idle keep-alive connections to backends, pooled per backend and per worker thread, so a
//! request and its connection stay on one thread and the pool is a plain list behind an
//! uncontended lock (no hashing, no shared queue).
//!
//! A connection is leased for one request and returns to its list when the response body has
//! been read to the end; a body abandoned half-way takes its connection with it, since the rest
//! of the body would still be in flight on it. Before a pooled connection is used, it is checked
//! for anything the backend sent while it sat idle (a close, usually): such a connection is
//! dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::conn::{Conn, Transport};

/// Idle connections are closed after this long: below the usual 60-75 s keep-alive timeout of
/// backend servers, so the pool rarely hands out a connection the backend is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// Most idle connections kept per backend and worker; more are closed when they come back.
const MAX_IDLE: usize = 1024;

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The connections of one backend: how new ones are opened, and the idle ones, one list per
/// worker thread, most recently used last.
pub struct IdleConns {
    per_worker: Box<[Mutex<VecDeque<Idle>>]>,
    transport: Transport,
}

impl IdleConns {
    pub fn new(workers: usize, transport: Transport) -> IdleConns {
        IdleConns {
            per_worker: (0..workers.max(1))
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            transport,
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    fn list(&self, worker: usize) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        let slot = &self.per_worker[worker % self.per_worker.len()];
        slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used live connection, if any.
    pub(crate) fn take(&self, worker: usize) -> Option<Conn> {
        let mut list = self.list(worker);
        while let Some(mut idle) = list.pop_back() {
            if idle.since.elapsed() < POOL_IDLE && !idle.conn.is_gone() {
                return Some(idle.conn);
            }
        }
        None
    }

    pub(crate) fn put(&self, worker: usize, conn: Conn) {
        let mut list = self.list(worker);
        // Expire from the cold end on every return, so an idle backlog cannot linger.
        while list.front().is_some_and(|i| i.since.elapsed() >= POOL_IDLE) {
            list.pop_front();
        }
        if list.len() < MAX_IDLE {
            list.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes every idle connection (a backend removed from the configuration).
    pub fn clear(&self) {
        for l in &self.per_worker {
            l.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

/// Where a connection goes back once its response has been read to the end.
pub(crate) struct Home {
    pub(crate) pool: Arc<IdleConns>,
    pub(crate) worker: usize,
}
