//! A data plane in the test's process with its configuration applied directly (no control
//! plane: its URL points at a closed port), a plain HTTP client for it, and a small backend.
//! [`Dp`] serves the control plane's tests too, which run data planes of their own.

#![allow(dead_code)]

// Each support file can be used on its own, so each that needs these loads them.
#[allow(clippy::duplicate_mod)]
#[path = "common.rs"]
pub mod common;
#[allow(unused_imports)]
pub use common::{TempDir, WAIT, free_port, listener, poll_until, poll_within, wait_until};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use data_plane::{Settings, Shared};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lb_proto::v1::{Backend, CircuitBreakerPolicy, ConfigSnapshot, Limit, OutlierPolicy};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Dp {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    /// The admin listener (`/stats`, `/metrics`, `/readyz`).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// The default configuration with `backends`, version 1, and no per-IP limit.
pub fn snapshot(backends: &[SocketAddr]) -> ConfigSnapshot {
    let mut s = lb_proto::defaults::snapshot();
    if let Some(rl) = s.rate_limit.as_mut() {
        rl.ip_limit = Some(Limit {
            requests: 0,
            period_ms: 60_000,
        });
    }
    s.version = 1;
    s.backends = backends
        .iter()
        .map(|a| Backend {
            address: a.to_string(),
            weight: 1,
            ..Default::default()
        })
        .collect();
    s
}

/// A circuit breaker opening at `failure_rate_percent` over at least `min_requests` in 10 s,
/// for `open_ms`, then letting one trial through.
pub fn breaker(failure_rate_percent: u32, min_requests: u32, open_ms: u32) -> CircuitBreakerPolicy {
    CircuitBreakerPolicy {
        failure_rate_percent,
        window_ms: 10_000,
        min_requests,
        open_ms,
        half_open_trials: 1,
    }
}

/// Outlier detection that ejects no backend (tests looking at other policies, which it would
/// cut across).
pub fn no_ejection() -> OutlierPolicy {
    OutlierPolicy {
        consecutive_failures: 0,
        ..lb_proto::defaults::outlier()
    }
}

/// A backend answering every request with `answer(request)` as the body, marked `no-store`.
pub async fn backend(answer: fn(&Request<Incoming>) -> String) -> SocketAddr {
    http_backend(move |req| async move { Response::new(Full::new(Bytes::from(answer(&req)))) })
        .await
}

/// A backend serving HTTP/1.1 on a free loopback port, answering every request as `answer`
/// does, marked `no-store` unless the answer says otherwise: its address.
pub async fn http_backend<F, Fut, B>(answer: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = service_fn(move |req| async move {
                let mut resp = answer(req).await;
                let h = resp.headers_mut();
                if !h.contains_key("cache-control") {
                    h.insert("cache-control", "no-store".parse().unwrap());
                }
                Ok::<_, Infallible>(resp)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

impl Dp {
    /// Settings for a one-worker data plane on free ports; `adjust` changes them further.
    pub async fn settings(
        adjust: impl FnOnce(&mut Settings),
    ) -> (Settings, TcpListener, TcpListener) {
        let (proxy, admin, closed) = (listener().await, listener().await, listener().await);
        let mut settings = Settings {
            listen: proxy.local_addr().unwrap(),
            admin_listen: admin.local_addr().unwrap(),
            control_plane: format!("http://{}", closed.local_addr().unwrap()),
            node_id: "test".into(),
            workers: 1,
            drain_timeout: Duration::from_secs(2),
            ..Settings::default()
        };
        drop(closed);
        adjust(&mut settings);
        (settings, proxy, admin)
    }

    /// Starts a data plane running `snapshot`.
    pub async fn start(adjust: impl FnOnce(&mut Settings), snapshot: ConfigSnapshot) -> Dp {
        let (settings, proxy, admin) = Dp::settings(adjust).await;
        let shared = Arc::new(Shared::new(settings));
        shared.apply(shared.prepare(snapshot).unwrap());
        Dp::run(shared, proxy, admin)
    }

    /// Runs the data plane `shared` on these listeners until it is stopped (the control plane's
    /// tests run data planes of their own with it).
    pub fn run(shared: Arc<Shared>, proxy: TcpListener, admin: TcpListener) -> Dp {
        let (addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(data_plane::run_shared(
            Arc::clone(&shared),
            proxy,
            admin,
            async {
                let _ = stopped.await;
            },
        ));
        Dp {
            shared,
            addr,
            admin: admin_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until a configuration of at least `version` is in force.
    pub async fn wait_version(&self, version: u64) {
        let mut rx = self.shared.applied_version();
        tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|v| *v >= version))
            .await
            .unwrap_or_else(|_| panic!("no configuration of version {version} applied"))
            .unwrap();
    }

    /// A series' value in the data plane's metrics.
    pub fn metric(&self, series: &str) -> f64 {
        self.metric_or_none(series)
            .unwrap_or_else(|| panic!("no {series} in\n{}", self.shared.render_metrics()))
    }

    /// A series' value, if the data plane has it yet.
    pub fn metric_or_none(&self, series: &str) -> Option<f64> {
        let text = self.shared.render_metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits for a series to reach a value: the proxy counts after the client sees the effect.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        wait_until(&format!("{series} to reach {value}"), || {
            self.metric_or_none(series).unwrap_or(0.0) >= value
        })
        .await;
        assert_eq!(self.metric(series), value, "{series}");
    }

    /// One GET on a new client connection: status and body.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        get_from(self.addr, path).await
    }

    /// `http://<proxy listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin listener's JSON answer at `path` (`/stats`, `/readyz`).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = get_from(self.admin, path).await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} ({status}): {e}: {body}"))
    }

    /// Puts `snapshot` in force, as if the control plane had sent it.
    pub fn apply(&self, snapshot: ConfigSnapshot) {
        self.shared.apply(self.shared.prepare(snapshot).unwrap());
    }

    /// Puts in force the configuration in force changed by `change`, as the next version: the
    /// version.
    pub fn update(&self, change: impl FnOnce(&mut ConfigSnapshot)) -> u64 {
        let mut snapshot = self.snapshot();
        snapshot.version += 1;
        change(&mut snapshot);
        let version = snapshot.version;
        self.apply(snapshot);
        version
    }

    /// The configuration in force.
    pub fn snapshot(&self) -> ConfigSnapshot {
        let active = self.shared.active().expect("a configuration in force");
        active.snapshot.clone()
    }

    /// Starts the shutdown (the drain) and returns the task to await.
    pub fn begin_stop(&mut self) -> JoinHandle<std::io::Result<()>> {
        let _ = self.stop.take().expect("not stopped yet").send(());
        self.task.take().unwrap()
    }

    pub async fn stop(mut self) {
        let task = self.begin_stop();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("data plane stops")
            .unwrap()
            .unwrap();
    }
}

/// One GET of `path` on a new connection to `addr`: status and body.
pub async fn get_from(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    get_on(TcpStream::connect(addr).await.unwrap(), path).await
}

/// As [`get_from`], from the loopback address `client` (127.0.0.2 and up are as local as
/// 127.0.0.1 on Linux): what another client machine would get.
pub async fn get_as(
    client: std::net::Ipv4Addr,
    addr: SocketAddr,
    path: &str,
) -> (StatusCode, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((client, 0).into()).unwrap();
    get_on(socket.connect(addr).await.unwrap(), path).await
}

async fn get_on(tcp: TcpStream, path: &str) -> (StatusCode, String) {
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = s.send_request(get_request(path)).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads a response head off a raw connection: its lines (the status line first), or `None`
/// when the connection ends before a whole head.
pub async fn read_head(rd: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<String>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    Some(head.lines().map(str::to_owned).collect())
}

/// A GET of `path` with a Host field and no body.
pub fn get_request(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap()
}

/// A response as a client saw it: the head, and the whole body or the error that cut it short.
pub struct Seen {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Result<Bytes, hyper::Error>,
}

impl Seen {
    /// The body as text; panics when it was cut short.
    pub fn text(&self) -> String {
        let body = self.body.as_ref().expect("a whole body");
        String::from_utf8_lossy(body).into_owned()
    }

    /// The body as JSON (the data plane's own answers).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text()).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Dp {
    /// Sends `req` on a new client connection (one that accepts up to 1024 header fields): the
    /// response with its body still to read, or the error when no head came.
    pub async fn open<B>(&self, req: Request<B>) -> Result<Response<Incoming>, hyper::Error>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (mut s, conn) = hyper::client::conn::http1::Builder::new()
            .max_headers(1024)
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(conn);
        s.send_request(req).await
    }

    /// As [`Dp::open`], with the body read to its end (or to its failure).
    pub async fn send<B>(&self, req: Request<B>) -> Result<Seen, hyper::Error>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = self.open(req).await?;
        let (parts, body) = resp.into_parts();
        Ok(Seen {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.map(|b| b.to_bytes()),
        })
    }

    /// Where the backend at `addr` is among the slots of the configuration in force
    /// (`self.shared.active().unwrap().slots[i]`).
    pub fn slot_of(&self, addr: SocketAddr) -> usize {
        let active = self.shared.active().expect("a configuration in force");
        active
            .slots
            .iter()
            .position(|s| s.endpoint.address == addr.to_string())
            .unwrap_or_else(|| panic!("no backend {addr}"))
    }
}
