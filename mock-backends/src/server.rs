//! The listeners and connections of the backends: accept loops, fault-aware connection
//! handling, and refusing connections on demand.

use super::*;

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) name_header: HeaderValue,
    pub(crate) addr: SocketAddr,
    /// Re-binding happens inside the synchronous `set_faults`, which needs a
    /// reactor to register the new listener with.
    pub(crate) runtime: Handle,
    pub(crate) control: Mutex<Control>,
    pub(crate) close: watch::Sender<CloseSignal>,
    pub(crate) stats: Mutex<Stats>,
    pub(crate) cacheable_served: AtomicU64,
}

/// Everything the accept loop depends on, behind one lock (see the module docs).
pub(crate) struct Control {
    pub(crate) faults: Faults,
    /// `None` while refusing connections or after stop.
    pub(crate) listener: Option<TcpListener>,
    /// The accept loop's waker, woken whenever `listener` or `stopped` changes.
    pub(crate) accept_waker: Option<Waker>,
    pub(crate) stopped: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum CloseMode {
    #[default]
    Open,
    /// Cut connections at once (refusing, or dropped without shutdown).
    Abort,
    /// Let in-flight requests finish, close idle connections.
    Drain,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CloseSignal {
    pub(crate) mode: CloseMode,
    /// Connection drained instead of aborted: it carries the admin request that
    /// caused the abort and must still deliver the response.
    pub(crate) spare: Option<u64>,
}

pub(crate) enum Accepted {
    Conn(TcpStream, watch::Receiver<CloseSignal>),
    Failed(io::Error),
    Stopped,
}

/// An admin-level failure, rendered as a JSON error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) field: Option<String>,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            field: None,
            message: message.into(),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the mock down with it; the data is plain counters and flags.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    pub(crate) fn new(addr: SocketAddr, listener: TcpListener, runtime: Handle) -> Self {
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

    pub(crate) fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    pub(crate) fn faults_snapshot(&self) -> Faults {
        self.control().faults.clone()
    }

    pub(crate) fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Accepted> {
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
    pub(crate) fn update_faults(
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

    pub(crate) fn bind(&self) -> io::Result<TcpListener> {
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

    pub(crate) fn stop(&self, mode: CloseMode) {
        let mut control = self.control();
        control.stopped = true;
        control.listener = None;
        self.close.send_replace(CloseSignal { mode, spare: None });
        if let Some(waker) = control.accept_waker.take() {
            waker.wake();
        }
    }

    pub(crate) fn count_request(&self, path: &str) {
        let mut stats = lock(&self.stats);
        if path == "/health" {
            stats.health_checks_total += 1;
        } else {
            stats.requests_total += 1;
            *stats.by_path.entry(path.to_string()).or_insert(0) += 1;
        }
    }

    pub(crate) fn count_connection(&self) {
        lock(&self.stats).connections_total += 1;
    }

    pub(crate) fn reset_stats(&self) {
        let mut stats = lock(&self.stats);
        *stats = Stats::default();
        self.cacheable_served.store(0, Ordering::Relaxed);
    }
}

/// Listeners handed to `from_listeners` may lack `SO_REUSEADDR`; accepted
/// sockets inherit the flag, and without it their `TIME_WAIT` remains would
/// make re-binding after `refuse_connections` fail for a minute.
pub(crate) fn enable_reuseaddr(listener: &TcpListener) -> io::Result<()> {
    // The duplicate descriptor refers to the same socket, so the option set
    // through it applies to the listener; dropping it closes only the duplicate.
    let dup = listener.as_fd().try_clone_to_owned()?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(dup));
    socket.set_reuseaddr(true)
}

// ---------------------------------------------------------------------------
// Accept loop and connections
// ---------------------------------------------------------------------------

pub(crate) static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) async fn accept_loop(inner: Arc<Inner>, group: Arc<[Backend]>) {
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
                    grpc: grpc::routes(inner.clone()),
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

pub(crate) struct ConnCtx {
    pub(crate) inner: Arc<Inner>,
    pub(crate) group: Arc<[Backend]>,
    pub(crate) conn_id: u64,
    /// The gRPC services, for calls on this connection.
    pub(crate) grpc: tonic::service::Routes,
}

pub(crate) async fn serve_connection(
    stream: TcpStream,
    ctx: Arc<ConnCtx>,
    mut close_rx: watch::Receiver<CloseSignal>,
) {
    let conn_id = ctx.conn_id;
    let backend = ctx.inner.name.clone();
    let builder = auto::Builder::new(TokioExecutor::new());
    let service = service_fn(move |req| handle(req, ctx.clone()));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
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
