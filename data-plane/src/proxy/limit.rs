//! Steps 2 to 4 of the request path: who the client is (its API key, its address), whether it is
//! blocked or banned, and whether its quota admits the request. An admitted request leaves with
//! its queue priority and the quota it ran under (for the `RateLimit` fields of its response).

use lb_proto::redis_keys;

use super::refusal::Refusal;
use super::worker::Worker;
use crate::config::active::Active;
use crate::ratelimit::Source;
use crate::ratelimit::gcra::{Rate, Verdict};
use crate::ratelimit::identity;
use crate::ratelimit::quota::Quota;

/// What an admitted request runs with.
pub struct Admitted {
    /// Its place in the queue when backends are full: its tier's priority.
    pub priority: u32,
    /// The quota it was counted against, if any.
    pub quota: Option<Quota>,
}

/// Who is asking, for the limiter: the name it is counted under, its rate, the policy's name
/// and its priority.
pub struct Identity {
    who: String,
    key_id: Option<String>,
    rate: Rate,
    policy: String,
    priority: u32,
}

/// Applies the client's limit: the queue priority and quota of an admitted request, or the
/// refusal (429 banned or over the limit, 503 when the limiter cannot decide in `closed` mode).
/// A client no limit applies to (`None`) is admitted at the default priority.
pub async fn admit(
    worker: &Worker,
    id: Option<Identity>,
    active: &Active,
) -> Result<Admitted, Refusal> {
    let Some(id) = id else {
        return Ok(Admitted {
            priority: active.default_priority,
            quota: None,
        });
    };
    let shared = &*worker.shared;
    let limits = &active.limits;
    let (decision, source) = shared
        .limiter
        .check(
            worker.limits.as_ref(),
            &id.who,
            id.rate,
            limits.ban,
            limits.on_store_failure,
        )
        .await;
    let decision = match (decision, source) {
        (Some(d), _) => d,
        // Redis unreachable in `open` mode: admitted unchecked, with no quota to tell of.
        (None, Source::Open) => {
            return Ok(Admitted {
                priority: id.priority,
                quota: None,
            });
        }
        (None, _) => return Err(Refusal::LimiterUnavailable),
    };
    if let Some(k) = &id.key_id {
        shared
            .reporter
            .key(k, &id.policy, decision.verdict != Verdict::Allowed);
    }
    let quota = Quota {
        key_id: id.key_id,
        policy: id.policy,
        rate: id.rate,
        decision,
    };
    let retry_after = decision.retry_after_ms.div_ceil(1000).max(1);
    match decision.verdict {
        Verdict::Allowed => Ok(Admitted {
            priority: id.priority,
            quota: Some(quota),
        }),
        Verdict::Banned => Err(Refusal::Banned { quota, retry_after }),
        Verdict::Limited => Err(Refusal::RateLimited { quota, retry_after }),
    }
}

/// The client as the limiter counts it: by API key (its tier's rate), else by address (the
/// per-IP rate); `None` when no limit applies to it. A bad key is refused (400), as is a blocked
/// one (403) and, when unknown keys are refused, an unknown one (401).
pub fn identify(
    peer: std::net::IpAddr,
    parts: &http::request::Parts,
    active: &Active,
) -> Result<Option<Identity>, Refusal> {
    let limits = &active.limits;
    let key = identity::api_key(&parts.headers, parts.uri.query())
        .map_err(|e| Refusal::InvalidApiKey(e.to_string()))?;
    match &key {
        Some(k) => {
            let o = limits.overrides.get(&k.hash);
            if o.is_some_and(|(_, blocked)| *blocked) {
                return Err(Refusal::Blocked);
            }
            if o.is_none() && limits.reject_unknown {
                return Err(Refusal::UnknownKey);
            }
            let Some(tier) = limits.tier_of(&k.hash) else {
                return Ok(None);
            };
            Ok(Some(Identity {
                who: redis_keys::key_identity(k.id()),
                key_id: Some(k.id().to_owned()),
                rate: tier.rate,
                policy: tier.name.clone(),
                priority: tier.priority,
            }))
        }
        None => {
            // No per-IP limit: nothing to name the client for.
            let Some(rate) = limits.ip else {
                return Ok(None);
            };
            let ip = identity::client_ip(peer, &parts.headers, &active.trusted);
            Ok(Some(Identity {
                who: redis_keys::ip_identity(ip),
                key_id: None,
                rate,
                policy: "ip".to_owned(),
                priority: active.default_priority,
            }))
        }
    }
}
