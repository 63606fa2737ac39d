//! The control plane's HTTP listener: the original system's REST endpoints, health and
//! Prometheus metrics. Same request shapes as there; the logic is the gRPC calls' (in
//! [`crate::admin`], [`crate::keys`]), so both surfaces behave alike.
//!
//! Admin endpoints (`/change_strategy`, `/admin/*`, `/logs`) need the admin token as
//! `Authorization: Bearer <token>`, as on gRPC. `/usage` does not: a client asks about the key it
//! holds, and learns nothing about any other.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lb_proto::validate;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{bearer, constant_time_eq};
use crate::cluster::{ControlPlane, UpdateError};
use crate::keys::{self, KeyTarget};

pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/stats", get(stats))
        .route("/change_strategy", post(change_strategy))
        .route("/usage", get(usage))
        .route("/admin/users", get(users))
        .route("/admin/upgrade_tier", post(upgrade_tier))
        .route("/admin/block_key", post(block_key))
        .route("/logs", get(logs))
        .route("/metrics", get(metrics))
        .with_state(cp)
}

/// An error answer: the status and `{"error": message}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

impl From<UpdateError> for ApiError {
    fn from(e: UpdateError) -> Self {
        let status = match &e {
            UpdateError::Invalid(_) => StatusCode::BAD_REQUEST,
            UpdateError::NotFound(_) => StatusCode::NOT_FOUND,
            e if e.is_conflict() => StatusCode::CONFLICT,
            UpdateError::Store(_) | UpdateError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        error(status, e.to_string())
    }
}

fn authorize(cp: &ControlPlane, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <admin token>",
        ));
    };
    let token = value.to_str().ok().and_then(bearer);
    match token {
        Some(t) if constant_time_eq(t.as_bytes(), cp.admin_token.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::FORBIDDEN, "wrong admin token")),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "Authorization must be Bearer <admin token>",
        )),
    }
}

/// Parses a JSON body, answering 400 with serde's message (which names the field) otherwise.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn index() -> impl IntoResponse {
    Json(json!({
        "service": "control-plane",
        "endpoints": [
            "/stats", "/change_strategy", "/usage", "/admin/users", "/admin/upgrade_tier",
            "/admin/block_key", "/logs", "/metrics", "/healthz",
        ],
    }))
}

async fn stats(State(cp): State<Arc<ControlPlane>>) -> impl IntoResponse {
    let s = cp.snapshot();
    let planes: Vec<_> = cp
        .data_planes()
        .into_iter()
        .map(|p| {
            json!({
                "id": p.node.as_ref().map(|n| n.id.clone()),
                "listen": p.node.as_ref().map(|n| n.listen.clone()),
                "connected": p.connected,
                "applied_version": p.applied_version,
                "last_nack_version": p.last_nack_version,
                "last_nack_error": p.last_nack_error,
                "last_seen_ms": p.last_seen_ms,
            })
        })
        .collect();
    let now = crate::cluster::now_ms();
    let seen = cp.traffic.backends(now);
    let backends: Vec<_> = s
        .backends
        .iter()
        .map(|b| {
            let t = seen
                .iter()
                .find(|t| t.address == b.address)
                .cloned()
                .unwrap_or_default();
            json!({
                "address": b.address,
                "weight": b.weight,
                "draining": b.draining,
                "requests": t.requests,
                "errors": t.errors,
                "in_flight": t.in_flight,
                "latency_ewma_ms": t.ewma_latency_us as f64 / 1000.0,
                "healthy": t.health != lb_proto::v1::HealthState::Unhealthy as i32,
                "ejected": t.ejected,
            })
        })
        .collect();
    let c = cp.traffic.totals();
    Json(json!({
        "version": s.version,
        "strategy": s.strategy,
        "strategies": validate::STRATEGIES,
        "totals": {
            "requests": c.requests,
            "2xx": c.responses_2xx,
            "3xx": c.responses_3xx,
            "4xx": c.responses_4xx,
            "5xx": c.responses_5xx,
            "rate_limited": c.rate_limited,
            "banned": c.banned,
            "blocked": c.blocked,
            "cache_hits": c.cache_hits,
            "cache_misses": c.cache_misses,
            "retries": c.retries,
            "shed": c.shed,
        },
        "backends": backends,
        "data_planes_reporting": cp.traffic.live(now),
        "data_planes": planes,
    }))
}

#[derive(Deserialize)]
struct ChangeStrategy {
    strategy: String,
}

async fn change_strategy(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let req: ChangeStrategy = parse(&body)?;
    let version = crate::admin::set_strategy(&cp, &req.strategy).await?;
    Ok(Json(
        json!({"status": "ok", "strategy": req.strategy, "version": version}),
    ))
}

#[derive(Deserialize)]
struct UsageQuery {
    api_key: Option<String>,
}

async fn usage(
    State(cp): State<Arc<ControlPlane>>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let api_key = q
        .api_key
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "api_key: missing query parameter"))?;
    let target = KeyTarget::from_key(&api_key).map_err(UpdateError::from)?;
    let u = keys::usage(&cp, &target).await?;
    Ok(Json(json!({
        "api_key_id": u.key_id,
        "tier": u.tier,
        "limit": u.limit,
        "period_ms": u.period_ms,
        "remaining": u.remaining,
        "reset_ms": u.reset_ms,
        "blocked": u.blocked,
    })))
}

async fn users(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let users: Vec<_> = keys::list(&cp)
        .into_iter()
        .map(|k| {
            json!({
                "api_key_id": k.key_id,
                "tier": k.tier,
                "blocked": k.blocked,
                "label": k.label,
                "created_at_ms": k.created_at_ms,
                "last_seen_ms": k.last_seen_ms,
                "requests": k.requests,
                "rejected": k.rejected,
            })
        })
        .collect();
    Ok(Json(json!({"users": users})))
}

#[derive(Deserialize)]
struct UpgradeTier {
    api_key: String,
    tier: String,
}

async fn upgrade_tier(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let req: UpgradeTier = parse(&body)?;
    let target = KeyTarget::from_key(&req.api_key).map_err(UpdateError::from)?;
    let (version, id) = keys::set_tier(&cp, &target, &req.tier).await?;
    Ok(Json(json!({
        "status": "ok",
        "api_key_id": id,
        "tier": req.tier,
        "version": version,
    })))
}

#[derive(Deserialize)]
struct BlockKey {
    api_key: String,
}

async fn block_key(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let req: BlockKey = parse(&body)?;
    let target = KeyTarget::from_key(&req.api_key).map_err(UpdateError::from)?;
    let (version, id) = keys::set_blocked(&cp, &target, true).await?;
    Ok(Json(json!({
        "status": "ok",
        "api_key_id": id,
        "blocked": true,
        "version": version,
    })))
}

/// The most recent sampled requests reported by the data planes (oldest first).
async fn logs(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let logs: Vec<_> = cp
        .traffic
        .recent_log(200)
        .into_iter()
        .map(|e| {
            json!({
                "timestamp_ms": e.timestamp_ms,
                "request_id": e.request_id,
                "method": e.method,
                "path": e.path,
                "status": e.status,
                "backend": e.backend,
                "latency_ms": e.latency_us as f64 / 1000.0,
                "client": e.client,
                "key_id": e.key_id,
                "tier": e.tier,
                "decision": e.decision,
                "data_plane": e.node_id,
            })
        })
        .collect();
    Ok(Json(json!({ "logs": logs })))
}

async fn metrics(State(cp): State<Arc<ControlPlane>>) -> impl IntoResponse {
    let s = cp.snapshot();
    let planes = cp.data_planes();
    let connected = planes.iter().filter(|p| p.connected).count();
    let current = planes
        .iter()
        .filter(|p| p.connected && p.applied_version == s.version)
        .count();
    let text = format!(
        "# HELP lb_cp_config_version Version of the configuration the control plane publishes.\n\
         # TYPE lb_cp_config_version gauge\n\
         lb_cp_config_version {}\n\
         # HELP lb_cp_data_planes Data planes known to this control plane, by stream state.\n\
         # TYPE lb_cp_data_planes gauge\n\
         lb_cp_data_planes{{state=\"connected\"}} {}\n\
         lb_cp_data_planes{{state=\"disconnected\"}} {}\n\
         # HELP lb_cp_data_planes_current Connected data planes running the published version.\n\
         # TYPE lb_cp_data_planes_current gauge\n\
         lb_cp_data_planes_current {}\n",
        s.version,
        connected,
        planes.len() - connected,
        current,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
