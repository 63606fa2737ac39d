//! A request body on its way to a backend: the client's, streamed, or a fixed one made here
//! (health checks, background refreshes).
//!
//! The client's body is watched on its way through: past the size limit, past its deadline, cut
//! off by the client or unreadable in its framing, it fails with a [`ClientBodyError`], so the
//! request path can charge the failure to the client (400, 408, 413) and leave every statistic
//! of the backend it was going to alone. The deadline's timer is armed only when the body has to
//! wait for the client: a body that arrives with its head costs no timer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::server::http1::body::{Body as Http1Body, BodyError};
use tokio::time::{Instant, Sleep};

/// Why a client's request body could not be read to its end. Every case is the client's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    /// More than the configured largest body.
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The client's framing could not be read (a bad chunk size, say).
    #[error("request body framing is invalid: {0}")]
    Invalid(String),
    /// The client closed its connection or reset its stream before the body's end.
    #[error("the client stopped sending its request body before its end")]
    Aborted,
    /// The body did not arrive within this time of the request's head.
    #[error("request body did not arrive within {} ms", .0.as_millis())]
    TimedOut(Duration),
}

impl ClientBodyError {
    /// Classifies an error of hyper's incoming body: a connection or stream that ended early is
    /// an abort, anything else a framing error (hyper reports both as body errors, with the
    /// cause in its source chain).
    fn from_hyper(e: &hyper::Error) -> ClientBodyError {
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe => ClientBodyError::Aborted,
                    _ => ClientBodyError::Invalid(io.to_string()),
                };
            }
            if let Some(h2) = c.downcast_ref::<h2::Error>() {
                return if h2.is_reset() || h2.is_go_away() || h2.is_io() {
                    ClientBodyError::Aborted
                } else {
                    ClientBodyError::Invalid(h2.to_string())
                };
            }
            cause = c.source();
        }
        // hyper's own "connection error" when the connection failed under the body.
        ClientBodyError::Aborted
    }
}

/// A client's request body as its server hands it over.
pub enum Inbound {
    Http1(Http1Body),
    /// HTTP/2, from hyper.
    Http2(Incoming),
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            Inbound::Http1(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {
                BodyError::Aborted => ClientBodyError::Aborted,
                BodyError::Invalid(why) => ClientBodyError::Invalid(why),
            }),
            Inbound::Http2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| ClientBodyError::from_hyper(&e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inbound::Http1(b) => b.is_end_stream(),
            Inbound::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::Http1(b) => b.size_hint(),
            Inbound::Http2(b) => b.size_hint(),
        }
    }
}

/// The client's request body, bounded in size and in time.
pub struct ClientBody {
    inner: Inbound,
    /// Bytes the body may still bring.
    left: u64,
    limit: u64,
    /// When the whole body must be in (none: no limit).
    deadline: Option<(Instant, Duration)>,
    /// Armed at the first wait on the client.
    timer: Option<Pin<Box<Sleep>>>,
    /// The last poll found nothing from the client yet.
    waiting: bool,
    /// Failed once: nothing more is read.
    failed: bool,
    /// Keeps the bytes as they go by, when the request may have to go again.
    record: Option<Recording>,
    /// Bytes read ahead ([`ClientBody::read_ahead`]), sent first.
    ahead: Option<Bytes>,
    /// A failure met while reading ahead, given after the bytes read.
    deferred: Option<ClientBodyError>,
}

/// The bytes of a client's body as they went to a backend, kept up to a limit, so that a request
/// whose backend failed before answering can go whole to another.
#[derive(Clone)]
pub struct Recording(std::sync::Arc<std::sync::Mutex<Record>>);

struct Record {
    bytes: bytes::BytesMut,
    limit: usize,
    /// Past the limit: nothing is kept.
    over: bool,
    ended: bool,
}

impl Recording {
    /// Keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Recording {
        Recording(std::sync::Arc::new(std::sync::Mutex::new(Record {
            bytes: bytes::BytesMut::new(),
            limit,
            over: false,
            ended: false,
        })))
    }

    /// The record of a body already read whole.
    pub fn whole_body(body: &Bytes) -> Recording {
        let r = Recording::new(body.len());
        r.push(body);
        r.end();
        r
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, data: &[u8]) {
        let mut r = self.record();
        if r.over || r.bytes.len() + data.len() > r.limit {
            r.over = true;
            r.bytes = bytes::BytesMut::new();
        } else {
            r.bytes.extend_from_slice(data);
        }
    }

    fn end(&self) {
        self.record().ended = true;
    }

    /// The whole body, when it was read to its end within the limit.
    pub fn whole(&self) -> Option<Bytes> {
        let r = self.record();
        (r.ended && !r.over).then(|| r.bytes.clone().freeze())
    }
}

impl ClientBody {
    /// `limit` bytes at most; all of it within `timeout` from now, when one is given.
    pub fn new(inner: Inbound, limit: u64, timeout: Option<Duration>) -> ClientBody {
        ClientBody {
            inner,
            left: limit,
            limit,
            deadline: timeout.map(|t| (Instant::now() + t, t)),
            timer: None,
            waiting: false,
            failed: false,
            record: None,
            ahead: None,
            deferred: None,
        }
    }

    /// Keeps the bytes in `record` as they go by (those read ahead too).
    pub fn record_into(&mut self, record: Recording) {
        if let Some(ahead) = &self.ahead {
            record.push(ahead);
        }
        if self.inner.is_end_stream() {
            record.end();
        }
        self.record = Some(record);
    }

    /// Reads what the client sends, up to `limit` bytes, and keeps it to be sent first: until
    /// the body ends, or the client pauses with `enough` of it read (or still after `grace`).
    /// The whole body, when all of it came.
    pub async fn read_ahead(
        &mut self,
        limit: usize,
        enough: impl Fn(&[u8]) -> bool,
        grace: Duration,
    ) -> Option<Bytes> {
        let mut ahead = bytes::BytesMut::new();
        let mut grace = std::pin::pin!(tokio::time::sleep(grace));
        let whole = std::future::poll_fn(|cx| {
            loop {
                if ahead.len() >= limit || self.inner.is_end_stream() {
                    return Poll::Ready(self.inner.is_end_stream());
                }
                match Pin::new(&mut *self).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => ahead.extend_from_slice(&data),
                        // Request trailers: not a body to read ahead of.
                        Err(_) => return Poll::Ready(false),
                    },
                    Poll::Ready(None) => return Poll::Ready(true),
                    // A failure is kept for the backend's side to meet, after the bytes.
                    Poll::Ready(Some(Err(e))) => {
                        self.deferred = Some(e);
                        return Poll::Ready(false);
                    }
                    Poll::Pending if enough(&ahead) || grace.as_mut().poll(cx).is_ready() => {
                        return Poll::Ready(false);
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        let ahead = ahead.freeze();
        self.ahead = (!ahead.is_empty()).then(|| ahead.clone());
        (whole && ahead.len() <= limit).then_some(ahead)
    }

    /// The last poll was left waiting for the client (rather than the body being ahead of the
    /// backend, or done).
    pub fn waiting_on_client(&self) -> bool {
        self.waiting && !self.failed && !self.inner.is_end_stream()
    }

    fn fail(&mut self, e: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        self.failed = true;
        self.waiting = false;
        self.timer = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        if let Some(ahead) = this.ahead.take() {
            return Poll::Ready(Some(Ok(Frame::data(ahead))));
        }
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        let limit = this.limit;
                        return this.fail(ClientBodyError::TooLarge { limit });
                    }
                    this.left -= n;
                    if let Some(r) = &this.record {
                        r.push(data);
                        if this.inner.is_end_stream() {
                            r.end();
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(e),
            Poll::Ready(None) => {
                this.waiting = false;
                this.timer = None;
                if let Some(r) = &this.record {
                    r.end();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.waiting = true;
                let Some((at, timeout)) = this.deadline else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(ClientBodyError::TimedOut(timeout)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.ahead.is_none()
            && self.deferred.is_none()
            && (self.failed || self.inner.is_end_stream());
        // The sender may learn of the end here rather than from a last poll: so does the record.
        if end
            && !self.failed
            && let Some(r) = &self.record
        {
            r.end();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = self.ahead.as_ref().map_or(0, |a| a.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + ahead);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// The body of a request to a backend.
pub enum RequestBody {
    Client(ClientBody),
    /// A body made here, sent whole (often empty).
    Fixed(Option<Bytes>),
}

impl RequestBody {
    /// No body at all.
    pub fn empty() -> RequestBody {
        RequestBody::Fixed(None)
    }

    /// The client's body, when it is still waiting on the client (see
    /// [`ClientBody::waiting_on_client`]).
    pub fn waiting_on_client(&self) -> bool {
        matches!(self, RequestBody::Client(b) if b.waiting_on_client())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            RequestBody::Client(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Fixed(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(b) => b.is_end_stream(),
            RequestBody::Fixed(b) => b.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(b) => b.size_hint(),
            RequestBody::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
