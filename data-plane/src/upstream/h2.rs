//! HTTP/2 to backends (`h2c://`, or `https://` when ALPN settles on `h2`): one multiplexed
//! connection per backend and worker thread, written on hyper's HTTP/2 client. Requests share it
//! as streams, up to the backend's `SETTINGS_MAX_CONCURRENT_STREAMS` (past which they wait for a
//! stream to end); a connection found closed is replaced at the next request.
//!
//! A request is encoded for HTTP/1.1 once ([`super::encode`]), whatever its backend speaks; an
//! HTTP/2 backend's request is read back from those bytes: the same fields the proxy set, the
//! `Host` as `:authority`, the framing fields left out (HTTP/2 frames the body itself), and
//! `te: trailers` added, which gRPC servers require and which says trailers are passed through.
//!
//! A request hyper did not send (the connection was going away, the stream was refused) comes
//! back whole, body included, and goes to another backend as a refused connection does.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::conn::{Conn, Transport, connect};
use super::encode::{Head, Outgoing};
use super::request_body::{ClientBodyError, RequestBody};
use super::{Deadline, Timeouts, UpstreamError, stalled};
use crate::clock::Stall;

/// Pings on an idle multiplexed connection, so one the network dropped silently is found
/// before a request is lost on it.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The HTTP/2 connection of one backend, per worker thread.
pub struct H2Conns {
    per_worker: Box<[tokio::sync::Mutex<Option<SendRequest<RequestBody>>>]>,
}

impl H2Conns {
    pub fn new(workers: usize) -> H2Conns {
        H2Conns {
            per_worker: (0..workers.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// This worker's connection, opened (or replaced, when closed) if need be. Requests that
    /// arrive while it opens wait for it rather than open their own. A TLS handshake that
    /// settles on HTTP/1.1 hands its connection to `backend.to_http1` instead.
    async fn sender(
        &self,
        backend: &Backend<'_>,
        worker: usize,
        addr: &str,
        resolved: Option<std::net::SocketAddr>,
        timeout: Duration,
    ) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let mut slot = self.slot(worker).lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let conn = connect(addr, resolved, timeout, backend.transport).await?;
        if matches!(backend.transport, Transport::Tls { .. }) && !conn.io.speaks_h2() {
            (backend.to_http1)(conn);
            return Err(UpstreamError::ProtocolChanged);
        }
        let sender = handshake(conn, addr, timeout).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Makes `conn`, whose TLS handshake settled on HTTP/2, this worker's connection.
    pub(crate) async fn adopt(
        &self,
        worker: usize,
        conn: Conn,
        addr: &str,
        timeout: Duration,
    ) -> Result<(), UpstreamError> {
        let sender = handshake(conn, addr, timeout).await?;
        let mut slot = self.slot(worker).lock().await;
        if slot.as_ref().is_none_or(SendRequest::is_closed) {
            *slot = Some(sender);
        }
        Ok(())
    }

    fn slot(&self, worker: usize) -> &tokio::sync::Mutex<Option<SendRequest<RequestBody>>> {
        &self.per_worker[worker % self.per_worker.len()]
    }

    /// Closes every connection (a backend removed from the configuration): each ends once its
    /// streams in flight do.
    pub fn clear(&self) {
        for slot in &self.per_worker {
            if let Ok(mut s) = slot.try_lock() {
                *s = None;
            }
        }
    }
}

/// The HTTP/2 handshake on a new connection, whose driving task is spawned.
async fn handshake(
    conn: Conn,
    addr: &str,
    timeout: Duration,
) -> Result<SendRequest<RequestBody>, UpstreamError> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .keep_alive_while_idle(true);
    let (sender, connection) = tokio::time::timeout(timeout, builder.handshake(TokioIo::new(conn.io)))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
        .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
    let backend = addr.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%backend, cause = %e, "HTTP/2 connection to the backend ended");
        }
    });
    Ok(sender)
}

/// A backend as its HTTP/2 side sees it: its connections, how new ones are opened, and where a
/// TLS connection that settled on HTTP/1.1 goes.
pub(crate) struct Backend<'a> {
    pub(crate) conns: &'a H2Conns,
    pub(crate) transport: &'a Transport,
    pub(crate) to_http1: &'a (dyn Fn(Conn) + Sync),
}

/// Sends `req` on this worker's connection to `backend` at `addr`.
pub(crate) async fn send(
    backend: Backend<'_>,
    worker: usize,
    addr: &str,
    resolved: Option<std::net::SocketAddr>,
    timeouts: Timeouts,
    req: Outgoing,
) -> Result<Response<H2Body>, (UpstreamError, Option<Outgoing>)> {
    let deadline = timeouts.request.map(|after| Deadline {
        at: tokio::time::Instant::now() + after,
        after,
    });
    let connecting = backend
        .conns
        .sender(&backend, worker, addr, resolved, timeouts.connect);
    let connected = match deadline {
        Some(d) => match tokio::time::timeout_at(d.at, connecting).await {
            Ok(c) => c,
            Err(_) => return Err((UpstreamError::Timeout(d.after), Some(req))),
        },
        None => connecting.await,
    };
    let mut sender = match connected {
        Ok(s) => s,
        Err(e) => return Err((e, Some(req))),
    };
    let mut req = req;
    let body = req.take_body();
    let tls = matches!(backend.transport, Transport::Tls { .. });
    let request = match request(req.head(), req.host(), addr, tls, body) {
        Ok(r) => r,
        Err((e, body)) => {
            req.put_body(body);
            return Err((e, Some(req)));
        }
    };
    let exchange = async {
        if let Err(e) = sender.ready().await {
            let (request, e) = (request, e);
            return Err((UpstreamError::Connect(std::io::Error::other(e)), Some(request)));
        }
        sender
            .try_send_request(request)
            .await
            .map_err(|mut e| {
                let unsent = e.take_message();
                (failure(e.error(), unsent.is_some()), unsent)
            })
    };
    let answered = match deadline {
        Some(d) => match tokio::time::timeout_at(d.at, exchange).await {
            Ok(r) => r,
            Err(_) => return Err((UpstreamError::Timeout(d.after), None)),
        },
        None => exchange.await,
    };
    match answered {
        Ok(resp) => Ok(resp.map(|b| H2Body::new(b, timeouts.body_idle))),
        Err((e, unsent)) => {
            let returned = unsent.map(|r| {
                req.put_body(r.into_body());
                req
            });
            Err((e, returned))
        }
    }
}

/// What a failed exchange was: the client's body failing (its fault), a request never sent,
/// or one the backend may have seen.
fn failure(e: &hyper::Error, unsent: bool) -> UpstreamError {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(body) = c.downcast_ref::<ClientBodyError>() {
            return UpstreamError::RequestBody(body.clone());
        }
        cause = c.source();
    }
    let io = std::io::Error::other(e.to_string());
    if unsent {
        UpstreamError::Write(io)
    } else {
        UpstreamError::Exchange(io)
    }
}

/// The HTTP/2 request of an encoded head: method, path and fields as encoded, the `Host` as
/// `:authority` (else the backend's), `:scheme` as the connection is, no framing fields, and
/// `te: trailers`.
#[allow(clippy::result_large_err)]
fn request(
    head: &Head,
    host: Option<&HeaderValue>,
    backend: &str,
    tls: bool,
    body: RequestBody,
) -> Result<Request<RequestBody>, (UpstreamError, RequestBody)> {
    let bytes = head.bytes();
    let lines = bytes.windows(2).filter(|w| w == b"\r\n").count();
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let mut parsed = httparse::Request::new(&mut fields);
    let invalid = |what: String| UpstreamError::Write(std::io::Error::other(what));
    match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err((invalid("the request head cannot be read back".into()), body)),
    }
    let mut authority = host.map(|h| h.as_bytes().to_vec());
    let mut req = Request::new(body);
    for f in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(f.name.as_bytes()) else {
            continue;
        };
        if name == header::HOST {
            authority.get_or_insert_with(|| f.value.to_vec());
            continue;
        }
        if matches!(
            name,
            header::TRANSFER_ENCODING | header::CONNECTION | header::UPGRADE | header::TE
        ) {
            continue;
        }
        if let Ok(v) = HeaderValue::from_bytes(f.value) {
            req.headers_mut().append(name, v);
        }
    }
    req.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    let authority = authority.unwrap_or_else(|| backend.as_bytes().to_vec());
    let uri = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(parsed.path.unwrap_or("/"))
        .build();
    let method = parsed.method.and_then(|m| http::Method::from_bytes(m.as_bytes()).ok());
    match (uri, method) {
        (Ok(uri), Some(method)) => {
            *req.uri_mut() = uri;
            *req.method_mut() = method;
            *req.version_mut() = http::Version::HTTP_2;
            Ok(req)
        }
        (uri, _) => {
            let why = uri.err().map_or("bad method".to_owned(), |e| e.to_string());
            let (_, body) = req.into_parts();
            Err((invalid(format!("the request cannot go over HTTP/2: {why}")), body))
        }
    }
}

/// A backend's response body over HTTP/2, trailers included, with the idle timeout.
pub struct H2Body {
    inner: Incoming,
    idle_timeout: Option<Duration>,
    stall: Stall,
    /// The stream was reset, the connection lost, or the backend stalled past the timeout.
    failed: bool,
}

impl H2Body {
    fn new(inner: Incoming, idle_timeout: Option<Duration>) -> H2Body {
        H2Body {
            inner,
            idle_timeout,
            stall: Stall::default(),
            failed: false,
        }
    }

    /// The backend broke off this body.
    pub fn failed(&self) -> bool {
        self.failed
    }
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall.progress();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.idle_timeout {
                Some(idle) if this.stall.expired(cx, idle) => {
                    this.failed = true;
                    Poll::Ready(Some(Err(stalled(idle))))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
