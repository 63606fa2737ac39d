//! Prometheus metrics of one data plane. Labels are bounded: status classes, configured backend
//! addresses and fixed outcome names, never a client address or a key.

use std::collections::HashMap;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The version `lb_build_info` names.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit `lb_build_info` names (see `build.rs`).
pub const COMMIT: &str = env!("LB_BUILD_COMMIT");

/// Registers what every process of the system exports in `registry`: the `process_*` metrics
/// (CPU, resident memory, open file descriptors, start time; from `/proc` on Linux) and
/// `lb_build_info{version, commit}`.
pub fn register_process_and_build(registry: &Registry) -> prometheus::Result<()> {
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build = IntGaugeVec::new(
        Opts::new(
            "lb_build_info",
            "Always 1; its labels name the version and the commit of the running binary",
        ),
        &["version", "commit"],
    )?;
    build.with_label_values(&[VERSION, COMMIT]).set(1);
    registry.register(Box::new(build))
}

/// Circuit breaker states, in [`BackendSample::circuit`]'s numbering, as
/// `lb_backend_circuit_state`'s `state` label names them.
pub const CIRCUIT_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// Latency buckets in seconds, from 0.5 ms (a local backend) to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the live collector reads at scrape time.
#[derive(Default)]
pub struct LiveValues {
    pub backends: Vec<BackendSample>,
    /// Requests waiting in the priority queue.
    pub queue_depth: usize,
    pub cache: CacheSample,
    /// Redis is configured but unreachable: limits per data plane, cache in process.
    pub redis_degraded: bool,
}

/// The cache's counters at scrape time.
#[derive(Debug, Default)]
pub struct CacheSample {
    pub hits_memory: u64,
    pub hits_shared: u64,
    pub hits_coalesced: u64,
    pub hits_stale: u64,
    pub misses: u64,
    pub bypasses: u64,
    pub memory_bytes: u64,
    pub evictions: u64,
}

/// A metric the live collector exports.
struct LiveMetric {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const fn live(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
) -> LiveMetric {
    LiveMetric { name, help, labels }
}

/// Every metric of the live collector, in the order [`Live::collect`] gives them.
const LIVE: [LiveMetric; 12] = [
    live(
        "lb_backend_requests_total",
        "Requests forwarded to each backend",
        &["backend"],
    ),
    live(
        "lb_backend_errors_total",
        "Requests to each backend that failed (5xx, connection error or timeout)",
        &["backend"],
    ),
    live(
        "lb_backend_in_flight",
        "Requests in flight to each backend",
        &["backend"],
    ),
    live(
        "lb_backend_healthy",
        "1 while the backend passes its active health checks",
        &["backend"],
    ),
    live(
        "lb_backend_ejected",
        "1 while outlier detection keeps the backend out of rotation",
        &["backend"],
    ),
    live(
        "lb_backend_circuit_state",
        "1 for the state each backend's circuit breaker is in (closed, open or half_open), 0 for the others",
        &["backend", "state"],
    ),
    live(
        "lb_queue_depth",
        "Requests waiting in the priority queue for a backend with room",
        &[],
    ),
    live(
        "lb_cache_lookups_total",
        "Cache lookups by result and, for hits, the tier that answered",
        &["result", "tier"],
    ),
    live(
        "lb_cache_memory_bytes",
        "Bytes held by the in-process cache tier",
        &[],
    ),
    live(
        "lb_cache_evictions_total",
        "Entries evicted from the in-process tier to stay within its bound",
        &[],
    ),
    live(
        "lb_cache_store_degraded",
        "1 while Redis is configured but unreachable and only the in-process tier serves",
        &[],
    ),
    live(
        "lb_ratelimit_store_degraded",
        "1 while Redis is configured but unreachable and limits are enforced per data plane",
        &[],
    ),
];

/// The collector of values kept outside the registry.
struct Live {
    descs: Vec<Desc>,
    read: Box<dyn Fn() -> LiveValues + Send + Sync>,
}

impl Collector for Live {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let v = (self.read)();
        let per_backend = |value: fn(&BackendSample) -> u64| {
            v.backends
                .iter()
                .map(move |b| (vec![b.address.as_str()], value(b)))
        };
        let one = |value: u64| std::iter::once((Vec::new(), value));
        let c = &v.cache;
        let lookups = [
            (["hit", "memory"], c.hits_memory),
            (["hit", "shared"], c.hits_shared),
            (["hit", "coalesced"], c.hits_coalesced),
            (["stale", "any"], c.hits_stale),
            (["miss", "none"], c.misses),
            (["bypass", "none"], c.bypasses),
        ]
        .map(|(labels, n)| (labels.to_vec(), n));
        let degraded = u64::from(v.redis_degraded);
        vec![
            family(&LIVE[0], Kind::Counter, per_backend(|b| b.requests)),
            family(&LIVE[1], Kind::Counter, per_backend(|b| b.errors)),
            family(&LIVE[2], Kind::Gauge, per_backend(|b| u64::from(b.in_flight))),
            family(&LIVE[3], Kind::Gauge, per_backend(|b| u64::from(b.healthy))),
            family(&LIVE[4], Kind::Gauge, per_backend(|b| u64::from(b.ejected))),
            family(
                &LIVE[5],
                Kind::Gauge,
                v.backends.iter().flat_map(|b| {
                    CIRCUIT_STATES.iter().enumerate().map(|(i, state)| {
                        (
                            vec![b.address.as_str(), *state],
                            u64::from(usize::from(b.circuit) == i),
                        )
                    })
                }),
            ),
            family(&LIVE[6], Kind::Gauge, one(v.queue_depth as u64)),
            family(&LIVE[7], Kind::Counter, lookups.into_iter()),
            family(&LIVE[8], Kind::Gauge, one(c.memory_bytes)),
            family(&LIVE[9], Kind::Counter, one(c.evictions)),
            family(&LIVE[10], Kind::Gauge, one(degraded)),
            family(&LIVE[11], Kind::Gauge, one(degraded)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A metric family of `m`'s name, help and labels, one series per sample (label values and
/// value), made with the crate's own vectors.
fn family<'a>(
    m: &LiveMetric,
    kind: Kind,
    samples: impl Iterator<Item = (Vec<&'a str>, u64)>,
) -> Option<MetricFamily> {
    let opts = Opts::new(m.name, m.help);
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut families = match kind {
        Kind::Counter => {
            let vec = IntCounterVec::new(opts, m.labels).expect("valid metric");
            for (labels, n) in samples {
                vec.with_label_values(&labels).inc_by(n);
            }
            vec.collect()
        }
        Kind::Gauge => {
            let vec = IntGaugeVec::new(opts, m.labels).expect("valid metric");
            for (labels, n) in samples {
                vec.with_label_values(&labels).set(clamp(n));
            }
            vec.collect()
        }
    };
    families.pop().filter(|f| !f.get_metric().is_empty())
}

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
    /// Client connections closed at accept, by reason.
    pub connections_refused: IntCounterVec,
    /// Client connections open, by proxy worker thread (see [`crate::server::spread`]).
    pub worker_connections: IntGaugeVec,
    /// Time requests spent in the priority queue waiting for a backend with room.
    pub queue_wait: Histogram,
    /// Upgraded connections (WebSockets and other `Upgrade` protocols) open.
    pub tunnels_open: IntGauge,
    /// Bytes carried by upgraded connections: `[to_backend, to_client]`.
    pub tunnel_bytes: [IntCounter; 2],
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
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "lb_connections_refused_total",
                "Client connections closed as soon as they were accepted, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        connections_refused.with_label_values(&["per_ip_limit"]);
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
        let tunnels_open = IntGauge::new(
            "lb_tunnels_open",
            "Upgraded connections (WebSockets and other Upgrade protocols) open",
        )
        .expect("valid metric");
        let tunnel_bytes_vec = IntCounterVec::new(
            Opts::new(
                "lb_tunnel_bytes_total",
                "Bytes carried by upgraded connections, by direction (to_backend or to_client)",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let tunnel_bytes =
            ["to_backend", "to_client"].map(|d| tunnel_bytes_vec.with_label_values(&[d]));
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
            Box::new(connections_refused.clone()),
            Box::new(worker_connections.clone()),
            Box::new(queue_wait.clone()),
            Box::new(tunnels_open.clone()),
            Box::new(tunnel_bytes_vec),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        register_process_and_build(&registry).expect("metric names are unique");
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
            connections_refused,
            worker_connections,
            queue_wait,
            tunnels_open,
            tunnel_bytes,
            tls: std::sync::OnceLock::new(),
        }
    }

    /// The TLS metrics, registered on first use.
    pub fn tls(&self) -> &TlsMetrics {
        self.tls.get_or_init(|| {
            TlsMetrics::register(&self.registry, "lb_tls", "the proxy listener")
                .expect("metric names are unique")
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

    /// Exports values kept outside the registry, read by `read` at each scrape: the
    /// per-backend counters (plain atomics on the request path), the queue depth, the cache's
    /// counters and the Redis link's state.
    pub fn register_live(&self, read: impl Fn() -> LiveValues + Send + Sync + 'static) {
        let live = Live {
            descs: LIVE
                .iter()
                .map(|m| {
                    let labels = m.labels.iter().map(|l| (*l).to_owned()).collect();
                    Desc::new(m.name.to_owned(), m.help.to_owned(), labels, HashMap::new())
                        .expect("valid metric")
                })
                .collect(),
            read: Box::new(read),
        };
        self.registry
            .register(Box::new(live))
            .expect("metric names are unique");
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
