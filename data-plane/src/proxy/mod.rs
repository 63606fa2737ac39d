//! The request path. [`handle`] wraps one request in its span, its log entry and its metrics;
//! [`proxy`] takes it through the steps of the design (`DESIGN.md`, "The request path"), one
//! line each:
//!
//! 1. accept within limits: the server bounds connections, head size and read time; the body's
//!    declared size is checked here and its streamed size and time on the way ([`body`]);
//! 2. identify the client: API key, address ([`limit::identify`]);
//! 3. blocked key → 403 (there too); banned → 429 with `Retry-After` ([`limit::admit`]);
//! 4. rate limits → 429 with `Retry-After` and `RateLimit-*` fields (there too);
//! 5. cache: a fresh entry answers ([`cache::lookup`]); a stale one with validators makes the
//!    request conditional;
//! 6. admission: per-backend in-flight limits, the priority queue when all are full;
//! 7. pick a backend with the strategy, skipping unusable ones;
//! 8. forward (hop-by-hop fields out, forwarding fields in, [`request::outgoing`]) with
//!    timeouts and retries of idempotent requests elsewhere within the budget;
//! 9. record: passive health, breaker, latency, stats (steps 6 to 9 are [`forward::Attempt`]),
//!    the invalidation after an unsafe request ([`cache::Miss::invalidate`]) and the cache
//!    fill or refresh ([`cache::Miss::finish`]);
//! 10. stream the response back, holding the backend's in-flight count until its body ends
//!     ([`body`]).
//!
//! Every answer the data plane gives itself is a [`refusal::Refusal`]; [`span`] is the request's
//! trace span, [`worker`] what a worker thread and a client connection share.

pub mod body;
pub mod cache;
pub mod client;
pub mod forward;
pub mod grpc;
pub mod head;
pub mod limit;
pub mod refusal;
pub mod request;
pub mod request_id;
pub mod span;
pub mod tunnel;
pub mod worker;

use std::convert::Infallible;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response};
use http_body::Body as _;
use lb_proto::v1::RequestLogEntry;
use opentelemetry::context::FutureExt as _;
use tokio::time::Instant;

pub use body::ProxyBody;
pub use client::ClientConn;
pub use worker::Worker;

use crate::policy::retry;
use crate::ratelimit::quota::Quota;
use crate::telemetry::otel::{self, Span as _};
use crate::telemetry::report::Outcome;
use crate::upstream::request_body::{ClientBody, Inbound, RequestBody};
use cache::Looked;
use forward::{Again, Attempt, Route};
use refusal::Refusal;
use request_id::X_REQUEST_ID;

/// How many passes of the event loop a response waits before its server writes it (see
/// [`handle`]).
const RESPONSE_PASSES: usize = 3;

/// Handles one client request; never fails (every error is an HTTP response).
pub async fn handle(
    worker: Arc<Worker>,
    conn: Arc<ClientConn>,
    mut req: Request<Inbound>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let shared = &worker.shared;
    let mut span = shared
        .tracer
        .as_ref()
        .filter(|t| t.wanted(req.headers()))
        .map(|t| span::start_span(t, &mut req, &conn));
    // Logged requests and refusals are logged with their method and path (a shared handle on
    // the request's bytes, copied only for an entry).
    let sampled = shared.reporter.sample();
    let head = (req.method().clone(), req.uri().clone());
    let detailed = sampled || span.as_ref().is_some_and(|s| s.is_recording());
    let last = request::closes_after(&req);
    let http2 = req.version() == http::Version::HTTP_2;
    let call = grpc::is_grpc(req.headers());
    let id = request_id::request_id(req.headers());
    let proxied = proxy(&worker, &conn, req, &id, detailed, call);
    let mut resp = match span.as_ref().filter(|s| s.is_recording()) {
        // Log lines written while the request is handled name its trace and span.
        Some(s) => proxied.with_context(otel::context_of(s)).await,
        None => proxied.await,
    };
    if call {
        resp = grpc::answer(resp);
    }
    if http2 {
        resp = resp.map(|b| b.relayed(shared.settings.send_timeout, Arc::clone(&conn)));
    }
    // A response waits RESPONSE_PASSES passes of the event loop over its ready tasks before
    // its server writes it to the client. The requests read in the same turn go to their backends
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
    let refused = outcome.is_refusal();
    if sampled || refused {
        let entry = RequestLogEntry {
            timestamp_ms: crate::clock::unix_ms(),
            request_id: id.to_str().unwrap_or_default().to_owned(),
            method: head.0.to_string(),
            path: head.1.path().chars().take(1024).collect(),
            status: u32::from(resp.status().as_u16()),
            backend: outcome.backend.unwrap_or_default(),
            latency_us: started.elapsed().as_micros() as u64,
            client: conn.peer.ip().to_string(),
            key_id: outcome.key_id.unwrap_or_default(),
            tier: outcome.tier.unwrap_or_default(),
            decision: outcome.decision.to_owned(),
            node_id: shared.settings.node_id.clone(),
            count: 1,
        };
        if refused {
            shared.reporter.refused(entry, sampled);
        } else {
            shared.reporter.log(entry);
        }
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
    req: Request<Inbound>,
    id: &HeaderValue,
    detailed: bool,
    call: bool,
) -> Response<ProxyBody> {
    let shared = &*worker.shared;
    let refuse = |r: Refusal| r.render(&shared.metrics, id);
    let (mut parts, body) = req.into_parts();
    // 1. Within limits, framed without ambiguity; and whether it asks to switch protocols. The
    // configuration is loaded once: the request runs under one snapshot.
    let upgrade = match accept(shared, &parts) {
        Ok(u) => u,
        Err(r) => return refuse(r),
    };
    let Some(active) = worker.active() else {
        return refuse(Refusal::NotConfigured);
    };
    // 2. Who is asking (and 3., a blocked key).
    let client = match limit::identify(conn.peer.ip(), &parts, &active) {
        Ok(c) => c,
        Err(r) => {
            // A blocked key's refusals count in its usage, as its limit's do.
            if let Refusal::Blocked { key_id, tier } = &r {
                worker.shared.reporter.key(key_id, tier, true);
            }
            return refuse(r);
        }
    };
    // 3., 4. Banned, or over the limit.
    let admitted = match limit::admit(worker, client, &active).await {
        Ok(a) => a,
        Err(r) => return refuse(r),
    };
    let quota = admitted.quota;
    // A switch of protocols takes a place among the tunnels, and never an answer from the cache.
    let tunnel = match upgrade.map(|u| tunnel::Place::take(&worker.shared).map(|p| (u, p))) {
        Some(Err(r)) => return refuse(r),
        t => t.transpose().ok().flatten(),
    };
    let client_side = tunnel
        .as_ref()
        .and_then(|_| tunnel::ClientSide::take(&mut parts.extensions));
    // 5. The cache.
    let looked = match tunnel {
        Some(_) => Looked::Miss(cache::Miss::default()),
        None => cache::lookup(worker, &mut parts, id, quota.as_ref()).await,
    };
    let miss = match looked {
        Looked::Hit(resp) => return resp,
        Looked::Miss(m) => m,
    };
    // 6.-9. Admission, pick, forward, record.
    let route = Route {
        affinity: request::affinity(&parts.headers, conn, &active),
        priority: request::priority(&parts.headers, conn, &active, admitted.priority),
        deadline: call.then(|| grpc::timeout(&parts.headers)).flatten(),
    };
    let (body, again) = request_body(shared, &parts, body, &active, call).await;
    let switch = tunnel.as_ref().map(|(u, _)| u);
    let (outgoing, has_host) = request::outgoing(parts, conn, &active, id, body, switch);
    // Boxed: the exchange with the backends is most of this future's size, and the request's
    // future is moved whole on its way into its task (an HTTP/2 stream's spawn, HTTP/1's
    // dispatcher): a few kilobytes copied per move, against one allocation.
    let sent = Box::pin(Attempt::new(worker, &active, id, route, outgoing, has_host, again).send())
        .await;
    let sent = match tunnel {
        Some((u, place)) => sent.and_then(|resp| {
            tunnel::answer(worker, resp, &u, client_side, place, active.tunnel_idle)
        }),
        None => sent,
    };
    let resp = match sent {
        Ok(resp) => answered(resp, id, quota.as_ref(), detailed),
        Err(r) => refuse(r),
    };
    // 9. The cache: invalidation after an unsafe request (before the response goes, so that
    // no later request is served what it replaced), the fill (or a stale entry in place of an
    // error); 10. the response streams back.
    if miss.may_invalidate() {
        // Boxed, and only here: most requests have nothing to invalidate.
        Box::pin(miss.invalidate(worker, &resp)).await;
    }
    miss.finish(worker, resp, id)
}

/// The request's body on its way (bounded in size and time), and whether the request may go to
/// another backend after it reached one: a request without a body, if idempotent; a gRPC call
/// (`call`) with the record of its body (up to a limit), should its backend fail before
/// answering. Any request can be moved elsewhere when it never left.
async fn request_body(
    shared: &crate::shared::Shared,
    parts: &http::request::Parts,
    body: Inbound,
    active: &crate::config::active::Active,
    call: bool,
) -> (RequestBody, Again) {
    let replayable = body.is_end_stream() && retry::is_idempotent(&parts.method);
    let limit = shared.settings.max_body_bytes;
    let mut body = ClientBody::new(body, limit, active.client_body_timeout);
    let again = if replayable {
        Again::Replay
    } else if call {
        Again::Resend(grpc::record(&mut body).await)
    } else {
        Again::Never
    };
    (RequestBody::Client(body), again)
}

/// Step 1's checks: a head the proxy takes as it is, a declared body within the limit. Also
/// the switch of protocols the request asks for, if any.
fn accept(
    shared: &crate::shared::Shared,
    parts: &http::request::Parts,
) -> Result<Option<tunnel::Upgrade>, Refusal> {
    request::check_head(parts)?;
    let limit = shared.settings.max_body_bytes;
    if head::declared_length(&parts.headers).is_some_and(|n| n > limit) {
        return Err(Refusal::BodyTooLarge { limit });
    }
    tunnel::requested(parts)
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
