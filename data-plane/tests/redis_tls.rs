//! Redis over TLS (`rediss://`, redis-server's own TLS port): two data planes enforce one shared
//! limit through it, with the server's certificate checked against `redis_ca`; without that CA
//! the certificate is not trusted and limits fall back to each data plane.

#[path = "support/dp.rs"]
mod dp;
#[path = "support/pki.rs"]
mod pki;
#[path = "support/redis_server.rs"]
mod redis_server;

use dp::{Dp, backend, snapshot};
use http::StatusCode;
use lb_proto::v1::Limit;
use pki::{Ca, TempDir, install_provider};
use redis_server::RedisServer;

#[tokio::test]
async fn two_data_planes_share_one_limit_through_rediss() {
    install_provider();
    let ca = Ca::new("redis CA");
    let leaf = ca.leaf(&["127.0.0.1", "localhost"]);
    let dir = TempDir::new("redis-tls");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let files = dir.install(&leaf);
    let redis = RedisServer::start_tls(&files.cert, &files.key, &ca_file).await;
    assert!(redis.url().starts_with("rediss://"));

    const LIMIT: u64 = 5;
    let mut config = snapshot(&[backend(|_| "ok".into()).await]);
    config.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
        requests: LIMIT,
        period_ms: 60_000,
    });
    let url = redis.url();
    let start = || {
        let (url, ca_file, config) = (url.clone(), ca_file.clone(), config.clone());
        Dp::start(
            move |s| {
                s.redis = Some(url);
                s.redis_ca = Some(ca_file);
            },
            config,
        )
    };
    let (a, b) = (start().await, start().await);
    let mut admitted = 0;
    for i in 0..12 {
        let dp = if i % 2 == 0 { &a } else { &b };
        match dp.get("/").await.0 {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("request {i}: {other}"),
        }
    }
    // One limit across both data planes. A call the Redis client sends again after a
    // reconnect can take a second token, so under load a few less may pass; never more.
    assert!(
        (1..=LIMIT).contains(&admitted),
        "one limit across both data planes: {admitted} admitted, limit {LIMIT}"
    );
    assert!(!a.shared.limiter.is_degraded() && !b.shared.limiter.is_degraded());
    // The state is in Redis, read back over TLS.
    let exists: bool = redis::cmd("EXISTS")
        .arg("lb:rl:{ip:127.0.0.1}:gcra")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert!(exists);

    // Without the CA file the certificate is not trusted: the limiter runs degraded, per plane.
    let url = redis.url();
    let untrusting = Dp::start(move |s| s.redis = Some(url), config.clone()).await;
    let _ = untrusting.get("/").await;
    assert!(untrusting.shared.limiter.is_degraded());

    for dp in [a, b, untrusting] {
        dp.stop().await;
    }
}
