//! The in-process limiter store: the GCRA state of each client in sharded maps. It is the store
//! of a data plane with no Redis, and the fallback of one whose Redis is unreachable (then each
//! data plane enforces the limits on its own share of the traffic).
//!
//! Memory is bounded: a shard that grows past its share of [`MAX_CLIENTS`] first forgets clients
//! with nothing left to remember (quota whole, no strike, no ban); if that is not enough, it
//! forgets arbitrary ones, which then start with a whole quota. A flood of distinct clients can
//! therefore cost some precision, never unbounded memory.

use std::collections::HashMap;
use std::sync::Mutex;

use super::gcra::{self, BanRule, ClientState, Decision, Rate};

const SHARDS: usize = 16;
/// Clients remembered at most; about 150 bytes each with their identity string.
pub const MAX_CLIENTS: usize = 1 << 20;

pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<String, ClientState>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl MemoryStore {
    fn shard(&self, identity: &str) -> std::sync::MutexGuard<'_, HashMap<String, ClientState>> {
        let i = (crate::policy::balance::hash_bytes(identity.as_bytes()) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn check(&self, identity: &str, now: u64, rate: Rate, ban: BanRule) -> Decision {
        let mut shard = self.shard(identity);
        if rate.requests == 0 {
            // A ban check: a client with no state here has no ban, and gets none kept.
            let mut state = shard.get(identity).cloned().unwrap_or_default();
            return gcra::check(&mut state, now, rate, ban);
        }
        if !shard.contains_key(identity) && shard.len() >= MAX_CLIENTS / SHARDS {
            shard.retain(|_, s| !gcra::is_idle(s, now));
            if shard.len() >= MAX_CLIENTS / SHARDS {
                let excess: Vec<String> = shard.keys().take(shard.len() / 8 + 1).cloned().collect();
                for k in excess {
                    shard.remove(&k);
                }
            }
        }
        let state = shard.entry(identity.to_owned()).or_default();
        gcra::check(state, now, rate, ban)
    }

    /// A client's state, `None` when this store has none.
    pub fn state(&self, identity: &str) -> Option<ClientState> {
        self.shard(identity).get(identity).cloned()
    }

    /// Forgets a client's ban and strikes (an operator lifted the ban).
    pub fn lift_ban(&self, identity: &str) {
        if let Some(s) = self.shard(identity).get_mut(identity) {
            s.ban_until = 0;
            s.bans = 0;
            s.bans_until = 0;
            s.strikes = 0;
            s.strikes_until = 0;
        }
    }

    /// Clients banned at `now`: identity, ban end, bans so far.
    pub fn bans(&self, now: u64) -> Vec<(String, u64, u32)> {
        self.shards
            .iter()
            .flat_map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.iter()
                    .filter(|(_, c)| c.ban_until > now)
                    .map(|(k, c)| (k.clone(), c.ban_until, c.bans))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[cfg(any(test, feature = "internals"))]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    #[cfg(any(test, feature = "internals"))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
