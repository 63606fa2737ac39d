//! Connections to backends: HTTP/1.1 keep-alive connections pooled per backend and per worker
//! thread, so a request, its connection and that connection's task stay on one thread and the
//! pool is a plain list behind an uncontended lock (no hashing, no shared queue).
//!
//! A connection is leased for one request and returns to its list only when the response body
//! has been read to the end; a body abandoned half-way takes its connection with it, since the
//! rest of the body would still be in flight on it. A request that could not be written on a
//! pooled connection (the backend had closed it) is moved to another connection: it never
//! reached the backend, so this is safe whatever its method.
//!
//! With `backend_tls` on, new connections run a TLS handshake after the TCP connect, within the
//! same connect timeout; a failed handshake (unknown CA, wrong name) is a connect failure like a
//! refused connection. Only the connection task differs between the two transports (it is
//! generic over the stream, so neither pays for the other): a pooled [`Sender`] has the same type
//! either way, and the request path is the same code.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::proxy::UpstreamBody;

pub type Sender = http1::SendRequest<UpstreamBody>;

/// Idle connections are closed after this long: below the usual 60-75 s keep-alive timeout of
/// backend servers, so the pool rarely hands out a connection the backend is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// Most idle connections kept per backend and worker; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Pooled connections on which a request was refused before it was written, tried before
/// opening a new connection.
const MAX_STALE_TRIES: usize = 4;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// How new connections to a backend are opened.
#[derive(Clone)]
pub enum Transport {
    Plain,
    /// TLS after the TCP connect, verifying the certificate for `name`.
    Tls {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
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
    fn take(&self, worker: usize) -> Option<Sender> {
        let mut list = self.list(worker);
        while let Some(idle) = list.pop_back() {
            if !idle.sender.is_closed() && idle.since.elapsed() < POOL_IDLE {
                return Some(idle.sender);
            }
        }
        None
    }

    fn put(&self, worker: usize, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut list = self.list(worker);
        // Expire from the cold end on every return, so an idle backlog cannot linger.
        while list
            .front()
            .is_some_and(|i| i.since.elapsed() >= POOL_IDLE || i.sender.is_closed())
        {
            list.pop_front();
        }
        if list.len() < MAX_IDLE {
            list.push_back(Idle {
                sender,
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

/// A connection leased for one request.
pub struct Lease {
    sender: Option<Sender>,
    pool: Arc<IdleConns>,
    worker: usize,
}

impl Lease {
    /// Gives the connection back for reuse: call only once the response is complete.
    pub fn release(mut self) {
        if let Some(s) = self.sender.take() {
            self.pool.put(self.worker, s);
        }
    }
}

/// Why a request got no response from a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The backend could not be reached; the request was not sent.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed (certificate not trusted or not for the name, no common
    /// protocol); the request was not sent.
    #[error("TLS handshake with {name} failed: {cause}")]
    Tls { name: String, cause: std::io::Error },
    /// The request was (maybe partly) sent, then the exchange failed.
    #[error("{0}")]
    Exchange(#[from] hyper::Error),
}

impl UpstreamError {
    /// True when the backend never saw the request.
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::ConnectTimeout(_)
                | UpstreamError::Tls { .. }
        )
    }
}

async fn connect(
    addr: &str,
    resolved: Option<SocketAddr>,
    timeout: Duration,
    transport: &Transport,
) -> Result<Sender, UpstreamError> {
    let started = Instant::now();
    let connecting = async {
        match resolved {
            Some(a) => TcpStream::connect(a).await,
            None => TcpStream::connect(addr).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
        .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    match transport {
        Transport::Plain => handshake(stream).await,
        Transport::Tls { connector, name } => {
            // The handshake gets what the TCP connect left of the timeout.
            let left = timeout.saturating_sub(started.elapsed());
            let stream = tokio::time::timeout(left, connector.connect(name.clone(), stream))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
                .map_err(|cause| UpstreamError::Tls {
                    name: name.to_str().into_owned(),
                    cause,
                })?;
            handshake(stream).await
        }
    }
}

/// The HTTP/1.1 handshake on a connected stream, its connection driven by a task of its own.
async fn handshake<S>(stream: S) -> Result<Sender, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Exchange)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(cause = %e, "backend connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `req` to the backend at `addr` on a pooled connection of this worker, or a new one.
pub async fn send(
    pool: &Arc<IdleConns>,
    worker: usize,
    addr: &str,
    resolved: Option<SocketAddr>,
    connect_timeout: Duration,
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Lease), (UpstreamError, Option<Request<UpstreamBody>>)> {
    for _ in 0..MAX_STALE_TRIES {
        let Some(mut sender) = pool.take(worker) else {
            break;
        };
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok((resp, lease(pool, worker, sender))),
            Err(mut e) => match e.take_message() {
                // Not written: the connection was going away. Try the next one.
                Some(r) => req = r,
                None => return Err((UpstreamError::Exchange(e.into_error()), None)),
            },
        }
    }
    // A request that never left is handed back, so the caller can send it elsewhere.
    let mut sender = match connect(addr, resolved, connect_timeout, &pool.transport).await {
        Ok(s) => s,
        Err(e) => return Err((e, Some(req))),
    };
    match sender.try_send_request(req).await {
        Ok(resp) => Ok((resp, lease(pool, worker, sender))),
        Err(mut e) => {
            let returned = e.take_message();
            Err((UpstreamError::Exchange(e.into_error()), returned))
        }
    }
}

fn lease(pool: &Arc<IdleConns>, worker: usize, sender: Sender) -> Lease {
    Lease {
        sender: Some(sender),
        pool: Arc::clone(pool),
        worker,
    }
}
