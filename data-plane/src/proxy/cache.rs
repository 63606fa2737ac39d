//! Step 5 of the request path and the cache's part of step 9: a fresh entry answers the request
//! (after its limits: a cached answer still counts against them); otherwise the request goes on
//! as a miss (conditional, when it revalidates a stale entry), and its response may fill the
//! entry (as it streams to the client), refresh it (a 304: the stored response answers), or,
//! when every backend fails, a stale entry within its `stale-if-error` window answers instead.
//! An unsafe request's non-error response invalidates what it changed before it goes on.
//! Every response that passed the cache carries `X-Cache` and `Cache-Status`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Limited;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::request;
use super::request_id::X_REQUEST_ID;
use super::worker::Worker;
use crate::cache::entry::PER_EXCHANGE;
use crate::cache::policy::CDN_CACHE_CONTROL;
use crate::cache::status::{Forward, Fwd};
use crate::cache::invalidate::is_safe;
use crate::cache::{Bypass, CACHE_STATUS, Entry, Fill, Lookup, NotStored, Tee, X_CACHE};
use crate::clock::{millis, unix_ms};
use crate::config::active::View;
use crate::ratelimit::quota::Quota;
use crate::shared::Shared;
use crate::upstream;
use crate::upstream::request_body::RequestBody;

/// What the cache made of a request it did not answer.
#[derive(Default)]
pub struct Miss {
    /// `X-Cache` of the response: `MISS` or `BYPASS` (none with the cache off).
    label: Option<&'static str>,
    /// `Cache-Status` of the response (none with the cache off).
    status: Option<Forward>,
    /// This request fills the entry; concurrent misses wait for it.
    fill: Option<Fill>,
    /// A stale entry to answer with if every backend fails: the entry, the request's fields,
    /// and whether it was a HEAD.
    stale: Option<(Arc<Entry>, HeaderMap, bool)>,
    /// An unsafe request: its method, target and fields, for the invalidation its response
    /// may cause.
    unsafe_request: Option<Box<(http::Method, Uri, HeaderMap)>>,
}

/// The cache's answer to a request, if it has one.
pub enum Looked {
    Hit(Response<ProxyBody>),
    Miss(Miss),
}

/// Looks the request up: a hit is answered with the request id and quota fields added (and, in
/// its stale-while-revalidate window, refreshed in the background). A miss that revalidates a
/// stored response gets that response's validators added to its request.
pub async fn lookup(
    worker: &Worker,
    parts: &mut http::request::Parts,
    id: &HeaderValue,
    quota: Option<&Quota>,
) -> Looked {
    let cache = &worker.shared.cache;
    if !cache.enabled() {
        return Looked::Miss(Miss::default());
    }
    let creq = match cache.request(&parts.method, &parts.uri, &parts.headers) {
        Ok(creq) => creq,
        Err(bypass) => {
            let fwd = match bypass {
                Bypass::NoStore => Fwd::Request,
                Bypass::Method => Fwd::Method,
                _ => Fwd::Bypass,
            };
            let unsafe_request = (bypass == Bypass::Method && !is_safe(&parts.method)).then(|| {
                Box::new((
                    parts.method.clone(),
                    parts.uri.clone(),
                    parts.headers.clone(),
                ))
            });
            return Looked::Miss(Miss {
                label: Some("BYPASS"),
                status: Some(Forward {
                    detail: (fwd == Fwd::Bypass).then(|| bypass.as_str()),
                    ..Forward::new(fwd)
                }),
                unsafe_request,
                ..Miss::default()
            });
        }
    };
    let now_ms = unix_ms();
    // Boxed: a lookup that may go to Redis is a large future, which inline would enlarge every
    // request's, cacheable or not.
    let looked = Box::pin(cache.lookup(worker.redis.as_ref(), &creq, &parts.headers, now_ms)).await;
    let (fill, stale, status) = match looked {
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
            return Looked::Hit(cached(hit.response(&parts.headers, now_ms), id, quota));
        }
        Lookup::Lead(f) => {
            let stale = f
                .stale()
                .map(|e| (Arc::clone(e), parts.headers.clone(), creq.head));
            let fwd = if f.validating().is_some() {
                f.conditional_headers(&mut parts.headers);
                Fwd::Stale
            } else if f.vary_miss() {
                Fwd::VaryMiss
            } else {
                Fwd::UriMiss
            };
            (Some(f), stale, Forward::new(fwd))
        }
        Lookup::Pass(p) => (
            None,
            p.stale.map(|e| (e, parts.headers.clone(), creq.head)),
            Forward {
                detail: Some(p.reason.as_str()),
                ..Forward::new(Fwd::UriMiss)
            },
        ),
    };
    Looked::Miss(Miss {
        label: Some("MISS"),
        status: Some(status),
        fill,
        stale,
        unsafe_request: None,
    })
}

impl Miss {
    /// True for an unsafe request through the cache, whose response may invalidate entries.
    pub fn may_invalidate(&self) -> bool {
        self.unsafe_request.is_some()
    }
    /// After an unsafe request, invalidates what its response makes stale (RFC 9111 section
    /// 4.4), in every tier and on every data plane, before the response goes on.
    pub async fn invalidate(&self, worker: &Worker, resp: &Response<ProxyBody>) {
        let Some(r) = &self.unsafe_request else {
            return;
        };
        let (method, uri, headers) = &**r;
        let cache = &worker.shared.cache;
        let keys = cache.invalidated_by(method, uri, headers, resp.status(), resp.headers());
        if !keys.is_empty() {
            cache
                .invalidate(worker.redis.as_ref(), &keys, unix_ms())
                .await;
        }
    }

    /// The response to a miss: a stale entry in place of a server error when one may serve,
    /// else `resp`, copied into the cache as it streams when it fills the entry.
    pub fn finish(
        self,
        worker: &Worker,
        mut resp: Response<ProxyBody>,
        id: &HeaderValue,
    ) -> Response<ProxyBody> {
        // Every backend failed: a stale entry within its stale-if-error window beats an error.
        if resp.status().is_server_error()
            && let Some((entry, req_headers, head)) = self.stale
        {
            if let Some(f) = self.fill {
                tokio::spawn(f.failed());
            }
            let now_ms = unix_ms();
            let mut r = cached(entry.response(&req_headers, head, now_ms), id, None);
            let h = r.headers_mut();
            h.insert(X_CACHE, HeaderValue::from_static("STALE"));
            let f = Forward {
                fwd_status: Some(resp.status().as_u16()),
                ttl_s: Some(crate::cache::status::ttl_s(
                    entry.freshness.fresh_until_ms,
                    now_ms,
                )),
                ..Forward::new(Fwd::Stale)
            };
            h.insert(CACHE_STATUS, f.value());
            return r;
        }
        let mut status = self.status;
        if let Some(f) = self.fill {
            let code = resp.status();
            let now_ms = unix_ms();
            // The backend validated the stored response: serve it, refreshed.
            if code == StatusCode::NOT_MODIFIED
                && let Some((entry, stored)) = f.refresh(resp.headers(), now_ms)
            {
                match stored {
                    Ok(()) => {
                        let (redis, e) = (worker.redis.clone(), Arc::clone(&entry));
                        tokio::spawn(async move { f.store_entry(redis.as_ref(), e, now_ms).await });
                    }
                    Err(reason) => {
                        tokio::spawn(f.not_stored(reason));
                    }
                }
                return revalidated(resp, &entry, now_ms);
            }
            let checked = f.check(code, resp.headers(), now_ms);
            let headers = resp.headers().clone();
            match (resp.body_mut(), checked) {
                (ProxyBody::Upstream(u), Ok(_)) => {
                    let limit = worker.shared.cache.policy().max_entry_bytes;
                    u.fill_cache(Tee::new(
                        f,
                        worker.redis.clone(),
                        code,
                        headers,
                        usize::try_from(limit).unwrap_or(usize::MAX),
                    ));
                    if let Some(s) = status.as_mut() {
                        s.stored = true;
                    }
                }
                (_, Err(reason)) if !code.is_server_error() => {
                    if let Some(s) = status.as_mut() {
                        s.detail = Some(reason.as_str());
                    }
                    tokio::spawn(f.not_stored(reason));
                }
                _ => {
                    tokio::spawn(f.failed());
                }
            }
        }
        let h = resp.headers_mut();
        if let Some(label) = self.label {
            // Meant for this cache alone (RFC 9213), never for clients.
            if h.contains_key(&CDN_CACHE_CONTROL) {
                h.remove(&CDN_CACHE_CONTROL);
            }
            if let Some(own) = &worker.shared.cache.policy().targeted_field {
                h.remove(own);
            }
            h.insert(X_CACHE, HeaderValue::from_static(label));
        }
        if let Some(s) = status {
            h.insert(CACHE_STATUS, s.value());
        }
        resp
    }
}

/// The stored response a backend's 304 validated, in place of the 304: the entry's status,
/// fields and body, with the exchange's own fields (request id, quota) from the 304. The
/// 304's (empty) body is read to its end in the background, so that its outcome is recorded
/// and its connection reused.
fn revalidated(resp: Response<ProxyBody>, entry: &Entry, now_ms: u64) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    tokio::spawn(async move {
        let _ = http_body_util::BodyExt::collect(body).await;
    });
    let (fresh, stored) = entry.response(&HeaderMap::new(), false, now_ms).into_parts();
    let mut headers = fresh.headers;
    for name in PER_EXCHANGE {
        for v in parts.headers.get_all(name) {
            headers.append(name, v.clone());
        }
    }
    headers.insert(X_CACHE, HeaderValue::from_static("REVALIDATED"));
    let f = Forward {
        fwd_status: Some(304),
        stored: true,
        ttl_s: Some(crate::cache::status::ttl_s(
            entry.freshness.fresh_until_ms,
            now_ms,
        )),
        ..Forward::new(Fwd::Stale)
    };
    headers.insert(CACHE_STATUS, f.value());
    parts.status = fresh.status;
    parts.headers = headers;
    Response::from_parts(parts, ProxyBody::Local(Some(stored)))
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
        fill.failed().await;
        return;
    };
    let slot = &active.slots[i];
    let endpoint = &slot.endpoint;
    // Admitted as a request is: within the circuit breaker and the backend's in-flight limit.
    // A background refresh does not queue: a backend at its limit is left alone, and a later
    // request refreshes the entry.
    if !endpoint.try_acquire(now) {
        fill.failed().await;
        return;
    }
    let Some(_in_flight) = endpoint.try_start(slot.max_in_flight, &shared.admission) else {
        fill.failed().await;
        return;
    };
    request::strip_hop_by_hop(&mut headers);
    fill.conditional_headers(&mut headers);
    let mut req = Request::new(());
    *req.uri_mut() = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    *req.headers_mut() = headers;
    let req = upstream::Outgoing::new(&req.into_parts().0, RequestBody::empty());
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
        endpoint.authority.as_str(),
        endpoint.resolved,
        timeouts,
        req,
    )
    .await;
    // Its outcome counts for the backend as a request's does.
    let done = Instant::now();
    let elapsed = done.saturating_duration_since(now);
    let may_eject = || active.may_eject(now);
    let resp = match sent {
        Ok(resp) => {
            let failed = resp.status().is_server_error();
            endpoint.record(elapsed, failed, now);
            endpoint.record_outcome(failed, done, &active.outlier, may_eject);
            resp
        }
        Err(_) => {
            endpoint.record_failure(elapsed, now, done, &active.outlier, may_eject);
            fill.failed().await;
            return;
        }
    };
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::NOT_MODIFIED {
        let now_ms = crate::clock::unix_ms();
        match fill.refresh(&parts.headers, now_ms) {
            Some((entry, Ok(()))) => fill.store_entry(redis.as_ref(), entry, now_ms).await,
            Some((_, Err(reason))) => fill.not_stored(reason).await,
            None => fill.not_stored(NotStored::Status).await,
        }
        return;
    }
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
