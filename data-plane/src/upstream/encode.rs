//! A request on its way to a backend: its head encoded for HTTP/1.1 once (with an origin-form
//! target, the proxy's own fields in place of the client's, and the framing its body needs), and
//! its body sent as the backend takes it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use http::header::{self, HeaderName, HeaderValue};
use http_body::Body as _;
use tokio::io::AsyncWrite;

use super::UpstreamError;
use super::conn::Io;
use super::request_body::RequestBody;

/// How a request body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Out {
    None,
    Raw,
    Chunked,
}

/// A request head encoded for the wire once: a retry of a request without a body sends the
/// same bytes again, a refcount rather than a copy of its fields.
#[derive(Clone)]
pub struct Head {
    bytes: Bytes,
    pub(crate) head_only: bool,
    /// The request asks to switch protocols (`Connection: upgrade`): a `101` answers it.
    pub(crate) upgrade: bool,
}

impl Head {
    /// The head as encoded for HTTP/1.1 (without a `Host` set later).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A request ready to go to a backend: its head, and its body with the framing chosen for it.
pub struct Outgoing {
    pub(crate) head: Head,
    /// A `Host` field to add (the backend's own name, for a client that sent none).
    host: Option<HeaderValue>,
    pub(crate) out: Out,
    pub(crate) body: RequestBody,
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
                upgrade: false,
            },
            host: None,
            out,
            body,
        }
    }

    /// The same request again with `body`, the whole body it was first sent with, framed as it
    /// was then (`out`).
    pub(crate) fn again_with(head: &Head, out: Out, body: Bytes) -> Outgoing {
        Outgoing {
            head: head.clone(),
            host: None,
            out,
            body: RequestBody::Fixed(Some(body)),
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

    /// Marks the request as asking to switch protocols (its head carries `Connection: upgrade`
    /// and `Upgrade`): a `101` then ends the HTTP exchange and hands over the connection.
    pub fn upgrade(mut self) -> Outgoing {
        self.head.upgrade = true;
        self
    }

    /// Takes the body out (to send it over HTTP/2), leaving none.
    pub(crate) fn take_body(&mut self) -> RequestBody {
        std::mem::replace(&mut self.body, RequestBody::empty())
    }

    /// Puts back a body taken out and not sent.
    pub(crate) fn put_body(&mut self, body: RequestBody) {
        self.body = body;
    }

    /// The `Host` field to add, if one is set.
    pub(crate) fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
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
    pub(crate) fn wire(&self) -> std::borrow::Cow<'_, [u8]> {
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

/// What a request body upload is doing.
pub(crate) enum Sending {
    /// Reading the client's body and writing it on.
    Frames,
    /// The client's body is done; writing what is left, then flushing.
    Last,
    /// Stopped short: the backend stopped reading, or the client's body failed. The request
    /// never went out whole, so its connection is not reused.
    Failed,
}

/// A request body on its way to the backend, driven by whoever waits on the response.
pub(crate) struct Upload {
    pub(crate) body: RequestBody,
    pub(crate) out: Out,
    /// Framed bytes not yet written.
    pub(crate) pending: Bytes,
    pub(crate) state: Sending,
    /// The write error, once the backend stopped reading.
    pub(crate) failed: Option<std::io::Error>,
}

impl Upload {
    /// Moves the body on as far as the client and the backend allow; `Ready(Ok)` when all of it
    /// is written.
    pub(crate) fn poll(
        &mut self,
        io: &mut Io,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UpstreamError>> {
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
