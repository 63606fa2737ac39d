//! The control plane: it owns the cluster's configuration and pushes it to data planes.
//!
//! - [`settings`]: flags, environment and the TOML file (listeners, initial configuration).
//! - [`store`]: durable state behind the [`store::Store`] trait (embedded, optional file).
//! - [`cluster`]: the state, versioned changes, and the data planes' ACK/NACK record.
//! - [`discovery`], [`admin`]: the `lb.v1.Discovery` and `lb.v1.Admin` gRPC services.
//! - [`http`]: REST endpoints, `/stats` and `/metrics`.
//! - [`dev`]: the all-in-one local stack of `control-plane dev`.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod dev;
pub mod discovery;
pub mod http;
pub mod settings;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use lb_proto::v1::admin_server::AdminServer;
use lb_proto::v1::discovery_server::DiscoveryServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

pub use cluster::ControlPlane;

/// A random token of 32 hex digits.
pub fn random_token() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Serves gRPC and HTTP on bound listeners until `shutdown` resolves; then ends every Watch
/// stream (data planes keep their configuration and reconnect elsewhere) and stops.
pub async fn serve(
    cp: Arc<ControlPlane>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["lb.v1.Discovery", "lb.v1.Admin", ""] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lb_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lb_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let token = cp.admin_token.clone();
    let admin = AdminServer::with_interceptor(
        admin::AdminService {
            cp: Arc::clone(&cp),
        },
        move |req: tonic::Request<()>| {
            auth::check(req.metadata(), &token, "admin token")?;
            Ok(req)
        },
    );
    let discovery = DiscoveryServer::new(discovery::DiscoveryService {
        cp: Arc::clone(&cp),
    });

    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(discovery)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), wait(stop_rx.clone()));
    let http_server =
        axum::serve(http, http::router(Arc::clone(&cp))).with_graceful_shutdown(wait(stop_rx));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, version = cp.snapshot().version, "control plane started");
    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(async move { http_server.await });
    shutdown.await;
    cp.stop_streams();
    let _ = stop_tx.send(true);
    grpc_task.await??;
    http_task.await??;
    tracing::info!("control plane stopped");
    Ok(())
}
