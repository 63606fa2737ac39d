//! Filling a record: the leader of a miss stores the backend's response (in memory at once,
//! so waiting requests get it, then in Redis), or says why it will not, and releases the
//! record's flight and Redis lock either way.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap};
use tokio::time::Instant;

use super::coalesce::{Flight, Outcome};
use super::key::{self, CacheKey, Digest32};
use super::{Cache, CacheRequest, Entry, NotStored, Storable, inc, policy, shared};
use crate::redis::RedisConn;

pub(crate) fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// 128 random bits in hex: identifies one lock holder.
pub(crate) fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

pub(crate) struct Lock {
    pub(crate) conn: RedisConn,
    pub(crate) token: String,
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
    /// When the request went to the backend, as far as the cache knows (RFC 9111 section
    /// 4.2.3 `request_time`).
    requested_ms: u64,
    stale: Option<Arc<Entry>>,
    /// A stored response this fill revalidates: the request to the backend carries its
    /// validators, and a 304 refreshes it.
    pub(crate) validating: Option<Arc<Entry>>,
    /// Other variants of the resource are stored, none for this request (RFC 9211
    /// `fwd=vary-miss`).
    pub(crate) vary_miss: bool,
    pub(crate) flight: Option<Flight>,
    pub(crate) lock: Option<Lock>,
}

impl Fill {
    pub(crate) fn new(
        cache: Cache,
        req: &CacheRequest,
        headers: &HeaderMap,
        flight: Flight,
        stale: Option<Arc<Entry>>,
        requested_ms: u64,
    ) -> Fill {
        Fill {
            requested_ms,
            cache,
            id: *flight.key(),
            key: req.key.clone(),
            req_headers: headers.clone(),
            credentials: req.credentials,
            stale,
            validating: None,
            vary_miss: false,
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

    /// Other variants of the resource are stored, but none that this request selects.
    pub fn vary_miss(&self) -> bool {
        self.vary_miss
    }

    /// The stored response being revalidated, if any: its validators go on the request to the
    /// backend ([`Fill::conditional_headers`]), and a 304 refreshes it ([`Fill::refresh`]).
    pub fn validating(&self) -> Option<&Arc<Entry>> {
        self.validating.as_ref()
    }

    /// Adds the validators of the entry being revalidated to the request for the backend:
    /// `If-None-Match` with its `ETag`, `If-Modified-Since` with its `Last-Modified` (RFC 9111
    /// section 4.3.1). Nothing when there is no such entry.
    pub fn conditional_headers(&self, req: &mut HeaderMap) {
        let Some(e) = &self.validating else { return };
        if let Some(tag) = e.headers.get(header::ETAG) {
            req.insert(header::IF_NONE_MATCH, tag.clone());
        }
        if let Some(lm) = e.headers.get(header::LAST_MODIFIED) {
            req.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }

    /// The entry being revalidated, updated with the fields of the backend's `304` (RFC 9111
    /// section 4.3.4), and whether it may be stored again (its freshness counted from now).
    /// `None` when nothing is being revalidated. The caller serves the entry either way (the
    /// 304 validated it for this request) and stores it with [`Fill::store_entry`], or says
    /// why not.
    pub fn refresh(
        &self,
        not_modified: &HeaderMap,
        now_ms: u64,
    ) -> Option<(Arc<Entry>, Result<(), NotStored>)> {
        let old = self.validating.as_ref()?;
        inc(&self.cache.inner.counters.revalidated);
        let headers = policy::updated_headers(&old.headers, not_modified);
        Some(match self.check(old.status, &headers, now_ms) {
            Ok(s) => (
                Arc::new(Entry::new(
                    old.status,
                    &headers,
                    old.body.clone(),
                    s,
                    &old.path,
                    now_ms,
                )),
                Ok(()),
            ),
            Err(reason) => {
                let mut e = Entry::clone(old);
                e.headers = headers;
                (Arc::new(e), Err(reason))
            }
        })
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
        let s = policy::storable_exchange(
            status,
            headers,
            self.credentials,
            &policy,
            self.requested_ms.min(now_ms),
            now_ms,
        )?;
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
        let entry = Arc::new(Entry::new(
            status,
            headers,
            body,
            storable,
            self.key.path(),
            now_ms,
        ));
        self.store_entry(redis, Arc::clone(&entry), now_ms).await;
        Ok(entry)
    }

    /// Stores an entry already judged storable (a refreshed one, see [`Fill::refresh`]), in
    /// memory at once, then in Redis.
    pub async fn store_entry(mut self, redis: Option<&RedisConn>, entry: Arc<Entry>, now_ms: u64) {
        let primary = *self.key.primary();
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

    pub(crate) async fn unlock(&mut self) {
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
