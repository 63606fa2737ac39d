//! A backend speaking HTTP/1.1 from a script, for what the data plane does with exactly what a
//! backend puts on the wire: each request's path picks the bytes of the answer (see
//! [`answer`]). Connections are numbered from 0 as they are accepted, and the answers that say
//! so name theirs in `x-conn`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

pub struct Scripted {
    pub addr: SocketAddr,
    /// Lets the second part of a two-part answer go (`/cut`, `/cut-later`…).
    pub gate: Arc<Notify>,
    /// One message each time the script closes a connection after a whole answer (`/bye`,
    /// `/until-close`, `/cut-short`).
    pub closed: mpsc::UnboundedReceiver<()>,
    /// Endless answers (`/flood`, `/endless`) still being written.
    pub streaming: Arc<AtomicUsize>,
}

/// A request as the backend read it.
pub struct Received {
    pub method: String,
    pub path: String,
    /// The head, lower-cased.
    pub head: String,
    pub body: Vec<u8>,
    pub chunked: bool,
}

pub enum Answer {
    /// These bytes, then the next request on the connection.
    Whole(Vec<u8>),
    /// These bytes, then the connection is closed (and reported on `closed`).
    Close(Vec<u8>),
    /// The first bytes, then the test's go on the gate, then the second, then the connection
    /// is closed (`close`) or goes on to the next request.
    TwoParts(Vec<u8>, Vec<u8>, bool),
    /// These bytes, then nothing more: the connection is held, and not read, for as long as
    /// the backend runs.
    Hold(Vec<u8>),
    /// This head, then a chunked body without end, as fast as the connection takes it.
    Endless(&'static [u8]),
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

/// A 200 head promising 100 bytes, and the first 7 of them.
const PARTIAL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial";

/// The answer to a request whose head asks for it before its body is read, if any.
fn early(method: &str, path: &str, conn: usize) -> Option<Answer> {
    match (method, path) {
        // Refuses the body without reading it, and keeps the connection open.
        ("POST", "/early") => Some(Answer::Hold(
            format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nx-conn: {conn}\r\n\r\n\
                 too much"
            )
            .into_bytes(),
        )),
        _ => None,
    }
}

pub fn answer(req: &Received, conn: usize) -> Answer {
    let whole = |s: &str| Answer::Whole(s.as_bytes().to_vec());
    match req.path.as_str() {
        "/keep" => whole(&format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-conn: {conn}\r\n\r\nok"
        )),
        // Both kept open by the backend: only the data plane's reading decides.
        "/http10" => whole(&format!(
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\nx-conn: {conn}\r\n\r\nok"
        )),
        "/close" => whole(&format!(
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
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
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
        "/cut-later" => Answer::TwoParts(PARTIAL.to_vec(), Vec::new(), true),
        "/later" => Answer::TwoParts(PARTIAL.to_vec(), vec![b'x'; 93], false),
        "/stall" => Answer::Hold(PARTIAL.to_vec()),
        // Not even a head.
        "/never" => Answer::Hold(Vec::new()),
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
        "/chunked" => whole(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 1\r\n\r\n",
        ),
        "/hop-by-hop" => whole(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret-hop\r\nx-secret-hop: 1\r\n\
             keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nx-kept: yes\r\n\
             transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        "/interim" => whole(
            "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
        ),
        "/until-close" => Answer::Close(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of this, until the close"
                .to_vec(),
        ),
        "/conflicting-length" => {
            whole("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd")
        }
        "/garbage" => whole("SPEAKING SOMETHING ELSE\r\n\r\n"),
        // Answers, then closes the connection, as a backend's keep-alive timeout would.
        "/bye" => Answer::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye".to_vec()),
        "/cut-short" => Answer::Close(
            b"HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\ncontent-length: 100\r\n\r\n\
              partial"
                .to_vec(),
        ),
        "/fail" => whole("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nfail"),
        "/flood" => Answer::Endless(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        "/endless" => Answer::Endless(
            b"HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\n\
              transfer-encoding: chunked\r\n\r\n",
        ),
        _ if req.method == "HEAD" => whole("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"),
        // Health checks, and anything else: the method, as the body.
        _ => whole(&format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
            req.method.len(),
            req.method
        )),
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

/// Reads one request head.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if !fill(conn, buf).await {
            return None;
        }
    };
    let raw = String::from_utf8_lossy(&buf[..end + 2]).into_owned();
    buf.drain(..end + 4);
    let mut words = raw.split(' ');
    let method = words.next()?.to_owned();
    let path = words.next()?.to_owned();
    let head = raw.to_ascii_lowercase();
    let chunked = head.contains("\r\ntransfer-encoding: chunked\r\n");
    Some(Received {
        method,
        path,
        head,
        body: Vec::new(),
        chunked,
    })
}

/// Reads a request's body, by `Content-Length` or chunked.
async fn read_body(conn: &mut TcpStream, buf: &mut Vec<u8>, req: &mut Received) -> Option<()> {
    if req.chunked {
        loop {
            let size_line = line(conn, buf).await?;
            let size = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !line(conn, buf).await?.is_empty() {}
                return Some(());
            }
            while buf.len() < size + 2 {
                if !fill(conn, buf).await {
                    return None;
                }
            }
            req.body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n", "chunk data ends in CRLF");
            buf.drain(..size + 2);
        }
    }
    if let Some(n) = req
        .head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while buf.len() < n {
            if !fill(conn, buf).await {
                return None;
            }
        }
        req.body = buf.drain(..n).collect();
    }
    Some(())
}

struct Conn {
    id: usize,
    gate: Arc<Notify>,
    closed: mpsc::UnboundedSender<()>,
    streaming: Arc<AtomicUsize>,
}

async fn serve(mut conn: TcpStream, c: Conn) {
    let mut buf = Vec::new();
    while let Some(mut req) = read_head(&mut conn, &mut buf).await {
        let answer = match early(&req.method, &req.path, c.id) {
            Some(a) => a,
            None => {
                if read_body(&mut conn, &mut buf, &mut req).await.is_none() {
                    return;
                }
                answer(&req, c.id)
            }
        };
        match answer {
            Answer::Whole(bytes) => {
                if conn.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::Close(bytes) => {
                let _ = conn.write_all(&bytes).await;
                drop(conn);
                let _ = c.closed.send(());
                return;
            }
            Answer::TwoParts(first, second, close) => {
                if conn.write_all(&first).await.is_err() {
                    return;
                }
                c.gate.notified().await;
                if conn.write_all(&second).await.is_err() || close {
                    return;
                }
            }
            Answer::Hold(bytes) => {
                let _ = conn.write_all(&bytes).await;
                std::future::pending::<()>().await;
            }
            Answer::Endless(head) => {
                c.streaming.fetch_add(1, Ordering::SeqCst);
                let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                if conn.write_all(head).await.is_ok() {
                    while conn.write_all(chunk.as_bytes()).await.is_ok() {}
                }
                c.streaming.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

impl Scripted {
    pub async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Notify::new());
        let streaming = Arc::new(AtomicUsize::new(0));
        let (tx, closed) = mpsc::unbounded_channel();
        let next = AtomicUsize::new(0);
        let (conns_gate, conns_streaming) = (Arc::clone(&gate), Arc::clone(&streaming));
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let c = Conn {
                    id: next.fetch_add(1, Ordering::Relaxed),
                    gate: Arc::clone(&conns_gate),
                    closed: tx.clone(),
                    streaming: Arc::clone(&conns_streaming),
                };
                tokio::spawn(serve(conn, c));
            }
        });
        Scripted {
            addr,
            gate,
            closed,
            streaming,
        }
    }
}
