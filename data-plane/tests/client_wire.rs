//! What an HTTP/1 client sees on the wire: `Expect: 100-continue` answered when the body is
//! wanted, pipelined requests answered in order, HTTP/1.0 keep-alive, responses of unknown
//! length chunked for HTTP/1.1 and delimited by the close for HTTP/1.0, oversized heads refused
//! with 431, and an idle keep-alive connection closed after the header timeout.

#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dp::{Dp, snapshot};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that answers `/stream` with a body of unknown length (two pieces), and anything
/// else with the method, path and body it received.
async fn backend() -> SocketAddr {
    dp::http_backend(|req: Request<Incoming>| async move {
        if req.uri().path() == "/stream" {
            let pieces = futures_util::stream::iter(
                ["one,", "two"]
                    .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(p)))),
            );
            return Response::new(StreamBody::new(pieces).boxed());
        }
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = format!(
            "{} {} {}",
            parts.method,
            parts.uri.path(),
            String::from_utf8_lossy(&body)
        );
        Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed())
    })
    .await
}

async fn start(adjust: impl FnOnce(&mut data_plane::Settings)) -> Dp {
    Dp::start(adjust, snapshot(&[backend().await])).await
}

/// One response read off `rd`: its head's lines and its body, read as the head says
/// (`Content-Length`, chunked, or to the close).
async fn response(rd: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> (Vec<String>, String) {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        read_more(rd, buf).await;
    };
    let head: Vec<String> = String::from_utf8_lossy(&buf[..end])
        .lines()
        .map(str::to_owned)
        .collect();
    buf.drain(..end + 4);
    let field = |name: &str| {
        head.iter()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
    };
    let mut body = Vec::new();
    if let Some(n) = field("content-length") {
        let n: usize = n.parse().unwrap();
        while buf.len() < n {
            read_more(rd, buf).await;
        }
        body = buf.drain(..n).collect();
    } else if field("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                read_more(rd, buf).await;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line]).unwrap(), 16).unwrap();
            while buf.len() < line + 2 + size + 2 {
                read_more(rd, buf).await;
            }
            body.extend_from_slice(&buf[line + 2..line + 2 + size]);
            buf.drain(..line + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        rd.read_to_end(buf).await.unwrap();
        body = std::mem::take(buf);
    }
    (head, String::from_utf8(body).unwrap())
}

async fn read_more(rd: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = rd.read(&mut chunk).await.unwrap();
    assert!(
        n > 0,
        "connection closed early; read so far: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Whether the connection is closed by the other side (a read gives its end).
async fn closed(s: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 64];
    matches!(s.read(&mut chunk).await, Ok(0) | Err(_))
}

#[tokio::test]
async fn a_client_that_expects_100_continue_is_told_to_go_on_and_its_body_arrives() {
    let dp = start(|_| {}).await;
    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    s.write_all(
        b"PUT /up HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        read_more(&mut s, &mut buf).await;
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    buf.drain(..25);
    s.write_all(b"hello").await.unwrap();
    let (head, body) = response(&mut s, &mut buf).await;
    assert_eq!(head[0], "HTTP/1.1 200 OK");
    assert_eq!(body, "PUT /up hello");
    dp.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let dp = start(|_| {}).await;
    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    s.write_all(
        b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nPOST /2 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for expected in ["GET /1 ", "POST /2 abc", "GET /3 "] {
        let (head, body) = response(&mut s, &mut buf).await;
        assert_eq!(head[0], "HTTP/1.1 200 OK");
        assert_eq!(body, expected);
    }
    dp.stop().await;
}

#[tokio::test]
async fn an_http_1_0_client_keeps_its_connection_when_it_asks_to() {
    let dp = start(|_| {}).await;
    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/a", "/b"] {
        s.write_all(format!("GET {path} HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = response(&mut s, &mut buf).await;
        assert!(
            head.iter().any(|l| l == "connection: keep-alive"),
            "{head:?}"
        );
        assert_eq!(body, format!("GET {path} "));
    }
    // Without the ask, the connection closes after the response.
    s.write_all(b"GET /c HTTP/1.0\r\n\r\n").await.unwrap();
    let (head, _) = response(&mut s, &mut buf).await;
    assert!(head.iter().any(|l| l == "connection: close"), "{head:?}");
    assert!(closed(&mut s).await);
    dp.stop().await;
}

#[tokio::test]
async fn a_response_of_unknown_length_is_chunked_for_http_1_1_and_ends_with_the_close_for_http_1_0()
{
    let dp = start(|_| {}).await;
    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    s.write_all(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = response(&mut s, &mut buf).await;
    assert!(
        head.iter().any(|l| l == "transfer-encoding: chunked"),
        "{head:?}"
    );
    assert_eq!(body, "one,two");
    // The connection goes on.
    s.write_all(b"GET /after HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(response(&mut s, &mut buf).await.1, "GET /after ");

    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    s.write_all(b"GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = response(&mut s, &mut buf).await;
    assert!(
        !head.iter().any(|l| l.starts_with("transfer-encoding")),
        "{head:?}"
    );
    assert!(head.iter().any(|l| l == "connection: close"), "{head:?}");
    assert_eq!(body, "one,two");
    dp.stop().await;
}

#[tokio::test]
async fn a_head_over_the_limit_gets_431_and_the_connection_closes() {
    let dp = start(|s| s.max_header_bytes = 1024).await;
    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (head, _) = response(&mut s, &mut buf).await;
    assert_eq!(head[0], "HTTP/1.1 431 Request Header Fields Too Large");
    assert!(closed(&mut s).await);
    dp.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    // The data plane's workers run on clocks of their own: a short timeout, on the real clock.
    let dp = start(|s| s.header_timeout = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(dp.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(response(&mut s, &mut buf).await.1, "GET /a ");
    let idle = tokio::time::Instant::now();
    assert!(closed(&mut s).await);
    assert!(
        idle.elapsed() >= Duration::from_millis(250),
        "{:?}",
        idle.elapsed()
    );
    dp.stop().await;
}
