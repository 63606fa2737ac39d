//! Request heads read as strictly as HAProxy and nginx read them: a transfer coding other than a
//! single `chunked` (501), a missing, repeated or invalid `Host` on HTTP/1.1 (400), `CONNECT`
//! (405) are refused, never guessed about; the target's authority wins over `Host`; forwarding
//! fields from peers that are not trusted proxies are replaced or left out; and an edge data plane
//! may cap the connections of one client address.

#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;

use bytes::Bytes;
use dp::{Dp, snapshot};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use lb_proto::v1::ConfigSnapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A backend that answers with the forwarding fields it received, one `name: value` per line.
async fn echo_fields() -> SocketAddr {
    dp::http_backend(|req: Request<Incoming>| async move {
        let mut out = String::new();
        for name in [
            "host",
            "x-forwarded-host",
            "x-forwarded-proto",
            "forwarded",
            "x-real-ip",
        ] {
            for v in req.headers().get_all(name) {
                out.push_str(&format!("{name}: {}\n", v.to_str().unwrap_or("?")));
            }
        }
        Response::new(Full::new(Bytes::from(out)))
    })
    .await
}

async fn start(adjust: impl FnOnce(&mut ConfigSnapshot)) -> Dp {
    let mut s = snapshot(&[echo_fields().await]);
    adjust(&mut s);
    Dp::start(|_| {}, s).await
}

/// Sends `head` (a whole request without a body, or with one it carries) on a new connection:
/// the status and the body of the answer.
async fn raw(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

#[tokio::test]
async fn transfer_codings_other_than_one_chunked_are_not_implemented() {
    let dp = start(|_| {}).await;
    let req = |te: &str| {
        format!(
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: {te}\r\nconnection: close\r\n\r\n0\r\n\r\n"
        )
    };
    for te in ["cow, chunked", "identity, chunked", "chunked, chunked"] {
        assert_eq!(raw(dp.addr, &req(te)).await.0, 501, "{te}");
    }
    // Without a final chunked the body's length is unknown: the server refuses it itself.
    assert_eq!(raw(dp.addr, &req("gzip")).await.0, 400);
    assert_eq!(raw(dp.addr, &req("chunked")).await.0, 200);
    dp.stop().await;
}

#[tokio::test]
async fn a_missing_repeated_or_invalid_host_is_a_bad_request() {
    let dp = start(|_| {}).await;
    for (what, head) in [
        ("no Host", "GET / HTTP/1.1\r\nconnection: close\r\n\r\n"),
        (
            "two Hosts",
            "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
        ),
        (
            "an invalid Host",
            "GET / HTTP/1.1\r\nhost: a b/c\r\nconnection: close\r\n\r\n",
        ),
        (
            "a Host with credentials",
            "GET / HTTP/1.1\r\nhost: user@a\r\nconnection: close\r\n\r\n",
        ),
    ] {
        assert_eq!(raw(dp.addr, head).await.0, 400, "{what}");
    }
    // HTTP/1.0 needs none.
    assert_eq!(raw(dp.addr, "GET / HTTP/1.0\r\n\r\n").await.0, 200);
    dp.stop().await;
}

#[tokio::test]
async fn the_targets_authority_wins_over_host() {
    let dp = start(|_| {}).await;
    let (status, seen) = raw(
        dp.addr,
        "GET http://real.example/path HTTP/1.1\r\nhost: fake.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(seen.contains("host: real.example\n"), "{seen}");
    assert!(!seen.contains("fake.example"), "{seen}");
    dp.stop().await;
}

#[tokio::test]
async fn connect_is_not_allowed() {
    let dp = start(|_| {}).await;
    let (status, _) = raw(
        dp.addr,
        "CONNECT backend.example:443 HTTP/1.1\r\nhost: backend.example:443\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    dp.stop().await;
}

const SPOOFED: &str = "GET / HTTP/1.1\r\nhost: a.example\r\nx-forwarded-host: evil.example\r\n\
    x-forwarded-proto: https\r\nforwarded: for=192.0.2.1;proto=https\r\nx-real-ip: 192.0.2.1\r\n\
    connection: close\r\n\r\n";

#[tokio::test]
async fn forwarding_fields_from_an_untrusted_peer_are_not_passed_on() {
    let dp = start(|_| {}).await;
    let (status, seen) = raw(dp.addr, SPOOFED).await;
    assert_eq!(status, 200);
    assert!(seen.contains("x-forwarded-host: a.example\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(!seen.contains("evil.example"), "{seen}");
    assert!(!seen.contains("forwarded: for"), "{seen}");
    assert!(!seen.contains("x-real-ip"), "{seen}");
    dp.stop().await;
}

#[tokio::test]
async fn forwarding_fields_from_a_trusted_proxy_are_kept() {
    let dp = start(|s| {
        s.rate_limit.as_mut().unwrap().trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    let (_, seen) = raw(dp.addr, SPOOFED).await;
    assert!(seen.contains("x-forwarded-host: evil.example\n"), "{seen}");
    assert!(
        seen.contains("forwarded: for=192.0.2.1;proto=https\n"),
        "{seen}"
    );
    assert!(seen.contains("x-real-ip: 192.0.2.1\n"), "{seen}");
    dp.stop().await;
}

/// A connection from `source`, an address of the loopback network.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn one_address_holds_no_more_connections_than_its_cap() {
    let mut s = snapshot(&[echo_fields().await]);
    s.version = 1;
    let dp = Dp::start(|s| s.max_connections_per_ip = 20, s).await;
    // A slowloris client: connections that never send a request.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_from("127.0.0.1", dp.addr).await);
    }
    // Past its cap, the next ones are closed at once.
    for _ in 0..50 {
        let mut extra = connect_from("127.0.0.1", dp.addr).await;
        let mut byte = [0u8; 1];
        assert_eq!(
            extra.read(&mut byte).await.unwrap(),
            0,
            "closed, unanswered"
        );
    }
    // Every other client is served meanwhile.
    for i in 0..50 {
        let mut c = connect_from("127.0.0.2", dp.addr).await;
        c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await.unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 200"), "request {i}");
    }
    dp.wait_metric(
        r#"lb_connections_refused_total{reason="per_ip_limit"}"#,
        50.0,
    )
    .await;
    // Room again once the client lets go.
    held.clear();
    let mut room = false;
    for _ in 0..200 {
        let mut c = connect_from("127.0.0.1", dp.addr).await;
        c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf).await;
        if buf.starts_with(b"HTTP/1.1 200") {
            room = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(room, "the address got its room back");
    dp.stop().await;
}
