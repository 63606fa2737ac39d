//! The shared limiter store: one Lua script (`script.lua`, the twin of `gcra::check`) per call,
//! deciding one request or a batch of them, loaded once and called by SHA (the client falls back
//! to sending it whole on NOSCRIPT). One identity's keys share a hash tag; a batch that mixes
//! identities spans several slots, so on Redis Cluster it is split by identity ([`check_many`]).

use std::sync::LazyLock;

use lb_proto::redis_keys;
use redis::Script;

use crate::redis::RedisConn;

use super::gcra::{BanRule, Decision, Rate, Verdict};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("script.lua")));

/// The Redis keys of one identity (`ip:<addr>` or `key:<key id>`).
pub fn keys(identity: &str) -> [String; 3] {
    [
        redis_keys::gcra_key(identity),
        redis_keys::ban_key(identity),
        redis_keys::strikes_key(identity),
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
    /// When the decision is made, unix ms; 0: now on the Redis server's clock.
    pub now: u64,
    pub rate: Rate,
    pub ban: BanRule,
}

#[cfg(any(test, feature = "internals"))]
pub async fn check(
    conn: &mut RedisConn,
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

/// Several decisions in one script call, made in order: one round trip for all of them. One
/// identity's decisions under the same limits travel as a group (its keys and limits once, then
/// each decision's time), so a batch from one busy client costs little more than one decision.
///
/// On a Redis Cluster a script may touch one slot only, so each identity's groups go in a call
/// of their own, the calls sent together (pipelined on each node's connection): still one
/// round trip, and one script call per request at most.
pub async fn check_many(
    conn: &mut RedisConn,
    checks: &[Check],
) -> Result<Vec<Decision>, RedisLimitError> {
    let groups = groups(checks);
    let calls: Vec<Vec<&[usize]>> = if conn.is_cluster() {
        let mut by_identity: Vec<Vec<&[usize]>> = Vec::new();
        for g in &groups {
            let id = &checks[g[0]].identity;
            match by_identity
                .iter_mut()
                .find(|c| checks[c[0][0]].identity == *id)
            {
                Some(c) => c.push(g),
                None => by_identity.push(vec![g]),
            }
        }
        by_identity
    } else {
        vec![groups.iter().map(Vec::as_slice).collect()]
    };
    let replies = if let [only] = &calls[..] {
        vec![call(conn, checks, only).await?]
    } else {
        futures_util::future::try_join_all(calls.iter().map(|groups| {
            let mut conn = conn.clone();
            async move { call(&mut conn, checks, groups).await }
        }))
        .await?
    };
    let mut decided: Vec<Option<Decision>> = vec![None; checks.len()];
    for (groups, reply) in calls.iter().zip(replies) {
        for (&i, d) in groups.iter().copied().flatten().zip(reply) {
            decided[i] = Some(d);
        }
    }
    Ok(decided.into_iter().flatten().collect())
}

/// One script call deciding `groups` (indices into `checks`) in order.
async fn call(
    conn: &mut RedisConn,
    checks: &[Check],
    groups: &[&[usize]],
) -> Result<Vec<Decision>, RedisLimitError> {
    let mut call = SCRIPT.prepare_invoke();
    for g in groups {
        let [k1, k2, k3] = keys(&checks[g[0]].identity);
        call.key(k1).key(k2).key(k3);
    }
    let mut expected = 0;
    for g in groups {
        let c = &checks[g[0]];
        call.arg(g.len())
            .arg(c.rate.requests)
            .arg(c.rate.period_ms)
            .arg(c.ban.strikes)
            .arg(c.ban.strike_window_ms)
            .arg(c.ban.base_ban_ms)
            .arg(c.ban.multiplier)
            .arg(c.ban.max_ban_ms)
            .arg(c.ban.strike_decay_ms);
        for &i in *g {
            call.arg(checks[i].now);
        }
        expected += g.len();
    }
    let reply: Vec<i64> = call.invoke_async(conn).await?;
    if reply.len() != 5 * expected {
        return Err(RedisLimitError::BadReply(reply));
    }
    reply
        .chunks(5)
        .map(decision)
        .collect::<Result<_, ()>>()
        .map_err(|()| RedisLimitError::BadReply(reply.clone()))
}

/// The checks (by index) in groups: one identity's decisions in order, a new group whenever its
/// limits change, so each identity's decisions are still made in the order they came.
fn groups(checks: &[Check]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, c) in checks.iter().enumerate() {
        let last = groups
            .iter_mut()
            .rev()
            .find(|g| checks[g[0]].identity == c.identity);
        match last {
            Some(g) if checks[g[0]].rate == c.rate && checks[g[0]].ban == c.ban => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
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
pub async fn lift_ban(conn: &mut RedisConn, identity: &str) -> Result<(), redis::RedisError> {
    let [_, ban, strikes] = keys(identity);
    redis::cmd("DEL")
        .arg(ban)
        .arg(strikes)
        .query_async::<()>(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(identity: &str, requests: u64) -> Check {
        Check {
            identity: identity.to_owned(),
            now: 0,
            rate: Rate {
                requests,
                period_ms: 60_000,
            },
            ban: BanRule::default(),
        }
    }

    #[test]
    fn one_identitys_decisions_group_in_order_until_its_limits_change() {
        let checks = [
            check("ip:a", 5),
            check("ip:b", 5),
            check("ip:a", 5),
            check("ip:a", 20),
            check("ip:b", 5),
            check("ip:a", 5),
        ];
        assert_eq!(
            groups(&checks),
            vec![vec![0, 2], vec![1, 4], vec![3], vec![5]]
        );
    }
}
