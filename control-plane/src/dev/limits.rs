//! The `dev` stack's limiter state: one in-process store that every data plane of the stack
//! decides with (so they enforce one limit between them, as through Redis), and that the
//! control plane reads usage and bans from and lifts bans in.

use data_plane::LocalLimits;
use lb_proto::v1::BanInfo;

use crate::ratelimit::{GcraState, SharedLimits};
use crate::store::StoreError;

/// The control plane's view of the stack's in-process limiter state.
pub struct InProcessLimits(pub LocalLimits);

fn ban_info(b: data_plane::LocalBan) -> BanInfo {
    BanInfo {
        client: b.client,
        until_ms: b.until_ms,
        count: b.count,
        node_id: String::new(),
    }
}

#[tonic::async_trait]
impl SharedLimits for InProcessLimits {
    async fn gcra(&self, identity: &str) -> Result<Option<GcraState>, StoreError> {
        Ok(self
            .0
            .state(identity)
            .filter(|s| s.tat_ms > 0.0)
            .map(|s| GcraState {
                tat_ms: s.tat_ms,
                interval_ms: Some(s.interval_ms),
            }))
    }

    async fn bans(&self, now_ms: u64) -> Result<Vec<BanInfo>, StoreError> {
        Ok(self
            .0
            .bans()
            .into_iter()
            .filter(|b| b.until_ms > now_ms)
            .map(ban_info)
            .collect())
    }

    async fn ban(&self, identity: &str, now_ms: u64) -> Result<Option<BanInfo>, StoreError> {
        Ok(self
            .0
            .state(identity)
            .filter(|s| s.ban_until_ms > now_ms)
            .map(|s| BanInfo {
                client: identity.to_owned(),
                until_ms: s.ban_until_ms,
                count: s.bans,
                node_id: String::new(),
            }))
    }

    async fn lift(&self, identity: &str) -> Result<(), StoreError> {
        self.0.lift_ban(identity);
        Ok(())
    }
}
