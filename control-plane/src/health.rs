//! What `grpc.health.v1` says of the control plane, per service name:
//!
//! | service | NOT_SERVING while |
//! |---|---|
//! | `lb.v1.Admin` | its store (Redis) does not answer: changes cannot be saved; or shutting down |
//! | `""` (the server as a whole) | the same |
//! | `lb.v1.Discovery` | shutting down: it keeps serving the configuration it holds when Redis is away |
//!
//! The store is asked every [`EVERY`] (bounded by its own timeout); `Watch` streams each change.
//! A readiness probe belongs on `lb.v1.Discovery`: with Redis gone every control plane would be
//! unready at once, and the data planes would lose the one thing that still works.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::cluster::ControlPlane;

/// How often the store is asked whether it answers.
pub const EVERY: Duration = Duration::from_secs(2);

/// Services that need the store.
const NEED_STORE: [&str; 2] = ["", "lb.v1.Admin"];
/// Services that do not.
const OWN: [&str; 1] = ["lb.v1.Discovery"];

fn status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Every service serving.
pub async fn started(reporter: &HealthReporter) {
    for name in NEED_STORE.iter().chain(&OWN) {
        reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
}

/// Every service NOT_SERVING, first thing at shutdown, so that balancers and probes move on
/// before the listeners close.
pub async fn stopping(reporter: &HealthReporter) {
    for name in NEED_STORE.iter().chain(&OWN) {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

/// Follows the store until `stop`: the services that need it say whether it answers.
pub async fn follow_store(
    cp: Arc<ControlPlane>,
    reporter: HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut reachable = true;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let answer = tokio::select! {
            r = cp.store_reachable() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if answer.is_ok() == reachable {
            continue;
        }
        reachable = answer.is_ok();
        match answer {
            Ok(()) => tracing::info!("store answers again: gRPC health SERVING"),
            Err(e) => {
                tracing::warn!(cause = %e, "store unreachable: gRPC health NOT_SERVING for lb.v1.Admin");
            }
        }
        for name in NEED_STORE {
            reporter.set_service_status(name, status(reachable)).await;
        }
    }
}
