//! Mock HTTP backends with runtime fault injection.
//!
//! One process serves several ports; each port is an independent backend named
//! `backend-<port>` with its own faults, counters and accept loop. Tests of the
//! load balancer drive these backends, so behaviour is deterministic wherever
//! possible and every fault can be switched at runtime, either through the
//! [`Backend`] handle or through the `/_admin/...` HTTP paths.
//!
//! # Design
//!
//! The listener of a backend lives inside the same mutex as its faults
//! (`Control`). The accept loop polls the listener *while holding that lock*
//! (a `poll_accept` never blocks), and every fault change happens under the
//! lock too. That makes `refuse_connections` race-free:
//!
//! * turning it on drops the listener synchronously, so when `set_faults` (or
//!   the admin `PUT`) returns nothing listens on the port any more and a
//!   client connect is refused;
//! * connections subscribe to a close signal (a `watch` channel) under the same
//!   lock they were accepted under, so a connection is either accepted before
//!   the refusal (and sees the signal) or never accepted at all;
//! * turning it off binds the same address again (with `SO_REUSEADDR`, so
//!   `TIME_WAIT` leftovers of the killed connections do not block it) before
//!   returning, and wakes the accept loop, which picks up the new listener.
//!
//! The connection that carries the admin request switching its own backend to
//! refusing is closed gracefully instead of being dropped, so the admin
//! response still reaches the client.
//!
//! Admin paths are never subject to faults and never counted, so a test can
//! always inspect and repair a backend. `?backend=<port>` lets one backend's
//! admin path control another backend of the same process, which is the only
//! way to revive a refusing backend over HTTP.

use std::collections::BTreeMap;
use std::future::{Future, poll_fn};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, VARY};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = UnsyncBoxBody<Bytes, BoxError>;
type Resp = Response<RespBody>;

/// Upper bound for injected latency and `/slow`, so a typo cannot hang a test suite.
const MAX_LATENCY_MS: u64 = 60_000;
/// `/echo` buffers the body to describe it, so it must be bounded.
const MAX_ECHO_BODY: usize = 1 << 20;
/// Admin bodies are tiny JSON objects.
const MAX_ADMIN_BODY: usize = 64 * 1024;
const MAX_BYTES: u64 = 1 << 30;
const CHUNK_SIZE: usize = 64 * 1024;
/// Byte `i` of every generated body is `i % PATTERN_PERIOD`; a prime period
/// makes misplaced or duplicated chunks visible.
const PATTERN_PERIOD: u64 = 251;
const ABORT_BODY_DECLARED: u64 = 1_000_000;
const ABORT_BODY_SENT: usize = 16 * 1024;
/// Gives the server time to flush the partial body before the connection is cut.
const ABORT_BODY_PAUSE: Duration = Duration::from_millis(20);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Avoids a hot loop when accept fails persistently (for example on EMFILE).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
const LISTEN_BACKLOG: u32 = 1024;

const X_BACKEND: HeaderName = HeaderName::from_static("x-backend");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ECHO_METHOD: HeaderName = HeaderName::from_static("x-echo-method");

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// A running set of mock backends.
///
/// Dropping it without calling [`MockBackends::shutdown`] stops the backends
/// immediately: listeners are closed and open connections are cut.
pub struct MockBackends {
    backends: Vec<Backend>,
    tasks: Vec<JoinHandle<()>>,
}

/// Cheap handle to one backend; clones share the same state.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

/// Faults injected into the non-admin requests of one backend.
///
/// Applied in this order: `latency_ms`, `error_status`, `error_rate`, then the
/// endpoint itself (where `fail_health` affects `/health`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// `/health` answers 503.
    pub fail_health: bool,
    /// 0 = off; otherwise every non-admin path (including `/health`) answers
    /// this status. The admin path accepts 200..=599; a value set through
    /// [`Backend::set_faults`] outside that range answers 500.
    pub error_status: u16,
    /// Share (0.0..=1.0) of non-admin requests answered 500, chosen at random.
    /// Values outside the range are clamped when set through [`Backend::set_faults`].
    pub error_rate: f64,
    /// Delay before answering every non-admin request (including `/health`),
    /// capped at 60000.
    pub latency_ms: u64,
    /// Close the listener and all open connections; the same address is bound
    /// again when this goes back to `false`.
    pub refuse_connections: bool,
}

/// Counters of one backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Non-admin requests, `/health` excluded.
    pub requests_total: u64,
    /// `/health` requests.
    pub health_checks_total: u64,
    /// TCP connections accepted.
    pub connections_total: u64,
    /// Non-admin path (without query) -> request count, `/health` excluded.
    pub by_path: BTreeMap<String, u64>,
}

impl MockBackends {
    /// Bind each address (port 0 allowed) and start serving; returns once every listener is bound.
    pub async fn start(addrs: &[SocketAddr]) -> io::Result<MockBackends> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
            listeners.push(listener);
        }
        Self::from_listeners(listeners)
    }

    /// Serve on already-bound listeners.
    ///
    /// Must be called inside a Tokio runtime. The ports must be distinct because
    /// backends are named and addressed (`?backend=<port>`) by port.
    pub fn from_listeners(listeners: Vec<TcpListener>) -> io::Result<MockBackends> {
        let runtime = Handle::try_current().map_err(|_| {
            io::Error::other("mock backends must be started inside a Tokio runtime")
        })?;
        let mut backends: Vec<Backend> = Vec::with_capacity(listeners.len());
        for listener in listeners {
            let addr = listener.local_addr()?;
            if backends.iter().any(|b| b.addr().port() == addr.port()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("duplicate port {} among the listeners", addr.port()),
                ));
            }
            enable_reuseaddr(&listener)?;
            backends.push(Backend {
                inner: Arc::new(Inner::new(addr, listener, runtime.clone())),
            });
        }
        let group: Arc<[Backend]> = backends.clone().into();
        let tasks = backends
            .iter()
            .map(|b| runtime.spawn(accept_loop(b.inner.clone(), group.clone())))
            .collect();
        Ok(MockBackends { backends, tasks })
    }

    /// The bound addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(Backend::addr).collect()
    }

    /// Programmatic control of backend i (same effect as the HTTP admin path).
    ///
    /// Panics if `i` is out of range.
    pub fn backend(&self, i: usize) -> &Backend {
        &self.backends[i]
    }

    /// All backends, in the order of the addresses.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Stop accepting, close connections, wait for tasks (bounded, ~5 s deadline).
    ///
    /// Idle connections close at once and in-flight responses may finish; whatever
    /// is still running after the deadline is aborted.
    pub async fn shutdown(mut self) {
        for backend in &self.backends {
            backend.inner.stop(CloseMode::Drain);
        }
        let mut tasks = std::mem::take(&mut self.tasks);
        // Each accept loop enforces SHUTDOWN_GRACE on its connections itself;
        // the outer bound only guards against a loop that fails to do so.
        let wait_all = async {
            for task in &mut tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), wait_all)
            .await
            .is_err()
        {
            for task in &tasks {
                task.abort();
            }
        }
    }
}

impl Drop for MockBackends {
    fn drop(&mut self) {
        for backend in &self.backends {
            backend.inner.stop(CloseMode::Abort);
        }
    }
}

impl std::fmt::Debug for MockBackends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.backends).finish()
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.inner.name)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `"backend-<port>"`.
    pub fn name(&self) -> String {
        self.inner.name.clone()
    }

    /// Replace all faults.
    ///
    /// When `refuse_connections` goes from `true` to `false` the address is bound
    /// again before this returns; if that bind fails the error is logged and the
    /// previous faults stay in place (the admin path reports the error instead).
    pub fn set_faults(&self, f: Faults) {
        if let Err(e) = self.inner.update_faults(None, |_| Ok(f)) {
            tracing::error!(backend = %self.inner.name, error = %e.message, "set_faults failed");
        }
    }

    pub fn faults(&self) -> Faults {
        self.inner.faults_snapshot()
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> Stats {
        lock(&self.inner.stats).clone()
    }

    /// Zero all counters, including the `/cacheable` served counter.
    pub fn reset_stats(&self) {
        self.inner.reset_stats();
    }
}

/// Parse "5001,5002,5003" into ports; clear error naming the bad item (empty, not a number, 0, duplicate).
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports: Vec<u16> = Vec::new();
    for (i, raw) in s.split(',').enumerate() {
        let item = raw.trim();
        let position = i + 1;
        if item.is_empty() {
            return Err(format!("invalid port list {s:?}: item {position} is empty"));
        }
        let port: u16 = item.parse().map_err(|_| {
            format!(
                "invalid port list {s:?}: item {position} {item:?} is not a port number (1-65535)"
            )
        })?;
        if port == 0 {
            return Err(format!(
                "invalid port list {s:?}: item {position} \"0\" is not allowed"
            ));
        }
        if ports.contains(&port) {
            return Err(format!(
                "invalid port list {s:?}: item {position} \"{port}\" is a duplicate"
            ));
        }
        ports.push(port);
    }
    Ok(ports)
}

/// Run until `shutdown` resolves (used by the binary and by an all-in-one launcher in another crate).
pub async fn run(
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let backends = MockBackends::from_listeners(listeners)?;
    for backend in backends.backends() {
        tracing::info!(backend = %backend.name(), addr = %backend.addr(), "mock backend listening");
    }
    shutdown.await;
    tracing::info!("mock backends shutting down");
    backends.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Backend state
// ---------------------------------------------------------------------------

pub mod grpc;
mod routes;
mod server;
#[cfg(test)]
mod tests;
mod util;

use routes::*;
use server::*;
use util::*;
