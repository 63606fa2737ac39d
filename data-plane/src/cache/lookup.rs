//! A lookup (see the module header of [`super`]): the memory tier, then Redis; a fresh entry is
//! a hit, one within stale-while-revalidate a hit with a background refresh for one caller;
//! otherwise the caller joins the record's flight, as its leader (who takes the record's Redis
//! lock, or waits for another data plane's entry) or as a follower waiting for the leader's.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderMap;
use tokio::time::Instant;

use super::coalesce::{self, Flight, Join, Outcome, Waited};
use super::fill::{Fill, Lock, elapsed_ms, new_token};
use super::key::{self, Digest32};
use super::{
    Cache, CacheRequest, Entry, Hit, Lookup, POLL_FIRST, POLL_MAX, Pass, PassReason, State, Tier,
    inc, shared,
};
use crate::redis::RedisConn;

/// What the two tiers hold for a request.
enum Found {
    /// The resource was found uncacheable moments ago: go to the backend.
    Uncacheable,
    /// The record's id (its variant when the vary spec is known) and its best entry, if any.
    Entry(Digest32, Option<(Arc<Entry>, Tier)>),
}

impl Cache {
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
        // A stale-if-error candidate, with the tier it came from.
        let mut stale: Option<(Arc<Entry>, Tier)> = None;
        // A stale entry to revalidate with a conditional request.
        let mut validate: Option<Arc<Entry>> = None;
        let entry_of = |s: Option<(Arc<Entry>, Tier)>| s.map(|(e, _)| e);
        loop {
            let now_ms = now_ms + elapsed_ms(started);
            let (id, found) = match self.find(redis, req, headers, now_ms).await {
                Found::Uncacheable => {
                    return self.pass(PassReason::Uncacheable, entry_of(stale));
                }
                Found::Entry(id, found) => (id, found),
            };
            // The resource has variants and the vary spec is known, but none for this request.
            let vary_miss = found.is_none() && id != *req.key.primary();
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
                    State::StaleIfError => {
                        validate = e.has_validator().then(|| Arc::clone(&e));
                        stale = Some((e, tier));
                    }
                    State::Expired => validate = e.has_validator().then_some(e),
                }
            }
            if req.head {
                return self.pass(PassReason::Head, entry_of(stale));
            }
            if req.conditional {
                return self.pass(PassReason::Conditional, entry_of(stale));
            }
            let joined = match self.inner.flights.join(id) {
                Join::Lead(flight) => {
                    let stale = entry_of(stale);
                    let lead = Lead {
                        id,
                        flight,
                        stale,
                        validate,
                        vary_miss,
                    };
                    return self.lead(redis, req, headers, lead, deadline, now_ms).await;
                }
                Join::Follow(rx) => coalesce::wait(rx, deadline).await,
            };
            if let Some(done) = self.followed(joined, req, headers, &mut stale, started, now_ms) {
                return done;
            }
            if Instant::now() >= deadline {
                return self.pass(PassReason::Timeout, entry_of(stale));
            }
        }
    }

    /// The best entry of the two tiers: memory's, unless it is not fresh and Redis holds a
    /// fresher one (another data plane may have refreshed it there).
    async fn find(
        &self,
        redis: Option<&RedisConn>,
        req: &CacheRequest,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Found {
        let primary = *req.key.primary();
        let usable = |e: &Entry| e.public || !req.credentials;
        let memory = self.memory();
        let (mut id, found) = memory.find(&req.key, headers, now_ms).await;
        // Checked after memory, which may still hold a stale-if-error entry, and before Redis,
        // which an uncacheable resource would cost a round trip for nothing.
        if found.is_none() && self.memo_says_pass(&primary).await {
            return Found::Uncacheable;
        }
        let mut found = found.filter(|e| usable(e)).map(|e| (e, Tier::Memory));
        let fresh_in_memory = found
            .as_ref()
            .is_some_and(|(e, _)| e.state(now_ms) == State::Fresh);
        let Some(mut conn) = self.conn(redis, now_ms).filter(|_| !fresh_in_memory) else {
            return Found::Entry(id, found);
        };
        match shared::get(&mut conn, &req.key, headers).await {
            Ok(f) => {
                self.redis_ok();
                // Redis may know a vary spec this memory does not: the flight and lock then go
                // by the variant, as on the data planes that know it.
                if found.is_none() {
                    id = f.variant;
                }
                if let Some(e) = f.entry.filter(|e| {
                    usable(e)
                        && (e.state(now_ms) != State::Expired || e.has_validator())
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
        Found::Entry(id, found)
    }

    /// What a follower makes of its leader's outcome: a hit, a pass, or `None` to look again
    /// (another variant was filled, or the leader went away).
    fn followed(
        &self,
        waited: Waited,
        req: &CacheRequest,
        headers: &HeaderMap,
        stale: &mut Option<(Arc<Entry>, Tier)>,
        started: Instant,
        now_ms: u64,
    ) -> Option<Lookup> {
        match waited {
            Waited::Done(Outcome::Filled { variant, entry }) => {
                let mine = key::variant(req.key.primary(), &entry.vary, headers) == variant;
                let state = entry.state(now_ms + elapsed_ms(started));
                let usable = entry.public || !req.credentials;
                // Another variant, or not for this request: look again, now that the vary spec
                // is in memory. An entry that must be revalidated before each use serves
                // those who waited for its validation, which was made for them (RFC 9111
                // section 4: one validation may answer several waiting requests).
                (mine && usable).then(|| self.hit(entry, Tier::Coalesced, state, None, false))
            }
            Waited::Done(Outcome::NotStored) => {
                Some(self.pass(PassReason::NotStored, stale.take().map(|(e, _)| e)))
            }
            Waited::Done(Outcome::Failed) => Some(match stale.take() {
                Some((e, tier)) => self.hit(e, tier, State::StaleIfError, None, false),
                None => self.pass(PassReason::Failed, None),
            }),
            Waited::Done(Outcome::Abandoned | Outcome::Pending) => None,
            Waited::TimedOut => Some(self.pass(PassReason::Timeout, stale.take().map(|(e, _)| e))),
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
        let mut fill = Fill::new(
            self.clone(),
            req,
            headers,
            flight,
            Some(Arc::clone(entry)),
            now_ms,
        );
        fill.validating = entry.has_validator().then(|| Arc::clone(entry));
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

    /// The leader of a record's flight: takes the record's Redis lock and fills it, or, while
    /// another data plane holds the lock, polls Redis (5 ms doubling to 100 ms) for that
    /// plane's entry until the lock frees up or the deadline passes, then fills it anyway.
    async fn lead(
        &self,
        redis: Option<&RedisConn>,
        req: &CacheRequest,
        headers: &HeaderMap,
        lead: Lead,
        deadline: Instant,
        now_ms: u64,
    ) -> Lookup {
        let started = Instant::now();
        let Lead {
            id,
            flight,
            stale,
            validate,
            vary_miss,
        } = lead;
        let mut fill = Fill::new(self.clone(), req, headers, flight, stale, now_ms);
        fill.validating = validate;
        fill.vary_miss = vary_miss;
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
                    // Double-checked: another data plane may have stored the entry and let go
                    // of the lock between this lookup's miss and now.
                    let now_ms = now_ms + elapsed_ms(started);
                    let stored = self.stored_elsewhere(&mut conn, req, headers, now_ms).await;
                    fill.lock = Some(Lock { conn, token });
                    if let Ok(Some(found)) = stored {
                        fill.unlock().await;
                        return self.filled_elsewhere(&mut fill, found, now_ms, req.head);
                    }
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
            match self.stored_elsewhere(&mut conn, req, headers, now_ms).await {
                Ok(Some(found)) => {
                    return self.filled_elsewhere(&mut fill, found, now_ms, req.head);
                }
                Ok(None) => {}
                Err(e) => {
                    self.redis_failed(now_ms, &e);
                    break;
                }
            }
        }
        inc(&self.inner.counters.leads);
        Lookup::Lead(fill)
    }

    /// An entry another data plane stored in Redis that serves this request, copied into the
    /// memory tier: its variant and the entry.
    async fn stored_elsewhere(
        &self,
        conn: &mut RedisConn,
        req: &CacheRequest,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Result<Option<(Digest32, Arc<Entry>)>, super::SharedError> {
        let shared::Found { variant, entry } = shared::get(conn, &req.key, headers).await?;
        let Some(e) = entry.filter(|e| {
            (e.public || !req.credentials)
                && matches!(e.state(now_ms), State::Fresh | State::StaleRevalidate)
        }) else {
            return Ok(None);
        };
        let e = Arc::new(e);
        self.memory()
            .insert(req.key.primary(), &variant, Arc::clone(&e), now_ms)
            .await;
        Ok(Some((variant, e)))
    }

    /// Answers with another data plane's entry, and hands it to this plane's followers.
    fn filled_elsewhere(
        &self,
        fill: &mut Fill,
        (variant, e): (Digest32, Arc<Entry>),
        now_ms: u64,
        head: bool,
    ) -> Lookup {
        let state = e.state(now_ms);
        if let Some(flight) = fill.flight.take() {
            flight.resolve(Outcome::Filled {
                variant,
                entry: Arc::clone(&e),
            });
        }
        self.hit(e, Tier::Shared, state, None, head)
    }
}

/// A flight to lead: the record's id, the flight, a stale-if-error entry if any, a stale
/// entry to revalidate if any, and whether other variants of the resource are stored.
struct Lead {
    id: Digest32,
    flight: Flight,
    stale: Option<Arc<Entry>>,
    validate: Option<Arc<Entry>>,
    vary_miss: bool,
}
