//! A backend that stops answering (a stopped process: its kernel still accepts connections, it
//! never reads them) costs clients about a second, not the request timeout: a request that may
//! be sent again gives each try its own timeout and goes to another backend, and the timeouts
//! count as the backend's failures, so outlier detection takes it out of rotation at once.

#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dp::{Dp, backend, snapshot};
use http::StatusCode;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A backend that accepts connections and never answers on them.
async fn hung_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn a_hung_backend_costs_a_try_timeout_and_no_failed_request() {
    let hung = hung_backend().await;
    let healthy = [backend(|_| "a".into()).await, backend(|_| "b".into()).await];
    let s = snapshot(&[healthy[0], hung, healthy[1]]);
    let dp = Arc::new(Dp::start(|_| {}, s).await);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let dp = Arc::clone(&dp);
        clients.spawn(async move {
            let mut slowest = Duration::ZERO;
            for _ in 0..40 {
                let started = Instant::now();
                let (status, body) = dp.get("/data").await;
                slowest = slowest.max(started.elapsed());
                assert_eq!(status, StatusCode::OK, "{body}");
                assert!(body == "a" || body == "b", "{body}");
            }
            slowest
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(s) = clients.join_next().await {
        slowest = slowest.max(s.unwrap());
    }
    // A try on the hung backend waits its timeout (a second), then the request goes on: nothing
    // near the 30 s request timeout. The bound is loose for a loaded test machine.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request {slowest:?}"
    );
    let active = dp.shared.active().unwrap();
    let e = &active.slots[1].endpoint;
    assert!(
        e.ejections.load(Ordering::Relaxed) >= 1,
        "the hung backend was not ejected"
    );
    assert!(e.errors.load(Ordering::Relaxed) >= 1);
    Arc::into_inner(dp).unwrap().stop().await;
}

#[tokio::test]
async fn a_request_that_cannot_be_sent_again_waits_for_the_request_timeout() {
    let hung = hung_backend().await;
    let mut s = snapshot(&[hung]);
    s.timeouts = Some(lb_proto::v1::TimeoutPolicy {
        request_ms: 1_500,
        try_ms: Some(100),
        ..lb_proto::defaults::timeouts()
    });
    let dp = Dp::start(|_| {}, s).await;
    // A POST is not tried again: its try gets the whole request timeout, then 504.
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/data")
        .header("host", "a")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"body",
        )))
        .unwrap();
    let status = c.send_request(req).await.unwrap().status();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    dp.stop().await;
}

#[tokio::test]
async fn the_last_possible_try_is_not_cut_by_the_try_timeout() {
    // One backend, answering /slow after 300 ms and the rest at once: a GET to /slow has
    // nowhere else to go, so its try waits the request timeout, not the per-try one.
    let slow = dp::http_backend(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
    })
    .await;
    let mut s = snapshot(&[slow]);
    s.timeouts = Some(lb_proto::v1::TimeoutPolicy {
        try_ms: Some(100),
        ..lb_proto::defaults::timeouts()
    });
    let dp = Dp::start(|_| {}, s).await;
    assert_eq!(dp.get("/slow").await, (StatusCode::OK, "ok".to_owned()));
    assert_eq!(dp.metric("lb_retries_total"), 0.0);
    // With a second backend, the same try is cut at 100 ms and goes to the other.
    let other = backend(|_| "other".into()).await;
    dp.update(|s| s.backends.push(snapshot(&[other]).backends[0].clone()));
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(dp.get("/slow").await);
    }
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::OK),
        "{answers:?}"
    );
    assert!(answers.iter().all(|(_, b)| b == "other"), "{answers:?}");
    assert!(
        dp.metric("lb_retries_total") >= 1.0,
        "the try on the slow one was cut"
    );
    dp.stop().await;
}
