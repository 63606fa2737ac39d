//! Tells which HTTP version a client speaks from its first bytes, read in one go.
//!
//! A client that opens with the HTTP/2 connection preface (RFC 9113 section 3.4) speaks HTTP/2:
//! with prior knowledge on a plain connection, as ALPN chose over TLS. Any other first bytes are
//! an HTTP/1 request. The bytes read to tell are handed to the server first ([`Sniffed`]), so
//! one `read` both identifies the protocol and, usually, carries the whole request head: no
//! separate read of the preface's length first.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::clock::Stall;

/// How an HTTP/2 client opens every connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Size of the first read: a typical request head fits; a larger one is read on by the server.
const FIRST_READ: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// A client connection's first bytes, read into a buffer sized to what arrived: a connection
/// that has sent nothing holds no read buffer, and a short request head a short one. Polled, so
/// a connection waiting for bytes keeps no future for the wait.
pub trait ReadArrived {
    /// Appends what the client has sent to `into`; `Ready(Ok(0))` at the end of the stream.
    fn poll_read_arrived(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;

    /// [`ReadArrived::poll_read_arrived`] as a future.
    fn read_arrived(&mut self, into: &mut BytesMut) -> impl Future<Output = io::Result<usize>> {
        std::future::poll_fn(move |cx| self.poll_read_arrived(cx, into))
    }
}

impl ReadArrived for tokio::net::TcpStream {
    fn poll_read_arrived(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        // Read through tokio's `poll_read`, which calls the socket only when it has signalled
        // since the last read, and takes a read shorter than the buffer as the end of what
        // arrived (edge-triggered readiness): the next wait costs no system call that finds
        // nothing. (A new socket counts as readable until a read says otherwise.)
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
        std::task::ready!(Pin::new(self).poll_read(cx, &mut read))?;
        into.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }
}

impl ReadArrived for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    /// The handshake has allocated the TLS buffers already; the bytes are decrypted into a
    /// buffer of the first read's size.
    fn poll_read_arrived(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if into.capacity() - into.len() < FIRST_READ / 4 {
            into.reserve(FIRST_READ);
        }
        tokio_util::io::poll_read_buf(Pin::new(self), cx, into)
    }
}

/// Reads until the first bytes tell the protocol: usually one read, more only while they are
/// still a prefix of the HTTP/2 preface. Fails if the client closes before that. Unbounded in
/// time: the caller bounds it (the header timeout).
pub async fn sniff<S: ReadArrived>(io: &mut S) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::new();
    loop {
        if io.read_arrived(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection before sending a request",
            ));
        }
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            return Ok((Protocol::Http1, buf.freeze()));
        }
        if seen == H2_PREFACE.len() {
            return Ok((Protocol::Http2, buf.freeze()));
        }
    }
}

/// A client connection whose first bytes were read by [`sniff`]: reads return them first, then
/// go to the connection; writes go straight to it, and fail once one has made no progress for
/// the send timeout (a client that stopped reading, or vanished without a close), so such a
/// client holds its connection slot and its backend connection no longer than that.
pub struct Sniffed<S> {
    first: Bytes,
    io: S,
    send_timeout: Duration,
    /// Times a write that waits on the client.
    stall: Stall,
}

impl<S> Sniffed<S> {
    pub fn new(first: Bytes, io: S, send_timeout: Duration) -> Sniffed<S> {
        Sniffed {
            first,
            io,
            send_timeout,
            stall: Stall::default(),
        }
    }

    /// Passes on a write's outcome; a wait starts the timer (only a write that waits pays for
    /// one), and a wait past the send timeout is an error.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall.progress();
            return polled;
        }
        if !self.stall.expired(cx, self.send_timeout) {
            return Poll::Pending;
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took nothing of the response for {} ms",
                self.send_timeout.as_millis()
            ),
        )))
    }
}

/// Reads give the first bytes first; hyper's HTTP/2 server reads and writes through `TokioIo`.
impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first[..n]);
            this.first.advance(n);
            if this.first.is_empty() {
                // Frees the first read's buffer for the rest of the connection.
                this.first = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.bounded(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.bounded(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: ReadArrived> ReadArrived for Sniffed<S> {
    fn poll_read_arrived(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if !self.first.is_empty() {
            let n = self.first.len();
            into.extend_from_slice(&std::mem::take(&mut self.first));
            return Poll::Ready(Ok(n));
        }
        self.io.poll_read_arrived(cx, into)
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    /// Sniffs what a client sends over TCP in the given pieces, each a separate write.
    async fn sniff_pieces(pieces: &[&[u8]]) -> io::Result<(Protocol, Bytes)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        // Closes its end after the last piece.
        let writer = tokio::spawn(async move {
            for p in pieces {
                client.write_all(&p).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let sniffed = sniff(&mut server).await;
        writer.await.unwrap();
        sniffed
    }

    #[tokio::test]
    async fn an_http1_request_is_told_from_its_first_byte_and_kept_whole() {
        let (p, first) = sniff_pieces(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"])
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn the_preface_in_pieces_is_http2() {
        let (p, first) = sniff_pieces(&[b"PRI * HT", b"TP/2.0\r\n", b"\r\nSM\r\n\r\n"])
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http2);
        assert_eq!(&first[..], H2_PREFACE);
    }

    #[tokio::test]
    async fn a_method_that_starts_like_the_preface_is_http1() {
        let (p, first) = sniff_pieces(&[b"PR", b"OPFIND / HTTP/1.1\r\n\r\n"])
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(&first[..], b"PROPFIND / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_client_that_closes_first_is_an_error() {
        let e = sniff_pieces(&[]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = sniff_pieces(&[b"PRI * "]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Writes `data` whole through `io`.
    async fn write_all(io: &mut Sniffed<tokio::io::DuplexStream>, data: &[u8]) -> io::Result<()> {
        tokio::io::AsyncWriteExt::write_all(io, data).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_cut_after_the_send_timeout() {
        // The client's side holds 64 bytes and never reads them.
        let (_client, server) = tokio::io::duplex(64);
        let mut io = Sniffed::new(Bytes::new(), server, Duration::from_secs(60));
        let started = tokio::time::Instant::now();
        let e = write_all(&mut io, &[b'x'; 100]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_cut_while_it_takes_something() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Sniffed::new(Bytes::new(), server, Duration::from_secs(60));
        // Takes 64 bytes every 50 s: slower than the whole response, never silent for 60 s.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 640 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                got += client.read(&mut buf).await.unwrap();
            }
        });
        let started = tokio::time::Instant::now();
        write_all(&mut io, &[b'x'; 640]).await.unwrap();
        reader.await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(450));
    }
}
