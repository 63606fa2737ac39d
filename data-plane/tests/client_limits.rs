//! Which limits a request counts against. A request with no key, or with a key nobody created,
//! counts against its client address, so inventing keys never multiplies a client's quota; a
//! created key answers for its own traffic (exempt from the address's limit), but a ban of the
//! address holds whatever key the request carries. Unknown keys may be refused outright.

#[path = "support/dp.rs"]
mod dp;
#[path = "support/redis_server.rs"]
mod redis_server;

use bytes::Bytes;
use dp::{Dp, backend, snapshot};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lb_proto::v1::{BanPolicy, ConfigSnapshot, KeyOverride, Limit, UnknownKeyPolicy};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

const CREATED: &str = "lbk_created_premium_key";

/// Lower-case hex SHA-256, as keys travel in snapshots.
fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Five requests a minute per address; the default tier `free` five a minute; one created key
/// in `premium` (a hundred a minute); a ban after three refusals.
async fn config() -> ConfigSnapshot {
    let mut s = snapshot(&[backend(|_| "ok".into()).await]);
    let rl = s.rate_limit.as_mut().unwrap();
    rl.ip_limit = Some(Limit {
        requests: 5,
        period_ms: 60_000,
    });
    rl.ban = Some(BanPolicy {
        strikes: 3,
        ..lb_proto::defaults::ban()
    });
    s.keys = vec![KeyOverride {
        key_hash: hash(CREATED),
        tier: "premium".into(),
        blocked: false,
    }];
    s
}

/// One GET with `key` (if any) as `X-API-Key`: the status and the `error` of a refusal.
async fn get(dp: &Dp, key: Option<&str>) -> (StatusCode, String) {
    let tcp = TcpStream::connect(dp.addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get("/").header("host", "a");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = s
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let error = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, error)
}

#[tokio::test]
async fn invented_keys_never_multiply_an_address_quota() {
    let dp = Dp::start(|_| {}, config().await).await;
    let mut admitted = 0;
    for i in 0..30 {
        let key = format!("made-up-key-{i}");
        if get(&dp, Some(&key)).await.0 == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "the address's five, whatever the keys");
    dp.stop().await;
}

#[tokio::test]
async fn a_created_key_is_exempt_from_its_address_limit() {
    let dp = Dp::start(|_| {}, config().await).await;
    for i in 0..30 {
        assert_eq!(
            get(&dp, Some(CREATED)).await.0,
            StatusCode::OK,
            "request {i}"
        );
    }
    // Its traffic took nothing of the address's own quota.
    for i in 0..5 {
        assert_eq!(
            get(&dp, None).await.0,
            StatusCode::OK,
            "keyless request {i}"
        );
    }
    dp.stop().await;
}

#[tokio::test]
async fn an_address_ban_holds_whatever_key_the_request_carries() {
    let dp = Dp::start(|_| {}, config().await).await;
    // Five admitted, then three refusals: banned.
    let mut last = (StatusCode::OK, String::new());
    for _ in 0..8 {
        last = get(&dp, None).await;
    }
    assert_eq!(last, (StatusCode::TOO_MANY_REQUESTS, "banned".to_owned()));
    for key in [Some(CREATED), Some("made-up-key")] {
        assert_eq!(
            get(&dp, key).await,
            (StatusCode::TOO_MANY_REQUESTS, "banned".to_owned()),
            "{key:?}"
        );
    }
    dp.stop().await;
}

#[tokio::test]
async fn unknown_keys_are_refused_when_the_policy_says_so() {
    let mut config = config().await;
    config.rate_limit.as_mut().unwrap().unknown_key = UnknownKeyPolicy::Reject as i32;
    let dp = Dp::start(|_| {}, config).await;
    assert_eq!(
        get(&dp, Some("made-up-key")).await,
        (StatusCode::UNAUTHORIZED, "unknown_key".to_owned())
    );
    assert_eq!(get(&dp, Some(CREATED)).await.0, StatusCode::OK);
    dp.stop().await;
}

#[tokio::test]
async fn through_redis_the_same_rules_hold() {
    let redis = redis_server::RedisServer::start().await;
    let url = redis.url();
    let dp = Dp::start(move |s| s.redis = Some(url), config().await).await;
    let mut admitted = 0;
    for i in 0..12 {
        let key = format!("made-up-key-{i}");
        if get(&dp, Some(&key)).await.0 == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5, "the address's five, whatever the keys");
    assert!(!dp.shared.limiter.is_degraded(), "decided in Redis");
    // The seven refusals banned the address: a created key is refused too, and its own
    // quota was not touched by the check.
    assert_eq!(
        get(&dp, Some(CREATED)).await,
        (StatusCode::TOO_MANY_REQUESTS, "banned".to_owned())
    );
    dp.stop().await;
}
