//! Upgraded connections: a WebSocket (or any protocol an HTTP/1.1 request switches to with
//! `Connection: upgrade`) carried byte for byte between client and backend once the backend
//! answers `101 Switching Protocols`.
//!
//! The request that asks for the switch goes the whole request path first: identified, limited
//! (it counts once), admitted and balanced like any other. On the backend's `101` the client is
//! given the switch, and a task of the worker splices the two connections until either closes,
//! nothing passes either way for `timeouts.tunnel_idle_ms`, or a drain runs out of time. The
//! backend's in-flight count holds the tunnel for its life, so `least_connections` balances
//! WebSockets as connections.
//!
//! A WebSocket over HTTP/2 (RFC 8441: `CONNECT` with `:protocol = websocket`) reaches the
//! backend as the HTTP/1.1 upgrade it would have sent, and the stream is spliced as a connection
//! would be. An offer to switch to `h2c` is declined: the request is served as plain HTTP/1.1 and
//! the offer never reaches a backend (a backend that took it would hand the client an HTTP/2
//! connection past every rule of this proxy).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::body::{ProxyBody, UpstreamResponse};
use super::refusal::Refusal;
use crate::server::http1::switch::{self, OnSwitch};
use crate::upstream::conn::Io;

/// Longest wait for both sides to take their close once a tunnel is being closed (idle, drain):
/// a peer that reads nothing is not waited for longer.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long a tunnel stays open for its client once the backend has closed its side: the
/// client has been told (its side is shut for writing) and has this long to finish. A client
/// that closes first leaves the backend its side for as long as the idle timeout allows, as an
/// answer may still be on its way.
const BACKEND_FIN_WAIT: Duration = Duration::from_secs(1);

/// A request's wish to switch protocols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// An HTTP/1.1 request asking to switch to the protocols of its `Upgrade` field.
    Offer(HeaderValue),
    /// A WebSocket over an HTTP/2 stream (RFC 8441), carried to the backend as an HTTP/1.1
    /// WebSocket upgrade.
    WebSocketOverH2,
}

/// What the request asks for: a switch of protocols to carry, or none. A request that asks for
/// one with a body is refused (the connection would carry both), and an extended `CONNECT` for
/// a protocol other than WebSocket is not implemented.
pub fn requested(parts: &http::request::Parts) -> Result<Option<Upgrade>, Refusal> {
    if parts.method == Method::CONNECT {
        return match parts.extensions.get::<hyper::ext::Protocol>() {
            Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => {
                Ok(Some(Upgrade::WebSocketOverH2))
            }
            Some(_) => Err(Refusal::UnsupportedProtocol),
            None => Err(Refusal::MethodNotAllowed),
        };
    }
    if parts.version != Version::HTTP_11 {
        return Ok(None);
    }
    let Some(offer) = parts.headers.get(header::UPGRADE) else {
        return Ok(None);
    };
    let asked = super::head::connection_tokens(&parts.headers)
        .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    if !asked || offers_h2c(offer) {
        return Ok(None);
    }
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || super::head::declared_length(&parts.headers).is_some_and(|n| n > 0);
    if has_body {
        return Err(Refusal::BadRequest(
            "a request to switch protocols cannot carry a body",
        ));
    }
    Ok(Some(Upgrade::Offer(offer.clone())))
}

/// Whether an `Upgrade` field offers HTTP/2 over cleartext (`h2c`), alone or among others.
fn offers_h2c(offer: &HeaderValue) -> bool {
    offer
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .any(|p| p.eq_ignore_ascii_case(b"h2c"))
}

/// The fields the backend's request carries for the switch, in place of the client's: the
/// switch itself, and for a WebSocket over HTTP/2 the handshake fields HTTP/1.1 needs.
pub fn fields(upgrade: &Upgrade, headers: &HeaderMap) -> [Option<(HeaderName, HeaderValue)>; 4] {
    let connection = Some((header::CONNECTION, HeaderValue::from_static("upgrade")));
    match upgrade {
        Upgrade::Offer(offer) => [connection, Some((header::UPGRADE, offer.clone())), None, None],
        // RFC 8441 section 5: the HTTP/2 request has no key; the backend's request needs one.
        Upgrade::WebSocketOverH2 => [
            connection,
            Some((header::UPGRADE, HeaderValue::from_static("websocket"))),
            Some((header::SEC_WEBSOCKET_KEY, websocket_key())),
            Some(version(headers)),
        ],
    }
}

/// The client's `Sec-WebSocket-Version`, or 13 (RFC 6455's).
fn version(headers: &HeaderMap) -> (HeaderName, HeaderValue) {
    let v = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("13"));
    (header::SEC_WEBSOCKET_VERSION, v)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 section 4.1).
fn websocket_key() -> HeaderValue {
    let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
    HeaderValue::from_str(&key).expect("base64 is a valid header value")
}

/// Upgraded connections of one worker: tracked so a drain can wait for them, and closed together
/// when it runs out of time.
pub struct Tunnels {
    tracker: TaskTracker,
    close: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Tunnels {
        Tunnels {
            tracker: TaskTracker::new(),
            close: watch::channel(false).0,
        }
    }
}

impl Tunnels {
    /// Waits up to `deadline` for this worker's tunnels to end on their own, then closes those
    /// left (both sides, cleanly) and waits a moment for them to go.
    pub async fn drain(&self, deadline: Instant) {
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tunnels = self.tracker.len(),
                "drain timeout; closing the remaining upgraded connections"
            );
            self.close.send_replace(true);
            let _ = tokio::time::timeout(CLOSE_WAIT * 2, self.tracker.wait()).await;
        }
    }
}

/// A place among the data plane's open tunnels (`--max-tunnels`), given back on drop.
pub struct Place(Arc<crate::shared::Shared>);

impl Place {
    /// A place, if fewer than `--max-tunnels` tunnels are open.
    pub fn take(shared: &Arc<crate::shared::Shared>) -> Result<Place, Refusal> {
        let max = shared.settings.max_tunnels;
        // Counted first, then checked: racing workers never together pass the cap.
        if shared.tunnels.fetch_add(1, Ordering::Relaxed) >= max {
            shared.tunnels.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::TooManyTunnels { max });
        }
        shared.metrics.tunnels_open.inc();
        Ok(Place(Arc::clone(shared)))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.tunnels_open.dec();
    }
}

/// The client's answer to a request that asked to switch: on the backend's `101`, the switch
/// (for an HTTP/2 client, RFC 8441's `200`), with the splice started; otherwise the backend's
/// answer as it is, but that a WebSocket over HTTP/2 not switched is a bad gateway (its client
/// would take any `2xx` for the switch).
pub fn answer(
    worker: &super::Worker,
    resp: Response<ProxyBody>,
    upgrade: &Upgrade,
    client: Option<ClientSide>,
    place: Place,
    idle: Option<Duration>,
) -> Result<Response<ProxyBody>, Refusal> {
    let (mut parts, body) = resp.into_parts();
    let ProxyBody::Upstream(mut upstream) = body else {
        return Ok(Response::from_parts(parts, body));
    };
    let switched = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| upstream.take_switched())
        .flatten();
    let (Some((io, early)), Some(client)) = (switched, client) else {
        if *upgrade == Upgrade::WebSocketOverH2 && parts.status.is_success() {
            return Err(Refusal::BadGateway {
                backend: Some(upstream.endpoint().address.clone()),
            });
        }
        return Ok(Response::from_parts(parts, ProxyBody::Upstream(upstream)));
    };
    match upgrade {
        Upgrade::Offer(_) => {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        Upgrade::WebSocketOverH2 => {
            parts.status = StatusCode::OK;
            parts.version = Version::HTTP_2;
            for f in [header::UPGRADE, header::SEC_WEBSOCKET_ACCEPT] {
                parts.headers.remove(f);
            }
        }
    }
    let splice = Splice {
        bytes: worker.shared.metrics.tunnel_bytes.clone(),
        idle,
        close: worker.tunnels.close.subscribe(),
        _held: (upstream, place),
    };
    worker
        .tunnels
        .tracker
        .spawn(splice.run(client, io, early));
    Ok(Response::from_parts(parts, ProxyBody::Local(None)))
}

/// The client's side of a tunnel, as its server hands it over once the switch has gone out.
pub enum ClientSide {
    Http1(OnSwitch),
    /// An RFC 8441 stream.
    Http2(OnUpgrade),
}

impl ClientSide {
    /// The switch offered in a request's extensions, taken out.
    pub fn take(extensions: &mut http::Extensions) -> Option<ClientSide> {
        if let Some(s) = extensions.remove::<OnSwitch>() {
            return Some(ClientSide::Http1(s));
        }
        extensions.remove::<OnUpgrade>().map(ClientSide::Http2)
    }

    async fn switched(self) -> std::io::Result<Box<dyn switch::Io>> {
        match self {
            ClientSide::Http1(s) => Ok(Box::new(s.switched().await?)),
            ClientSide::Http2(u) => match u.await {
                Ok(upgraded) => Ok(Box::new(TokioIo::new(upgraded))),
                Err(e) => Err(std::io::Error::other(e)),
            },
        }
    }
}

/// One tunnel's splice, and what it holds while it runs.
struct Splice {
    /// Bytes carried: `[to_backend, to_client]`.
    bytes: [prometheus::IntCounter; 2],
    idle: Option<Duration>,
    close: watch::Receiver<bool>,
    /// The backend's response (its in-flight count) and the tunnel's place, until the end.
    _held: (UpstreamResponse, Place),
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides closed.
    Closed,
    /// A side failed (reset, or a write to a side gone).
    Failed,
    /// Nothing passed either way for the idle timeout.
    Idle,
    /// A drain ran out of time.
    Drained,
}

impl Splice {
    async fn run(mut self, client: ClientSide, backend: Io, early: BytesMut) {
        let started = Instant::now();
        let client = match client.switched().await {
            Ok(io) => io,
            // The client went away before it took the switch.
            Err(e) => {
                tracing::debug!(cause = %e, "client gone before its connection was upgraded");
                return;
            }
        };
        let activity = Arc::new(AtomicU64::new(0));
        let backend_closed = tokio::sync::Notify::new();
        let [to_backend, to_client] = self.bytes.clone();
        let mut client = Counted::new(client, to_backend, &activity, started);
        let mut backend = Counted::new(backend, to_client.clone(), &activity, started);
        backend.closed = Some(&backend_closed);
        let end = async {
            // What the backend sent right behind its `101` goes first.
            if !early.is_empty() {
                client.inner.write_all(&early).await?;
                to_client.inc_by(early.len() as u64);
            }
            tokio::io::copy_bidirectional(&mut client, &mut backend).await
        };
        let (end, cause) = tokio::select! {
            r = end => match r {
                Ok(_) => (End::Closed, None),
                Err(e) => (End::Failed, Some(e)),
            },
            () = idle_for(self.idle, &activity, started) => (End::Idle, None),
            () = async {
                backend_closed.notified().await;
                tokio::time::sleep(BACKEND_FIN_WAIT).await;
            } => (End::Closed, None),
            _ = self.close.wait_for(|c| *c) => (End::Drained, None),
        };
        if matches!(end, End::Idle | End::Drained) {
            let closing = async { tokio::join!(client.shutdown(), backend.shutdown()) };
            let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
        }
        tracing::debug!(
            ?end,
            cause = cause.map(|e| e.to_string()),
            to_backend = client.bytes,
            to_client = backend.bytes + early.len() as u64,
            seconds = started.elapsed().as_secs_f64(),
            "upgraded connection closed"
        );
    }
}

/// Resolves once nothing has passed either way for `idle` (never, without one).
async fn idle_for(idle: Option<Duration>, activity: &AtomicU64, started: Instant) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let last = started + Duration::from_millis(activity.load(Ordering::Relaxed));
        if Instant::now() >= last + idle {
            return;
        }
        tokio::time::sleep_until(last + idle).await;
    }
}

/// One side of a tunnel: what is read from it is counted (bytes, and the time of the last read,
/// in milliseconds since the tunnel started).
struct Counted<'a, T> {
    inner: T,
    bytes: u64,
    counter: prometheus::IntCounter,
    activity: &'a AtomicU64,
    started: Instant,
    /// Told when this side closes (a read finds the end of its stream).
    closed: Option<&'a tokio::sync::Notify>,
}

impl<'a, T> Counted<'a, T> {
    fn new(
        inner: T,
        counter: prometheus::IntCounter,
        activity: &'a AtomicU64,
        started: Instant,
    ) -> Self {
        Counted {
            inner,
            bytes: 0,
            counter,
            activity,
            started,
            closed: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n == 0
            && buf.remaining() > 0
            && matches!(polled, Poll::Ready(Ok(())))
            && let Some(closed) = this.closed
        {
            closed.notify_one();
        }
        if n > 0 {
            this.bytes += n;
            this.counter.inc_by(n);
            let ms = this.started.elapsed().as_millis();
            this.activity
                .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> http::request::Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_upgrade_is_asked_with_connection_and_upgrade_both() {
        let ws = || {
            http::Request::get("/chat")
                .header("upgrade", "websocket")
                .header("connection", "keep-alive, Upgrade")
        };
        assert_eq!(
            requested(&parts(ws())).unwrap(),
            Some(Upgrade::Offer(HeaderValue::from_static("websocket")))
        );
        // Upgrade without Connection naming it: no switch asked.
        let bare = http::Request::get("/").header("upgrade", "websocket");
        assert_eq!(requested(&parts(bare)).unwrap(), None);
        // HTTP/1.0 has no upgrades.
        assert_eq!(
            requested(&parts(ws().version(Version::HTTP_10))).unwrap(),
            None
        );
        // h2c is declined, alone or among others.
        for offer in ["h2c", "websocket, H2C"] {
            let h2c = http::Request::get("/")
                .header("upgrade", offer)
                .header("connection", "Upgrade, HTTP2-Settings");
            assert_eq!(requested(&parts(h2c)).unwrap(), None, "{offer}");
        }
        // A body with the switch is refused.
        let with_body = ws().header("content-length", "5");
        assert!(matches!(
            requested(&parts(with_body)),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn extended_connect_is_a_websocket_or_nothing() {
        let connect = |protocol: Option<&str>| {
            let mut p = parts(
                http::Request::builder()
                    .method(Method::CONNECT)
                    .version(Version::HTTP_2)
                    .uri("https://example.com/chat"),
            );
            if let Some(proto) = protocol {
                p.extensions.insert(hyper::ext::Protocol::from(proto));
            }
            p
        };
        assert_eq!(
            requested(&connect(Some("websocket"))).unwrap(),
            Some(Upgrade::WebSocketOverH2)
        );
        assert!(matches!(
            requested(&connect(Some("webtransport"))),
            Err(Refusal::UnsupportedProtocol)
        ));
        assert!(matches!(
            requested(&connect(None)),
            Err(Refusal::MethodNotAllowed)
        ));
    }

    #[test]
    fn a_websocket_over_http2_gets_a_key_for_its_backend() {
        let [conn, up, key, version] =
            fields(&Upgrade::WebSocketOverH2, &HeaderMap::new()).map(Option::unwrap);
        assert_eq!((conn.1.as_bytes(), up.1.as_bytes()), (&b"upgrade"[..], &b"websocket"[..]));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.1.as_bytes())
            .unwrap();
        assert_eq!(raw.len(), 16);
        assert_eq!(version.1, "13");
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_is_counted_from_the_last_byte() {
        let activity = AtomicU64::new(0);
        let started = Instant::now();
        let idle = Some(Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(30)).await;
        activity.store(30_000, Ordering::Relaxed);
        let waited = Instant::now();
        idle_for(idle, &activity, started).await;
        assert_eq!(waited.elapsed(), Duration::from_secs(60));
    }
}
