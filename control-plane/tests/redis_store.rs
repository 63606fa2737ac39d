//! Control planes on Redis, each test with a redis-server of its own: shared durable state,
//! changes fanned out between control planes, key usage and bans read from the data planes'
//! rate-limit keys, races between control planes, and Redis going away.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use control_plane::ControlPlane;
use control_plane::keys::{hash_key, key_id};
use control_plane::redis_store::STATE_KEY;
use control_plane::store::Store;
use lb_proto::v1::*;
use redis::AsyncCommands;
use tonic::Code;

/// Writes a GCRA record as a data plane would.
async fn write_gcra(conn: &mut redis::aio::MultiplexedConnection, id: &str, tat: u64, t: u64) {
    let _: () = conn
        .set(format!("lb:rl:{{key:{id}}}:gcra"), format!("{tat} {t}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn usage_follows_the_gcra_state_data_planes_write() {
    let redis = RedisServer::start().await;
    let cp = Cp::start_redis(snapshot_with(&[]), &redis.url()).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let mut conn = redis.conn().await;
    let k = admin
        .create_api_key(CreateApiKeyRequest::default())
        .await
        .answer();

    // No state: the whole limit.
    let u = admin.get_key_usage(by_id(&k.key_id)).await.answer();
    assert_eq!((u.tier.as_str(), u.limit, u.period_ms), ("free", 5, 60_000));
    assert_eq!((u.remaining, u.reset_ms), (5, 0));

    // Free is 5 per 60 s, T = 12 s. 36 s used leaves two whole intervals, and goes on doing so
    // for as long as less than 12 s pass between writing and reading.
    let now = now_ms();
    write_gcra(&mut conn, &k.key_id, now + 36_000, 12_000).await;
    let u = admin.get_key_usage(by_id(&k.key_id)).await.answer();
    assert_eq!(u.remaining, 2);
    assert!(u.reset_ms <= 36_000 && u.reset_ms > 24_000, "{u:?}");

    // Three requests made at basic (T = 3 s) are 9 s; counted at free they are 36 s.
    write_gcra(&mut conn, &k.key_id, now + 9_000, 3_000).await;
    let u = admin.get_key_usage(by_key(&k.api_key)).await.answer();
    assert_eq!(u.remaining, 2);
    assert!(u.reset_ms <= 36_000 && u.reset_ms > 24_000, "{u:?}");

    // The same state seen after an upgrade to premium (T = 0.6 s): 9 s become 1.8 s.
    admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_id(&k.key_id)),
            tier: "premium".into(),
        })
        .await
        .unwrap();
    let u = admin.get_key_usage(by_id(&k.key_id)).await.answer();
    assert_eq!((u.tier.as_str(), u.limit), ("premium", 100));
    assert!((97..=100).contains(&u.remaining), "{u:?}");
    assert!(u.reset_ms <= 1_800, "{u:?}");

    // A tat in the past is the whole limit again.
    write_gcra(&mut conn, &k.key_id, now - 1_000, 600).await;
    let u = admin.get_key_usage(by_id(&k.key_id)).await.answer();
    assert_eq!((u.remaining, u.reset_ms), (100, 0));

    // REST reads the same state, for any key string.
    let id = key_id(&hash_key("my_key"));
    write_gcra(&mut conn, &id, now_ms() + 60_000, 12_000).await;
    let u = get(&http_client(), &cp.http_url("/usage?api_key=my_key"))
        .await
        .json();
    assert_eq!(
        (u["api_key_id"].as_str(), u["remaining"].as_u64()),
        (Some(id.as_str()), Some(0))
    );

    // A value that does not decode is an error naming the key.
    let key = format!("lb:rl:{{key:{}}}:gcra", k.key_id);
    let _: () = conn.set(&key, "soon 12").await.unwrap();
    let e = admin.get_key_usage(by_id(&k.key_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().contains(&key) && e.message().contains("GCRA state"),
        "{}",
        e.message()
    );
    let _: () = conn.del(&key).await.unwrap();
    let _: () = conn.hset(&key, "tat", "1").await.unwrap();
    let e = admin.get_key_usage(by_id(&k.key_id)).await.unwrap_err();
    assert!(e.message().contains(&key), "{}", e.message());
}

#[tokio::test]
async fn bans_in_redis_are_listed_and_lifted() {
    let redis = RedisServer::start().await;
    let cp = Cp::start_redis(snapshot_with(&[]), &redis.url()).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let mut conn = redis.conn().await;
    let now = now_ms();
    for (client, until, count) in [
        ("ip:10.1.2.3", now + 300_000, 2u32),
        ("key:0123456789abcdef", now + 600_000, 1),
        ("ip:10.9.9.9", now - 1_000, 4),
    ] {
        let ban = format!("lb:rl:{{{client}}}:ban");
        let _: () = conn.set(&ban, format!("{until} {count}")).await.unwrap();
        let _: () = conn.expire(&ban, 900).await.unwrap();
        let _: () = conn
            .set_ex(format!("lb:rl:{{{client}}}:strikes"), 3, 900)
            .await
            .unwrap();
    }
    // Not a ban key, though close.
    let _: () = conn.set("lb:rl:{ip:10.1.2.3}:gcra", 1).await.unwrap();

    let bans = admin.list_bans(ListBansRequest {}).await.answer().bans;
    assert_eq!(
        bans,
        vec![
            BanInfo {
                client: "ip:10.1.2.3".into(),
                until_ms: now + 300_000,
                count: 2,
                node_id: String::new(),
            },
            BanInfo {
                client: "key:0123456789abcdef".into(),
                until_ms: now + 600_000,
                count: 1,
                node_id: String::new(),
            },
        ],
        "the expired ban is left out"
    );

    let v = admin
        .lift_ban(LiftBanRequest {
            client: "ip:10.1.2.3".into(),
        })
        .await
        .new_version();
    let exists: u32 = conn
        .exists(&["lb:rl:{ip:10.1.2.3}:ban", "lb:rl:{ip:10.1.2.3}:strikes"])
        .await
        .unwrap();
    assert_eq!(exists, 0, "ban and strikes deleted");
    let kept: u32 = conn.exists("lb:rl:{ip:10.1.2.3}:gcra").await.unwrap();
    assert_eq!(kept, 1, "the rate-limit state itself is not a ban");
    let snapshot = cp.cp.snapshot();
    assert_eq!(snapshot.version, v);
    assert!(matches!(
        &snapshot.directives.last().unwrap().kind,
        Some(directive::Kind::LiftBan(BanLift { client })) if client == "ip:10.1.2.3"
    ));
    let bans = admin.list_bans(ListBansRequest {}).await.answer().bans;
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].client, "key:0123456789abcdef");

    let _: () = conn
        .set("lb:rl:{ip:10.5.5.5}:ban", "tomorrow 1")
        .await
        .unwrap();
    let e = admin.list_bans(ListBansRequest {}).await.unwrap_err();
    assert!(
        e.message().contains("lb:rl:{ip:10.5.5.5}:ban"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn a_change_on_one_control_plane_reaches_the_data_planes_of_another() {
    let redis = RedisServer::start().await;
    let (_mock, a, b, dp) = two_control_planes(&redis.url(), &redis.url()).await;
    changes_flow_between(&a, &b, &dp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_control_plane_on_redis_adds_up_the_whole_fleet() {
    let redis = RedisServer::start().await;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let a = Cp::start_redis(snapshot_with(&mock.addrs()), &redis.url()).await;
    let b = Cp::start_redis(snapshot_with(&[]), &redis.url()).await;
    let dp_a = Dp::join(&a.url(), "dp-a").await;
    let dp_b = Dp::join(&b.url(), "dp-b").await;
    dp_a.wait_version(1).await;
    dp_b.wait_version(1).await;

    let client = http_client();
    for _ in 0..5 {
        assert_eq!(get(&client, &dp_a.url("/api/data")).await.status, 200);
    }
    for _ in 0..7 {
        assert_eq!(get(&client, &dp_b.url("/api/data")).await.status, 200);
    }
    // Each control plane hears its own data plane directly and the other's through Redis.
    for cp in [&a, &b] {
        let stats = stats_until(
            &client,
            &cp.http_url("/stats"),
            "12 requests added up",
            |s| s["totals"]["requests"].as_u64() >= Some(12),
        )
        .await;
        assert_eq!(
            stats["totals"]["requests"], 12,
            "requests through both data planes, on {}",
            cp.http
        );
        assert_eq!(cp.cp.traffic.live(now_ms()), 2, "both data planes are live");
    }
}

#[tokio::test]
async fn the_loser_of_a_race_is_refused_and_catches_up() {
    let redis = RedisServer::start().await;
    let store = redis_store(&redis.url()).await;
    // Two control planes on one store, neither following the other: B is stale after A's change.
    let a = ControlPlane::new(store.clone(), snapshot_with(&[]), TOKEN.into(), None)
        .await
        .unwrap();
    let b = ControlPlane::new(
        store.clone(),
        lb_proto::defaults::snapshot(),
        TOKEN.into(),
        None,
    )
    .await
    .unwrap();
    assert_eq!((a.version(), b.version()), (1, 1));
    let set = |s: &'static str| {
        move |c: &mut ConfigSnapshot| {
            c.strategy = s.into();
            Ok::<(), control_plane::cluster::UpdateError>(())
        }
    };
    assert_eq!(a.update(set("ip_hash")).await.unwrap(), 2);
    let e = b.update(set("adaptive")).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status.message().contains("lost the race"),
        "{}",
        status.message()
    );
    // B loaded the winner's state; retrying applies on top of it.
    assert_eq!(
        (b.version(), b.snapshot().strategy.as_str()),
        (2, "ip_hash")
    );
    assert_eq!(b.update(set("adaptive")).await.unwrap(), 3);
    let stored = store.load().await.unwrap().unwrap().config.unwrap();
    assert_eq!((stored.version, stored.strategy.as_str()), (3, "adaptive"));
    assert!(
        b.adopt(StoredState {
            config: Some(ConfigSnapshot {
                version: 2,
                ..stored.clone()
            }),
            keys: Vec::new(),
        })
        .await
        .is_ok_and(|newer| !newer),
        "an older state is not adopted"
    );
}

#[tokio::test]
async fn a_control_plane_restarted_on_redis_keeps_its_keys_and_config() {
    let redis = RedisServer::start().await;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let cp = Cp::start_redis(snapshot_with(&mock.addrs()), &redis.url()).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    admin.set_strategy(strategy("ip_hash")).await.unwrap();
    let k = admin
        .create_api_key(new_key("enterprise", "kept"))
        .await
        .answer();
    admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(by_key("legacy")),
            tier: "basic".into(),
        })
        .await
        .unwrap();
    let version = cp.cp.version();
    let before = cp.cp.snapshot();
    cp.stop().await;

    let cp = Cp::start_redis(lb_proto::defaults::snapshot(), &redis.url()).await;
    assert_eq!(cp.cp.version(), version);
    let after = cp.cp.snapshot();
    assert_eq!(after.strategy, "ip_hash");
    assert_eq!(after.backends, before.backends);
    assert_eq!(after.keys, before.keys);
    let mut admin = cp.admin(Some(TOKEN)).await;
    let keys = admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys;
    assert_eq!(keys.len(), 2);
    let kept = keys.iter().find(|i| i.key_id == k.key_id).unwrap();
    assert_eq!(
        (kept.tier.as_str(), kept.label.as_str()),
        ("enterprise", "kept")
    );
    let u = admin.get_key_usage(by_key(&k.api_key)).await.answer();
    assert_eq!(u.limit, 1000);
}

#[tokio::test]
async fn with_redis_gone_admin_calls_fail_naming_it_and_traffic_goes_on() {
    let mut redis = RedisServer::start().await;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let cp = Cp::start_redis(snapshot_with(&mock.addrs()), &redis.url()).await;
    let dp = Dp::join(&cp.url(), "steady").await;
    dp.wait_version(1).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let k = admin
        .create_api_key(CreateApiKeyRequest::default())
        .await
        .answer();
    redis.kill();

    let client = http_client();
    for _ in 0..4 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
    let e = admin.set_strategy(strategy("ip_hash")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("Redis"), "{}", e.message());
    let e = admin
        .create_api_key(CreateApiKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let e = admin.get_key_usage(by_id(&k.key_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("Redis"), "{}", e.message());
    let e = admin.list_bans(ListBansRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(
        cp.cp.snapshot().strategy,
        "round_robin",
        "nothing half-applied"
    );

    // What needs no Redis still answers.
    let config = admin.get_config(GetConfigRequest {}).await.answer();
    assert_eq!(config.version, 2);
    let keys = admin
        .list_api_keys(ListApiKeysRequest {})
        .await
        .answer()
        .keys;
    assert_eq!(keys.len(), 1);
    send(
        &client,
        request(
            http::Method::POST,
            &cp.http_url("/admin/block_key"),
            Some(TOKEN),
            &format!(r#"{{"api_key_id":"{}"}}"#, k.key_id),
        ),
    )
    .await
    .assert_error(503, "Redis");
    assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
}

#[tokio::test]
async fn stored_state_that_does_not_decode_is_an_error_naming_the_key() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let start = || async {
        let store = redis_store(&redis.url()).await;
        ControlPlane::new(store, snapshot_with(&[]), TOKEN.into(), None)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let _: () = conn.set(STATE_KEY, "not a hash").await.unwrap();
    let e = start().await;
    assert!(e.contains(STATE_KEY), "{e}");
    let _: () = conn.del(STATE_KEY).await.unwrap();
    let _: () = conn
        .hset_multiple(STATE_KEY, &[("version", "3"), ("state", "\u{ff}garbage")])
        .await
        .unwrap();
    let e = start().await;
    assert!(
        e.contains(STATE_KEY) && e.contains("does not decode"),
        "{e}"
    );
    // A good state whose version field disagrees.
    let good = StoredState {
        config: Some(ConfigSnapshot {
            version: 5,
            ..snapshot_with(&[])
        }),
        keys: Vec::new(),
    };
    let _: () = conn
        .hset_multiple(
            STATE_KEY,
            &[
                ("version", b"4".to_vec()),
                ("state", prost::Message::encode_to_vec(&good)),
            ],
        )
        .await
        .unwrap();
    let e = start().await;
    assert!(e.contains(STATE_KEY) && e.contains("version"), "{e}");
    let _: () = conn.hset(STATE_KEY, "version", 5).await.unwrap();
    let store = redis_store(&redis.url()).await;
    let cp = ControlPlane::new(store, lb_proto::defaults::snapshot(), TOKEN.into(), None)
        .await
        .map(Arc::new)
        .unwrap();
    assert_eq!(cp.version(), 5);
}

#[tokio::test]
async fn a_redis_restarted_empty_gets_the_state_back_and_changes_flow_again() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let cp = Cp::start_redis(snapshot_with(&mock.addrs()), &redis.url()).await;
    let dp = Dp::join(&cp.url(), "patient").await;
    dp.wait_version(1).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let k = admin.create_api_key(new_key("premium", "")).await.answer();
    redis.kill();
    // No persistence: the new server starts empty, and the control plane saves its state again
    // once it has resubscribed.
    let redis = RedisServer::start_on(port).await;
    let store = redis_store(&redis.url()).await;
    let saved = poll_within(
        Duration::from_secs(15),
        "the state to be saved again",
        || async {
            match store.load().await {
                Ok(Some(s)) => Ok(s),
                other => Err(other),
            }
        },
    )
    .await;
    assert_eq!(saved.config.unwrap().version, 2);
    assert_eq!(saved.keys.len(), 1);
    assert_eq!(saved.keys[0].key_id, k.key_id);
    let v = admin.set_strategy(strategy("ip_hash")).await.new_version();
    assert_eq!(v, 3);
    cp.wait_acked(&["patient"], v).await;
}
