//! The request path: pick a backend for each client request and forward it over a pooled
//! connection, streaming both bodies. Steps, in order:
//! 1. refuse what breaks a limit (body size; head size and read time are enforced by the server);
//! 2. load the configuration once, so the whole request runs under one snapshot;
//! 3. pick a backend with the snapshot's strategy, skipping unusable ones;
//! 4. rewrite the request: hop-by-hop headers out, `X-Forwarded-*` and `X-Request-Id` in;
//! 5. forward, bounded by the request timeout; map failures to 502/504 with a JSON body;
//! 6. stream the response back, holding the backend's in-flight count until the body ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{Endpoint, InFlight};
use crate::cache::{Entry, Fill, Lookup, NotStored, X_CACHE};
use crate::clock::millis;
use crate::config::active::{Active, HashSource, View};
use crate::policy::admission::Shed;
use crate::policy::balance::hash_bytes;
use crate::policy::outlier;
use crate::policy::retry::{self, RetryBudget};
use crate::ratelimit::gcra::{Decision, Rate, Verdict};
use crate::ratelimit::identity;
use crate::shared::Shared;
use crate::telemetry::otel::{self, Span as _};
use crate::telemetry::report::Outcome;
use crate::upstream;
use crate::upstream::request_body::{ClientBody, ClientBodyError, RequestBody};
use lb_proto::v1::RequestLogEntry;
use opentelemetry::KeyValue;

/// What the requests of one worker thread share.
pub struct Worker {
    pub shared: Arc<Shared>,
    /// Index of the worker thread, selecting its connection pools.
    pub id: usize,
    /// This thread's retry budget (a share of its own traffic).
    pub budget: std::sync::Mutex<RetryBudget>,
    /// This thread's connection to the shared rate-limit store, if one is configured.
    pub redis: Option<crate::redis::RedisConn>,
    /// Rate-limit decisions through Redis, batched per thread.
    limits: Option<crate::ratelimit::Batcher>,
    /// This thread's handle on the configuration in force, and its version.
    // Deliberately two allocations: the outer count is this thread's alone (see `active`).
    #[allow(clippy::redundant_allocation)]
    active: std::sync::Mutex<Option<(u64, Arc<Arc<Active>>)>>,
}

impl Worker {
    /// Must be called on the worker's own runtime (its Redis connection lives there).
    pub async fn new(shared: Arc<Shared>, id: usize) -> Worker {
        let redis = shared.limiter.connect().await;
        let limits = redis.clone().map(crate::ratelimit::Batcher::spawn);
        Worker {
            shared,
            id,
            budget: std::sync::Mutex::new(RetryBudget::new()),
            redis,
            limits,
            active: std::sync::Mutex::new(None),
        }
    }

    /// The configuration in force, through this worker's own handle: the handle's count is
    /// touched by this thread only, where cloning the shared one would bounce its count between
    /// cores on every request.
    #[allow(clippy::redundant_allocation)]
    fn active(&self) -> Option<Arc<Arc<Active>>> {
        let version = self.shared.generation();
        let mut cached = self.active.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((v, a)) if *v == version => Some(Arc::clone(a)),
            _ => {
                let a = Arc::new(self.shared.active()?);
                *cached = Some((version, Arc::clone(&a)));
                Some(a)
            }
        }
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the requests of one client connection share, computed once per connection.
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The client connected over TLS: backends are told `X-Forwarded-Proto: https`.
    pub tls: bool,
    /// The peer's address as a header value, for X-Forwarded-For.
    peer_ip: HeaderValue,
    /// Hash of the peer's address, for ip_hash.
    affinity: u64,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, tls: bool) -> ClientConn {
        let affinity = match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
        };
        ClientConn {
            peer,
            tls,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            affinity,
        }
    }

    /// The scheme the client used: "https" or "http".
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// Body of a response to a client: a backend's, streamed, or one made here (errors).
// Nearly every response is a backend's: boxing that variant to shrink the rare local one would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Upstream(UpstreamResponse),
    Local(Option<Bytes>),
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

/// Copies a response body on its way to the client, up to the cache's entry size, and stores
/// it when the body is complete. A body that grows too large is streamed on and not stored; one
/// the client abandons is not stored either (the [`Fill`] is dropped, releasing the requests
/// waiting for it).
pub struct Tee {
    fill: Option<Fill>,
    redis: Option<crate::redis::RedisConn>,
    status: StatusCode,
    headers: HeaderMap,
    buf: bytes::BytesMut,
    limit: usize,
    over: bool,
}

impl Tee {
    fn push(&mut self, data: &Bytes) {
        if self.over {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            self.over = true;
            self.buf = bytes::BytesMut::new();
            if let Some(f) = self.fill.take() {
                tokio::spawn(f.not_stored(NotStored::TooLarge));
            }
            return;
        }
        self.buf.extend_from_slice(data);
    }

    fn finish(&mut self) {
        let Some(fill) = self.fill.take() else { return };
        if self.over {
            return;
        }
        let body = std::mem::take(&mut self.buf).freeze();
        let (redis, status, headers) = (
            self.redis.take(),
            self.status,
            std::mem::take(&mut self.headers),
        );
        tokio::spawn(async move {
            let _ = fill
                .store(
                    redis.as_ref(),
                    status,
                    &headers,
                    body,
                    crate::clock::unix_ms(),
                )
                .await;
        });
    }
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
struct Pending {
    #[allow(clippy::redundant_allocation)]
    active: Arc<Arc<Active>>,
    at: Instant,
    /// The head's success is recorded already: only a break of the body is left to record.
    judged: bool,
}

impl Pending {
    /// Records the response's outcome against `endpoint`: a failure at `now`, or a success.
    fn record(&self, endpoint: &Endpoint, failed: bool, now: Instant) {
        endpoint.record_outcome(failed, now, &self.active.outlier, || {
            may_eject(&self.active, now)
        });
    }
}

impl UpstreamResponse {
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

/// Whether one more backend may be ejected now without passing the configured share.
fn may_eject(active: &Active, now: Instant) -> bool {
    let now_ms = millis(now);
    let ejected = active
        .slots
        .iter()
        .filter(|s| s.endpoint.is_ejected(now_ms))
        .count();
    ejected < outlier::max_ejected(active.slots.len(), active.outlier.max_ejection_percent)
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(u) => u.body.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(u) => u.body.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Headers that belong to one connection and are never forwarded (RFC 9110 section 7.6.1).
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");

/// Longest client-supplied request id kept; a longer or odd one is replaced.
const MAX_REQUEST_ID: usize = 200;

/// How many passes of the event loop a response waits before hyper writes it (see [`handle`]).
const RESPONSE_PASSES: usize = 3;

/// Removes the hop-by-hop fields of a message on its way through: the classic set, and those
/// `Connection` names. One pass finds them; most messages carry none.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if upstream::is_hop_by_hop(name) {
            found.push(name.clone());
        }
    }
    if found.is_empty() {
        return;
    }
    for token in connection_tokens(headers) {
        // `close` and `keep-alive` name no field to remove (or one removed anyway).
        if token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive") {
            continue;
        }
        if let Ok(n) = HeaderName::from_bytes(token)
            && !found.contains(&n)
        {
            found.push(n);
        }
    }
    for n in found {
        headers.remove(n);
    }
}

/// The comma-separated tokens of every `Connection` field, trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// Whether the client's connection closes after this request: `Connection: close`, or HTTP/1.0
/// without `Connection: keep-alive`. HTTP/2 streams share a connection that stays.
fn closes_after<B>(req: &Request<B>) -> bool {
    let says = |word: &[u8]| connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case(word));
    match req.version() {
        Version::HTTP_09 | Version::HTTP_10 => !says(b"keep-alive"),
        Version::HTTP_11 => says(b"close"),
        _ => false,
    }
}

/// 128 random bits as 32 hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for b in buf.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v)
            if !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.as_bytes().iter().all(u8::is_ascii_graphic) =>
        {
            v.clone()
        }
        _ => new_request_id(),
    }
}

/// A response made by the data plane itself: JSON `{"error", "message", "request_id"}`.
pub fn local_response(
    status: StatusCode,
    error: &str,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": error,
        "message": message,
        "request_id": request_id.and_then(|v| v.to_str().ok()),
    });
    let mut resp = Response::new(ProxyBody::Local(Some(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(id) = request_id {
        h.insert(X_REQUEST_ID.clone(), id.clone());
    }
    resp
}

/// Handles one client request; never fails (every error is an HTTP response).
pub async fn handle(
    worker: Arc<Worker>,
    conn: Arc<ClientConn>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let shared = &worker.shared;
    let mut span = shared
        .tracer
        .as_ref()
        .filter(|t| t.wanted(req.headers()))
        .map(|t| start_span(t, &mut req, &conn));
    // Only sampled requests pay for copying their method and path.
    let head = shared.reporter.sample().then(|| {
        (
            req.method().to_string(),
            req.uri().path().chars().take(1024).collect::<String>(),
        )
    });
    let detailed = head.is_some() || span.as_ref().is_some_and(|s| s.is_recording());
    let last = closes_after(&req);
    let mut resp = forward(&worker, &conn, req, detailed).await;
    // A response waits RESPONSE_PASSES passes of the event loop over its ready tasks before
    // hyper writes it to the client. The requests read in the same turn go to their backends
    // first ([`upstream::send`] waits one pass), and the responses gathered over a pass go out
    // together, so a client takes more of them per wake-up: wrk, in front of this data plane,
    // calls `epoll_wait` about 30% less often per response and spends about 8% less CPU
    // (README, Performance). A pass takes microseconds when the loop is idle. The last
    // response of a connection goes out at once: there is no next request to gather it with.
    if !last {
        for _ in 0..RESPONSE_PASSES {
            tokio::task::yield_now().await;
        }
    }
    let outcome = resp
        .extensions_mut()
        .remove::<Outcome>()
        .unwrap_or_default();
    if let Some(span) = &mut span {
        end_span(span, &worker, &resp, &outcome);
    }
    if let Some((method, path)) = head {
        shared.reporter.log(RequestLogEntry {
            timestamp_ms: crate::clock::unix_ms(),
            request_id: resp
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            method,
            path,
            status: u32::from(resp.status().as_u16()),
            backend: outcome.backend.unwrap_or_default(),
            latency_us: started.elapsed().as_micros() as u64,
            client: conn.peer.ip().to_string(),
            key_id: outcome.key_id.unwrap_or_default(),
            tier: outcome.tier.unwrap_or_default(),
            decision: outcome.decision.to_owned(),
            node_id: shared.settings.node_id.clone(),
        });
    }
    shared.metrics.response(resp.status().as_u16());
    shared
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

/// A server span for the request, child of the client's `traceparent`; the request carries the
/// span's context on to the backend.
fn start_span(
    t: &otel::Tracing,
    req: &mut Request<Incoming>,
    conn: &ClientConn,
) -> otel::RequestSpan {
    let parent = t.extract(req.headers());
    // Span names stay few: the standard methods, anything else as "_OTHER".
    let name = match *req.method() {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "_OTHER",
    };
    let mut span = t.server_span(name, &parent, Vec::new());
    // Attributes cost allocations: only spans that are kept get them.
    if span.is_recording() {
        let version = match req.version() {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        // The query stays out: it may carry credentials such as an API key.
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method().as_str().to_owned()),
            KeyValue::new(
                "url.path",
                req.uri().path().chars().take(1024).collect::<String>(),
            ),
            KeyValue::new("url.scheme", conn.scheme()),
            KeyValue::new("client.address", conn.peer.ip().to_string()),
            KeyValue::new("network.protocol.version", version),
        ];
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if let Some(host) = host {
            let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
            attributes.push(KeyValue::new("server.address", name.to_owned()));
        }
        if let Some(ua) = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new(
                "user_agent.original",
                ua.chars().take(256).collect::<String>(),
            ));
        }
        span.set_attributes(attributes);
    }
    t.inject(&span, req.headers_mut());
    span
}

/// Records what became of the request on its span and ends it (at the response head).
fn end_span(
    span: &mut otel::RequestSpan,
    worker: &Worker,
    resp: &Response<ProxyBody>,
    outcome: &Outcome,
) {
    if !span.is_recording() {
        return;
    }
    let status = resp.status().as_u16();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    let text = |name: &HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(id) = text(&X_REQUEST_ID) {
        span.set_attribute(KeyValue::new("lb.request_id", id));
    }
    if let Some(backend) = &outcome.backend {
        span.set_attribute(KeyValue::new("lb.backend", backend.clone()));
    }
    if let Some(active) = worker.active() {
        span.set_attribute(KeyValue::new(
            "lb.strategy",
            active.snapshot.strategy.clone(),
        ));
    }
    if !outcome.decision.is_empty() {
        span.set_attribute(KeyValue::new("lb.decision", outcome.decision));
    }
    if let Some(tier) = &outcome.tier {
        span.set_attribute(KeyValue::new("lb.rate_limit.policy", tier.clone()));
    }
    if let Some(remaining) = text(&HeaderName::from_static("x-ratelimit-remaining")) {
        span.set_attribute(KeyValue::new("lb.rate_limit.remaining", remaining));
    }
    if let Some(cache) = text(&X_CACHE) {
        span.set_attribute(KeyValue::new("lb.cache", cache));
    }
    if status >= 500 {
        span.set_status(otel::Status::error(format!("HTTP {status}")));
    }
    span.end();
}

fn refuse(
    shared: &Shared,
    reason: &'static str,
    status: StatusCode,
    message: &str,
    id: &HeaderValue,
) -> Response<ProxyBody> {
    shared.metrics.refused.with_label_values(&[reason]).inc();
    let mut r = local_response(status, reason, message, Some(id));
    r.extensions_mut().insert(Outcome {
        decision: reason,
        ..Outcome::default()
    });
    r
}

/// Why no backend could be picked for an attempt.
enum Choice {
    Backend(usize),
    /// Every usable backend is at its in-flight limit: wait in the queue.
    Saturated,
    /// Every circuit is open; the earliest reopens at this instant (in [`millis`]).
    CircuitsOpen(u64),
    NoBackend(String),
}

fn choose(active: &Active, affinity: u64, now_ms: u64, tried: &[usize], worker: usize) -> Choice {
    let mut view = View {
        active,
        now_ms,
        tried,
        ignore_health: false,
        worker,
    };
    if let Some(i) = active.balancer.pick(&view, affinity) {
        return Choice::Backend(i);
    }
    let live: Vec<&crate::config::active::Slot> = active
        .slots
        .iter()
        .enumerate()
        .filter(|(i, s)| !s.draining && !tried.contains(i))
        .map(|(_, s)| s)
        .collect();
    if live.is_empty() {
        return Choice::NoBackend(if active.slots.is_empty() {
            "no backends are configured".to_owned()
        } else if tried.is_empty() {
            format!(
                "none of the {} backends is usable (all draining)",
                active.slots.len()
            )
        } else {
            "no other backend is left to try".to_owned()
        });
    }
    let closed: Vec<&&crate::config::active::Slot> = live
        .iter()
        .filter(|s| s.endpoint.circuit_open_until(now_ms).is_none())
        .collect();
    if closed.is_empty() {
        let reopen = live
            .iter()
            .filter_map(|s| s.endpoint.circuit_open_until(now_ms))
            .min();
        return Choice::CircuitsOpen(reopen.unwrap_or(now_ms));
    }
    let healthy = closed
        .iter()
        .any(|s| s.endpoint.is_healthy() && !s.endpoint.is_ejected(now_ms));
    if healthy {
        return Choice::Saturated;
    }
    // Panic mode (as Envoy's panic threshold): health checks and ejections left nothing, so
    // trust none of them and spread over every backend with a closed circuit.
    view.ignore_health = true;
    match active.balancer.pick(&view, affinity) {
        Some(i) => Choice::Backend(i),
        None => Choice::Saturated,
    }
}

/// What ip_hash keys on: the configured header or cookie when present, else the client address.
fn affinity(headers: &HeaderMap, conn: &ClientConn, active: &Active) -> u64 {
    let value = match &active.hash_source {
        HashSource::Ip => None,
        HashSource::Header(name) => headers.get(name).map(HeaderValue::as_bytes),
        HashSource::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes()),
    };
    value.map_or(conn.affinity, hash_bytes)
}

/// Queue priority: `X-Priority` from a trusted peer, else the default tier's.
fn priority(headers: &HeaderMap, conn: &ClientConn, active: &Active, base: u32) -> u32 {
    if !active.trusted.is_empty()
        && active.trusted.iter().any(|n| n.contains(&conn.peer.ip()))
        && let Some(p) = headers
            .get("x-priority")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
    {
        return p;
    }
    base
}

/// The quota a request was admitted under, for the `RateLimit` headers of its response.
struct Quota {
    /// Key id of a keyed request, for the request log.
    key_id: Option<String>,
    policy: String,
    rate: Rate,
    decision: Decision,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl Quota {
    fn headers(&self, h: &mut HeaderMap) {
        use std::fmt::Write as _;
        let window = self.rate.period_ms.div_ceil(1000);
        let reset = self.decision.reset_ms.div_ceil(1000);
        let mut text = String::with_capacity(2 * self.policy.len() + 48);
        let mut put = |name: &HeaderName, text: &str| {
            if let Ok(v) = HeaderValue::from_str(text) {
                h.insert(name.clone(), v);
            }
        };
        // draft-ietf-httpapi-ratelimit-headers: the policy, and what is left of it.
        let _ = write!(
            text,
            "\"{}\";q={};w={window}",
            self.policy, self.rate.requests
        );
        put(&RATELIMIT_POLICY, &text);
        text.clear();
        let _ = write!(
            text,
            "\"{}\";r={};t={reset}",
            self.policy, self.decision.remaining
        );
        put(&RATELIMIT, &text);
        h.insert(
            X_RATELIMIT_LIMIT.clone(),
            HeaderValue::from(self.rate.requests),
        );
        h.insert(
            X_RATELIMIT_REMAINING.clone(),
            HeaderValue::from(self.decision.remaining),
        );
        h.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(reset));
    }
}

/// Identifies the client and applies its limit: the queue priority and quota of an admitted
/// request, or the refusal (400 bad key, 401 unknown key, 403 blocked, 429 limited or banned,
/// 503 when the limiter cannot decide in `closed` mode).
async fn rate_limit(
    worker: &Worker,
    conn: &ClientConn,
    parts: &http::request::Parts,
    active: &Active,
    id: &HeaderValue,
) -> Result<(u32, Option<Quota>), Response<ProxyBody>> {
    let shared = &*worker.shared;
    let limits = &active.limits;
    let key = identity::api_key(&parts.headers, parts.uri.query()).map_err(|e| {
        refuse(
            shared,
            "invalid_api_key",
            StatusCode::BAD_REQUEST,
            &e.to_string(),
            id,
        )
    })?;
    let (who, rate, policy, prio) = match &key {
        Some(k) => {
            let o = limits.overrides.get(&k.hash);
            if o.is_some_and(|(_, blocked)| *blocked) {
                return Err(refuse(
                    shared,
                    "blocked",
                    StatusCode::FORBIDDEN,
                    "this API key is blocked",
                    id,
                ));
            }
            if o.is_none() && limits.reject_unknown {
                return Err(refuse(
                    shared,
                    "unknown_key",
                    StatusCode::UNAUTHORIZED,
                    "unknown API key",
                    id,
                ));
            }
            let Some(tier) = limits.tier_of(&k.hash) else {
                return Ok((active.default_priority, None));
            };
            (
                format!("key:{}", k.id()),
                tier.rate,
                tier.name.clone(),
                tier.priority,
            )
        }
        None => {
            // No per-IP limit: nothing to name the client for.
            let Some(rate) = limits.ip else {
                return Ok((active.default_priority, None));
            };
            let ip = identity::client_ip(conn.peer.ip(), &parts.headers, &active.trusted);
            (
                identity::ip_identity(ip),
                rate,
                "ip".to_owned(),
                active.default_priority,
            )
        }
    };
    let (decision, _source) = shared
        .limiter
        .check(
            worker.limits.as_ref(),
            &who,
            rate,
            limits.ban,
            limits.on_store_failure,
        )
        .await;
    let Some(decision) = decision else {
        let mut r = refuse(
            shared,
            "limiter_unavailable",
            StatusCode::SERVICE_UNAVAILABLE,
            "the shared rate-limit store is unreachable",
            id,
        );
        retry_after(&mut r, 1);
        return Err(r);
    };
    let key_id = key.as_ref().map(|k| k.id().to_owned());
    if let Some(k) = &key_id {
        shared
            .reporter
            .key(k, &policy, decision.verdict != Verdict::Allowed);
    }
    let quota = Quota {
        key_id,
        policy,
        rate,
        decision,
    };
    match decision.verdict {
        Verdict::Allowed => Ok((prio, Some(quota))),
        verdict => {
            let secs = decision.retry_after_ms.div_ceil(1000).max(1);
            let (reason, message) = if verdict == Verdict::Banned {
                (
                    "banned",
                    format!("banned for {secs} s after repeated rate-limit violations"),
                )
            } else {
                (
                    "rate_limited",
                    format!(
                        "rate limit of {} requests per {} s exceeded ({})",
                        rate.requests,
                        rate.period_ms.div_ceil(1000),
                        quota.policy
                    ),
                )
            };
            shared.metrics.refused.with_label_values(&[reason]).inc();
            let body = serde_json::json!({
                "error": reason,
                "message": message,
                "limit": rate.requests,
                "period_seconds": rate.period_ms as f64 / 1000.0,
                "retry_after_seconds": secs,
                "request_id": id.to_str().ok(),
            });
            let mut r = Response::new(ProxyBody::Local(Some(Bytes::from(body.to_string()))));
            *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(X_REQUEST_ID.clone(), id.clone());
            quota.headers(h);
            retry_after(&mut r, secs);
            r.extensions_mut().insert(Outcome {
                backend: None,
                decision: reason,
                key_id: quota.key_id.clone(),
                tier: Some(quota.policy.clone()),
            });
            Err(r)
        }
    }
}

fn retry_after(resp: &mut Response<ProxyBody>, secs: u64) {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
}

/// A request head kept to send again (a request without a body).
/// Most attempts a request makes, whatever the policy says.
const MAX_TRIED: usize = 8;

async fn forward(
    worker: &Worker,
    conn: &ClientConn,
    req: Request<Incoming>,
    sampled: bool,
) -> Response<ProxyBody> {
    let shared = &*worker.shared;
    let (mut parts, body) = req.into_parts();
    let id = request_id(&parts.headers);

    let max_body = shared.settings.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        let msg = format!("request body is larger than {max_body} bytes");
        return refuse(
            shared,
            "body_too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            &msg,
            &id,
        );
    }

    let Some(active) = worker.active() else {
        return refuse(
            shared,
            "not_configured",
            StatusCode::SERVICE_UNAVAILABLE,
            "no configuration received from the control plane yet",
            &id,
        );
    };
    let (base_priority, quota) = match rate_limit(worker, conn, &parts, &active, &id).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let prio = priority(&parts.headers, conn, &active, base_priority);
    let affinity = affinity(&parts.headers, conn, &active);

    // The cache, after the limits (a cached answer still counts against them).
    let cache = &shared.cache;
    let mut cache_label: Option<&'static str> = None;
    let mut fill: Option<Fill> = None;
    let mut stale: Option<(Arc<Entry>, HeaderMap, bool)> = None;
    if cache.enabled() {
        match cache.request(&parts.method, &parts.uri, &parts.headers) {
            Err(_) => cache_label = Some("BYPASS"),
            Ok(creq) => {
                let now_ms = crate::clock::unix_ms();
                // Boxed: a lookup that may go to Redis is a large future, which inline would
                // enlarge every request's, cacheable or not.
                match Box::pin(cache.lookup(worker.redis.as_ref(), &creq, &parts.headers, now_ms))
                    .await
                {
                    Lookup::Hit(mut hit) => {
                        if let Some(f) = hit.refresh.take() {
                            tokio::spawn(refresh(
                                Arc::clone(&worker.shared),
                                worker.redis.clone(),
                                worker.id,
                                f,
                                parts.uri.clone(),
                                parts.headers.clone(),
                            ));
                        }
                        return cached(hit.response(&parts.headers, now_ms), &id, quota.as_ref());
                    }
                    Lookup::Lead(f) => {
                        stale = f
                            .stale()
                            .map(|e| (Arc::clone(e), parts.headers.clone(), creq.head));
                        fill = Some(f);
                        cache_label = Some("MISS");
                    }
                    Lookup::Pass(p) => {
                        stale = p.stale.map(|e| (e, parts.headers.clone(), creq.head));
                        cache_label = Some("MISS");
                    }
                }
            }
        }
    }

    // The client's host, kept for the backend (Host) and recorded in X-Forwarded-Host.
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    // Origin form on the backend connection: the path and query only.
    parts.uri = match parts.uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    // Backends speak HTTP/1.1 on pooled connections whatever the client spoke.
    parts.version = Version::HTTP_11;

    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok()
        }
        _ => Some(conn.peer_ip.clone()),
    };
    let proto = HeaderValue::from_static(conn.scheme());
    let has_host = host.is_some();
    let keep_forwarded_host = h.contains_key(&X_FORWARDED_HOST);
    // The fields the proxy sets, written straight into the backend's head in place of the
    // client's (`None`: the client's left out), rather than edited into its map first. The
    // client's X-Forwarded-For stays as it came if it cannot be extended, and a forwarded host
    // set by a proxy in front is kept.
    let fields = [
        Some((&X_PRIORITY, None)),
        Some((&X_FORWARDED_PROTO, Some(&proto))),
        Some((&header::HOST, host.as_ref())),
        Some((&X_REQUEST_ID, Some(&id))),
        xff.as_ref().map(|v| (&X_FORWARDED_FOR, Some(v))),
        (!keep_forwarded_host).then_some((&X_FORWARDED_HOST, host.as_ref())),
    ];
    let mut set: [(&HeaderName, Option<&HeaderValue>); 6] = [(&X_PRIORITY, None); 6];
    let mut n = 0;
    for f in fields.into_iter().flatten() {
        set[n] = f;
        n += 1;
    }
    let set = &set[..n];

    let max_attempts = (active.retry.max_attempts.max(1) as usize).min(MAX_TRIED);
    // A request without a body can be sent again after it reached a backend, if idempotent;
    // any request can be moved elsewhere when it never left (connect failure).
    let replayable =
        max_attempts > 1 && body.is_end_stream() && retry::is_idempotent(&parts.method);
    let pending = upstream::Outgoing::with_fields(
        &parts,
        set,
        RequestBody::Client(ClientBody::new(body, max_body, active.client_body_timeout)),
    );
    drop(parts);
    // Its encoded head, to send again: a refcount, not a copy of its fields.
    let replay = replayable.then(|| pending.head().clone());
    let pending = Some(pending);

    let mut resp = send_with_retries(
        worker,
        &active,
        affinity,
        prio,
        &id,
        max_attempts,
        has_host,
        pending,
        replay,
        quota,
        sampled,
    )
    .await;

    // Every backend failed: a stale entry within its stale-if-error window beats an error.
    if resp.status().is_server_error()
        && let Some((entry, req_headers, head)) = stale
    {
        if let Some(f) = fill.take() {
            tokio::spawn(f.failed());
        }
        let mut r = cached(
            entry.response(&req_headers, head, crate::clock::unix_ms()),
            &id,
            None,
        );
        r.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static("STALE"));
        return r;
    }
    if let Some(f) = fill {
        let now_ms = crate::clock::unix_ms();
        let status = resp.status();
        let checked = f.check(status, resp.headers(), now_ms);
        let headers = resp.headers().clone();
        match (resp.body_mut(), checked) {
            (ProxyBody::Upstream(u), Ok(_)) => {
                u.tee = Some(Box::new(Tee {
                    fill: Some(f),
                    redis: worker.redis.clone(),
                    status,
                    headers,
                    buf: bytes::BytesMut::new(),
                    limit: usize::try_from(cache.policy().max_entry_bytes).unwrap_or(usize::MAX),
                    over: false,
                }));
            }
            (_, Err(reason)) if !status.is_server_error() => {
                tokio::spawn(f.not_stored(reason));
            }
            _ => {
                tokio::spawn(f.failed());
            }
        }
    }
    if let Some(label) = cache_label {
        resp.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static(label));
    }
    resp
}

/// A cached response on its way to a client: the request id and quota headers added.
fn cached(resp: Response<Bytes>, id: &HeaderValue, quota: Option<&Quota>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
    if let Some(q) = quota {
        q.headers(&mut parts.headers);
    }
    Response::from_parts(parts, ProxyBody::Local(Some(body)))
}

/// Refreshes a cache entry in the background (stale-while-revalidate): one GET to a backend,
/// its body read up to the entry bound, stored through `fill`.
async fn refresh(
    shared: Arc<Shared>,
    redis: Option<crate::redis::RedisConn>,
    worker: usize,
    fill: Fill,
    uri: Uri,
    mut headers: HeaderMap,
) {
    let Some(active) = shared.active() else {
        return;
    };
    let now = Instant::now();
    let Some(i) = active.balancer.pick(
        &View {
            active: &active,
            now_ms: millis(now),
            tried: &[],
            ignore_health: false,
            worker,
        },
        0,
    ) else {
        return;
    };
    let endpoint = &active.slots[i].endpoint;
    strip_hop_by_hop(&mut headers);
    let mut req = Request::new(());
    *req.uri_mut() = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    *req.headers_mut() = headers;
    let req = upstream::Outgoing::new(&req.into_parts().0, RequestBody::empty());
    let Some(_in_flight) = endpoint.try_start(0, &shared.admission) else {
        return;
    };
    // Bounded even with no request timeout configured: nobody waits on a fill.
    let timeout = active.timeouts.request.unwrap_or(Duration::from_secs(30));
    let timeouts = upstream::Timeouts {
        request: Some(timeout),
        body_idle: Some(active.timeouts.body_idle.unwrap_or(timeout)),
        ..active.timeouts
    };
    let sent = upstream::send(
        &endpoint.idle,
        worker,
        &endpoint.address,
        endpoint.resolved,
        timeouts,
        req,
    );
    let Ok(resp) = sent.await else {
        fill.failed().await;
        return;
    };
    let (parts, body) = resp.into_parts();
    let limit = usize::try_from(shared.cache.policy().max_entry_bytes).unwrap_or(usize::MAX);
    match http_body_util::BodyExt::collect(Limited::new(body, limit)).await {
        Ok(b) => {
            let _ = fill
                .store(
                    redis.as_ref(),
                    parts.status,
                    &parts.headers,
                    b.to_bytes(),
                    crate::clock::unix_ms(),
                )
                .await;
        }
        Err(_) => fill.not_stored(NotStored::TooLarge).await,
    }
}

/// Sends a request, retrying on other backends within the budget; queues when every backend
/// is full. Every failure is an HTTP response.
#[allow(clippy::too_many_arguments, clippy::redundant_allocation)]
async fn send_with_retries(
    worker: &Worker,
    active: &Arc<Arc<Active>>,
    affinity: u64,
    prio: u32,
    id: &HeaderValue,
    max_attempts: usize,
    has_host: bool,
    mut pending: Option<upstream::Outgoing>,
    replay: Option<upstream::Head>,
    quota: Option<Quota>,
    sampled: bool,
) -> Response<ProxyBody> {
    let shared = &*worker.shared;
    let id = id.clone();
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failure: Option<Response<ProxyBody>> = None;
    let first = Instant::now();
    worker.budget().deposit(first);
    let queue_deadline = first + Duration::from_millis(u64::from(active.queue.timeout_ms.max(1)));
    let (mut now, mut again) = (first, false);
    loop {
        // The first pass goes on the time just taken; every later one (after a queue wait, a
        // failure or a lost race for a slot) reads the clock again.
        if again {
            now = Instant::now();
        }
        again = true;
        let i = match choose(active, affinity, millis(now), &tried, worker.id) {
            Choice::Backend(i) => i,
            Choice::Saturated => {
                let waited =
                    tokio::time::timeout_at(queue_deadline, shared.admission.wait(prio)).await;
                shared
                    .metrics
                    .queue_wait
                    .observe(now.elapsed().as_secs_f64());
                match waited {
                    Ok(Ok(())) => continue,
                    Ok(Err(Shed::QueueFull)) => {
                        let mut r = refuse(
                            shared,
                            "shed",
                            StatusCode::SERVICE_UNAVAILABLE,
                            "every backend is at its limit and the queue is full",
                            &id,
                        );
                        retry_after(&mut r, 1);
                        return r;
                    }
                    Ok(Err(Shed::Timeout)) | Err(_) => {
                        let mut r = refuse(
                            shared,
                            "shed",
                            StatusCode::SERVICE_UNAVAILABLE,
                            "every backend stayed at its limit for the whole queue timeout",
                            &id,
                        );
                        retry_after(&mut r, 1);
                        return r;
                    }
                }
            }
            Choice::CircuitsOpen(until_ms) => {
                if let Some(r) = last_failure {
                    return r;
                }
                let mut r = refuse(
                    shared,
                    "circuit_open",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "every backend's circuit breaker is open",
                    &id,
                );
                retry_after(&mut r, until_ms.saturating_sub(millis(now)).div_ceil(1000));
                return r;
            }
            Choice::NoBackend(msg) => {
                if let Some(r) = last_failure {
                    return r;
                }
                return refuse(
                    shared,
                    "no_backend",
                    StatusCode::SERVICE_UNAVAILABLE,
                    &msg,
                    &id,
                );
            }
        };
        let slot = &active.slots[i];
        let endpoint = &slot.endpoint;
        if !endpoint.try_acquire(now) {
            // Half-open with every trial slot taken: as good as open for this request.
            tried.push(i);
            continue;
        }
        let Some(in_flight) = endpoint.try_start(slot.max_in_flight, &shared.admission) else {
            // Another worker took the last slot between the pick and now; pick again.
            continue;
        };
        tried.push(i);
        let mut upstream = match pending.take() {
            Some(r) => r,
            None => match &replay {
                Some(head) => upstream::Outgoing::again(head),
                None => break,
            },
        };
        if !has_host && let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str()) {
            upstream.set_host(v);
        }
        let result = upstream::send(
            &endpoint.idle,
            worker.id,
            &endpoint.address,
            endpoint.resolved,
            active.timeouts,
            upstream,
        )
        .await;
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(now);
        let may_retry = |shared: &Shared| {
            tried.len() < max_attempts && tried.len() < active.slots.len() && {
                let ok = worker.budget().try_withdraw(Instant::now(), &active.retry);
                if ok {
                    shared.metrics.retries.inc();
                }
                ok
            }
        };
        let eject_ok = || may_eject(active, now);
        match result {
            Ok(resp) => {
                let status = resp.status();
                let failed = status.is_server_error();
                endpoint.record(elapsed, failed, now);
                // A good head is judged with its body, when that ends (see `Pending`).
                let pending = if failed {
                    endpoint.record_outcome(true, done, &active.outlier, eject_ok);
                    None
                } else {
                    Some(Pending {
                        active: Arc::clone(active),
                        at: done,
                        judged: false,
                    })
                };
                if (status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE)
                    && replay.is_some()
                    && may_retry(shared)
                {
                    drop((resp, in_flight));
                    tokio::time::sleep(retry::backoff(
                        tried.len() as u32,
                        &active.retry,
                        fastrand::f64(),
                    ))
                    .await;
                    continue;
                }
                // Hop-by-hop fields were left out when the head was read.
                let (mut parts, body) = resp.into_parts();
                parts.headers.insert(X_REQUEST_ID.clone(), id);
                if let Some(q) = &quota {
                    q.headers(&mut parts.headers);
                }
                if sampled {
                    parts.extensions.insert(Outcome {
                        backend: Some(endpoint.address.clone()),
                        decision: "proxied",
                        key_id: quota.as_ref().and_then(|q| q.key_id.clone()),
                        tier: quota.as_ref().map(|q| q.policy.clone()),
                    });
                }
                return Response::from_parts(
                    parts,
                    ProxyBody::Upstream(UpstreamResponse {
                        body,
                        in_flight,
                        pending,
                        verdict: None,
                        tee: None,
                    }),
                );
            }
            // The client's body failed: its fault, so no statistic of the backend is touched
            // and nothing is retried.
            Err((upstream::UpstreamError::RequestBody(e), _)) => {
                drop(in_flight);
                tracing::debug!(backend = %endpoint.address, request_id = ?id, cause = %e, "request body failed");
                return client_body_refusal(shared, &e, &id);
            }
            Err((e, returned)) => {
                endpoint.record(elapsed, true, now);
                endpoint.record_outcome(true, done, &active.outlier, eject_ok);
                drop(in_flight);
                if let upstream::UpstreamError::Timeout(_) = e {
                    let msg = format!("backend {} did not answer in time", endpoint.address);
                    return refuse(
                        shared,
                        "gateway_timeout",
                        StatusCode::GATEWAY_TIMEOUT,
                        &msg,
                        &id,
                    );
                }
                let cause = error_chain(&e);
                tracing::warn!(backend = %endpoint.address, request_id = ?id, cause = %cause, "backend request failed");
                let failure = if e.not_sent() {
                    // Nothing reached a backend: the service is unavailable, not broken.
                    let msg = format!("cannot connect to backend {}", endpoint.address);
                    let mut r = refuse(
                        shared,
                        "backend_unreachable",
                        StatusCode::SERVICE_UNAVAILABLE,
                        &msg,
                        &id,
                    );
                    retry_after(&mut r, 1);
                    r
                } else {
                    let msg = format!("no valid response from backend {}", endpoint.address);
                    refuse(shared, "bad_gateway", StatusCode::BAD_GATEWAY, &msg, &id)
                };
                // Never reached the backend: safe to move, whatever the method.
                let retryable = returned.is_some() || replay.is_some();
                if retryable && may_retry(shared) {
                    pending = returned;
                    last_failure = Some(failure);
                    tokio::time::sleep(retry::backoff(
                        tried.len() as u32,
                        &active.retry,
                        fastrand::f64(),
                    ))
                    .await;
                    continue;
                }
                return failure;
            }
        }
    }
    refuse(
        shared,
        "bad_gateway",
        StatusCode::BAD_GATEWAY,
        "the request could not be sent again",
        &id,
    )
}

/// The answer to a request whose body the client failed to deliver: 413 past the size limit,
/// 408 past the body timeout, 400 for framing that cannot be read or a client that went away
/// (which will not read it anyway).
fn client_body_refusal(
    shared: &Shared,
    e: &ClientBodyError,
    id: &HeaderValue,
) -> Response<ProxyBody> {
    let (reason, status) = match e {
        ClientBodyError::TooLarge { .. } => ("body_too_large", StatusCode::PAYLOAD_TOO_LARGE),
        ClientBodyError::TimedOut(_) => ("body_timeout", StatusCode::REQUEST_TIMEOUT),
        ClientBodyError::Invalid(_) => ("body_invalid", StatusCode::BAD_REQUEST),
        ClientBodyError::Aborted => ("body_aborted", StatusCode::BAD_REQUEST),
    };
    // The server closes an HTTP/1 connection whose request body was not read to its end.
    refuse(shared, reason, status, &e.to_string(), id)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn a_connection_closes_after_a_request_as_http_1_says() {
        let req = |version, connection: Option<&'static str>| {
            let mut b = Request::builder().version(version);
            if let Some(c) = connection {
                b = b.header(header::CONNECTION, c);
            }
            b.body(()).unwrap()
        };
        assert!(!closes_after(&req(Version::HTTP_11, None)));
        assert!(closes_after(&req(Version::HTTP_11, Some("Close"))));
        assert!(closes_after(&req(Version::HTTP_11, Some("x-a, close"))));
        assert!(!closes_after(&req(Version::HTTP_11, Some("keep-alive"))));
        assert!(closes_after(&req(Version::HTTP_10, None)));
        assert!(!closes_after(&req(Version::HTTP_10, Some("Keep-Alive"))));
        assert!(!closes_after(&req(Version::HTTP_2, Some("close"))));
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&"x".repeat(500)).unwrap(),
        );
        assert_eq!(request_id(&h).len(), 32);
        assert_ne!(new_request_id(), new_request_id());
    }
}
