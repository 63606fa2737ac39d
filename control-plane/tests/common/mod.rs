//! A stack for end-to-end tests: mock backends, a control plane and data planes in this process,
//! every listener on 127.0.0.1:0, each part stoppable on its own.

#![allow(dead_code)]

#[path = "../../../data-plane/tests/support/dp.rs"]
pub mod data_plane_support;
#[path = "../../../data-plane/tests/support/redis_server.rs"]
pub mod redis_server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use control_plane::ControlPlane;
use control_plane::store::MemoryStore;
use control_plane::tls::ServerTls;
use data_plane::Shared;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lb_proto::v1::ConfigSnapshot;
use lb_proto::v1::admin_client::AdminClient;
use mock_backends::MockBackends;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const TOKEN: &str = "test-admin-token";

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Default policies over `backends`, with the per-IP limit off (tests send many requests from
/// one address; the rate-limit tests turn it on).
pub fn snapshot_with(backends: &[SocketAddr]) -> ConfigSnapshot {
    ConfigSnapshot {
        version: 0,
        ..data_plane_support::snapshot(backends)
    }
}

pub struct Cp {
    pub cp: Arc<ControlPlane>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Cp {
    pub async fn start(initial: ConfigSnapshot, state_file: Option<PathBuf>) -> Cp {
        let grpc = listener().await;
        let http = listener().await;
        Cp::start_on(initial, state_file, grpc, http).await
    }

    pub async fn start_on(
        initial: ConfigSnapshot,
        state_file: Option<PathBuf>,
        grpc: TcpListener,
        http: TcpListener,
    ) -> Cp {
        Cp::start_on_with_tls(initial, state_file, grpc, http, None).await
    }

    /// As [`Cp::start`], both listeners speaking TLS only.
    pub async fn start_tls(initial: ConfigSnapshot, tls: Arc<ServerTls>) -> Cp {
        let grpc = listener().await;
        let http = listener().await;
        Cp::start_on_with_tls(initial, None, grpc, http, Some(tls)).await
    }

    pub async fn start_on_with_tls(
        initial: ConfigSnapshot,
        state_file: Option<PathBuf>,
        grpc: TcpListener,
        http: TcpListener,
        tls: Option<Arc<ServerTls>>,
    ) -> Cp {
        let store = Arc::new(MemoryStore::new(state_file));
        let cp = Arc::new(
            ControlPlane::new(store, initial, TOKEN.into(), None)
                .await
                .unwrap(),
        );
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(control_plane::serve_with_tls(
            Arc::clone(&cp),
            grpc,
            http,
            tls,
            async {
                let _ = rx.await;
            },
        ));
        Cp {
            cp,
            grpc: grpc_addr,
            http: http_addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The gRPC listener's URL when it speaks TLS.
    pub fn tls_url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }

    pub async fn admin(
        &self,
        token: Option<&str>,
    ) -> AdminClient<InterceptedService<Channel, impl tonic::service::Interceptor + use<>>> {
        admin_client(self.grpc, token).await
    }

    /// Waits until every named data plane has acknowledged `version`.
    pub async fn wait_acked(&self, ids: &[&str], version: u64) {
        let mut changes = self.cp.watch_data_planes();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let planes = self.cp.data_planes();
                let done = ids.iter().all(|id| {
                    planes.iter().any(|p| {
                        p.node.as_ref().is_some_and(|n| n.id == *id) && p.applied_version == version
                    })
                });
                if done {
                    return;
                }
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("data planes {ids:?} did not acknowledge version {version}"));
    }

    /// Waits for a data plane's stream to be connected.
    pub async fn wait_connected(&self, id: &str) {
        let mut changes = self.cp.watch_data_planes();
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                if self
                    .cp
                    .data_planes()
                    .iter()
                    .any(|p| p.connected && p.node.as_ref().is_some_and(|n| n.id == id))
                {
                    return;
                }
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("data plane {id} did not connect"));
    }
}

pub async fn admin_client(
    addr: SocketAddr,
    token: Option<&str>,
) -> AdminClient<InterceptedService<Channel, impl tonic::service::Interceptor + use<>>> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    admin_client_on(channel, token)
}

/// An Admin client on a connected channel, presenting `token` when given.
pub fn admin_client_on(
    channel: Channel,
    token: Option<&str>,
) -> AdminClient<InterceptedService<Channel, impl tonic::service::Interceptor + use<>>> {
    let header = token.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    });
    AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    })
}

pub struct Dp {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Dp {
    pub async fn start(control_plane: &str, id: &str) -> Dp {
        Dp::start_with(control_plane, id, |_| {}).await
    }

    pub async fn start_with(
        control_plane: &str,
        id: &str,
        tweak: impl FnOnce(&mut data_plane::Settings),
    ) -> Dp {
        Dp::start_on(control_plane, id, listener().await, listener().await, tweak).await
    }

    /// As [`Dp::start_with`], on listeners the caller already bound (several data planes on one
    /// port at different loopback addresses, say).
    pub async fn start_on(
        control_plane: &str,
        id: &str,
        proxy: TcpListener,
        admin: TcpListener,
        tweak: impl FnOnce(&mut data_plane::Settings),
    ) -> Dp {
        let (addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let mut settings = data_plane::Settings {
            listen: addr,
            admin_listen: admin_addr,
            control_plane: control_plane.to_owned(),
            node_id: id.to_owned(),
            drain_timeout: Duration::from_secs(5),
            ..data_plane::Settings::default()
        };
        tweak(&mut settings);
        let shared = Arc::new(Shared::new(settings));
        let (stop, task) = data_plane_support::spawn(&shared, proxy, admin);
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the shutdown and returns the task to await.
    pub fn begin_stop(&mut self) -> JoinHandle<std::io::Result<()>> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }

    pub async fn stop(mut self) {
        self.begin_stop().await.unwrap().unwrap();
    }
}

pub struct Stack {
    pub mock: MockBackends,
    pub cp: Cp,
    pub dps: Vec<Dp>,
}

impl Stack {
    /// Three mock backends, a control plane over them, `n` data planes with their first config.
    pub async fn start(n: usize) -> Stack {
        Stack::start_with(n, |_| {}).await
    }

    /// As [`Stack::start`], with the initial snapshot changed by `tweak`.
    pub async fn start_with(n: usize, tweak: impl FnOnce(&mut ConfigSnapshot)) -> Stack {
        let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
            .await
            .unwrap();
        let mut snapshot = snapshot_with(&mock.addrs());
        tweak(&mut snapshot);
        let cp = Cp::start(snapshot, None).await;
        let mut dps = Vec::new();
        for i in 0..n {
            let dp = Dp::start(&cp.url(), &format!("dp-{}", i + 1)).await;
            dp.wait_version(1).await;
            dps.push(dp);
        }
        Stack { mock, cp, dps }
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// Reads a response whole.
    pub async fn read(resp: http::Response<hyper::body::Incoming>) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Reply {
    Reply::read(client.request(req).await.unwrap()).await
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(
        client,
        http::Request::get(url).body(Full::default()).unwrap(),
    )
    .await
}

/// Polls `cond` until it holds (for state that has no change notification), at most 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Deadline of each Redis call in tests: short, so calls with Redis gone fail fast.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A Redis store for the server at `url`.
pub async fn redis_store(url: &str) -> Arc<control_plane::redis_store::RedisStore> {
    Arc::new(
        control_plane::redis_store::RedisStore::open(url, REDIS_CALL_TIMEOUT)
            .await
            .unwrap(),
    )
}

impl Cp {
    /// Serves an already built control plane on fresh loopback listeners.
    pub async fn serve(cp: Arc<ControlPlane>) -> Cp {
        let (grpc, http) = (listener().await, listener().await);
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(control_plane::serve(Arc::clone(&cp), grpc, http, async {
            let _ = rx.await;
        }));
        Cp {
            cp,
            grpc: grpc_addr,
            http: http_addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A control plane whose state is in the Redis at `url` (`initial` when it holds none).
    pub async fn start_redis(initial: ConfigSnapshot, url: &str) -> Cp {
        let cp = control_plane::redis_store::control_plane(
            redis_store(url).await,
            initial,
            TOKEN.into(),
            None,
        )
        .await
        .unwrap();
        Cp::serve(cp).await
    }

    /// `http://<its HTTP listener><path>`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Waits until this control plane publishes a version of at least `version`.
    pub async fn wait_version(&self, version: u64) {
        let mut rx = self.cp.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.version >= version),
        )
        .await
        .unwrap_or_else(|_| panic!("control plane did not reach version {version}"))
        .unwrap();
    }
}

/// An HTTP request with an optional bearer token and a body.
pub fn request(
    method: http::Method,
    url: &str,
    token: Option<&str>,
    body: &str,
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    control_plane::clock::now_ms()
}
