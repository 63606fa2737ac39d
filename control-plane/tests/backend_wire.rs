//! What backends send on the wire, and what clients get through the data plane: chunked bodies
//! with extensions and trailers, interim 1xx responses, bodies delimited by the close, HEAD,
//! malformed or conflicting response heads, connections a backend closes while they sit idle in
//! the pool, a body the backend stops sending, bodies cut short counted against the backend, and
//! a stream judged by its head while it lasts.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use data_plane::policy::breaker::CircuitState;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A backend that answers each path with fixed bytes. `/bye` answers and then closes the
/// connection (as a backend's keep-alive timeout would), reporting the close on `closed`.
/// `/cut-later` sends a head and part of a body, and closes when `cut` is notified.
struct RawBackend {
    addr: std::net::SocketAddr,
    closed: mpsc::UnboundedReceiver<()>,
    cut: Arc<tokio::sync::Notify>,
}

fn answer(method: &str, path: &str, conn: usize) -> (Vec<u8>, bool) {
    let fixed = |s: &str| (s.as_bytes().to_vec(), false);
    match path {
        "/chunked" => fixed(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 1\r\n\r\n",
        ),
        "/hop-by-hop" => fixed(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret-hop\r\nx-secret-hop: 1\r\n\
             keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nx-kept: yes\r\n\
             transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        "/interim" => fixed(
            "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
        ),
        "/until-close" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of this, until the close"
                .to_vec(),
            true,
        ),
        "/conflicting-length" => {
            fixed("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd")
        }
        "/garbage" => fixed("SPEAKING SOMETHING ELSE\r\n\r\n"),
        "/bye" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye".to_vec(),
            true,
        ),
        "/cut-short" => (
            b"HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\ncontent-length: 100\r\n\r\npartial"
                .to_vec(),
            true,
        ),
        "/fail" => fixed("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nfail"),
        "/conn" => (
            format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-conn: {conn}\r\n\r\n").into_bytes(),
            false,
        ),
        _ if method == "HEAD" => fixed("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"),
        _ => (
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{method}",
                method.len()
            )
            .into_bytes(),
            false,
        ),
    }
}

impl RawBackend {
    async fn start() -> RawBackend {
        let listener = listener().await;
        let addr = listener.local_addr().unwrap();
        let (tx, closed) = mpsc::unbounded_channel();
        let next = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(tokio::sync::Notify::new());
        let cut_conns = Arc::clone(&cut);
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let id = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(conn, id, tx.clone(), Arc::clone(&cut_conns)));
            }
        });
        RawBackend { addr, closed, cut }
    }
}

/// Serves requests (head, then a `content-length` body) until the client or the script closes.
async fn serve(
    mut conn: TcpStream,
    id: usize,
    closed: mpsc::UnboundedSender<()>,
    cut: Arc<tokio::sync::Notify>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if head.starts_with("GET /stall ") {
            // Sends the head and part of the body, then nothing more, holding the connection.
            let part = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial";
            let _ = conn.write_all(part).await;
            std::future::pending::<()>().await;
        }
        if head.starts_with("GET /cut-later ") {
            let part = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial";
            let _ = conn.write_all(part).await;
            cut.notified().await;
            return;
        }
        if head.starts_with("GET /flood ") {
            // A body without end, sent as fast as the connection takes it.
            let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            let chunk = [b'x'; 16 * 1024];
            loop {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(&chunk);
                out.extend_from_slice(b"\r\n");
                if conn.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        if head.starts_with("POST /early ") {
            // Refuses the body without reading it, and keeps the connection open.
            let refusal = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo much";
            let _ = conn.write_all(refusal).await;
            std::future::pending::<()>().await;
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .map_or(0, |v| v.parse().unwrap());
        while buf.len() < end + 4 + length {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + 4 + length);
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap(), words.next().unwrap());
        let (bytes, close) = answer(method, path, id);
        if conn.write_all(&bytes).await.is_err() {
            return;
        }
        if close {
            drop(conn);
            if path == "/bye" {
                let _ = closed.send(());
            }
            return;
        }
    }
}

async fn stack() -> (RawBackend, Cp, Dp) {
    let backend = RawBackend::start().await;
    let cp = Cp::start(snapshot_with(&[backend.addr]), None).await;
    // One worker: every request uses the same pool of backend connections.
    let dp = Dp::start_with(&cp.url(), "dp-1", |s| s.workers = 1).await;
    dp.wait_version(1).await;
    (backend, cp, dp)
}

#[tokio::test]
async fn bodies_come_through_however_the_backend_delimits_them() {
    let (_backend, _cp, dp) = stack().await;
    let client = http_client();

    let r = get(&client, &dp.url("/chunked")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"hello world"[..]));
    let r = get(&client, &dp.url("/interim")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"final"[..]));
    let r = get(&client, &dp.url("/until-close")).await;
    assert_eq!(
        (r.status, &r.body[..]),
        (200, &b"all of this, until the close"[..])
    );
    let head = http::Request::head(dp.url("/anything"))
        .body(Full::default())
        .unwrap();
    let r = send(&client, head).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "100");
    assert!(r.body.is_empty());
    // Every exchange above left its connection usable or closed it: the next still works.
    let post = http::Request::post(dp.url("/echo"))
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let r = send(&client, post).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"POST"[..]));
}

#[tokio::test]
async fn hop_by_hop_fields_of_a_response_stop_at_the_proxy() {
    let (_backend, _cp, dp) = stack().await;
    let r = get(&http_client(), &dp.url("/hop-by-hop")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
    assert_eq!(r.headers["x-kept"], "yes");
    for gone in ["x-secret-hop", "keep-alive", "proxy-connection"] {
        assert!(!r.headers.contains_key(gone), "{gone}: {:?}", r.headers);
    }
    // The proxy's own framing and connection handling, not the backend's.
    assert!(
        r.headers
            .get("connection")
            .is_none_or(|v| v != "keep-alive, x-secret-hop"),
        "{:?}",
        r.headers
    );
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let (_backend, _cp, dp) = stack().await;
    let client = http_client();
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = get(&client, &dp.url("/conn")).await;
        assert_eq!(r.status, 200);
        ids.insert(r.headers["x-conn"].to_str().unwrap().to_owned());
    }
    // One connection, or two if a health check held the first at some point.
    assert!(ids.len() <= 2, "backend connections used: {ids:?}");
}

#[tokio::test]
async fn malformed_or_conflicting_response_heads_are_a_502() {
    let (_backend, _cp, dp) = stack().await;
    let client = http_client();
    for path in ["/garbage", "/conflicting-length"] {
        let r = get(&client, &dp.url(path)).await;
        assert_eq!(r.status, 502, "{path}");
        assert_eq!(r.json()["error"], "bad_gateway", "{path}");
    }
    assert_eq!(get(&client, &dp.url("/conn")).await.status, 200);
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_costs_no_request() {
    let (mut backend, _cp, dp) = stack().await;
    let client = http_client();
    for _ in 0..5 {
        let r = get(&client, &dp.url("/bye")).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"bye"[..]));
        backend.closed.recv().await.unwrap();
        // Not idempotent, so it could not be retried had it gone out on the closed connection.
        let post = http::Request::post(dp.url("/echo"))
            .body(Full::new(Bytes::from_static(b"order")))
            .unwrap();
        let r = send(&client, post).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"POST"[..]));
    }
}

#[tokio::test]
async fn a_backend_that_answers_before_reading_the_body_is_heard() {
    let (_backend, _cp, dp) = stack().await;
    // Far more than the socket buffers hold, so the upload stalls once the backend stops reading.
    const BODY: usize = 8 << 20;
    let conn = TcpStream::connect(dp.addr).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let sent = tokio::spawn(async move {
        let head = format!("POST /early HTTP/1.1\r\nhost: t\r\ncontent-length: {BODY}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..BODY / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        std::io::Result::Ok(wr)
    });
    // The status line: the proxy reads the rest of the body the backend did not take, so the
    // client, still sending, is not reset under the answer.
    let reply = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        Some(
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap()
                .to_owned(),
        )
    });
    // The proxy answered with the backend's refusal, not a 502 or a timeout.
    let m = &dp.shared.metrics;
    eventually("the backend's 413 to be passed on", || {
        m.responses[2].get() == 1
    })
    .await;
    assert_eq!(m.responses[3].get(), 0, "no 5xx");
    assert_eq!(
        reply.await.unwrap().as_deref(),
        Some("HTTP/1.1 413 Payload Too Large")
    );
    // The whole body went out: the proxy read what the backend would not, instead of leaving
    // the client to a reset.
    let sent = sent.await.unwrap();
    assert!(sent.is_ok(), "the client could not send its body: {sent:?}");
    // That connection is not reused; the next request gets a fresh one.
    let r = get(&http_client(), &dp.url("/conn")).await;
    assert_eq!(r.status, 200);
}

/// GET `path` from a new client (a connection that ended with a broken body is not reused): the
/// whole body, or `None` when the connection failed before the head or in the body.
async fn whole_body(dp: &Dp, path: &str) -> Option<Bytes> {
    let client = http_client();
    let req = http::Request::get(dp.url(path))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?;
    Some(body.to_bytes())
}

#[tokio::test]
async fn a_cacheable_body_cut_short_is_not_kept() {
    let backend = RawBackend::start().await;
    let mut snapshot = snapshot_with(&[backend.addr]);
    snapshot.cache = Some(lb_proto::v1::CachePolicy {
        enabled: true,
        ..lb_proto::defaults::cache()
    });
    let cp = Cp::start(snapshot, None).await;
    let dp = Dp::start(&cp.url(), "dp-1").await;
    dp.wait_version(1).await;
    for _ in 0..2 {
        // The client never gets the short body as if it were whole.
        assert!(whole_body(&dp, "/cut-short").await.is_none());
    }
    let stats = dp.shared.cache.stats();
    assert_eq!((stats.stored, stats.memory.bytes), (0, 0), "{stats:?}");
}

/// A control plane and a data plane in front of `backend`, with `timeouts`, version 1 applied.
async fn serve_with_timeouts(
    backend: std::net::SocketAddr,
    timeouts: lb_proto::v1::TimeoutPolicy,
) -> (Cp, Dp) {
    let mut snapshot = snapshot_with(&[backend]);
    snapshot.timeouts = Some(timeouts);
    let cp = Cp::start(snapshot, None).await;
    let dp = Dp::start(&cp.url(), "dp-1").await;
    dp.wait_version(1).await;
    (cp, dp)
}

/// GETs `/stall` (a 200 head, then a body that never ends) and checks that the client sees the
/// body end short within `within`; `left_waiting` says what it means if not.
async fn stalled_body_is_cut(dp: &Dp, within: std::time::Duration, left_waiting: &str) {
    let req = http::Request::get(dp.url("/stall"))
        .body(Full::default())
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(within, http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .expect(left_waiting);
    assert!(body.is_err());
}

#[tokio::test]
async fn a_body_the_backend_stops_sending_is_cut_after_the_request_timeout() {
    let backend = RawBackend::start().await;
    let timeouts = lb_proto::v1::TimeoutPolicy {
        request_ms: 300,
        ..lb_proto::defaults::timeouts()
    };
    let (_cp, dp) = serve_with_timeouts(backend.addr, timeouts).await;
    // The head came and the end of the body never will: the client is told, by the response
    // ending short, instead of waiting as long as the backend holds the connection.
    stalled_body_is_cut(
        &dp,
        std::time::Duration::from_secs(30),
        "the client was left waiting on a body the backend stopped sending",
    )
    .await;
    // Only that response was cut: the data plane serves on.
    let r = get(&http_client(), &dp.url("/after")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"GET"[..]));
}

#[tokio::test]
async fn a_body_idle_timeout_of_its_own_cuts_a_stalled_body_before_the_request_timeout() {
    let backend = RawBackend::start().await;
    let timeouts = lb_proto::v1::TimeoutPolicy {
        request_ms: 60_000,
        body_idle_ms: Some(300),
        ..lb_proto::defaults::timeouts()
    };
    let (_cp, dp) = serve_with_timeouts(backend.addr, timeouts).await;
    // Cut by the body's own limit, well before the minute the head was allowed.
    stalled_body_is_cut(
        &dp,
        std::time::Duration::from_secs(20),
        "the body's wait was bounded by the request timeout, not body_idle_ms",
    )
    .await;
}

#[tokio::test]
async fn body_idle_ms_zero_lets_a_stream_stay_silent_under_a_request_timeout() {
    let backend = RawBackend::start().await;
    let timeouts = |body_idle_ms| lb_proto::v1::TimeoutPolicy {
        request_ms: 300,
        body_idle_ms,
        ..lb_proto::defaults::timeouts()
    };
    let (_cp, dp) = serve_with_timeouts(backend.addr, timeouts(Some(0))).await;
    let active = dp.shared.active().unwrap();
    let ms = std::time::Duration::from_millis;
    assert_eq!(
        (active.timeouts.request, active.timeouts.body_idle),
        (Some(ms(300)), None)
    );
    // Unset, the body's wait is the request timeout's.
    let mut unset = snapshot_with(&[backend.addr]);
    unset.version = 2;
    unset.timeouts = Some(timeouts(None));
    let prepared = dp.shared.prepare(unset).unwrap();
    assert_eq!(prepared.timeouts.body_idle, Some(ms(300)));
}

/// A data plane in front of one backend whose circuit two 500s have opened (a 30% failure rate
/// over at least two requests, reopening after 100 ms, one trial; outlier ejection off), and
/// the response to the first request for `path` let through as the half-open trial: a 200 head
/// whose body is still to come. No body timeout applies, so a silent stream is not cut.
async fn half_open_trial(
    path: &str,
) -> (RawBackend, Cp, Dp, http::Response<hyper::body::Incoming>) {
    let backend = RawBackend::start().await;
    let mut snapshot = snapshot_with(&[backend.addr]);
    snapshot.circuit_breaker = Some(lb_proto::v1::CircuitBreakerPolicy {
        failure_rate_percent: 30,
        window_ms: 10_000,
        min_requests: 2,
        open_ms: 100,
        half_open_trials: 1,
    });
    snapshot.outlier = Some(lb_proto::v1::OutlierPolicy {
        consecutive_failures: 0,
        ..lb_proto::defaults::outlier()
    });
    snapshot.timeouts = Some(lb_proto::v1::TimeoutPolicy {
        body_idle_ms: Some(0),
        ..lb_proto::defaults::timeouts()
    });
    let cp = Cp::start(snapshot, None).await;
    let dp = Dp::start(&cp.url(), "dp-1").await;
    dp.wait_version(1).await;
    let client = http_client();
    for _ in 0..2 {
        assert_eq!(get(&client, &dp.url("/fail")).await.status, 500);
    }
    let active = dp.shared.active().unwrap();
    assert_eq!(active.slots[0].endpoint.circuit_state(), CircuitState::Open);
    // Once open_ms has passed, the next request is the trial.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let trial = loop {
        let req = http::Request::get(dp.url(path))
            .body(Full::default())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        if resp.status() == 200 {
            break resp;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            tokio::time::Instant::now() < deadline,
            "no trial was let through"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    (backend, cp, dp, trial)
}

#[tokio::test]
async fn a_half_open_circuit_closes_on_a_trial_that_still_streams() {
    // The trial's body stays silent until the backend breaks it off, as an event stream
    // between events.
    let (backend, _cp, dp, stream) = half_open_trial("/cut-later").await;
    let active = dp.shared.active().unwrap();
    let endpoint = &active.slots[0].endpoint;
    // Judged by its head while it streams, the trial closes the circuit: traffic flows again
    // without waiting for the stream to end.
    eventually("the circuit to close while its trial streams", || {
        endpoint.circuit_state() == CircuitState::Closed
    })
    .await;
    let r = get(&http_client(), &dp.url("/after")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"GET"[..]));
    // The stream breaks off after all: a failure of the backend's, counted when it happens
    // (one of three in the fresh window reaches the 30% rate).
    backend.cut.notify_one();
    let body = http_body_util::BodyExt::collect(stream.into_body()).await;
    assert!(body.is_err(), "the client sees the body end short");
    eventually("the broken stream to count against the backend", || {
        endpoint.circuit_state() == CircuitState::Open
    })
    .await;
}

#[tokio::test]
async fn a_half_open_circuit_closes_on_a_trial_its_client_reads_slowly() {
    // The trial is a download the backend could send far faster than its client takes it, so
    // the data plane finds the next part of the body ready whenever the client makes room.
    let (_backend, _cp, dp, download) = half_open_trial("/flood").await;
    let active = dp.shared.active().unwrap();
    let endpoint = &active.slots[0].endpoint;
    // The client reads a frame every few milliseconds; the trial is judged by its head while
    // it streams and the circuit closes.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut body = download.into_body();
    let mut read = 0usize;
    while endpoint.circuit_state() != CircuitState::Closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the circuit stayed {:?} while its trial streamed ({read} bytes read)",
            endpoint.circuit_state()
        );
        let frame = http_body_util::BodyExt::frame(&mut body)
            .await
            .expect("the download goes on")
            .expect("the download goes on");
        read += frame.data_ref().map_or(0, |d| d.len());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let r = get(&http_client(), &dp.url("/after")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"GET"[..]));
}

#[tokio::test]
async fn a_backend_that_cuts_bodies_short_is_ejected() {
    let (a, b) = (RawBackend::start().await, RawBackend::start().await);
    let mut snapshot = snapshot_with(&[a.addr, b.addr]);
    snapshot.outlier = Some(lb_proto::v1::OutlierPolicy {
        consecutive_failures: 3,
        base_ejection_ms: 60_000,
        max_ejection_ms: 60_000,
        max_ejection_percent: 50,
    });
    let cp = Cp::start(snapshot, None).await;
    let dp = Dp::start(&cp.url(), "dp-1").await;
    dp.wait_version(1).await;
    // Every head is a 200; every body ends early: the backend closes the connection in it.
    // Both backends answer so, and the ejection cap (half of two) lets one of them go.
    for _ in 0..6 {
        assert!(whole_body(&dp, "/cut-short").await.is_none());
    }
    let active = dp.shared.active().unwrap();
    eventually(
        "a backend to be ejected for the bodies it cut short",
        || {
            let now = data_plane::clock::millis(tokio::time::Instant::now());
            active.slots.iter().any(|s| s.endpoint.is_ejected(now))
        },
    )
    .await;
    let stats = get(&http_client(), &format!("http://{}/stats", dp.admin))
        .await
        .json();
    let errors: u64 = (0..2)
        .map(|i| stats["backends"][i]["errors"].as_u64().unwrap())
        .sum();
    assert_eq!(errors, 6, "{stats}");
}
