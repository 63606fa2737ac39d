//! The HTTP/1 server of client connections.
//!
//! Written here rather than taken from hyper for what a connection holds while it waits. Hyper
//! keeps an 8 KB read buffer and an 8 KB write buffer for a connection's whole life; with
//! 9,000 keep-alive connections after one request each, those two were 16 KB of the 23 KB a
//! connection cost (DHAT, `docs/performance.md`, "Memory per connection"). Here a connection
//! waiting for its next request holds no buffer at all: the head is read through a buffer on
//! the stack into one of its own size ([`ReadArrived`]), the body only when the request path
//! asks for it ([`body`]), and the response is written from a buffer dropped with it.
//!
//! What it does, per request: the head within the size limit and the header timeout (which also
//! bounds an idle keep-alive connection), framing per RFC 9112 ([`head`]), `Expect:
//! 100-continue` answered when the body is first read, the response framed by its length, else
//! chunked (HTTP/1.1) or up to the close (HTTP/1.0) ([`write`]), keep-alive and pipelining, a
//! `101` handing the connection to a tunnel ([`switch`]). A client that closes while its
//! request is in flight cancels it. On stop, an idle connection closes at once and a busy one
//! after its response.

pub mod body;
pub mod head;
pub mod switch;
pub mod write;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};

use crate::server::sniff::ReadArrived;
use crate::upstream::parse::{Decoded, Decoder, Framing};
use body::{Body, BodyError, Feed, Need};
use switch::{OnSwitch, Switched};
use write::{Sending, WRITE_GATHER, Writer, put_data, put_trailers};

/// A connection's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head.
    pub max_head: usize,
    /// Time for a request head to arrive whole, from the moment the connection waits for it.
    pub header_timeout: Duration,
}

/// Read size for a request body.
const BODY_READ: usize = 8192;


/// Serves HTTP/1 on `io` until the client closes, the connection fails or, after `stop`, it
/// has no request in progress (bytes already read from it, as the protocol's sniffing did, are
/// its [`ReadArrived`]'s to give first). `service` answers each request.
pub async fn serve<S, F, Fut, B>(
    mut io: S,
    limits: Limits,
    mut service: F,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + ReadArrived + Unpin + Send + 'static,
    F: FnMut(Request<Body>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    // Set up once for the connection: a wait set up per request would lock the channel, which
    // every connection of every worker shares, twice per request.
    let mut stopped = stop.clone();
    let stopping = stopped.wait_for(|s| *s);
    tokio::pin!(stopping);
    loop {
        // Waiting here is all an idle connection does: what this future holds across the wait
        // is what such a connection costs, and the exchange's state lives on the heap while a
        // request runs (`exchange`).
        let head = match read_head(&mut io, &mut buf, limits, stopping.as_mut()).await {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(Refused(status, why)) => {
                tracing::debug!(cause = %why, "client request head refused");
                return Box::pin(refuse(&mut io, status, &why)).await;
            }
        };
        match Box::pin(exchange(&mut io, &mut buf, head, limits, &mut service, &mut stop)).await? {
            Reuse::KeepAlive => {}
            Reuse::Close => {
                return std::future::poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await;
            }
            Reuse::Switch(to) => {
                let early = buf.split().freeze();
                let _ = to.send(Switched {
                    early,
                    io: Box::new(io),
                });
                return Ok(());
            }
        }
        if buf.is_empty() {
            // Between requests the connection holds no buffer.
            buf = BytesMut::new();
        }
    }
}

/// One request on the connection, from its head to the end of its response: what becomes of
/// the connection then.
async fn exchange<S, F, Fut, B>(
    io: &mut S,
    buf: &mut BytesMut,
    head: head::Head,
    limits: Limits,
    service: &mut F,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<Reuse>
where
    S: AsyncRead + AsyncWrite + ReadArrived + Unpin,
    F: FnMut(Request<Body>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let head::Head {
        mut request,
        framing,
        keep_alive,
        expects_continue,
    } = head;
    let (body, feed) = match framing {
        Framing::Length(n) => {
            let (b, f) = Body::fed(Some(n));
            (b, Some(f))
        }
        Framing::Chunked | Framing::UntilClose => {
            let (b, f) = Body::fed(None);
            (b, Some(f))
        }
        Framing::Empty => (Body::empty(), None),
    };
    let switch = request.headers().contains_key(header::UPGRADE).then(|| {
        let (tx, rx) = oneshot::channel();
        request.extensions_mut().insert(OnSwitch::new(rx));
        tx
    });
    let to = Answering {
        method: request.method().clone(),
        http11: request.version() == Version::HTTP_11,
        keep_alive,
    };
    let answering = std::pin::pin!(service(request.map(|()| body)));
    let mut exchange = Exchange {
        io,
        buf,
        request: RequestSide {
            feed,
            decoder: Decoder::new(framing),
            to_continue: expects_continue.then_some(CONTINUE),
            state: if framing == Framing::Empty {
                Reading::Done
            } else {
                Reading::Open
            },
        },
        response: ResponseSide::Waiting(answering),
        to: &to,
        stop,
        writer: Writer::default(),
        limits,
        drain_deadline: None,
    };
    let switched = std::future::poll_fn(|cx| exchange.poll(cx)).await?;
    Ok(match (switched, switch) {
        (Reuse::Switch(()), Some(to)) => Reuse::Switch(to),
        (Reuse::Switch(()), None) => Reuse::Close,
        (Reuse::KeepAlive, _) => Reuse::KeepAlive,
        (Reuse::Close, _) => Reuse::Close,
    })
}

/// A request head refused: the status to answer with, and why.
struct Refused(StatusCode, String);

/// The next request head, waiting for it within the header timeout; `None` when the client
/// closed or went quiet between requests, or the server stops while the connection is idle.
async fn read_head<S: ReadArrived, W: Future>(
    io: &mut S,
    buf: &mut BytesMut,
    limits: Limits,
    mut stopping: Pin<&mut W>,
) -> Result<Option<head::Head>, Refused> {
    let deadline = tokio::time::sleep(limits.header_timeout);
    tokio::pin!(deadline);
    loop {
        match head::parse(buf, limits.max_head) {
            Ok(Some(h)) => return Ok(Some(h)),
            Ok(None) => {}
            Err(e @ head::HeadError::TooLarge(_)) => {
                return Err(Refused(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    e.to_string(),
                ));
            }
            Err(e) => return Err(Refused(StatusCode::BAD_REQUEST, e.to_string())),
        }
        let idle = buf.is_empty();
        // Polled by hand: the read keeps no future of its own while the connection waits.
        let waited = std::future::poll_fn(|cx| {
            if let Poll::Ready(read) = io.poll_read_arrived(cx, buf) {
                return Poll::Ready(Waited::Read(read));
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Waited::TimedOut);
            }
            if idle && stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Waited::Stopped);
            }
            Poll::Pending
        })
        .await;
        match waited {
            Waited::Read(Ok(0) | Err(_)) | Waited::Stopped => return Ok(None),
            Waited::Read(Ok(_)) => {}
            Waited::TimedOut if idle => return Ok(None),
            Waited::TimedOut => {
                return Err(Refused(
                    StatusCode::REQUEST_TIMEOUT,
                    "request head did not arrive within the header timeout".into(),
                ));
            }
        }
    }
}

/// What a connection waiting for a request head saw first.
enum Waited {
    Read(io::Result<usize>),
    TimedOut,
    Stopped,
}

/// Answers a refused head, then closes.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, status: StatusCode, why: &str) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let text = format!("{why}\n");
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let (mut parts, ()) = resp.into_parts();
    let mut out = Vec::with_capacity(256 + text.len());
    let to = write::For {
        method: &http::Method::GET,
        http11: true,
        keep_alive: false,
    };
    write::head(
        &mut parts,
        &http_body::SizeHint::with_exact(text.len() as u64),
        &to,
        &mut out,
    );
    out.extend_from_slice(text.as_bytes());
    io.write_all(&out).await?;
    io.shutdown().await
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What the response is written for.
struct Answering {
    method: http::Method,
    http11: bool,
    keep_alive: bool,
}

/// What becomes of the connection after an exchange.
enum Reuse<T = oneshot::Sender<Switched>> {
    KeepAlive,
    Close,
    /// Handed to a tunnel after a `101`, through `T`.
    Switch(T),
}

/// Where the request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Still being read (or not yet asked for).
    Open,
    /// Read to its end: the connection can carry the next request.
    Done,
    /// Its consumer is gone before its end: the rest is read and dropped after the response.
    Unread,
    /// Failed: the connection cannot carry another request.
    Broken,
}

struct RequestSide {
    feed: Option<Feed>,
    decoder: Decoder,
    /// The `100 Continue` still to write before the body is read.
    to_continue: Option<&'static [u8]>,
    state: Reading,
}

enum ResponseSide<P, B> {
    Waiting(Pin<P>),
    Sending {
        body: Pin<Box<B>>,
        sending: Sending,
        /// The chunked body's last chunk (with trailers) is written.
        trailed: bool,
        /// Bytes left when the length was declared.
        left: u64,
        ended: bool,
        keep_alive: bool,
        switch: bool,
    },
}

/// One request and its response on the connection.
struct Exchange<'a, S, P, B> {
    io: &'a mut S,
    buf: &'a mut BytesMut,
    request: RequestSide,
    response: ResponseSide<P, B>,
    to: &'a Answering,
    /// Set once the server stops (read without a lock: `has_changed`, as the value only ever
    /// goes from false to true).
    stop: &'a mut watch::Receiver<bool>,
    writer: Writer,
    limits: Limits,
    /// Bounds the reading of an unread body's rest ([`Exchange::poll_drain`]).
    drain_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, P, Fut, B> Exchange<'_, S, P, B>
where
    S: AsyncRead + AsyncWrite + ReadArrived + Unpin,
    P: std::ops::DerefMut<Target = Fut>,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Reuse<()>>> {
        self.poll_request_body(cx)?;
        if let ResponseSide::Waiting(answering) = &mut self.response {
            let Poll::Ready(Ok(resp)) = answering.as_mut().poll(cx) else {
                // With the body read, a read is a watch for the client leaving: a close
                // cancels the request. Bytes of a next request are kept for it.
                if self.request.state == Reading::Done {
                    self.watch_client(cx)?;
                }
                return Poll::Pending;
            };
            self.start_response(resp);
        }
        let reuse = ready!(self.poll_response(cx))?;
        if matches!(reuse, Reuse::Switch(())) {
            return Poll::Ready(Ok(reuse));
        }
        if matches!(self.request.state, Reading::Open | Reading::Unread) {
            ready!(self.poll_drain(cx));
        }
        Poll::Ready(Ok(match reuse {
            Reuse::KeepAlive if self.request.state == Reading::Done => Reuse::KeepAlive,
            _ => Reuse::Close,
        }))
    }

    /// Reads and drops what is left of the request body after the response (a backend may
    /// answer before it read the body, and a refusal never reads it), so the client, still
    /// sending, is not reset under the answer, and the connection can carry the next request.
    /// Within the header timeout; a client that was never told to go on (`Expect:
    /// 100-continue`) sends no body, and its connection closes instead.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let r = &mut self.request;
        r.feed = None;
        if r.to_continue.is_some() {
            r.state = Reading::Broken;
            return Poll::Ready(());
        }
        let deadline = self
            .drain_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.limits.header_timeout)));
        loop {
            match r.decoder.decode(self.buf) {
                Ok(Decoded::Data(_)) => continue,
                Ok(Decoded::End) => {
                    r.state = Reading::Done;
                    return Poll::Ready(());
                }
                Ok(Decoded::NeedMore) => {}
                Err(_) => {
                    r.state = Reading::Broken;
                    return Poll::Ready(());
                }
            }
            if self.buf.capacity() - self.buf.len() < BODY_READ / 2 {
                self.buf.reserve(BODY_READ);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *self.io), cx, self.buf) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => {
                    r.state = Reading::Broken;
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        r.state = Reading::Broken;
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Feeds the request body as it is asked for.
    fn poll_request_body(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let r = &mut self.request;
        let Some(feed) = &r.feed else {
            return Ok(());
        };
        while r.state == Reading::Open {
            match feed.need(cx) {
                Need::Nothing => return Ok(()),
                Need::Gone => {
                    r.state = if r.decoder.is_done() {
                        Reading::Done
                    } else {
                        Reading::Unread
                    };
                    return Ok(());
                }
                Need::Piece => {}
            }
            if let Some(rest) = &mut r.to_continue {
                while !rest.is_empty() {
                    match Pin::new(&mut *self.io).poll_write(cx, rest) {
                        Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => *rest = &rest[n..],
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => return Ok(()),
                    }
                }
                r.to_continue = None;
            }
            match r.decoder.decode(self.buf) {
                Ok(Decoded::Data(data)) => {
                    let last = r.decoder.is_done();
                    feed.give(Ok(data), last);
                    if last {
                        r.state = Reading::Done;
                    }
                }
                Ok(Decoded::End) => {
                    feed.end();
                    r.state = Reading::Done;
                }
                Ok(Decoded::NeedMore) => {
                    if self.buf.capacity() - self.buf.len() < BODY_READ / 2 {
                        self.buf.reserve(BODY_READ);
                    }
                    match tokio_util::io::poll_read_buf(Pin::new(&mut *self.io), cx, self.buf) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            feed.give(Err(BodyError::Aborted), true);
                            r.state = Reading::Broken;
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Pending => return Ok(()),
                    }
                }
                Err(e) => {
                    feed.give(Err(BodyError::Invalid(e.to_string())), true);
                    r.state = Reading::Broken;
                }
            }
        }
        Ok(())
    }

    /// Reads while the response is awaited: an error once the client has closed. Through a
    /// buffer on the stack: what usually happens here is a read that finds nothing.
    fn watch_client(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        // Enough of what follows is kept; past it, the client waits for the response.
        if self.buf.len() >= BODY_READ {
            return Ok(());
        }
        match self.io.poll_read_arrived(cx, self.buf) {
            Poll::Ready(Ok(0)) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client closed its connection before the response",
            )),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Ready(Ok(_)) => {
                // More may follow: read again when it comes.
                cx.waker().wake_by_ref();
                Ok(())
            }
            Poll::Pending => Ok(()),
        }
    }

    /// Writes the response's head into `out` and gets ready to send its body.
    fn start_response(&mut self, resp: Response<B>) {
        let (mut parts, body) = resp.into_parts();
        let switch = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        let keep_alive = self.to.keep_alive
            && !self.stop.has_changed().unwrap_or(true)
            && self.request.state != Reading::Broken;
        let to = write::For {
            method: &self.to.method,
            http11: self.to.http11,
            keep_alive,
        };
        // One allocation for the head and a small body that follows it.
        let hint = body.size_hint();
        let fields: usize = parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let small_body = hint
            .exact()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= WRITE_GATHER / 4)
            .unwrap_or(0);
        self.writer.out.reserve(160 + fields + small_body);
        let (sending, keep_alive) = write::head(&mut parts, &hint, &to, &mut self.writer.out);
        let left = match sending {
            Sending::Length(n) => n,
            _ => 0,
        };
        self.response = ResponseSide::Sending {
            body: Box::pin(body),
            sending,
            trailed: false,
            left,
            ended: false,
            keep_alive,
            switch,
        };
    }

    /// Sends the response's body; the connection's fate once all of it has been written.
    fn poll_response(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Reuse<()>>> {
        let ResponseSide::Sending {
            body,
            sending,
            trailed,
            left,
            ended,
            keep_alive,
            switch,
        } = &mut self.response
        else {
            return Poll::Pending;
        };
        while !*ended {
            let chunked = *sending == Sending::Chunked;
            let w = &mut self.writer;
            if w.out.len() >= WRITE_GATHER || w.big.is_some() {
                ready!(w.poll_write(&mut *self.io, cx, chunked))?;
            }
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    ready!(w.poll_write(&mut *self.io, cx, chunked))?;
                    ready!(Pin::new(&mut *self.io).poll_flush(cx))?;
                    return Poll::Pending;
                }
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !*trailed => {
                        put_data(w, *sending, left, keep_alive, data);
                    }
                    Ok(_) => {}
                    Err(frame) => {
                        *trailed |= put_trailers(&mut w.out, *sending, frame, self.to.http11);
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(cause = %e, "response body failed; closing the client connection");
                    *keep_alive = false;
                    *ended = true;
                    // The client must not take a cut body for a whole one.
                    *w = Writer::default();
                    return Poll::Ready(Ok(Reuse::Close));
                }
                None => {
                    *ended = true;
                    match sending {
                        Sending::Chunked if !*trailed => w.out.extend_from_slice(b"0\r\n\r\n"),
                        Sending::Length(_) if *left > 0 => *keep_alive = false,
                        _ => {}
                    }
                }
            }
        }
        let chunked = *sending == Sending::Chunked;
        ready!(self.writer.poll_write(&mut *self.io, cx, chunked))?;
        ready!(Pin::new(&mut *self.io).poll_flush(cx))?;
        if *switch {
            return Poll::Ready(Ok(Reuse::Switch(())));
        }
        Poll::Ready(Ok(if *keep_alive {
            Reuse::KeepAlive
        } else {
            Reuse::Close
        }))
    }
}
