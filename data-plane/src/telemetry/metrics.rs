//! Prometheus metrics of one data plane. Labels are bounded: status classes, configured backend
//! addresses and fixed outcome names, never a client address or a key.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from 0.5 ms (a local backend) to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One backend's counters at scrape time.
pub struct BackendSample {
    pub address: String,
    pub requests: u64,
    pub errors: u64,
    pub in_flight: u32,
    /// Passing active health checks (or not checked).
    pub healthy: bool,
    /// Out of rotation by outlier detection now.
    pub ejected: bool,
    /// Circuit breaker state: 0 closed, 1 open, 2 half-open.
    pub circuit: u8,
}

pub struct Metrics {
    registry: Registry,
    /// By status class, "2xx" to "5xx".
    pub responses: [IntCounter; 4],
    pub request_duration: Histogram,
    pub backend_duration: HistogramVec,
    /// Requests refused locally, by reason.
    pub refused: IntCounterVec,
    pub config_version: IntGauge,
    /// Requests sent again to another backend.
    pub retries: IntCounter,
    /// Snapshots applied and rejected.
    pub config_updates: IntCounterVec,
    pub control_plane_connected: IntGauge,
    pub connections: IntGauge,
    /// Client connections open, by proxy worker thread (see [`crate::server::spread`]).
    pub worker_connections: IntGaugeVec,
    /// Time requests spent in the priority queue waiting for a backend with room.
    pub queue_wait: Histogram,
    /// Registered only when the listener speaks TLS, so a plain listener exports no
    /// certificate expiry of 0 for alerts to trip on.
    tls: std::sync::OnceLock<TlsMetrics>,
}

/// Metrics of the TLS listener.
#[derive(Clone)]
pub struct TlsMetrics {
    /// Certificate reloads, by result ("ok" or "error").
    pub reloads: IntCounterVec,
    /// notAfter of the certificate in use, in Unix seconds.
    pub expiry: IntGauge,
    /// Client handshakes that failed, by reason ("error" or "timeout").
    pub handshake_failures: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let responses_vec = IntCounterVec::new(
            Opts::new(
                "lb_http_responses_total",
                "Responses sent to clients, by status class",
            ),
            &["code_class"],
        )
        .expect("valid metric");
        let responses = ["2xx", "3xx", "4xx", "5xx"].map(|c| responses_vec.with_label_values(&[c]));
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lb_http_request_duration_seconds",
                "Time from request head to response head, as the client sees it",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let backend_duration = HistogramVec::new(
            HistogramOpts::new(
                "lb_backend_request_duration_seconds",
                "Time each backend took to answer with a response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["backend"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "lb_requests_refused_total",
                "Requests answered by the data plane itself, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let retries = IntCounter::new("lb_retries_total", "Requests sent again to another backend")
            .expect("valid metric");
        let config_version =
            IntGauge::new("lb_config_version", "Version of the configuration in force")
                .expect("valid metric");
        let config_updates = IntCounterVec::new(
            Opts::new(
                "lb_config_updates_total",
                "Snapshots received, by result (applied or rejected)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let control_plane_connected = IntGauge::new(
            "lb_control_plane_connected",
            "1 while the configuration stream to the control plane is open",
        )
        .expect("valid metric");
        let connections = IntGauge::new("lb_client_connections", "Client connections open")
            .expect("valid metric");
        let worker_connections = IntGaugeVec::new(
            Opts::new(
                "lb_worker_connections",
                "Client connections open, by proxy worker thread",
            ),
            &["worker"],
        )
        .expect("valid metric");
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "lb_queue_wait_seconds",
                "Time requests waited in the priority queue for a backend with room",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        for c in [
            Box::new(responses_vec) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(backend_duration.clone()),
            Box::new(refused.clone()),
            Box::new(config_version.clone()),
            Box::new(retries.clone()),
            Box::new(config_updates.clone()),
            Box::new(control_plane_connected.clone()),
            Box::new(connections.clone()),
            Box::new(worker_connections.clone()),
            Box::new(queue_wait.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            responses,
            request_duration,
            backend_duration,
            refused,
            config_version,
            retries,
            config_updates,
            control_plane_connected,
            connections,
            worker_connections,
            queue_wait,
            tls: std::sync::OnceLock::new(),
        }
    }

    /// The TLS metrics, registered on first use.
    pub fn tls(&self) -> &TlsMetrics {
        self.tls.get_or_init(|| {
            let reloads = IntCounterVec::new(
                Opts::new(
                    "lb_tls_reloads_total",
                    "Certificate reloads of the proxy listener, by result (ok or error)",
                ),
                &["result"],
            )
            .expect("valid metric");
            let expiry = IntGauge::new(
                "lb_tls_certificate_expiry_seconds",
                "Expiry (notAfter) of the certificate in use, in Unix seconds",
            )
            .expect("valid metric");
            let handshake_failures = IntCounterVec::new(
                Opts::new(
                    "lb_tls_handshake_failures_total",
                    "Client TLS handshakes that failed, by reason (error or timeout)",
                ),
                &["reason"],
            )
            .expect("valid metric");
            for label in ["ok", "error"] {
                reloads.with_label_values(&[label]);
            }
            for label in ["error", "timeout"] {
                handshake_failures.with_label_values(&[label]);
            }
            for c in [
                Box::new(reloads.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(expiry.clone()),
                Box::new(handshake_failures.clone()),
            ] {
                self.registry.register(c).expect("metric names are unique");
            }
            TlsMetrics {
                reloads,
                expiry,
                handshake_failures,
            }
        })
    }

    /// Counts a response by its status class.
    pub fn response(&self, status: u16) {
        if let Some(c) = (status / 100)
            .checked_sub(2)
            .and_then(|i| self.responses.get(usize::from(i)))
        {
            c.inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory cannot fail");
        String::from_utf8(out).unwrap_or_default()
    }

    /// Per-backend counters kept by the endpoints themselves (plain atomics on the request
    /// path, read here at scrape time), appended to `out` in the text format.
    pub fn render_backends(out: &mut String, backends: &[BackendSample]) {
        use std::fmt::Write;
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&BackendSample) -> u64,
        );
        let series: [Series; 6] = [
            (
                "lb_backend_requests_total",
                "counter",
                "Requests forwarded to each backend",
                |b| b.requests,
            ),
            (
                "lb_backend_errors_total",
                "counter",
                "Requests to each backend that failed (5xx, connection error or timeout)",
                |b| b.errors,
            ),
            (
                "lb_backend_in_flight",
                "gauge",
                "Requests in flight to each backend",
                |b| u64::from(b.in_flight),
            ),
            (
                "lb_backend_healthy",
                "gauge",
                "1 while the backend passes its active health checks",
                |b| u64::from(b.healthy),
            ),
            (
                "lb_backend_ejected",
                "gauge",
                "1 while outlier detection keeps the backend out of rotation",
                |b| u64::from(b.ejected),
            ),
            (
                "lb_backend_circuit_state",
                "gauge",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open",
                |b| u64::from(b.circuit),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for b in backends {
                let label = b
                    .address
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = writeln!(out, "{name}{{backend=\"{label}\"}} {}", value(b));
            }
        }
    }

    /// A backend's latency histogram: bucket upper bounds in µs and cumulative counts (one more
    /// count than bounds: the +Inf bucket).
    pub fn backend_histogram(&self, address: &str) -> (Vec<u64>, Vec<u64>) {
        let Ok(h) = self
            .backend_duration
            .get_metric_with_label_values(&[address])
        else {
            return (Vec::new(), Vec::new());
        };
        let m = prometheus::core::Collector::collect(&h);
        let Some(hist) = m
            .first()
            .and_then(|f| f.get_metric().first())
            .map(|m| m.get_histogram().clone())
        else {
            return (Vec::new(), Vec::new());
        };
        let mut bounds = Vec::new();
        let mut counts = Vec::new();
        for b in hist.get_bucket() {
            bounds.push((b.upper_bound() * 1e6) as u64);
            counts.push(b.cumulative_count());
        }
        counts.push(hist.get_sample_count());
        (bounds, counts)
    }

    /// Stops exporting series of a backend that left the configuration.
    pub fn forget_backend(&self, address: &str) {
        let _ = self.backend_duration.remove_label_values(&[address]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
