//! What the requests of one worker thread share.

use std::sync::Arc;

use crate::config::active::Active;
use crate::policy::retry::RetryBudget;
use crate::shared::Shared;

/// What the requests of one worker thread share.
pub struct Worker {
    pub shared: Arc<Shared>,
    /// Index of the worker thread, selecting its connection pools.
    pub id: usize,
    /// This thread's retry budget (a share of its own traffic).
    pub budget: std::sync::Mutex<RetryBudget>,
    /// This thread's connection to the shared rate-limit store, if one is configured.
    pub redis: Option<crate::redis::RedisConn>,
    /// Rate-limit decisions through Redis, batched per thread.
    pub(crate) limits: Option<crate::ratelimit::Batcher>,
    /// This thread's upgraded connections (WebSockets), for a drain to wait for.
    pub tunnels: super::tunnel::Tunnels,
    /// This thread's handle on the configuration in force, and its version.
    // Deliberately two allocations: the outer count is this thread's alone (see `active`).
    #[allow(clippy::redundant_allocation)]
    active: std::sync::Mutex<Option<(u64, Arc<Arc<Active>>)>>,
}

impl Worker {
    /// Must be called on the worker's own runtime (its Redis connection lives there).
    pub async fn new(shared: Arc<Shared>, id: usize) -> Worker {
        let redis = match &shared.redis {
            Some(link) => link.connect().await,
            None => None,
        };
        let limits = redis.clone().map(crate::ratelimit::Batcher::spawn);
        Worker {
            shared,
            id,
            budget: std::sync::Mutex::new(RetryBudget::new()),
            redis,
            limits,
            tunnels: super::tunnel::Tunnels::default(),
            active: std::sync::Mutex::new(None),
        }
    }

    /// The configuration in force, through this worker's own handle: the handle's count is
    /// touched by this thread only, where cloning the shared one would bounce its count between
    /// cores on every request.
    #[allow(clippy::redundant_allocation)]
    pub fn active(&self) -> Option<Arc<Arc<Active>>> {
        let version = self.shared.generation();
        let mut cached = self.active.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((v, a)) if *v == version => Some(Arc::clone(a)),
            _ => {
                let a = Arc::new(self.shared.active()?);
                *cached = Some((version, Arc::clone(&a)));
                Some(a)
            }
        }
    }

    pub fn budget(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }
}
