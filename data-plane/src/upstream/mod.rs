//! Connections to backends: HTTP/1.1 keep-alive connections pooled per backend and per worker
//! thread ([`pool`]), so a request and its connection stay on one thread.
//!
//! The exchange runs in the task that serves the client: the request is written, the response
//! head read and parsed, and the response body read from the backend's socket as the client's
//! connection asks for it. No task or channel sits between the two connections.
//!
//! Requests are written at the end of a turn of the worker's event loop, together, as HAProxy
//! orders its work (every receive, then every send), so a backend can take the requests of a
//! turn on one wake-up.
//!
//! A pooled connection found closed before its request was written is dropped and the request
//! goes on another. A request whose head could not be written is handed back too: the backend
//! cannot have acted on it, whatever its method.
//!
//! - [`conn`]: one connection, plain or TLS, and opening one.
//! - [`pool`]: idle connections per backend and worker.
//! - [`encode`]: the request head for the wire, and the upload of its body.
//! - [`parse`]: response heads, framing and body decoding, as pure functions of the bytes.
//! - [`body`]: the response body, read as the client asks for it.
//! - [`request_body`]: the client's request body, bounded in size and time.

pub mod body;
pub mod conn;
pub mod encode;
pub mod h2;
pub mod parse;
#[cfg(test)]
pub(crate) mod parse_props;
pub mod pool;
#[cfg(test)]
mod pool_tests;
pub mod request_body;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use lb_proto::validate::BackendProtocol;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

pub use body::{Body, Http1Body};
pub use conn::Transport;
pub use encode::{Head, Outgoing};
pub use parse::is_hop_by_hop;
pub use pool::IdleConns;

use conn::{Conn, connect, poll_head};
use encode::{Out, Sending, Upload};
use pool::Home;
use request_body::ClientBodyError;

/// Pooled connections found closed before a request was written, tried before opening a new
/// connection.
const MAX_STALE_TRIES: usize = 4;

/// The timeouts of one exchange with a backend.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Opening a connection (and its TLS handshake).
    pub connect: Duration,
    /// The whole request, until the response head (none: no limit).
    pub request: Option<Duration>,
    /// The longest wait for each next part of the response body (none: no limit).
    pub body_idle: Option<Duration>,
}

/// When the response head must be in, and the timeout it comes from.
#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) after: Duration,
}

/// Sends `req` to the backend at `addr` (`host:port`) on a pooled connection of this worker, or
/// a new one (for an HTTP/2 backend, as a stream of this worker's connection). On failure, a
/// request that the backend cannot have seen is handed back, so the caller can send it
/// elsewhere.
///
/// An `https://` backend is spoken to in what its TLS handshake settles on (ALPN): until one
/// has, the request opens an HTTP/1.1-pool connection and looks; a handshake that settles
/// otherwise than the last sends the request the other way.
pub async fn send(
    pool: &Arc<IdleConns>,
    worker: usize,
    addr: &str,
    resolved: Option<SocketAddr>,
    timeouts: Timeouts,
    mut req: Outgoing,
) -> Result<Response<Body>, (UpstreamError, Option<Outgoing>)> {
    for _ in 0..2 {
        let sent = if pool.speaks_h2() == Some(true) {
            if req.head().upgrade {
                return Err((UpstreamError::NoUpgrade, Some(req)));
            }
            let to_http1 = |conn| {
                pool.learn(false);
                pool.put(worker, conn);
            };
            let backend = h2::Backend {
                conns: &pool.h2,
                transport: pool.transport(),
                to_http1: &to_http1,
            };
            Box::pin(h2::send(backend, worker, addr, resolved, timeouts, req))
                .await
                .map(|resp| resp.map(Body::Http2))
        } else {
            http1(pool, worker, addr, resolved, timeouts, req).await
        };
        match sent {
            Err((UpstreamError::ProtocolChanged, Some(r))) => req = r,
            done => return done,
        }
    }
    Err((UpstreamError::ProtocolChanged, Some(req)))
}

/// [`send`] in HTTP/1.1.
async fn http1(
    pool: &Arc<IdleConns>,
    worker: usize,
    addr: &str,
    resolved: Option<SocketAddr>,
    timeouts: Timeouts,
    mut req: Outgoing,
) -> Result<Response<Body>, (UpstreamError, Option<Outgoing>)> {
    let deadline = timeouts.request.map(|after| Deadline {
        at: Instant::now() + after,
        after,
    });
    // Sent once every other task the event loop has ready has run: the requests one turn of
    // the loop produces then reach each backend back to back, and the backend can take them
    // on one wake-up rather than one each. The request waits one turn of the loop at most
    // (microseconds when idle); under load it saves the proxy and its backends CPU on every
    // request (docs/performance.md). Waiting before a connection is taken from the pool also
    // means the check for a backend's close is as fresh as it can be.
    tokio::task::yield_now().await;
    for _ in 0..MAX_STALE_TRIES {
        let Some(conn) = pool.take(worker) else {
            break;
        };
        match exchange(conn, req, pool, worker, deadline, timeouts.body_idle).await {
            // Not written: the connection was going away. Try the next one.
            Err((UpstreamError::Write(_), Some(r))) => req = r,
            done => return done,
        }
    }
    // Boxed: a connect (with its TLS handshake) is a large future, and rare on pooled
    // connections; inline it would make every request's future, moved per request, that large.
    let connecting = Box::pin(connect(addr, resolved, timeouts.connect, pool.transport()));
    let connected = match deadline {
        Some(d) => match tokio::time::timeout_at(d.at, connecting).await {
            Ok(c) => c,
            Err(_) => return Err((UpstreamError::Timeout(d.after), Some(req))),
        },
        None => connecting.await,
    };
    let conn = match connected {
        Ok(conn) => conn,
        Err(e) => return Err((e, Some(req))),
    };
    if pool.protocol() == BackendProtocol::Https {
        let h2 = conn.io.speaks_h2();
        pool.learn(h2);
        if h2 {
            // The connection serves the backend's HTTP/2 streams from now on.
            let adopted = Box::pin(pool.h2.adopt(worker, conn, addr, timeouts.connect)).await;
            return Err(match adopted {
                Err(e) => (e, Some(req)),
                Ok(()) if req.head().upgrade => (UpstreamError::NoUpgrade, Some(req)),
                Ok(()) => (UpstreamError::ProtocolChanged, Some(req)),
            });
        }
    }
    exchange(conn, req, pool, worker, deadline, timeouts.body_idle).await
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
    /// The request head could not be written: the backend has not seen the request.
    #[error("writing the request: {0}")]
    Write(std::io::Error),
    /// The client's request body failed (too large, too slow, badly framed, or the client went
    /// away) while it was being sent: the client's fault, not the backend's.
    #[error("reading the request body: {0}")]
    RequestBody(ClientBodyError),
    /// No response head within the request timeout, with nothing left to wait for from the
    /// client.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The request was (maybe partly) sent, then the exchange failed.
    #[error("{0}")]
    Exchange(std::io::Error),
    /// The request asks to switch protocols, which an HTTP/2 backend cannot do (no request
    /// was sent).
    #[error("the backend speaks HTTP/2, which cannot switch protocols")]
    NoUpgrade,
    /// The TLS handshake with an `https://` backend settled on another protocol than the last
    /// one (no request was sent); the request goes again in that protocol.
    #[error("the backend's TLS handshake settled on another protocol")]
    ProtocolChanged,
}

impl UpstreamError {
    /// True when the backend never saw the request.
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::ConnectTimeout(_)
                | UpstreamError::Tls { .. }
                | UpstreamError::Write(_)
                | UpstreamError::NoUpgrade
                | UpstreamError::ProtocolChanged
        )
    }
}

/// Writes the request and reads the response head on `conn`. A request body is sent while the
/// response is awaited and, if the response starts first, while it streams (a backend may echo
/// a body as it reads it).
///
/// When the deadline passes with the upload waiting for more of the client's body, the client
/// is the one late: that is its failure ([`UpstreamError::RequestBody`]), not the backend's.
async fn exchange(
    mut conn: Conn,
    req: Outgoing,
    pool: &Arc<IdleConns>,
    worker: usize,
    deadline: Option<Deadline>,
    idle_timeout: Option<Duration>,
) -> Result<Response<Body>, (UpstreamError, Option<Outgoing>)> {
    if let Err(e) = write_head(&mut conn, &req, deadline).await {
        // A head partly written within the deadline cannot go elsewhere.
        let returned = (!matches!(e, UpstreamError::Timeout(_))).then_some(req);
        return Err((e, returned));
    }
    let Outgoing {
        head, out, body, ..
    } = req;
    let (head_only, upgrade) = (head.head_only, head.upgrade);
    let mut upload = (out != Out::None).then(|| Upload {
        body,
        out,
        pending: Bytes::new(),
        state: Sending::Frames,
        failed: None,
    });

    let mut timer = pin!(deadline.map(|d| tokio::time::sleep_until(d.at)));
    let parsed = std::future::poll_fn(|cx| {
        if let Some(up) = upload.as_mut() {
            match up.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => upload = None,
                // The client's body failed: the request cannot be completed.
                Poll::Ready(Err(e @ UpstreamError::RequestBody(_))) => return Poll::Ready(Err(e)),
                // The backend stopped reading; it may still have answered.
                Poll::Ready(Err(_)) | Poll::Pending => {}
            }
        }
        let head = poll_head(&mut conn, head_only, upgrade, cx).map(|r| {
            r.map_err(|e| match upload.as_mut().and_then(|u| u.failed.take()) {
                Some(w) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    UpstreamError::Exchange(w)
                }
                _ => UpstreamError::Exchange(e),
            })
        });
        if head.is_pending()
            && let (Some(t), Some(d)) = (timer.as_mut().as_pin_mut(), deadline)
            && t.poll(cx).is_ready()
        {
            return Poll::Ready(Err(match &upload {
                Some(up) if up.body.waiting_on_client() => {
                    UpstreamError::RequestBody(ClientBodyError::TimedOut(d.after))
                }
                _ => UpstreamError::Timeout(d.after),
            }));
        }
        head
    })
    .await;
    let parsed = parsed.map_err(|e| (e, None))?;
    if parsed.switched {
        return Ok(parsed.response.map(|()| Body::Http1(Http1Body::switched(conn))));
    }
    let home = parsed.reusable.then(|| Home {
        pool: Arc::clone(pool),
        worker,
    });
    let framing = parsed.framing;
    Ok(parsed
        .response
        .map(|()| Body::Http1(Http1Body::new(conn, framing, home, upload, idle_timeout))))
}

/// Writes the request's head, within the deadline.
async fn write_head(
    conn: &mut Conn,
    req: &Outgoing,
    deadline: Option<Deadline>,
) -> Result<(), UpstreamError> {
    let written = async {
        conn.io.write_all(&req.wire()).await?;
        conn.io.flush().await
    };
    match deadline {
        Some(d) => match tokio::time::timeout_at(d.at, written).await {
            Ok(w) => w.map_err(UpstreamError::Write),
            Err(_) => Err(UpstreamError::Timeout(d.after)),
        },
        None => written.await.map_err(UpstreamError::Write),
    }
}

/// The failure of a response body the backend sent nothing of for `idle`.
pub(crate) fn stalled(idle: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "backend sent nothing for {} ms in the middle of the response body",
            idle.as_millis()
        ),
    )
}
