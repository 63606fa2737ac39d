//! End-to-end tests of the mock backends over real sockets on 127.0.0.1:0.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mock_backends::{Faults, MockBackends, Stats};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;
type TestClient = Client<HttpConnector, TestBody>;

/// Safety net against hangs; never used to assert on timing.
const GUARD: Duration = Duration::from_secs(20);

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .expect("test step hung")
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start(n: usize) -> MockBackends {
    MockBackends::start(&vec![any_port(); n]).await.unwrap()
}

/// One backend, its address, and a client.
async fn one_backend() -> (MockBackends, SocketAddr, TestClient) {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    (mb, addr, client())
}

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn send(
    client: &TestClient,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Result<Reply, BoxError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let resp = within(client.request(builder.body(body).unwrap())).await?;
    let (parts, body) = resp.into_parts();
    let body = within(body.collect()).await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// As [`send`], which must succeed.
async fn request(
    client: &TestClient,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Reply {
    send(client, method, addr, path, headers, body)
        .await
        .unwrap()
}

async fn get(client: &TestClient, addr: SocketAddr, path: &str) -> Reply {
    get_with(client, addr, path, &[]).await
}

async fn get_with(
    client: &TestClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    request(client, Method::GET, addr, path, headers, empty()).await
}

async fn put_fault(client: &TestClient, addr: SocketAddr, query: &str, patch: Value) -> Reply {
    let path = format!("/_admin/fault{query}");
    let json = [("content-type", "application/json")];
    request(
        client,
        Method::PUT,
        addr,
        &path,
        &json,
        full(patch.to_string()),
    )
    .await
}

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// Streams `total` bytes of the pattern in uneven chunks.
struct PatternUpload {
    sent: usize,
    total: usize,
}

impl Body for PatternUpload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.sent == this.total {
            return Poll::Ready(None);
        }
        let len = (this.total - this.sent).min(50_000);
        let chunk = pattern(this.sent, len);
        this.sent += len;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

/// A request body fed by the test, one chunk at a time.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

#[tokio::test]
async fn data_endpoint_identifies_backend_and_echoes_request_id() {
    let mb = start(2).await;
    let c = client();
    for (i, addr) in mb.addrs().into_iter().enumerate() {
        let name = format!("backend-{}", addr.port());
        assert_eq!(mb.backend(i).name(), name);
        assert_eq!(mb.backend(i).addr(), addr);
        let r = get_with(&c, addr, "/data?x=1&y=2", &[("x-request-id", "req-42")]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-backend"), Some(name.as_str()));
        assert_eq!(r.header("x-request-id"), Some("req-42"));
        let j = r.json();
        assert_eq!(j["backend"], name);
        assert_eq!(j["port"], addr.port());
        assert_eq!(j["request_id"], "req-42");
        assert_eq!(j["path"], "/data");
        assert_eq!(j["query"], "x=1&y=2");
        assert!(j["timestamp_ms"].as_u64().unwrap() > 0);
        assert!(j["message"].is_string());
    }
    let r = get(&c, mb.addrs()[0], "/data").await;
    assert_eq!(r.header("x-request-id"), None);
    assert_eq!(r.json()["request_id"], Value::Null);
    assert_eq!(r.json()["query"], Value::Null);
    mb.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_answer_like_data() {
    let (mb, addr, c) = one_backend().await;
    let r = get(&c, addr, "/api/v1/items?page=3").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["path"], "/api/v1/items");
    assert_eq!(r.json()["query"], "page=3");
    let r = request(&c, Method::POST, addr, "/submit", &[], full("payload")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["method"], "POST");
    mb.shutdown().await;
}

#[tokio::test]
async fn http2_cleartext_is_served() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    let c = h2_client();
    let r = get_with(&c, addr, "/data", &[("x-request-id", "h2")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-request-id"), Some("h2"));
    assert_eq!(r.json()["backend"], format!("backend-{}", addr.port()));
    mb.shutdown().await;
}

#[tokio::test]
async fn health_and_fail_health() {
    let (mb, addr, c) = one_backend().await;
    let r = get(&c, addr, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    let name = format!("backend-{}", addr.port());
    assert_eq!(r.json(), json!({"status": "ok", "backend": name}));

    let r = put_fault(&c, addr, "", json!({"fail_health": true})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["fail_health"], true);
    let r = get(&c, addr, "/health").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["status"], "unhealthy");
    assert_eq!(r.json()["backend"], name);
    assert_eq!(get(&c, addr, "/data").await.status, StatusCode::OK);

    let r = request(&c, Method::DELETE, addr, "/_admin/fault", &[], empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(mb.backend(0).faults(), Faults::default());
    assert_eq!(get(&c, addr, "/health").await.status, StatusCode::OK);
    mb.shutdown().await;
}

#[tokio::test]
async fn status_endpoint() {
    let (mb, addr, c) = one_backend().await;
    let r = get(&c, addr, "/status/404").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["status"], 404);
    assert_eq!(r.json()["backend"], format!("backend-{}", addr.port()));
    let r = get(&c, addr, "/status/503").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = get(&c, addr, "/status/204").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    for bad in ["/status/99", "/status/600", "/status/abc", "/status/"] {
        let r = get_with(&c, addr, bad, &[("x-request-id", "bad")]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.json()["field"], "code", "{bad}");
        assert_eq!(r.header("x-request-id"), Some("bad"));
    }
    mb.shutdown().await;
}

#[tokio::test]
async fn slow_endpoint_and_bad_parameter() {
    let (mb, addr, c) = one_backend().await;
    let r = get(&c, addr, "/slow?ms=5").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["path"], "/slow");
    for bad in ["/slow?ms=abc", "/slow?ms=60001", "/slow?ms=-1", "/slow"] {
        let r = get(&c, addr, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.json()["field"], "ms", "{bad}");
        assert!(
            r.json()["error"].as_str().unwrap().contains("'ms'"),
            "{bad}"
        );
    }
    mb.shutdown().await;
}

#[tokio::test]
async fn echo_describes_the_request() {
    let (mb, addr, c) = one_backend().await;
    let r = request(
        &c,
        Method::POST,
        addr,
        "/echo?a=b",
        &[("x-custom", "one"), ("content-type", "text/plain")],
        full("héllo"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/echo");
    assert_eq!(j["query"], "a=b");
    assert_eq!(j["headers"]["x-custom"], "one");
    assert_eq!(j["headers"]["content-type"], "text/plain");
    assert_eq!(j["body"], "héllo");
    assert_eq!(j["body_bytes"], "héllo".len());

    let r = request(
        &c,
        Method::PUT,
        addr,
        "/echo",
        &[],
        full(vec![b'x'; (1 << 20) + 1]),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json()["error"].is_string());

    let r = request(
        &c,
        Method::PUT,
        addr,
        "/echo",
        &[],
        full(vec![b'x'; 1 << 20]),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body_bytes"], 1 << 20);
    mb.shutdown().await;
}

async fn echo_stream_round_trip(c: &TestClient, addr: SocketAddr) {
    const TOTAL: usize = 10 * 1024 * 1024;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/echo/stream"))
        .body(
            PatternUpload {
                sent: 0,
                total: TOTAL,
            }
            .boxed(),
        )
        .unwrap();
    let resp = within(c.request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-echo-method"], "POST");
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(body.len(), TOTAL);
    assert!(body == pattern(0, TOTAL), "echoed body differs");
}

#[tokio::test]
async fn echo_stream_round_trips_10_mb_over_http1_and_http2() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    echo_stream_round_trip(&client(), addr).await;
    echo_stream_round_trip(&h2_client(), addr).await;
    mb.shutdown().await;
}

#[tokio::test]
async fn echo_stream_answers_before_the_request_body_ends() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    let (tx, rx) = mpsc::channel(4);
    tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("http://{addr}/echo/stream"))
        .body(ChannelBody(rx).boxed())
        .unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.headers()["x-echo-method"], "PUT");
    let mut body = resp.into_body();
    // The first chunk comes back while the request body is still open, which
    // is only possible if the server streams instead of buffering.
    let mut got = Vec::new();
    while got.len() < b"first chunk".len() {
        let frame = within(body.frame()).await.unwrap().unwrap();
        got.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(got, b"first chunk");
    tx.send(Bytes::from_static(b", second")).await.unwrap();
    drop(tx);
    let rest = within(body.collect()).await.unwrap().to_bytes();
    assert_eq!(&rest[..], b", second");
    mb.shutdown().await;
}

#[tokio::test]
async fn bytes_endpoint_streams_the_pattern() {
    let (mb, addr, c) = one_backend().await;
    let n = 200_000;
    let r = get(&c, addr, &format!("/bytes?n={n}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), Some("200000"));
    assert!(r.body == pattern(0, n));

    let r = get(&c, addr, &format!("/bytes?n={n}&chunked=1")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(r.body == pattern(0, n));

    let r = get(&c, addr, "/bytes?n=0").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());

    for bad in ["/bytes?n=x", "/bytes", "/bytes?n=1073741825"] {
        let r = get(&c, addr, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.json()["field"], "n", "{bad}");
    }
    mb.shutdown().await;
}

#[tokio::test]
async fn cacheable_counts_and_sets_cache_headers() {
    let (mb, addr, c) = one_backend().await;
    let r = get(&c, addr, "/cacheable").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("cache-control"), Some("public, max-age=30"));
    assert_eq!(r.header("vary"), None);
    assert_eq!(r.json()["served"], 1);
    let r = get(&c, addr, "/cacheable?max_age=5").await;
    assert_eq!(r.header("cache-control"), Some("public, max-age=5"));
    assert_eq!(r.json()["served"], 2);

    let r = get_with(
        &c,
        addr,
        "/cacheable?vary=accept-language",
        &[("accept-language", "fr")],
    )
    .await;
    assert_eq!(r.header("vary"), Some("accept-language"));
    assert_eq!(r.json()["vary"], "accept-language");
    assert_eq!(r.json()["vary_value"], "fr");
    assert_eq!(r.json()["served"], 3);

    let r = get(&c, addr, "/cacheable?max_age=soon").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["field"], "max_age");
    let r = get(&c, addr, "/cacheable?vary=bad%20name").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["field"], "vary");

    mb.backend(0).reset_stats();
    assert_eq!(get(&c, addr, "/cacheable").await.json()["served"], 1);
    mb.shutdown().await;
}

#[tokio::test]
async fn abort_closes_without_a_response() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    let err = send(&client(), Method::GET, addr, "/abort", &[], empty())
        .await
        .err()
        .expect("/abort must not produce a response");
    assert!(!err.to_string().is_empty());
    // The backend keeps serving other connections.
    assert_eq!(get(&client(), addr, "/data").await.status, StatusCode::OK);
    mb.shutdown().await;
}

#[tokio::test]
async fn abort_body_cuts_the_body_short() {
    let (mb, addr, c) = one_backend().await;
    let req = Request::builder()
        .uri(format!("http://{addr}/abort-body"))
        .body(empty())
        .unwrap();
    let resp = within(c.request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], "1000000");
    let mut body = resp.into_body();
    let mut received = 0;
    let failed = loop {
        match within(body.frame()).await {
            Some(Ok(frame)) => received += frame.into_data().map(|d| d.len()).unwrap_or(0),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(failed, "body must end with an error");
    assert!(received < 1_000_000);
    mb.shutdown().await;
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[tokio::test]
async fn error_status_applies_to_every_non_admin_path() {
    let (mb, addr, c) = one_backend().await;
    let r = put_fault(&c, addr, "", json!({"error_status": 418})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["error_status"], 418);
    for path in ["/data", "/health", "/echo", "/anything"] {
        let r = get_with(&c, addr, path, &[("x-request-id", "e")]).await;
        assert_eq!(r.status, StatusCode::IM_A_TEAPOT, "{path}");
        assert_eq!(r.header("x-request-id"), Some("e"));
        assert_eq!(r.header("x-backend"), Some(mb.backend(0).name().as_str()));
    }
    let r = get(&c, addr, "/_admin/fault").await;
    assert_eq!(r.status, StatusCode::OK);
    let faults: Faults = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(faults.error_status, 418);
    mb.shutdown().await;
}

#[tokio::test]
async fn error_rate_one_always_fails_and_zero_never() {
    let (mb, addr, c) = one_backend().await;
    put_fault(&c, addr, "", json!({"error_rate": 1.0})).await;
    for _ in 0..5 {
        let r = get(&c, addr, "/data").await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(r.json()["error"].as_str().unwrap().contains("error_rate"));
    }
    put_fault(&c, addr, "", json!({"error_rate": 0})).await;
    for _ in 0..5 {
        assert_eq!(get(&c, addr, "/data").await.status, StatusCode::OK);
    }
    mb.shutdown().await;
}

#[tokio::test]
async fn partial_fault_updates_keep_other_fields() {
    let (mb, addr, c) = one_backend().await;
    put_fault(&c, addr, "", json!({"fail_health": true})).await;
    let r = put_fault(&c, addr, "", json!({"latency_ms": 1, "error_rate": 0.25})).await;
    let faults: Faults = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        faults,
        Faults {
            fail_health: true,
            latency_ms: 1,
            error_rate: 0.25,
            ..Faults::default()
        }
    );
    assert_eq!(mb.backend(0).faults(), faults);
    mb.shutdown().await;
}

#[tokio::test]
async fn bad_admin_input_is_rejected_naming_the_field() {
    let (mb, addr, c) = one_backend().await;
    let cases = [
        (json!({"error_rate": 1.5}), "error_rate"),
        (json!({"error_rate": -0.1}), "error_rate"),
        (json!({"error_status": 42}), "error_status"),
        (json!({"error_status": 600}), "error_status"),
        (json!({"latency_ms": 60001}), "latency_ms"),
        (json!({"fail_health": "yes"}), "fail_health"),
        (json!({"refuse_connections": 1}), "refuse_connections"),
        (json!({"latency": 5}), "latency"),
    ];
    for (patch, field) in cases {
        let r = put_fault(&c, addr, "", patch.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{patch}");
        assert_eq!(r.json()["field"], field, "{patch}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(field),
            "{patch}"
        );
    }
    // Nothing was applied by the rejected requests.
    assert_eq!(mb.backend(0).faults(), Faults::default());

    for body in ["not json", "[1, 2]", ""] {
        let r = request(&c, Method::PUT, addr, "/_admin/fault", &[], full(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(r.json()["error"].is_string());
    }

    let r = get(&c, addr, "/_admin/fault?backend=abc").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["field"], "backend");
    let unused = if addr.port() == 1 { 2 } else { addr.port() - 1 };
    let r = get(&c, addr, &format!("/_admin/fault?backend={unused}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["field"], "backend");

    let r = request(&c, Method::POST, addr, "/_admin/fault", &[], empty()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = get(&c, addr, "/_admin/nothing").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    mb.shutdown().await;
}

/// Without the `within` guard: under a paused clock the guard's timer would
/// be advanced past just like the injected latency.
async fn get_status_paused(c: &TestClient, addr: SocketAddr, path: &str) -> StatusCode {
    let resp = c
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test(start_paused = true)]
async fn latency_delays_non_admin_requests_only() {
    let (mb, addr, c) = one_backend().await;
    let r = put_fault(&c, addr, "", json!({"latency_ms": 30_000})).await;
    assert_eq!(r.status, StatusCode::OK);
    // Paused clock: the runtime jumps over the injected sleep, so this is exact and instant.
    for path in ["/health", "/data"] {
        let started = tokio::time::Instant::now();
        assert_eq!(get_status_paused(&c, addr, path).await, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_secs(30), "{path}");
    }
    let started = tokio::time::Instant::now();
    assert_eq!(
        get_status_paused(&c, addr, "/_admin/stats").await,
        StatusCode::OK
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    mb.shutdown().await;
}

/// Sends one keep-alive HTTP/1.1 request on a raw socket and reads the JSON response.
async fn raw_request(stream: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(b"}") {
        let n = within(stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).unwrap()
}

async fn assert_closed(stream: &mut TcpStream) {
    let mut chunk = [0u8; 64];
    match within(stream.read(&mut chunk)).await {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection to be closed, read {n} bytes"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ),
            "{e}"
        ),
    }
}

async fn assert_refused(addr: SocketAddr) {
    let err = within(TcpStream::connect(addr))
        .await
        .expect_err("connect must fail while refusing");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[tokio::test]
async fn refuse_connections_over_http_really_refuses_and_recovers() {
    let mb = start(2).await;
    let (a, b) = (mb.addrs()[0], mb.addrs()[1]);

    let mut open = TcpStream::connect(a).await.unwrap();
    assert!(raw_request(&mut open, "/data").await.contains("200 OK"));

    // The request travels on a connection of the backend it disables; its
    // response must still arrive.
    let c = client();
    let r = put_fault(&c, a, "", json!({"refuse_connections": true})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["refuse_connections"], true);

    assert_refused(a).await;
    assert_closed(&mut open).await;
    let err = send(&client(), Method::GET, a, "/data", &[], empty())
        .await
        .err()
        .expect("no response while refusing");
    assert!(!err.to_string().is_empty());

    // The other backend is unaffected and can revive the first one.
    assert_eq!(get(&c, b, "/data").await.status, StatusCode::OK);
    let r = get(&c, b, &format!("/_admin/fault?backend={}", a.port())).await;
    assert_eq!(r.json()["refuse_connections"], true);
    let r = put_fault(
        &c,
        b,
        &format!("?backend={}", a.port()),
        json!({"refuse_connections": false}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["refuse_connections"], false);

    assert_eq!(mb.backend(0).addr(), a);
    let r = get(&client(), a, "/data").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["port"], a.port());
    mb.shutdown().await;
}

#[tokio::test]
async fn refuse_connections_through_the_api_is_immediate() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    let backend = mb.backend(0).clone();
    for _ in 0..3 {
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert!(raw_request(&mut open, "/health").await.contains("200 OK"));
        backend.set_faults(Faults {
            refuse_connections: true,
            ..Faults::default()
        });
        assert_refused(addr).await;
        assert_closed(&mut open).await;
        backend.set_faults(Faults::default());
        assert_eq!(get(&client(), addr, "/data").await.status, StatusCode::OK);
    }
    // Repeating a state is harmless.
    backend.set_faults(Faults::default());
    assert_eq!(get(&client(), addr, "/data").await.status, StatusCode::OK);
    mb.shutdown().await;
}

#[tokio::test]
async fn refusing_cuts_in_flight_requests_and_works_over_http2() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    let backend = mb.backend(0).clone();
    let slow = tokio::spawn(async move {
        send(&client(), Method::GET, addr, "/slow?ms=60000", &[], empty()).await
    });
    // Wait for the server to have the request, by condition rather than by time.
    within(async {
        while backend.stats().requests_total == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;

    // Over HTTP/2 the admin request shares the connection's lifetime as well.
    let h2 = h2_client();
    let r = put_fault(&h2, addr, "", json!({"refuse_connections": true})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_refused(addr).await;
    assert!(
        within(slow).await.unwrap().is_err(),
        "in-flight request must be cut"
    );

    backend.set_faults(Faults::default());
    let r = request(&h2_client(), Method::GET, addr, "/data", &[], empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    mb.shutdown().await;
}

#[tokio::test]
async fn failed_rebind_is_reported_and_keeps_refusing() {
    let mb = start(2).await;
    let (a, b) = (mb.addrs()[0], mb.addrs()[1]);
    let c = client();
    mb.backend(0).set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let squatter = tokio::net::TcpListener::bind(a).await.unwrap();
    let revive = format!("?backend={}", a.port());
    let r = put_fault(
        &c,
        b,
        &revive,
        json!({"refuse_connections": false, "fail_health": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.json()["error"].as_str().unwrap().contains("re-binding"));
    // Nothing of the rejected update was applied.
    assert!(mb.backend(0).faults().refuse_connections);
    assert!(!mb.backend(0).faults().fail_health);

    drop(squatter);
    let r = put_fault(&c, b, &revive, json!({"refuse_connections": false})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(get(&client(), a, "/health").await.status, StatusCode::OK);
    mb.shutdown().await;
}

#[tokio::test]
async fn admin_controls_other_backends_with_backend_param() {
    let mb = start(2).await;
    let (a, b) = (mb.addrs()[0], mb.addrs()[1]);
    let c = client();
    let r = put_fault(
        &c,
        a,
        &format!("?backend={}", b.port()),
        json!({"error_status": 503}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        get(&c, b, "/data").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&c, a, "/data").await.status, StatusCode::OK);
    assert_eq!(mb.backend(1).faults().error_status, 503);
    assert_eq!(mb.backend(0).faults(), Faults::default());

    let r = request(
        &c,
        Method::DELETE,
        a,
        &format!("/_admin/fault?backend={}", b.port()),
        &[],
        empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(get(&c, b, "/data").await.status, StatusCode::OK);
    mb.shutdown().await;
}

// ---------------------------------------------------------------------------
// Stats and lifecycle
// ---------------------------------------------------------------------------

#[tokio::test]
async fn stats_count_requests_health_checks_paths_and_connections() {
    let mb = start(2).await;
    let (a, b) = (mb.addrs()[0], mb.addrs()[1]);
    let c = client();
    get(&c, a, "/data").await;
    get(&c, a, "/data?x=1").await;
    get(&c, a, "/other").await;
    get(&c, a, "/health").await;
    get(&c, a, "/_admin/fault").await;
    get(&c, a, "/_admin/stats").await;

    let stats = mb.backend(0).stats();
    assert_eq!(stats.requests_total, 3);
    assert_eq!(stats.health_checks_total, 1);
    assert!(stats.connections_total >= 1);
    assert_eq!(
        stats.by_path.into_iter().collect::<Vec<_>>(),
        vec![("/data".to_string(), 2), ("/other".to_string(), 1)]
    );

    // Read through another backend's admin path.
    let r = get(&c, b, &format!("/_admin/stats?backend={}", a.port())).await;
    let over_http: Stats = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(over_http, mb.backend(0).stats());
    assert_eq!(mb.backend(1).stats().requests_total, 0);

    // Faulted requests still count.
    mb.backend(0).set_faults(Faults {
        error_status: 500,
        ..Faults::default()
    });
    get(&c, a, "/data").await;
    assert_eq!(mb.backend(0).stats().requests_total, 4);

    let r = request(&c, Method::DELETE, a, "/_admin/stats", &[], empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    let stats = mb.backend(0).stats();
    assert_eq!(stats.requests_total, 0);
    assert_eq!(stats.health_checks_total, 0);
    assert!(stats.by_path.is_empty());

    let before = mb.backend(1).stats().connections_total;
    for _ in 0..3 {
        let mut s = TcpStream::connect(b).await.unwrap();
        raw_request(&mut s, "/data").await;
    }
    assert_eq!(mb.backend(1).stats().connections_total, before + 3);
    mb.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_listeners_and_idle_connections() {
    let mb = start(2).await;
    let addrs = mb.addrs();
    let mut idle = TcpStream::connect(addrs[0]).await.unwrap();
    raw_request(&mut idle, "/data").await;
    within(mb.shutdown()).await;
    for addr in addrs {
        assert_refused(addr).await;
    }
    assert_closed(&mut idle).await;
}

#[tokio::test]
async fn dropping_stops_serving() {
    let mb = start(1).await;
    let addr = mb.addrs()[0];
    drop(mb);
    assert_refused(addr).await;
}

#[tokio::test]
async fn from_listeners_and_run() {
    let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mock_backends::run(vec![listener], async {
        let _ = stop_rx.await;
    }));
    assert_eq!(get(&client(), addr, "/health").await.status, StatusCode::OK);
    stop_tx.send(()).unwrap();
    within(server).await.unwrap().unwrap();
    assert_refused(addr).await;
}
