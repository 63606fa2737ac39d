//! A backend's response body, read from its connection as the client's side asks for it: no
//! task or channel sits between the two connections. The bytes are decoded by
//! [`Decoder`](super::parse::Decoder); this module does the reading, the idle timeout, the
//! return of the connection to its pool at the body's end, and the rest of a request body that
//! the backend answered before taking.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use super::{UpstreamError, stalled};
use super::conn::Conn;
use super::encode::{Sending, Upload};
use super::parse::{Decoded, Decoder, Framing};
use super::pool::Home;
use crate::clock::Stall;

/// Longest a request body the backend did not take is read and dropped after its response, so
/// that the client, still sending, gets that response rather than a reset connection.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A backend's response body over HTTP/1.1, read from its connection as the client's side asks
/// for it.
pub struct Http1Body {
    /// The connection, until the body ends (back to the pool) or fails (dropped).
    conn: Option<Conn>,
    decoder: Decoder,
    /// Cut short (the backend closed early, stalled, or sent something malformed): not an end,
    /// so nothing takes it for a complete body.
    failed: bool,
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
    /// A `101 Switching Protocols`: the connection is kept for the tunnel, not pooled.
    switched: bool,
}

impl Http1Body {
    /// The backend broke off this body: its connection failed or closed before the end, it
    /// stalled past the idle timeout, or its framing could not be read.
    pub fn failed(&self) -> bool {
        self.failed && !self.client_fault
    }

    pub(crate) fn new(
        conn: Conn,
        framing: Framing,
        home: Option<Home>,
        upload: Option<Upload>,
        idle_timeout: Option<Duration>,
    ) -> Http1Body {
        let mut body = Http1Body {
            upload,
            idle_timeout,
            stall: Stall::default(),
            client_fault: false,
            conn: Some(conn),
            decoder: Decoder::new(framing),
            failed: false,
            home,
            switched: false,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// The body of a `101 Switching Protocols`: none. The connection now carries another
    /// protocol; [`Http1Body::take_switched`] hands it over.
    pub(crate) fn switched(conn: Conn) -> Http1Body {
        Http1Body {
            upload: None,
            idle_timeout: None,
            stall: Stall::default(),
            client_fault: false,
            conn: Some(conn),
            decoder: Decoder::new(Framing::Empty),
            failed: false,
            home: None,
            switched: true,
        }
    }

    /// The connection of a `101 Switching Protocols` response, with the bytes of the new
    /// protocol the backend sent right after its head; `None` for any other response.
    pub(crate) fn take_switched(&mut self) -> Option<(super::conn::Io, bytes::BytesMut)> {
        if !self.switched {
            return None;
        }
        self.conn.take().map(|c| (c.io, c.buf))
    }

    /// The body is complete: its connection goes back to the pool if it can carry another
    /// request, the request went out whole and nothing beyond the response was received.
    fn finish(&mut self) {
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take())
            && conn.buf.is_empty()
            && self.upload.is_none()
        {
            home.pool.put(home.worker, conn);
        }
    }

    /// The body failed with `e`: the connection is dropped with it.
    fn fail(&mut self, e: std::io::Error) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.conn = None;
        self.failed = true;
        Poll::Ready(Some(Err(e)))
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
        self.fail(stalled(idle))
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        // A backend that answered before taking the whole request body (a 413, say): the rest
        // is read and dropped, within its size limit and DRAIN_TIME, so the client's connection
        // closes cleanly or even stays open, instead of being reset under the answer.
        let Some(up) = self.upload.take() else {
            return;
        };
        if matches!(up.state, Sending::Last) || http_body::Body::is_end_stream(&up.body) {
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

impl http_body::Body for Http1Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        // A switched connection is no body's: it waits for its tunnel.
        if this.switched {
            return Poll::Ready(None);
        }
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
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => return this.fail(e),
            }
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return match this.decoder.at_close() {
                        // Delimited by the close: this is its end.
                        Ok(()) => {
                            this.conn = None;
                            Poll::Ready(None)
                        }
                        Err(e) => this.fail(e),
                    };
                }
                Poll::Ready(Ok(_)) => this.stall.progress(),
                Poll::Ready(Err(e)) => {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof
                        && this.decoder.at_close().is_ok()
                    {
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(e);
                }
                Poll::Pending => return this.poll_stall(cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) if !self.failed => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A backend's response body, over HTTP/1.1 or HTTP/2.
// Most bodies come over HTTP/1.1: boxing that variant to shrink the other would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Body {
    Http1(Http1Body),
    Http2(super::h2::H2Body),
}

impl Body {
    /// The backend broke off this body (see [`Http1Body::failed`]).
    pub fn failed(&self) -> bool {
        match self {
            Body::Http1(b) => b.failed(),
            Body::Http2(b) => b.failed(),
        }
    }

    /// The connection of a `101 Switching Protocols` response (HTTP/1.1 only).
    pub(crate) fn take_switched(&mut self) -> Option<(super::conn::Io, bytes::BytesMut)> {
        match self {
            Body::Http1(b) => b.take_switched(),
            Body::Http2(_) => None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Body::Http1(b) => Pin::new(b).poll_frame(cx),
            Body::Http2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Http1(b) => b.is_end_stream(),
            Body::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Http1(b) => b.size_hint(),
            Body::Http2(b) => b.size_hint(),
        }
    }
}

