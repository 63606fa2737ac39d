//! The response cache: an in-process tier ([`memory`]) in front of a shared one in Redis
//! ([`shared`]), RFC 9111 freshness and storage rules ([`policy`]), keys that keep credentials
//! out of Redis ([`key`]), single flight for misses and revalidations within and across data
//! planes ([`coalesce`]), invalidation after unsafe requests on every data plane
//! ([`invalidate`]), and `Cache-Status` ([`status`]).
//!
//! The request path makes these calls: [`Cache::request`] (may this request use the cache,
//! and under which key), [`Cache::lookup`] (what to do), and, when told to lead, [`Fill::store`]
//! with the backend's response (or [`Fill::not_stored`] / [`Fill::failed`]); after an unsafe
//! request, [`Cache::invalidated_by`] and [`Cache::invalidate`]:
//!
//! ```text
//! let Ok(creq) = cache.request(&method, &uri, &headers) else {            // bypass
//!     let r = forward().await;
//!     cache.invalidate(redis, &cache.invalidated_by(&method, &uri, .., &r), now).await;
//!     return r;
//! };
//! match cache.lookup(worker.redis.as_ref(), &creq, &headers, now_ms).await {
//!     Lookup::Hit(hit) => {
//!         if let Some(fill) = hit.refresh { spawn(fetch_as_get_then(fill)) } // revalidate
//!         serve(hit.response(&headers, now_ms)) // Age, X-Cache, Cache-Status, 304, HEAD
//!     }
//!     Lookup::Lead(fill) => {
//!         fill.conditional_headers(&mut headers);  // a stale entry with validators
//!         match forward().await {
//!             Ok(r) if r.status() == 304 => match fill.refresh(r.headers(), now) {
//!                 Some((entry, Ok(()))) => { spawn(fill.store_entry(entry)); serve(entry) }
//!                 ...
//!             },
//!             Ok(r) if fill.check(r.status(), r.headers(), now).is_ok() =>
//!                 tee the body (up to max_entry_bytes) to the client, then fill.store(..)
//!             Ok(r) if r.status() < 500 => { fill.not_stored(reason).await; stream r }
//!             _ => { let stale = fill.stale().cloned(); fill.failed().await;
//!                    stale.map_or(the error, serve) }                    // stale-if-error
//!         }
//!     }
//!     Lookup::Pass(p) => forward(); on an error or 5xx, serve p.stale if any,
//! }
//! ```
//!
//! How a lookup goes: the memory tier; then, unless memory held a fresh entry, Redis (a
//! memory copy that went stale may have been refreshed there by another data plane). A fresh
//! entry is a hit; one within stale-while-revalidate is a hit plus, for one caller at a time,
//! a [`Fill`] to refresh it in the background. Otherwise the caller joins the record's flight
//! (carrying the stale entry to revalidate, if it has validators): the first becomes leader,
//! the others wait up to `coalesce_timeout_ms` for its entry. The leader then takes the
//! record's Redis lock; if another data plane holds it, the leader polls Redis (5 ms doubling
//! to 100 ms) for that plane's entry or for the lock to free up, until the same deadline, and
//! then fetches anyway. A leader that goes away without an answer releases its followers, who
//! try again (one of them as the new leader).
//!
//! A resource found uncacheable is remembered for [`PASS_MEMO`] so that its requests go
//! straight to the backends instead of queueing behind each other's leaders.
//!
//! Redis failures never fail a request: the call is dropped after [`shared::TIMEOUT`], the
//! data plane's Redis link is marked degraded ([`crate::redis::link`]), and the memory tier
//! serves alone until a call succeeds again.

pub mod coalesce;
pub mod entry;
pub mod fill;
pub mod invalidate;
pub mod key;
mod lookup;
pub mod memory;
pub mod policy;
pub mod shared;
pub mod status;
pub mod tee;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::redis::RedisConn;
use crate::redis::link::Health;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Response, Uri};

use coalesce::Flights;
pub use entry::{Entry, X_CACHE};
pub use fill::Fill;
pub use key::{CacheKey, Digest32};
pub use memory::MemoryStats;
use memory::MemoryTier;
pub use policy::{Bypass, NotStored, State, Storable};
pub use shared::SharedError;
pub use status::CACHE_STATUS;
pub use tee::Tee;

/// The host of a request: the target's authority, which wins over `Host` (RFC 9112 section
/// 3.2.2; `:authority` on HTTP/2), else the `Host` header's.
fn host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
        .unwrap_or("")
}

/// The cache settings of a configuration snapshot, in native units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub enabled: bool,
    /// Freshness given to responses that state none and allow no heuristic; 0 = none (the
    /// RFC 9111 behaviour), anything else is a non-conforming override.
    pub default_ttl_ms: u64,
    /// Heuristic freshness: this percentage of the time since `Last-Modified`...
    pub heuristic_percent: u32,
    /// ...at most this long.
    pub heuristic_max_ms: u64,
    /// A response field targeting this cache alone (RFC 9213), before `CDN-Cache-Control`.
    pub targeted_field: Option<http::HeaderName>,
    /// Larger bodies are not stored.
    pub max_entry_bytes: u64,
    /// Bound of the memory tier.
    pub memory_bytes: u64,
    /// Query parameters left out of keys.
    pub ignored_query_params: Vec<String>,
    pub max_stale_while_revalidate_ms: u64,
    pub max_stale_if_error_ms: u64,
    /// Longest wait for another request's fill before going to the backend; 0 turns
    /// coalescing off.
    pub coalesce_timeout_ms: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::from(&lb_proto::defaults::cache())
    }
}

impl From<&lb_proto::v1::CachePolicy> for Policy {
    fn from(p: &lb_proto::v1::CachePolicy) -> Policy {
        Policy {
            enabled: p.enabled,
            default_ttl_ms: u64::from(p.default_ttl_ms),
            heuristic_percent: p.heuristic_percent,
            heuristic_max_ms: u64::from(p.heuristic_max_ms),
            targeted_field: (!p.targeted_field.is_empty())
                .then(|| http::HeaderName::from_bytes(p.targeted_field.as_bytes()).ok())
                .flatten(),
            max_entry_bytes: p.max_entry_bytes,
            memory_bytes: p.memory_bytes,
            ignored_query_params: p.ignored_query_params.clone(),
            max_stale_while_revalidate_ms: u64::from(p.max_stale_while_revalidate_ms),
            max_stale_if_error_ms: u64::from(p.max_stale_if_error_ms),
            coalesce_timeout_ms: u64::from(p.coalesce_timeout_ms),
        }
    }
}

/// How long a resource found uncacheable skips the cache: long enough that a busy
/// uncacheable URL does not serialise its requests behind one leader after another, short
/// enough that a resource that becomes cacheable is soon cached.
pub const PASS_MEMO: Duration = Duration::from_secs(5);
/// Resources remembered as uncacheable, at most.
const PASS_MEMO_ENTRIES: u64 = 10_000;
const POLL_FIRST: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(100);

/// Where a hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Shared,
    /// From the fill of a concurrent request this one waited for.
    Coalesced,
}

/// A request that may use the cache.
#[derive(Debug, Clone)]
pub struct CacheRequest {
    pub key: CacheKey,
    pub head: bool,
    /// `Authorization` or `Cookie`: only entries stored as public serve it.
    pub credentials: bool,
    pub conditional: bool,
}

/// Serve this.
pub struct Hit {
    pub entry: Arc<Entry>,
    pub tier: Tier,
    pub state: State,
    /// Within stale-while-revalidate, for one caller at a time (never a HEAD or conditional
    /// request): fetch the resource in the background, as a GET with the request's headers,
    /// and store the response through this.
    pub refresh: Option<Fill>,
    head: bool,
}

impl Hit {
    /// The response: `Age`, `X-Cache` (`HIT`, or `STALE` past freshness), a 304 when the
    /// request's validators match, no body for HEAD.
    pub fn response(&self, req_headers: &HeaderMap, now_ms: u64) -> Response<Bytes> {
        let mut r = self.entry.response(req_headers, self.head, now_ms);
        if self.tier == Tier::Coalesced {
            // Served what a concurrent request fetched: a miss that waited, for RFC 9211.
            let h = r.headers_mut();
            h.insert(X_CACHE, http::HeaderValue::from_static("HIT"));
            let f = status::Forward {
                collapsed: true,
                ..status::Forward::new(status::Fwd::UriMiss)
            };
            h.insert(CACHE_STATUS, f.value());
        }
        r
    }
}

/// Why a lookup sent the request to the backend without storing its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    /// HEAD misses are not filled: their responses have no body to store.
    Head,
    /// A conditional miss: its 304 would have no body to store.
    Conditional,
    /// Found uncacheable moments ago.
    Uncacheable,
    /// The fill this request waited for was not stored.
    NotStored,
    /// The fill this request waited for failed, and no stale entry is at hand.
    Failed,
    /// Waited `coalesce_timeout_ms` for a fill.
    Timeout,
}

impl PassReason {
    /// A token for `Cache-Status`'s `detail`.
    pub fn as_str(self) -> &'static str {
        match self {
            PassReason::Head => "head",
            PassReason::Conditional => "conditional",
            PassReason::Uncacheable => "uncacheable",
            PassReason::NotStored => "not_stored",
            PassReason::Failed => "failed",
            PassReason::Timeout => "coalesce_timeout",
        }
    }
}

/// Go to the backend; do not store.
pub struct Pass {
    pub reason: PassReason,
    /// Within stale-if-error: serve it if the backend fails (error or 5xx).
    pub stale: Option<Arc<Entry>>,
}

/// What to do with a request.
pub enum Lookup {
    Hit(Hit),
    /// Fetch from a backend and store the response through the [`Fill`].
    Lead(Fill),
    Pass(Pass),
}

/// Counters since start.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub memory: MemoryStats,
    pub hits_memory: u64,
    pub hits_shared: u64,
    pub hits_coalesced: u64,
    /// Hits served past freshness (stale-while-revalidate or stale-if-error).
    pub hits_stale: u64,
    pub leads: u64,
    pub passes: u64,
    pub bypasses: u64,
    pub stored: u64,
    pub not_stored: u64,
    /// Stale entries a backend's 304 validated.
    pub revalidated: u64,
    /// Resources invalidated after unsafe requests through this data plane.
    pub invalidated: u64,
    pub shared_errors: u64,
    /// Flights in progress.
    pub in_flight: usize,
    pub degraded: bool,
}

/// What a purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// One resource by its [`CacheKey::id`], every variant included.
    Key(Digest32),
    PathPrefix(String),
    All,
}

impl Purge {
    /// The purge a directive asks for; `None` for an empty directive or a key that is not a
    /// 64-digit hex id.
    pub fn from_proto(p: &lb_proto::v1::CachePurge) -> Option<Purge> {
        use lb_proto::v1::cache_purge::Target;
        match p.target.as_ref()? {
            Target::Key(k) => key::parse_id(k.trim()).map(Purge::Key),
            Target::PathPrefix(prefix) => Some(Purge::PathPrefix(prefix.clone())),
            Target::All(true) => Some(Purge::All),
            Target::All(false) => None,
        }
    }
}

#[derive(Default)]
struct Counters {
    hits_memory: AtomicU64,
    hits_shared: AtomicU64,
    hits_coalesced: AtomicU64,
    hits_stale: AtomicU64,
    leads: AtomicU64,
    passes: AtomicU64,
    bypasses: AtomicU64,
    stored: AtomicU64,
    not_stored: AtomicU64,
    revalidated: AtomicU64,
    invalidated: AtomicU64,
    shared_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn inc_by(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Inner {
    policy: ArcSwap<Policy>,
    memory: ArcSwap<MemoryTier>,
    flights: Arc<Flights>,
    /// Resources found uncacheable; entries leave after [`PASS_MEMO`].
    memo: moka::future::Cache<Digest32, ()>,
    /// Whether Redis answers: the data plane's link's, shared with the limiter.
    health: Arc<Health>,
    counters: Counters,
    /// Invalidations published here, waiting for the other data planes' acknowledgements.
    acks: invalidate::Acks,
}

/// A data plane's response cache, shared by its worker threads (cloning is cheap). Redis
/// connections are the workers' own and are passed to each call.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl Cache {
    /// A cache with a Redis state of its own (for a cache used alone).
    pub fn new(policy: Policy) -> Cache {
        Cache::with_health(policy, Arc::default())
    }

    /// A cache whose Redis calls share `health` with the data plane's other users of Redis.
    pub fn with_health(policy: Policy, health: Arc<Health>) -> Cache {
        let memory = MemoryTier::new(policy.memory_bytes);
        Cache {
            inner: Arc::new(Inner {
                policy: ArcSwap::from_pointee(policy),
                memory: ArcSwap::from_pointee(memory),
                flights: Arc::new(Flights::default()),
                memo: moka::future::Cache::builder()
                    .max_capacity(PASS_MEMO_ENTRIES)
                    .time_to_live(PASS_MEMO)
                    .build(),
                health,
                counters: Counters::default(),
                acks: invalidate::Acks::default(),
            }),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policy.load_full()
    }

    /// Whether the cache is on; read on every request, so without touching a shared count.
    pub fn enabled(&self) -> bool {
        self.inner.policy.load().enabled
    }

    /// Applies a new configuration. A new memory bound starts an empty memory tier (moka's
    /// bound is fixed at build); everything else applies to the next request.
    pub fn set_policy(&self, policy: Policy) {
        if policy.memory_bytes != self.inner.memory.load().capacity() {
            self.inner
                .memory
                .store(Arc::new(MemoryTier::new(policy.memory_bytes)));
        }
        self.inner.policy.store(Arc::new(policy));
    }

    /// The memory tier in use.
    pub fn memory(&self) -> Arc<MemoryTier> {
        self.inner.memory.load_full()
    }

    /// True while Redis is configured but unreachable.
    pub fn is_degraded(&self) -> bool {
        self.inner.health.is_degraded()
    }

    /// Flights in progress, and followers waiting on the one of `id` (for tests and stats).
    pub fn waiting(&self, id: &Digest32) -> usize {
        self.inner.flights.waiting(id)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            memory: self.inner.memory.load().stats(),
            hits_memory: l(&c.hits_memory),
            hits_shared: l(&c.hits_shared),
            hits_coalesced: l(&c.hits_coalesced),
            hits_stale: l(&c.hits_stale),
            leads: l(&c.leads),
            passes: l(&c.passes),
            bypasses: l(&c.bypasses),
            stored: l(&c.stored),
            not_stored: l(&c.not_stored),
            revalidated: l(&c.revalidated),
            invalidated: l(&c.invalidated),
            shared_errors: l(&c.shared_errors),
            in_flight: self.inner.flights.len(),
            degraded: self.is_degraded(),
        }
    }

    /// Whether a request may use the cache, and its key. The host is the target's authority,
    /// else the `Host` header's.
    pub fn request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<CacheRequest, Bypass> {
        let policy = self.inner.policy.load();
        let decided = if policy.enabled {
            policy::request_bypass(method, headers).map_or(Ok(()), Err)
        } else {
            Err(Bypass::Disabled)
        };
        let made = decided.and_then(|()| {
            CacheKey::new(method, host(uri, headers), uri, &policy.ignored_query_params)
        });
        match made {
            Ok(key) => Ok(CacheRequest {
                key,
                head: method == Method::HEAD,
                credentials: policy::has_credentials(headers),
                conditional: policy::is_conditional(headers),
            }),
            Err(b) => {
                inc(&self.inner.counters.bypasses);
                Err(b)
            }
        }
    }

    /// What a non-error response (`status`, `resp_headers`) to an unsafe request for `uri`
    /// invalidates (RFC 9111 section 4.4; see [`invalidate`]): nothing with the cache off or
    /// for a safe method.
    pub fn invalidated_by(
        &self,
        method: &Method,
        uri: &Uri,
        req_headers: &HeaderMap,
        status: http::StatusCode,
        resp_headers: &HeaderMap,
    ) -> Vec<CacheKey> {
        let policy = self.inner.policy.load();
        if !policy.enabled || invalidate::is_safe(method) {
            return Vec::new();
        }
        let host = host(uri, req_headers);
        let ignored = &policy.ignored_query_params;
        match CacheKey::new(&Method::GET, host, uri, ignored) {
            Ok(target) => invalidate::targets(status, resp_headers, &target, host, ignored),
            Err(_) => Vec::new(),
        }
    }

    /// A clone of the worker's connection, unless Redis is being left alone after a failure.
    fn conn(&self, redis: Option<&RedisConn>, now_ms: u64) -> Option<RedisConn> {
        let c = redis?;
        self.inner.health.usable(now_ms).then(|| c.clone())
    }

    fn redis_ok(&self) {
        self.inner.health.succeeded();
    }

    fn redis_failed(&self, now_ms: u64, cause: &SharedError) {
        inc(&self.inner.counters.shared_errors);
        self.inner.health.failed(now_ms, cause);
    }

    /// Purges Redis, with a connection (whatever the degraded state: purges are rare and worth
    /// the attempt), then this data plane's memory tier, whether Redis answered or not.
    /// Returns the records removed from Redis.
    pub async fn purge(
        &self,
        redis: Option<&RedisConn>,
        purge: &Purge,
    ) -> Result<u64, SharedError> {
        // Redis first: a lookup between the two would otherwise copy what Redis still holds
        // back into the memory tier just purged, and serve it on.
        let in_redis = match redis {
            None => Ok(0),
            Some(conn) => {
                let mut conn = conn.clone();
                match purge {
                    Purge::Key(id) => shared::purge_key(&mut conn, id).await,
                    Purge::PathPrefix(p) => shared::purge_prefix(&mut conn, p).await,
                    Purge::All => shared::purge_all(&mut conn).await,
                }
            }
        };
        let memory = self.memory();
        match purge {
            Purge::Key(id) => memory.purge_key(id),
            Purge::PathPrefix(p) => memory.purge_prefix(p),
            Purge::All => {
                memory.purge_all();
                self.inner.memo.invalidate_all();
            }
        }
        in_redis
    }
}
