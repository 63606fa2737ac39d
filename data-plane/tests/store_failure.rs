//! What a data plane does with rate-limited requests while its Redis is gone, per the snapshot's
//! `on_store_failure`: `open` admits them unchecked, `closed` refuses them with 503, `local`
//! enforces the limit in the data plane itself.

#[path = "support/dp.rs"]
mod dp;
#[path = "support/redis_server.rs"]
mod redis_server;

use dp::{Dp, backend, snapshot};
use http::StatusCode;
use lb_proto::v1::{Limit, StoreFailureMode};
use redis_server::RedisServer;

/// A data plane limiting each client address to 3 requests a minute through a Redis that is
/// then killed; the statuses of the next `n` requests.
async fn statuses_with_redis_gone(mode: StoreFailureMode, n: usize) -> Vec<StatusCode> {
    let mut redis = RedisServer::start().await;
    let mut config = snapshot(&[backend(|_| "ok".into()).await]);
    let rl = config.rate_limit.as_mut().unwrap();
    rl.ip_limit = Some(Limit {
        requests: 3,
        period_ms: 60_000,
    });
    rl.on_store_failure = mode as i32;
    let url = redis.url();
    let dp = Dp::start(move |s| s.redis = Some(url), config).await;
    // Shared while Redis answers.
    assert_eq!(dp.get("/").await.0, StatusCode::OK);
    assert!(!dp.shared.limiter.is_degraded());
    redis.kill();
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(dp.get("/").await.0);
    }
    assert!(dp.shared.limiter.is_degraded(), "Redis is gone");
    dp.stop().await;
    statuses
}

#[tokio::test]
async fn open_admits_every_request_while_redis_is_gone() {
    let statuses = statuses_with_redis_gone(StoreFailureMode::Open, 8).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn closed_refuses_every_request_while_redis_is_gone() {
    let statuses = statuses_with_redis_gone(StoreFailureMode::Closed, 8).await;
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn local_enforces_the_limit_in_the_data_plane_while_redis_is_gone() {
    let statuses = statuses_with_redis_gone(StoreFailureMode::Local, 8).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((ok, limited), (3, 5), "{statuses:?}");
}
