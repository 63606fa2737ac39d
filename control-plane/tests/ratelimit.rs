//! Rate limits across data planes, end to end, through a real Redis the test starts.

mod common;

use bytes::Bytes;
use common::redis_server::RedisServer;
use common::*;
use http_body_util::Full;
use lb_proto::v1::*;

/// Three data planes on one Redis; `tweak` adjusts the snapshot.
async fn fleet(redis: &RedisServer, tweak: impl FnOnce(&mut ConfigSnapshot)) -> Stack {
    Stack::on_redis(3, &redis.url(), OnRedis::Traffic, tweak).await
}

fn ip_limit(requests: u64) -> impl FnOnce(&mut ConfigSnapshot) {
    move |s| {
        s.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
            requests,
            period_ms: 60_000,
        })
    }
}

fn hash(key: &str) -> String {
    data_plane::ratelimit::identity::hash_key(key.as_bytes())
}

/// `n` concurrent GETs of `/data` spread over the data planes, with the API key when given.
async fn burst_of(dps: &[Dp], n: usize, key: Option<&str>) -> Vec<Reply> {
    let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
    burst(&urls(dps, "/data"), n, &headers).await
}

#[tokio::test]
async fn a_free_key_gets_exactly_five_across_three_data_planes() {
    let redis = RedisServer::start().await;
    let stack = fleet(&redis, |_| {}).await;
    let dps = &stack.dps;
    let replies = burst_of(dps, 300, Some("free-key-1")).await;
    assert_eq!(admitted(&replies), 5);
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 429);
        assert!(r.headers.contains_key("retry-after"));
        let body = r.json();
        assert!(
            body["error"] == "rate_limited" || body["error"] == "banned",
            "{body}"
        );
        assert_eq!(r.headers["x-ratelimit-limit"], "5");
        assert_eq!(r.headers["x-ratelimit-remaining"], "0");
        assert!(
            r.headers["ratelimit-policy"]
                .to_str()
                .unwrap()
                .contains("q=5;w=60")
        );
    }
    let ok = replies.iter().find(|r| r.status == 200).unwrap();
    assert!(
        ok.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"free\";r=")
    );
}

#[tokio::test]
async fn the_ip_limit_and_a_premium_key_are_exact_too() {
    let redis = RedisServer::start().await;
    let premium = "premium-key-1";
    let stack = fleet(&redis, |s| {
        ip_limit(100)(s);
        s.keys.push(KeyOverride {
            key_hash: hash(premium),
            tier: "premium".into(),
            blocked: false,
        });
    })
    .await;
    let dps = &stack.dps;
    // The created key first: it answers for its own traffic, exempt from the address's limit,
    // which is whole afterwards. (The other way round, the address's refusals would ban it,
    // and its ban holds whatever key a request carries.)
    assert_eq!(admitted(&burst_of(dps, 300, Some(premium)).await), 100);
    assert_eq!(admitted(&burst_of(dps, 300, None).await), 100);
}

#[tokio::test]
async fn one_redis_round_trip_per_limited_request() {
    let redis = RedisServer::start().await;
    let stack = fleet(&redis, ip_limit(1000)).await;
    let dps = &stack.dps;
    let client = http_client();
    // Warm up each data plane's connection (and script cache) first.
    for dp in dps {
        get(&client, &dp.url("/data")).await;
    }
    let before = script_calls(&redis).await;
    for i in 0..60 {
        assert_eq!(get(&client, &dps[i % 3].url("/data")).await.status, 200);
    }
    // Commands a script runs are counted too (hmget, hset, ...), so count the calls a client
    // makes: one script call per request, never a second one (no load, no retry).
    assert_eq!(
        script_calls(&redis).await - before,
        60,
        "one round trip per request"
    );
}

async fn script_calls(redis: &RedisServer) -> u64 {
    redis.calls("evalsha").await + redis.calls("eval").await + redis.calls("script|load").await
}

#[tokio::test]
async fn blocked_bad_and_unknown_keys_get_clear_answers() {
    let redis = RedisServer::start().await;
    let stack = fleet(&redis, |s| {
        s.keys.push(KeyOverride {
            key_hash: hash("blocked-key"),
            tier: String::new(),
            blocked: true,
        });
    })
    .await;
    let dps = &stack.dps;
    let client = http_client();
    let with_key = |k: &str| {
        http::Request::get(dps[0].url("/data"))
            .header("x-api-key", k)
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    assert_eq!(send(&client, with_key("blocked-key")).await.status, 403);
    let long = "k".repeat(10_000);
    let r = send(&client, with_key(&long)).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_api_key"))
    );
    let r = get(&client, &dps[0].url("/data?api_key=a%00b")).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_does_not_reset_the_ip_limit() {
    let redis = RedisServer::start().await;
    let stack = fleet(&redis, ip_limit(3)).await;
    let dps = &stack.dps;
    let client = http_client();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let req = http::Request::get(dps[0].url("/data"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        statuses.push(send(&client, req).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
}

#[tokio::test]
async fn redis_dying_mid_load_fails_nothing_and_shared_limits_come_back() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let stack = fleet(&redis, ip_limit(1_000_000)).await;
    let dps = &stack.dps;
    let client = http_client();
    for i in 0..30 {
        assert_eq!(get(&client, &dps[i % 3].url("/data")).await.status, 200);
    }
    redis.kill();
    for i in 0..60 {
        let r = get(&client, &dps[i % 3].url("/data")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    for dp in dps {
        assert_eq!(dp.stats().await["rate_limit_store"], "degraded");
        let ready = get(&client, &format!("http://{}/readyz", dp.admin)).await;
        assert_eq!(ready.json()["rate_limit_store"], "degraded");
    }
    let metrics = get(&client, &format!("http://{}/metrics", dps[0].admin)).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("lb_ratelimit_store_degraded 1"));

    // Limits still hold per data plane meanwhile: a free key gets five on each.
    let replies = burst_of(&dps[..1], 20, Some("degraded-key")).await;
    assert_eq!(admitted(&replies), 5);

    let redis = RedisServer::start_on(port).await;
    dps[0].wait_limits_shared().await;
    drop(redis);
}

#[tokio::test]
async fn a_key_upgraded_while_limited_is_admitted_at_once_everywhere() {
    let redis = RedisServer::start().await;
    let stack = fleet(&redis, |_| {}).await;
    let (cp, dps) = (&stack.cp, &stack.dps);
    let key = "upgrade-me";
    // Limited, but not yet banned (fewer refusals than the ban policy's strikes).
    let replies = burst_of(dps, 9, Some(key)).await;
    assert_eq!(admitted(&replies), 5);
    let mut admin = cp.admin(Some(TOKEN)).await;
    let v = admin
        .set_key_tier(SetKeyTierRequest {
            key: Some(KeyRef {
                key: Some(key_ref::Key::ApiKey(key.into())),
            }),
            tier: "premium".into(),
        })
        .await
        .new_version();
    let ids = stack.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    cp.wait_acked(&ids, v).await;
    let client = http_client();
    for dp in dps {
        let r = send(
            &client,
            http::Request::get(dp.url("/data"))
                .header("x-api-key", key)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.headers["x-ratelimit-limit"], "100");
    }
}
