//! Rate limiting: per client IP, or per API key by tier, with escalating bans.
//!
//! With Redis configured, every data plane checks the same state through one script call per
//! request, so a limit holds exactly across the fleet. Without Redis, or while Redis is
//! unreachable, the same arithmetic runs in process ([`memory`]). A Redis call that fails or
//! takes longer than [`REDIS_TIMEOUT`] never fails the request: the data plane marks itself
//! degraded, answers per the snapshot's failure mode (`local`: enforce per data plane; `open`:
//! admit; `closed`: refuse), leaves Redis alone for [`REDIS_RETRY`], and goes back to shared
//! enforcement by itself when a call succeeds again.
//!
//! A `rediss://` URL is reached over TLS (rustls, through the redis crate), with the Redis
//! certificate checked against the `redis_ca` file when set, else the system's roots; a
//! `redis+cluster://` URL names a Redis Cluster ([`crate::redis`]).

pub mod gcra;
pub mod identity;
pub mod memory;
pub mod quota;
pub mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::unix_ms;

use lb_proto::v1::StoreFailureMode;

use gcra::{BanRule, Decision, Rate};
use memory::MemoryStore;

/// Longest wait for Redis on the request path; past it the request is decided locally. Well
/// above a loaded Redis's answer time (a few ms), so only a stalled or dead one trips it.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed Redis call, requests are decided locally this long before Redis is tried
/// again, so a dead Redis costs one timeout per interval, not one per request.
pub const REDIS_RETRY: Duration = Duration::from_secs(1);

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Shared,
    Local,
    /// Redis unreachable, mode `open`: admitted unchecked.
    Open,
    /// Redis unreachable, mode `closed`: refused unchecked.
    Closed,
}

pub use crate::redis::RedisTarget;
use crate::redis::{RedisConn, Timeouts};

/// A data plane's limiter: the in-process store and the state of its link to Redis.
pub struct Limiter {
    memory: MemoryStore,
    redis: Option<RedisTarget>,
    degraded: AtomicBool,
    /// Redis is left alone until then (unix ms).
    retry_at: AtomicU64,
}

impl Limiter {
    pub fn new(redis: Option<RedisTarget>) -> Limiter {
        Limiter {
            memory: MemoryStore::default(),
            redis,
            degraded: AtomicBool::new(false),
            retry_at: AtomicU64::new(0),
        }
    }

    pub fn shared(&self) -> bool {
        self.redis.is_some()
    }

    /// The Redis configured, if any.
    pub fn redis(&self) -> Option<&RedisTarget> {
        self.redis.as_ref()
    }

    /// True while Redis is configured but unreachable.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// A Redis connection for one worker thread, which reconnects by itself. It is opened
    /// here, within the connect timeout, so the first requests are already shared; if Redis is
    /// down at start, a lazy connection is returned (it connects on first use) and the data
    /// plane starts degraded. Must be called on that worker's runtime.
    pub async fn connect(&self) -> Option<RedisConn> {
        connect(self.redis.as_ref()?).await
    }

    /// Decides one request of `identity` under `rate`. `None` means refuse without a decision
    /// (Redis unreachable in `closed` mode).
    pub async fn check(
        &self,
        conn: Option<&Batcher>,
        identity: &str,
        rate: Rate,
        ban: BanRule,
        mode: StoreFailureMode,
    ) -> (Option<Decision>, Source) {
        let now = unix_ms();
        if let Some(conn) = conn
            && now >= self.retry_at.load(Ordering::Relaxed)
        {
            // Decided on Redis's clock (time 0), so the data planes' decisions are made in
            // one time order however their clocks differ.
            let call = conn.check(redis::Check {
                identity: identity.to_owned(),
                now: 0,
                rate,
                ban,
            });
            match tokio::time::timeout(REDIS_TIMEOUT, call).await {
                Ok(Ok(d)) => {
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            "redis reachable again; limits are shared across data planes"
                        );
                    }
                    return (Some(d), Source::Shared);
                }
                Ok(Err(e)) => self.fail(now, &e.to_string()),
                Err(_) => self.fail(now, "timed out"),
            }
        }
        if conn.is_some() {
            match mode {
                StoreFailureMode::Open => return (None, Source::Open),
                StoreFailureMode::Closed => return (None, Source::Closed),
                _ => {}
            }
        }
        (
            Some(self.memory.check(identity, now, rate, ban)),
            Source::Local,
        )
    }

    fn fail(&self, now: u64, cause: &str) {
        self.retry_at.store(
            now + u64::try_from(REDIS_RETRY.as_millis()).unwrap_or(1000),
            Ordering::Relaxed,
        );
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cause,
                "redis unreachable; rate limits enforced per data plane until it is back"
            );
        }
    }

    /// Forgets a ban here and, with a connection, in Redis.
    pub async fn lift_ban(&self, conn: Option<&RedisConn>, identity: &str) {
        self.memory.lift_ban(identity);
        if let Some(c) = conn {
            let mut c = c.clone();
            if let Err(e) = redis::lift_ban(&mut c, identity).await {
                tracing::warn!(client = identity, cause = %e, "cannot lift the ban in redis");
            }
        }
    }

    /// Forgets a ban in this data plane's own store (Redis is the control plane's to clear).
    pub fn lift_local_ban(&self, identity: &str) {
        self.memory.lift_ban(identity);
    }

    /// Bans enforced by this data plane's own store.
    pub fn local_bans(&self) -> Vec<(String, u64, u32)> {
        self.memory.bans(unix_ms())
    }
}

/// A Redis connection that reconnects by itself, opened within the connect timeout when Redis
/// answers, else lazily (it connects on first use). Must be called on the runtime that will use
/// it.
pub async fn connect(target: &RedisTarget) -> Option<RedisConn> {
    let t = Timeouts {
        connect: Duration::from_millis(500),
        response: REDIS_TIMEOUT,
        retries: 1,
    };
    match tokio::time::timeout(Duration::from_secs(1), target.connect(t)).await {
        Ok(Ok(c)) => return Some(c),
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, "redis unreachable; enforced per data plane until it answers")
        }
        Err(_) => tracing::warn!("redis did not answer; enforced per data plane until it does"),
    }
    match target.connect_lazy(t) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(cause = %e, "cannot set up the redis connection");
            None
        }
    }
}

/// Most decisions sent in one script call.
const MAX_BATCH: usize = 64;

type Job = (
    redis::Check,
    tokio::sync::oneshot::Sender<Result<Decision, String>>,
);

/// A worker thread's way to Redis for limit decisions: the decisions asked for while a call is
/// in flight go together in the next call (one script call, one round trip for all of them),
/// so under load Redis runs one script per batch instead of one per request, and a lone
/// request goes at once. Each decision is still made atomically and in order, exactly as
/// alone.
#[derive(Clone)]
pub struct Batcher {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Spawns the sender on the current runtime; it ends when every handle is dropped.
    pub fn spawn(conn: RedisConn) -> Batcher {
        let (jobs, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(run_batches(conn, rx));
        Batcher { jobs }
    }

    pub async fn check(&self, check: redis::Check) -> Result<Decision, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send((check, tx))
            .map_err(|_| "the redis sender stopped".to_owned())?;
        rx.await
            .map_err(|_| "the redis sender stopped".to_owned())?
    }
}

async fn run_batches(mut conn: RedisConn, mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        // Let the requests this thread has already read ask too, so they share the round trip.
        tokio::task::yield_now().await;
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // A caller that gave up (its deadline passed) has decided without Redis: its decision
        // must not take a token too.
        jobs.retain(|(_, reply)| !reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let (checks, replies): (Vec<redis::Check>, Vec<_>) = jobs.drain(..).unzip();
        let result = tokio::time::timeout(REDIS_TIMEOUT, redis::check_many(&mut conn, &checks))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match result {
            Ok(decisions) => {
                for (reply, d) in replies.into_iter().zip(decisions) {
                    let _ = reply.send(Ok(d));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
