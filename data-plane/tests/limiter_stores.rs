//! The in-process store and the Redis script make the same decisions: the same sequences, with
//! an injected clock, run against both and must agree request by request.

#[path = "support/redis_server.rs"]
mod redis_server;

use data_plane::ratelimit::gcra::{Decision, Rate, Verdict};
use data_plane::ratelimit::memory::MemoryStore;
use data_plane::ratelimit::redis as rl;
use data_plane::redis::RedisConn;
use redis_server::{BAN, FREE, RedisServer};

const PREMIUM: Rate = Rate {
    requests: 100,
    period_ms: 60_000,
};

/// What the default tier and ban policy decide for eight requests in a row: five admitted, two
/// refused, and the third refusal a ban.
const FIVE_THEN_BANNED: [Verdict; 8] = [
    Verdict::Allowed,
    Verdict::Allowed,
    Verdict::Allowed,
    Verdict::Allowed,
    Verdict::Allowed,
    Verdict::Limited,
    Verdict::Limited,
    Verdict::Banned,
];

/// Runs `steps` (time offset, rate) against both stores; returns both decision lists.
async fn both(
    conn: &mut RedisConn,
    who: &str,
    steps: &[(u64, Rate)],
) -> (Vec<Decision>, Vec<Decision>) {
    let memory = MemoryStore::default();
    let t0 = 1_700_000_000_000u64;
    let mut m = Vec::new();
    let mut r = Vec::new();
    for &(at, rate) in steps {
        m.push(memory.check(who, t0 + at, rate, BAN));
        r.push(rl::check(conn, who, t0 + at, rate, BAN).await.unwrap());
    }
    (m, r)
}

#[tokio::test]
async fn memory_and_redis_agree_on_bursts_refusals_tier_changes_and_bans() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    // A burst, refusals (strikes), a ban, its expiry, a second (doubled) ban.
    let mut steps: Vec<(u64, Rate)> = (0..8).map(|i| (i, FREE)).collect();
    steps.push((300_010, FREE));
    steps.extend((0..9).map(|i| (300_020 + i, FREE)));
    steps.push((900_100, FREE));
    // Tier changes in both directions.
    steps.extend((0..5).map(|i| (2_000_000 + i, FREE)));
    steps.extend((0..3).map(|i| (2_000_100 + i, PREMIUM)));
    steps.extend((0..3).map(|i| (2_000_200 + i, FREE)));
    let (m, r) = both(&mut conn, "key:0123456789abcdef", &steps).await;
    for (i, (a, b)) in m.iter().zip(&r).enumerate() {
        assert_eq!(a, b, "step {i} at {:?}", steps[i]);
    }
    let verdicts: Vec<Verdict> = m.iter().map(|d| d.verdict).collect();
    assert_eq!(&verdicts[..8], &FIVE_THEN_BANNED);
    assert_eq!(m[7].retry_after_ms, 300_000, "first ban: 300 s");
    let second_ban = m[9..18]
        .iter()
        .find(|d| d.verdict == Verdict::Banned)
        .expect("banned again");
    assert_eq!(second_ban.retry_after_ms, 600_000, "second ban doubles");
}

#[tokio::test]
async fn lifting_a_ban_clears_it_in_redis() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    let who = "ip:192.0.2.1";
    let t0 = 1_700_000_000_000u64;
    let mut last = None;
    for i in 0..8 {
        last = Some(rl::check(&mut conn, who, t0 + i, FREE, BAN).await.unwrap());
    }
    assert_eq!(last.unwrap().verdict, Verdict::Banned);
    rl::lift_ban(&mut conn, who).await.unwrap();
    let d = rl::check(&mut conn, who, t0 + 12_001, FREE, BAN)
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allowed, "{d:?}");
}

#[tokio::test]
async fn the_script_keeps_one_identity_in_one_hash_slot() {
    let [a, b, c] = rl::keys("key:0123456789abcdef");
    let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
    assert_eq!(tag(&a), tag(&b));
    assert_eq!(tag(&b), tag(&c));
}

fn check_at(identity: &str, now: u64, rate: Rate) -> rl::Check {
    rl::Check {
        identity: identity.to_owned(),
        now,
        rate,
        ban: BAN,
    }
}

/// The decisions the in-memory store makes for `checks`, one at a time.
fn one_by_one(memory: &MemoryStore, checks: &[rl::Check]) -> Vec<Decision> {
    checks
        .iter()
        .map(|c| memory.check(&c.identity, c.now, c.rate, c.ban))
        .collect()
}

/// How many of `decisions` admit their request.
fn allowed(decisions: &[Decision]) -> usize {
    decisions
        .iter()
        .filter(|d| d.verdict == Verdict::Allowed)
        .count()
}

/// Checks each of `identities` once more, at `now` and on, through Redis and in memory: the
/// two stores must still agree.
async fn agree_after(conn: &mut RedisConn, memory: &MemoryStore, identities: &[&str], now: u64) {
    for (i, identity) in identities.iter().enumerate() {
        let now = now + i as u64;
        assert_eq!(
            rl::check(conn, identity, now, FREE, BAN).await.unwrap(),
            memory.check(identity, now, FREE, BAN),
            "{identity}"
        );
    }
}

#[tokio::test]
async fn a_batch_decides_exactly_as_the_same_checks_one_by_one() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    let memory = MemoryStore::default();
    let t0 = 1_700_000_000_000u64;
    // Two identities interleaved in one batch, past the limit and into a ban for one of them.
    let checks: Vec<rl::Check> = (0..12)
        .map(|i| {
            let who = if i % 3 == 2 {
                "ip:10.0.0.2"
            } else {
                "ip:10.0.0.1"
            };
            check_at(who, t0 + i, FREE)
        })
        .collect();
    let batched = rl::check_many(&mut conn, &checks).await.unwrap();
    assert_eq!(batched, one_by_one(&memory, &checks));
    assert_eq!(
        allowed(&batched),
        9,
        "5 for the first identity, all 4 of the second"
    );
    assert!(batched.iter().any(|d| d.verdict == Verdict::Banned));
    // The batch's states and bans reached Redis: later calls still agree with memory.
    let identities = ["ip:10.0.0.1", "ip:10.0.0.2", "ip:10.0.0.2"];
    agree_after(&mut conn, &memory, &identities, t0 + 100).await;
}

#[tokio::test]
async fn a_batch_with_a_limit_change_half_way_decides_as_one_by_one() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    let memory = MemoryStore::default();
    let t0 = 1_700_000_000_000u64;
    let upgraded = Rate {
        requests: 20,
        period_ms: 60_000,
    };
    // One client's decisions in a batch switch limits (an upgrade arriving), then back.
    let checks: Vec<rl::Check> = (0..16)
        .map(|i| {
            let who = if i % 4 == 3 {
                "ip:10.0.0.4"
            } else {
                "ip:10.0.0.3"
            };
            check_at(
                who,
                t0 + i,
                if (6..12).contains(&i) { upgraded } else { FREE },
            )
        })
        .collect();
    let batched = rl::check_many(&mut conn, &checks).await.unwrap();
    assert_eq!(batched, one_by_one(&memory, &checks));
}

#[tokio::test]
async fn on_a_cluster_a_batch_of_many_clients_decides_as_one_by_one() {
    let cluster = redis_server::RedisCluster::start(3).await;
    let mut conn = cluster.conn().await;
    let memory = MemoryStore::default();
    let t0 = 1_700_000_000_000u64;
    // Forty clients, whose keys fall in slots all over the cluster, interleaved in one batch;
    // each makes eight requests, so each is refused and banned along the way.
    let checks: Vec<rl::Check> = (0..320)
        .map(|i| check_at(&format!("ip:10.1.0.{}", i % 40), t0 + i, FREE))
        .collect();
    let batched = rl::check_many(&mut conn, &checks).await.unwrap();
    assert_eq!(batched, one_by_one(&memory, &checks));
    assert_eq!(allowed(&batched), 40 * 5);
    let sizes = cluster.sizes().await;
    assert!(
        sizes.iter().all(|&n| n > 0),
        "every node holds some clients' state: {sizes:?}"
    );
    // Later single decisions, and a lifted ban, agree too.
    rl::lift_ban(&mut conn, "ip:10.1.0.7").await.unwrap();
    memory.lift_ban("ip:10.1.0.7");
    agree_after(
        &mut conn,
        &memory,
        &["ip:10.1.0.7", "ip:10.1.0.8"],
        t0 + 20_000,
    )
    .await;
}

#[tokio::test]
async fn time_zero_is_the_redis_servers_clock() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    let who = "ip:192.0.2.50";
    let verdicts: Vec<Verdict> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(
                rl::check(&mut conn, who, 0, FREE, BAN)
                    .await
                    .unwrap()
                    .verdict,
            );
        }
        v
    };
    assert_eq!(&verdicts[..5], &[Verdict::Allowed; 5]);
    assert_eq!(verdicts[5], Verdict::Limited);
    // The state is stamped in unix ms by the server's clock (this machine's, here).
    let [gcra, _, _] = rl::keys(who);
    let state: String = redis::cmd("GET")
        .arg(gcra)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tat: f64 = state.split(' ').next().unwrap().parse().unwrap();
    let now = data_plane::clock::unix_ms() as f64;
    assert!(
        tat > now && tat < now + 61_000.0,
        "tat {tat} against now {now}"
    );
}

#[tokio::test]
async fn ban_only_checks_agree_and_count_nothing() {
    let redis = RedisServer::start().await;
    let mut conn = redis.manager().await;
    // Ban checks in between count nothing: the burst of five still gets its five, and the ban
    // its refusals earn is reported to them.
    let mut steps: Vec<(u64, Rate)> = Vec::new();
    for i in 0..8 {
        steps.push((i, Rate::BAN_ONLY));
        steps.push((i, FREE));
    }
    steps.push((100, Rate::BAN_ONLY));
    let (m, r) = both(&mut conn, "ip:192.0.2.7", &steps).await;
    assert_eq!(m, r);
    let counted: Vec<Verdict> = m.iter().skip(1).step_by(2).map(|d| d.verdict).collect();
    assert_eq!(counted, FIVE_THEN_BANNED);
    assert_eq!(
        m.last().unwrap().verdict,
        Verdict::Banned,
        "the ban is seen"
    );
    assert!(
        m.iter()
            .step_by(2)
            .take(8)
            .all(|d| d.verdict == Verdict::Allowed),
        "no ban before it was earned"
    );
}
