//! Connections to backends: HTTP/1.1 keep-alive connections pooled per backend and per worker
//! thread, so a request and its connection stay on one thread and the pool is a plain list
//! behind an uncontended lock (no hashing, no shared queue).
//!
//! The exchange runs in the task that serves the client: the request is written, the response
//! head read and parsed, and the response body read from the backend's socket as the client's
//! connection asks for it. No task or channel sits between the two connections.
//!
//! Requests are written at the end of a turn of the worker's event loop, together, as HAProxy
//! orders its work (every receive, then every send), so a backend can take the requests of a
//! turn on one wake-up.
//!
//! A connection is leased for one request and returns to its list when the response body has
//! been read to the end; a body abandoned half-way takes its connection with it, since the rest
//! of the body would still be in flight on it. Before a pooled connection is used, it is checked
//! for anything the backend sent while it sat idle (a close, usually): such a connection is
//! dropped and the request, not yet written, goes on another. A request whose head could not be
//! written is handed back too: the backend cannot have acted on it, whatever its method.
//!
//! With `backend_tls` on, new connections run a TLS handshake after the TCP connect, within the
//! same connect timeout; a failed handshake (unknown CA, wrong name) is a connect failure like a
//! refused connection.
//!
//! Responses are framed as RFC 9112 section 6.3 says: none for HEAD, 1xx, 204 and 304; chunked
//! when that is the last transfer coding; otherwise `Content-Length` (conflicting values are an
//! error); otherwise until the backend closes. A connection is reused only after an HTTP/1.1
//! response without `Connection: close`, read exactly to its end.

pub mod request_body;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::clock::Stall;
use request_body::{ClientBodyError, RequestBody};

/// Idle connections are closed after this long: below the usual 60-75 s keep-alive timeout of
/// backend servers, so the pool rarely hands out a connection the backend is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// Most idle connections kept per backend and worker; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Pooled connections found closed before a request was written, tried before opening a new
/// connection.
const MAX_STALE_TRIES: usize = 4;

/// Largest response head accepted from a backend.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields accepted in a response head.
const MAX_HEADERS: usize = 128;

/// Longest chunk-size line (size and extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// A backend connection's byte stream.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to a backend, with what has been read from it and not yet used.
struct Conn {
    io: Io,
    buf: BytesMut,
}

impl Conn {
    fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Reads more bytes into the buffer; `Ready(Ok(0))` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    /// True when the backend closed the connection, or sent something unasked, while it was
    /// idle. Costs no system call unless the socket has signalled something since the last read.
    /// (A pooled connection's buffer is empty: see [`Body::finish`].)
    fn is_gone(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // The signal may be left over from the last response; a read tells.
            Poll::Ready(Ok(())) => !matches!(self.poll_fill(&mut cx), Poll::Pending),
        }
    }
}

struct Idle {
    conn: Conn,
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
    fn take(&self, worker: usize) -> Option<Conn> {
        let mut list = self.list(worker);
        while let Some(mut idle) = list.pop_back() {
            if idle.since.elapsed() < POOL_IDLE && !idle.conn.is_gone() {
                return Some(idle.conn);
            }
        }
        None
    }

    fn put(&self, worker: usize, conn: Conn) {
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
        )
    }
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

fn eof(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, msg.into())
}

async fn connect(
    addr: &str,
    resolved: Option<SocketAddr>,
    timeout: Duration,
    transport: &Transport,
) -> Result<Conn, UpstreamError> {
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
        Transport::Plain => Ok(Conn::new(Io::Plain(stream))),
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
            Ok(Conn::new(Io::Tls(Box::new(stream))))
        }
    }
}

/// Where a connection goes back once its response has been read to the end.
struct Home {
    pool: Arc<IdleConns>,
    worker: usize,
}

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
struct Deadline {
    at: Instant,
    after: Duration,
}

/// Sends `req` to the backend at `addr` on a pooled connection of this worker, or a new one.
/// On failure, a request that the backend cannot have seen is handed back, so the caller can
/// send it elsewhere.
pub async fn send(
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
    // request (README, Performance). Waiting before a connection is taken from the pool also
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
    let connecting = Box::pin(connect(addr, resolved, timeouts.connect, &pool.transport));
    let connected = match deadline {
        Some(d) => match tokio::time::timeout_at(d.at, connecting).await {
            Ok(c) => c,
            Err(_) => return Err((UpstreamError::Timeout(d.after), Some(req))),
        },
        None => connecting.await,
    };
    match connected {
        Ok(conn) => exchange(conn, req, pool, worker, deadline, timeouts.body_idle).await,
        Err(e) => Err((e, Some(req))),
    }
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    None,
    Raw,
    Chunked,
}

/// A request head encoded for the wire once: a retry of a request without a body sends the
/// same bytes again, a refcount rather than a copy of its fields.
#[derive(Clone)]
pub struct Head {
    bytes: Bytes,
    head_only: bool,
}

/// A request ready to go to a backend: its head, and its body with the framing chosen for it.
pub struct Outgoing {
    head: Head,
    /// A `Host` field to add (the backend's own name, for a client that sent none).
    host: Option<HeaderValue>,
    out: Out,
    body: RequestBody,
}

impl Outgoing {
    /// Encodes `parts` as an HTTP/1.1 head with an origin-form target and the framing `body`
    /// needs: none, the client's `Content-Length`, an exact size, or chunked.
    pub fn new(parts: &http::request::Parts, body: RequestBody) -> Outgoing {
        Outgoing::with_fields(parts, &[], body)
    }

    /// As [`Outgoing::new`], with `set`'s fields in place of any of the same names in `parts`
    /// (a name with `None` is left out).
    pub fn with_fields(
        parts: &http::request::Parts,
        set: &[(&HeaderName, Option<&HeaderValue>)],
        body: RequestBody,
    ) -> Outgoing {
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .as_bytes(),
        );
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let own = parts
            .headers
            .iter()
            .filter(|(name, _)| !set.iter().any(|(n, _)| n == name));
        let ours = set.iter().filter_map(|(n, v)| Some((*n, (*v)?)));
        for (name, value) in own.chain(ours) {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let mut out = Out::Raw;
        if body.is_end_stream() {
            out = Out::None;
            let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
            if !has_length && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                head.extend_from_slice(b"content-length: 0\r\n");
            }
        } else if parts.headers.contains_key(header::CONTENT_LENGTH) {
            // The client's length, which its connection enforces.
        } else if let Some(n) = body.size_hint().exact() {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        } else {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            out = Out::Chunked;
        }
        head.extend_from_slice(b"\r\n");
        Outgoing {
            head: Head {
                bytes: Bytes::from(head),
                head_only: parts.method == Method::HEAD,
            },
            host: None,
            out,
            body,
        }
    }

    /// The same request again, without a body: for a request that had none.
    pub fn again(head: &Head) -> Outgoing {
        Outgoing {
            head: head.clone(),
            host: None,
            out: Out::None,
            body: RequestBody::empty(),
        }
    }

    /// The encoded head, to send again later.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Adds `Host: host` to the head when it is written.
    pub fn set_host(&mut self, host: HeaderValue) {
        self.host = Some(host);
    }

    /// The bytes to write: the head, with the `Host` field when one is set.
    fn wire(&self) -> std::borrow::Cow<'_, [u8]> {
        let bytes = &self.head.bytes[..];
        match &self.host {
            None => std::borrow::Cow::Borrowed(bytes),
            Some(host) => {
                let end = bytes.len() - 2;
                let mut v = Vec::with_capacity(bytes.len() + host.len() + 8);
                v.extend_from_slice(&bytes[..end]);
                v.extend_from_slice(b"host: ");
                v.extend_from_slice(host.as_bytes());
                v.extend_from_slice(b"\r\n\r\n");
                std::borrow::Cow::Owned(v)
            }
        }
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
    let written = async {
        conn.io.write_all(&req.wire()).await?;
        conn.io.flush().await
    };
    let written = match deadline {
        Some(d) => tokio::time::timeout_at(d.at, written)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        None => written.await,
    };
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::TimedOut
            && let Some(d) = deadline
        {
            // The head may be partly written: the request cannot go elsewhere.
            return Err((UpstreamError::Timeout(d.after), None));
        }
        return Err((UpstreamError::Write(e), Some(req)));
    }
    let Outgoing {
        head, out, body, ..
    } = req;
    let head_only = head.head_only;
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
        let head = poll_head(&mut conn, head_only, cx).map(|r| {
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
    let (resp, framing, reusable) = parsed.map_err(|e| (e, None))?;
    let home = reusable.then(|| Home {
        pool: Arc::clone(pool),
        worker,
    });
    Ok(resp.map(|()| Body::new(conn, framing, home, upload, idle_timeout)))
}

/// What a request body upload is doing.
enum Sending {
    /// Reading the client's body and writing it on.
    Frames,
    /// The client's body is done; writing what is left, then flushing.
    Last,
    /// Stopped short: the backend stopped reading, or the client's body failed. The request
    /// never went out whole, so its connection is not reused.
    Failed,
}

/// A request body on its way to the backend, driven by whoever waits on the response.
struct Upload {
    body: RequestBody,
    out: Out,
    /// Framed bytes not yet written.
    pending: Bytes,
    state: Sending,
    /// The write error, once the backend stopped reading.
    failed: Option<std::io::Error>,
}

impl Upload {
    /// Moves the body on as far as the client and the backend allow; `Ready(Ok)` when all of it
    /// is written.
    fn poll(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        if matches!(self.state, Sending::Failed) {
            return Poll::Pending;
        }
        loop {
            while !self.pending.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, &self.pending) {
                    Poll::Ready(Ok(0)) => {
                        return self.fail(std::io::ErrorKind::WriteZero.into());
                    }
                    Poll::Ready(Ok(n)) => self.pending.advance(n),
                    Poll::Ready(Err(e)) => return self.fail(e),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if matches!(self.state, Sending::Last) {
                return match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => self.fail(e),
                    Poll::Pending => Poll::Pending,
                };
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not forwarded.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.pending = if self.out == Out::Chunked {
                        let mut framed = BytesMut::with_capacity(data.len() + 20);
                        framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        framed.extend_from_slice(&data);
                        framed.extend_from_slice(b"\r\n");
                        framed.freeze()
                    } else {
                        data
                    };
                }
                Poll::Ready(Some(Err(e))) => {
                    self.state = Sending::Failed;
                    return Poll::Ready(Err(UpstreamError::RequestBody(e)));
                }
                Poll::Ready(None) => {
                    self.state = Sending::Last;
                    if self.out == Out::Chunked {
                        self.pending = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn fail(&mut self, e: std::io::Error) -> Poll<Result<(), UpstreamError>> {
        self.state = Sending::Failed;
        self.failed = Some(e);
        Poll::Ready(Err(UpstreamError::Exchange(std::io::Error::other(
            "the backend stopped reading the request body",
        ))))
    }
}

/// How a response body is delimited.
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Reads and parses the response head (skipping interim 1xx responses). Also says whether the
/// connection may carry another request once the body is read.
fn poll_head(
    conn: &mut Conn,
    head_only: bool,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<(Response<()>, Framing, bool)>> {
    loop {
        if let Some(parsed) = parse_head(conn, head_only)? {
            return Poll::Ready(Ok(parsed));
        }
        if conn.buf.len() > MAX_HEAD_BYTES {
            return Poll::Ready(Err(invalid(format!(
                "backend response head is larger than {MAX_HEAD_BYTES} bytes"
            ))));
        }
        if std::task::ready!(conn.poll_fill(cx))? == 0 {
            return Poll::Ready(Err(eof(if conn.buf.is_empty() {
                "backend closed the connection without answering"
            } else {
                "backend closed the connection in the middle of the response head"
            })));
        }
    }
}

/// One response head from the buffer, if it holds a complete one that is not interim.
fn parse_head(
    conn: &mut Conn,
    head_only: bool,
) -> std::io::Result<Option<(Response<()>, Framing, bool)>> {
    loop {
        if conn.buf.is_empty() {
            return Ok(None);
        }
        // Left uninitialised: the parser writes only the fields it finds.
        let mut fields =
            [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len =
            match config.parse_response_with_uninit_headers(&mut parsed, &conn.buf, &mut fields) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(invalid(format!(
                        "backend response has more than {MAX_HEADERS} header fields"
                    )));
                }
                Err(e) => return Err(invalid(format!("malformed backend response head: {e}"))),
            };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| invalid(format!("backend response status {code} is not valid")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid(
                "backend switched protocols, which is not supported",
            ));
        }
        if status.is_informational() {
            conn.buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Values are slices of the head, so no field is copied. Hop-by-hop fields (RFC 9110
        // section 7.6.1: the classic set, Connection and the fields it names) are read here, for
        // framing and reuse, and left out of the response passed on.
        let base = conn.buf.as_ptr() as usize;
        let mut spans = Vec::with_capacity(parsed.headers.len());
        let mut close = false;
        let mut named: Vec<HeaderName> = Vec::new();
        let mut transfer_encoding: Option<&[u8]> = None;
        for f in parsed.headers.iter() {
            let name = HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| invalid(format!("backend header name {:?} is not valid", f.name)))?;
            if name == header::CONNECTION {
                for token in f.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive")
                        && let Ok(n) = HeaderName::from_bytes(token)
                    {
                        named.push(n);
                    }
                }
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                transfer_encoding = Some(f.value);
            }
            if is_hop_by_hop(&name) {
                continue;
            }
            let start = f.value.as_ptr() as usize - base;
            spans.push((name, start, start + f.value.len()));
        }
        let framing = framing(status, transfer_encoding, parsed.headers, head_only)?;
        let reusable =
            version == Version::HTTP_11 && !matches!(framing, Framing::UntilClose) && !close;
        let raw = conn.buf.split_to(len).freeze();
        // Room for the fields the proxy adds (request id, rate-limit and cache headers).
        let mut headers = HeaderMap::with_capacity(spans.len() + 8);
        for (name, start, end) in spans {
            let value = HeaderValue::from_maybe_shared(raw.slice(start..end))
                .map_err(|_| invalid(format!("backend header {name} has an invalid value")))?;
            headers.append(name, value);
        }
        for n in named {
            headers.remove(n);
        }
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        return Ok(Some((resp, framing, reusable)));
    }
}

/// Fields that describe one connection rather than the message (RFC 9110 section 7.6.1), never
/// passed on by a proxy; fields named in `Connection` are too.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// RFC 9112 section 6.3, from the last `Transfer-Encoding` field and the `Content-Length` ones.
fn framing(
    status: StatusCode,
    transfer_encoding: Option<&[u8]>,
    fields: &[httparse::Header<'_>],
    head_only: bool,
) -> std::io::Result<Framing> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if let Some(te) = transfer_encoding {
        let last = te.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii);
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length: Option<u64> = None;
    for f in fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("content-length"))
    {
        for part in std::str::from_utf8(f.value).unwrap_or("x").split(',') {
            let part = part.trim();
            let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| invalid("backend sent an invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("backend sent conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// Where a chunked body's reading is.
#[derive(Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line; bytes of them seen so far.
    Trailers(usize),
}

enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    /// Read to its end.
    Done,
    /// Cut short (the backend closed early, or sent something malformed): not an end, so
    /// nothing takes it for a complete body.
    Failed,
}

/// Longest a request body the backend did not take is read and dropped after its response, so
/// that the client, still sending, gets that response rather than a reset connection.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A backend's response body, read from its connection as the client's side asks for it.
pub struct Body {
    conn: Option<Conn>,
    state: State,
    home: Option<Home>,
    /// The rest of the request body, when the response started before it was all sent.
    upload: Option<Upload>,
    /// Longest wait for the backend's next bytes (none: no limit).
    idle_timeout: Option<Duration>,
    /// Times a wait on the backend.
    stall: Stall,
    /// The client's request body failed while the response streamed: whatever becomes of the
    /// response is not the backend's doing.
    client_fault: bool,
}

impl Body {
    /// The backend broke off this body: its connection failed or closed before the end, it
    /// stalled past the idle timeout, or its framing could not be read.
    pub fn failed(&self) -> bool {
        matches!(self.state, State::Failed) && !self.client_fault
    }

    fn new(
        conn: Conn,
        framing: Framing,
        home: Option<Home>,
        upload: Option<Upload>,
        idle_timeout: Option<Duration>,
    ) -> Body {
        let mut body = Body {
            upload,
            idle_timeout,
            stall: Stall::default(),
            client_fault: false,
            conn: Some(conn),
            state: match framing {
                Framing::Empty => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::Chunked(Chunk::Size),
                Framing::UntilClose => State::UntilClose,
            },
            home,
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body is complete: its connection goes back to the pool if it can carry another
    /// request, the request went out whole and nothing beyond the response was received.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take())
            && conn.buf.is_empty()
            && self.upload.is_none()
        {
            home.pool.put(home.worker, conn);
        }
    }

    /// Reads more from the backend; an error if it closed the connection before the end.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err(eof("backend connection already closed")));
        };
        match conn.poll_fill(cx) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(eof(
                "backend closed the connection before the end of the response body",
            ))),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waiting on the backend: pending until it has sent nothing for the idle timeout, then the
    /// body fails (the client sees its response cut short, as when the backend closes early)
    /// and the connection is dropped. The timer starts with the wait, so a body the client
    /// reads slowly is not cut, and only a body that waits pays for one.
    fn poll_stall(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let Some(idle) = self.idle_timeout else {
            return Poll::Pending;
        };
        if !self.stall.expired(cx, idle) {
            return Poll::Pending;
        }
        self.conn = None;
        self.state = State::Failed;
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "backend sent nothing for {} ms in the middle of the response body",
                idle.as_millis()
            ),
        ))))
    }

    /// Decodes from the buffer what can be: a data chunk, the end, or nothing yet.
    fn decode(&mut self) -> std::io::Result<Option<Option<Bytes>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(Some(None));
            };
            let buf = &mut conn.buf;
            match self.state {
                State::Done | State::Failed => return Ok(Some(None)),
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(buf.split().freeze())));
                }
                State::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let (data, left) = take_up_to(buf, left);
                    self.state = State::Length(left);
                    if left == 0 {
                        self.finish();
                    }
                    return Ok(Some(Some(data)));
                }
                State::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let (data, left) = take_up_to(buf, left);
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(Some(data)));
                }
                State::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("backend chunk data is not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::Chunked(Chunk::Size);
                }
                State::Chunked(Chunk::Size) => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(invalid("backend chunk-size line is too long"));
                        }
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 1);
                    self.state = State::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                State::Chunked(Chunk::Trailers(seen)) => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        if seen + buf.len() > MAX_TRAILERS {
                            return Err(invalid("backend trailer section is too large"));
                        }
                        return Ok(None);
                    };
                    let empty = end == 0 || (end == 1 && buf[0] == b'\r');
                    buf.advance(end + 1);
                    if empty {
                        self.finish();
                        return Ok(Some(None));
                    }
                    // Trailer fields are not forwarded.
                    self.state = State::Chunked(Chunk::Trailers(seen + end + 1));
                }
            }
        }
    }
}

/// Up to `left` bytes from the front of `buf`, and how many are left after them.
fn take_up_to(buf: &mut BytesMut, left: u64) -> (Bytes, u64) {
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    (buf.split_to(n).freeze(), left - n as u64)
}

impl Drop for Body {
    fn drop(&mut self) {
        // A backend that answered before taking the whole request body (a 413, say): the rest
        // is read and dropped, within its size limit and DRAIN_TIME, so the client's connection
        // closes cleanly or even stays open, instead of being reset under the answer.
        let Some(up) = self.upload.take() else {
            return;
        };
        if matches!(up.state, Sending::Last) || up.body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = up.body;
        runtime.spawn(async move {
            let drain = async { while let Some(Ok(_)) = rest.frame().await {} };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

/// The size on a chunk-size line (hex digits, then optional extensions), without its LF.
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits..];
    let rest_ok = rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t');
    if digits == 0 || digits > 16 || !rest_ok {
        return Err(invalid("backend sent an invalid chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| invalid("invalid chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| invalid("backend sent an invalid chunk size"))
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        // An upload that fails stays in place, so the connection is not reused; whatever the
        // backend still sends is passed on.
        if let (Some(up), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            match up.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Ready(Err(UpstreamError::RequestBody(_))) => this.client_fault = true,
                Poll::Ready(Err(_)) | Poll::Pending => {}
            }
        }
        loop {
            match this.decode() {
                Ok(Some(Some(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(None)) => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    this.state = State::Failed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match this.poll_more(cx) {
                Poll::Ready(Ok(())) => this.stall.progress(),
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    if matches!(this.state, State::UntilClose)
                        && e.kind() == std::io::ErrorKind::UnexpectedEof
                    {
                        // Delimited by the close: this is its end.
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    this.state = State::Failed;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => return this.poll_stall(cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1a\r").unwrap(), 26);
        assert_eq!(chunk_size(b"0").unwrap(), 0);
        assert_eq!(chunk_size(b"FF;name=value\r").unwrap(), 255);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"zz\r").is_err());
        assert!(chunk_size(b"1x\r").is_err());
        assert!(chunk_size(b"11111111111111111\r").is_err());
    }

    /// Framing of a head with these fields, as parsed.
    fn framing_of(
        status: StatusCode,
        pairs: &[(&'static str, &'static str)],
        head_only: bool,
    ) -> std::io::Result<Framing> {
        let fields: Vec<httparse::Header<'_>> = pairs
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect();
        let te = pairs
            .iter()
            .rev()
            .find(|(n, _)| *n == "transfer-encoding")
            .map(|(_, v)| v.as_bytes());
        framing(status, te, &fields, head_only)
    }

    #[test]
    fn responses_are_framed_as_rfc_9112_says() {
        let ok = StatusCode::OK;
        let f = |h: &[(&'static str, &'static str)]| framing_of(ok, h, false);
        assert!(matches!(
            f(&[("content-length", "12")]),
            Ok(Framing::Length(12))
        ));
        assert!(matches!(
            f(&[("content-length", "12, 12")]),
            Ok(Framing::Length(12))
        ));
        assert!(f(&[("content-length", "12, 13")]).is_err());
        assert!(f(&[("content-length", "-1")]).is_err());
        assert!(f(&[("content-length", "+5")]).is_err());
        assert!(matches!(
            f(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "5")
            ]),
            Ok(Framing::Chunked)
        ));
        assert!(matches!(
            f(&[("transfer-encoding", "gzip")]),
            Ok(Framing::UntilClose)
        ));
        assert!(matches!(f(&[]), Ok(Framing::UntilClose)));
        assert!(matches!(
            framing_of(ok, &[("content-length", "12")], true),
            Ok(Framing::Empty)
        ));
        assert!(matches!(
            framing_of(StatusCode::NOT_MODIFIED, &[], false),
            Ok(Framing::Empty)
        ));
    }
}
