//! Admin calls as OpenTelemetry spans: a tower layer on the gRPC server that starts a server
//! span for each `lb.v1.Admin` call (child of the caller's `traceparent`) and ends it with the
//! call's gRPC status; the call runs with the span's context current, so its log lines name the
//! trace. Other services (Discovery streams, health, reflection) pass untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use data_plane::common::{Span as _, Status, Tracing};
use opentelemetry::KeyValue;
use opentelemetry::context::FutureExt as _;

const ADMIN_PREFIX: &str = "/lb.v1.Admin/";

/// Wraps a gRPC service; with no tracer it adds nothing but a branch.
#[derive(Clone)]
pub struct AdminTraceLayer {
    pub tracer: Option<Arc<Tracing>>,
}

impl<S> tower::Layer<S> for AdminTraceLayer {
    type Service = AdminTrace<S>;

    fn layer(&self, inner: S) -> AdminTrace<S> {
        AdminTrace {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdminTrace<S> {
    inner: S,
    tracer: Option<Arc<Tracing>>,
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
        let tracer = self.tracer.as_ref().filter(|t| t.wanted(req.headers()));
        let (Some(tracer), Some(method)) = (tracer, method) else {
            return Box::pin(self.inner.call(req));
        };
        let parent = tracer.extract(req.headers());
        let mut span = tracer.server_span(
            format!("lb.v1.Admin/{method}"),
            &parent,
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "lb.v1.Admin"),
                KeyValue::new("rpc.method", method),
            ],
        );
        // Log lines written during the call name its trace and span.
        let call = self
            .inner
            .call(req)
            .with_context(data_plane::common::context_of(&span));
        Box::pin(async move {
            let result = call.await;
            if let Ok(resp) = &result {
                // An error travels "trailers-only", its status in the head; success in trailers.
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
                if code != 0 {
                    let message = resp
                        .headers()
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    span.set_status(Status::error(message));
                }
            } else {
                span.set_status(Status::error("transport error"));
            }
            span.end();
            result
        })
    }
}
