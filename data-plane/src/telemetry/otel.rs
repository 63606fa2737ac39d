//! OpenTelemetry traces, exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! The request path uses the OpenTelemetry API directly rather than `tracing` spans: with
//! export off it costs one branch, and with it on one span per sampled request. Sampling is
//! parent-based: a client's `traceparent` decides; otherwise the ratio from
//! `OTEL_TRACES_SAMPLER_ARG` (default 1.0), decided before anything is built ([`Tracing::wanted`]),
//! so a request left out of a new trace costs one random number. The span context goes on to
//! the backend in `traceparent`, so the backend's spans join the client's trace.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub use opentelemetry::trace::{Span, Status};
pub type RequestSpan = opentelemetry_sdk::trace::Span;

/// The standard variable naming the collector; tracing is off when it is unset or empty.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard variable holding the sampling ratio.
pub const RATIO_VAR: &str = "OTEL_TRACES_SAMPLER_ARG";

/// Where spans go and how many: read from the standard OTel environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    pub endpoint: String,
    /// Share of new traces (without a sampled parent) that are recorded, 0.0 to 1.0.
    pub ratio: f64,
}

impl TraceSettings {
    /// `None` when the endpoint is unset; an error naming the variable when a value is unusable.
    pub fn from_env() -> Result<Option<TraceSettings>, String> {
        let endpoint = std::env::var(ENDPOINT_VAR).ok();
        let ratio = std::env::var(RATIO_VAR).ok();
        TraceSettings::parse(endpoint.as_deref(), ratio.as_deref())
    }

    pub fn parse(
        endpoint: Option<&str>,
        ratio: Option<&str>,
    ) -> Result<Option<TraceSettings>, String> {
        let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(format!(
                "{ENDPOINT_VAR}: {endpoint:?} must be an http:// or https:// URL"
            ));
        }
        let ratio = match ratio.map(str::trim).filter(|r| !r.is_empty()) {
            None => 1.0,
            Some(r) => match r.parse::<f64>() {
                Ok(v) if (0.0..=1.0).contains(&v) => v,
                _ => {
                    return Err(format!(
                        "{RATIO_VAR}: {r:?} must be a number from 0.0 to 1.0"
                    ));
                }
            },
        };
        Ok(Some(TraceSettings {
            endpoint: endpoint.to_owned(),
            ratio,
        }))
    }
}

/// A tracer exporting in batches on its own thread.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    ratio: f64,
}

impl Tracing {
    /// Builds the exporter; must run inside a tokio runtime (the gRPC channel lives there).
    pub fn start(
        settings: &TraceSettings,
        service: &'static str,
        instance: &str,
    ) -> Result<Tracing, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("{ENDPOINT_VAR}: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // New traces are sampled by `wanted`; the SDK follows the caller's sampled flag.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(service);
        Ok(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            ratio: settings.ratio,
        })
    }

    /// Whether a span is made for a request with these headers: always when the caller sends
    /// a trace context (continued, sampled or not, as its flag says); otherwise for the
    /// configured share of new traces. A request left out gets no span and no `traceparent`.
    pub fn wanted(&self, headers: &HeaderMap) -> bool {
        headers.contains_key("traceparent") || (self.ratio > 0.0 && fastrand::f64() < self.ratio)
    }

    /// The caller's trace context from `traceparent` / `tracestate`, if any.
    pub fn extract(&self, headers: &HeaderMap) -> Context {
        self.propagator.extract(&HeaderExtractor(headers))
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
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
    }

    /// Exports what is buffered and stops the export thread. Blocks; call off the event loop.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(cause = %e, "trace export did not shut down cleanly");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_standard_variables() {
        assert_eq!(TraceSettings::parse(None, Some("0.5")), Ok(None));
        assert_eq!(TraceSettings::parse(Some("  "), None), Ok(None));
        assert_eq!(
            TraceSettings::parse(Some("http://collector:4317"), None),
            Ok(Some(TraceSettings {
                endpoint: "http://collector:4317".into(),
                ratio: 1.0
            }))
        );
        assert_eq!(
            TraceSettings::parse(Some("http://c:4317"), Some("0.25")).map(|s| s.map(|s| s.ratio)),
            Ok(Some(0.25))
        );
        let bad_url = TraceSettings::parse(Some("collector:4317"), None).unwrap_err();
        assert!(bad_url.contains(ENDPOINT_VAR), "{bad_url}");
        for ratio in ["2", "-0.1", "half"] {
            let e = TraceSettings::parse(Some("http://c:4317"), Some(ratio)).unwrap_err();
            assert!(e.contains(RATIO_VAR), "{e}");
        }
    }
}
