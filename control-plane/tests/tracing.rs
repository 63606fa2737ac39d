//! OpenTelemetry export end to end: an OTLP/gRPC collector in the test receives the span of a
//! proxied request (continuing the client's `traceparent`, with the same trace handed on to the
//! backend) and the span of an Admin call on the control plane.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use control_plane::ControlPlane;
use control_plane::store::MemoryStore;
use data_plane::telemetry::otel::TraceSettings;
use lb_proto::v1::GetConfigRequest;
use mock_backends::MockBackends;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::Notify;

/// A span as received, with the service that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
    }
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Collector, String) {
        let collector = Collector::default();
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        (collector, format!("http://{addr}"))
    }

    /// Waits (batches leave every few seconds) for a span matching `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Received) -> bool) -> Received {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let arrived = self.arrived.notified();
                if let Some(r) = self.spans.lock().unwrap().iter().find(|r| pred(r)) {
                    return r.clone();
                }
                arrived.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no span {what} within 30 s; received: {:?}",
                self.spans
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|r| (&r.service, &r.span.name))
                    .collect::<Vec<_>>()
            )
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_and_admin_calls_are_exported_as_spans() {
    let (collector, endpoint) = Collector::start().await;
    let trace = TraceSettings {
        endpoint,
        ratio: 1.0,
    };

    let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let cp = Arc::new(
        ControlPlane::new(
            Arc::new(MemoryStore::new(None)),
            snapshot_with(&mock.addrs()),
            TOKEN.into(),
            None,
        )
        .await
        .unwrap(),
    );
    control_plane::start_tracing(&cp, Some(&trace));
    let cp = Cp::serve(cp).await;
    let dp = Dp::join_with(&cp.url(), "dp-traced", |s| s.tracing = Some(trace.clone())).await;
    dp.wait_version(1).await;

    // A client that is itself traced: its context must be continued, not replaced.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let client = http_client();
    let req = http::Request::builder()
        .uri(dp.url("/echo"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .body(Default::default())
        .unwrap();
    let reply = send(&client, req).await;
    assert_eq!(reply.status, 200);
    let seen = reply.json()["headers"]["traceparent"]
        .as_str()
        .expect("the backend receives a traceparent")
        .to_owned();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], trace_id, "the backend joins the client's trace");
    assert_ne!(
        parts[2], client_span,
        "the backend's parent is the proxy's span"
    );
    assert_eq!(parts[3], "01", "sampled");

    // A request without a traceparent starts a trace of its own, also handed to the backend.
    let reply = get(&client, &dp.url("/echo")).await;
    let fresh = reply.json()["headers"]["traceparent"]
        .as_str()
        .expect("a new trace is propagated too")
        .to_owned();
    let fresh_trace = fresh.split('-').nth(1).unwrap().to_owned();
    assert_ne!(fresh_trace, trace_id);
    // Admin calls on the control plane are traced too.
    let mut admin = cp.admin(Some(TOKEN)).await;
    admin.get_config(GetConfigRequest {}).await.unwrap();
    // Spans leave in batches every few seconds: all of them are waited on together.
    let proxied = collector
        .wait_for("for the proxied request", |r| {
            r.service == "data-plane" && hex(&r.span.trace_id) == trace_id
        })
        .await;
    assert_eq!(hex(&proxied.span.parent_span_id), client_span);
    assert_eq!(hex(&proxied.span.span_id), parts[2]);
    assert_eq!(proxied.span.kind, 2, "a server span");
    assert_eq!(proxied.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(proxied.attr("url.path").as_deref(), Some("/echo"));
    assert_eq!(
        proxied.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        proxied.attr("lb.backend"),
        Some(mock.addrs()[0].to_string())
    );
    assert_eq!(proxied.attr("lb.strategy").as_deref(), Some("round_robin"));
    assert_eq!(proxied.attr("lb.decision").as_deref(), Some("proxied"));
    assert!(proxied.attr("lb.request_id").is_some());

    let root = collector
        .wait_for("for the untraced request", |r| {
            hex(&r.span.trace_id) == fresh_trace
        })
        .await;
    assert!(root.span.parent_span_id.is_empty(), "a root span");

    let call = collector
        .wait_for("for the Admin call", |r| {
            r.service == "control-plane" && r.span.name == "lb.v1.Admin/GetConfig"
        })
        .await;
    assert_eq!(call.attr("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(call.attr("rpc.grpc.status_code").as_deref(), Some("0"));

    dp.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ratio_zero_only_traces_callers_bring_are_continued() {
    let (collector, endpoint) = Collector::start().await;
    let trace = TraceSettings {
        endpoint,
        ratio: 0.0,
    };
    let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let cp = Cp::start(snapshot_with(&mock.addrs()), None).await;
    let dp = Dp::join_with(&cp.url(), "dp-ratio-0", |s| s.tracing = Some(trace.clone())).await;
    dp.wait_version(1).await;
    let client = http_client();

    // No caller context and a ratio of 0: no span, nothing handed on.
    let reply = get(&client, &dp.url("/echo")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.json()["headers"].get("traceparent").is_none());

    // A caller's sampled trace is continued whatever the ratio.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let req = http::Request::builder()
        .uri(dp.url("/echo"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .body(Default::default())
        .unwrap();
    let seen = send(&client, req).await.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen.split('-').nth(1), Some(trace_id));
    let span = collector
        .wait_for("for the continued trace", |r| {
            hex(&r.span.trace_id) == trace_id
        })
        .await;
    assert_eq!(span.service, "data-plane");
    dp.stop().await;
    cp.stop().await;
}
