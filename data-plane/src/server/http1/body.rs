//! A request body on an HTTP/1 connection: the connection reads it from the socket when, and
//! only when, the request path asks for more ([`Body::poll_frame`]), one piece at a time, so a
//! body is never read ahead of its consumer and `Expect: 100-continue` is answered only when
//! the body is wanted.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// Why a request body ended before its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Its framing could not be read (a bad chunk size, say).
    #[error("{0}")]
    Invalid(String),
    /// The client closed its connection before the body's end.
    #[error("the client closed the connection before the end of the request body")]
    Aborted,
}

/// What the body and its connection share.
#[derive(Default)]
struct State {
    /// A piece read, not yet taken.
    piece: Option<Result<Bytes, BodyError>>,
    /// The body has been read to its end (or failed): nothing more comes.
    ended: bool,
    /// The consumer waits for a piece.
    wanted: bool,
    /// The consumer is gone.
    dropped: bool,
    consumer: Option<Waker>,
    connection: Option<Waker>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request's body, as the request path reads it.
pub struct Body {
    shared: Option<Shared>,
    /// Bytes still to come, when the length is known.
    left: Option<u64>,
}

impl Body {
    /// A request without a body.
    pub fn empty() -> Body {
        Body {
            shared: None,
            left: Some(0),
        }
    }

    /// A body the connection feeds through the returned [`Feed`]; `length`, when known.
    pub fn fed(length: Option<u64>) -> (Body, Feed) {
        let shared = Shared::default();
        let body = Body {
            shared: Some(Arc::clone(&shared)),
            left: length,
        };
        (body, Feed { shared })
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(shared) = &this.shared else {
            return Poll::Ready(None);
        };
        let mut s = lock(shared);
        if let Some(piece) = s.piece.take() {
            if let Some(c) = s.connection.take() {
                c.wake();
            }
            if let (Ok(data), Some(left)) = (&piece, &mut this.left) {
                *left = left.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(piece.map(Frame::data)));
        }
        if s.ended {
            drop(s);
            this.shared = None;
            return Poll::Ready(None);
        }
        s.wanted = true;
        if !s.consumer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.consumer = Some(cx.waker().clone());
        }
        if let Some(c) = s.connection.take() {
            c.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.shared {
            None => true,
            Some(s) => {
                let s = lock(s);
                s.ended && s.piece.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::new(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let mut s = lock(&shared);
            s.dropped = true;
            if let Some(c) = s.connection.take() {
                c.wake();
            }
        }
    }
}

/// The connection's side of a [`Body`].
pub struct Feed {
    shared: Shared,
}

/// What the body needs from its connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A piece: read one and [`Feed::give`] it.
    Piece,
    /// Nothing yet: the connection is woken when that changes.
    Nothing,
    /// Its consumer is gone: nothing more will be read.
    Gone,
}

impl Feed {
    /// Whether the body wants a piece now; registers `cx` to be woken when it does.
    pub fn need(&self, cx: &Context<'_>) -> Need {
        let mut s = lock(&self.shared);
        if s.dropped {
            return Need::Gone;
        }
        if s.wanted && s.piece.is_none() && !s.ended {
            return Need::Piece;
        }
        if !s.connection.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.connection = Some(cx.waker().clone());
        }
        Need::Nothing
    }

    /// Hands the consumer a piece; `last` when it is the body's last.
    pub fn give(&self, piece: Result<Bytes, BodyError>, last: bool) {
        let mut s = lock(&self.shared);
        s.ended |= last || piece.is_err();
        s.piece = Some(piece);
        s.wanted = false;
        if let Some(c) = s.consumer.take() {
            c.wake();
        }
    }

    /// The body's end, with no more bytes.
    pub fn end(&self) {
        let mut s = lock(&self.shared);
        s.ended = true;
        if let Some(c) = s.consumer.take() {
            c.wake();
        }
    }
}
