//! HTTP/2 clients that give their streams no flow-control window: a stream that can send
//! nothing for the send timeout is reset and lets go of its backend, a connection carries at
//! most 100 streams at once by default, and other clients are served meanwhile.

#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dp::{Dp, snapshot};
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// A backend answering `/flood` with a body without end, and anything else with "ok".
async fn flooding_backend() -> SocketAddr {
    dp::http_backend(|req: Request<Incoming>| async move {
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let body: Box<dyn Iterator<Item = Bytes> + Send> = if req.uri().path() == "/flood" {
            Box::new(std::iter::repeat(chunk))
        } else {
            Box::new(std::iter::once(Bytes::from_static(b"ok")))
        };
        let frames = tokio_stream::iter(body.map(|b| Ok::<_, hyper::Error>(Frame::data(b))));
        Response::new(StreamBody::new(frames))
    })
    .await
}

/// An HTTP/2 connection to the data plane whose streams' bodies are never read: the client
/// never opens their flow-control window.
async fn greedy_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<TcpStream, Bytes>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    h2::client::handshake(tcp).await.unwrap()
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://a{path}")).body(()).unwrap()
}

#[tokio::test]
async fn a_stream_without_window_is_reset_and_lets_go_of_its_backend() {
    let dp = Dp::start(
        |s| s.send_timeout = Duration::from_millis(300),
        snapshot(&[flooding_backend().await]),
    )
    .await;
    let (mut client, connection) = greedy_client(dp.addr).await;
    let connection = tokio::spawn(connection);
    let (response, _) = client.send_request(get("/flood"), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let active = dp.shared.active().unwrap();
    let endpoint = &active.slots[0].endpoint;
    assert_eq!(endpoint.in_flight(), 1);
    // The client reads nothing: once its window is spent the stream stalls, and after the send
    // timeout the data plane lets go of the backend.
    dp::wait_until("the backend to be let go", || endpoint.in_flight() == 0).await;
    // The stream ends in a reset, not as a whole body.
    let mut body = response.into_body();
    let mut got_reset = false;
    while let Some(frame) = body.data().await {
        if frame.is_err() {
            got_reset = true;
            break;
        }
    }
    assert!(got_reset, "the stalled stream ended as if whole");
    connection.abort();
    dp.stop().await;
}

#[tokio::test]
async fn a_connection_carries_at_most_100_streams_by_default() {
    let dp = Dp::start(|_| {}, snapshot(&[flooding_backend().await])).await;
    let (client, connection) = greedy_client(dp.addr).await;
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // The server's SETTINGS arrive with the first exchange.
    let (response, _) = client.send_request(get("/"), true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    assert_eq!(client.current_max_send_streams(), 100);
    connection.abort();
    dp.stop().await;
}

#[tokio::test]
async fn other_clients_are_served_while_streams_sit_without_window() {
    let dp = Arc::new(
        Dp::start(
            |s| s.send_timeout = Duration::from_millis(500),
            snapshot(&[flooding_backend().await]),
        )
        .await,
    );
    // Four connections of 100 streams each, none ever read.
    let mut greedy = Vec::new();
    for _ in 0..4 {
        let (client, connection) = greedy_client(dp.addr).await;
        let connection = tokio::spawn(connection);
        let mut streams = Vec::new();
        let mut client = client.ready().await.unwrap();
        for _ in 0..100 {
            client = client.ready().await.unwrap();
            let (response, _) = client.send_request(get("/flood"), true).unwrap();
            streams.push(response);
        }
        greedy.push((client, connection, streams));
    }
    // Meanwhile a client on another address is served, every time.
    for i in 0..100 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let tcp = socket.connect(dp.addr).await.unwrap();
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", "a")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let status = s.send_request(req).await.unwrap().status();
        assert!(status.is_success(), "request {i}: {status}");
    }
    for (_, connection, _) in greedy {
        connection.abort();
    }
    Arc::into_inner(dp).unwrap().stop().await;
}
