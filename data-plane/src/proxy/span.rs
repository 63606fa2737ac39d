//! The request's server span: started from the client's `traceparent` (which the request then
//! carries on to the backend with the span's context), ended at the response head with what
//! became of the request. Attributes are only set on spans that are kept.

use http::header::{self, HeaderName};
use http::{Request, Response, Version};
use opentelemetry::KeyValue;

use super::body::ProxyBody;
use super::request_id::X_REQUEST_ID;
use super::client::ClientConn;
use super::worker::Worker;
use crate::cache::X_CACHE;
use crate::ratelimit::quota::X_RATELIMIT_REMAINING;
use crate::telemetry::otel::{self, Span as _};
use crate::telemetry::report::Outcome;

/// A server span for the request, child of the client's `traceparent`; the request carries the
/// span's context on to the backend.
pub fn start_span<B>(
    t: &otel::Tracing,
    req: &mut Request<B>,
    conn: &ClientConn,
) -> otel::RequestSpan {
    let parent = t.extract(req.headers());
    // Span names stay few: the standard methods, anything else as "_OTHER".
    let name = match *req.method() {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "_OTHER",
    };
    let mut span = t.server_span(name, &parent, Vec::new());
    // Attributes cost allocations: only spans that are kept get them.
    if span.is_recording() {
        let version = match req.version() {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        // The query stays out: it may carry credentials such as an API key.
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method().as_str().to_owned()),
            KeyValue::new(
                "url.path",
                req.uri().path().chars().take(1024).collect::<String>(),
            ),
            KeyValue::new("url.scheme", conn.scheme()),
            KeyValue::new("client.address", conn.peer.ip().to_string()),
            KeyValue::new("network.protocol.version", version),
        ];
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if let Some(host) = host {
            let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
            attributes.push(KeyValue::new("server.address", name.to_owned()));
        }
        if let Some(ua) = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new(
                "user_agent.original",
                ua.chars().take(256).collect::<String>(),
            ));
        }
        span.set_attributes(attributes);
    }
    t.inject(&span, req.headers_mut());
    span
}

/// Records what became of the request on its span and ends it (at the response head).
pub fn end_span(
    span: &mut otel::RequestSpan,
    worker: &Worker,
    resp: &Response<ProxyBody>,
    outcome: &Outcome,
) {
    if !span.is_recording() {
        return;
    }
    let status = resp.status().as_u16();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    let text = |name: &HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(id) = text(&X_REQUEST_ID) {
        span.set_attribute(KeyValue::new("lb.request_id", id));
    }
    if let Some(backend) = &outcome.backend {
        span.set_attribute(KeyValue::new("lb.backend", backend.clone()));
    }
    if let Some(active) = worker.active() {
        span.set_attribute(KeyValue::new(
            "lb.strategy",
            active.snapshot.strategy.clone(),
        ));
    }
    if !outcome.decision.is_empty() {
        span.set_attribute(KeyValue::new("lb.decision", outcome.decision));
    }
    if let Some(tier) = &outcome.tier {
        span.set_attribute(KeyValue::new("lb.rate_limit.policy", tier.clone()));
    }
    if let Some(remaining) = text(&X_RATELIMIT_REMAINING) {
        span.set_attribute(KeyValue::new("lb.rate_limit.remaining", remaining));
    }
    if let Some(cache) = text(&X_CACHE) {
        span.set_attribute(KeyValue::new("lb.cache", cache));
    }
    if status >= 500 {
        span.set_status(otel::Status::error(format!("HTTP {status}")));
    }
    span.end();
}
