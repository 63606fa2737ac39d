//! The in-process limiter state as a handle that can be shared: by several data planes in one
//! process (so that they enforce one limit between them, as they would through Redis), and by
//! whoever answers questions about it (the `dev` stack's control plane reads usage and bans
//! from it, and lifts bans in it).

use std::sync::Arc;

use super::memory::MemoryStore;
use crate::clock::unix_ms;

/// A client's limiter state, as the in-process store holds it; times are unix ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitState {
    /// Theoretical arrival time of the next request (0 = none).
    pub tat_ms: f64,
    /// Emission interval `tat_ms` was computed with.
    pub interval_ms: f64,
    /// End of the client's ban (0 or past = not banned).
    pub ban_until_ms: u64,
    /// Bans so far (the next one lasts longer).
    pub bans: u32,
}

/// A client banned now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBan {
    /// `ip:<address>` or `key:<key id>`.
    pub client: String,
    pub until_ms: u64,
    pub count: u32,
}

/// A handle on one in-process limiter store; clones share it.
#[derive(Clone, Default)]
pub struct LocalLimits {
    store: Arc<MemoryStore>,
}

impl LocalLimits {
    pub(crate) fn store(&self) -> Arc<MemoryStore> {
        Arc::clone(&self.store)
    }

    /// The state of `identity` (`ip:<address>` or `key:<key id>`), `None` when it has none.
    pub fn state(&self, identity: &str) -> Option<LimitState> {
        self.store.state(identity).map(|s| LimitState {
            tat_ms: s.tat,
            interval_ms: s.interval,
            ban_until_ms: s.ban_until,
            bans: s.bans,
        })
    }

    /// Clients banned now.
    pub fn bans(&self) -> Vec<LocalBan> {
        self.store
            .bans(unix_ms())
            .into_iter()
            .map(|(client, until_ms, count)| LocalBan {
                client,
                until_ms,
                count,
            })
            .collect()
    }

    /// Forgets the ban and strikes of `identity`.
    pub fn lift_ban(&self, identity: &str) {
        self.store.lift_ban(identity);
    }
}
