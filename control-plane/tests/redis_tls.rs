//! Control planes on a Redis reached over TLS (`rediss://`, redis-server's own TLS port): the
//! state is saved and followed through it, a data plane enforces a shared limit through it, and
//! a CA file that does not hold the server's CA (or a bad `redis_ca` setting) is refused.

mod common;
#[path = "../../data-plane/tests/support/pki.rs"]
mod pki;

use std::sync::Arc;

use common::redis_server::RedisServer;
use common::*;
use control_plane::redis_store::{RedisStore, STATE_KEY};
use control_plane::settings::{CommonArgs, Settings};
use lb_proto::v1::*;
use pki::{Ca, TempDir, install_provider};

async fn store(redis: &RedisServer, ca: Option<&[u8]>) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::open_with_ca(&redis.url(), ca, REDIS_CALL_TIMEOUT)
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn control_planes_share_their_state_through_rediss() {
    install_provider();
    let ca = Ca::new("redis CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let dir = TempDir::new("cp-redis-tls");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let files = dir.install(&leaf);
    let redis = RedisServer::start_tls(&files.cert, &files.key, &ca_file).await;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();

    let open = |initial: ConfigSnapshot| {
        let store = store(&redis, Some(ca.pem.as_bytes()));
        async move {
            let cp =
                control_plane::redis_store::control_plane(store.await, initial, TOKEN.into(), None)
                    .await
                    .unwrap();
            Cp::serve(cp).await
        }
    };
    let a = open(snapshot_with(&mock.addrs())).await;
    // B finds A's configuration in Redis.
    let b = open(snapshot_with(&[])).await;
    assert_eq!(b.cp.snapshot().backends.len(), 2);
    let stored: bool = redis::cmd("EXISTS")
        .arg(STATE_KEY)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert!(stored);

    // A change on A reaches B through the change channel, over TLS too.
    let v = a
        .admin(Some(TOKEN))
        .await
        .set_strategy(strategy("least_connections"))
        .await
        .new_version();
    b.wait_version(v).await;
    assert_eq!(b.cp.snapshot().strategy, "least_connections");

    // A data plane of B enforces its per-IP limit in the same Redis.
    let v = b
        .admin(Some(TOKEN))
        .await
        .set_ip_limit(SetIpLimitRequest {
            limit: Some(Limit {
                requests: 3,
                period_ms: 60_000,
            }),
        })
        .await
        .new_version();
    let (url, ca_path) = (redis.url(), ca_file.clone());
    let dp = Dp::join_with(&b.url(), "dp-tls-redis", move |s| {
        s.redis = Some(url);
        s.redis_ca = Some(ca_path);
    })
    .await;
    dp.wait_version(v).await;
    let client = http_client();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let resp = client
            .get(format!("http://{}/", dp.addr).parse().unwrap())
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert!(!dp.shared.limiter.is_degraded());
    let limited: bool = redis::cmd("EXISTS")
        .arg("lb:rl:{ip:127.0.0.1}:gcra")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert!(limited);

    // A store trusting another CA cannot use this Redis; the error names it.
    let stranger = Ca::new("some other CA");
    let e = control_plane::redis_store::control_plane(
        store(&redis, Some(stranger.pem.as_bytes())).await,
        snapshot_with(&[]),
        TOKEN.into(),
        None,
    )
    .await
    .err()
    .expect("an untrusted certificate is refused")
    .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{}", redis.port)) && e.contains("UnknownIssuer"),
        "{e}"
    );
}

#[test]
fn redis_ca_settings_are_checked_at_load() {
    let dir = TempDir::new("cp-redis-ca-settings");
    let empty = dir.write("empty.pem", "");
    let args = |redis: &str, ca: &std::path::Path| CommonArgs {
        redis_url: Some(redis.to_owned()),
        redis_ca: Some(ca.to_owned()),
        ..Default::default()
    };
    let e = Settings::load(args("rediss://127.0.0.1:6380", &empty))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("redis_ca") && e.contains("empty.pem") && e.contains("no certificate"),
        "{e}"
    );
    let e = Settings::load(args("rediss://127.0.0.1:6380", &dir.join("absent.pem")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.pem") && e.contains("cannot read"), "{e}");
    let ca = dir.write("ca.pem", &Ca::new("redis CA").pem);
    let e = Settings::load(args("redis://127.0.0.1:6379", &ca))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("redis_ca") && e.contains("not a rediss://"),
        "{e}"
    );
    let s = Settings::load(args("rediss://127.0.0.1:6380", &ca)).unwrap();
    assert_eq!(s.redis_ca.as_deref(), Some(ca.as_path()));
    assert_eq!(
        s.redis_root_ca().unwrap().unwrap(),
        std::fs::read(&ca).unwrap()
    );
}
