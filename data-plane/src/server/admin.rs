//! The admin listener: liveness, readiness, JSON statistics and Prometheus metrics. It is a
//! separate port from the proxy so that the proxy reserves no path of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::clock::millis;
use crate::policy::breaker::CircuitState;
use crate::shared::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Ready once a configuration is in force (from the control plane or the saved snapshot).
async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let active = shared.active();
    let body = json!({
        "ready": active.is_some(),
        "version": active.as_ref().map_or(0, |a| a.version()),
        "control_plane_connected": shared.control_plane_connected.load(Ordering::Relaxed),
        "rate_limit_store": store_state(&shared),
    });
    let status = if active.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn stats(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let active = shared.active();
    let now_ms = millis(tokio::time::Instant::now());
    let backends: Vec<_> = active
        .iter()
        .flat_map(|a| a.slots.iter())
        .map(|s| {
            let e = &s.endpoint;
            json!({
                "address": e.address,
                "weight": s.weight,
                "draining": s.draining,
                "in_flight": e.in_flight(),
                "requests": e.requests.load(Ordering::Relaxed),
                "errors": e.errors.load(Ordering::Relaxed),
                "latency_ewma_ms": e.latency_us() as f64 / 1000.0,
                "max_in_flight": s.max_in_flight,
                "healthy": e.is_healthy(),
                "ejected": e.is_ejected(now_ms),
                "ejections": e.ejections.load(Ordering::Relaxed),
                "circuit": match e.circuit_state() {
                    CircuitState::Closed => "closed",
                    CircuitState::Open => "open",
                    CircuitState::HalfOpen => "half_open",
                },
            })
        })
        .collect();
    let m = &shared.metrics;
    let rejected = shared
        .last_rejected
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .map(|(version, error)| json!({"version": version, "error": error}));
    Json(json!({
        "node_id": shared.settings.node_id,
        "version": active.as_ref().map_or(0, |a| a.version()),
        "strategy": active.as_ref().map(|a| a.snapshot.strategy.clone()),
        "control_plane_connected": shared.control_plane_connected.load(Ordering::Relaxed),
        "last_rejected": rejected,
        "responses": {
            "2xx": m.responses[0].get(),
            "3xx": m.responses[1].get(),
            "4xx": m.responses[2].get(),
            "5xx": m.responses[3].get(),
        },
        "client_connections": m.connections.get(),
        "tunnels_open": m.tunnels_open.get(),
        "retries": m.retries.get(),
        "rate_limit_store": store_state(&shared),
        "cache": cache_stats(&shared),
        "queue_depth": shared.admission.depth(),
        "tls": shared.tls().map(|t| {
            let c = t.certificate();
            json!({
                "serial": c.serial,
                "not_before": c.not_before.text,
                "not_after": c.not_after.text,
            })
        }),
        "backends": backends,
    }))
}

/// Cache counters since start, per tier.
fn cache_stats(shared: &Shared) -> serde_json::Value {
    let c = shared.cache.stats();
    json!({
        "enabled": shared.cache.policy().enabled,
        "degraded": c.degraded,
        "hits": {"memory": c.hits_memory, "shared": c.hits_shared, "coalesced": c.hits_coalesced},
        "stale": c.hits_stale,
        "misses": c.leads + c.passes,
        "bypass": c.bypasses,
        "stored": c.stored,
        "not_stored": c.not_stored,
        "revalidated": c.revalidated,
        "invalidated": c.invalidated,
        "memory": {
            "bytes": c.memory.bytes,
            "capacity_bytes": c.memory.capacity,
            "entries": c.memory.entries,
            "evictions": c.memory.evictions,
        },
        "shared_errors": c.shared_errors,
    })
}

/// "embedded", "shared" or "degraded" (Redis configured but unreachable).
fn store_state(shared: &Shared) -> &'static str {
    match (shared.limiter.shared(), shared.limiter.is_degraded()) {
        (false, _) => "embedded",
        (true, false) => "shared",
        (true, true) => "degraded",
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.render_metrics(),
    )
}
