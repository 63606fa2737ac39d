//! What the upstream code does with what a backend puts on the wire, through a data plane in
//! this process and a scripted backend that answers each path with exact bytes: response heads
//! past the size or field limit, a switch of protocols, connections that must not be reused
//! (HTTP/1.0, `Connection: close`), chunked bodies that break or stop, and a chunked upload of
//! unknown length on its way to the backend.

#[path = "support/dp.rs"]
mod dp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dp::{Dp, get_request, wait_until};
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_stream::wrappers::ReceiverStream;

/// A backend speaking HTTP/1.1 from a script: each request's path picks the exact bytes of the
/// answer (see [`answer`]). Connections are numbered from 0 as they are accepted, and the
/// answers that say so name theirs in `x-conn`.
struct Scripted {
    addr: SocketAddr,
    /// Lets the second part of a two-part answer go.
    gate: Arc<Notify>,
}

/// A request as the backend read it.
struct Received {
    path: String,
    /// The head, lower-cased.
    head: String,
    body: Vec<u8>,
    chunked: bool,
}

enum Answer {
    /// These bytes, then the next request on the connection.
    Whole(Vec<u8>),
    /// The first bytes, then the test's go on the gate, then the second, then the connection
    /// is closed (`close`) or held until the data plane closes it.
    TwoParts(Vec<u8>, Vec<u8>, bool),
}

/// A head of `n` fields in all: `x-f*` ones and a `content-length` of 2, for a body of "ok".
fn fields(n: usize) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..n - 1 {
        out.extend_from_slice(format!("x-f{i}: {i}\r\n").as_bytes());
    }
    out.extend_from_slice(b"content-length: 2\r\n\r\nok");
    out
}

const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";

fn answer(req: &Received, conn: usize) -> Answer {
    let whole = |s: String| Answer::Whole(s.into_bytes());
    match req.path.as_str() {
        "/keep" => whole(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-conn: {conn}\r\n\r\nok"
        )),
        // Both kept open by the backend: only the data plane's reading decides.
        "/http10" => whole(format!(
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\nx-conn: {conn}\r\n\r\nok"
        )),
        "/close" => whole(format!(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\nx-conn: {conn}\r\n\r\nok"
        )),
        "/huge-head" => {
            // 256 KiB in four fields: past the size limit, far below the field limit.
            let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..4 {
                out.extend_from_slice(format!("x-big-{i}: ").as_bytes());
                out.extend(std::iter::repeat_n(b'a', 64 * 1024));
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"content-length: 2\r\n\r\nok");
            Answer::Whole(out)
        }
        "/fields-128" => Answer::Whole(fields(128)),
        "/fields-129" => Answer::Whole(fields(129)),
        "/switch" => whole(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
                .into(),
        ),
        "/bad-chunk-size" => Answer::TwoParts(
            CHUNKED_HEAD.to_vec(),
            b"zz\r\nmore\r\n0\r\n\r\n".to_vec(),
            false,
        ),
        "/no-crlf" => Answer::TwoParts(
            CHUNKED_HEAD.to_vec(),
            b"5\r\nworldXX0\r\n\r\n".to_vec(),
            false,
        ),
        "/cut" => Answer::TwoParts(CHUNKED_HEAD.to_vec(), Vec::new(), true),
        "/echo" => {
            let framing = if req.chunked {
                "chunked"
            } else if req.head.contains("\r\ncontent-length:") {
                "length"
            } else {
                "none"
            };
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nx-framing: {framing}\r\ncontent-length: {}\r\n\r\n",
                req.body.len()
            )
            .into_bytes();
            out.extend_from_slice(&req.body);
            Answer::Whole(out)
        }
        // Health checks, and anything else.
        _ => whole("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into()),
    }
}

/// Reads more of the connection into `buf`; false at its end.
async fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match conn.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// The next CRLF-terminated line from `buf` (without its CRLF), reading as needed.
async fn line(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..end].to_vec();
            buf.drain(..end + 2);
            return Some(line);
        }
        if !fill(conn, buf).await {
            return None;
        }
    }
}

/// Reads one request: its head, and its body by `Content-Length` or chunked.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if !fill(conn, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end + 2]).to_ascii_lowercase();
    buf.drain(..end + 4);
    let path = head.split(' ').nth(1)?.to_owned();
    let chunked = head.contains("\r\ntransfer-encoding: chunked\r\n");
    let mut body = Vec::new();
    if chunked {
        loop {
            let size_line = line(conn, buf).await?;
            let size = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !line(conn, buf).await?.is_empty() {}
                break;
            }
            while buf.len() < size + 2 {
                if !fill(conn, buf).await {
                    return None;
                }
            }
            body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n", "chunk data ends in CRLF");
            buf.drain(..size + 2);
        }
    } else if let Some(n) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while buf.len() < n {
            if !fill(conn, buf).await {
                return None;
            }
        }
        body = buf.drain(..n).collect();
    }
    Some(Received {
        path,
        head,
        body,
        chunked,
    })
}

async fn serve(mut conn: TcpStream, id: usize, gate: Arc<Notify>) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut conn, &mut buf).await {
        match answer(&req, id) {
            Answer::Whole(bytes) => {
                if conn.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::TwoParts(first, second, close) => {
                if conn.write_all(&first).await.is_err() {
                    return;
                }
                gate.notified().await;
                if conn.write_all(&second).await.is_err() || close {
                    return;
                }
                // Held until the data plane lets go of it.
                while fill(&mut conn, &mut buf).await {}
                return;
            }
        }
    }
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Notify::new());
        let next = Arc::new(AtomicUsize::new(0));
        let conns_gate = Arc::clone(&gate);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let id = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(conn, id, Arc::clone(&conns_gate)));
            }
        });
        Scripted { addr, gate }
    }
}

/// The scripted backend behind a one-worker data plane (one pool of backend connections), with
/// the default policies.
async fn stack() -> (Scripted, Dp) {
    let backend = Scripted::start().await;
    let dp = Dp::start(|_| {}, dp::snapshot(&[backend.addr])).await;
    (backend, dp)
}

/// Requests to the backend counted as its failures.
fn errors(dp: &Dp, backend: &Scripted) -> u64 {
    let active = dp.shared.active().unwrap();
    active.slots[dp.slot_of(backend.addr)]
        .endpoint
        .errors
        .load(Ordering::Relaxed)
}

/// GET `path`: the status, and the body, which must be whole.
async fn get(dp: &Dp, path: &str) -> dp::Seen {
    let seen = dp.send(get_request(path)).await.expect("a response head");
    assert!(seen.body.is_ok(), "{path}: the body was cut short");
    seen
}

#[tokio::test]
async fn a_response_head_larger_than_64_kib_is_a_502_charged_to_the_backend() {
    let (backend, dp) = stack().await;
    let seen = get(&dp, "/huge-head").await;
    assert_eq!(seen.status, 502);
    assert_eq!(seen.json()["error"], "bad_gateway");
    assert_eq!(errors(&dp, &backend), 1);
    // Only that exchange failed.
    assert_eq!(get(&dp, "/keep").await.status, 200);
    assert_eq!(errors(&dp, &backend), 1);
    dp.stop().await;
}

#[tokio::test]
async fn a_response_with_more_than_128_fields_is_a_502_and_128_are_passed_on() {
    let (backend, dp) = stack().await;
    let seen = get(&dp, "/fields-129").await;
    assert_eq!(seen.status, 502);
    assert_eq!(seen.json()["error"], "bad_gateway");
    assert_eq!(errors(&dp, &backend), 1);
    let seen = get(&dp, "/fields-128").await;
    assert_eq!((seen.status.as_u16(), seen.text().as_str()), (200, "ok"));
    for i in 0..127 {
        assert_eq!(seen.header(&format!("x-f{i}")), Some(&*i.to_string()));
    }
    dp.stop().await;
}

#[tokio::test]
async fn switching_protocols_from_a_backend_is_a_502_not_passed_on() {
    let (backend, dp) = stack().await;
    let seen = get(&dp, "/switch").await;
    assert_eq!(seen.status, 502);
    assert_eq!(seen.json()["error"], "bad_gateway");
    assert!(seen.header("upgrade").is_none());
    assert_eq!(errors(&dp, &backend), 1);
    dp.stop().await;
}

/// The backend connection a GET of `path` went out on.
async fn conn_of(dp: &Dp, path: &str) -> String {
    let seen = get(dp, path).await;
    assert_eq!((seen.status.as_u16(), seen.text().as_str()), (200, "ok"));
    seen.header("x-conn").expect("x-conn").to_owned()
}

#[tokio::test]
async fn connections_are_reused_after_keep_alive_only() {
    let (_backend, dp) = stack().await;
    // HTTP/1.1 without `Connection: close`: the next request goes on the same connection.
    let first = conn_of(&dp, "/keep").await;
    assert_eq!(conn_of(&dp, "/keep").await, first);
    // After an HTTP/1.0 answer (on the pooled connection), the connection is left; the next
    // request, HTTP/1.0 again, goes on a new one, and so does the one after it.
    let http10 = conn_of(&dp, "/http10").await;
    assert_eq!(http10, first, "the pooled connection carried it");
    let again = conn_of(&dp, "/http10").await;
    assert_ne!(again, http10, "reused after an HTTP/1.0 answer");
    let after = conn_of(&dp, "/keep").await;
    assert_ne!(after, again, "reused after an HTTP/1.0 answer");
    // `Connection: close` likewise, though the backend keeps the connection open.
    let closing = conn_of(&dp, "/close").await;
    assert_eq!(closing, after, "the pooled connection carried it");
    let next = conn_of(&dp, "/close").await;
    assert_ne!(next, closing, "reused after Connection: close");
    assert_ne!(
        conn_of(&dp, "/keep").await,
        next,
        "reused after Connection: close"
    );
    dp.stop().await;
}

#[tokio::test]
async fn a_chunked_body_that_breaks_or_stops_ends_short_and_counts_against_the_backend() {
    let (backend, dp) = stack().await;
    for (i, path) in ["/bad-chunk-size", "/no-crlf", "/cut"]
        .into_iter()
        .enumerate()
    {
        // The head and a first chunk ("hello") come; the rest only once the client has the
        // head, so what the client sees does not depend on timing.
        let resp = dp.open(get_request(path)).await.expect("a response head");
        assert_eq!(resp.status(), 200, "{path}");
        backend.gate.notify_one();
        let body = resp.into_body().collect().await;
        assert!(body.is_err(), "{path}: the client got a whole body");
        wait_until(&format!("{path} to count as the backend's error"), || {
            errors(&dp, &backend) == i as u64 + 1
        })
        .await;
    }
    // Each broken connection was dropped: the next request is served.
    assert_eq!(get(&dp, "/keep").await.status, 200);
    dp.stop().await;
}

#[tokio::test]
async fn a_chunked_upload_of_unknown_length_reaches_the_backend_chunked_and_whole() {
    let (_backend, dp) = stack().await;
    let parts: Vec<Bytes> = [1usize, 10, 4096, 100_000, 7]
        .iter()
        .enumerate()
        .map(|(i, &n)| Bytes::from(vec![b'a' + i as u8; n]))
        .collect();
    let sent: Vec<u8> = parts.concat();
    // A body of unknown length, fed as the request goes: the client frames it chunked.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let feeder = tokio::spawn(async move {
        for p in parts {
            tx.send(Ok(Frame::data(p))).await.unwrap();
        }
    });
    let req = Request::post("/echo")
        .header("host", "localhost")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    let seen = dp.send(req).await.expect("a response head");
    feeder.await.unwrap();
    assert_eq!(seen.status, 200);
    assert_eq!(seen.header("x-framing"), Some("chunked"));
    let echoed = seen.body.expect("a whole body");
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "the backend got other bytes than were sent");
    dp.stop().await;
}
