//! gRPC health (`grpc.health.v1`) tells the truth: the Admin service (and the server as a whole)
//! is NOT_SERVING while Redis, its store, does not answer, Discovery keeps serving, and every
//! service is NOT_SERVING as soon as shutdown begins; `Watch` streams each change.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

async fn health(cp: &Cp) -> HealthClient<Channel> {
    HealthClient::new(
        Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let status = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .answer()
        .status;
    ServingStatus::try_from(status).unwrap()
}

/// The next status a Watch stream sends (within a few store checks).
async fn next(stream: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let wait = control_plane::health::EVERY * 3 + REDIS_CALL_TIMEOUT * 2;
    let m = tokio::time::timeout(wait, stream.message())
        .await
        .unwrap_or_else(|_| panic!("no health change within {wait:?}"))
        .unwrap()
        .expect("the Watch stream is open");
    ServingStatus::try_from(m.status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_not_serving_while_redis_is_away_and_nothing_is_at_shutdown() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let backend = "127.0.0.1:9".parse().unwrap();
    let cp = Cp::start_redis(snapshot_with(&[backend]), &redis.url()).await;
    let mut client = health(&cp).await;
    let mut admin = client
        .watch(HealthCheckRequest {
            service: "lb.v1.Admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut admin).await, ServingStatus::Serving);

    redis.kill();
    assert_eq!(next(&mut admin).await, ServingStatus::NotServing);
    assert_eq!(check(&mut client, "").await, ServingStatus::NotServing);
    // The configuration it holds is still served.
    assert_eq!(
        check(&mut client, "lb.v1.Discovery").await,
        ServingStatus::Serving
    );

    let _redis = RedisServer::start_on(port).await;
    assert_eq!(next(&mut admin).await, ServingStatus::Serving);
    assert_eq!(check(&mut client, "").await, ServingStatus::Serving);

    // Shutdown: NOT_SERVING first, for Discovery too.
    let mut discovery = client
        .watch(HealthCheckRequest {
            service: "lb.v1.Discovery".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut discovery).await, ServingStatus::Serving);
    let stopping = tokio::spawn(cp.stop());
    assert_eq!(next(&mut discovery).await, ServingStatus::NotServing);
    drop((discovery, admin, client));
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the control plane stops")
        .unwrap();
}
