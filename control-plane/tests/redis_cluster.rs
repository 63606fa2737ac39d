//! Control and data planes on a Redis Cluster of three primaries the test forms itself
//! (`redis+cluster://` URLs): exact limits across data planes with clients' state spread over
//! every node, changes fanned out between control planes subscribed on different nodes, state
//! kept across a restart, and bans listed from every node.

mod common;
#[path = "../../data-plane/tests/support/pki.rs"]
mod pki;

use common::redis_server::{BAN, FREE, RedisCluster};
use common::*;
use data_plane::ratelimit::gcra::Verdict;
use data_plane::ratelimit::redis as rl;
use http_body_util::Full;
use lb_proto::v1::*;

/// The cluster's URL naming its nodes in the order given, so that each control plane follows
/// changes on a different node.
fn url_from(cluster: &RedisCluster, order: &[usize]) -> String {
    let hosts: Vec<String> = order
        .iter()
        .map(|&i| format!("127.0.0.1:{}", cluster.nodes[i].port))
        .collect();
    format!("redis+cluster://{}", hosts.join(","))
}

/// Mock backends, a control plane and `n` data planes, all on `cluster`, with a per-IP limit of
/// `ip_limit` per 60 s.
async fn fleet(cluster: &RedisCluster, n: usize, ip_limit: u64) -> Stack {
    Stack::on_redis(n, &cluster.url(), OnRedis::State, |s| {
        s.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
            requests: ip_limit,
            period_ms: 60_000,
        });
    })
    .await
}

/// The statuses of `n` concurrent GETs of `/data` spread over `dps`, with the API key when given.
async fn statuses(dps: &[Dp], n: usize, key: Option<&str>) -> Vec<u16> {
    let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
    let replies = burst(&urls(dps, "/data"), n, &headers).await;
    replies.iter().map(|r| r.status).collect()
}

fn ok(statuses: &[u16]) -> usize {
    statuses.iter().filter(|&&s| s == 200).count()
}

#[tokio::test]
async fn three_data_planes_on_a_cluster_admit_exactly_the_limit() {
    let cluster = RedisCluster::start(3).await;
    let created = "free-key-on-a-cluster";
    let stack = Stack::on_redis(3, &cluster.url(), OnRedis::State, |s| {
        s.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
            requests: 100,
            period_ms: 60_000,
        });
        s.keys.push(KeyOverride {
            key_hash: data_plane::ratelimit::identity::hash_key(created.as_bytes()),
            tier: String::new(),
            blocked: false,
        });
    })
    .await;
    let dps = &stack.dps;

    // One script call per identity a request counts against, the calls of a request sent
    // together: a keyless request makes one; a keyed one two, since on a cluster its key's
    // slot and its address's differ. A node that has not seen the script yet answers NOSCRIPT
    // and is sent it, so every node is shown it first, by ten keys whose slots cover them.
    let client = http_client();
    let keyed = |i: usize, key: String| {
        http::Request::get(dps[i % 3].url("/data"))
            .header("x-api-key", key)
            .body(Full::default())
            .unwrap()
    };
    for i in 0..10 {
        let r = send(&client, keyed(i, format!("warm-key-{i}"))).await;
        assert_eq!(r.status, 200);
    }
    let calls = || async { cluster.calls("evalsha").await };
    let before = calls().await;
    for i in 0..30 {
        assert_eq!(get(&client, &dps[i % 3].url("/data")).await.status, 200);
    }
    assert_eq!(calls().await - before, 30, "one call per keyless request");
    let before = calls().await;
    for i in 0..10 {
        let r = send(&client, keyed(i, format!("another-key-{i}"))).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(calls().await - before, 20, "two calls per keyed request");

    // Exact limits across the three data planes: the created key's five, exempt from the
    // address's limit, and what the fifty requests above left of the address's hundred.
    let replies = statuses(dps, 300, Some(created)).await;
    assert_eq!(ok(&replies), 5);
    assert!(replies.iter().all(|&s| s == 200 || s == 429), "{replies:?}");
    assert_eq!(ok(&statuses(dps, 300, None).await), 50);
    for dp in dps {
        assert!(
            !dp.shared.limiter.is_degraded(),
            "decided through the cluster"
        );
    }
}

#[tokio::test]
async fn a_cluster_node_dying_fails_nothing_and_shared_limits_come_back() {
    let mut cluster = RedisCluster::start(3).await;
    let stack = fleet(&cluster, 1, 1_000_000).await;
    let dps = &stack.dps;
    let dp = &dps[0];
    let client = http_client();
    for _ in 0..10 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
    assert_eq!(dp.stats().await["rate_limit_store"], "shared");

    // The node holding this client's limits goes.
    let holder = cluster.node_of("lb:rl:{ip:127.0.0.1}:gcra").await;
    cluster.kill(holder);
    for _ in 0..40 {
        let r = get(&client, &dp.url("/data")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(dp.stats().await["rate_limit_store"], "degraded");

    cluster.restart(holder).await;
    dp.wait_limits_shared().await;
}

#[tokio::test]
async fn control_planes_on_a_cluster_share_changes_and_keep_them_across_a_restart() {
    let cluster = RedisCluster::start(3).await;
    // Each control plane follows changes on a different node.
    let (a_url, b_url) = (
        url_from(&cluster, &[0, 1, 2]),
        url_from(&cluster, &[2, 1, 0]),
    );
    let (_mock, a, b, dp) = two_control_planes(&a_url, &b_url).await;
    let v = changes_flow_between(&a, &b, &dp).await;

    // A restarted control plane finds everything on the cluster.
    let before = a.cp.snapshot();
    a.stop().await;
    let c = Cp::start_redis(lb_proto::defaults::snapshot(), &url_from(&cluster, &[1])).await;
    assert_eq!(c.cp.version(), v);
    let after = c.cp.snapshot();
    assert_eq!(after.strategy, "least_connections");
    assert_eq!(after.backends, before.backends);
    assert_eq!(after.keys, before.keys);
}

#[tokio::test]
async fn bans_on_every_node_of_a_cluster_are_listed_and_lifted() {
    let cluster = RedisCluster::start(3).await;
    let cp = Cp::start_redis(snapshot_with(&[]), &cluster.url()).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let mut conn = cluster.conn().await;
    // Thirty clients, each over its limit until banned, in one batch as a data plane sends it.
    let (free, ban) = (FREE, BAN);
    let now = now_ms();
    let checks: Vec<rl::Check> = (0..30 * 8)
        .map(|i| rl::Check {
            identity: format!("ip:10.3.0.{}", i % 30),
            now: now + i,
            rate: free,
            ban,
        })
        .collect();
    let decided = rl::check_many(&mut conn, &checks).await.unwrap();
    assert_eq!(
        decided
            .iter()
            .filter(|d| d.verdict == Verdict::Banned)
            .count(),
        30
    );
    let sizes = cluster.sizes().await;
    assert!(sizes.iter().all(|&n| n > 0), "spread: {sizes:?}");

    let listed = admin.list_bans(ListBansRequest {}).await.answer().bans;
    let mut clients: Vec<String> = listed.iter().map(|b| b.client.clone()).collect();
    clients.sort();
    let mut expected: Vec<String> = (0..30).map(|i| format!("ip:10.3.0.{i}")).collect();
    expected.sort();
    assert_eq!(clients, expected, "every node's bans");
    assert!(listed.iter().all(|b| b.until_ms > now && b.count == 1));

    admin
        .lift_ban(LiftBanRequest {
            client: "ip:10.3.0.17".into(),
        })
        .await
        .unwrap();
    let listed = admin.list_bans(ListBansRequest {}).await.answer().bans;
    assert_eq!(listed.len(), 29);
    assert!(listed.iter().all(|b| b.client != "ip:10.3.0.17"));
    let d = rl::check(&mut conn, "ip:10.3.0.17", now + 20_000, free, ban)
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allowed, "{d:?}");
}

#[tokio::test]
async fn both_planes_work_on_a_cluster_over_tls() {
    pki::install_provider();
    let ca = pki::Ca::new("redis cluster CA");
    let leaf = ca.peer_leaf(&["127.0.0.1"]);
    let dir = pki::TempDir::new("redis-cluster-tls");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let files = dir.install(&leaf);
    let cluster = RedisCluster::start_tls(3, &files.cert, &files.key, &ca_file).await;
    assert!(cluster.url().starts_with("rediss+cluster://"));
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let store = std::sync::Arc::new(
        control_plane::redis_store::RedisStore::open_with_ca(
            &cluster.url(),
            Some(ca.pem.as_bytes()),
            REDIS_CALL_TIMEOUT,
        )
        .await
        .unwrap(),
    );
    let cp = control_plane::redis_store::control_plane(
        store,
        snapshot_with(&mock.addrs()),
        TOKEN.into(),
        None,
    )
    .await
    .unwrap();
    let cp = Cp::serve(cp).await;
    let stored: bool = redis::cmd("EXISTS")
        .arg(control_plane::redis_store::STATE_KEY)
        .query_async(&mut cluster.conn().await)
        .await
        .unwrap();
    assert!(stored, "the state was saved on the cluster");

    let (url, ca_path) = (cluster.url(), ca_file.clone());
    let dp = Dp::join_with(&cp.url(), "dp-tls-cluster", move |s| {
        s.redis = Some(url);
        s.redis_ca = Some(ca_path);
    })
    .await;
    dp.wait_version(1).await;
    let replies = statuses(std::slice::from_ref(&dp), 30, Some("tls-cluster-key")).await;
    assert_eq!(ok(&replies), 5);
    assert!(
        !dp.shared.limiter.is_degraded(),
        "decided through the cluster"
    );
}
