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
use http_body_util::combinators::BoxBody;
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
type RespBody = BoxBody<Bytes, BoxError>;
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

struct Inner {
    name: String,
    name_header: HeaderValue,
    addr: SocketAddr,
    /// Re-binding happens inside the synchronous `set_faults`, which needs a
    /// reactor to register the new listener with.
    runtime: Handle,
    control: Mutex<Control>,
    close: watch::Sender<CloseSignal>,
    stats: Mutex<Stats>,
    cacheable_served: AtomicU64,
}

/// Everything the accept loop depends on, behind one lock (see the module docs).
struct Control {
    faults: Faults,
    /// `None` while refusing connections or after stop.
    listener: Option<TcpListener>,
    /// The accept loop's waker, woken whenever `listener` or `stopped` changes.
    accept_waker: Option<Waker>,
    stopped: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum CloseMode {
    #[default]
    Open,
    /// Cut connections at once (refusing, or dropped without shutdown).
    Abort,
    /// Let in-flight requests finish, close idle connections.
    Drain,
}

#[derive(Clone, Copy, Debug, Default)]
struct CloseSignal {
    mode: CloseMode,
    /// Connection drained instead of aborted: it carries the admin request that
    /// caused the abort and must still deliver the response.
    spare: Option<u64>,
}

enum Accepted {
    Conn(TcpStream, watch::Receiver<CloseSignal>),
    Failed(io::Error),
    Stopped,
}

/// An admin-level failure, rendered as a JSON error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            field: None,
            message: message.into(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the mock down with it; the data is plain counters and flags.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn new(addr: SocketAddr, listener: TcpListener, runtime: Handle) -> Self {
        let name = format!("backend-{}", addr.port());
        let name_header =
            HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("backend"));
        Inner {
            name,
            name_header,
            addr,
            runtime,
            control: Mutex::new(Control {
                faults: Faults::default(),
                listener: Some(listener),
                accept_waker: None,
                stopped: false,
            }),
            close: watch::Sender::new(CloseSignal::default()),
            stats: Mutex::new(Stats::default()),
            cacheable_served: AtomicU64::new(0),
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    fn faults_snapshot(&self) -> Faults {
        self.control().faults.clone()
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Accepted> {
        let mut control = self.control();
        if control.stopped {
            return Poll::Ready(Accepted::Stopped);
        }
        if let Some(listener) = &control.listener {
            match listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _peer))) => {
                    // Subscribing under the lock is what guarantees that a
                    // refusal either precedes the accept or reaches the connection.
                    return Poll::Ready(Accepted::Conn(stream, self.close.subscribe()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Accepted::Failed(e)),
                Poll::Pending => {}
            }
        }
        control.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Apply a fault change atomically; `change` sees the current faults.
    ///
    /// `spare` is the id of the connection carrying the request, if it belongs
    /// to this backend.
    fn update_faults(
        &self,
        spare: Option<u64>,
        change: impl FnOnce(&Faults) -> Result<Faults, ApiError>,
    ) -> Result<Faults, ApiError> {
        let mut control = self.control();
        let new = change(&control.faults)?;
        if !control.stopped {
            if new.refuse_connections && control.listener.is_some() {
                // Dropping the listener closes the socket right here, so the
                // port refuses connections before the caller regains control.
                control.listener = None;
                self.close.send_replace(CloseSignal {
                    mode: CloseMode::Abort,
                    spare,
                });
            } else if !new.refuse_connections && control.listener.is_none() {
                let listener = self.bind().map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("re-binding {} failed: {e}", self.addr),
                    )
                })?;
                control.listener = Some(listener);
            }
            if let Some(waker) = control.accept_waker.take() {
                waker.wake();
            }
        }
        control.faults = new.clone();
        Ok(new)
    }

    fn bind(&self) -> io::Result<TcpListener> {
        let _runtime = self.runtime.enter();
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        socket.listen(LISTEN_BACKLOG)
    }

    fn stop(&self, mode: CloseMode) {
        let mut control = self.control();
        control.stopped = true;
        control.listener = None;
        self.close.send_replace(CloseSignal { mode, spare: None });
        if let Some(waker) = control.accept_waker.take() {
            waker.wake();
        }
    }

    fn count_request(&self, path: &str) {
        let mut stats = lock(&self.stats);
        if path == "/health" {
            stats.health_checks_total += 1;
        } else {
            stats.requests_total += 1;
            *stats.by_path.entry(path.to_string()).or_insert(0) += 1;
        }
    }

    fn count_connection(&self) {
        lock(&self.stats).connections_total += 1;
    }

    fn reset_stats(&self) {
        let mut stats = lock(&self.stats);
        *stats = Stats::default();
        self.cacheable_served.store(0, Ordering::Relaxed);
    }
}

/// Listeners handed to `from_listeners` may lack `SO_REUSEADDR`; accepted
/// sockets inherit the flag, and without it their `TIME_WAIT` remains would
/// make re-binding after `refuse_connections` fail for a minute.
fn enable_reuseaddr(listener: &TcpListener) -> io::Result<()> {
    // The duplicate descriptor refers to the same socket, so the option set
    // through it applies to the listener; dropping it closes only the duplicate.
    let dup = listener.as_fd().try_clone_to_owned()?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(dup));
    socket.set_reuseaddr(true)
}

// ---------------------------------------------------------------------------
// Accept loop and connections
// ---------------------------------------------------------------------------

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(inner: Arc<Inner>, group: Arc<[Backend]>) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = poll_fn(|cx| inner.poll_accept(cx)) => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Accepted::Conn(stream, close_rx) => {
                inner.count_connection();
                let _ = stream.set_nodelay(true);
                let ctx = Arc::new(ConnCtx {
                    inner: inner.clone(),
                    group: group.clone(),
                    conn_id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                });
                conns.spawn(serve_connection(stream, ctx, close_rx));
            }
            Accepted::Failed(e) => {
                tracing::warn!(backend = %inner.name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
            Accepted::Stopped => break,
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

struct ConnCtx {
    inner: Arc<Inner>,
    group: Arc<[Backend]>,
    conn_id: u64,
}

async fn serve_connection(
    stream: TcpStream,
    ctx: Arc<ConnCtx>,
    mut close_rx: watch::Receiver<CloseSignal>,
) {
    let conn_id = ctx.conn_id;
    let backend = ctx.inner.name.clone();
    let builder = auto::Builder::new(TokioExecutor::new());
    let service = service_fn(move |req| handle(req, ctx.clone()));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            // Close signals win over pending I/O so that nothing is served after a refusal.
            biased;
            changed = close_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let signal = *close_rx.borrow_and_update();
                let drain = match signal.mode {
                    CloseMode::Open => continue,
                    CloseMode::Drain => true,
                    CloseMode::Abort => signal.spare == Some(conn_id),
                };
                if !drain {
                    return;
                }
                if !draining {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%backend, error = %e, "connection ended with an error");
                }
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

async fn handle(req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Result<Resp, BoxError> {
    let request_id = req.headers().get(X_REQUEST_ID).cloned();
    let mut resp = route(req, &ctx).await?;
    let headers = resp.headers_mut();
    headers.insert(X_BACKEND, ctx.inner.name_header.clone());
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID, id);
    }
    Ok(resp)
}

fn is_admin(path: &str) -> bool {
    path == "/_admin" || path.starts_with("/_admin/")
}

async fn route(req: Request<Incoming>, ctx: &ConnCtx) -> Result<Resp, BoxError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if is_admin(&path) {
        return Ok(admin(parts, body, ctx).await.unwrap_or_else(error_response));
    }
    let inner = &ctx.inner;
    inner.count_request(&path);

    let faults = inner.faults_snapshot();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms.min(MAX_LATENCY_MS))).await;
    }
    if faults.error_status != 0 {
        drain(body).await;
        let status = StatusCode::from_u16(faults.error_status)
            .ok()
            .filter(|s| (200..=599).contains(&s.as_u16()))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let payload = json!({
            "backend": inner.name,
            "status": status.as_u16(),
            "error": "injected fault: error_status",
        });
        return Ok(status_response(&parts.method, status, &payload));
    }
    if faults.error_rate > 0.0 && random_unit() < faults.error_rate {
        drain(body).await;
        let payload = json!({
            "backend": inner.name,
            "status": 500,
            "error": "injected fault: error_rate",
        });
        return Ok(json_response(StatusCode::INTERNAL_SERVER_ERROR, &payload));
    }

    let result = match path.as_str() {
        "/echo" => echo(&parts, body, inner).await,
        "/echo/stream" => Ok(echo_stream(&parts, body)),
        "/abort" => return Err("connection aborted by /abort".into()),
        other => {
            drain(body).await;
            match other {
                "/health" => Ok(health(inner, faults.fail_health)),
                "/slow" => slow(&parts, inner).await,
                "/bytes" => bytes_endpoint(&parts),
                "/cacheable" => cacheable(&parts, inner),
                "/abort-body" => Ok(abort_body()),
                p if p.starts_with("/status/") => status_endpoint(&parts, inner),
                _ => Ok(json_response(StatusCode::OK, &data_json(&parts, inner))),
            }
        }
    };
    Ok(result.unwrap_or_else(error_response))
}

/// Reads and discards the request body, so the connection stays reusable for
/// keep-alive even when the endpoint ignores the body.
async fn drain(mut body: Incoming) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}

fn health(inner: &Inner, fail: bool) -> Resp {
    if fail {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unhealthy", "backend": inner.name}),
        )
    } else {
        json_response(
            StatusCode::OK,
            &json!({"status": "ok", "backend": inner.name}),
        )
    }
}

fn data_json(parts: &Parts, inner: &Inner) -> Value {
    let request_id = parts
        .headers
        .get(X_REQUEST_ID)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    json!({
        "backend": inner.name,
        "port": inner.addr.port(),
        "method": parts.method.as_str(),
        "request_id": request_id,
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "timestamp_ms": now_ms(),
        "message": format!("hello from {}", inner.name),
    })
}

async fn slow(parts: &Parts, inner: &Inner) -> Result<Resp, ApiError> {
    let raw = query_param(parts.uri.query(), "ms")
        .ok_or_else(|| ApiError::field("ms", "missing query parameter 'ms'"))?;
    let ms = raw
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms <= MAX_LATENCY_MS)
        .ok_or_else(|| {
            ApiError::field(
                "ms",
                format!("invalid query parameter 'ms': {raw:?} (expected 0..={MAX_LATENCY_MS})"),
            )
        })?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json_response(StatusCode::OK, &data_json(parts, inner)))
}

fn status_endpoint(parts: &Parts, inner: &Inner) -> Result<Resp, ApiError> {
    let raw = &parts.uri.path()["/status/".len()..];
    let status = raw
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| {
            ApiError::field(
                "code",
                format!("invalid status code {raw:?} (expected 200..=599)"),
            )
        })?;
    let payload = json!({"backend": inner.name, "status": status.as_u16()});
    Ok(status_response(&parts.method, status, &payload))
}

async fn echo(parts: &Parts, body: Incoming, inner: &Inner) -> Result<Resp, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the /echo limit of {MAX_ECHO_BODY} bytes (use /echo/stream)"
            ),
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_ECHO_BODY as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, MAX_ECHO_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the request body failed: {e}"),
            ));
        }
    };
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_string(), Value::String(joined));
    }
    let payload = json!({
        "backend": inner.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&bytes),
        "body_bytes": bytes.len(),
    });
    Ok(json_response(StatusCode::OK, &payload))
}

/// The request body becomes the response body frame by frame, so arbitrarily
/// large bodies stream through without being held in memory.
fn echo_stream(parts: &Parts, body: Incoming) -> Resp {
    let mut resp = Response::new(body.map_err(|e| -> BoxError { Box::new(e) }).boxed());
    let headers = resp.headers_mut();
    if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
        headers.insert(X_ECHO_METHOD, method);
    }
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, ct.clone());
    }
    resp
}

fn bytes_endpoint(parts: &Parts) -> Result<Resp, ApiError> {
    let query = parts.uri.query();
    let raw = query_param(query, "n")
        .ok_or_else(|| ApiError::field("n", "missing query parameter 'n'"))?;
    let n = raw
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_BYTES)
        .ok_or_else(|| {
            ApiError::field(
                "n",
                format!("invalid query parameter 'n': {raw:?} (expected 0..={MAX_BYTES})"),
            )
        })?;
    let chunked = match query_param(query, "chunked").as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ApiError::field(
                "chunked",
                format!("invalid query parameter 'chunked': {other:?} (expected 0 or 1)"),
            ));
        }
    };
    let mut resp = Response::new(
        PatternBody {
            sent: 0,
            total: n,
            exact: !chunked,
        }
        .boxed(),
    );
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if !chunked {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(resp)
}

fn cacheable(parts: &Parts, inner: &Inner) -> Result<Resp, ApiError> {
    let query = parts.uri.query();
    let max_age = match query_param(query, "max_age") {
        None => 30,
        Some(raw) => raw.parse::<u32>().map_err(|_| {
            ApiError::field(
                "max_age",
                format!("invalid query parameter 'max_age': {raw:?} (expected seconds)"),
            )
        })?,
    };
    let vary = match query_param(query, "vary") {
        None => None,
        Some(raw) => Some(HeaderName::from_bytes(raw.as_bytes()).map_err(|_| {
            ApiError::field(
                "vary",
                format!("invalid query parameter 'vary': {raw:?} is not a header name"),
            )
        })?),
    };
    let served = inner.cacheable_served.fetch_add(1, Ordering::Relaxed) + 1;
    let vary_value = vary.as_ref().and_then(|name| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    });
    let payload = json!({
        "backend": inner.name,
        "served": served,
        "path": parts.uri.path(),
        "vary": vary.as_ref().map(HeaderName::as_str),
        "vary_value": vary_value,
        "timestamp_ms": now_ms(),
    });
    let mut resp = json_response(StatusCode::OK, &payload);
    let headers = resp.headers_mut();
    // `cc` replaces the whole Cache-Control value (no-store, private, stale windows...).
    let cc = query_param(query, "cc").unwrap_or_else(|| format!("public, max-age={max_age}"));
    match HeaderValue::from_str(&cc) {
        Ok(v) => {
            headers.insert(CACHE_CONTROL, v);
        }
        Err(_) => {
            return Err(ApiError::field(
                "cc",
                format!("invalid query parameter 'cc': {cc:?} is not a header value"),
            ));
        }
    }
    if let Some(name) = vary {
        headers.insert(VARY, HeaderValue::from(name));
    }
    Ok(resp)
}

fn abort_body() -> Resp {
    let mut resp = Response::new(
        AbortBody {
            sent_head: false,
            pause: Box::pin(tokio::time::sleep(ABORT_BODY_PAUSE)),
        }
        .boxed(),
    );
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(ABORT_BODY_DECLARED));
    resp
}

// ---------------------------------------------------------------------------
// Admin
// ---------------------------------------------------------------------------

async fn admin(parts: Parts, body: Incoming, ctx: &ConnCtx) -> Result<Resp, ApiError> {
    let target = match query_param(parts.uri.query(), "backend") {
        None => ctx.inner.clone(),
        Some(raw) => {
            let port = raw.parse::<u16>().map_err(|_| {
                ApiError::field(
                    "backend",
                    format!("invalid query parameter 'backend': {raw:?} is not a port"),
                )
            })?;
            ctx.group
                .iter()
                .find(|b| b.inner.addr.port() == port)
                .map(|b| b.inner.clone())
                .ok_or_else(|| ApiError {
                    status: StatusCode::NOT_FOUND,
                    field: Some("backend".to_string()),
                    message: format!("no backend on port {port} in this process"),
                })?
        }
    };
    let spare = Arc::ptr_eq(&target, &ctx.inner).then_some(ctx.conn_id);
    let path = parts.uri.path();
    let method = &parts.method;
    match path {
        "/_admin/fault" if method == Method::GET || method == Method::HEAD => {
            Ok(json_response(StatusCode::OK, &target.faults_snapshot()))
        }
        "/_admin/fault" if method == Method::PUT => {
            let patch = read_json_object(body).await?;
            let faults = target.update_faults(spare, |current| merge_faults(current, &patch))?;
            Ok(json_response(StatusCode::OK, &faults))
        }
        "/_admin/fault" if method == Method::DELETE => {
            drain(body).await;
            let faults = target.update_faults(spare, |_| Ok(Faults::default()))?;
            Ok(json_response(StatusCode::OK, &faults))
        }
        "/_admin/stats" if method == Method::GET || method == Method::HEAD => {
            Ok(json_response(StatusCode::OK, &*lock(&target.stats)))
        }
        "/_admin/stats" if method == Method::DELETE => {
            drain(body).await;
            target.reset_stats();
            Ok(json_response(StatusCode::OK, &Stats::default()))
        }
        "/_admin/fault" | "/_admin/stats" => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on {path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown admin path {path} (known: /_admin/fault, /_admin/stats)"),
        )),
    }
}

async fn read_json_object(body: Incoming) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = Limited::new(body, MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the body failed: {e}"),
            )
        })?
        .to_bytes();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "expected a JSON object of fault fields",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
        )),
    }
}

/// Applies a partial fault object: absent fields keep their current value.
/// Each field is parsed and validated on its own so errors can name it.
fn merge_faults(
    current: &Faults,
    patch: &serde_json::Map<String, Value>,
) -> Result<Faults, ApiError> {
    fn field<T: serde::de::DeserializeOwned>(name: &str, value: &Value) -> Result<T, ApiError> {
        T::deserialize(value)
            .map_err(|e| ApiError::field(name, format!("invalid value for '{name}': {e}")))
    }
    let mut faults = current.clone();
    for (name, value) in patch {
        match name.as_str() {
            "fail_health" => faults.fail_health = field(name, value)?,
            "refuse_connections" => faults.refuse_connections = field(name, value)?,
            "error_status" => {
                let status: u16 = field(name, value)?;
                if status != 0 && !(200..=599).contains(&status) {
                    return Err(ApiError::field(
                        name,
                        format!(
                            "invalid value for 'error_status': {status} (expected 0 or 200..=599)"
                        ),
                    ));
                }
                faults.error_status = status;
            }
            "error_rate" => {
                let rate: f64 = field(name, value)?;
                if !(0.0..=1.0).contains(&rate) {
                    return Err(ApiError::field(
                        name,
                        format!("invalid value for 'error_rate': {rate} (expected 0.0..=1.0)"),
                    ));
                }
                faults.error_rate = rate;
            }
            "latency_ms" => {
                let ms: u64 = field(name, value)?;
                if ms > MAX_LATENCY_MS {
                    return Err(ApiError::field(
                        name,
                        format!(
                            "invalid value for 'latency_ms': {ms} (expected 0..={MAX_LATENCY_MS})"
                        ),
                    ));
                }
                faults.latency_ms = ms;
            }
            other => {
                return Err(ApiError::field(
                    other,
                    format!(
                        "unknown field '{other}' (known: fail_health, error_status, error_rate, latency_ms, refuse_connections)"
                    ),
                ));
            }
        }
    }
    Ok(faults)
}

// ---------------------------------------------------------------------------
// Bodies and helpers
// ---------------------------------------------------------------------------

fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    // One chunk plus one period, so any chunk at any offset is a sub-slice.
    PATTERN.get_or_init(|| {
        (0..CHUNK_SIZE as u64 + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// Deterministic bytes `i % 251`, generated without allocation.
struct PatternBody {
    sent: u64,
    total: u64,
    /// Whether the size is announced; when not, HTTP/1 falls back to chunked encoding.
    exact: bool,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let remaining = this.total - this.sent;
        if remaining == 0 {
            return Poll::Ready(None);
        }
        let len = remaining.min(CHUNK_SIZE as u64) as usize;
        let start = (this.sent % PATTERN_PERIOD) as usize;
        this.sent += len as u64;
        let chunk = Bytes::from_static(&pattern()[start..start + len]);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.total - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// Sends part of the announced body, pauses so it is flushed, then fails,
/// which makes hyper cut the connection (HTTP/1) or reset the stream (HTTP/2).
struct AbortBody {
    sent_head: bool,
    pause: Pin<Box<Sleep>>,
}

impl Body for AbortBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.sent_head {
            this.sent_head = true;
            let chunk = Bytes::from_static(&pattern()[..ABORT_BODY_SENT]);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match this.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                Poll::Ready(Some(Err("response body aborted by /abort-body".into())))
            }
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> RespBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Resp {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(body) => (status, body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"serializing the response failed: {e}\"}}").into_bytes(),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Like `json_response`, but without a body where HTTP forbids one.
fn status_response(method: &Method, status: StatusCode, value: &Value) -> Resp {
    let bodyless = matches!(status.as_u16(), 204 | 205 | 304) || method == Method::HEAD;
    if bodyless {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        resp
    } else {
        json_response(status, value)
    }
}

fn error_response(e: ApiError) -> Resp {
    let mut payload = json!({"error": e.message});
    if let Some(field) = e.field {
        payload["field"] = Value::String(field);
    }
    json_response(e.status, &payload)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// First value of `name` in a raw query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value))
        })
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'+' => Some((b' ', 1)),
            b'%' => bytes
                .get(i + 1..i + 3)
                .and_then(|h| Some((hex(h[0])? << 4 | hex(h[1])?, 3))),
            _ => None,
        };
        let (byte, width) = decoded.unwrap_or((bytes[i], 1));
        out.push(byte);
        i += width;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Uniform in [0, 1). Statistical quality is irrelevant here; independence
/// from extra crates and from a seeded global is what matters.
fn random_unit() -> f64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(0x6d6f_636b_u64));
    // splitmix64
    let mut z = seed.wrapping_add(COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ports_accepts_lists() {
        assert_eq!(parse_ports("5001,5002,5003"), Ok(vec![5001, 5002, 5003]));
        assert_eq!(parse_ports(" 80 , 65535 "), Ok(vec![80, 65535]));
    }

    #[test]
    fn parse_ports_names_the_bad_item() {
        let cases = [
            ("", "item 1 is empty"),
            ("5001,,5002", "item 2 is empty"),
            ("5001,", "item 2 is empty"),
            ("5001,abc", "item 2 \"abc\" is not a port number"),
            ("70000", "item 1 \"70000\" is not a port number"),
            ("-1", "item 1 \"-1\" is not a port number"),
            ("0", "item 1 \"0\" is not allowed"),
            ("5001,5002,5001", "item 3 \"5001\" is a duplicate"),
        ];
        for (input, expected) in cases {
            let err = parse_ports(input).unwrap_err();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    fn object(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn merge_keeps_absent_fields() {
        let current = Faults {
            fail_health: true,
            latency_ms: 10,
            ..Faults::default()
        };
        let merged = merge_faults(&current, &object(json!({"error_rate": 0.5}))).unwrap();
        assert_eq!(
            merged,
            Faults {
                error_rate: 0.5,
                ..current.clone()
            }
        );
        assert_eq!(merge_faults(&current, &object(json!({}))).unwrap(), current);
    }

    #[test]
    fn merge_validates_each_field() {
        let cases = [
            (json!({"error_rate": 1.01}), "error_rate"),
            (json!({"error_rate": "x"}), "error_rate"),
            (json!({"error_status": 199}), "error_status"),
            (json!({"error_status": 70000}), "error_status"),
            (json!({"latency_ms": 60001}), "latency_ms"),
            (json!({"latency_ms": -1}), "latency_ms"),
            (json!({"fail_health": null}), "fail_health"),
            (json!({"refuse": true}), "refuse"),
        ];
        for (patch, field) in cases {
            let err = merge_faults(&Faults::default(), &object(patch.clone())).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{patch}");
            assert_eq!(err.field.as_deref(), Some(field), "{patch}");
            assert!(err.message.contains(field), "{patch}: {}", err.message);
        }
        let ok = json!({"error_status": 0, "error_rate": 1, "latency_ms": 60000});
        assert!(merge_faults(&Faults::default(), &object(ok)).is_ok());
    }

    #[test]
    fn faults_deserialize_with_defaults() {
        let f: Faults = serde_json::from_str(r#"{"fail_health":true}"#).unwrap();
        assert_eq!(
            f,
            Faults {
                fail_health: true,
                ..Faults::default()
            }
        );
        let round: Faults = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(round, f);
    }

    #[test]
    fn query_params_are_found_and_decoded() {
        let q = Some("a=1&vary=x%2Dy&empty=&plus=a+b&flag&bad=%zz");
        assert_eq!(query_param(q, "a").as_deref(), Some("1"));
        assert_eq!(query_param(q, "vary").as_deref(), Some("x-y"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "plus").as_deref(), Some("a b"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "bad").as_deref(), Some("%zz"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "a"), None);
        assert_eq!(percent_decode("%41%4"), "A%4");
    }

    async fn collect(body: PatternBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn pattern_body_is_deterministic_and_sized() {
        let total = 3 * CHUNK_SIZE as u64 + 1234;
        let body = PatternBody {
            sent: 0,
            total,
            exact: true,
        };
        assert_eq!(body.size_hint().exact(), Some(total));
        let bytes = collect(body).await;
        assert_eq!(bytes.len() as u64, total);
        assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

        let chunked = PatternBody {
            sent: 0,
            total: 10,
            exact: false,
        };
        assert_eq!(chunked.size_hint().exact(), None);
        assert_eq!(collect(chunked).await, (0u8..10).collect::<Vec<_>>());
    }

    #[test]
    fn random_unit_stays_in_range() {
        let samples: Vec<f64> = (0..10_000).map(|_| random_unit()).collect();
        assert!(samples.iter().all(|x| (0.0..1.0).contains(x)));
        let below_half = samples.iter().filter(|x| **x < 0.5).count();
        assert!((3_000..7_000).contains(&below_half), "{below_half}");
    }

    #[test]
    fn admin_paths_are_recognised() {
        assert!(is_admin("/_admin/fault"));
        assert!(is_admin("/_admin"));
        assert!(!is_admin("/_adminx"));
        assert!(!is_admin("/data/_admin/fault"));
    }

    #[tokio::test]
    async fn refusing_after_stop_does_not_rebind() {
        let mb = MockBackends::start(&["127.0.0.1:0".parse().unwrap()])
            .await
            .unwrap();
        let backend = mb.backend(0).clone();
        mb.shutdown().await;
        backend.set_faults(Faults {
            refuse_connections: true,
            ..Faults::default()
        });
        backend.set_faults(Faults::default());
        assert!(backend.inner.control().listener.is_none());
        assert_eq!(backend.faults(), Faults::default());
    }
}
