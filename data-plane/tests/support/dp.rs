//! A data plane in the test's process with its configuration applied directly (no control
//! plane: its URL points at a closed port), a plain HTTP client for it, and a small backend.
//! [`spawn`] is shared with the control plane's tests, which run data planes of their own.

#![allow(dead_code)]

use std::convert::Infallible;
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
use lb_proto::v1::{Backend, ConfigSnapshot, Limit};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Dp {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
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

/// Runs the data plane `shared` on these listeners until the sender fires: the sender and the
/// task to await.
pub fn spawn(
    shared: &Arc<Shared>,
    proxy: TcpListener,
    admin: TcpListener,
) -> (oneshot::Sender<()>, JoinHandle<std::io::Result<()>>) {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(data_plane::run_shared(
        Arc::clone(shared),
        proxy,
        admin,
        async {
            let _ = rx.await;
        },
    ));
    (tx, task)
}

/// A backend answering every request with `answer(request)` as the body, marked `no-store`.
pub async fn backend(answer: fn(&Request<Incoming>) -> String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let mut resp = Response::new(Full::new(Bytes::from(answer(&req))));
                    resp.headers_mut()
                        .insert("cache-control", "no-store".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

impl Dp {
    /// Settings for a one-worker data plane on free ports; `adjust` changes them further.
    pub async fn settings(
        adjust: impl FnOnce(&mut Settings),
    ) -> (Settings, TcpListener, TcpListener) {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        let addr = proxy.local_addr().unwrap();
        let (stop, task) = spawn(&shared, proxy, admin);
        Dp {
            shared,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.metric_or_none(series).unwrap_or(0.0) < value {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed below {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.metric(series), value, "{series}");
    }

    /// One GET on a new client connection: status and body.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("data plane stops")
                .unwrap()
                .unwrap();
        }
    }
}

/// Waits for `cond` to hold, looking every few milliseconds, for at most 10 s.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
