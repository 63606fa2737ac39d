//! Admin calls as spans: a tower layer on the gRPC server that opens a `tracing` span for each
//! `lb.v1.Admin` call, which `tracing-opentelemetry` exports as an OpenTelemetry server span
//! (child of the caller's `traceparent`, ended with the call's gRPC status). The call runs under
//! a subscriber of this control plane's own, made of its tracer's layer and the process's log
//! layer: the span goes to this control plane's exporter (several control planes in one process,
//! as in tests, each export their own), and the call's log lines, written inside the span, name
//! its trace and span. Other services (Discovery streams, health, reflection) pass untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use data_plane::common::Tracing;
use opentelemetry::trace::Status;
use tracing::instrument::{Instrument as _, WithSubscriber as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

const ADMIN_PREFIX: &str = "/lb.v1.Admin/";

/// Wraps a gRPC service; with no tracer it adds nothing but a branch.
#[derive(Clone)]
pub struct AdminTraceLayer {
    traced: Option<Traced>,
}

/// A tracer and the subscriber its spans are made under.
#[derive(Clone)]
struct Traced {
    tracer: Arc<Tracing>,
    dispatch: tracing::Dispatch,
}

impl AdminTraceLayer {
    pub fn new(tracer: Option<Arc<Tracing>>) -> AdminTraceLayer {
        let traced = tracer.map(|tracer| {
            // The exporter's own diagnostics stay out of the spans it exports.
            let ours = tracing_subscriber::filter::filter_fn(|m| {
                !m.target().starts_with("opentelemetry") && *m.level() <= tracing::Level::INFO
            });
            let spans = tracing_opentelemetry::layer()
                .with_tracer(tracer.sdk_tracer())
                .with_filter(ours);
            let subscriber = tracing_subscriber::registry()
                .with(spans)
                .with(data_plane::common::log_layer());
            Traced {
                tracer,
                dispatch: tracing::Dispatch::new(subscriber),
            }
        });
        AdminTraceLayer { traced }
    }
}

impl<S> tower::Layer<S> for AdminTraceLayer {
    type Service = AdminTrace<S>;

    fn layer(&self, inner: S) -> AdminTrace<S> {
        AdminTrace {
            inner,
            traced: self.traced.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdminTrace<S> {
    inner: S,
    traced: Option<Traced>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for AdminTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .strip_prefix(ADMIN_PREFIX)
            .map(str::to_owned);
        let traced = self
            .traced
            .as_ref()
            .filter(|t| t.tracer.wanted(req.headers()));
        let (Some(traced), Some(method)) = (traced, method) else {
            return Box::pin(self.inner.call(req));
        };
        let span = tracing::dispatcher::with_default(&traced.dispatch, || {
            tracing::info_span!(
                "admin call",
                otel.name = format!("lb.v1.Admin/{method}"),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "lb.v1.Admin",
                rpc.method = method,
            )
        });
        // Not an error when it fails: the span then starts a trace of its own.
        let _ = span.set_parent(traced.tracer.extract(req.headers()));
        let call = span.in_scope(|| self.inner.call(req));
        let ended = span.clone();
        let traced_call = async move {
            let result = call.instrument(span).await;
            if let Ok(resp) = &result {
                // An error travels "trailers-only", its status in the head; success in trailers.
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                ended.set_attribute("rpc.grpc.status_code", code);
                if code != 0 {
                    let message = resp
                        .headers()
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    ended.set_status(Status::error(message));
                }
            } else {
                ended.set_status(Status::error("transport error"));
            }
            result
        };
        Box::pin(traced_call.with_subscriber(traced.dispatch.clone()))
    }
}
