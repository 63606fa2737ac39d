//! The shared limiter store: one Lua script (`script.lua`, the twin of `gcra::check`) per
//! request, loaded once and called by SHA (the client falls back to sending it whole on
//! NOSCRIPT). One identity's keys share a hash tag, so the script runs on Redis Cluster too.

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
    #[error("redis answered the limiter script with {0:?}; expected 5 integers")]
    BadReply(Vec<i64>),
}

pub async fn check(
    conn: &mut ConnectionManager,
    identity: &str,
    now: u64,
    rate: Rate,
    ban: BanRule,
) -> Result<Decision, RedisLimitError> {
    let [k1, k2, k3] = keys(identity);
    let reply: Vec<i64> = SCRIPT
        .key(k1)
        .key(k2)
        .key(k3)
        .arg(now)
        .arg(rate.requests)
        .arg(rate.period_ms)
        .arg(ban.strikes)
        .arg(ban.strike_window_ms)
        .arg(ban.base_ban_ms)
        .arg(ban.multiplier)
        .arg(ban.max_ban_ms)
        .arg(ban.strike_decay_ms)
        .invoke_async(conn)
        .await?;
    let [v, limit, remaining, reset, retry] = reply[..] else {
        return Err(RedisLimitError::BadReply(reply));
    };
    let verdict = match v {
        0 => Verdict::Allowed,
        1 => Verdict::Limited,
        2 => Verdict::Banned,
        _ => return Err(RedisLimitError::BadReply(reply)),
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
