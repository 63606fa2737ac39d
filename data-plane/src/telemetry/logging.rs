//! Process-level plumbing shared by the binaries: log set-up and the shutdown signal.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// Logs to stderr, one JSON object per line when `json`, filtered by `RUST_LOG` (default info).
/// Text logs are coloured only when stderr is a terminal and `NO_COLOR` is unset or empty. A
/// line written while a traced request (or Admin call) is handled names its trace and span.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let no_color = std::env::var_os("NO_COLOR");
    let ansi = colour_wanted(std::io::stderr().is_terminal(), no_color.as_deref());
    let _ = LOG_FORMAT.set(LogFormat { json, ansi });
    let _ = subscriber(json, ansi, filter(), std::io::stderr).try_init();
}

/// The format [`init_tracing`] set up, for [`log_layer`].
#[derive(Clone, Copy)]
struct LogFormat {
    json: bool,
    ansi: bool,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// `RUST_LOG`, or `info`.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The log lines of [`init_tracing`] as a layer of another subscriber (the control plane runs
/// its traced Admin calls under one of their own, which also makes their spans); none when
/// logging was not set up (a library in tests).
pub fn log_layer<S>() -> Option<Box<dyn Layer<S> + Send + Sync>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let LogFormat { json, ansi } = *LOG_FORMAT.get()?;
    Some(fmt_layer(json, ansi, std::io::stderr).with_filter(filter()).boxed())
}

/// The log subscriber [`init_tracing`] installs, writing to `writer`.
fn subscriber<W>(
    json: bool,
    ansi: bool,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    Box::new(tracing_subscriber::registry().with(fmt_layer(json, ansi, writer).with_filter(filter)))
}

/// Lines as [`init_tracing`] writes them, to `writer`.
fn fmt_layer<S, W>(json: bool, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        layer
            .json()
            .event_format(TraceIds {
                inner: format().json(),
                json: true,
            })
            .boxed()
    } else {
        layer
            .event_format(TraceIds {
                inner: format().with_ansi(ansi),
                json: false,
            })
            .boxed()
    }
}

fn format() -> format::Format {
    format::Format::default()
}

/// Adds the current trace context ([`super::otel::current_ids`]) to each line: JSON fields
/// `trace_id` and `span_id`, or ` trace_id=… span_id=…` at the end of a text line (such a line
/// is written without colour). Lines outside a traced request are left as they are.
struct TraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace, span)) = super::otel::current_ids() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        match line.strip_suffix('}').filter(|_| self.json) {
            Some(open) => writeln!(
                writer,
                "{open},\"trace_id\":\"{trace}\",\"span_id\":\"{span}\"}}"
            ),
            None => writeln!(writer, "{line} trace_id={trace} span_id={span}"),
        }
    }
}

/// Whether log lines carry ANSI colour: only on a terminal, and never when `NO_COLOR` holds a
/// non-empty value (<https://no-color.org>).
pub fn colour_wanted(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

/// An error and its causes on one line, `outer: inner: …`, each cause said once: a cause whose
/// text an outer message already quotes is left out.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. Logs nothing: each binary says so under
/// its own name.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `subscriber` writes for one warning, inside `context` when given.
    fn logged(json: bool, context: Option<opentelemetry::Context>) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let out = buffer.clone();
        let s = subscriber(json, false, EnvFilter::new("info"), move || out.clone());
        tracing::subscriber::with_default(s, || {
            let _guard = context.map(opentelemetry::Context::attach);
            tracing::warn!(backend = "10.0.0.1:80", "backend request failed");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_inside_a_trace_name_it() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let sc = SpanContext::new(trace, span, TraceFlags::SAMPLED, false, TraceState::default());
        let cx = || Some(opentelemetry::Context::new().with_remote_span_context(sc.clone()));

        let line = logged(true, cx());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{line}");
        assert_eq!(v["span_id"], "00f067aa0ba902b7", "{line}");
        assert_eq!(v["fields"]["backend"], "10.0.0.1:80", "{line}");
        let line = logged(false, cx());
        assert!(
            line.ends_with(
                "backend=\"10.0.0.1:80\" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7\n"
            ),
            "{line:?}"
        );
        // Outside a trace, nothing is added.
        let line = logged(true, None);
        assert!(!line.contains("trace_id"), "{line}");
        assert!(!logged(false, None).contains("trace_id"));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(false, Some(OsStr::new(""))));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("state file x: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_quoted_by_its_error_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Quoting { source: io }).context("cannot load");
        assert_eq!(error_report(&e), "cannot load: state file x: no such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_report(&e), "outer: inner");
    }
}
