//! Control and data planes on a Redis Cluster of three primaries the test forms itself
//! (`redis+cluster://` URLs): exact limits across data planes with clients' state spread over
//! every node, changes fanned out between control planes subscribed on different nodes, state
//! kept across a restart, and bans listed from every node.

mod common;
#[path = "../../data-plane/tests/support/pki.rs"]
mod pki;

use common::redis_server::RedisCluster;
use common::*;
use data_plane::ratelimit::gcra::{BanRule, Rate, Verdict};
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

async fn burst(dps: &[Dp], n: usize, key: Option<&str>, path: &str) -> Vec<u16> {
    let client = http_client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let url = dps[i % dps.len()].url(path);
            let key = key.map(str::to_owned);
            tokio::spawn(async move {
                let mut b = http::Request::get(url);
                if let Some(k) = key {
                    b = b.header("x-api-key", k);
                }
                send(&client, b.body(Full::default()).unwrap()).await.status
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn admitted(statuses: &[u16]) -> usize {
    statuses.iter().filter(|&&s| s == 200).count()
}

/// Mock backends, a control plane and `n` data planes, all on `cluster`, with a per-IP limit of
/// `ip_limit` per 60 s.
async fn fleet(
    cluster: &RedisCluster,
    n: usize,
    ip_limit: u64,
) -> (mock_backends::MockBackends, Cp, Vec<Dp>) {
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
        .await
        .unwrap();
    let mut snapshot = snapshot_with(&mock.addrs());
    snapshot.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
        requests: ip_limit,
        period_ms: 60_000,
    });
    let cp = Cp::start_redis(snapshot, &cluster.url()).await;
    let mut dps = Vec::new();
    for i in 0..n {
        let url = cluster.url();
        let dp = Dp::start_with(&cp.url(), &format!("dp-{i}"), move |s| s.redis = Some(url)).await;
        dp.wait_version(1).await;
        dps.push(dp);
    }
    (mock, cp, dps)
}

#[tokio::test]
async fn three_data_planes_on_a_cluster_admit_exactly_the_limit() {
    let cluster = RedisCluster::start(3).await;
    let (_mock, _cp, dps) = fleet(&cluster, 3, 100).await;

    let replies = burst(&dps, 300, Some("free-key-on-a-cluster"), "/data").await;
    assert_eq!(admitted(&replies), 5);
    assert!(replies.iter().all(|&s| s == 200 || s == 429), "{replies:?}");
    assert_eq!(admitted(&burst(&dps, 300, None, "/data").await), 100);
    for dp in &dps {
        assert!(
            !dp.shared.limiter.is_degraded(),
            "decided through the cluster"
        );
    }

    // One script call per limited request, over the whole cluster.
    let before = cluster.calls("evalsha").await + cluster.calls("eval").await;
    let client = http_client();
    for i in 0..30 {
        let key = format!("another-key-{i}");
        let r = send(
            &client,
            http::Request::get(dps[i % 3].url("/data"))
                .header("x-api-key", key)
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let after = cluster.calls("evalsha").await + cluster.calls("eval").await;
    assert_eq!(after - before, 30, "one round trip per request");
}

#[tokio::test]
async fn a_cluster_node_dying_fails_nothing_and_shared_limits_come_back() {
    let mut cluster = RedisCluster::start(3).await;
    let (_mock, _cp, dps) = fleet(&cluster, 1, 1_000_000).await;
    let dp = &dps[0];
    let client = http_client();
    let stats = |client: &HttpClient| {
        let (client, url) = (client.clone(), format!("http://{}/stats", dp.admin));
        async move { get(&client, &url).await.json()["rate_limit_store"].clone() }
    };
    for _ in 0..10 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
    assert_eq!(stats(&client).await, "shared");

    // The node holding this client's limits goes.
    let holder = cluster.node_of("lb:rl:{ip:127.0.0.1}:gcra").await;
    cluster.kill(holder);
    for _ in 0..40 {
        let r = get(&client, &dp.url("/data")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(stats(&client).await, "degraded");

    cluster.restart(holder).await;
    let mut shared_again = false;
    for _ in 0..200 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
        if stats(&client).await == "shared" {
            shared_again = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(shared_again, "back to shared enforcement");
}

#[tokio::test]
async fn control_planes_on_a_cluster_share_changes_and_keep_them_across_a_restart() {
    let cluster = RedisCluster::start(3).await;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let a = Cp::start_redis(
        snapshot_with(&mock.addrs()),
        &url_from(&cluster, &[0, 1, 2]),
    )
    .await;
    let b = Cp::start_redis(snapshot_with(&[]), &url_from(&cluster, &[2, 1, 0])).await;
    assert_eq!(b.cp.snapshot().backends.len(), 2, "B loaded A's state");
    let dp = Dp::start(&b.url(), "dp-b").await;
    dp.wait_version(1).await;

    let mut admin_a = a.admin(Some(TOKEN)).await;
    let v = admin_a
        .set_strategy(SetStrategyRequest {
            strategy: "least_connections".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    b.wait_acked(&["dp-b"], v).await;
    assert_eq!(
        dp.shared.active().unwrap().snapshot.strategy,
        "least_connections"
    );

    let k = admin_a
        .create_api_key(CreateApiKeyRequest {
            tier: "premium".into(),
            label: "on the cluster".into(),
        })
        .await
        .unwrap()
        .into_inner();
    b.wait_version(v + 1).await;
    let mut admin_b = b.admin(Some(TOKEN)).await;
    let v = admin_b
        .block_key(KeyRef {
            key: Some(key_ref::Key::KeyId(k.key_id.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    a.wait_version(v).await;
    assert!(a.cp.snapshot().keys[0].blocked);
    dp.wait_version(v).await;

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
    let free = Rate {
        requests: 5,
        period_ms: 60_000,
    };
    let ban = BanRule {
        strikes: 3,
        strike_window_ms: 60_000,
        base_ban_ms: 300_000,
        multiplier: 2,
        max_ban_ms: 86_400_000,
        strike_decay_ms: 3_600_000,
    };
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

    let listed = admin
        .list_bans(ListBansRequest {})
        .await
        .unwrap()
        .into_inner()
        .bans;
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
    let listed = admin
        .list_bans(ListBansRequest {})
        .await
        .unwrap()
        .into_inner()
        .bans;
    assert_eq!(listed.len(), 29);
    assert!(listed.iter().all(|b| b.client != "ip:10.3.0.17"));
    let d = rl::check(&mut conn, "ip:10.3.0.17", now + 20_000, free, ban)
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allowed, "{d:?}");
}

#[tokio::test]
async fn both_planes_work_on_a_cluster_over_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = pki::Ca::new("redis cluster CA");
    let leaf = ca.peer_leaf(&["127.0.0.1"]);
    let dir = pki::Dir::new("redis-cluster-tls");
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
    let dp = Dp::start_with(&cp.url(), "dp-tls-cluster", move |s| {
        s.redis = Some(url);
        s.redis_ca = Some(ca_path);
    })
    .await;
    dp.wait_version(1).await;
    let replies = burst(
        std::slice::from_ref(&dp),
        30,
        Some("tls-cluster-key"),
        "/data",
    )
    .await;
    assert_eq!(admitted(&replies), 5);
    assert!(
        !dp.shared.limiter.is_degraded(),
        "decided through the cluster"
    );
}
