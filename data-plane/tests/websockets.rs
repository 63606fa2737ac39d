//! WebSockets and other upgraded connections through the data plane, with a real WebSocket
//! client (tokio-tungstenite) against the mock backends' `/ws` echo: messages both ways, the
//! request counted once by the limits, a backend killed mid-tunnel, the idle timeout, the cap on
//! open tunnels, the drain at shutdown, a WebSocket over HTTP/2 (RFC 8441), and `h2c` upgrade
//! offers kept from the backends.

#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;
use std::time::Duration;

use dp::{Dp, WAIT, snapshot, wait_until};
use futures_util::{SinkExt, StreamExt};
use lb_proto::v1::{Limit, TimeoutPolicy};
use mock_backends::{Faults, MockBackends};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn mocks(n: usize) -> MockBackends {
    MockBackends::start(&vec!["127.0.0.1:0".parse().unwrap(); n])
        .await
        .unwrap()
}

/// A WebSocket to `/ws` through the data plane at `addr`: the socket and the backend that took it.
async fn open(addr: SocketAddr) -> Result<(Socket, String), tokio_tungstenite::tungstenite::Error> {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
    let backend = resp.headers()["x-backend"].to_str().unwrap().to_owned();
    Ok((ws, backend))
}

/// Sends `text` and reads the echo.
async fn echo(ws: &mut Socket, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("an echo")
        .expect("the socket is open")
        .unwrap();
    reply.into_text().unwrap().to_string()
}

/// Waits for the socket to be closed under its client: the stream ends or fails.
async fn closed(ws: &mut Socket) {
    let ended = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, ended)
        .await
        .expect("the tunnel closes");
}

fn tunnels_open(dp: &Dp) -> f64 {
    dp.metric("lb_tunnels_open")
}

#[tokio::test]
async fn a_websocket_carries_a_thousand_messages_each_way() {
    let mock = mocks(3).await;
    let dp = Dp::start(|_| {}, snapshot(&mock.addrs())).await;
    let (mut ws, backend) = open(dp.addr).await.unwrap();
    assert!(backend.starts_with("backend-"), "{backend}");
    assert_eq!(tunnels_open(&dp), 1.0);
    for i in 0..1000 {
        let text = format!("message {i}");
        assert_eq!(echo(&mut ws, &text).await, text);
    }
    let binary = vec![0u8, 1, 2, 255];
    ws.send(Message::binary(binary.clone())).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_data().to_vec(), binary);
    let stats = dp.admin_json("/stats").await;
    assert_eq!(stats["tunnels_open"], 1, "{stats}");
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    wait_until("the tunnel to close", || tunnels_open(&dp) == 0.0).await;
    // Each message is a few bytes of framing more than its text, both ways.
    for direction in ["to_backend", "to_client"] {
        let bytes = dp.metric(&format!(
            "lb_tunnel_bytes_total{{direction=\"{direction}\"}}"
        ));
        assert!(bytes > 10_000.0, "{direction}: {bytes}");
    }
    // The upgrade was a request like another: answered 101 by the backend, counted once.
    assert_eq!(
        mock.backends()
            .iter()
            .map(|b| b.stats().by_path.get("/ws").copied().unwrap_or(0))
            .sum::<u64>(),
        1
    );
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_counts_once_against_the_limits() {
    let mock = mocks(1).await;
    let mut s = snapshot(&mock.addrs());
    s.rate_limit.as_mut().unwrap().ip_limit = Some(Limit {
        requests: 2,
        period_ms: 60_000,
    });
    let dp = Dp::start(|_| {}, s).await;
    let (mut first, _) = open(dp.addr).await.unwrap();
    let (mut second, _) = open(dp.addr).await.unwrap();
    // Messages on open tunnels are not requests: they pass whatever the limit.
    for i in 0..50 {
        assert_eq!(echo(&mut first, &i.to_string()).await, i.to_string());
        assert_eq!(echo(&mut second, &i.to_string()).await, i.to_string());
    }
    // A third upgrade is a third request: over the limit.
    match open(dp.addr).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|(_, b)| b)),
    }
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_backend_killed_mid_tunnel_closes_it_and_the_next_upgrade_goes_elsewhere() {
    let mock = mocks(3).await;
    let dp = Dp::start(|_| {}, snapshot(&mock.addrs())).await;
    let (mut ws, name) = open(dp.addr).await.unwrap();
    assert_eq!(echo(&mut ws, "before").await, "before");
    let killed = mock.backends().iter().find(|b| b.name() == name).unwrap();
    killed.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    closed(&mut ws).await;
    wait_until("the tunnel to be let go", || tunnels_open(&dp) == 0.0).await;
    // Every next upgrade lands on a live backend: one that tries the dead one first is moved
    // to another, as the connect failed before anything was sent.
    for _ in 0..6 {
        let (mut ws, other) = open(dp.addr).await.unwrap();
        assert_ne!(other, name);
        assert_eq!(echo(&mut ws, "after").await, "after");
    }
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_tunnel_idle_past_its_timeout_is_closed() {
    let mock = mocks(1).await;
    let mut s = snapshot(&mock.addrs());
    s.timeouts = Some(TimeoutPolicy {
        tunnel_idle_ms: Some(300),
        ..lb_proto::defaults::timeouts()
    });
    let dp = Dp::start(|_| {}, s).await;
    let (mut ws, _) = open(dp.addr).await.unwrap();
    // Traffic keeps it open past the timeout...
    assert_eq!(echo(&mut ws, "one").await, "one");
    assert_eq!(echo(&mut ws, "two").await, "two");
    // ...and silence closes it.
    closed(&mut ws).await;
    wait_until("the tunnel to close", || tunnels_open(&dp) == 0.0).await;
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn upgrades_past_the_cap_are_answered_503() {
    let mock = mocks(1).await;
    let dp = Dp::start(|s| s.max_tunnels = 1, snapshot(&mock.addrs())).await;
    let (mut ws, _) = open(dp.addr).await.unwrap();
    match open(dp.addr).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("tunnel_limit"), "{body}");
        }
        other => panic!("expected 503, got {:?}", other.map(|(_, b)| b)),
    }
    // Plain requests are not tunnels: they pass.
    assert_eq!(dp.get("/data").await.0, 200);
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    wait_until("the place to free up", || tunnels_open(&dp) == 0.0).await;
    let (mut again, _) = open(dp.addr).await.unwrap();
    assert_eq!(echo(&mut again, "x").await, "x");
    dp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_drain_waits_for_tunnels_then_closes_them() {
    let mock = mocks(1).await;
    let mut dp = Dp::start(
        |s| s.drain_timeout = Duration::from_millis(1500),
        snapshot(&mock.addrs()),
    )
    .await;
    let (mut ws, _) = open(dp.addr).await.unwrap();
    let stopping = dp.begin_stop();
    // During the drain the tunnel still carries messages...
    assert_eq!(echo(&mut ws, "draining").await, "draining");
    // ...until the deadline closes it, and the data plane stops.
    closed(&mut ws).await;
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the data plane stops")
        .unwrap()
        .unwrap();
    mock.shutdown().await;
}

#[tokio::test]
async fn an_h2c_upgrade_offer_is_never_passed_to_a_backend() {
    let mock = mocks(1).await;
    let dp = Dp::start(|_| {}, snapshot(&mock.addrs())).await;
    let mut conn = TcpStream::connect(dp.addr).await.unwrap();
    conn.write_all(
        b"GET /echo HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, conn.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    // Served as the plain HTTP/1.1 request it also is; the backend saw no offer.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let echoed = answer.to_ascii_lowercase();
    assert!(
        !echoed.contains("\"upgrade\"") && !echoed.contains("http2-settings"),
        "{answer}"
    );
    dp.stop().await;
    mock.shutdown().await;
}

/// A WebSocket frame from a client: final, masked (RFC 6455 section 5.3), text.
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn a_websocket_over_http2_reaches_an_http1_backend() {
    let mock = mocks(1).await;
    let dp = Dp::start(|_| {}, snapshot(&mock.addrs())).await;
    let tcp = TcpStream::connect(dp.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{}/ws", dp.addr))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["x-backend"]
            .to_str()
            .unwrap()
            .starts_with("backend-")
    );
    let mut recv = resp.into_body();
    for text in ["over", "http/2"] {
        send.send_data(client_frame(text).into(), false).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 + text.len() {
            let chunk = tokio::time::timeout(WAIT, recv.data())
                .await
                .unwrap()
                .expect("the stream is open")
                .unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        // The echo: a final, unmasked text frame with the same payload.
        assert_eq!(got[0], 0x81);
        assert_eq!(&got[2..], text.as_bytes());
    }
    assert_eq!(tunnels_open(&dp), 1.0);
    drop(send);
    drop(recv);
    dp.stop().await;
    mock.shutdown().await;
}
