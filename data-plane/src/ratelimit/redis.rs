//! The shared limiter store: one Lua script (`script.lua`, the twin of `gcra::check`) per call,
//! deciding one request or a batch of them, loaded once and called by SHA (the client falls back
//! to sending it whole on NOSCRIPT). One identity's keys share a hash tag; a batch that mixes
//! identities spans several slots, so Redis Cluster would need batches split by slot.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionManager;

use super::gcra::{BanRule, Decision, Rate, Verdict};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("script.lua")));

/// The Redis keys of one identity (`ip:<addr>` or `key:<key id>`).
pub fn keys(identity: &str) -> [String; 3] {
    [
        format!("lb:rl:{{{identity}}}:gcra"),
        format!("lb:rl:{{{identity}}}:ban"),
        format!("lb:rl:{{{identity}}}:strikes"),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum RedisLimitError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered the limiter script with {0:?}; expected 5 integers per decision")]
    BadReply(Vec<i64>),
}

/// One decision to make in Redis.
#[derive(Debug, Clone)]
pub struct Check {
    pub identity: String,
    pub now: u64,
    pub rate: Rate,
    pub ban: BanRule,
}

pub async fn check(
    conn: &mut ConnectionManager,
    identity: &str,
    now: u64,
    rate: Rate,
    ban: BanRule,
) -> Result<Decision, RedisLimitError> {
    let check = Check {
        identity: identity.to_owned(),
        now,
        rate,
        ban,
    };
    let mut d = check_many(conn, std::slice::from_ref(&check)).await?;
    Ok(d.remove(0))
}

/// Several decisions in one script call, made in order: one round trip for all of them.
pub async fn check_many(
    conn: &mut ConnectionManager,
    checks: &[Check],
) -> Result<Vec<Decision>, RedisLimitError> {
    let mut call = SCRIPT.prepare_invoke();
    for c in checks {
        let [k1, k2, k3] = keys(&c.identity);
        call.key(k1).key(k2).key(k3);
    }
    for c in checks {
        call.arg(c.now)
            .arg(c.rate.requests)
            .arg(c.rate.period_ms)
            .arg(c.ban.strikes)
            .arg(c.ban.strike_window_ms)
            .arg(c.ban.base_ban_ms)
            .arg(c.ban.multiplier)
            .arg(c.ban.max_ban_ms)
            .arg(c.ban.strike_decay_ms);
    }
    let reply: Vec<i64> = call.invoke_async(conn).await?;
    if reply.len() != 5 * checks.len() {
        return Err(RedisLimitError::BadReply(reply));
    }
    reply
        .chunks(5)
        .map(decision)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|()| RedisLimitError::BadReply(reply.clone()))
}

fn decision(r: &[i64]) -> Result<Decision, ()> {
    let [v, limit, remaining, reset, retry] = r[..] else {
        return Err(());
    };
    let verdict = match v {
        0 => Verdict::Allowed,
        1 => Verdict::Limited,
        2 => Verdict::Banned,
        _ => return Err(()),
    };
    let u = |x: i64| u64::try_from(x).unwrap_or(0);
    Ok(Decision {
        verdict,
        limit: u(limit),
        remaining: u(remaining),
        reset_ms: u(reset),
        retry_after_ms: u(retry),
    })
}

/// Lifts a ban in Redis (the control plane does the same on `LiftBan`).
pub async fn lift_ban(
    conn: &mut ConnectionManager,
    identity: &str,
) -> Result<(), redis::RedisError> {
    let [_, ban, strikes] = keys(identity);
    redis::cmd("DEL")
        .arg(ban)
        .arg(strikes)
        .query_async::<()>(conn)
        .await
}
