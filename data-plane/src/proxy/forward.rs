//! Steps 6 to 9 of the request path: wait in the queue while every backend is full, pick a
//! backend with the strategy (skipping unhealthy, ejected, open-circuit and already tried ones),
//! send the request, and judge the answer: record it against the backend, and try another
//! backend when the request may be sent again and the retry budget allows.
//!
//! A failure is charged to the side that caused it: a backend's bad answer, refused connection
//! or timeout counts against that backend; a client's broken, abandoned, oversized or late body
//! is answered for the client and touches no backend statistic.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Response, StatusCode};
use tokio::time::Instant;

use super::body::{Pending, ProxyBody, UpstreamResponse};
use super::refusal::Refusal;
use super::worker::Worker;
use crate::backend::{Endpoint, InFlight};
use crate::clock::millis;
use crate::config::active::{Active, Slot, View};
use crate::policy::admission::Shed;
use crate::policy::outlier;
use crate::policy::retry;
use crate::upstream::encode::Out;
use crate::upstream::request_body::Recording;
use crate::upstream::{self, Head, Outgoing, UpstreamError};

/// Most attempts a request makes, whatever the policy says.
const MAX_TRIED: usize = 8;

/// Where a request may go: what ip_hash keys on, its place in the queue when every backend is
/// full, and the deadline it carries (a gRPC call's `grpc-timeout`).
#[derive(Clone, Copy)]
pub struct Route {
    pub affinity: u64,
    pub priority: u32,
    pub deadline: Option<Duration>,
}

/// Whether a request may go to another backend after it reached one.
pub enum Again {
    /// Only when it never left (a failed connect).
    Never,
    /// Its head again: a request without a body whose method is idempotent.
    Replay,
    /// Whole, with the record of its body, when its backend failed before answering (gRPC
    /// calls).
    Resend(Recording),
}

/// One request's way to a backend: where it may go, and what is sent.
pub struct Attempt<'a> {
    worker: &'a Worker,
    /// The request's id, for the log.
    id: &'a HeaderValue,
    #[allow(clippy::redundant_allocation)]
    active: &'a Arc<Arc<Active>>,
    /// What ip_hash keys on.
    affinity: u64,
    /// Place in the queue when every backend is full.
    priority: u32,
    /// The request's own deadline, when shorter than the request timeout.
    deadline: Option<Duration>,
    max_attempts: usize,
    /// The client named no host: each attempt names its backend's.
    name_backend: bool,
    /// The request, until it is sent (or handed back unsent).
    request: Option<Outgoing>,
    /// Its head again, for a request without a body that may be sent once more after it
    /// reached a backend (idempotent ones).
    replay: Option<Head>,
    /// Its head, framing and the record of its body, for a request that may go whole to
    /// another backend when the one it went to failed before answering (gRPC calls).
    resend: Option<(Head, Out, Recording)>,
    /// Backends tried so far: a retry goes elsewhere.
    tried: Vec<usize>,
}

/// What one try came to.
// Nearly every try is answered: boxing that variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Tried {
    Answered(Response<ProxyBody>),
    Refused(Refusal),
    /// Try another backend; the failure stands if none is left.
    Again(Option<Refusal>),
}

impl<'a> Attempt<'a> {
    /// `request` to a backend of `active`; `has_host` when the client named a host; `again`
    /// whether it may go again after reaching a backend.
    #[allow(clippy::redundant_allocation)]
    pub fn new(
        worker: &'a Worker,
        active: &'a Arc<Arc<Active>>,
        id: &'a HeaderValue,
        route: Route,
        request: Outgoing,
        has_host: bool,
        again: Again,
    ) -> Attempt<'a> {
        let max_attempts = (active.retry.max_attempts.max(1) as usize).min(MAX_TRIED);
        // Its encoded head, to send again: a refcount, not a copy of its fields.
        let (replay, resend) = match again {
            _ if max_attempts < 2 => (None, None),
            Again::Never => (None, None),
            Again::Replay => (Some(request.head().clone()), None),
            Again::Resend(r) => (None, Some((request.head().clone(), request.out, r))),
        };
        Attempt {
            worker,
            id,
            active,
            affinity: route.affinity,
            priority: route.priority,
            deadline: route.deadline,
            max_attempts,
            name_backend: !has_host,
            request: Some(request),
            replay,
            resend,
            tried: Vec::new(),
        }
    }

    /// Sends the request, retrying on other backends within the budget; queues when every
    /// backend is full.
    pub async fn send(mut self) -> Result<Response<ProxyBody>, Refusal> {
        let first = Instant::now();
        self.worker.budget().deposit(first);
        let queue_timeout = Duration::from_millis(u64::from(self.active.queue.timeout_ms.max(1)));
        let queue_deadline = first + queue_timeout;
        let mut last_failure: Option<Refusal> = None;
        let (mut now, mut again) = (first, false);
        loop {
            // The first pass goes on the time just taken; every later one (after a queue wait,
            // a failure or a lost race for a slot) reads the clock again.
            if again {
                now = Instant::now();
            }
            again = true;
            let (i, in_flight) = match self.backend(now, queue_deadline).await {
                Ok(Some(picked)) => picked,
                Ok(None) => continue,
                // Nothing left to try: the last backend's failure says more than that.
                Err(r @ (Refusal::CircuitsOpen { .. } | Refusal::NoBackend(_))) => {
                    return Err(last_failure.unwrap_or(r));
                }
                Err(r) => return Err(r),
            };
            let Some(mut request) = self
                .request
                .take()
                .or_else(|| self.replay.as_ref().map(Outgoing::again))
            else {
                break;
            };
            let endpoint = &self.active.slots[i].endpoint;
            if self.name_backend
                && let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str())
            {
                request.set_host(v);
            }
            let (timeouts, per_try) = self.timeouts(endpoint);
            let result = upstream::send(
                &endpoint.idle,
                self.worker.id,
                endpoint.authority.as_str(),
                endpoint.resolved,
                timeouts,
                request,
            )
            .await;
            match self.judge(i, in_flight, now, result, per_try) {
                Tried::Answered(resp) => return Ok(resp),
                Tried::Refused(r) => return Err(r),
                Tried::Again(failure) => {
                    if failure.is_some() {
                        last_failure = failure;
                    }
                    let delay = retry::backoff(
                        self.tried.len() as u32,
                        &self.active.retry,
                        fastrand::f64(),
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
        Err(Refusal::BadGateway { backend: None })
    }

    /// A backend with room for the request, after waiting in the queue if every one is full;
    /// `None` when the pick must be made again (a slot lost to another worker, a half-open
    /// circuit out of trials, the queue just let the request on).
    async fn backend(
        &mut self,
        now: Instant,
        queue_deadline: Instant,
    ) -> Result<Option<(usize, InFlight)>, Refusal> {
        let shared = &*self.worker.shared;
        let i = match choose(
            self.active,
            self.affinity,
            millis(now),
            &self.tried,
            self.worker.id,
        ) {
            Choice::Backend(i) => i,
            Choice::Saturated => {
                let waited =
                    tokio::time::timeout_at(queue_deadline, shared.admission.wait(self.priority))
                        .await;
                shared
                    .metrics
                    .queue_wait
                    .observe(now.elapsed().as_secs_f64());
                return match waited {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(Shed::QueueFull)) => Err(Refusal::QueueFull),
                    Ok(Err(Shed::Timeout)) | Err(_) => Err(Refusal::QueueTimeout),
                };
            }
            Choice::CircuitsOpen(until_ms) => {
                let retry_after = until_ms.saturating_sub(millis(now)).div_ceil(1000);
                return Err(Refusal::CircuitsOpen { retry_after });
            }
            Choice::NoBackend(msg) => return Err(Refusal::NoBackend(msg)),
        };
        let slot = &self.active.slots[i];
        if !slot.endpoint.try_acquire(now) {
            // Half-open with every trial slot taken: as good as open for this request.
            self.tried.push(i);
            return Ok(None);
        }
        let Some(in_flight) = slot
            .endpoint
            .try_start(slot.max_in_flight, &shared.admission)
        else {
            // Another worker took the last slot between the pick and now; pick again.
            return Ok(None);
        };
        self.tried.push(i);
        Ok(Some((i, in_flight)))
    }

    /// The timeouts of a try on `endpoint`, and whether the per-try timeout cut them: a request
    /// that may be sent again waits for its head only as long as the per-try timeout, then goes
    /// elsewhere, when there is an elsewhere (attempts and backends left). The last possible try
    /// waits the whole request timeout (or the call's deadline).
    fn timeouts(&self, endpoint: &Endpoint) -> (upstream::Timeouts, bool) {
        let mut all = self.active.timeouts;
        if let Some(d) = self.deadline {
            all.request = Some(all.request.map_or(d, |r| r.min(d)));
        }
        let tried = self.tried.len();
        let last = tried >= self.max_attempts || tried >= self.active.slots.len();
        if self.replay.is_none() || last {
            return (all, false);
        }
        let latency = Duration::from_micros(endpoint.latency_us());
        let request = self.active.try_timeout.of(latency, all.request);
        let per_try = request != all.request;
        (upstream::Timeouts { request, ..all }, per_try)
    }

    /// Records what backend `i` did with the request sent at `started`, and decides: answer,
    /// refuse, or try again elsewhere (`per_try`: the timeout was the per-try one, shorter
    /// than the request's).
    fn judge(
        &mut self,
        i: usize,
        in_flight: InFlight,
        started: Instant,
        result: Result<Response<upstream::Body>, (UpstreamError, Option<Outgoing>)>,
        per_try: bool,
    ) -> Tried {
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(started);
        let active = self.active;
        let endpoint = &active.slots[i].endpoint;
        let eject_ok = || active.may_eject(started);
        let (e, returned) = match result {
            Ok(resp) => return self.judge_answer(resp, in_flight, started, done),
            // The client's body failed: its fault, so no statistic of the backend is touched
            // and nothing is retried.
            Err((UpstreamError::RequestBody(e), _)) => {
                tracing::debug!(backend = %endpoint.address, request_id = ?self.id, cause = %e, "request body failed");
                return Tried::Refused(Refusal::ClientBody(e));
            }
            // An upgrade to an HTTP/2 backend: not the backend's failure, nor a request it can
            // serve; another backend may speak HTTP/1.1.
            Err((UpstreamError::NoUpgrade, returned)) => {
                let failure = Refusal::BadGateway {
                    backend: Some(endpoint.address.clone()),
                };
                if returned.is_some() && self.may_retry() {
                    self.request = returned;
                    return Tried::Again(Some(failure));
                }
                return Tried::Refused(failure);
            }
            Err(failed) => failed,
        };
        if let UpstreamError::Timeout(_) = e {
            endpoint.record_timeout(done, &active.outlier, eject_ok);
        } else {
            endpoint.record_failure(elapsed, started, done, &active.outlier, eject_ok);
        }
        drop(in_flight);
        let backend = endpoint.address.clone();
        if let UpstreamError::Timeout(_) = e {
            tracing::warn!(backend = %endpoint.address, request_id = ?self.id, per_try, "backend did not answer in time");
            let timed_out = Refusal::GatewayTimeout { backend };
            // A try cut by its own timeout goes to another backend, as a failed connect does.
            if per_try && self.may_retry() {
                return Tried::Again(Some(timed_out));
            }
            return Tried::Refused(timed_out);
        }
        tracing::warn!(backend = %endpoint.address, request_id = ?self.id, cause = %error_chain(&e), "backend request failed");
        let failure = if e.not_sent() {
            // Nothing reached a backend: the service is unavailable, not broken.
            Refusal::BackendUnreachable { backend }
        } else {
            Refusal::BadGateway {
                backend: Some(backend),
            }
        };
        // Never reached the backend: safe to move, whatever the method. A recorded request
        // whose backend's connection failed before any answer goes whole to another.
        let returned = match (returned, &e) {
            (None, UpstreamError::Exchange(_)) => self.resend(),
            (r, _) => r,
        };
        let retryable = returned.is_some() || self.replay.is_some();
        if retryable && self.may_retry() {
            self.request = returned;
            return Tried::Again(Some(failure));
        }
        Tried::Refused(failure)
    }

    /// A response head: recorded now when it failed, with its body otherwise; a 502 or 503 of
    /// a request that may go again goes elsewhere.
    fn judge_answer(
        &mut self,
        resp: Response<upstream::Body>,
        in_flight: InFlight,
        started: Instant,
        done: Instant,
    ) -> Tried {
        let active = self.active;
        let endpoint = in_flight.endpoint();
        let status = resp.status();
        // A gRPC call answered UNAVAILABLE straight away (trailers-only): the backend says it
        // cannot serve, as a 503 does.
        let unavailable = resp.headers().get("grpc-status").is_some_and(|s| s == "14");
        let failed = status.is_server_error() || unavailable;
        endpoint.record(done.saturating_duration_since(started), failed, started);
        // A good head is judged with its body, when that ends (see `Pending`).
        let pending = if failed {
            endpoint.record_outcome(true, done, &active.outlier, || active.may_eject(started));
            None
        } else {
            Some(Pending::new(Arc::clone(active), done))
        };
        if (status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE)
            && self.replay.is_some()
            && self.may_retry()
        {
            return Tried::Again(None);
        }
        // A gRPC call the backend answered UNAVAILABLE straight away (trailers-only) goes whole
        // to another backend.
        if unavailable
            && let Some(again) = self.resend()
            && self.may_retry()
        {
            self.request = Some(again);
            return Tried::Again(None);
        }
        // Hop-by-hop fields were left out when the head was read.
        let (parts, body) = resp.into_parts();
        Tried::Answered(Response::from_parts(
            parts,
            ProxyBody::Upstream(UpstreamResponse::new(body, in_flight, pending)),
        ))
    }

    /// The recorded request again, when its body was read whole within the record's limit.
    fn resend(&self) -> Option<Outgoing> {
        let (head, out, recording) = self.resend.as_ref()?;
        Some(Outgoing::again_with(head, *out, recording.whole()?))
    }

    /// Whether one more try is allowed: attempts and backends left, and the budget's consent.
    fn may_retry(&self) -> bool {
        let tried = self.tried.len();
        if tried >= self.max_attempts || tried >= self.active.slots.len() {
            return false;
        }
        let ok = self
            .worker
            .budget()
            .try_withdraw(Instant::now(), &self.active.retry);
        if ok {
            self.worker.shared.metrics.retries.inc();
        }
        ok
    }
}

/// An error with its causes, for a log line.
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
    let live: Vec<&Slot> = active
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
    let closed: Vec<&&Slot> = live
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
    let usable = closed
        .iter()
        .filter(|s| s.endpoint.is_healthy() && !s.endpoint.is_ejected(now_ms))
        .count();
    if !outlier::panic_mode(usable, closed.len()) {
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
