//! Every answer the data plane gives on its own, rather than a backend's: one [`Refusal`] per
//! reason, which renders its status, the reason label counted in `lb_requests_refused_total`,
//! `Retry-After` where the client may come back, the `RateLimit` fields of a limited request,
//! and the JSON body `{"error", "message", "request_id", …}`. The request path decides; it never
//! builds such a response by hand.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use super::request_id::X_REQUEST_ID;
use crate::ratelimit::quota::Quota;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::report::Outcome;
use crate::upstream::request_body::ClientBodyError;

/// Why the data plane answers a request itself.
#[derive(Debug)]
pub enum Refusal {
    /// The declared `Content-Length` is over the largest body accepted.
    BodyTooLarge { limit: u64 },
    /// A request head that cannot be taken as it is (a missing, repeated or invalid `Host`).
    BadRequest(&'static str),
    /// A method the proxy does not carry (`CONNECT`).
    MethodNotAllowed,
    /// An extended `CONNECT` (RFC 8441) for a protocol other than WebSocket.
    UnsupportedProtocol,
    /// `--max-tunnels` upgraded connections are open already.
    TooManyTunnels { max: usize },
    /// A transfer coding other than a single, final `chunked`.
    UnsupportedTransferCoding,
    /// The client's request body failed on its way to the backend.
    ClientBody(ClientBodyError),
    /// No configuration has arrived from the control plane yet.
    NotConfigured,
    /// The API key given cannot be one (empty, too long, not visible ASCII).
    InvalidApiKey(String),
    /// The key is not one the control plane knows, and unknown keys are refused; its id.
    UnknownKey { key_id: String },
    /// The key (of this id) is blocked.
    Blocked { key_id: String, tier: String },
    /// Over the limit of the quota, for `retry_after` seconds.
    RateLimited { quota: Quota, retry_after: u64 },
    /// Banned after repeated violations, for `retry_after` seconds.
    Banned { quota: Quota, retry_after: u64 },
    /// The shared limit store is unreachable and the failure mode refuses.
    LimiterUnavailable,
    /// Every backend is at its in-flight limit and the queue is full.
    QueueFull,
    /// Every backend stayed at its limit for the whole queue timeout.
    QueueTimeout,
    /// Every backend's circuit is open; the first reopens in `retry_after` seconds.
    CircuitsOpen { retry_after: u64 },
    /// No backend can take the request (none configured, all draining, none left to try).
    NoBackend(String),
    /// The backend could not be reached; the request was not sent.
    BackendUnreachable { backend: String },
    /// The backend's answer could not be read (or the request could not be sent again).
    BadGateway { backend: Option<String> },
    /// The backend did not answer within the request timeout.
    GatewayTimeout { backend: String },
}

impl Refusal {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::UnsupportedTransferCoding | Refusal::UnsupportedProtocol => {
                StatusCode::NOT_IMPLEMENTED
            }
            Refusal::ClientBody(e) => match e {
                ClientBodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                ClientBodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
                ClientBodyError::Invalid(_) | ClientBodyError::Aborted => StatusCode::BAD_REQUEST,
            },
            Refusal::InvalidApiKey(_) => StatusCode::BAD_REQUEST,
            Refusal::UnknownKey { .. } => StatusCode::UNAUTHORIZED,
            Refusal::Blocked { .. } => StatusCode::FORBIDDEN,
            Refusal::RateLimited { .. } | Refusal::Banned { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::NotConfigured
            | Refusal::TooManyTunnels { .. }
            | Refusal::LimiterUnavailable
            | Refusal::QueueFull
            | Refusal::QueueTimeout
            | Refusal::CircuitsOpen { .. }
            | Refusal::NoBackend(_)
            | Refusal::BackendUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            Refusal::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The reason, as the `error` field of the body, the metric label and the log's decision.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BodyTooLarge { .. } => "body_too_large",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Refusal::UnsupportedProtocol => "unsupported_protocol",
            Refusal::TooManyTunnels { .. } => "tunnel_limit",
            Refusal::ClientBody(e) => match e {
                ClientBodyError::TooLarge { .. } => "body_too_large",
                ClientBodyError::TimedOut(_) => "body_timeout",
                ClientBodyError::Invalid(_) => "body_invalid",
                ClientBodyError::Aborted => "body_aborted",
            },
            Refusal::NotConfigured => "not_configured",
            Refusal::InvalidApiKey(_) => "invalid_api_key",
            Refusal::UnknownKey { .. } => "unknown_key",
            Refusal::Blocked { .. } => "blocked",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Banned { .. } => "banned",
            Refusal::LimiterUnavailable => "limiter_unavailable",
            Refusal::QueueFull | Refusal::QueueTimeout => "shed",
            Refusal::CircuitsOpen { .. } => "circuit_open",
            Refusal::NoBackend(_) => "no_backend",
            Refusal::BackendUnreachable { .. } => "backend_unreachable",
            Refusal::BadGateway { .. } => "bad_gateway",
            Refusal::GatewayTimeout { .. } => "gateway_timeout",
        }
    }

    /// What a person reading the body is told.
    fn message(&self) -> String {
        match self {
            Refusal::BodyTooLarge { limit } => format!("request body is larger than {limit} bytes"),
            Refusal::BadRequest(why) => (*why).to_owned(),
            Refusal::MethodNotAllowed => "CONNECT is not carried by this proxy".to_owned(),
            Refusal::UnsupportedTransferCoding => {
                "only the chunked transfer coding is supported".to_owned()
            }
            Refusal::UnsupportedProtocol => {
                "only WebSocket is carried over an extended CONNECT".to_owned()
            }
            Refusal::TooManyTunnels { max } => {
                format!("{max} upgraded connections are open, the most this proxy carries")
            }
            Refusal::ClientBody(e) => e.to_string(),
            Refusal::NotConfigured => {
                "no configuration received from the control plane yet".to_owned()
            }
            Refusal::InvalidApiKey(why) => why.clone(),
            Refusal::UnknownKey { .. } => "unknown API key".to_owned(),
            Refusal::Blocked { .. } => "this API key is blocked".to_owned(),
            Refusal::RateLimited { quota, .. } => format!(
                "rate limit of {} requests per {} s exceeded ({})",
                quota.rate.requests,
                quota.rate.period_ms.div_ceil(1000),
                quota.policy
            ),
            Refusal::Banned { retry_after, .. } => {
                format!("banned for {retry_after} s after repeated rate-limit violations")
            }
            Refusal::LimiterUnavailable => "the shared rate-limit store is unreachable".to_owned(),
            Refusal::QueueFull => "every backend is at its limit and the queue is full".to_owned(),
            Refusal::QueueTimeout => {
                "every backend stayed at its limit for the whole queue timeout".to_owned()
            }
            Refusal::CircuitsOpen { .. } => "every backend's circuit breaker is open".to_owned(),
            Refusal::NoBackend(why) => why.clone(),
            Refusal::BackendUnreachable { backend } => {
                format!("cannot connect to backend {backend}")
            }
            Refusal::BadGateway {
                backend: Some(backend),
            } => format!("no valid response from backend {backend}"),
            Refusal::BadGateway { backend: None } => {
                "the request could not be sent again".to_owned()
            }
            Refusal::GatewayTimeout { backend } => {
                format!("backend {backend} did not answer in time")
            }
        }
    }

    /// Seconds after which the client may try again, for the refusals that pass.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after, .. }
            | Refusal::Banned { retry_after, .. }
            | Refusal::CircuitsOpen { retry_after } => Some(*retry_after),
            Refusal::LimiterUnavailable
            | Refusal::QueueFull
            | Refusal::QueueTimeout
            | Refusal::TooManyTunnels { .. }
            | Refusal::BackendUnreachable { .. } => Some(1),
            _ => None,
        }
    }

    /// The answer: counted by reason, with the request id, as JSON that is never cached.
    pub fn render(self, metrics: &Metrics, id: &HeaderValue) -> Response<ProxyBody> {
        let reason = self.reason();
        metrics.refused.with_label_values(&[reason]).inc();
        let mut body = serde_json::json!({
            "error": reason,
            "message": self.message(),
            "request_id": id.to_str().ok(),
        });
        let quota = match &self {
            Refusal::RateLimited { quota, .. } | Refusal::Banned { quota, .. } => Some(quota),
            _ => None,
        };
        if let Some(q) = quota {
            body["limit"] = q.rate.requests.into();
            body["period_seconds"] = (q.rate.period_ms as f64 / 1000.0).into();
            body["retry_after_seconds"] = self.retry_after().unwrap_or(1).into();
        }
        let mut resp = local_response(self.status(), &body, Some(id));
        let h = resp.headers_mut();
        if let Some(q) = quota {
            q.headers(h);
        }
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self, Refusal::MethodNotAllowed) {
            h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"));
        }
        let key_id = match &self {
            Refusal::UnknownKey { key_id } | Refusal::Blocked { key_id, .. } => Some(key_id.clone()),
            _ => quota.and_then(|q| q.key_id.clone()),
        };
        resp.extensions_mut().insert(Outcome {
            backend: None,
            decision: reason,
            key_id,
            tier: quota.map(|q| q.policy.clone()),
        });
        resp
    }
}

/// A JSON answer made by the data plane itself, marked `no-store`.
pub fn local_response(
    status: StatusCode,
    body: &serde_json::Value,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Some(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(id) = request_id {
        h.insert(X_REQUEST_ID.clone(), id.clone());
    }
    resp
}
