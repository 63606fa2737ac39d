//! OpenTelemetry export end to end: an OTLP/gRPC collector in the test receives the span of a
//! proxied request (continuing the client's `traceparent`, with the same trace handed on to the
//! backend) and the span of an Admin call on the control plane, whose log lines name it.

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
    let trace = TraceSettings::grpc(endpoint, 1.0);

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
    let trace = TraceSettings::grpc(endpoint, 0.0);
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

/// What an OTLP/HTTP collector received: each export's request headers and spans' resources.
#[derive(Default, Clone)]
struct HttpCollector {
    exports: Arc<Mutex<Vec<(http::HeaderMap, ExportTraceServiceRequest)>>>,
    arrived: Arc<Notify>,
}

impl HttpCollector {
    /// Serves `POST /v1/traces` (protobuf) on a free port: the collector and its base URL.
    async fn start() -> (HttpCollector, String) {
        use http_body_util::BodyExt;
        let collector = HttpCollector::default();
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        let c = collector.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    return;
                };
                let c = c.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let bytes = body.collect().await?.to_bytes();
                            let status = match (parts.uri.path(), prost::Message::decode(bytes)) {
                                ("/v1/traces", Ok(export)) => {
                                    c.exports.lock().unwrap().push((parts.headers, export));
                                    c.arrived.notify_waiters();
                                    200
                                }
                                _ => 400,
                            };
                            let answer = http::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap();
                            Ok::<_, hyper::Error>(answer)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (collector, format!("http://{addr}"))
    }

    /// Waits for an export whose resource has `service.name` = `service`.
    async fn wait_for_service(
        &self,
        service: &str,
    ) -> (http::HeaderMap, ExportTraceServiceRequest) {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let arrived = self.arrived.notified();
                let hit = self
                    .exports
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, e)| {
                        e.resource_spans
                            .iter()
                            .any(|rs| resource_attr(rs, "service.name").as_deref() == Some(service))
                    })
                    .cloned();
                if let Some(hit) = hit {
                    return hit;
                }
                arrived.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no export from {service} within 30 s"))
    }
}

fn resource_attr(
    rs: &opentelemetry_proto::tonic::trace::v1::ResourceSpans,
    key: &str,
) -> Option<String> {
    rs.resource
        .iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

/// The standard OpenTelemetry variables, given to the real binary: spans of an Admin call go
/// over OTLP/HTTP to the traces endpoint, with the headers, the service name and the resource
/// attributes they name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_otel_environment_is_honoured() {
    let (collector, base) = HttpCollector::start().await;
    let grpc = free_port();
    let admin_token = "an-admin-token-long-enough";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .args([
            "serve",
            "--insecure-discovery",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc}"))
        .env_clear()
        .env("LB_ADMIN_TOKEN", admin_token)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
        .env("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=s%20cret")
        .env("OTEL_SERVICE_NAME", "edge-lb")
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=test,service.name=ignored",
        )
        .env("OTEL_TRACES_SAMPLER", "always_on")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = String::new();
        let mut started = Some(started_tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("control plane started")
                && let Some(tx) = started.take()
            {
                let _ = tx.send(Ok(()));
            }
        }
        if let Some(tx) = started.take() {
            let _ = tx.send(Err(seen));
        }
    });
    let started = tokio::time::timeout(WAIT, started_rx)
        .await
        .unwrap()
        .unwrap();
    if let Err(log) = started {
        panic!("the control plane did not start:\n{log}");
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{grpc}").parse().unwrap();
    let mut admin = admin_client(addr, Some(admin_token)).await;
    admin.get_config(GetConfigRequest {}).await.unwrap();

    let (headers, export) = collector.wait_for_service("edge-lb").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(headers["x-collector-key"], "s cret");
    assert_eq!(headers["content-type"], "application/x-protobuf");
    let rs = export
        .resource_spans
        .iter()
        .find(|rs| resource_attr(rs, "service.name").as_deref() == Some("edge-lb"))
        .unwrap();
    assert_eq!(
        resource_attr(rs, "deployment.environment").as_deref(),
        Some("test")
    );
    assert!(resource_attr(rs, "service.instance.id").is_some());
    assert!(rs.scope_spans.iter().any(|s| !s.spans.is_empty()));
}

/// The `control-plane serve` binary, logging JSON and exporting to a collector in the test:
/// an Admin call that carries a `traceparent` logs "API key created" inside its span, that line
/// names the call's trace and span, and the collector receives the span, a server span child of
/// the caller's. A call refused for its token is a span too, with an error status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_inside_a_traced_admin_call_names_its_trace_and_span() {
    let (collector, endpoint) = Collector::start().await;
    let admin_token = "an-admin-token-long-enough";
    let mut child = serve_command()
        .args(["--insecure-discovery", "--log-format", "json"])
        .env("LB_ADMIN_TOKEN", admin_token)
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(child.stderr.take().unwrap());
    let child = Running(child);
    let mut next_line = async |what: &str| {
        let line = line_with(&mut lines, what).await;
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let started = next_line("control plane started").await;
    let grpc = started["fields"]["grpc"].as_str().unwrap().to_owned();
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "10f067aa0ba902b7";
    let mut req = tonic::Request::new(new_key("free", "traced"));
    let meta = req.metadata_mut();
    meta.insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    meta.insert(
        "authorization",
        format!("Bearer {admin_token}").parse().unwrap(),
    );
    lb_proto::v1::admin_client::AdminClient::new(channel.clone())
        .create_api_key(req)
        .await
        .unwrap();
    let line = next_line("API key created").await;
    assert_eq!(line["trace_id"], trace_id, "{line}");
    let span_id = line["span_id"].as_str().unwrap().to_owned();
    assert_ne!(span_id, caller_span, "the call's own span: {line}");

    let call = collector
        .wait_for("for the traced Admin call", |r| {
            hex(&r.span.span_id) == span_id
        })
        .await;
    assert_eq!(call.service, "control-plane");
    assert_eq!(call.span.name, "lb.v1.Admin/CreateApiKey");
    assert_eq!(hex(&call.span.trace_id), trace_id);
    assert_eq!(hex(&call.span.parent_span_id), caller_span);
    assert_eq!(call.span.kind, 2, "a server span");
    assert_eq!(call.attr("rpc.method").as_deref(), Some("CreateApiKey"));
    assert_eq!(call.attr("rpc.grpc.status_code").as_deref(), Some("0"));

    // Refused for its token: still a span, with the status code and an error.
    let refused_trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(GetConfigRequest {});
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{refused_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let e = lb_proto::v1::admin_client::AdminClient::new(channel)
        .get_config(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let refused = collector
        .wait_for("for the refused Admin call", |r| {
            hex(&r.span.trace_id) == refused_trace
        })
        .await;
    assert_eq!(refused.attr("rpc.grpc.status_code").as_deref(), Some("16"));
    let status = refused.span.status.clone().unwrap_or_default();
    assert_eq!(status.code, 2, "an error: {status:?}");
    drop(child);
}
