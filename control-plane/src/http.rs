//! The control plane's HTTP listener: the original system's REST endpoints (`/stats`,
//! `/change_strategy`), health and Prometheus metrics. Admin actions need the admin token as
//! `Authorization: Bearer <token>`, as on gRPC.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lb_proto::validate;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{bearer, constant_time_eq};
use crate::cluster::{ControlPlane, UpdateError};

pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/stats", get(stats))
        .route("/change_strategy", post(change_strategy))
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
        "endpoints": ["/stats", "/change_strategy", "/metrics", "/healthz"],
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
    let backends: Vec<_> = s
        .backends
        .iter()
        .map(|b| json!({"address": b.address, "weight": b.weight, "draining": b.draining}))
        .collect();
    Json(json!({
        "version": s.version,
        "strategy": s.strategy,
        "strategies": validate::STRATEGIES,
        "backends": backends,
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
    match crate::admin::set_strategy(&cp, &req.strategy).await {
        Ok(version) => Ok(Json(
            json!({"status": "ok", "strategy": req.strategy, "version": version}),
        )),
        Err(UpdateError::Invalid(e)) => Err(error(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
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
