//! The data plane's link to Redis: one target, the timeouts every call on the request path
//! keeps to, and one degraded state that the limiter and the cache share. A call that fails or
//! takes longer than [`TIMEOUT`] never fails the request: the link is marked degraded, Redis is
//! left alone for [`RETRY`] (both users decide locally meanwhile: limits per data plane, the
//! cache in process), and the first call that succeeds after it clears the mark.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{RedisConn, RedisTarget, Timeouts};

/// Longest wait for Redis on the request path; past it the request is decided locally. Well
/// above a loaded Redis's answer time (a few ms), so only a stalled or dead one trips it.
pub const TIMEOUT: Duration = Duration::from_millis(250);

/// After a failed Redis call, requests are decided locally this long before Redis is tried
/// again, so a dead Redis costs one timeout per interval, not one per request.
pub const RETRY: Duration = Duration::from_secs(1);

/// Whether Redis answers, as the last calls found.
#[derive(Debug, Default)]
pub struct Health {
    degraded: AtomicBool,
    /// Redis is left alone until then (unix ms).
    retry_at: AtomicU64,
}

impl Health {
    /// True while Redis is configured but unreachable.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Whether a call may go to Redis at `now_ms` (it is not being left alone).
    pub fn usable(&self, now_ms: u64) -> bool {
        now_ms >= self.retry_at.load(Ordering::Relaxed)
    }

    /// A call succeeded.
    pub fn succeeded(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!(
                "redis reachable again; limits and the response cache are shared across data planes"
            );
        }
    }

    /// A call failed at `now_ms`: Redis is left alone for [`RETRY`].
    pub fn failed(&self, now_ms: u64, cause: &dyn std::fmt::Display) {
        let retry = u64::try_from(RETRY.as_millis()).unwrap_or(1000);
        self.retry_at.store(now_ms + retry, Ordering::Relaxed);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cause = %cause,
                "redis unreachable; limits are enforced per data plane and the response cache \
                 runs in process until it is back"
            );
        }
    }
}

/// The Redis a data plane uses, and how it is doing.
pub struct Link {
    target: RedisTarget,
    health: Arc<Health>,
}

impl Link {
    pub fn new(target: RedisTarget) -> Link {
        Link {
            target,
            health: Arc::default(),
        }
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The link's state, shared with whoever calls Redis through it.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// A connection that reconnects by itself, opened within the connect timeout when Redis
    /// answers, else lazily (it connects on first use, and the data plane starts degraded).
    /// Must be called on the runtime that will use it.
    pub async fn connect(&self) -> Option<RedisConn> {
        let t = Timeouts {
            connect: Duration::from_millis(500),
            response: TIMEOUT,
            retries: 1,
        };
        match tokio::time::timeout(Duration::from_secs(1), self.target.connect(t)).await {
            Ok(Ok(c)) => return Some(c),
            Ok(Err(e)) => {
                tracing::warn!(cause = %e, "redis unreachable; enforced per data plane until it answers")
            }
            Err(_) => tracing::warn!("redis did not answer; enforced per data plane until it does"),
        }
        match self.target.connect_lazy(t) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(cause = %e, "cannot set up the redis connection");
                None
            }
        }
    }
}
