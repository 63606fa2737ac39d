//! Rate limiting: per client IP, or per API key by tier, with escalating bans.
//!
//! With Redis configured, every data plane checks the same state through one script call per
//! request, so a limit holds exactly across the fleet. Without Redis, or while Redis is
//! unreachable, the same arithmetic runs in process ([`memory`]). A Redis call that fails or
//! takes too long never fails the request: the link is marked degraded
//! ([`crate::redis::link`]) and the request is answered per the snapshot's failure mode
//! (`local`: enforce per data plane; `open`: admit; `closed`: refuse) until a call succeeds
//! again.
//!
//! A `rediss://` URL is reached over TLS (rustls, through the redis crate), with the Redis
//! certificate checked against the `redis_ca` file when set, else the system's roots; a
//! `redis+cluster://` URL names a Redis Cluster ([`crate::redis`]).

pub mod gcra;
pub mod identity;
pub mod local;
pub mod memory;
pub mod quota;
pub mod redis;

use std::sync::Arc;

use crate::clock::unix_ms;

use lb_proto::v1::StoreFailureMode;

use gcra::{BanRule, Decision, Rate};
use local::LocalLimits;
use memory::MemoryStore;

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

use crate::redis::RedisConn;
use crate::redis::link::{Health, Link, TIMEOUT};

/// A data plane's limiter: the in-process store, and the link to Redis when one is configured.
pub struct Limiter {
    memory: Arc<MemoryStore>,
    redis: Option<Arc<Link>>,
}

impl Limiter {
    /// A limiter whose in-process store is `local`, which other limiters in this process (and
    /// whoever else holds it) may share.
    pub fn with_local(redis: Option<Arc<Link>>, local: &LocalLimits) -> Limiter {
        Limiter {
            memory: local.store(),
            redis,
        }
    }

    pub fn shared(&self) -> bool {
        self.redis.is_some()
    }

    /// True while Redis is configured but unreachable.
    pub fn is_degraded(&self) -> bool {
        self.health().is_some_and(|h| h.is_degraded())
    }

    fn health(&self) -> Option<&Health> {
        self.redis.as_ref().map(|l| &**l.health())
    }

    /// Decides one request against each of `limits` (an identity and its rate, in order): the
    /// decisions, or `None` to refuse without any (Redis unreachable in `closed` mode; in
    /// `open` mode, admit unchecked). Through Redis every decision of a request goes in one
    /// call of this thread's batch.
    pub async fn check(
        &self,
        conn: Option<&Batcher>,
        limits: &[(&str, Rate)],
        ban: BanRule,
        mode: StoreFailureMode,
    ) -> (Option<Vec<Decision>>, Source) {
        let now = unix_ms();
        if let (Some(conn), Some(health)) = (conn, self.health())
            && health.usable(now)
        {
            // Decided on Redis's clock (time 0), so the data planes' decisions are made in
            // one time order however their clocks differ. Every check is queued before any is
            // awaited, so they share one script call.
            let calls: Vec<_> = limits
                .iter()
                .map(|(identity, rate)| {
                    conn.check(redis::Check {
                        identity: (*identity).to_owned(),
                        now: 0,
                        rate: *rate,
                        ban,
                    })
                })
                .collect();
            let all = futures_util::future::try_join_all(calls);
            match tokio::time::timeout(TIMEOUT, all).await {
                Ok(Ok(d)) => {
                    health.succeeded();
                    return (Some(d), Source::Shared);
                }
                Ok(Err(e)) => health.failed(now, &e),
                Err(_) => health.failed(now, &"timed out"),
            }
        }
        if conn.is_some() {
            match mode {
                StoreFailureMode::Open => return (None, Source::Open),
                StoreFailureMode::Closed => return (None, Source::Closed),
                _ => {}
            }
        }
        let decided = limits
            .iter()
            .map(|(identity, rate)| self.memory.check(identity, now, *rate, ban))
            .collect();
        (Some(decided), Source::Local)
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

    /// Queues one decision at once; the answer comes with the batch it went in.
    pub fn check(
        &self,
        check: redis::Check,
    ) -> impl std::future::Future<Output = Result<Decision, String>> + use<> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.jobs.send((check, tx));
        async move {
            queued.map_err(|_| "the redis sender stopped".to_owned())?;
            rx.await
                .map_err(|_| "the redis sender stopped".to_owned())?
        }
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
        let result = tokio::time::timeout(TIMEOUT, redis::check_many(&mut conn, &checks))
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
