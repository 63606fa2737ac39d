//! Operations on API keys, shared by gRPC and REST: create, set a tier, block, list, and show
//! usage. Each change goes through [`ControlPlane::change`], so it is validated, versioned,
//! saved and published as one.

use lb_proto::v1::{ApiKeyInfo, ApiKeyRecord, ConfigSnapshot, KeyUsage, Limit, UnknownKeyPolicy};

use crate::clock::now_ms;
use crate::cluster::{ControlPlane, UpdateError};
use crate::keys::{
    KeyTarget, check_label, check_tier, effective_tier, find_tier, generate_key, hash_key, key_id,
};
use crate::ratelimit;

/// A key made by [`create`]; `api_key` is shown once and not kept.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub api_key: String,
    pub key_id: String,
    pub tier: String,
    pub version: u64,
}

/// Registers a new random key with `tier` (empty = the default tier).
pub async fn create(cp: &ControlPlane, tier: &str, label: &str) -> Result<CreatedKey, UpdateError> {
    check_label(label)?;
    let (version, (api_key, key_id, tier)) = cp
        .change(|draft| {
            check_tier(&draft.config, tier)?;
            let resolved = effective_tier(&draft.config, tier).to_owned();
            let now = now_ms();
            let keys = draft.keys_mut();
            // A collision of 160 random bits does not happen; the loop keeps it impossible.
            loop {
                let api_key = generate_key().map_err(UpdateError::Entropy)?;
                let key_hash = hash_key(&api_key);
                let id = key_id(&key_hash);
                let fresh = keys.insert(ApiKeyRecord {
                    key_hash,
                    key_id: id.clone(),
                    tier: tier.to_owned(),
                    blocked: false,
                    label: label.to_owned(),
                    created_at_ms: now,
                });
                if fresh {
                    return Ok((api_key, id, resolved));
                }
            }
        })
        .await?;
    tracing::info!(key_id = %key_id, tier = %tier, version, "API key created");
    Ok(CreatedKey {
        api_key,
        key_id,
        tier,
        version,
    })
}

/// Puts a key in `tier` (empty = the default tier); returns the version and the key's id.
pub async fn set_tier(
    cp: &ControlPlane,
    target: &KeyTarget,
    tier: &str,
) -> Result<(u64, String), UpdateError> {
    let (version, id) = cp
        .change(|draft| {
            check_tier(&draft.config, tier)?;
            let record = draft.keys_mut().resolve_mut(target, now_ms())?;
            record.tier = tier.to_owned();
            Ok(record.key_id.clone())
        })
        .await?;
    tracing::info!(key_id = %id, tier = %tier, version, "API key tier changed");
    Ok((version, id))
}

/// Blocks or unblocks a registered key (NotFound for any other: a mistyped key is not
/// registered by blocking it); returns the version and the key's id.
pub async fn set_blocked(
    cp: &ControlPlane,
    target: &KeyTarget,
    blocked: bool,
) -> Result<(u64, String), UpdateError> {
    let (version, id) = cp
        .change(|draft| {
            let record = draft.keys_mut().find_mut(target)?;
            record.blocked = blocked;
            Ok(record.key_id.clone())
        })
        .await?;
    tracing::info!(key_id = %id, blocked, version, "API key block changed");
    Ok((version, id))
}

/// Every registered key, oldest first, with its tier resolved to a name and the traffic data
/// planes reported for it since this control plane started (0 before any).
pub fn list(cp: &ControlPlane) -> Vec<ApiKeyInfo> {
    let snapshot = cp.snapshot();
    let keys = cp.keys();
    let seen = cp.traffic.keys();
    let mut out: Vec<ApiKeyInfo> = keys
        .records()
        .map(|r| {
            let s = seen.get(&r.key_id);
            ApiKeyInfo {
                key_id: r.key_id.clone(),
                tier: effective_tier(&snapshot, &r.tier).to_owned(),
                blocked: r.blocked,
                label: r.label.clone(),
                created_at_ms: r.created_at_ms,
                last_seen_ms: s.map_or(0, |s| s.last_seen_ms),
                requests: s.map_or(0, |s| s.requests),
                rejected: s.map_or(0, |s| s.rejected),
            }
        })
        .collect();
    out.sort_by(|a, b| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
    out
}

/// Limit, remaining requests, time to full reset and ban for one key.
///
/// Remaining, reset and ban come from the limiter state the data planes decide with: Redis
/// when configured, or the in-process store of the `dev` stack. Without either, each data
/// plane counts on its own (`per_data_plane`): the answer is the full limit, and the longest
/// ban a data plane reports.
pub async fn usage(cp: &ControlPlane, target: &KeyTarget) -> Result<KeyUsage, UpdateError> {
    let snapshot = cp.snapshot();
    let (id, tier_name, blocked) = usage_subject(cp, &snapshot, target)?;
    let tier_name = effective_tier(&snapshot, &tier_name).to_owned();
    let limit = find_tier(&snapshot, &tier_name)
        .and_then(|t| t.limit)
        .unwrap_or(Limit {
            requests: 0,
            period_ms: 0,
        });
    let now = now_ms();
    let (state, ban) = match cp.shared_limits() {
        Some(shared) => {
            let identity = lb_proto::redis_keys::key_identity(&id);
            let state = shared.gcra(&identity).await;
            let ban = shared.ban(&identity, now).await;
            (
                state.map_err(UpdateError::Unavailable)?,
                ban.map_err(UpdateError::Unavailable)?,
            )
        }
        None => {
            let identity = lb_proto::redis_keys::key_identity(&id);
            let reported = cp.traffic.reported_bans(now);
            let ban = reported
                .into_iter()
                .filter(|b| b.client == identity)
                .max_by_key(|b| b.until_ms);
            (None, ban)
        }
    };
    let u = ratelimit::usage(&limit, state, now);
    let banned_for_ms = ban.map_or(0, |b| b.until_ms.saturating_sub(now));
    Ok(KeyUsage {
        key_id: id,
        tier: tier_name,
        blocked,
        limit: limit.requests,
        period_ms: limit.period_ms,
        remaining: if banned_for_ms > 0 { 0 } else { u.remaining },
        reset_ms: u.reset_ms.max(banned_for_ms),
        banned_for_ms,
        per_data_plane: cp.shared_limits().is_none(),
    })
}

/// The key usage is asked of: its id, tier (empty = the default) and block. An unregistered
/// key is answered as the data planes treat it: the default tier, or NotFound where unknown
/// keys are refused.
fn usage_subject(
    cp: &ControlPlane,
    snapshot: &ConfigSnapshot,
    target: &KeyTarget,
) -> Result<(String, String, bool), UpdateError> {
    let keys = cp.keys();
    match target {
        KeyTarget::Id(id) => {
            let r = keys
                .find_id(id)?
                .ok_or_else(|| UpdateError::NotFound(format!("no API key with id {id}")))?;
            Ok((r.key_id.clone(), r.tier.clone(), r.blocked))
        }
        KeyTarget::Key { hash } => match keys.get(hash) {
            Some(r) => Ok((r.key_id.clone(), r.tier.clone(), r.blocked)),
            None => {
                let refused = snapshot
                    .rate_limit
                    .as_ref()
                    .is_some_and(|rl| rl.unknown_key == UnknownKeyPolicy::Reject as i32);
                if refused {
                    return Err(UpdateError::NotFound(format!(
                        "no API key with id {} (unregistered keys are refused)",
                        key_id(hash)
                    )));
                }
                Ok((key_id(hash), String::new(), false))
            }
        },
    }
}
