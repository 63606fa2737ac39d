//! The body of a response to a client: a backend's, streamed as the client reads it, or one
//! made here. A backend's body holds its in-flight count until it ends, copies itself into the
//! cache when it fills an entry, and records the backend's outcome: at its end, or by its head
//! once it has streamed for [`VERDICT_AFTER`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::client::ClientConn;
use crate::backend::{Endpoint, InFlight};
use crate::cache::Tee;
use crate::config::active::Active;
use crate::upstream;

/// Body of a response to a client: a backend's, streamed, or one made here (errors).
// Nearly every response is a backend's: boxing that variant to shrink the rare local one would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Upstream(UpstreamResponse),
    Local(Option<Bytes>),
    /// A backend's body read by a task of its own, for a client on HTTP/2 (see
    /// [`ProxyBody::relayed`]).
    Relayed(Relay),
}

/// The client's end of a relayed body.
pub struct Relay {
    frames: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
    /// Set by the relay when it gave up on a client that took nothing for the send timeout:
    /// the body then fails rather than ending as if whole.
    stalled: Arc<std::sync::atomic::AtomicBool>,
    hint: SizeHint,
    done: bool,
}

impl ProxyBody {
    /// For a client on HTTP/2: the backend's body read by a task of its own, one frame ahead of
    /// the client. An HTTP/2 stream whose client gives it no flow-control window is never
    /// asked for its next frame, so nothing on the request's own path could see it stall; the
    /// relay does, and when the client has taken nothing for `send_timeout` it lets go of the
    /// backend (its connection closes, its in-flight count drops) and has the client's
    /// connection closed (`stalled`), which resets its streams: the server cannot reset one
    /// stream whose window the client keeps shut. An HTTP/1 client's stall is the
    /// connection's and is cut there ([`crate::server::sniff`]).
    pub fn relayed(self, send_timeout: Duration, conn: Arc<ClientConn>) -> ProxyBody {
        let ProxyBody::Upstream(u) = self else {
            return self;
        };
        if u.body.is_end_stream() {
            return ProxyBody::Upstream(u);
        }
        let hint = u.body.size_hint();
        let (tx, frames) = tokio::sync::mpsc::channel(1);
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stalled);
        tokio::spawn(async move {
            let mut body = ProxyBody::Upstream(u);
            while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                match tokio::time::timeout(send_timeout, tx.send(frame)).await {
                    Ok(Ok(())) => {}
                    // The client reset the stream: nothing more to send.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(client = %conn.peer, "HTTP/2 stream took nothing for the send timeout; connection closed");
                        conn.stalled.notify_one();
                        return;
                    }
                }
            }
        });
        ProxyBody::Relayed(Relay {
            frames,
            stalled,
            hint,
            done: false,
        })
    }
}

/// A backend's response body on its way to the client. It holds the backend's in-flight count
/// until it ends; a body read to the end gives its connection back to the pool.
pub struct UpstreamResponse {
    body: upstream::Body,
    in_flight: InFlight,
    /// The outcome still to record for a response whose head was good.
    pending: Option<Pending>,
    /// Set once the body has had to wait: when it fires with the body still streaming, the
    /// head's success is recorded ([`VERDICT_AFTER`]).
    verdict: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when the response fills the cache: the body is copied as it streams by.
    tee: Option<Box<Tee>>,
}

/// How long after its head a response whose body still streams is judged by its head: its
/// success goes to the breaker and the outlier detector then, rather than when the body ends,
/// which for a download or an event stream can be minutes away. A half-open circuit whose
/// trial is such a stream closes without waiting for it to end. Should the body break off
/// later, that is recorded as the backend's failure then.
pub const VERDICT_AFTER: Duration = Duration::from_secs(1);

/// What recording a response's outcome at the end of its body takes: the configuration it was
/// sent under (the outlier policy, and the backends for the ejection cap) and when its head
/// arrived. Held through this worker's own handle on the configuration, so it costs no count
/// shared between threads.
pub struct Pending {
    #[allow(clippy::redundant_allocation)]
    active: Arc<Arc<Active>>,
    at: Instant,
    /// The head's success is recorded already: only a break of the body is left to record.
    judged: bool,
}

impl Pending {
    /// A good head that arrived `at`, under `active` (this worker's own handle on it).
    #[allow(clippy::redundant_allocation)]
    pub fn new(active: Arc<Arc<Active>>, at: Instant) -> Pending {
        Pending {
            active,
            at,
            judged: false,
        }
    }

    /// Records the response's outcome against `endpoint`: a failure at `now`, or a success.
    fn record(&self, endpoint: &Endpoint, failed: bool, now: Instant) {
        endpoint.record_outcome(failed, now, &self.active.outlier, || {
            self.active.may_eject(now)
        });
    }
}

impl UpstreamResponse {
    /// A backend's body, holding its in-flight count, with its outcome still to record when
    /// its head was good.
    pub fn new(body: upstream::Body, in_flight: InFlight, pending: Option<Pending>) -> Self {
        UpstreamResponse {
            body,
            in_flight,
            pending,
            verdict: None,
            tee: None,
        }
    }

    /// The backend that answered.
    pub fn endpoint(&self) -> &Endpoint {
        self.in_flight.endpoint()
    }

    /// The connection of a `101 Switching Protocols`, for its tunnel (see
    /// [`upstream::Body::take_switched`]).
    pub(crate) fn take_switched(&mut self) -> Option<(upstream::conn::Io, bytes::BytesMut)> {
        self.body.take_switched()
    }

    /// Copies the body into the cache as it streams.
    pub fn fill_cache(&mut self, tee: Tee) {
        self.tee = Some(Box::new(tee));
    }

    /// Records the head's success once the body has streamed for [`VERDICT_AFTER`]; polled
    /// only while the body waits on the backend, so a body that arrives whole costs no timer.
    fn judge_streaming(&mut self, cx: &mut Context<'_>) {
        let Some(pending) = self.pending.as_ref().filter(|p| !p.judged) else {
            return;
        };
        let at = pending.at;
        let verdict = self
            .verdict
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at + VERDICT_AFTER)));
        if verdict.as_mut().poll(cx).is_ready() {
            self.judge_by_head();
        }
    }

    /// The same verdict, read off the clock when a frame came with more of the body to come.
    /// A body whose backend sends faster than its client reads has a frame ready whenever it
    /// is asked, so it never waits and its timer is never looked at. The last frame reads no
    /// clock: a body that arrives whole costs nothing here.
    fn judge_by_clock(&mut self) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| !p.judged && Instant::now() >= p.at + VERDICT_AFTER)
        {
            self.judge_by_head();
        }
    }

    /// Records the head's success now; the end of the body then records only a break.
    fn judge_by_head(&mut self) {
        if let Some(pending) = self.pending.as_mut() {
            pending.judged = true;
            self.verdict = None;
            pending.record(self.in_flight.endpoint(), false, pending.at);
        }
    }
}

impl Drop for UpstreamResponse {
    fn drop(&mut self) {
        // The server may stop polling once it has sent a sized body, so the end is known from
        // the body itself rather than from a final poll.
        if self.body.is_end_stream()
            && let Some(t) = self.tee.as_mut()
        {
            t.finish();
        }
        // A body the backend cut short (closed mid-way, stalled past the timeout, or sent
        // unreadable framing) fails the request as surely as a 5xx head: the breaker and the
        // outlier detector count it. A body the client walked away from is no fault of the
        // backend's and counts as the success its head was.
        if let Some(pending) = self.pending.take() {
            let endpoint = self.in_flight.endpoint();
            if self.body.failed() {
                endpoint.body_failed();
                pending.record(endpoint, true, Instant::now());
            } else if !pending.judged {
                pending.record(endpoint, false, pending.at);
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(u) => {
                let polled = Pin::new(&mut u.body).poll_frame(cx);
                if let Some(t) = u.tee.as_mut() {
                    if let Poll::Ready(Some(Ok(frame))) = &polled
                        && let Some(data) = frame.data_ref()
                    {
                        t.push(data);
                    }
                    // Only a body read to its end is stored, never one cut short.
                    if u.body.is_end_stream() {
                        t.finish();
                    }
                }
                match &polled {
                    Poll::Pending => u.judge_streaming(cx),
                    Poll::Ready(Some(Ok(_))) if !u.body.is_end_stream() => u.judge_by_clock(),
                    _ => {}
                }
                polled
            }
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Relayed(r) => match r.frames.poll_recv(cx) {
                Poll::Ready(None) if r.stalled.load(std::sync::atomic::Ordering::Relaxed) => {
                    r.done = true;
                    Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client took nothing of the response for the send timeout",
                    ))))
                }
                Poll::Ready(None) => {
                    r.done = true;
                    Poll::Ready(None)
                }
                polled => polled,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(u) => u.body.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
            ProxyBody::Relayed(r) => r.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(u) => u.body.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Relayed(r) => r.hint,
        }
    }
}
