//! A data plane: the proxy clients talk to. It holds no state of its own: configuration arrives
//! from the control plane over gRPC, and shared counters live in Redis when one is configured.
//!
//! - `server`: the listeners, the proxy workers, HTTP/1 and HTTP/2 from clients, TLS handshakes, the admin listener.
//! - `proxy`: the request path, one step per module.
//! - `upstream`: connections to backends: pools, the HTTP/1.1 exchange, response framing.
//! - `backend`: per-backend counters, latency average and slow start, health-check tasks.
//! - `policy`: balancing, breaker, outlier detection, retries, backoff, admission, health (pure).
//! - `ratelimit`: client identity, limiter arithmetic, the in-process and Redis stores.
//! - `cache`: the response cache, its freshness rules and its two tiers.
//! - `redis`: the way to Redis (one server or a cluster) shared by limiter and cache.
//! - `config`: start-up settings, and the configuration in force built from a snapshot.
//! - `control`: the link to the control plane: configuration stream and reports.
//! - `shared`: what the request path, the admin listener and the control link share.
//! - `telemetry`: metrics, traces, the report of this plane's activity, logging.
//! - `tls`: certificates: the listener's, backends' trust, reloads.
//! - `clock`: process time for atomics, wall-clock time, stall timers.
//! - [`common`]: what the control plane shares with the data plane.

pub mod common;
#[cfg(test)]
mod scratch;

/// The crate's own modules: private to it, and public only for this workspace's tests (the
/// `internals` feature, which they turn on), which observe a running data plane's state.
macro_rules! internal {
    ($($module:ident),* $(,)?) => {
        $(
            #[cfg(feature = "internals")]
            pub mod $module;
            #[cfg(not(feature = "internals"))]
            pub(crate) mod $module;
        )*
    };
}

internal!(
    backend, cache, clock, config, control, policy, proxy, ratelimit, redis, server, shared,
    telemetry, tls, upstream,
);

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::config::settings::{Args, Command, Settings};
pub use ratelimit::local::{LimitState, LocalBan, LocalLimits};
pub use server::healthcheck::healthcheck;
pub use server::listen;
pub use shared::Shared;

/// Runs a data plane on bound listeners until `shutdown` resolves, then stops accepting and
/// gives requests in flight up to the drain timeout to finish.
pub async fn run(
    settings: Settings,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared::new(settings));
    run_shared(shared, proxy, admin, shutdown).await
}

/// As [`run`], with the shared state made by the caller (to observe it, as tests do).
pub async fn run_shared(
    shared: Arc<Shared>,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    if let Some(e) = shared.tls_error() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            e.to_string(),
        ));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls_watch = shared
        .tls()
        .map(|tls| tokio::spawn(Arc::clone(tls).watch(stop_rx.clone())));
    let discovery = tokio::spawn(control::discovery::run(
        Arc::clone(&shared),
        stop_rx.clone(),
    ));
    let reports = tokio::spawn(control::report::run(
        Arc::clone(&shared),
        control::discovery::node(&shared),
        stop_rx.clone(),
    ));
    // Invalidations made on other data planes reach this one's memory tier.
    let invalidations = shared.redis.as_ref().map(|link| {
        tokio::spawn(cache::invalidate::follow(
            shared.cache.clone(),
            Arc::clone(link),
            stop_rx.clone(),
        ))
    });
    // Health-check tasks follow the backend set of each applied configuration.
    let probes = {
        let shared = Arc::clone(&shared);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let prober = backend::probe::Prober::default();
            let mut applied = shared.applied_version();
            loop {
                if let Some(active) = shared.active() {
                    prober.sync(
                        active.slots.iter().map(|s| &s.endpoint),
                        active.snapshot.health_check.clone(),
                    );
                }
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { break },
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            prober.stop();
        })
    };
    let admin_task = {
        let mut stop = stop_rx.clone();
        let app = server::admin::router(Arc::clone(&shared));
        tokio::spawn(async move {
            let served = axum::serve(admin, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(cause = %e, "admin listener failed");
            }
        })
    };
    server::fd_limit::raise(shared.settings.max_connections);
    tracing::info!(
        node_id = %shared.settings.node_id,
        listen = %proxy.local_addr()?,
        tls = shared.tls().is_some(),
        control_plane = %shared.settings.control_plane,
        "data plane started"
    );
    let served = server::serve_proxy(Arc::clone(&shared), proxy, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = discovery.await;
    let _ = probes.await;
    let _ = reports.await;
    let _ = admin_task.await;
    if let Some(t) = invalidations {
        let _ = t.await;
    }
    if let Some(t) = tls_watch {
        let _ = t.await;
    }
    if shared.tracer.is_some() {
        let shared = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = &shared.tracer {
                t.shutdown();
            }
        })
        .await;
    }
    tracing::info!(node_id = %shared.settings.node_id, "data plane stopped");
    served
}
