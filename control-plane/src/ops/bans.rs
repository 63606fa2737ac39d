//! Operations on bans, shared by gRPC and REST: list the bans in force, lift one.

use lb_proto::v1::{BanInfo, BanLift, directive};

use crate::clock::now_ms;
use crate::cluster::{ControlPlane, UpdateError};
use crate::ratelimit::{canonical_client, push_directive};

/// Bans in force, by client. Without Redis each data plane keeps its own bans and the control
/// plane has none to show, so the list is empty.
pub async fn list_bans(cp: &ControlPlane) -> Result<Vec<BanInfo>, UpdateError> {
    let Some(shared) = cp.shared_limits() else {
        return Ok(Vec::new());
    };
    let mut bans = shared
        .bans(now_ms())
        .await
        .map_err(UpdateError::Unavailable)?;
    bans.sort_by(|a, b| a.client.cmp(&b.client));
    Ok(bans)
}

/// Lifts a client's ban: deletes it from Redis when there is one, and tells every data plane
/// with a directive (those enforcing locally hold their own copy). Returns the new version.
pub async fn lift_ban(cp: &ControlPlane, client: &str) -> Result<u64, UpdateError> {
    let client = canonical_client(client)?;
    if let Some(shared) = cp.shared_limits() {
        shared
            .lift(&client)
            .await
            .map_err(UpdateError::Unavailable)?;
    }
    let lift = client.clone();
    let version = cp
        .update(move |s| {
            push_directive(
                &mut s.directives,
                directive::Kind::LiftBan(BanLift { client: lift }),
            );
            Ok(())
        })
        .await?;
    tracing::info!(client = %client, version, "ban lifted");
    Ok(version)
}
