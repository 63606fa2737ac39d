//! Steps 2 to 4 of the request path: who the client is (its API key, its address), whether it is
//! blocked or banned, and whether its quota admits the request. An admitted request leaves with
//! its queue priority and the quota it ran under (for the `RateLimit` fields of its response).
//!
//! A key is limited by its tier. A request with no key, or with a key the control plane does not
//! know (every created key travels in the snapshot), also counts against its client address, so
//! inventing keys never multiplies a client's quota; a created key is exempt from the address's
//! limit, but a ban of the address holds whatever key the request carries. Every decision of a
//! request is made in one call to the limiter (one Redis round trip).

use std::net::IpAddr;

use lb_proto::redis_keys;

use super::refusal::Refusal;
use super::worker::Worker;
use crate::config::active::Active;
use crate::ratelimit::Source;
use crate::ratelimit::gcra::{Decision, Rate, Verdict};
use crate::ratelimit::identity;
use crate::ratelimit::quota::Quota;

/// What an admitted request runs with.
pub struct Admitted {
    /// Its place in the queue when backends are full: its tier's priority.
    pub priority: u32,
    /// The quota it was counted against, if any.
    pub quota: Option<Quota>,
}

/// One limit a request counts against: the name it is counted under, its rate, and the
/// policy's name (a tier's, or "ip").
struct Counted {
    who: String,
    rate: Rate,
    policy: String,
}

/// Who is asking, for the limiter.
pub struct Identity {
    /// The key's id, for a keyed request.
    key_id: Option<String>,
    /// Its first limit: its key's tier, or its address's for a request with no key.
    first: Counted,
    /// Its address's too: counted for a key nobody created, only checked for a ban for a
    /// created one.
    address: Option<Counted>,
    priority: u32,
}

/// Applies the client's limits: the queue priority and quota of an admitted request, or the
/// refusal (429 banned or over a limit, 503 when the limiter cannot decide in `closed` mode).
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
    let asked: Vec<(&str, Rate)> = std::iter::once(&id.first)
        .chain(&id.address)
        .map(|c| (c.who.as_str(), c.rate))
        .collect();
    let (decisions, source) = shared
        .limiter
        .check(
            worker.limits.as_ref(),
            &asked,
            limits.ban,
            limits.on_store_failure,
        )
        .await;
    let decisions = match (decisions, source) {
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
    let (first, address) = match &decisions[..] {
        [first, address] => (*first, Some(*address)),
        [first] => (*first, None),
        _ => return Err(Refusal::LimiterUnavailable),
    };
    // A ban refuses before a limit, and the address's before the key's: the answer names the
    // limit that refused.
    let refusing = [(Verdict::Banned, true), (Verdict::Banned, false)]
        .into_iter()
        .chain([(Verdict::Limited, true), (Verdict::Limited, false)])
        .find_map(|(verdict, of_address)| {
            let d = if of_address { address? } else { first };
            (d.verdict == verdict).then_some((d, of_address))
        });
    if let Some(k) = &id.key_id {
        let refused = refusing.is_some();
        shared.reporter.key(k, &id.first.policy, refused);
    }
    let Some((decision, of_address)) = refusing else {
        return Ok(Admitted {
            priority: id.priority,
            quota: Some(quota(id.first, id.key_id, first)),
        });
    };
    let counted = match (of_address, id.address) {
        (true, Some(a)) => a,
        _ => id.first,
    };
    let quota = quota(counted, id.key_id, decision);
    let retry_after = decision.retry_after_ms.div_ceil(1000).max(1);
    match decision.verdict {
        Verdict::Banned => Err(Refusal::Banned { quota, retry_after }),
        _ => Err(Refusal::RateLimited { quota, retry_after }),
    }
}

fn quota(counted: Counted, key_id: Option<String>, decision: Decision) -> Quota {
    Quota {
        key_id,
        policy: counted.policy,
        rate: counted.rate,
        decision,
    }
}

/// The client as the limiter counts it: by API key (its tier's rate, and its address's unless
/// the key was created), else by address (the per-IP rate); `None` when no limit applies to it.
/// A bad key is refused (400), as is a blocked one (403) and, when unknown keys are refused, an
/// unknown one (401).
pub fn identify(
    peer: IpAddr,
    parts: &http::request::Parts,
    active: &Active,
) -> Result<Option<Identity>, Refusal> {
    let limits = &active.limits;
    let key = identity::api_key(&parts.headers, parts.uri.query())
        .map_err(|e| Refusal::InvalidApiKey(e.to_string()))?;
    let address = || {
        let rate = limits.ip?;
        let ip = identity::client_ip(peer, &parts.headers, &active.trusted);
        Some((redis_keys::ip_identity(ip), rate))
    };
    let Some(k) = &key else {
        // No per-IP limit: nothing to name the client for.
        return Ok(address().map(|(who, rate)| Identity {
            key_id: None,
            first: Counted {
                who,
                rate,
                policy: "ip".to_owned(),
            },
            address: None,
            priority: active.default_priority,
        }));
    };
    let created = limits.overrides.get(&k.hash);
    if created.is_some_and(|(_, blocked)| *blocked) {
        return Err(Refusal::Blocked {
            key_id: k.id().to_owned(),
            tier: limits
                .tier_of(&k.hash)
                .map(|t| t.name.clone())
                .unwrap_or_default(),
        });
    }
    if created.is_none() && limits.reject_unknown {
        return Err(Refusal::UnknownKey {
            key_id: k.id().to_owned(),
        });
    }
    let Some(tier) = limits.tier_of(&k.hash) else {
        return Ok(None);
    };
    let address = address().map(|(who, rate)| Counted {
        who,
        // A created key answers for its own traffic; its address's ban still holds.
        rate: if created.is_some() {
            Rate::BAN_ONLY
        } else {
            rate
        },
        policy: "ip".to_owned(),
    });
    Ok(Some(Identity {
        key_id: Some(k.id().to_owned()),
        first: Counted {
            who: redis_keys::key_identity(k.id()),
            rate: tier.rate,
            policy: tier.name.clone(),
        },
        address,
        priority: tier.priority,
    }))
}
