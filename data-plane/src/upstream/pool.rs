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
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use lb_proto::validate::BackendProtocol;

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
    protocol: BackendProtocol,
    /// What an `https://` backend's last handshake settled on: [`ALPN_UNKNOWN`], [`ALPN_HTTP1`]
    /// or [`ALPN_H2`].
    alpn: AtomicU8,
    /// The multiplexed connections, for a backend spoken to in HTTP/2.
    pub(crate) h2: super::h2::H2Conns,
}

const ALPN_UNKNOWN: u8 = 0;
const ALPN_HTTP1: u8 = 1;
const ALPN_H2: u8 = 2;

impl IdleConns {
    pub fn new(workers: usize, transport: Transport, protocol: BackendProtocol) -> IdleConns {
        IdleConns {
            per_worker: (0..workers.max(1))
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            transport,
            protocol,
            alpn: AtomicU8::new(ALPN_UNKNOWN),
            h2: super::h2::H2Conns::new(workers),
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The protocol the backend is spoken to in.
    pub fn protocol(&self) -> BackendProtocol {
        self.protocol
    }

    /// Whether requests go to the backend in HTTP/2; none for an `https://` backend no
    /// handshake has settled yet.
    pub fn speaks_h2(&self) -> Option<bool> {
        match self.protocol {
            BackendProtocol::Http1 => Some(false),
            BackendProtocol::H2c => Some(true),
            BackendProtocol::Https => match self.alpn.load(Ordering::Relaxed) {
                ALPN_UNKNOWN => None,
                a => Some(a == ALPN_H2),
            },
        }
    }

    /// Records what a handshake with an `https://` backend settled on.
    pub(crate) fn learn(&self, h2: bool) {
        let alpn = if h2 { ALPN_H2 } else { ALPN_HTTP1 };
        if self.alpn.swap(alpn, Ordering::Relaxed) != alpn {
            tracing::debug!(http2 = h2, "backend protocol settled by ALPN");
        }
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

    pub(crate) fn put(&self, worker: usize, mut conn: Conn) {
        // An idle connection holds no read buffer (its buffer is empty when it comes back); the
        // next read allocates one. A pool sized by a burst of concurrent requests then costs
        // its sockets, not 16 KB each.
        if conn.buf.is_empty() {
            conn.buf = bytes::BytesMut::new();
        }
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
        self.h2.clear();
    }
}

/// Where a connection goes back once its response has been read to the end.
pub(crate) struct Home {
    pub(crate) pool: Arc<IdleConns>,
    pub(crate) worker: usize,
}
