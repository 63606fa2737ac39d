//! Clients that break their own requests: a failure is charged to the side that caused it. A
//! request body with broken framing, one the client abandons, one that trickles in too slowly or
//! grows too large gets its 400, 408 or 413 (or a close, for a client that is gone) and leaves
//! every backend's statistics alone: no breaker opens, nothing is ejected, no error is counted.

#[path = "support/backends.rs"]
mod backends;
#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backends::Backends;
use dp::Dp;
use lb_proto::v1::{ConfigSnapshot, TimeoutPolicy};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Three backends (each reads a request body to its end before answering) behind a one-worker
/// data plane, with the default breaker and outlier policies (any client fault charged to a
/// backend opens its circuit within 20 requests).
async fn stack(adjust: impl FnOnce(&mut ConfigSnapshot), max_body: u64) -> (Backends, Dp) {
    let backends = Backends::start(3).await;
    let mut snapshot = dp::snapshot(&backends.addrs());
    adjust(&mut snapshot);
    let dp = Dp::start(|s| s.max_body_bytes = max_body, snapshot).await;
    (backends, dp)
}

/// Sends raw bytes on a new connection and reads the status code of the answer (None when the
/// connection closes without one).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    status_of(&mut s).await
}

/// The status of the response on `s`, if one comes.
async fn status_of(s: &mut TcpStream) -> Option<u16> {
    let head = dp::read_head(s).await?;
    head[0].split(' ').nth(1)?.parse().ok()
}

const BAD_CHUNK: &[u8] =
    b"POST /upload HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";

/// Every backend untouched by the client faults: no error, closed circuit, not ejected, no
/// latency sample.
fn assert_backends_untouched(dp: &Dp) {
    let active = dp.shared.active().unwrap();
    for slot in &active.slots {
        let e = &slot.endpoint;
        assert_eq!(
            e.errors.load(Ordering::Relaxed),
            0,
            "{} counted errors",
            e.address
        );
        assert_eq!(
            e.circuit_state(),
            data_plane::policy::breaker::CircuitState::Closed,
            "{} circuit",
            e.address
        );
        assert!(!e.is_ejected(u64::MAX / 2), "{} ejected", e.address);
        assert_eq!(e.ejections.load(Ordering::Relaxed), 0, "{}", e.address);
        assert_eq!(e.failure_rate(), 0.0, "{}", e.address);
    }
}

async fn all_ok(dp: &Dp, n: usize) {
    for i in 0..n {
        let (status, body) = dp.get("/after").await;
        assert_eq!(status, 200, "request {i} after the attack: {body}");
    }
}

#[tokio::test]
async fn broken_chunked_framing_gets_400_and_opens_no_circuit() {
    let (_backends, dp) = stack(|_| {}, 1 << 20).await;
    for i in 0..60 {
        assert_eq!(raw(dp.addr, BAD_CHUNK).await, Some(400), "request {i}");
    }
    assert_backends_untouched(&dp);
    all_ok(&dp, 30).await;
    dp.stop().await;
}

#[tokio::test]
async fn aborted_uploads_are_not_the_backends_failure() {
    let (_backends, dp) = stack(|_| {}, 1 << 20).await;
    for _ in 0..50 {
        let mut s = TcpStream::connect(dp.addr).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\nonly ten b")
            .await
            .unwrap();
        drop(s);
    }
    dp.wait_metric(r#"lb_requests_refused_total{reason="body_aborted"}"#, 50.0)
        .await;
    assert_backends_untouched(&dp);
    all_ok(&dp, 30).await;
    dp.stop().await;
}

#[tokio::test]
async fn a_body_larger_than_the_limit_streamed_without_a_length_gets_413() {
    let (_backends, dp) = stack(|_| {}, 1000).await;
    let mut req =
        b"POST /upload HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"1f4\r\n");
        req.extend_from_slice(&[b'x'; 500]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    for _ in 0..30 {
        assert_eq!(raw(dp.addr, &req).await, Some(413));
    }
    assert_backends_untouched(&dp);
    all_ok(&dp, 10).await;
    dp.stop().await;
}

/// A POST whose body stops after one byte of 100: the answer's status.
async fn stalled_upload(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nx")
        .await
        .unwrap();
    status_of(&mut s).await
}

fn timeouts(request_ms: u32, client_body_ms: Option<u32>) -> impl FnOnce(&mut ConfigSnapshot) {
    move |s| {
        s.timeouts = Some(TimeoutPolicy {
            request_ms,
            client_body_ms,
            ..lb_proto::defaults::timeouts()
        })
    }
}

/// Under `timeouts`, uploads that stall each get their 408, and no backend is charged.
async fn stalled_uploads_get_408(timeouts: impl FnOnce(&mut ConfigSnapshot)) {
    let (_backends, dp) = stack(timeouts, 1 << 20).await;
    for _ in 0..25 {
        assert_eq!(stalled_upload(dp.addr).await, Some(408));
    }
    assert_backends_untouched(&dp);
    all_ok(&dp, 10).await;
    dp.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_within_client_body_ms_gets_408() {
    stalled_uploads_get_408(timeouts(60_000, Some(200))).await;
}

#[tokio::test]
async fn a_request_timeout_spent_waiting_on_the_clients_body_is_the_clients_408() {
    // The request timeout fires first, while the upload waits for the client.
    stalled_uploads_get_408(timeouts(200, Some(0))).await;
}

#[tokio::test]
async fn client_body_ms_reaches_the_active_configuration() {
    let (_backends, dp) = stack(|_| {}, 1 << 20).await;
    let ms = Duration::from_millis;
    assert_eq!(
        dp.shared.active().unwrap().client_body_timeout,
        Some(ms(60_000))
    );
    for (set, expect) in [(Some(0), None), (Some(250), Some(ms(250)))] {
        let mut s = dp::snapshot(&[]);
        timeouts(30_000, set)(&mut s);
        assert_eq!(dp.shared.prepare(s).unwrap().client_body_timeout, expect);
    }
    dp.stop().await;
}

#[tokio::test]
async fn a_well_behaved_client_is_served_while_others_break_their_bodies() {
    let (_backends, dp) = stack(timeouts(30_000, Some(100)), 1 << 20).await;
    let dp = Arc::new(dp);
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = tokio::task::JoinSet::new();
    for kind in 0..3 {
        let (dp, stop) = (Arc::clone(&dp), Arc::clone(&stop));
        attackers.spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match kind {
                    0 => {
                        raw(dp.addr, BAD_CHUNK).await;
                    }
                    1 => {
                        let mut s = TcpStream::connect(dp.addr).await.unwrap();
                        let _ = s
                            .write_all(
                                b"POST /u HTTP/1.1\r\nhost: a\r\ncontent-length: 9\r\n\r\nab",
                            )
                            .await;
                    }
                    _ => {
                        stalled_upload(dp.addr).await;
                    }
                }
                n += 1;
            }
            n
        });
    }
    for i in 0..300 {
        // From 127.0.0.2: another address than the attackers'.
        let (status, _) = dp::get_as([127, 0, 0, 2].into(), dp.addr, "/well-behaved").await;
        assert!(status.is_success(), "request {i}: {status}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut attacks = 0;
    while let Some(n) = attackers.join_next().await {
        attacks += n.unwrap();
    }
    assert!(attacks >= 30, "only {attacks} attacks ran");
    assert_backends_untouched(&dp);
    Arc::into_inner(dp).unwrap().stop().await;
}
