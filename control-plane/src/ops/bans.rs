//! Operations on bans, shared by gRPC and REST: list the bans in force, lift one.

use lb_proto::v1::{BanInfo, BanLift, directive};

use crate::clock::now_ms;
use crate::cluster::{ControlPlane, UpdateError};
use crate::ratelimit::{canonical_client, push_directive};

/// Bans in force, by client. From the shared state when there is one; otherwise each data
/// plane enforces its own bans, and the list is what they report, each ban naming its data
/// plane.
pub async fn list_bans(cp: &ControlPlane) -> Result<Vec<BanInfo>, UpdateError> {
    let mut bans = match cp.shared_limits() {
        Some(shared) => shared
            .bans(now_ms())
            .await
            .map_err(UpdateError::Unavailable)?,
        None => cp.traffic.reported_bans(now_ms()),
    };
    bans.sort_by(|a, b| (&a.client, &a.node_id).cmp(&(&b.client, &b.node_id)));
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
    cp.traffic.forget_bans(&client);
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
