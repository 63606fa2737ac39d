//! Logs tied to traces: the data-plane binary, logging JSON and exporting spans to an OTLP
//! collector in the test, writes a line inside a proxied request that carried a `traceparent`,
//! and that line names the request's trace and span, the same ones the collector receives.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/common.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bin::{save_snapshot, spawn_offline};
use common::{free_port, line_with, lines_of, poll_within};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::Notify;

/// Spans received, as (trace id, span id) in hex.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String)>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans);
        self.spans
            .lock()
            .unwrap()
            .extend(spans.map(|s: Span| (hex(&s.trace_id), hex(&s.span_id))));
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_inside_a_traced_request_names_its_trace_and_span() {
    let collector = Collector::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );

    // A saved configuration whose one backend refuses connections: the request fails (503
    // backend_unreachable), and the data plane logs "backend request failed" while handling it.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = std::env::temp_dir().join(format!("lb-trace-logs-{}", std::process::id()));
    save_snapshot(&dir, &dead.to_string(), |_| {});
    let (listen, admin) = (free_port(), free_port());
    let mut child = spawn_offline(
        listen,
        admin,
        &dir,
        &["--log-format", "json"],
        &[
            ("RUST_LOG", "info"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
        ],
    );
    let mut lines = lines_of(child.stderr.take().unwrap());

    let client = reqwest_like::Client::new();
    // Ready once the saved configuration is in force.
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    poll_within(Duration::from_secs(20), "the data plane ready", || async {
        match client.status(&readyz, None).await {
            Some(200) => Ok(()),
            other => Err(other),
        }
    })
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let status = client
        .status(&format!("http://127.0.0.1:{listen}/x"), Some(&traceparent))
        .await;
    assert_eq!(status, Some(503), "backend_unreachable");

    // The log line written inside the request.
    let line = line_with(&mut lines, "backend request failed").await;
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["trace_id"], trace_id, "{line}");
    let span_id = v["span_id"].as_str().unwrap().to_owned();
    assert_eq!(span_id.len(), 16, "{line}");
    assert_ne!(
        span_id, "00f067aa0ba902b7",
        "the proxy's own span, child of the caller's"
    );

    // The collector receives that span.
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let arrived = collector.arrived.notified();
            if collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .any(|(t, s)| t == trace_id && *s == span_id)
            {
                return;
            }
            arrived.await;
        }
    })
    .await;
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found.is_ok(),
        "span {span_id} of trace {trace_id} not exported: {:?}",
        collector.spans.lock().unwrap()
    );
}

/// Just enough of an HTTP client for status codes.
mod reqwest_like {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client as Hyper;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Empty<Bytes>>);

    impl Client {
        pub fn new() -> Client {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        /// The status of a GET (with `traceparent` when given); `None` when nothing answers.
        pub async fn status(&self, url: &str, traceparent: Option<&str>) -> Option<u16> {
            let mut req = http::Request::get(url);
            if let Some(t) = traceparent {
                req = req.header("traceparent", t);
            }
            let resp = self.0.request(req.body(Empty::new()).unwrap()).await.ok()?;
            Some(resp.status().as_u16())
        }
    }
}
