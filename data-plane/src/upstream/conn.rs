//! One connection to a backend: its byte stream (plain TCP, or TLS over it) and what has been
//! read from it and not yet used. A new connection is opened within the connect timeout, its TLS
//! handshake included; a failed handshake (unknown CA, wrong name) is a connect failure like a
//! refused connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::UpstreamError;
use super::parse::{self, ParsedHead, eof};

/// Bytes asked of the socket per read of a body.
const READ_CHUNK: usize = 16 * 1024;

/// Bytes asked of the socket by the first read of a response, into an empty buffer: a head and
/// a small body fit, and a request in flight holds 4 KB for them rather than 16 (with 500
/// requests in flight, 6 MB less for the allocator to hold on to afterwards). A larger body is
/// read on in [`READ_CHUNK`]s.
const HEAD_READ: usize = 4 * 1024;

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

/// A backend connection's byte stream.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    /// True when the TLS handshake settled on HTTP/2 (ALPN `h2`).
    pub(crate) fn speaks_h2(&self) -> bool {
        match self {
            Io::Plain(_) => false,
            Io::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

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
pub(crate) struct Conn {
    pub(crate) io: Io,
    pub(crate) buf: BytesMut,
}

impl Conn {
    pub(crate) fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Reads more bytes into the buffer; `Ready(Ok(0))` at the end of the stream.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let want = if self.buf.capacity() == 0 {
            HEAD_READ
        } else {
            READ_CHUNK
        };
        if self.buf.capacity() - self.buf.len() < want / 4 {
            self.buf.reserve(want);
        }
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    /// True when the backend closed the connection, or sent something unasked, while it was
    /// idle. Costs no system call unless the socket has signalled something since the last read.
    /// (A pooled connection's buffer is empty: see [`Body::finish`].)
    pub(crate) fn is_gone(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // The signal may be left over from the last response; a read tells.
            Poll::Ready(Ok(())) => !matches!(self.poll_fill(&mut cx), Poll::Pending),
        }
    }
}

pub(crate) async fn connect(
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

/// Reads and parses the response head (skipping interim 1xx responses but a `101` to a request
/// that asked to `upgrade`). Also says whether the connection may carry another request once the
/// body is read.
pub(crate) fn poll_head(
    conn: &mut Conn,
    head_only: bool,
    upgrade: bool,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<ParsedHead>> {
    loop {
        if let Some(parsed) = parse::parse_head(&mut conn.buf, head_only, upgrade)? {
            return Poll::Ready(Ok(parsed));
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
