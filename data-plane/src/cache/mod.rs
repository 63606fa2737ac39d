//! The response cache: an in-process tier ([`memory`]) in front of a shared one in Redis
//! ([`shared`]), RFC 9111 freshness ([`policy`]), keys that keep credentials out of Redis
//! ([`key`]), and single flight for misses within and across data planes ([`coalesce`]).
//!
//! The request path makes three calls: [`Cache::request`] (may this request use the cache,
//! and under which key), [`Cache::lookup`] (what to do), and, when told to lead, [`Fill::store`]
//! with the backend's response (or [`Fill::not_stored`] / [`Fill::failed`]):
//!
//! ```text
//! let Ok(creq) = cache.request(&method, &uri, &headers) else { return forward() }; // bypass
//! match cache.lookup(worker.redis.as_ref(), &creq, &headers, now_ms).await {
//!     Lookup::Hit(hit) => {
//!         if let Some(fill) = hit.refresh { spawn(fetch_as_get_then(fill)) } // revalidate
//!         serve(hit.response(&headers, now_ms)) // Age, X-Cache HIT/STALE, 304, HEAD
//!     }
//!     Lookup::Lead(fill) => match forward().await {                     // X-Cache: MISS
//!         Ok(r) if fill.check(r.status(), r.headers(), now).is_ok() =>
//!             tee the body (up to max_entry_bytes) to the client, then fill.store(..)
//!         Ok(r) if r.status() < 500 => { fill.not_stored(reason).await; stream r }
//!         _ => { let stale = fill.stale().cloned(); fill.failed().await;
//!                stale.map_or(the error, serve) }                        // stale-if-error
//!     },
//!     Lookup::Pass(p) => forward(); on an error or 5xx, serve p.stale if any,
//! }
//! ```
//!
//! How a lookup goes: the memory tier; then, unless memory held a fresh entry, Redis (a
//! memory copy that went stale may have been refreshed there by another data plane). A fresh
//! entry is a hit; one within stale-while-revalidate is a hit plus, for one caller at a time,
//! a [`Fill`] to refresh it in the background. Otherwise the caller joins the record's flight:
//! the first becomes leader, the others wait up to `coalesce_timeout_ms` for its entry. The
//! leader then takes the record's Redis lock; if another data plane holds it, the leader polls
//! Redis (5 ms doubling to 100 ms) for that plane's entry or for the lock to free up, until the
//! same deadline, and then fetches anyway. A leader that goes away without an answer releases
//! its followers, who try again (one of them as the new leader).
//!
//! A resource found uncacheable is remembered for [`PASS_MEMO`] so that its requests go
//! straight to the backends instead of queueing behind each other's leaders.
//!
//! Redis failures never fail a request: the call is dropped after [`shared::TIMEOUT`], the
//! cache is marked degraded, Redis is left alone for [`crate::ratelimit::REDIS_RETRY`], and
//! the memory tier serves alone until a call succeeds again.

pub mod coalesce;
pub mod entry;
pub mod key;
pub mod memory;
pub mod policy;
pub mod shared;
pub mod tee;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::redis::RedisConn;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode, Uri};
use tokio::time::Instant;

use coalesce::{Flight, Flights, Join, Outcome, Waited};
pub use entry::{Entry, X_CACHE};
pub use key::{CacheKey, Digest32};
pub use memory::MemoryStats;
use memory::MemoryTier;
pub use policy::{Bypass, Freshness, NotStored, State, Storable};
pub use shared::SharedError;
pub use tee::Tee;

/// The cache settings of a configuration snapshot, in native units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub enabled: bool,
    /// Freshness given to responses that state none.
    pub default_ttl_ms: u64,
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
        self.entry.response(req_headers, self.head, now_ms)
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
    shared_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    policy: ArcSwap<Policy>,
    memory: ArcSwap<MemoryTier>,
    flights: Arc<Flights>,
    /// Resources found uncacheable; entries leave after [`PASS_MEMO`].
    memo: moka::future::Cache<Digest32, ()>,
    degraded: AtomicBool,
    /// Redis is left alone until then (unix ms).
    retry_at: AtomicU64,
    counters: Counters,
}

/// A data plane's response cache, shared by its worker threads (cloning is cheap). Redis
/// connections are the workers' own and are passed to each call.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl Cache {
    pub fn new(policy: Policy) -> Cache {
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
                degraded: AtomicBool::new(false),
                retry_at: AtomicU64::new(0),
                counters: Counters::default(),
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
        self.inner.degraded.load(Ordering::Relaxed)
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
            shared_errors: l(&c.shared_errors),
            in_flight: self.inner.flights.len(),
            degraded: self.is_degraded(),
        }
    }

    /// Whether a request may use the cache, and its key. The host is the `Host` header's, else
    /// the URI's authority.
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
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| uri.authority().map(|a| a.as_str()))
                .unwrap_or("");
            CacheKey::new(method, host, uri, &policy.ignored_query_params)
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

    /// A clone of the worker's connection, unless Redis is being left alone after a failure.
    fn conn(&self, redis: Option<&RedisConn>, now_ms: u64) -> Option<RedisConn> {
        let c = redis?;
        (now_ms >= self.inner.retry_at.load(Ordering::Relaxed)).then(|| c.clone())
    }

    fn redis_ok(&self) {
        if self.inner.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("redis reachable again; the response cache is shared again");
        }
    }

    fn redis_failed(&self, now_ms: u64, cause: &SharedError) {
        inc(&self.inner.counters.shared_errors);
        let retry = u64::try_from(crate::ratelimit::REDIS_RETRY.as_millis()).unwrap_or(1000);
        self.inner.retry_at.store(now_ms + retry, Ordering::Relaxed);
        if !self.inner.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cause = %cause,
                "redis unreachable; the response cache runs in process until it is back"
            );
        }
    }

    async fn memo_says_pass(&self, primary: &Digest32) -> bool {
        self.inner.memo.get(primary).await.is_some()
    }

    fn hit(
        &self,
        entry: Arc<Entry>,
        tier: Tier,
        state: State,
        refresh: Option<Fill>,
        head: bool,
    ) -> Lookup {
        let c = &self.inner.counters;
        inc(match tier {
            Tier::Memory => &c.hits_memory,
            Tier::Shared => &c.hits_shared,
            Tier::Coalesced => &c.hits_coalesced,
        });
        if state != State::Fresh {
            inc(&c.hits_stale);
        }
        Lookup::Hit(Hit {
            entry,
            tier,
            state,
            refresh,
            head,
        })
    }

    fn pass(&self, reason: PassReason, stale: Option<Arc<Entry>>) -> Lookup {
        inc(&self.inner.counters.passes);
        Lookup::Pass(Pass { reason, stale })
    }

    /// Decides what to do with a request (see the module header). `now_ms` is the policy's
    /// clock; waits are bounded by the policy's `coalesce_timeout_ms` from the call.
    pub async fn lookup(
        &self,
        redis: Option<&RedisConn>,
        req: &CacheRequest,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Lookup {
        let policy = self.inner.policy.load_full();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(policy.coalesce_timeout_ms);
        let primary = *req.key.primary();
        let usable = |e: &Entry| e.public || !req.credentials;
        // A stale-if-error candidate, with the tier it came from.
        let mut stale: Option<(Arc<Entry>, Tier)> = None;
        let entry_of = |s: Option<(Arc<Entry>, Tier)>| s.map(|(e, _)| e);
        loop {
            let now_ms = now_ms + elapsed_ms(started);
            let memory = self.memory();
            let (mut id, found) = memory.find(&req.key, headers, now_ms).await;
            // Checked after memory, which may still hold a stale-if-error entry, and before
            // Redis, which an uncacheable resource would cost a round trip for nothing.
            if found.is_none() && self.memo_says_pass(&primary).await {
                return self.pass(PassReason::Uncacheable, entry_of(stale));
            }
            let mut found = found.filter(|e| usable(e)).map(|e| (e, Tier::Memory));
            let fresh_in_memory = found
                .as_ref()
                .is_some_and(|(e, _)| e.state(now_ms) == State::Fresh);
            if !fresh_in_memory && let Some(mut conn) = self.conn(redis, now_ms) {
                match shared::get(&mut conn, &req.key, headers).await {
                    Ok(f) => {
                        self.redis_ok();
                        // Redis may know a vary spec this memory does not: the flight and lock
                        // then go by the variant, as on the data planes that know it.
                        if found.is_none() {
                            id = f.variant;
                        }
                        if let Some(e) = f.entry.filter(|e| {
                            usable(e)
                                && e.state(now_ms) != State::Expired
                                && found.as_ref().is_none_or(|(m, _)| {
                                    e.freshness.fresh_until_ms > m.freshness.fresh_until_ms
                                })
                        }) {
                            let e = Arc::new(e);
                            memory
                                .insert(&primary, &f.variant, Arc::clone(&e), now_ms)
                                .await;
                            id = f.variant;
                            found = Some((e, Tier::Shared));
                        }
                    }
                    Err(e) => self.redis_failed(now_ms, &e),
                }
            }
            if let Some((e, tier)) = found {
                match e.state(now_ms) {
                    State::Fresh => return self.hit(e, tier, State::Fresh, None, req.head),
                    State::StaleRevalidate => {
                        let refresh = if req.head || req.conditional {
                            None
                        } else {
                            self.refresh(redis, req, headers, id, &e, now_ms).await
                        };
                        return self.hit(e, tier, State::StaleRevalidate, refresh, req.head);
                    }
                    State::StaleIfError => stale = Some((e, tier)),
                    State::Expired => {}
                }
            }
            if req.head {
                return self.pass(PassReason::Head, entry_of(stale));
            }
            if req.conditional {
                return self.pass(PassReason::Conditional, entry_of(stale));
            }
            match self.inner.flights.join(id) {
                Join::Lead(flight) => {
                    return self
                        .lead(
                            redis,
                            req,
                            headers,
                            id,
                            flight,
                            entry_of(stale),
                            deadline,
                            now_ms,
                        )
                        .await;
                }
                Join::Follow(rx) => match coalesce::wait(rx, deadline).await {
                    Waited::Done(Outcome::Filled { variant, entry }) => {
                        let mine = key::variant(&primary, &entry.vary, headers) == variant;
                        let state = entry.state(now_ms + elapsed_ms(started));
                        if mine
                            && usable(&entry)
                            && matches!(state, State::Fresh | State::StaleRevalidate)
                        {
                            return self.hit(entry, Tier::Coalesced, state, None, false);
                        }
                        // Another variant, or not for this request: look again, now that
                        // the vary spec is in memory.
                    }
                    Waited::Done(Outcome::NotStored) => {
                        return self.pass(PassReason::NotStored, entry_of(stale));
                    }
                    Waited::Done(Outcome::Failed) => {
                        return match stale {
                            Some((e, tier)) => self.hit(e, tier, State::StaleIfError, None, false),
                            None => self.pass(PassReason::Failed, None),
                        };
                    }
                    Waited::Done(Outcome::Abandoned | Outcome::Pending) => {}
                    Waited::TimedOut => return self.pass(PassReason::Timeout, entry_of(stale)),
                },
            }
            if Instant::now() >= deadline {
                return self.pass(PassReason::Timeout, entry_of(stale));
            }
        }
    }

    /// A background refresh for an entry within stale-while-revalidate, if nobody here or
    /// elsewhere is refreshing it already.
    async fn refresh(
        &self,
        redis: Option<&RedisConn>,
        req: &CacheRequest,
        headers: &HeaderMap,
        id: Digest32,
        entry: &Arc<Entry>,
        now_ms: u64,
    ) -> Option<Fill> {
        let flight = self.inner.flights.try_lead(id)?;
        let mut fill = Fill::new(self.clone(), req, headers, flight, Some(Arc::clone(entry)));
        if let Some(mut conn) = self.conn(redis, now_ms) {
            let token = new_token();
            let ttl = self.lock_ttl_ms();
            match shared::try_lock(&mut conn, req.key.primary(), &id, &token, ttl).await {
                Ok(true) => fill.lock = Some(Lock { conn, token }),
                Ok(false) => return None,
                Err(e) => self.redis_failed(now_ms, &e),
            }
        }
        inc(&self.inner.counters.leads);
        Some(fill)
    }

    /// A lock outlives neither the wait of the requests it holds back nor a crashed holder by
    /// more than that wait.
    fn lock_ttl_ms(&self) -> u64 {
        self.inner.policy.load().coalesce_timeout_ms.max(1)
    }

    #[allow(clippy::too_many_arguments)]
    async fn lead(
        &self,
        redis: Option<&RedisConn>,
        req: &CacheRequest,
        headers: &HeaderMap,
        id: Digest32,
        flight: Flight,
        stale: Option<Arc<Entry>>,
        deadline: Instant,
        now_ms: u64,
    ) -> Lookup {
        let started = Instant::now();
        let mut fill = Fill::new(self.clone(), req, headers, flight, stale);
        let primary = *req.key.primary();
        let Some(mut conn) = self.conn(redis, now_ms) else {
            inc(&self.inner.counters.leads);
            return Lookup::Lead(fill);
        };
        let token = new_token();
        let ttl = self.lock_ttl_ms();
        let mut delay = POLL_FIRST;
        loop {
            match shared::try_lock(&mut conn, &primary, &id, &token, ttl).await {
                Ok(true) => {
                    // Double-checked: another data plane may have stored the entry and let
                    // go of the lock between this lookup's miss and now.
                    let now_ms = now_ms + elapsed_ms(started);
                    if let Ok(shared::Found {
                        variant,
                        entry: Some(e),
                    }) = shared::get(&mut conn, &req.key, headers).await
                        && (e.public || !req.credentials)
                        && matches!(e.state(now_ms), State::Fresh | State::StaleRevalidate)
                    {
                        let e = Arc::new(e);
                        self.memory()
                            .insert(&primary, &variant, Arc::clone(&e), now_ms)
                            .await;
                        let state = e.state(now_ms);
                        if let Some(flight) = fill.flight.take() {
                            flight.resolve(Outcome::Filled {
                                variant,
                                entry: Arc::clone(&e),
                            });
                        }
                        fill.lock = Some(Lock { conn, token });
                        fill.unlock().await;
                        return self.hit(e, Tier::Shared, state, None, req.head);
                    }
                    fill.lock = Some(Lock { conn, token });
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    self.redis_failed(now_ms + elapsed_ms(started), &e);
                    break;
                }
            }
            // Another data plane is filling: wait for its entry, or for its lock to go.
            if Instant::now() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
            let now_ms = now_ms + elapsed_ms(started);
            match shared::get(&mut conn, &req.key, headers).await {
                Ok(shared::Found {
                    variant,
                    entry: Some(e),
                }) if (e.public || !req.credentials)
                    && matches!(e.state(now_ms), State::Fresh | State::StaleRevalidate) =>
                {
                    let e = Arc::new(e);
                    self.memory()
                        .insert(&primary, &variant, Arc::clone(&e), now_ms)
                        .await;
                    let state = e.state(now_ms);
                    if let Some(flight) = fill.flight.take() {
                        flight.resolve(Outcome::Filled {
                            variant,
                            entry: Arc::clone(&e),
                        });
                    }
                    return self.hit(e, Tier::Shared, state, None, req.head);
                }
                Ok(_) => {}
                Err(e) => {
                    self.redis_failed(now_ms, &e);
                    break;
                }
            }
        }
        inc(&self.inner.counters.leads);
        Lookup::Lead(fill)
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

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// 128 random bits in hex: identifies one lock holder.
fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

struct Lock {
    conn: RedisConn,
    token: String,
}

/// The right, and the duty, to fill one record: store the backend's response with
/// [`Fill::store`], or say why not ([`Fill::not_stored`], [`Fill::failed`]). Dropping it
/// unresolved releases waiting requests to try again, and its Redis lock in the background.
pub struct Fill {
    cache: Cache,
    key: CacheKey,
    /// The record's digest as looked up: the flight's and the lock's key.
    id: Digest32,
    req_headers: HeaderMap,
    credentials: bool,
    stale: Option<Arc<Entry>>,
    flight: Option<Flight>,
    lock: Option<Lock>,
}

impl Fill {
    fn new(
        cache: Cache,
        req: &CacheRequest,
        headers: &HeaderMap,
        flight: Flight,
        stale: Option<Arc<Entry>>,
    ) -> Fill {
        Fill {
            cache,
            id: *flight.key(),
            key: req.key.clone(),
            req_headers: headers.clone(),
            credentials: req.credentials,
            stale,
            flight: Some(flight),
            lock: None,
        }
    }

    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// An entry to serve if the backend fails (stale-if-error), or the one being refreshed.
    pub fn stale(&self) -> Option<&Arc<Entry>> {
        self.stale.as_ref()
    }

    /// True when this fill holds the record's Redis lock (no other data plane is filling it).
    pub fn holds_lock(&self) -> bool {
        self.lock.is_some()
    }

    /// Whether a response with this head would be stored, before its body is read: worth
    /// buffering the body for, up to `max_entry_bytes`.
    pub fn check(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Result<Storable, NotStored> {
        let policy = self.cache.policy();
        let s = policy::storable(status, headers, self.credentials, &policy, now_ms)?;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > policy.max_entry_bytes) {
            return Err(NotStored::TooLarge);
        }
        Ok(s)
    }

    /// Stores the backend's response if the policy allows, in memory at once (waiting
    /// requests get it), then in Redis. A Redis failure is logged and marks the cache
    /// degraded; it is not an error here. A 5xx counts as [`Fill::failed`]: waiting requests
    /// with a stale-if-error entry serve it, and the resource is not marked uncacheable.
    pub async fn store(
        mut self,
        redis: Option<&RedisConn>,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        now_ms: u64,
    ) -> Result<Arc<Entry>, NotStored> {
        let checked = self.check(status, headers, now_ms).and_then(|s| {
            if body.len() as u64 > self.cache.policy().max_entry_bytes {
                Err(NotStored::TooLarge)
            } else {
                Ok(s)
            }
        });
        let storable = match checked {
            Ok(s) => s,
            Err(reason) if status.is_server_error() => {
                self.fail().await;
                return Err(reason);
            }
            Err(reason) => {
                self.give_up(reason).await;
                return Err(reason);
            }
        };
        let primary = *self.key.primary();
        let entry = Arc::new(Entry::new(
            status,
            headers,
            body,
            storable,
            self.key.path(),
            now_ms,
        ));
        let variant = key::variant(&primary, &entry.vary, &self.req_headers);
        self.cache
            .memory()
            .insert(&primary, &variant, Arc::clone(&entry), now_ms)
            .await;
        if let Some(flight) = self.flight.take() {
            flight.resolve(Outcome::Filled {
                variant,
                entry: Arc::clone(&entry),
            });
        }
        inc(&self.cache.inner.counters.stored);
        if let Some(mut conn) = self.cache.conn(redis, now_ms) {
            match shared::put(&mut conn, &primary, &variant, &entry, now_ms).await {
                Ok(()) => self.cache.redis_ok(),
                Err(e) => self.cache.redis_failed(now_ms, &e),
            }
        }
        self.unlock().await;
        Ok(entry)
    }

    /// The response will not be stored (the proxy decided so, e.g. from [`Fill::check`]):
    /// waiting requests go to the backend, and the resource skips the cache for
    /// [`PASS_MEMO`] when the reason lies in the response.
    pub async fn not_stored(mut self, reason: NotStored) {
        self.give_up(reason).await;
    }

    /// The backend failed: waiting requests serve their stale-if-error entry if they hold
    /// one, and go to the backend themselves otherwise.
    pub async fn failed(mut self) {
        self.fail().await;
    }

    async fn fail(&mut self) {
        if let Some(f) = self.flight.take() {
            f.resolve(Outcome::Failed);
        }
        self.unlock().await;
    }

    async fn give_up(&mut self, reason: NotStored) {
        inc(&self.cache.inner.counters.not_stored);
        if reason.is_intrinsic() && !self.credentials {
            self.cache.inner.memo.insert(*self.key.primary(), ()).await;
        }
        if let Some(f) = self.flight.take() {
            f.resolve(Outcome::NotStored);
        }
        self.unlock().await;
    }

    async fn unlock(&mut self) {
        let Some(Lock { mut conn, token }) = self.lock.take() else {
            return;
        };
        let released = shared::unlock(&mut conn, self.key.primary(), &self.id, &token).await;
        if let Err(e) = released {
            tracing::debug!(cause = %e, "cache fill lock not released; it expires by itself");
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if let Some(Lock { mut conn, token }) = self.lock.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let primary = *self.key.primary();
            let id = self.id;
            rt.spawn(async move {
                let _ = shared::unlock(&mut conn, &primary, &id, &token).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::HeaderName;
    use tokio::task::JoinSet;

    const NOW: u64 = 1_700_000_000_000;

    fn policy() -> Policy {
        Policy {
            enabled: true,
            coalesce_timeout_ms: 60_000,
            ..Policy::default()
        }
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn req(cache: &Cache, method: Method, path: &str, headers: &HeaderMap) -> CacheRequest {
        let uri: Uri = format!("http://example.com{path}").parse().unwrap();
        cache.request(&method, &uri, headers).unwrap()
    }

    async fn lookup(cache: &Cache, r: &CacheRequest, headers: &HeaderMap, now: u64) -> Lookup {
        cache.lookup(None, r, headers, now).await
    }

    fn lead(l: Lookup) -> Fill {
        match l {
            Lookup::Lead(f) => f,
            Lookup::Hit(h) => panic!("expected to lead, got a hit from {:?}", h.tier),
            Lookup::Pass(p) => panic!("expected to lead, got a pass: {:?}", p.reason),
        }
    }

    fn hit(l: Lookup) -> Hit {
        match l {
            Lookup::Hit(h) => h,
            Lookup::Lead(_) => panic!("expected a hit, got a lead"),
            Lookup::Pass(p) => panic!("expected a hit, got a pass: {:?}", p.reason),
        }
    }

    fn pass(l: Lookup) -> Pass {
        match l {
            Lookup::Pass(p) => p,
            Lookup::Lead(_) => panic!("expected a pass, got a lead"),
            Lookup::Hit(h) => panic!("expected a pass, got a hit from {:?}", h.tier),
        }
    }

    async fn store(fill: Fill, cc: &str, body: &'static str, now: u64) -> Arc<Entry> {
        fill.store(
            None,
            StatusCode::OK,
            &h(&[("cache-control", cc)]),
            Bytes::from_static(body.as_bytes()),
            now,
        )
        .await
        .unwrap()
    }

    #[test]
    fn bypasses_are_decided_before_any_lookup() {
        let off = Cache::new(Policy::default());
        let uri: Uri = "/x".parse().unwrap();
        let none = HeaderMap::new();
        assert_eq!(
            off.request(&Method::GET, &uri, &none).unwrap_err(),
            Bypass::Disabled
        );
        let cache = Cache::new(policy());
        assert_eq!(
            cache.request(&Method::POST, &uri, &none).unwrap_err(),
            Bypass::Method
        );
        let long: Uri = format!("/{}", "a".repeat(9000)).parse().unwrap();
        assert_eq!(
            cache.request(&Method::GET, &long, &none).unwrap_err(),
            Bypass::KeyTooLong
        );
        assert_eq!(cache.stats().bypasses, 2);
        let r = req(&cache, Method::HEAD, "/x", &h(&[("cookie", "a=1")]));
        assert!(r.head && r.credentials && !r.conditional);
    }

    #[tokio::test]
    async fn two_hundred_concurrent_misses_make_exactly_one_leader() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/cold", &none);
        let id = *r.key.primary();
        let mut tasks = JoinSet::new();
        for _ in 0..200 {
            let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
            tasks.spawn(async move {
                match cache.lookup(None, &r, &none, NOW).await {
                    Lookup::Lead(fill) => {
                        // Fill only once every other request waits on this flight, so none
                        // of them can have found the entry in memory instead.
                        while cache.waiting(&id) < 199 {
                            tokio::task::yield_now().await;
                        }
                        store(fill, "max-age=60", "body", NOW).await;
                        "lead"
                    }
                    Lookup::Hit(h) => {
                        assert_eq!(h.tier, Tier::Coalesced);
                        assert_eq!(h.entry.body, "body");
                        "hit"
                    }
                    Lookup::Pass(p) => panic!("pass: {:?}", p.reason),
                }
            });
        }
        let outcomes: Vec<&str> = tasks.join_all().await;
        assert_eq!(outcomes.iter().filter(|o| **o == "lead").count(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == "hit").count(), 199);
        let s = cache.stats();
        assert_eq!(
            (s.leads, s.hits_coalesced, s.stored, s.in_flight),
            (1, 199, 1, 0)
        );
        let again = hit(lookup(&cache, &r, &none, NOW + 1000).await);
        assert_eq!(again.tier, Tier::Memory);
        let resp = again.response(&none, NOW + 3500);
        assert_eq!(resp.headers()[header::AGE], "3");
        assert_eq!(resp.headers()[X_CACHE], "HIT");
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_hands_over_to_a_follower() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/gone", &none);
        let first = lead(lookup(&cache, &r, &none, NOW).await);
        let follower = {
            let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
            tokio::spawn(async move { lead(cache.lookup(None, &r, &none, NOW).await) })
        };
        while cache.waiting(r.key.primary()) < 1 {
            tokio::task::yield_now().await;
        }
        drop(first);
        let second = follower.await.unwrap();
        store(second, "max-age=60", "b", NOW).await;
        assert_eq!(hit(lookup(&cache, &r, &none, NOW).await).entry.body, "b");
    }

    #[tokio::test]
    async fn uncacheable_responses_release_followers_and_skip_the_cache_for_a_while() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/private", &none);
        let fill = lead(lookup(&cache, &r, &none, NOW).await);
        let follower = {
            let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
            tokio::spawn(async move { pass(cache.lookup(None, &r, &none, NOW).await) })
        };
        while cache.waiting(r.key.primary()) < 1 {
            tokio::task::yield_now().await;
        }
        let refused = fill
            .store(
                None,
                StatusCode::OK,
                &h(&[("cache-control", "private")]),
                Bytes::new(),
                NOW,
            )
            .await;
        assert_eq!(refused.unwrap_err(), NotStored::Private);
        assert_eq!(follower.await.unwrap().reason, PassReason::NotStored);
        assert_eq!(
            pass(lookup(&cache, &r, &none, NOW).await).reason,
            PassReason::Uncacheable
        );
    }

    #[tokio::test]
    async fn followers_of_another_variant_lead_their_own_fill() {
        let cache = Cache::new(policy());
        let gzip = h(&[("accept-encoding", "gzip")]);
        let br = h(&[("accept-encoding", "br")]);
        let r = req(&cache, Method::GET, "/v", &gzip);
        let fill = lead(lookup(&cache, &r, &gzip, NOW).await);
        let spawn_follower = |headers: HeaderMap| {
            let (cache, r) = (cache.clone(), r.clone());
            tokio::spawn(async move { cache.lookup(None, &r, &headers, NOW).await })
        };
        let same = spawn_follower(gzip.clone());
        let other = spawn_follower(br.clone());
        while cache.waiting(r.key.primary()) < 2 {
            tokio::task::yield_now().await;
        }
        let stored = fill
            .store(
                None,
                StatusCode::OK,
                &h(&[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")]),
                Bytes::from_static(b"gzipped"),
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(stored.vary, [HeaderName::from_static("accept-encoding")]);
        assert_eq!(hit(same.await.unwrap()).entry.body, "gzipped");
        let other = lead(other.await.unwrap());
        other
            .store(
                None,
                StatusCode::OK,
                &h(&[("cache-control", "max-age=60"), ("vary", "accept-encoding")]),
                Bytes::from_static(b"brotli"),
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(hit(lookup(&cache, &r, &br, NOW).await).entry.body, "brotli");
        assert_eq!(
            hit(lookup(&cache, &r, &gzip, NOW).await).entry.body,
            "gzipped"
        );
    }

    #[tokio::test]
    async fn requests_with_credentials_are_served_only_public_entries() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let auth = h(&[("authorization", "Bearer t")]);
        let anon = req(&cache, Method::GET, "/doc", &none);
        let authed = req(&cache, Method::GET, "/doc", &auth);
        store(
            lead(lookup(&cache, &anon, &none, NOW).await),
            "max-age=60",
            "anon",
            NOW,
        )
        .await;
        let fill = lead(lookup(&cache, &authed, &auth, NOW).await);
        let refused = fill
            .store(
                None,
                StatusCode::OK,
                &h(&[("cache-control", "max-age=60")]),
                Bytes::new(),
                NOW,
            )
            .await;
        assert_eq!(refused.unwrap_err(), NotStored::Credentials);
        // Refusals because of credentials are not remembered for everyone.
        assert_eq!(
            hit(lookup(&cache, &anon, &none, NOW).await).entry.body,
            "anon"
        );
        let fill = lead(lookup(&cache, &authed, &auth, NOW).await);
        store(fill, "public, max-age=60", "public", NOW).await;
        assert_eq!(
            hit(lookup(&cache, &authed, &auth, NOW).await).entry.body,
            "public"
        );
    }

    #[tokio::test]
    async fn stale_while_revalidate_serves_and_hands_out_one_refresh() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/swr", &none);
        let fill = lead(lookup(&cache, &r, &none, NOW).await);
        store(fill, "max-age=1, stale-while-revalidate=30", "old", NOW).await;
        let later = NOW + 2_000;
        let first = hit(lookup(&cache, &r, &none, later).await);
        assert_eq!(first.state, State::StaleRevalidate);
        assert_eq!(first.response(&none, later).headers()[X_CACHE], "STALE");
        let refresh = first.refresh.expect("a refresh for the first caller");
        assert_eq!(refresh.stale().unwrap().body, "old");
        let second = hit(lookup(&cache, &r, &none, later).await);
        assert_eq!(second.entry.body, "old");
        assert!(second.refresh.is_none(), "one refresh at a time");
        store(refresh, "max-age=60", "new", later).await;
        let third = hit(lookup(&cache, &r, &none, later).await);
        assert_eq!(
            (third.state, third.entry.body.as_ref()),
            (State::Fresh, &b"new"[..])
        );
    }

    #[tokio::test]
    async fn stale_if_error_goes_to_the_backend_and_serves_stale_when_it_fails() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/sie", &none);
        let fill = lead(lookup(&cache, &r, &none, NOW).await);
        store(fill, "max-age=1, stale-if-error=60", "old", NOW).await;
        let later = NOW + 2_000;
        let fill = lead(lookup(&cache, &r, &none, later).await);
        assert_eq!(fill.stale().unwrap().body, "old");
        let follower = {
            let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
            tokio::spawn(async move { hit(cache.lookup(None, &r, &none, later).await) })
        };
        while cache.waiting(r.key.primary()) < 1 {
            tokio::task::yield_now().await;
        }
        fill.failed().await;
        let served = follower.await.unwrap();
        assert_eq!(served.state, State::StaleIfError);
        assert_eq!(served.entry.body, "old");
        // Past every window the entry is gone.
        let fill = lead(lookup(&cache, &r, &none, NOW + 120_000).await);
        assert!(fill.stale().is_none());
    }

    #[tokio::test]
    async fn a_5xx_is_a_failure_not_an_uncacheable_resource() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/flaky", &none);
        let fill = lead(lookup(&cache, &r, &none, NOW).await);
        store(fill, "max-age=1, stale-if-error=60", "old", NOW).await;
        let later = NOW + 2_000;
        let fill = lead(lookup(&cache, &r, &none, later).await);
        let follower = {
            let (cache, r, none) = (cache.clone(), r.clone(), none.clone());
            tokio::spawn(async move { hit(cache.lookup(None, &r, &none, later).await) })
        };
        while cache.waiting(r.key.primary()) < 1 {
            tokio::task::yield_now().await;
        }
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let refused = fill.store(None, status, &none, Bytes::new(), later).await;
        assert_eq!(refused.unwrap_err(), NotStored::Status);
        assert_eq!(follower.await.unwrap().state, State::StaleIfError);
        // Not remembered as uncacheable: the next request leads, with the stale entry at hand.
        let fill = lead(lookup(&cache, &r, &none, later).await);
        assert_eq!(fill.stale().unwrap().body, "old");
    }

    #[tokio::test]
    async fn head_shares_get_entries_and_never_fills() {
        let cache = Cache::new(policy());
        let none = HeaderMap::new();
        let get = req(&cache, Method::GET, "/h", &none);
        let head = req(&cache, Method::HEAD, "/h", &none);
        assert_eq!(
            pass(lookup(&cache, &head, &none, NOW).await).reason,
            PassReason::Head
        );
        store(
            lead(lookup(&cache, &get, &none, NOW).await),
            "max-age=60",
            "body",
            NOW,
        )
        .await;
        let served = hit(lookup(&cache, &head, &none, NOW).await);
        let resp = served.response(&none, NOW);
        assert!(resp.body().is_empty());
        assert_eq!(resp.status(), StatusCode::OK);
        // Conditional requests get a 304 on a hit and pass on a miss.
        let cond = h(&[("if-none-match", "*")]);
        let r = req(&cache, Method::GET, "/h", &cond);
        let resp = hit(lookup(&cache, &r, &cond, NOW).await).response(&cond, NOW);
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        let miss = req(&cache, Method::GET, "/other", &cond);
        assert_eq!(
            pass(lookup(&cache, &miss, &cond, NOW).await).reason,
            PassReason::Conditional
        );
    }

    #[tokio::test]
    async fn bodies_over_max_entry_bytes_are_not_stored() {
        let cache = Cache::new(Policy {
            max_entry_bytes: 4,
            ..policy()
        });
        let none = HeaderMap::new();
        let r = req(&cache, Method::GET, "/big", &none);
        let fill = lead(lookup(&cache, &r, &none, NOW).await);
        let declared = h(&[("content-length", "5")]);
        assert_eq!(
            fill.check(StatusCode::OK, &declared, NOW).unwrap_err(),
            NotStored::TooLarge
        );
        let refused = fill
            .store(
                None,
                StatusCode::OK,
                &none,
                Bytes::from_static(b"12345"),
                NOW,
            )
            .await;
        assert_eq!(refused.unwrap_err(), NotStored::TooLarge);
    }

    #[test]
    fn purges_come_from_directives() {
        use lb_proto::v1::CachePurge;
        use lb_proto::v1::cache_purge::Target;
        let p = |t| Purge::from_proto(&CachePurge { target: Some(t) });
        let id = "ab".repeat(32);
        assert_eq!(p(Target::Key(id)), Some(Purge::Key([0xab; 32])));
        assert_eq!(p(Target::Key("GET /x".into())), None);
        assert_eq!(
            p(Target::PathPrefix("/a".into())),
            Some(Purge::PathPrefix("/a".into()))
        );
        assert_eq!(p(Target::All(true)), Some(Purge::All));
        assert_eq!(p(Target::All(false)), None);
        assert_eq!(Purge::from_proto(&CachePurge { target: None }), None);
    }
}
