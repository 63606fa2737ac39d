//! The control plane's HTTP listener: the original system's REST endpoints, health,
//! Prometheus metrics, the dashboards and their WebSocket feed ([`crate::dashboard`]), and an
//! OpenAPI document of it all. Same request shapes as the original system, plus `api_key_id`
//! wherever a key is named (the dashboards know keys only by id); the logic is the gRPC calls'
//! (in [`crate::admin`], [`crate::keys`]), so both surfaces behave alike.
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
use lb_proto::validate::Invalid;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{bearer, constant_time_eq};
use crate::clock::now_ms;
use crate::cluster::{ControlPlane, UpdateError};
use crate::dashboard;
use crate::keys::{self, KeyTarget};

/// The REST endpoints, as `GET /` lists them and `/openapi.json` documents them.
pub const REST_PATHS: &[&str] = &[
    "/stats",
    "/change_strategy",
    "/usage",
    "/admin/users",
    "/admin/keys",
    "/admin/upgrade_tier",
    "/admin/block_key",
    "/admin/bans",
    "/admin/lift_ban",
    "/logs",
    "/metrics",
    "/healthz",
    "/openapi.json",
];

/// Pages and the WebSocket feed, also documented in `/openapi.json`.
pub const DASHBOARD_PATHS: &[&str] = &[
    "/",
    "/dashboard",
    "/dashboard/ratelimit",
    "/dashboard/app.js",
    "/dashboard/app.css",
    "/favicon.ico",
    "/ws",
];

const OPENAPI: &str = include_str!("../assets/openapi.json");

/// `process_*` and `lb_build_info`, as the data planes export them.
static PROCESS: std::sync::LazyLock<prometheus::Registry> = std::sync::LazyLock::new(|| {
    let registry = prometheus::Registry::new();
    if let Err(e) = data_plane::common::register_process_and_build(&registry) {
        tracing::warn!(cause = %e, "cannot register the process metrics");
    }
    registry
});

pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/stats", get(stats))
        .route("/change_strategy", post(change_strategy))
        .route("/usage", get(usage))
        .route("/admin/users", get(users))
        .route("/admin/keys", post(create_key))
        .route("/admin/upgrade_tier", post(upgrade_tier))
        .route("/admin/block_key", post(block_key))
        .route("/admin/bans", get(bans))
        .route("/admin/lift_ban", post(lift_ban))
        .route("/logs", get(logs))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/dashboard", get(dashboard::balancing_page))
        .route("/dashboard/ratelimit", get(dashboard::ratelimit_page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/app.css", get(dashboard::style))
        .route("/favicon.ico", get(dashboard::favicon))
        .route("/ws", get(dashboard::ws))
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
            UpdateError::Store(_) | UpdateError::Unavailable(_) | UpdateError::Entropy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
        "endpoints": REST_PATHS,
        "dashboards": {
            "load_balancing": "/dashboard",
            "rate_limiting": "/dashboard/ratelimit",
            "live_feed": "/ws",
        },
        "openapi": "/openapi.json",
    }))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn stats(State(cp): State<Arc<ControlPlane>>) -> impl IntoResponse {
    Json(dashboard::overview(&cp, crate::clock::now_ms()))
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
    let u = crate::ops::keys::usage(&cp, &target).await?;
    Ok(Json(json!({
        "api_key_id": u.key_id,
        "tier": u.tier,
        "limit": u.limit,
        "period_ms": u.period_ms,
        "remaining": u.remaining,
        "reset_ms": u.reset_ms,
        "banned_for_ms": u.banned_for_ms,
        "per_data_plane": u.per_data_plane,
        "blocked": u.blocked,
    })))
}

async fn users(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    // Without the bans (Redis unreachable) the keys are still listed, their ban time unknown.
    let bans = crate::ops::bans::list_bans(&cp).await.ok();
    let now = now_ms();
    let users: Vec<_> = crate::ops::keys::list(&cp)
        .iter()
        .map(|k| dashboard::key_json(k, bans.as_deref(), now))
        .collect();
    Ok(Json(json!({"users": users})))
}

/// The bans in force, as `Admin/ListBans` lists them.
async fn bans(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let bans = crate::ops::bans::list_bans(&cp).await?;
    let now = now_ms();
    let bans: Vec<_> = bans.iter().map(|b| dashboard::ban_json(b, now)).collect();
    Ok(Json(json!({ "bans": bans })))
}

/// Lifts a client's ban, as `Admin/LiftBan`: `{"client": "key:<id>"}` or `"ip:<address>"`.
async fn lift_ban(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let mut fields = string_fields(&body, &["client"])?;
    let Some(client) = fields.remove("client") else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "client: missing field (\"key:<api_key_id>\" or \"ip:<address>\")",
        ));
    };
    let version = crate::ops::bans::lift_ban(&cp, &client).await?;
    Ok(Json(json!({
        "status": "ok",
        "client": client,
        "version": version,
    })))
}

/// A body of string fields among `allowed` (an empty body is `{}`): each value by field, or a
/// 400 naming the field that is unknown or not a string.
fn string_fields(
    body: &Bytes,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Default::default());
    }
    let object: serde_json::Map<String, serde_json::Value> = parse(body)?;
    object
        .into_iter()
        .map(|(field, value)| {
            if !allowed.contains(&field.as_str()) {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("{field}: unknown field; expected {}", allowed.join(", ")),
                ));
            }
            match value {
                serde_json::Value::String(v) => Ok((field, v)),
                other => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("{field}: {other} is not a string"),
                )),
            }
        })
        .collect()
}

/// Creates a key, as gRPC `CreateApiKey`: 201 with the key, shown this once.
async fn create_key(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&cp, &headers)?;
    let mut fields = string_fields(&body, &["tier", "label"])?;
    let tier = fields.remove("tier").unwrap_or_default();
    let label = fields.remove("label").unwrap_or_default();
    let created = crate::ops::keys::create(&cp, &tier, &label).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "api_key": created.api_key,
            "api_key_id": created.key_id,
            "tier": created.tier,
            "label": label,
            "version": created.version,
        })),
    ))
}

/// The key a REST body names: `api_key` (the key itself) or `api_key_id` (its id, for keys the
/// caller only knows by id), exactly one of them.
fn key_target(api_key: Option<&str>, api_key_id: Option<&str>) -> Result<KeyTarget, ApiError> {
    match (api_key, api_key_id) {
        (Some(key), None) => Ok(KeyTarget::from_key(key).map_err(UpdateError::from)?),
        (None, Some(id)) => {
            keys::validate_key_id(id)
                .map_err(|e| UpdateError::from(Invalid::new("api_key_id", e.message)))?;
            Ok(KeyTarget::Id(id.to_owned()))
        }
        (Some(_), Some(_)) => Err(error(
            StatusCode::BAD_REQUEST,
            "api_key, api_key_id: give one of them, not both",
        )),
        (None, None) => Err(error(
            StatusCode::BAD_REQUEST,
            "api_key: missing field (or give api_key_id)",
        )),
    }
}

#[derive(Deserialize)]
struct UpgradeTier {
    api_key: Option<String>,
    api_key_id: Option<String>,
    tier: String,
}

async fn upgrade_tier(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let req: UpgradeTier = parse(&body)?;
    let target = key_target(req.api_key.as_deref(), req.api_key_id.as_deref())?;
    let (version, id) = crate::ops::keys::set_tier(&cp, &target, &req.tier).await?;
    Ok(Json(json!({
        "status": "ok",
        "api_key_id": id,
        "tier": req.tier,
        "version": version,
    })))
}

#[derive(Deserialize)]
struct BlockKey {
    api_key: Option<String>,
    api_key_id: Option<String>,
    /// `false` unblocks.
    #[serde(default = "yes")]
    blocked: bool,
}

fn yes() -> bool {
    true
}

async fn block_key(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&cp, &headers)?;
    let req: BlockKey = parse(&body)?;
    let target = key_target(req.api_key.as_deref(), req.api_key_id.as_deref())?;
    let (version, id) = crate::ops::keys::set_blocked(&cp, &target, req.blocked).await?;
    Ok(Json(json!({
        "status": "ok",
        "api_key_id": id,
        "blocked": req.blocked,
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
        .iter()
        .map(dashboard::log_json)
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
    let mut text = format!(
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
    if let Some(tls) = cp.tls.get() {
        text.push_str(&tls.render_metrics());
    }
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&PROCESS.gather(), &mut text) {
        tracing::warn!(cause = %e, "cannot encode the process metrics");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
