//! The control plane: it owns the cluster's configuration and pushes it to data planes.
//!
//! - [`settings`]: flags, environment and the TOML file (listeners, initial configuration).
//! - [`store`]: durable state behind the [`store::Store`] trait (embedded, optional file).
//! - [`redis_store`]: the same state in Redis, shared by several control planes, with changes
//!   fanned out between them; and the reader of the data planes' rate-limit state.
//! - [`cluster`]: the state, versioned changes, and the data planes' ACK/NACK record.
//! - [`keys`]: the API key registry (pure): key hashes and ids, tiers, validation.
//! - [`ratelimit`]: key usage and bans as data planes keep them in Redis (pure arithmetic).
//! - [`ops`]: the key and ban operations of gRPC and REST, on the cluster.
//! - [`clock`]: the wall clock.
//! - [`discovery`], [`admin`]: the `lb.v1.Discovery` and `lb.v1.Admin` gRPC services.
//! - [`http`]: REST endpoints, `/stats`, `/metrics` and `/openapi.json`.
//! - [`tls`]: TLS on both listeners, with the data plane's certificate checks and reloads.
//! - [`dashboard`]: the dashboards' pages and their WebSocket feed, `/ws`.
//! - [`dev`]: the all-in-one local stack of `control-plane dev`, and its in-process limiter
//!   state.

pub mod admin;
pub mod admin_layers;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod dashboard;
pub mod dev;
pub mod discovery;
pub mod health;
pub mod http;
pub mod initial;
pub mod keys;
pub mod ops;
pub mod ratelimit;
pub mod redis_store;
pub mod settings;
pub mod store;
pub mod tls;
pub mod trace;
pub mod traffic;

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::sync::Arc;

use lb_proto::v1::admin_server::AdminServer;
use lb_proto::v1::discovery_server::DiscoveryServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::LayerExt as _;

pub use cluster::ControlPlane;
use cluster::UpdateError;
use lb_proto::v1::ConfigSnapshot;

/// Time connections get to finish once shutdown begins. Watch streams and dashboard feeds are
/// ended by the shutdown itself; what remains past it is a client holding an idle connection
/// open (one that never sent a request, say), which would otherwise hold up the stop forever.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A random token of 32 hex digits: 128 bits from the operating system's CSPRNG.
pub fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Exports a span for every Admin call from now on (call before [`serve`]).
pub fn start_tracing(cp: &ControlPlane, settings: Option<&data_plane::common::TraceSettings>) {
    let Some(settings) = settings else { return };
    let instance = data_plane::common::default_node_id();
    match data_plane::common::Tracing::start(settings, "control-plane", &instance) {
        Ok(t) => {
            let _ = cp.tracer.set(Arc::new(t));
        }
        Err(e) => tracing::error!(cause = %e, "traces are not exported"),
    }
}

/// The control plane on its store: Redis when `redis` names one, otherwise the embedded store
/// (keeping its state in `state_file` when given). `initial` is used when the store is empty.
/// With the embedded store, `local_limits` is the data planes' limiter state when the control
/// plane can read it (they run in this process).
pub async fn open(
    redis: Option<&str>,
    redis_ca: Option<&[u8]>,
    state_file: Option<PathBuf>,
    initial: ConfigSnapshot,
    admin_token: String,
    cluster_token: Option<String>,
    local_limits: Option<Arc<dyn ratelimit::SharedLimits>>,
) -> Result<Arc<ControlPlane>, UpdateError> {
    match redis {
        Some(url) => {
            if state_file.is_some() {
                tracing::warn!("--state-file is not used: the state is kept in Redis");
            }
            let store = redis_store::RedisStore::open_with_ca(
                url,
                redis_ca,
                redis_store::DEFAULT_CALL_TIMEOUT,
            )
            .await
            .map_err(UpdateError::Unavailable)?;
            tracing::info!(redis = %store.addr(), "state kept in Redis");
            redis_store::control_plane(Arc::new(store), initial, admin_token, cluster_token).await
        }
        None => {
            let store = Arc::new(store::MemoryStore::new(state_file));
            let cp = ControlPlane::new(store, initial, admin_token, cluster_token).await?;
            Ok(Arc::new(match local_limits {
                Some(limits) => cp.with_shared_limits(limits),
                None => cp,
            }))
        }
    }
}

/// Logs one warning per initial setting given that the stored state replaces (the store
/// seeds from them only when empty).
pub fn warn_overridden(cp: &ControlPlane, settings: &settings::Settings) {
    let running = cp.snapshot();
    for w in initial::overridden(&settings.given, &settings.initial, &running) {
        tracing::warn!("{w}");
    }
}

/// Serves gRPC and HTTP on bound listeners until `shutdown` resolves; then ends every Watch
/// stream (data planes keep their configuration and reconnect elsewhere) and stops.
pub async fn serve(
    cp: Arc<ControlPlane>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with_tls(cp, grpc, http, None, shutdown).await
}

/// As [`serve`]; with `tls`, both listeners speak TLS only, and the certificate is reloaded on
/// SIGHUP and when its files change.
pub async fn serve_with_tls(
    cp: Arc<ControlPlane>,
    grpc: TcpListener,
    http: TcpListener,
    tls: Option<Arc<tls::ServerTls>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health::started(&health).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lb_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lb_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let token = cp.admin_token.clone();
    let admin = tower::ServiceBuilder::new()
        .layer(trace::AdminTraceLayer::new(cp.tracer.get().cloned()))
        .layer(tonic::service::InterceptorLayer::new(
            move |req: tonic::Request<()>| {
                auth::check(req.metadata(), &token, "admin token")?;
                Ok(req)
            },
        ))
        .concurrency_limit(admin_layers::MAX_CONCURRENT)
        .layer(admin_layers::DeadlineLayer(admin_layers::DEADLINE))
        .named_layer(AdminServer::new(admin::AdminService {
            cp: Arc::clone(&cp),
        }));
    let discovery = DiscoveryServer::new(discovery::DiscoveryService {
        cp: Arc::clone(&cp),
    });

    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(discovery)
        .add_service(admin);
    let http_router = http::router(Arc::clone(&cp));
    // The accepting tasks of TLS listeners, awaited at the end so that the ports are closed
    // when this returns, as with plain listeners.
    let mut accepting = Vec::new();
    let (grpc_task, http_task, tls_watch) = match &tls {
        None => {
            (
                tokio::spawn(grpc_router.serve_with_incoming_shutdown(
                    TcpListenerStream::new(grpc),
                    wait(stop_rx.clone()),
                )),
                tokio::spawn(
                    axum::serve(http, http_router)
                        .with_graceful_shutdown(wait(stop_rx.clone()))
                        .into_future(),
                ),
                None,
            )
        }
        Some(tls) => {
            let _ = cp.tls.set(Arc::clone(tls));
            let (grpc, grpc_accepting) = tls.listen(grpc, tls::GRPC_ALPN, "grpc")?;
            let (http, http_accepting) = tls.listen(http, tls::HTTP_ALPN, "http")?;
            accepting.extend([grpc_accepting, http_accepting]);
            (
                tokio::spawn(
                    grpc_router
                        .serve_with_incoming_shutdown(grpc.into_stream(), wait(stop_rx.clone())),
                ),
                tokio::spawn(
                    axum::serve(http, http_router)
                        .with_graceful_shutdown(wait(stop_rx.clone()))
                        .into_future(),
                ),
                Some(tokio::spawn(Arc::clone(tls.tls()).watch(stop_rx.clone()))),
            )
        }
    };
    let following = tokio::spawn(health::follow_store(
        Arc::clone(&cp),
        health.clone(),
        stop_rx.clone(),
    ));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, tls = tls.is_some(), version = cp.snapshot().version, "control plane started");
    shutdown.await;
    // NOT_SERVING before anything closes (and nothing to turn it back).
    following.abort();
    let _ = following.await;
    health::stopping(&health).await;
    cp.stop_streams();
    let _ = stop_tx.send(true);
    let (grpc_abort, http_abort) = (grpc_task.abort_handle(), http_task.abort_handle());
    match tokio::time::timeout(DRAIN_TIMEOUT, async { (grpc_task.await, http_task.await) }).await {
        Ok((grpc, http)) => {
            grpc??;
            http??;
        }
        Err(_) => {
            tracing::warn!("drain timeout; closing the remaining connections");
            grpc_abort.abort();
            http_abort.abort();
        }
    }
    for task in accepting.into_iter().chain(tls_watch) {
        let _ = task.await;
    }
    if let Some(t) = cp.tracer.get().cloned() {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    tracing::info!("control plane stopped");
    Ok(())
}
