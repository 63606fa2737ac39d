//! OpenTelemetry traces, exported over OTLP (gRPC or HTTP/protobuf) when a collector is named.
//!
//! Settings come from the standard OpenTelemetry environment, as its specification says:
//! `OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as given) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (for HTTP, `/v1/traces` appended), `..._TRACES_PROTOCOL` or
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default here, or `http/protobuf`),
//! `..._TRACES_HEADERS` or `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, and `OTEL_TRACES_SAMPLER` with `OTEL_TRACES_SAMPLER_ARG`. A value
//! that cannot be used is an error naming the variable, not a silent default.
//!
//! The request path uses the OpenTelemetry API directly rather than `tracing` spans: with
//! export off it costs one branch, and with it on one span per sampled request. The sampling
//! decision for a new trace is made before anything is built ([`Tracing::wanted`]), so a request
//! left out costs one random number; with a parent-based sampler a caller's `traceparent`
//! decides. The span context goes on to the backend in `traceparent`, so the backend's spans
//! join the client's trace.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanId, SpanKind, TraceContextExt, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub use opentelemetry::trace::{Span, Status};
pub type RequestSpan = opentelemetry_sdk::trace::Span;

/// The collector for every signal (tracing is off when neither endpoint variable is set).
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The collector for traces, used as given.
pub const TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The sampler's argument: the ratio of the `traceidratio` samplers.
pub const RATIO_VAR: &str = "OTEL_TRACES_SAMPLER_ARG";
const SAMPLER_VAR: &str = "OTEL_TRACES_SAMPLER";
const DISABLED_VAR: &str = "OTEL_SDK_DISABLED";
const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
const RESOURCE_VAR: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Which new traces are recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// A caller's `traceparent` decides for its trace (the `parentbased_*` samplers).
    pub parent_based: bool,
    /// Share of the traces this decides that are recorded: 1.0 `always_on`, 0.0 `always_off`,
    /// else `traceidratio`'s argument.
    pub ratio: f64,
}

/// Where spans go, how, and how many: read from the standard OTel environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// For gRPC the collector's address; for HTTP the whole URL spans are posted to.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`: API keys of hosted collectors).
    pub headers: Vec<(String, String)>,
    pub sampling: Sampling,
    /// `OTEL_SERVICE_NAME`, else `service.name` in the resource attributes, else the binary's.
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`, in order.
    pub resource: Vec<(String, String)>,
}

impl TraceSettings {
    /// Export over gRPC to `endpoint`, recording `ratio` of new traces and every trace a caller
    /// brings.
    pub fn grpc(endpoint: impl Into<String>, ratio: f64) -> TraceSettings {
        TraceSettings {
            endpoint: endpoint.into(),
            protocol: Protocol::Grpc,
            headers: Vec::new(),
            sampling: Sampling {
                parent_based: true,
                ratio,
            },
            service_name: None,
            resource: Vec::new(),
        }
    }

    /// From this process's environment.
    pub fn from_env() -> Result<Option<TraceSettings>, String> {
        TraceSettings::from_vars(|name| std::env::var(name).ok())
    }

    /// `None` when the SDK is disabled or no endpoint is set; an error naming the variable
    /// when a value is unusable. `var` reads one variable.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<TraceSettings>, String> {
        let get = |name: &str| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(disabled) = get(DISABLED_VAR) {
            match disabled.to_ascii_lowercase().as_str() {
                "true" => return Ok(None),
                "false" => {}
                _ => return Err(format!("{DISABLED_VAR}: {disabled:?} must be true or false")),
            }
        }
        let protocol_var = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
            .into_iter()
            .find_map(|name| get(name).map(|v| (name, v)));
        let protocol = match protocol_var {
            None => Protocol::Grpc,
            Some((_, p)) if p == "grpc" => Protocol::Grpc,
            Some((_, p)) if p == "http/protobuf" => Protocol::HttpProtobuf,
            Some((name, p)) => {
                return Err(format!(
                    "{name}: {p:?} is not supported; use grpc or http/protobuf"
                ));
            }
        };
        let endpoint = match (get(TRACES_ENDPOINT_VAR), get(ENDPOINT_VAR)) {
            (Some(e), _) => (TRACES_ENDPOINT_VAR, e),
            (None, Some(e)) if protocol == Protocol::HttpProtobuf => {
                (ENDPOINT_VAR, format!("{}/v1/traces", e.trim_end_matches('/')))
            }
            (None, Some(e)) => (ENDPOINT_VAR, e),
            (None, None) => return Ok(None),
        };
        let (endpoint_var, endpoint) = endpoint;
        if !endpoint.starts_with("http://") {
            return Err(format!(
                "{endpoint_var}: {endpoint:?} must be an http:// URL (export over TLS is not \
                 built in: use a collector on the host or in the pod)"
            ));
        }
        let headers = match ["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"]
            .into_iter()
            .find_map(|name| get(name).map(|v| (name, v)))
        {
            None => Vec::new(),
            Some((name, v)) => {
                let headers = key_values(&v).map_err(|e| format!("{name}: {e}"))?;
                if let Some((k, _)) = headers.iter().find(|(k, v)| {
                    HeaderName::from_bytes(k.as_bytes()).is_err() || HeaderValue::from_str(v).is_err()
                }) {
                    return Err(format!("{name}: {k:?} is not a valid header"));
                }
                headers
            }
        };
        let resource = match get(RESOURCE_VAR) {
            None => Vec::new(),
            Some(v) => key_values(&v).map_err(|e| format!("{RESOURCE_VAR}: {e}"))?,
        };
        let service_name = get(SERVICE_NAME_VAR).or_else(|| {
            resource
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        });
        Ok(Some(TraceSettings {
            endpoint,
            protocol,
            headers,
            sampling: sampling(get(SAMPLER_VAR).as_deref(), get(RATIO_VAR).as_deref())?,
            service_name,
            resource,
        }))
    }
}

/// `OTEL_TRACES_SAMPLER` and its argument (the ratio of the `traceidratio` samplers, default 1).
fn sampling(sampler: Option<&str>, arg: Option<&str>) -> Result<Sampling, String> {
    let ratio = || match arg {
        None => Ok(1.0),
        Some(r) => match r.parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
            _ => Err(format!("{RATIO_VAR}: {r:?} must be a number from 0.0 to 1.0")),
        },
    };
    let (parent_based, ratio) = match sampler.unwrap_or("parentbased_traceidratio") {
        "always_on" => (false, 1.0),
        "always_off" => (false, 0.0),
        "traceidratio" => (false, ratio()?),
        "parentbased_always_on" => (true, 1.0),
        "parentbased_always_off" => (true, 0.0),
        "parentbased_traceidratio" => (true, ratio()?),
        other => {
            return Err(format!(
                "{SAMPLER_VAR}: {other:?} is not one of always_on, always_off, traceidratio, \
                 parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
            ));
        }
    };
    Ok(Sampling {
        parent_based,
        ratio,
    })
}

/// `key1=value1,key2=value2` with percent-encoded values (the OTel environment's lists).
fn key_values(list: &str) -> Result<Vec<(String, String)>, String> {
    list.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("{:?} is not key=value", item.trim()))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(format!("{:?} has an empty key", item.trim()));
            }
            Ok((k.to_owned(), percent_decode(v.trim()).map_err(|e| format!("{k}: {e}"))?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// A tracer exporting in batches on its own thread.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    sampling: Sampling,
}

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

impl Tracing {
    /// Builds the exporter; must run inside a tokio runtime (the gRPC channel, and the HTTP
    /// exporter's requests, live there). `service` is the service name unless the environment
    /// names one; `instance` the `service.instance.id` unless the resource attributes give one.
    pub fn start(
        settings: &TraceSettings,
        service: &'static str,
        instance: &str,
    ) -> Result<Tracing, String> {
        let endpoint_error = |e: &dyn std::fmt::Display| format!("{ENDPOINT_VAR}: {e}");
        let exporter = match settings.protocol {
            Protocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &settings.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(
                        k.to_ascii_lowercase().as_bytes(),
                    )
                    .map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?}: {e}"))?;
                    let value = v
                        .parse()
                        .map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?}: {e}"))?;
                    metadata.insert(key, value);
                }
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.clone())
                    .with_timeout(EXPORT_TIMEOUT)
                    .with_metadata(metadata)
                    .build()
                    .map_err(|e| endpoint_error(&e))?
            }
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .with_headers(settings.headers.iter().cloned().collect())
                .with_http_client(OtlpHttp::new())
                .build()
                .map_err(|e| endpoint_error(&e))?,
        };
        let given = |key: &str| settings.resource.iter().any(|(k, _)| k == key);
        let mut attributes: Vec<KeyValue> = settings
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        if !given("service.instance.id") {
            attributes.push(KeyValue::new("service.instance.id", instance.to_owned()));
        }
        let resource = Resource::builder_empty()
            .with_attributes(attributes)
            .with_service_name(settings.service_name.clone().unwrap_or(service.to_owned()))
            .build();
        // New traces are sampled by `wanted`; a parent-based SDK sampler follows the caller's
        // sampled flag.
        let sampler = if settings.sampling.parent_based {
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
        } else {
            Sampler::AlwaysOn
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(service);
        Ok(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            sampling: settings.sampling,
        })
    }

    /// Whether a span is made for a request with these headers: with a parent-based sampler,
    /// always when the caller sends a trace context (continued, sampled or not, as its flag
    /// says); otherwise for the configured share of traces. A request left out gets no span and
    /// no `traceparent`.
    pub fn wanted(&self, headers: &HeaderMap) -> bool {
        let Sampling {
            parent_based,
            ratio,
        } = self.sampling;
        (parent_based && headers.contains_key("traceparent"))
            || ratio >= 1.0
            || (ratio > 0.0 && fastrand::f64() < ratio)
    }

    /// The caller's trace context from `traceparent` / `tracestate`, if any.
    pub fn extract(&self, headers: &HeaderMap) -> Context {
        self.propagator.extract(&HeaderExtractor(headers))
    }

    /// The SDK tracer, for a `tracing-opentelemetry` layer (the control plane's Admin calls).
    pub fn sdk_tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// Starts a server span, child of the caller's context.
    pub fn server_span(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> RequestSpan {
        self.tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent)
    }

    /// Writes `span`'s context into `headers` (`traceparent`, `tracestate`), replacing the
    /// caller's, so the next hop is a child of `span`.
    pub fn inject(&self, span: &RequestSpan, headers: &mut HeaderMap) {
        self.propagator
            .inject_context(&context_of(span), &mut HeaderInjector(headers));
    }

    /// Exports what is buffered and stops the export thread. Blocks; call off the event loop.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(cause = %e, "trace export did not shut down cleanly");
        }
    }
}

/// The context of `span`: made current while its request is handled
/// (`opentelemetry::context::FutureExt::with_context`), so log lines written meanwhile name its
/// trace ([`current_ids`]); handed to the next hop in `traceparent`.
pub fn context_of(span: &RequestSpan) -> Context {
    Context::new().with_remote_span_context(span.span_context().clone())
}

/// The trace and span ids of the context current on this thread, when it holds a span.
pub fn current_ids() -> Option<(TraceId, SpanId)> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// OTLP/HTTP export on this crate's own HTTP client. The exporter calls it from its own
/// thread; each request runs on the runtime that started tracing.
#[derive(Debug)]
struct OtlpHttp {
    runtime: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
}

/// Largest collector answer read (it is a small protobuf message, or an error text).
const MAX_COLLECTOR_ANSWER: usize = 64 * 1024;

impl OtlpHttp {
    fn new() -> OtlpHttp {
        OtlpHttp {
            runtime: tokio::runtime::Handle::current(),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }
}

#[tonic::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt;
        let client = self.client.clone();
        let exchange = async move {
            let response = client.request(request.map(http_body_util::Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_COLLECTOR_ANSWER)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, exchange).await });
        match task.await? {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer from the collector in {EXPORT_TIMEOUT:?}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Option<TraceSettings>, String> {
        TraceSettings::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn no_endpoint_or_a_disabled_sdk_means_no_export() {
        assert_eq!(from(&[]), Ok(None));
        assert_eq!(from(&[(RATIO_VAR, "0.5")]), Ok(None));
        assert_eq!(from(&[(ENDPOINT_VAR, "  ")]), Ok(None));
        let on = [(ENDPOINT_VAR, "http://c:4317"), (DISABLED_VAR, "TRUE")];
        assert_eq!(from(&on), Ok(None));
        let e = from(&[(ENDPOINT_VAR, "http://c:4317"), (DISABLED_VAR, "yes")]).unwrap_err();
        assert!(e.starts_with(DISABLED_VAR), "{e}");
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let s = from(&[(ENDPOINT_VAR, "http://c:4317")]).unwrap().unwrap();
        assert_eq!(s, TraceSettings::grpc("http://c:4317", 1.0));
        // HTTP: the signal path is added to the generic endpoint, not to the traces one.
        let http = ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
        let s = from(&[(ENDPOINT_VAR, "http://c:4318/"), http]).unwrap().unwrap();
        assert_eq!(
            (s.endpoint.as_str(), s.protocol),
            ("http://c:4318/v1/traces", Protocol::HttpProtobuf)
        );
        let vars = [
            (ENDPOINT_VAR, "http://c:4318"),
            (TRACES_ENDPOINT_VAR, "http://t:4318/custom"),
            http,
        ];
        assert_eq!(from(&vars).unwrap().unwrap().endpoint, "http://t:4318/custom");
        // The traces protocol wins over the generic one.
        let vars = [
            (ENDPOINT_VAR, "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ];
        assert_eq!(from(&vars).unwrap().unwrap().protocol, Protocol::Grpc);
        for (vars, named) in [
            (vec![(ENDPOINT_VAR, "collector:4317")], ENDPOINT_VAR),
            (vec![(TRACES_ENDPOINT_VAR, "https://c:4317")], TRACES_ENDPOINT_VAR),
            (
                vec![(ENDPOINT_VAR, "http://c"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
        ] {
            let e = from(&vars).unwrap_err();
            assert!(e.starts_with(named), "{e}");
        }
    }

    #[test]
    fn headers_and_resource_attributes_are_decoded_lists() {
        let vars = [
            (ENDPOINT_VAR, "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%20cret, x-team=edge"),
            (RESOURCE_VAR, "deployment.environment=prod,service.name=edge-lb"),
        ];
        let s = from(&vars).unwrap().unwrap();
        assert_eq!(
            s.headers,
            [("api-key".into(), "s cret".into()), ("x-team".into(), "edge".into())]
        );
        assert_eq!(s.service_name.as_deref(), Some("edge-lb"));
        assert_eq!(s.resource[0], ("deployment.environment".into(), "prod".into()));
        // OTEL_SERVICE_NAME wins over service.name in the attributes.
        let mut named = vars.to_vec();
        named.push((SERVICE_NAME_VAR, "lb-eu"));
        assert_eq!(from(&named).unwrap().unwrap().service_name.as_deref(), Some("lb-eu"));
        for (var, bad) in [
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz"),
            (RESOURCE_VAR, "=v"),
        ] {
            let e = from(&[(ENDPOINT_VAR, "http://c:4317"), (var, bad)]).unwrap_err();
            assert!(e.starts_with(var), "{e}");
        }
    }

    #[test]
    fn samplers_are_the_specification_names() {
        let with = |sampler: &str, arg: Option<&str>| sampling(Some(sampler), arg);
        assert_eq!(sampling(None, None).unwrap(), Sampling { parent_based: true, ratio: 1.0 });
        assert_eq!(sampling(None, Some("0.25")).unwrap().ratio, 0.25);
        assert_eq!(with("always_off", None).unwrap(), Sampling { parent_based: false, ratio: 0.0 });
        assert_eq!(with("traceidratio", Some("0.1")).unwrap(), Sampling { parent_based: false, ratio: 0.1 });
        assert_eq!(with("parentbased_always_off", Some("0.9")).unwrap().ratio, 0.0);
        assert!(with("jaeger_remote", None).unwrap_err().starts_with(SAMPLER_VAR));
        for ratio in ["2", "-0.1", "half"] {
            let e = with("traceidratio", Some(ratio)).unwrap_err();
            assert!(e.starts_with(RATIO_VAR), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn a_list_never_panics_and_round_trips_plain_pairs(
            raw in ".{0,64}",
            pairs in proptest::collection::vec(("[a-z.]{1,8}", "[a-zA-Z0-9 ]{0,8}"), 0..4),
        ) {
            let _ = key_values(&raw);
            let text = pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace(' ', "%20")))
                .collect::<Vec<_>>()
                .join(",");
            let parsed = key_values(&text).unwrap();
            let wanted: Vec<(String, String)> =
                pairs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            proptest::prop_assert_eq!(parsed, wanted);
        }
    }
}
