//! The control plane's test harness: a stack of mock backends, a control plane and data planes
//! in this process, every listener on 127.0.0.1:0, each part stoppable on its own; Admin API
//! helpers; and, from the data plane's harness (`data-plane/tests/support`), the data plane
//! itself ([`Dp`]), Redis servers, waits with deadlines, scratch directories and the HTTP client.

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
use http_body_util::Full;
use lb_proto::v1::ConfigSnapshot;
use lb_proto::v1::admin_client::AdminClient;
use mock_backends::MockBackends;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

// The helpers every test needs, shared with the data plane's tests.
#[allow(unused_imports)]
pub use data_plane_support::common::{
    HttpClient, Reply, TempDir, WAIT, admitted, burst, free_port, get, get_with, http_client,
    line_with, lines_of, listener, poll_until, poll_within, send, wait_until,
};

pub const TOKEN: &str = "test-admin-token";

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
        Cp::run(cp, grpc, http, tls)
    }

    /// Serves `cp` on these listeners until it is stopped.
    fn run(
        cp: Arc<ControlPlane>,
        grpc: TcpListener,
        http: TcpListener,
        tls: Option<Arc<ServerTls>>,
    ) -> Cp {
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

    /// Checks that the configuration is still at `version`: refused calls made no new one.
    pub fn assert_unchanged(&self, version: u64) {
        assert_eq!(self.cp.version(), version, "a refused call made a version");
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

pub use data_plane_support::Dp;

/// Data planes that follow a control plane (the same [`Dp`] as the data plane's own tests run).
impl Dp {
    /// A data plane named `id` following the control plane at `control_plane`.
    pub async fn join(control_plane: &str, id: &str) -> Dp {
        Dp::join_with(control_plane, id, |_| {}).await
    }

    pub async fn join_with(
        control_plane: &str,
        id: &str,
        tweak: impl FnOnce(&mut data_plane::Settings),
    ) -> Dp {
        Dp::join_on(control_plane, id, listener().await, listener().await, tweak).await
    }

    /// As [`Dp::join_with`], on listeners the caller already bound (several data planes on one
    /// port at different loopback addresses, say).
    pub async fn join_on(
        control_plane: &str,
        id: &str,
        proxy: TcpListener,
        admin: TcpListener,
        tweak: impl FnOnce(&mut data_plane::Settings),
    ) -> Dp {
        let mut settings = data_plane::Settings {
            listen: proxy.local_addr().unwrap(),
            admin_listen: admin.local_addr().unwrap(),
            control_plane: control_plane.to_owned(),
            node_id: id.to_owned(),
            drain_timeout: Duration::from_secs(5),
            ..data_plane::Settings::default()
        };
        tweak(&mut settings);
        Dp::run(Arc::new(Shared::new(settings)), proxy, admin)
    }

    /// The strategy of the configuration in force.
    pub fn strategy(&self) -> String {
        self.shared.active().unwrap().snapshot.strategy.clone()
    }

    /// Its admin listener's `/stats`.
    pub async fn stats(&self) -> serde_json::Value {
        self.admin_json("/stats").await
    }

    /// Sends requests (each one is what tries Redis again) until the rate limits are shared
    /// through Redis again.
    pub async fn wait_limits_shared(&self) {
        let client = http_client();
        poll_until("back to shared enforcement", || async {
            assert_eq!(get(&client, &self.url("/data")).await.status, 200);
            let store = self.stats().await["rate_limit_store"].clone();
            if store == "shared" {
                Ok(())
            } else {
                Err(store)
            }
        })
        .await;
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
        Stack::build(n, None, tweak).await
    }

    /// As [`Stack::start_with`], the data planes on the Redis at `url` (limits and cache
    /// shared through it); the control plane too, with `OnRedis::State`.
    pub async fn on_redis(
        n: usize,
        url: &str,
        what: OnRedis,
        tweak: impl FnOnce(&mut ConfigSnapshot),
    ) -> Stack {
        Stack::build(n, Some((url, what)), tweak).await
    }

    async fn build(
        n: usize,
        redis: Option<(&str, OnRedis)>,
        tweak: impl FnOnce(&mut ConfigSnapshot),
    ) -> Stack {
        let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
            .await
            .unwrap();
        let mut snapshot = snapshot_with(&mock.addrs());
        tweak(&mut snapshot);
        let cp = match redis {
            Some((url, OnRedis::State)) => Cp::start_redis(snapshot, url).await,
            _ => Cp::start(snapshot, None).await,
        };
        let mut dps = Vec::new();
        for i in 0..n {
            let redis = redis.map(|(url, _)| url.to_owned());
            let id = format!("dp-{}", i + 1);
            let dp = Dp::join_with(&cp.url(), &id, move |s| s.redis = redis).await;
            dp.wait_version(1).await;
            dps.push(dp);
        }
        Stack { mock, cp, dps }
    }

    /// The ids of the data planes.
    pub fn ids(&self) -> Vec<String> {
        (1..=self.dps.len()).map(|i| format!("dp-{i}")).collect()
    }
}

/// What a stack keeps in Redis.
#[derive(Clone, Copy, PartialEq)]
pub enum OnRedis {
    /// The data planes' limits and cache.
    Traffic,
    /// That, and the control plane's state.
    State,
}

/// The URL of `path` on each data plane.
pub fn urls(dps: &[Dp], path: &str) -> Vec<String> {
    dps.iter().map(|d| d.url(path)).collect()
}

/// How many times the mock backends served `path`.
pub fn served(mock: &MockBackends, path: &str) -> u64 {
    mock.backends()
        .iter()
        .map(|b| b.stats().by_path.get(path).copied().unwrap_or(0))
        .sum()
}

/// Polls the JSON at `url` (a `/stats`, which reports feed once a second) until `done` holds,
/// for at most 15 s: the last answer.
pub async fn stats_until(
    client: &HttpClient,
    url: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_within(Duration::from_secs(15), what, || async {
        let stats = get(client, url).await.json();
        if done(&stats) { Ok(stats) } else { Err(stats) }
    })
    .await
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
        Cp::run(cp, listener().await, listener().await, None)
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

/// `control-plane serve` on free ports, with the environment that would configure it cleared:
/// add arguments and environment, then run it.
pub fn serve_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"));
    c.args([
        "serve",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    for var in [
        "LB_CONFIG",
        "LB_REDIS_URL",
        "LB_CLUSTER_TOKEN",
        "LB_CLUSTER_TOKEN_FILE",
        "LB_ADMIN_TOKEN",
        "LB_ADMIN_TOKEN_FILE",
        "LB_INSECURE_DISCOVERY",
        "LB_CLIENT_CA",
    ] {
        c.env_remove(var);
    }
    c.stdin(std::process::Stdio::null());
    c
}

/// Requests served by all the backends, per a `/stats` answer.
pub fn backend_requests(stats: &serde_json::Value) -> u64 {
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .sum()
}

/// Checks that gRPC health says `service` ("" for the server as a whole) is serving.
pub async fn assert_serving(channel: Channel, service: &str) {
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .answer()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{service:?}"
    );
}

/// Two control planes on one Redis (reached as `url_a` and as `url_b`: the same store): A
/// starts with two mock backends, B with none and finds A's state; a data plane follows B.
pub async fn two_control_planes(url_a: &str, url_b: &str) -> (MockBackends, Cp, Cp, Dp) {
    let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let a = Cp::start_redis(snapshot_with(&mock.addrs()), url_a).await;
    // B's own initial configuration is not used: Redis already holds A's.
    let b = Cp::start_redis(snapshot_with(&[]), url_b).await;
    assert_eq!(b.cp.snapshot().backends.len(), 2, "B loaded A's state");
    assert_eq!(b.cp.version(), a.cp.version());
    let dp = Dp::join(&b.url(), "dp-b").await;
    dp.wait_version(1).await;
    (mock, a, b, dp)
}

/// Changes made on either of two control planes on one store reach the other and its data
/// plane `dp`: a strategy set on A; a key created on A, then blocked through B. The version
/// of the block.
pub async fn changes_flow_between(a: &Cp, b: &Cp, dp: &Dp) -> u64 {
    let mut admin_a = a.admin(Some(TOKEN)).await;
    let v = admin_a
        .set_strategy(strategy("least_connections"))
        .await
        .new_version();
    b.wait_acked(&[dp.shared.settings.node_id.as_str()], v)
        .await;
    assert_eq!(dp.strategy(), "least_connections");

    // Keys too, and B goes on from there without conflict.
    let k = admin_a
        .create_api_key(new_key("premium", "shared"))
        .await
        .unwrap()
        .into_inner();
    b.wait_version(v + 1).await;
    let mut admin_b = b.admin(Some(TOKEN)).await;
    let keys = admin_b
        .list_api_keys(lb_proto::v1::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key_id, k.key_id);
    let v = admin_b.block_key(by_id(&k.key_id)).await.new_version();
    assert_eq!(
        v, 4,
        "one version each for the strategy, the key and the block"
    );
    dp.wait_version(v).await;
    assert!(dp.shared.active().unwrap().snapshot.keys[0].blocked);
    a.wait_version(v).await;
    assert!(a.cp.snapshot().keys[0].blocked);
    v
}

/// Checks that an Admin call was refused as invalid, with a message that mentions `needle`.
pub fn assert_invalid(e: &tonic::Status, needle: &str) {
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains(needle),
        "{needle:?} not in: {}",
        e.message()
    );
}

/// What an Admin call answered, which must be a success.
pub trait Answered<T> {
    fn answer(self) -> T;
}

impl<T> Answered<T> for Result<tonic::Response<T>, tonic::Status> {
    fn answer(self) -> T {
        self.unwrap_or_else(|e| panic!("the Admin call failed: {e}"))
            .into_inner()
    }
}

/// The version an Admin call that changes the configuration made.
pub trait Changed {
    fn new_version(self) -> u64;
}

impl Changed for Result<tonic::Response<lb_proto::v1::ConfigChange>, tonic::Status> {
    fn new_version(self) -> u64 {
        self.answer().version
    }
}

/// A key to create on `tier` ("" for the default one), labelled `label`.
pub fn new_key(tier: &str, label: &str) -> lb_proto::v1::CreateApiKeyRequest {
    lb_proto::v1::CreateApiKeyRequest {
        tier: tier.into(),
        label: label.into(),
    }
}

pub fn strategy(name: &str) -> lb_proto::v1::SetStrategyRequest {
    lb_proto::v1::SetStrategyRequest {
        strategy: name.into(),
    }
}

/// An API key named by its id.
pub fn by_id(id: &str) -> lb_proto::v1::KeyRef {
    lb_proto::v1::KeyRef {
        key: Some(lb_proto::v1::key_ref::Key::KeyId(id.into())),
    }
}

/// An API key named by itself.
pub fn by_key(key: &str) -> lb_proto::v1::KeyRef {
    lb_proto::v1::KeyRef {
        key: Some(lb_proto::v1::key_ref::Key::ApiKey(key.into())),
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    control_plane::clock::now_ms()
}

/// A child process, killed when the test ends, passed or failed.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
