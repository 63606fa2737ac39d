//! gRPC through the data plane to HTTP/2 backends (`h2c://`), with a real gRPC client (tonic)
//! against the mock backends' `lb.mock.v1.Echo`: every kind of call, spread by the strategy;
//! application errors and trailers passed through unchanged; the data plane's own refusals in
//! gRPC form; deadlines; a backend killed under load.

#[path = "support/dp.rs"]
mod dp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dp::{Dp, snapshot, wait_until};
use lb_proto::v1::Limit;
use mock_backends::grpc::pb::EchoRequest;
use mock_backends::grpc::pb::echo_client::EchoClient;
use mock_backends::{Faults, MockBackends};
use tonic::Code;
use tonic::transport::Channel;

async fn mocks(n: usize) -> MockBackends {
    MockBackends::start(&vec!["127.0.0.1:0".parse().unwrap(); n])
        .await
        .unwrap()
}

/// The configuration with `backends` spoken to over HTTP/2 in clear text.
fn h2c(backends: &[SocketAddr]) -> lb_proto::v1::ConfigSnapshot {
    let mut s = snapshot(backends);
    for b in &mut s.backends {
        b.address = format!("h2c://{}", b.address);
    }
    s
}

async fn client(dp: &Dp) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://{}", dp.addr))
        .await
        .unwrap()
}

fn ask(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_kind_of_call_goes_through_spread_over_the_backends() {
    let mock = mocks(3).await;
    let dp = Dp::start(|_| {}, h2c(&mock.addrs())).await;
    let mut echo = client(&dp).await;

    // Unary, spread by round robin over the three backends.
    let mut by_backend: HashMap<String, u32> = HashMap::new();
    for i in 0..30 {
        let reply = echo
            .unary(ask(&format!("hello {i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.message, format!("hello {i}"));
        *by_backend.entry(reply.backend).or_default() += 1;
    }
    assert_eq!(by_backend.len(), 3, "{by_backend:?}");
    assert!(by_backend.values().all(|n| *n == 10), "{by_backend:?}");

    // Server streaming.
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "tick".into(),
            count: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.message, format!("tick {got}"));
        assert_eq!(reply.index, got);
        got += 1;
    }
    assert_eq!(got, 100);

    // Client streaming.
    let words = ["a", "b", "c", "d"].map(ask);
    let reply = echo
        .client_stream(tokio_stream::iter(words))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.message.as_str(), reply.index), ("a b c d", 4));

    // Bidirectional: each reply comes as its request goes.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..20 {
        tx.send(ask(&format!("ping {i}"))).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!((reply.message, reply.index), (format!("ping {i}"), i));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn an_application_error_reaches_the_client_unchanged() {
    let mock = mocks(1).await;
    let dp = Dp::start(|_| {}, h2c(&mock.addrs())).await;
    let mut echo = client(&dp).await;
    let status = echo
        .unary(EchoRequest {
            message: "no widget 42 here".into(),
            fail_with: Code::NotFound as u32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no widget 42 here");
    // The same mid-stream, after replies: the trailers carry it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(ask("fine")).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "fine");
    tx.send(EchoRequest {
        message: "out of stock".into(),
        fail_with: Code::FailedPrecondition as u32,
        ..Default::default()
    })
    .await
    .unwrap();
    let status = replies.message().await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::FailedPrecondition, "out of stock")
    );
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_rate_limited_call_gets_resource_exhausted() {
    let mock = mocks(1).await;
    let mut s = h2c(&mock.addrs());
    s.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
        requests: 3,
        period_ms: 60_000,
    });
    let dp = Dp::start(|_| {}, s).await;
    let mut echo = client(&dp).await;
    for _ in 0..3 {
        echo.unary(ask("ok")).await.unwrap();
    }
    let status = echo.unary(ask("one too many")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("rate limit"), "{status:?}");
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_call_past_its_deadline_gets_deadline_exceeded_from_the_proxy() {
    let mock = mocks(1).await;
    mock.backend(0).set_faults(Faults {
        latency_ms: 5_000,
        ..Faults::default()
    });
    let dp = Dp::start(|_| {}, h2c(&mock.addrs())).await;
    // A client that does not cut the call itself (tonic's would), so the answer is the proxy's.
    let tcp = tokio::net::TcpStream::connect(dp.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::post(format!("http://{}/lb.mock.v1.Echo/Unary", dp.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "200m")
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    let message = prost::Message::encode_to_vec(&ask("slow"));
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(frame.into(), true).unwrap();
    let resp = tokio::time::timeout(dp::WAIT, resp).await.unwrap().unwrap();
    // Trailers-only: HTTP 200, the gRPC status in the head.
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4", "{:?}", resp.headers());
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert!(resp.body().is_end_stream());
    dp.wait_metric("lb_requests_refused_total{reason=\"gateway_timeout\"}", 1.0)
        .await;
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_backend_killed_under_load_costs_no_call() {
    let mock = mocks(3).await;
    let dp = Dp::start(|_| {}, h2c(&mock.addrs())).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut echo = client(&dp).await;
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        load.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match echo.unary(ask("load")).await {
                    Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(s) => {
                        eprintln!("failed call: {s:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    wait_until("calls under way", || calls.load(Ordering::Relaxed) >= 200).await;
    mock.backend(0).set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let killed_at = calls.load(Ordering::Relaxed);
    wait_until("calls after the kill", || {
        calls.load(Ordering::Relaxed) >= killed_at + 600
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    // Calls that met the dead backend went to another.
    assert!(dp.metric("lb_retries_total") > 0.0);
    // The other two carried on; the killed one is out of rotation.
    let served: Vec<u64> = mock
        .backends()
        .iter()
        .map(|b| b.stats().requests_total)
        .collect();
    assert!(served[1] > 200 && served[2] > 200, "{served:?}");
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn grpc_health_checks_follow_the_backends_serving_status() {
    let mock = mocks(2).await;
    let mut config = h2c(&mock.addrs());
    config.health_check = Some(lb_proto::v1::HealthCheckPolicy {
        kind: "grpc".into(),
        grpc_service: "lb.mock.v1.Echo".into(),
        interval_ms: 1_000,
        timeout_ms: 500,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        jitter_percent: 0,
        ..Default::default()
    });
    let dp = Dp::start(|_| {}, config).await;
    let endpoint = |i: usize| Arc::clone(&dp.shared.active().unwrap().slots[i].endpoint);
    let probes = |i: usize| mock.backend(i).stats().requests_total;
    wait_until("a probe of each backend", || {
        probes(0) >= 1 && probes(1) >= 1
    })
    .await;
    assert!(endpoint(0).is_healthy() && endpoint(1).is_healthy());

    // NOT_SERVING takes the backend out; calls go to the other one only.
    mock.backend(0).set_faults(Faults {
        fail_health: true,
        ..Faults::default()
    });
    wait_until("backend 0 out of rotation", || !endpoint(0).is_healthy()).await;
    let mut echo = client(&dp).await;
    for _ in 0..6 {
        let reply = echo.unary(ask("hi")).await.unwrap().into_inner();
        assert_eq!(reply.backend, mock.backend(1).name());
    }
    mock.backend(0).set_faults(Faults::default());
    wait_until("backend 0 back", || endpoint(0).is_healthy()).await;

    // A service the backend does not know is a failed probe, not a healthy one.
    dp.update(|s| {
        s.health_check.as_mut().unwrap().grpc_service = "no.such.Service".into();
    });
    wait_until("both out of rotation", || {
        !endpoint(0).is_healthy() && !endpoint(1).is_healthy()
    })
    .await;
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn grpc_probes_are_refused_for_http1_backends() {
    let mock = mocks(1).await;
    let dp = Dp::start(|_| {}, h2c(&mock.addrs())).await;
    let mut config = dp.snapshot();
    config.version += 1;
    config.backends[0].address = mock.addrs()[0].to_string();
    config.health_check.as_mut().unwrap().kind = "grpc".into();
    let e = dp.shared.prepare(config).err().expect("refused");
    assert_eq!(e.field, "health_check.kind");
    assert!(e.message.contains("HTTP/1.1"), "{e}");
    dp.stop().await;
    mock.shutdown().await;
}
