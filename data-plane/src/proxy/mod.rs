//! The request path. [`handle`] wraps one request in its span, its log entry and its metrics;
//! [`proxy`] takes it through the steps of the design, one line each:
//!
//! 1. refuse what breaks a limit of the request itself (body size; head size and read time are
//!    the server's);
//! 2. load the configuration once, so the whole request runs under one snapshot;
//! 3. identify the client and apply its limits: blocked, banned, over its quota
//!    ([`limit`]);
//! 4. answer from the cache when a fresh entry holds the answer ([`cache`]);
//! 5. rewrite the request for a backend: hop-by-hop fields out, forwarding fields in
//!    ([`request`]);
//! 6. queue while every backend is full, pick one, forward, retry elsewhere within the budget,
//!    and record the outcome against the backend ([`forward`]);
//! 7. fill the cache from the response, or fall back on a stale entry when every backend failed
//!    ([`cache`]);
//! 8. stream the response back, holding the backend's in-flight count until its body ends
//!    ([`body`]).
//!
//! Every answer the data plane gives itself is a [`refusal::Refusal`]; [`span`] is the request's
//! trace span, [`worker`] what a worker thread and a client connection share.

pub mod body;
pub mod cache;
pub mod forward;
pub mod limit;
pub mod refusal;
pub mod request;
pub mod span;
pub mod worker;

use std::convert::Infallible;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use lb_proto::v1::RequestLogEntry;
use tokio::time::Instant;

pub use body::ProxyBody;
pub use worker::{ClientConn, Worker};

use crate::policy::retry;
use crate::ratelimit::quota::Quota;
use crate::telemetry::otel::Span as _;
use crate::telemetry::report::Outcome;
use crate::upstream::request_body::{ClientBody, RequestBody};
use cache::Looked;
use forward::{Attempt, Route};
use refusal::Refusal;
use request::X_REQUEST_ID;

/// How many passes of the event loop a response waits before hyper writes it (see [`handle`]).
const RESPONSE_PASSES: usize = 3;

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
        .map(|t| span::start_span(t, &mut req, &conn));
    // Only sampled requests pay for copying their method and path.
    let head = shared.reporter.sample().then(|| {
        (
            req.method().to_string(),
            req.uri().path().chars().take(1024).collect::<String>(),
        )
    });
    let detailed = head.is_some() || span.as_ref().is_some_and(|s| s.is_recording());
    let last = request::closes_after(&req);
    let id = request::request_id(req.headers());
    let mut resp = proxy(&worker, &conn, req, &id, detailed).await;
    // A response waits RESPONSE_PASSES passes of the event loop over its ready tasks before
    // hyper writes it to the client. The requests read in the same turn go to their backends
    // first ([`crate::upstream::send`] waits one pass), and the responses gathered over a pass
    // go out together, so a client takes more of them per wake-up: wrk, in front of this data
    // plane, calls `epoll_wait` about 30% less often per response and spends about 8% less CPU
    // (docs/performance.md). A pass takes microseconds when the loop is idle. The last response
    // of a connection goes out at once: there is no next request to gather it with.
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
        span::end_span(span, &worker, &resp, &outcome);
    }
    if let Some((method, path)) = head {
        shared.reporter.log(RequestLogEntry {
            timestamp_ms: crate::clock::unix_ms(),
            request_id: id.to_str().unwrap_or_default().to_owned(),
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

/// The request path of one request, step by step (see the module's documentation).
async fn proxy(
    worker: &Worker,
    conn: &ClientConn,
    req: Request<Incoming>,
    id: &HeaderValue,
    detailed: bool,
) -> Response<ProxyBody> {
    let shared = &*worker.shared;
    let refuse = |r: Refusal| r.render(&shared.metrics, id);
    let (parts, body) = req.into_parts();
    let limit = shared.settings.max_body_bytes;
    if request::declared_length(&parts.headers).is_some_and(|n| n > limit) {
        return refuse(Refusal::BodyTooLarge { limit });
    }
    let Some(active) = worker.active() else {
        return refuse(Refusal::NotConfigured);
    };
    let admitted = match limit::admit(worker, conn.peer.ip(), &parts, &active).await {
        Ok(a) => a,
        Err(r) => return refuse(r),
    };
    let quota = admitted.quota;
    let miss = match cache::lookup(worker, &parts, id, quota.as_ref()).await {
        Looked::Hit(resp) => return resp,
        Looked::Miss(m) => m,
    };
    let route = Route {
        affinity: request::affinity(&parts.headers, conn, &active),
        priority: request::priority(&parts.headers, conn, &active, admitted.priority),
    };
    // A request without a body can be sent again after it reached a backend, if idempotent;
    // any request can be moved elsewhere when it never left (connect failure).
    let replayable = body.is_end_stream() && retry::is_idempotent(&parts.method);
    let body = RequestBody::Client(ClientBody::new(body, limit, active.client_body_timeout));
    let (outgoing, has_host) = request::outgoing(parts, conn, id, body);
    let sent = Attempt::new(worker, &active, id, route, outgoing, has_host, replayable)
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => answered(resp, id, quota.as_ref(), detailed),
        Err(r) => refuse(r),
    };
    miss.finish(worker, resp, id)
}

/// A backend's response as the client gets it: the request id and quota fields added, and,
/// when the request is logged or traced, what became of it.
fn answered(
    resp: Response<ProxyBody>,
    id: &HeaderValue,
    quota: Option<&Quota>,
    detailed: bool,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
    if let Some(q) = quota {
        q.headers(&mut parts.headers);
    }
    if detailed && let ProxyBody::Upstream(u) = &body {
        parts.extensions.insert(Outcome {
            backend: Some(u.endpoint().address.clone()),
            decision: "proxied",
            key_id: quota.and_then(|q| q.key_id.clone()),
            tier: quota.map(|q| q.policy.clone()),
        });
    }
    Response::from_parts(parts, body)
}
