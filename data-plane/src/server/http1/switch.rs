//! A client connection handed over after `101 Switching Protocols`: what the client sent past
//! its request head, then the connection itself.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// A connection a tunnel can take.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The client's connection once switched; in the request's extensions of a request that offers
/// to switch (`Upgrade`), resolved when its `101` has been written.
#[derive(Clone)]
pub struct OnSwitch(Arc<Mutex<Option<oneshot::Receiver<Switched>>>>);

impl OnSwitch {
    pub(super) fn new(rx: oneshot::Receiver<Switched>) -> OnSwitch {
        OnSwitch(Arc::new(Mutex::new(Some(rx))))
    }

    /// The connection, once the `101` has gone to the client; an error if it never went (the
    /// response was another, or the client left).
    pub async fn switched(self) -> io::Result<Switched> {
        let rx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(rx) = rx else {
            return Err(io::Error::other("the switch was taken already"));
        };
        rx.await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the client connection was not switched",
            )
        })
    }
}

/// A switched client connection.
pub struct Switched {
    /// Bytes the client sent after its request head, read before the switch.
    pub(super) early: Bytes,
    pub(super) io: Box<dyn Io>,
}

impl AsyncRead for Switched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.early.len().min(buf.remaining());
        buf.put_slice(&this.early[..n]);
        this.early.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Switched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
