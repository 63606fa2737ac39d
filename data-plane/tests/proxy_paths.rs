//! Request-path behaviours through real HTTP, with a data plane in this process and small
//! backends that answer with their name: the gateway timeout, shedding when every backend is
//! full, retries of a 502 or 503 on another backend, cookie affinity, panic mode when every
//! backend is marked unhealthy, slow start of a backend back in rotation, and the adaptive
//! strategy steering away from a failing backend.

#[path = "support/backends.rs"]
mod backends;
#[path = "support/dp.rs"]
mod dp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backends::{Backend, ok};
use bytes::Bytes;
use dp::{Dp, get_request};
use http::{Request, StatusCode};
use http_body_util::{Empty, Full};
use lb_proto::v1::{CircuitBreakerPolicy, ConfigSnapshot, HashPolicy, QueuePolicy, TimeoutPolicy};
use tokio::time::Instant;

/// The service time of the backends the latency-scoring strategy is tested on. Their latency
/// is what the strategy weighs failures and warmth against: with a bare loopback answer of a
/// fraction of a millisecond, a scheduling stall of a few milliseconds on a busy machine would
/// look like a tenfold slowdown; against a few milliseconds of work it stays noise.
const SERVICE_TIME: Duration = Duration::from_millis(2);

/// The default configuration over `backends`, with outlier ejection and the circuit breaker
/// off (the tests below look at other policies, which those would cut across).
fn snapshot(backends: &[&Backend]) -> ConfigSnapshot {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let mut s = dp::snapshot(&addrs);
    s.outlier = Some(dp::no_ejection());
    s.circuit_breaker = Some(CircuitBreakerPolicy {
        failure_rate_percent: 0,
        ..lb_proto::defaults::circuit_breaker()
    });
    s
}

/// Requests sent to the backend at `addr`, and those counted as its failures.
fn counts(dp: &Dp, addr: SocketAddr) -> (u64, u64) {
    let active = dp.shared.active().unwrap();
    let e = &active.slots[dp.slot_of(addr)].endpoint;
    (
        e.requests.load(Ordering::Relaxed),
        e.errors.load(Ordering::Relaxed),
    )
}

/// `n` GETs of `/`, each on a new connection: how many each backend (by name) answered.
async fn spread(dp: &Dp, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let (status, name) = dp.get("/").await;
        assert!(
            status == 200 || status == 500,
            "request {i}: {status} {name}"
        );
        *counts.entry(name).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_head_later_than_the_request_timeout_is_a_504() {
    let mut backend = Backend::start("a").await;
    let mut s = snapshot(&[&backend]);
    s.timeouts = Some(TimeoutPolicy {
        request_ms: 200,
        ..lb_proto::defaults::timeouts()
    });
    let dp = Dp::start(|_| {}, s).await;
    let started = Instant::now();
    let seen = dp.send(get_request("/hold")).await.expect("a response");
    let waited = started.elapsed();
    assert_eq!(seen.status, 504);
    assert_eq!(seen.json()["error"], "gateway_timeout");
    assert!(
        waited >= Duration::from_millis(200),
        "answered after {waited:?}"
    );
    // The backend had the request all along, and is charged with the timeout.
    assert_eq!(backend.next_held().await.target, "/hold");
    assert_eq!(counts(&dp, backend.addr()).1, 1);
    backend.release_all();
    assert_eq!(dp.get("/after").await, (StatusCode::OK, "a".into()));
    dp.stop().await;
}

/// One request held at the only backend, whose limit is one request in flight; a second one
/// is answered, as it comes out of a queue of `capacity`.
async fn shed_while_full(capacity: u32) -> dp::Seen {
    let mut backend = Backend::start("a").await;
    let mut s = snapshot(&[&backend]);
    s.queue = Some(QueuePolicy {
        max_in_flight_per_backend: 1,
        capacity,
        timeout_ms: 100,
    });
    let dp = Arc::new(Dp::start(|_| {}, s).await);
    let first = tokio::spawn({
        let dp = Arc::clone(&dp);
        async move { dp.send(get_request("/hold")).await.map(|s| s.status) }
    });
    let held = backend.next_held().await;
    let seen = dp.send(get_request("/second")).await.expect("a response");
    assert_eq!(
        dp.metric(r#"lb_requests_refused_total{reason="shed"}"#),
        1.0
    );
    // The held request was not disturbed.
    held.release();
    assert_eq!(first.await.unwrap().unwrap(), StatusCode::OK);
    Arc::into_inner(dp).unwrap().stop().await;
    seen
}

#[tokio::test]
async fn a_request_that_waits_out_the_queue_timeout_is_shed_with_retry_after() {
    let seen = shed_while_full(10).await;
    assert_eq!(seen.status, 503);
    assert_eq!(seen.header("retry-after"), Some("1"));
    let body = seen.json();
    assert_eq!(body["error"], "shed");
    assert!(
        body["message"].as_str().unwrap().contains("queue timeout"),
        "{body}"
    );
}

#[tokio::test]
async fn with_no_queue_a_request_finding_every_backend_full_is_shed_at_once() {
    let seen = shed_while_full(0).await;
    assert_eq!(seen.status, 503);
    assert_eq!(seen.header("retry-after"), Some("1"));
    let body = seen.json();
    assert_eq!(body["error"], "shed");
    assert!(
        body["message"].as_str().unwrap().contains("queue is full"),
        "{body}"
    );
}

/// 502 on `/bad-gateway`, 503 on `/unavailable`, 200 elsewhere.
fn failing(path: &str) -> u16 {
    match path {
        "/bad-gateway" => 502,
        "/unavailable" => 503,
        _ => 200,
    }
}

fn post(path: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap()
}

#[tokio::test]
async fn a_get_answered_502_or_503_is_retried_on_another_backend_and_a_post_is_not() {
    let a = Backend::with("a", failing, Duration::ZERO).await;
    let b = Backend::start("b").await;
    // Round robin from the failing backend, so requests alternate between the two.
    let dp = Dp::start(|_| {}, snapshot(&[&a, &b])).await;
    let a_requests = || counts(&dp, a.addr()).0 as f64;
    for path in ["/bad-gateway", "/unavailable"] {
        for i in 0..4 {
            assert_eq!(
                dp.get(path).await,
                (StatusCode::OK, "b".into()),
                "GET {path} {i}"
            );
        }
    }
    // Every GET that went to `a` first was sent again, to `b`.
    assert!(a_requests() >= 1.0, "no GET went to the failing backend");
    assert_eq!(dp.metric("lb_retries_total"), a_requests());
    let retries = dp.metric("lb_retries_total");
    let before = a_requests();
    let mut failed = 0;
    for path in ["/bad-gateway", "/unavailable"] {
        for _ in 0..4 {
            let seen = dp.send(post(path)).await.expect("a response");
            match seen.status.as_u16() {
                200 => assert_eq!(seen.text(), "b"),
                502 | 503 => {
                    // The backend's own answer, passed on as it is.
                    assert_eq!(seen.status.as_u16(), failing(path));
                    assert_eq!(seen.text(), "a");
                    failed += 1;
                }
                other => panic!("POST {path}: {other}"),
            }
        }
    }
    assert!(failed >= 1, "no POST went to the failing backend");
    assert_eq!(f64::from(failed), a_requests() - before);
    assert_eq!(dp.metric("lb_retries_total"), retries, "a POST was retried");
    dp.stop().await;
}

async fn get_with_cookie(dp: &Dp, cookie: &str) -> String {
    let req = Request::get("/")
        .header("host", "localhost")
        .header("cookie", cookie)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let seen = dp.send(req).await.expect("a response");
    assert_eq!(seen.status, 200);
    seen.text()
}

#[tokio::test]
async fn ip_hash_on_a_cookie_keeps_each_session_on_one_backend_and_spreads_sessions() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let mut s = snapshot(&backends.iter().collect::<Vec<_>>());
    s.strategy = "ip_hash".into();
    s.hash = Some(HashPolicy {
        source: "cookie".into(),
        name: "session".into(),
    });
    let dp = Dp::start(|_| {}, s).await;
    let mut used = BTreeSet::new();
    // Every client comes from 127.0.0.1: only the cookie tells them apart.
    for i in 0..40 {
        let first = get_with_cookie(&dp, &format!("session=s{i}")).await;
        for cookie in [
            format!("theme=dark; session=s{i}"),
            format!("session=s{i}; lang=en"),
            format!("session=s{i}"),
        ] {
            assert_eq!(get_with_cookie(&dp, &cookie).await, first, "{cookie}");
        }
        used.insert(first);
    }
    assert_eq!(
        used.len(),
        3,
        "40 sessions went to {used:?} of three backends"
    );
    // Without the cookie, the client address decides: always the same backend.
    let by_address = get_with_cookie(&dp, "theme=dark").await;
    for _ in 0..5 {
        assert_eq!(get_with_cookie(&dp, "other=1").await, by_address);
    }
    dp.stop().await;
}

#[tokio::test]
async fn with_every_backend_unhealthy_requests_are_still_spread_over_all_of_them() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let dp = Dp::start(|_| {}, snapshot(&backends.iter().collect::<Vec<_>>())).await;
    let active = dp.shared.active().unwrap();
    // One unhealthy backend is left out while others are healthy...
    active.slots[0].endpoint.set_healthy(false);
    let counts = spread(&dp, 30).await;
    let unhealthy = active.slots[0].endpoint.address.clone();
    let name_of = |addr: &str| {
        backends
            .iter()
            .find(|b| b.addr().to_string() == addr)
            .unwrap()
            .name()
    };
    assert!(
        !counts.contains_key(name_of(&unhealthy)),
        "the unhealthy backend got requests: {counts:?}"
    );
    // ...but with every backend unhealthy, trusting the health checks would serve nobody:
    // panic mode serves from all of them.
    for slot in &active.slots {
        slot.endpoint.set_healthy(false);
    }
    let counts = spread(&dp, 30).await;
    assert_eq!(counts.values().sum::<usize>(), 30);
    for b in &backends {
        assert!(
            counts.get(b.name()).is_some_and(|&n| n >= 5),
            "{} in panic mode: {counts:?}",
            b.name()
        );
    }
    assert!(active.slots.iter().all(|s| !s.endpoint.is_healthy()));
    dp.stop().await;
}

#[tokio::test]
async fn a_backend_back_in_rotation_gets_a_small_share_at_first() {
    let backends = [
        Backend::with("a", ok, SERVICE_TIME).await,
        Backend::with("b", ok, SERVICE_TIME).await,
        Backend::with("c", ok, SERVICE_TIME).await,
    ];
    // Only the adaptive strategy scores warmth (policy::balance).
    let mut s = snapshot(&backends.iter().collect::<Vec<_>>());
    s.strategy = "adaptive".into();
    let dp = Dp::start(|_| {}, s).await;
    // Every backend's latency measured first.
    let warm_up = spread(&dp, 60).await;
    assert_eq!(warm_up.len(), 3, "{warm_up:?}");
    // `c` goes out of rotation and comes back: slow start from a tenth of its share.
    let active = dp.shared.active().unwrap();
    let c = &active.slots[dp.slot_of(backends[2].addr())].endpoint;
    c.set_healthy(false);
    c.set_healthy(true);
    let started = Instant::now();
    let counts = spread(&dp, 200).await;
    let elapsed = started.elapsed();
    let cold = counts.get("c").copied().unwrap_or(0);
    // An even split would give it about 67; a tenth of the weight, far fewer.
    assert!(
        cold < 200 / 3 / 2,
        "c got {cold} of 200 within {elapsed:?} of its return: {counts:?}"
    );
    dp.stop().await;
}

#[tokio::test]
async fn the_adaptive_strategy_sends_less_to_a_backend_that_fails() {
    let a = Backend::with("a", ok, SERVICE_TIME).await;
    let b = Backend::with("b", ok, SERVICE_TIME).await;
    let f = Backend::with("f", |_| 500, SERVICE_TIME).await;
    let mut s = snapshot(&[&a, &b, &f]);
    s.strategy = "adaptive".into();
    let dp = Dp::start(|_| {}, s).await;
    let counts = spread(&dp, 200).await;
    let failing = counts.get("f").copied().unwrap_or(0);
    let peers = counts
        .get("a")
        .copied()
        .unwrap_or(0)
        .min(counts.get("b").copied().unwrap_or(0));
    assert!(
        failing * 2 < peers,
        "the failing backend got {failing}, its peers at least {peers}: {counts:?}"
    );
    // Its failures are what it is scored on (a few are enough to weigh several times over).
    let active = dp.shared.active().unwrap();
    let rate = active.slots[dp.slot_of(f.addr())].endpoint.failure_rate();
    assert!(rate > 0.1, "failure rate {rate}");
    dp.stop().await;
}
