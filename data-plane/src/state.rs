//! What a data plane runs on: the [`Active`] configuration, swapped atomically as a whole when a
//! snapshot is applied (each request loads it once, so no request sees half of two configs), and
//! the per-backend [`Endpoint`] counters, which outlive snapshots so that in-flight counts and
//! latency survive a strategy or weight change.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::Authority;
use lb_proto::v1::ConfigSnapshot;
use lb_proto::validate::{self, Invalid};
use prometheus::Histogram;
use tokio::sync::watch;

use crate::balance::{Balancer, Candidates};
use crate::metrics::{BackendSample, Metrics};
use crate::settings::Settings;
use crate::upstream::IdleConns;

/// One backend's live counters, shared by every snapshot that lists it.
pub struct Endpoint {
    pub address: String,
    pub authority: Authority,
    /// The address when it is an IP literal (no resolution needed per connect).
    pub resolved: Option<SocketAddr>,
    /// Idle keep-alive connections to this backend, per worker thread.
    pub idle: Arc<IdleConns>,
    in_flight: AtomicU32,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Smoothed latency in microseconds (0 = not measured yet).
    latency_us: AtomicU64,
    m_duration: Histogram,
}

/// Weight of the newest latency sample in the moving average.
const LATENCY_ALPHA: f64 = 0.2;

impl Endpoint {
    fn new(address: &str, metrics: &Metrics, workers: usize) -> Result<Endpoint, Invalid> {
        let authority = address
            .parse::<Authority>()
            .map_err(|e| Invalid::new("backend.address", format_args!("{address:?}: {e}")))?;
        Ok(Endpoint {
            address: address.to_owned(),
            authority,
            resolved: address.parse().ok(),
            idle: Arc::new(IdleConns::new(workers)),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            m_duration: metrics.backend_duration.with_label_values(&[address]),
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn latency_us(&self) -> u64 {
        self.latency_us.load(Ordering::Relaxed)
    }

    /// Counts a request as started; the guard ends it when dropped (when the response body is
    /// done or abandoned), so in-flight counts cover streaming bodies too.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Records the outcome of one request: `elapsed` to the response head, failed or not.
    pub fn record(&self, elapsed: Duration, failed: bool) {
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.m_duration.observe(elapsed.as_secs_f64());
        let sample = elapsed.as_micros().min(u128::from(u64::MAX / 2)) as u64;
        let old = self.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample.max(1)
        } else {
            ((old as f64) + LATENCY_ALPHA * (sample as f64 - old as f64)).max(1.0) as u64
        };
        // A lost race only drops one sample from the average.
        self.latency_us.store(new, Ordering::Relaxed);
    }
}

/// A request in flight to an endpoint; ends on drop.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend as one snapshot configures it.
pub struct Slot {
    pub endpoint: Arc<Endpoint>,
    pub weight: u32,
    pub draining: bool,
}

/// The configuration in force, derived from one validated snapshot.
pub struct Active {
    pub snapshot: ConfigSnapshot,
    pub slots: Vec<Slot>,
    pub balancer: Balancer,
    pub connect_timeout: Duration,
    pub request_timeout: Option<Duration>,
}

impl Candidates for Active {
    fn len(&self) -> usize {
        self.slots.len()
    }
    fn usable(&self, i: usize) -> bool {
        !self.slots[i].draining
    }
    fn in_flight(&self, i: usize) -> u32 {
        self.slots[i].endpoint.in_flight()
    }
    fn latency_us(&self, i: usize) -> u64 {
        self.slots[i].endpoint.latency_us()
    }
}

impl Active {
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }
}

/// State shared by the proxy, the admin listener and the discovery client.
pub struct Shared {
    pub settings: Settings,
    active: ArcSwapOption<Active>,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    pub metrics: Metrics,
    pub control_plane_connected: AtomicBool,
    /// The last snapshot refused: its version and why.
    pub last_rejected: Mutex<Option<(u64, String)>>,
    applied: watch::Sender<u64>,
}

impl Shared {
    pub fn new(settings: Settings) -> Shared {
        Shared {
            settings,
            active: ArcSwapOption::empty(),
            endpoints: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
            control_plane_connected: AtomicBool::new(false),
            last_rejected: Mutex::new(None),
            applied: watch::channel(0).0,
        }
    }

    /// The configuration in force, if any yet.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active.load_full()
    }

    /// Version in force (0 = none), and a way to wait for a change.
    pub fn applied_version(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Checks a snapshot against the contract and this data plane's own rules, and builds what
    /// it would run on. Nothing is changed: a refused snapshot leaves no trace but the error.
    pub fn prepare(&self, snapshot: ConfigSnapshot) -> Result<Active, Invalid> {
        validate::snapshot(&snapshot)?;
        if !self.settings.allowed_backends.is_empty() {
            for b in &snapshot.backends {
                let (host, _) = b.address.rsplit_once(':').unwrap_or((&b.address, ""));
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let allowed = host.parse::<IpAddr>().is_ok_and(|ip| {
                    self.settings
                        .allowed_backends
                        .iter()
                        .any(|n| n.contains(&ip))
                });
                if !allowed {
                    let nets: Vec<String> = self
                        .settings
                        .allowed_backends
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    return Err(Invalid::new(
                        "backends",
                        format_args!(
                            "backend {} is outside the networks this data plane may reach ({})",
                            b.address,
                            nets.join(", ")
                        ),
                    ));
                }
            }
        }
        let slots = {
            let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            let mut slots = Vec::with_capacity(snapshot.backends.len());
            for b in &snapshot.backends {
                let endpoint = match endpoints.get(&b.address) {
                    Some(e) => Arc::clone(e),
                    None => {
                        let e = Arc::new(Endpoint::new(
                            &b.address,
                            &self.metrics,
                            self.settings.workers,
                        )?);
                        endpoints.insert(b.address.clone(), Arc::clone(&e));
                        e
                    }
                };
                slots.push(Slot {
                    endpoint,
                    weight: b.weight,
                    draining: b.draining,
                });
            }
            slots
        };
        let ids: Vec<&str> = snapshot
            .backends
            .iter()
            .map(|b| b.address.as_str())
            .collect();
        let weights: Vec<u32> = snapshot.backends.iter().map(|b| b.weight).collect();
        let balancer = Balancer::build(&snapshot.strategy, &ids, &weights);
        let timeouts = snapshot.timeouts.unwrap_or_default();
        let connect_timeout = Duration::from_millis(u64::from(timeouts.connect_ms));
        let request_timeout = (timeouts.request_ms > 0)
            .then(|| Duration::from_millis(u64::from(timeouts.request_ms)));
        Ok(Active {
            snapshot,
            slots,
            balancer,
            connect_timeout,
            request_timeout,
        })
    }

    /// The Prometheus text of every metric, per-backend counters included.
    pub fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        let backends: Vec<BackendSample> = self
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| BackendSample {
                address: e.address.clone(),
                requests: e.requests.load(Ordering::Relaxed),
                errors: e.errors.load(Ordering::Relaxed),
                in_flight: e.in_flight(),
            })
            .collect();
        Metrics::render_backends(&mut out, &backends);
        out
    }

    /// Puts a prepared configuration in force, in one atomic swap.
    pub fn apply(&self, active: Active) {
        let version = active.version();
        let keep: std::collections::HashSet<&str> = active
            .slots
            .iter()
            .map(|s| s.endpoint.address.as_str())
            .collect();
        {
            let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            endpoints.retain(|addr, e| {
                let k = keep.contains(addr.as_str());
                if !k {
                    self.metrics.forget_backend(addr);
                    e.idle.clear();
                }
                k
            });
        }
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.active.store(Some(Arc::new(active)));
        self.applied.send_replace(version);
    }
}
