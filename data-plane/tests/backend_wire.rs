//! What backends send on the wire, and what clients get through the data plane: chunked bodies
//! with extensions and trailers, interim 1xx responses, bodies delimited by the close, HEAD,
//! malformed or conflicting response heads, connections a backend closes while they sit idle in
//! the pool, a body the backend stops sending, a stream that stays silent longer than the
//! request timeout, bodies cut short counted against the backend, and a stream judged by its
//! head while it lasts. A data plane in this process, its configuration applied directly, in
//! front of the scripted backend (`support/scripted.rs`).

#[path = "support/dp.rs"]
mod dp;
#[path = "support/scripted.rs"]
mod scripted;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use data_plane::policy::breaker::CircuitState;
use dp::common::{HttpClient, Reply, get, http_client, send};
use dp::{Dp, poll_until, wait_until};
use http_body_util::{BodyExt, Full};
use lb_proto::v1::{ConfigSnapshot, OutlierPolicy, TimeoutPolicy};
use scripted::Scripted;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A data plane (one worker: every request uses the same pool of backend connections) in
/// front of `backend`, with the default policies changed by `adjust`.
async fn serve(backend: &Scripted, adjust: impl FnOnce(&mut ConfigSnapshot)) -> Dp {
    serve_all(&[backend.addr], adjust).await
}

async fn serve_all(backends: &[SocketAddr], adjust: impl FnOnce(&mut ConfigSnapshot)) -> Dp {
    let mut snapshot = dp::snapshot(backends);
    adjust(&mut snapshot);
    Dp::start(|_| {}, snapshot).await
}

async fn stack() -> (Scripted, Dp) {
    let backend = Scripted::start().await;
    let dp = serve(&backend, |_| {}).await;
    (backend, dp)
}

fn post(url: String, body: &'static [u8]) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

#[tokio::test]
async fn bodies_come_through_however_the_backend_delimits_them() {
    let (_backend, dp) = stack().await;
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
    let r = send(&client, post(dp.url("/order"), b"payload")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"POST"[..]));
}

#[tokio::test]
async fn hop_by_hop_fields_of_a_response_stop_at_the_proxy() {
    let (_backend, dp) = stack().await;
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
    let (_backend, dp) = stack().await;
    let client = http_client();
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = get(&client, &dp.url("/keep")).await;
        assert_eq!(r.status, 200);
        ids.insert(r.header("x-conn").to_owned());
    }
    // One connection, or two if a health check held the first at some point.
    assert!(ids.len() <= 2, "backend connections used: {ids:?}");
}

#[tokio::test]
async fn malformed_or_conflicting_response_heads_are_a_502() {
    let (_backend, dp) = stack().await;
    let client = http_client();
    for path in ["/garbage", "/conflicting-length"] {
        let r = get(&client, &dp.url(path)).await;
        assert_eq!(r.status, 502, "{path}");
        assert_eq!(r.json()["error"], "bad_gateway", "{path}");
    }
    assert_eq!(get(&client, &dp.url("/keep")).await.status, 200);
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_costs_no_request() {
    let (mut backend, dp) = stack().await;
    let client = http_client();
    for _ in 0..5 {
        let r = get(&client, &dp.url("/bye")).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"bye"[..]));
        backend.closed.recv().await.unwrap();
        // Not idempotent, so it could not be retried had it gone out on the closed connection.
        let r = send(&client, post(dp.url("/order"), b"order")).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"POST"[..]));
    }
}

#[tokio::test]
async fn a_backend_that_answers_before_reading_the_body_is_heard() {
    let (_backend, dp) = stack().await;
    // A connection in the pool, which the upload then goes out on.
    let client = http_client();
    let pooled = get(&client, &dp.url("/keep")).await;
    let pooled = pooled.header("x-conn").to_owned();
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
    // The head: the proxy reads the rest of the body the backend did not take, so the client,
    // still sending, is not reset under the answer.
    let reply = tokio::spawn(async move { dp::read_head(&mut rd).await });
    // The proxy answered with the backend's refusal, not a 502 or a timeout.
    let m = &dp.shared.metrics;
    wait_until("the backend's 413 to be passed on", || {
        m.responses[2].get() == 1
    })
    .await;
    assert_eq!(m.responses[3].get(), 0, "no 5xx");
    let head = reply.await.unwrap().expect("a response head");
    assert_eq!(head[0], "HTTP/1.1 413 Payload Too Large");
    let refused_on = head
        .iter()
        .find_map(|l| l.strip_prefix("x-conn: "))
        .expect("the backend names its connection");
    assert_eq!(
        refused_on, pooled,
        "the pooled connection carried the upload"
    );
    // The whole body went out: the proxy read what the backend would not, instead of leaving
    // the client to a reset.
    let sent = sent.await.unwrap();
    assert!(sent.is_ok(), "the client could not send its body: {sent:?}");
    // That connection is not reused: the backend never read the body, so the next request
    // gets a fresh one.
    let r = get(&http_client(), &dp.url("/keep")).await;
    assert_eq!(r.status, 200);
    assert_ne!(
        r.header("x-conn"),
        refused_on,
        "the connection whose body the backend refused was reused"
    );
}

/// GET `path` from a new client (a connection that ended with a broken body is not reused): the
/// whole body, or `None` when the connection failed before the head or in the body.
async fn whole_body(dp: &Dp, path: &str) -> Option<Bytes> {
    let req = http::Request::get(dp.url(path))
        .body(Full::default())
        .unwrap();
    let resp = http_client().request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?;
    Some(body.to_bytes())
}

#[tokio::test]
async fn a_cacheable_body_cut_short_is_not_kept() {
    let backend = Scripted::start().await;
    let dp = serve(&backend, |s| {
        s.cache = Some(lb_proto::v1::CachePolicy {
            enabled: true,
            ..lb_proto::defaults::cache()
        });
    })
    .await;
    for _ in 0..2 {
        // The client never gets the short body as if it were whole.
        assert!(whole_body(&dp, "/cut-short").await.is_none());
    }
    let stats = dp.shared.cache.stats();
    assert_eq!((stats.stored, stats.memory.bytes), (0, 0), "{stats:?}");
}

/// A data plane in front of `backend` with these timeouts.
async fn serve_with_timeouts(backend: &Scripted, timeouts: TimeoutPolicy) -> Dp {
    serve(backend, |s| s.timeouts = Some(timeouts)).await
}

fn timeouts(request_ms: u32, body_idle_ms: Option<u32>) -> TimeoutPolicy {
    TimeoutPolicy {
        request_ms,
        body_idle_ms,
        ..lb_proto::defaults::timeouts()
    }
}

/// GETs `/stall` (a 200 head, then a body that never ends) and checks that the client sees the
/// body end short within `within`; `left_waiting` says what it means if not.
async fn stalled_body_is_cut(dp: &Dp, within: Duration, left_waiting: &str) {
    let req = http::Request::get(dp.url("/stall"))
        .body(Full::default())
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(within, resp.into_body().collect())
        .await
        .expect(left_waiting);
    assert!(body.is_err());
}

#[tokio::test]
async fn a_body_the_backend_stops_sending_is_cut_after_the_request_timeout() {
    let backend = Scripted::start().await;
    let dp = serve_with_timeouts(&backend, timeouts(300, None)).await;
    // The head came and the end of the body never will: the client is told, by the response
    // ending short, instead of waiting as long as the backend holds the connection.
    stalled_body_is_cut(
        &dp,
        Duration::from_secs(30),
        "the client was left waiting on a body the backend stopped sending",
    )
    .await;
    // Only that response was cut: the data plane serves on.
    let r = get(&http_client(), &dp.url("/after")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"GET"[..]));
}

#[tokio::test]
async fn a_body_idle_timeout_of_its_own_cuts_a_stalled_body_before_the_request_timeout() {
    let backend = Scripted::start().await;
    let dp = serve_with_timeouts(&backend, timeouts(60_000, Some(300))).await;
    // Cut by the body's own limit, well before the minute the head was allowed.
    stalled_body_is_cut(
        &dp,
        Duration::from_secs(20),
        "the body's wait was bounded by the request timeout, not body_idle_ms",
    )
    .await;
}

/// Lets the request timeout in force pass twice over, by the data plane's own clock: two
/// requests in turn whose backend never answers, each answered 504 once that timeout is up.
async fn two_request_timeouts(dp: &Dp) {
    for _ in 0..2 {
        let r = get(&http_client(), &dp.url("/never")).await;
        assert_eq!(r.status, 504, "{:?}", r.body);
    }
}

/// GETs `/later` (a 200 head promising 100 bytes and the first 7, then silence until the gate
/// opens, then the other 93), lets the body stay silent for twice the request timeout, opens
/// the gate, and says whether the client got the body whole (else the silence cut it).
async fn silence_outlives_the_request_timeout(backend: &Scripted, dp: &Dp) -> bool {
    let req = http::Request::get(dp.url("/later"))
        .body(Full::default())
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first frame").unwrap();
    assert_eq!(first.into_data().unwrap(), "partial");
    two_request_timeouts(dp).await;
    backend.gate.notify_one();
    match body.collect().await {
        Ok(rest) => {
            assert_eq!(rest.to_bytes().len(), 93, "the rest of the body");
            true
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn body_idle_ms_zero_lets_a_stream_stay_silent_under_a_request_timeout() {
    let backend = Scripted::start().await;
    let dp = serve_with_timeouts(&backend, timeouts(300, Some(0))).await;
    let active = dp.shared.active().unwrap();
    let ms = Duration::from_millis;
    assert_eq!(
        (active.timeouts.request, active.timeouts.body_idle),
        (Some(ms(300)), None)
    );
    // A stream silent for twice the request timeout is not cut: only the head was bound by
    // it.
    assert!(
        silence_outlives_the_request_timeout(&backend, &dp).await,
        "a silent stream was cut with body_idle_ms = 0"
    );
    // Unset, the body's wait is the request timeout's: the same silence cuts the stream.
    dp.update(|s| s.timeouts = Some(timeouts(300, None)));
    assert_eq!(
        dp.shared.active().unwrap().timeouts.body_idle,
        Some(ms(300))
    );
    assert!(
        !silence_outlives_the_request_timeout(&backend, &dp).await,
        "a silent stream outlived the request timeout with body_idle_ms unset"
    );
}

/// A data plane in front of one backend whose circuit two 500s have opened (a 30% failure rate
/// over at least two requests, reopening after 100 ms, one trial; outlier ejection off), and
/// the response to the first request for `path` let through as the half-open trial: a 200 head
/// whose body is still to come. No body timeout applies, so a silent stream is not cut.
async fn half_open_trial(path: &str) -> (Scripted, Dp, http::Response<hyper::body::Incoming>) {
    let backend = Scripted::start().await;
    let dp = serve(&backend, |s| {
        s.circuit_breaker = Some(dp::breaker(30, 2, 100));
        s.outlier = Some(dp::no_ejection());
        s.timeouts = Some(TimeoutPolicy {
            body_idle_ms: Some(0),
            ..lb_proto::defaults::timeouts()
        });
    })
    .await;
    let client = http_client();
    for _ in 0..2 {
        assert_eq!(get(&client, &dp.url("/fail")).await.status, 500);
    }
    let active = dp.shared.active().unwrap();
    assert_eq!(active.slots[0].endpoint.circuit_state(), CircuitState::Open);
    // Once open_ms has passed, the next request is the trial; until then, each is a 503.
    let trial = poll_until("a trial to be let through", || {
        trial_request(&client, &dp, path)
    })
    .await;
    (backend, dp, trial)
}

/// A GET of `path`: the response when it is the trial (a 200), else the status it got (a 503).
async fn trial_request(
    client: &HttpClient,
    dp: &Dp,
    path: &str,
) -> Result<http::Response<hyper::body::Incoming>, u16> {
    let req = http::Request::get(dp.url(path))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    match resp.status().as_u16() {
        200 => Ok(resp),
        503 => Err(Reply::read(resp).await.status),
        other => panic!("a {other} while the circuit is open"),
    }
}

#[tokio::test]
async fn a_half_open_circuit_closes_on_a_trial_that_still_streams() {
    // The trial's body stays silent until the backend breaks it off, as an event stream
    // between events.
    let (backend, dp, stream) = half_open_trial("/cut-later").await;
    let active = dp.shared.active().unwrap();
    let endpoint = &active.slots[0].endpoint;
    // Judged by its head while it streams, the trial closes the circuit: traffic flows again
    // without waiting for the stream to end.
    wait_until("the circuit to close while its trial streams", || {
        endpoint.circuit_state() == CircuitState::Closed
    })
    .await;
    let r = get(&http_client(), &dp.url("/after")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"GET"[..]));
    // The stream breaks off after all: a failure of the backend's, counted when it happens
    // (one of three in the fresh window reaches the 30% rate).
    backend.gate.notify_one();
    let body = stream.into_body().collect().await;
    assert!(body.is_err(), "the client sees the body end short");
    wait_until("the broken stream to count against the backend", || {
        endpoint.circuit_state() == CircuitState::Open
    })
    .await;
}

#[tokio::test]
async fn a_half_open_circuit_closes_on_a_trial_its_client_reads_slowly() {
    // The trial is a download the backend could send far faster than its client takes it, so
    // the data plane finds the next part of the body ready whenever the client makes room.
    let (_backend, dp, download) = half_open_trial("/flood").await;
    let active = dp.shared.active().unwrap();
    let endpoint = &active.slots[0].endpoint;
    // The client reads a frame every few milliseconds (it is slow: that is the case under
    // test); the trial is judged by its head while it streams and the circuit closes.
    let deadline = tokio::time::Instant::now() + dp::WAIT;
    let mut body = download.into_body();
    let mut read = 0usize;
    while endpoint.circuit_state() != CircuitState::Closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the circuit stayed {:?} while its trial streamed ({read} bytes read)",
            endpoint.circuit_state()
        );
        let frame = body
            .frame()
            .await
            .expect("the download goes on")
            .expect("the download goes on");
        read += frame.data_ref().map_or(0, Bytes::len);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = get(&http_client(), &dp.url("/after")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"GET"[..]));
}

#[tokio::test]
async fn a_backend_that_cuts_bodies_short_is_ejected() {
    let (a, b) = (Scripted::start().await, Scripted::start().await);
    let dp = serve_all(&[a.addr, b.addr], |s| {
        s.outlier = Some(OutlierPolicy {
            consecutive_failures: 3,
            base_ejection_ms: 60_000,
            max_ejection_ms: 60_000,
            max_ejection_percent: 50,
        });
    })
    .await;
    // Every head is a 200; every body ends early: the backend closes the connection in it.
    // Both backends answer so, and the ejection cap (half of two) lets one of them go.
    for _ in 0..6 {
        assert!(whole_body(&dp, "/cut-short").await.is_none());
    }
    let active = dp.shared.active().unwrap();
    wait_until(
        "a backend to be ejected for the bodies it cut short",
        || {
            let now = data_plane::clock::millis(tokio::time::Instant::now());
            active.slots.iter().any(|s| s.endpoint.is_ejected(now))
        },
    )
    .await;
    let stats = dp.admin_json("/stats").await;
    let errors: u64 = (0..2)
        .map(|i| stats["backends"][i]["errors"].as_u64().unwrap())
        .sum();
    assert_eq!(errors, 6, "{stats}");
}
