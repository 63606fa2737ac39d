//! What a data plane runs on: the [`Active`] configuration, swapped atomically as a whole when a
//! snapshot is applied (each request loads it once, so no request sees half of two configs), and
//! the per-backend [`Endpoint`] counters, which outlive snapshots so that in-flight counts and
//! latency survive a strategy or weight change.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::Authority;
use ipnet::IpNet;
use lb_proto::v1::{
    CircuitBreakerPolicy, ConfigSnapshot, OutlierPolicy, QueuePolicy, RateLimitPolicy, RetryPolicy,
    StoreFailureMode, UnknownKeyPolicy, directive,
};
use lb_proto::validate::{self, Invalid};
use prometheus::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::settings::Settings;
use crate::policy::admission::Admission;
use crate::policy::balance::{Balancer, Candidates};
use crate::policy::breaker::{Breaker, CircuitState};
use crate::policy::outlier::Outlier;
use crate::ratelimit::Limiter;
use crate::ratelimit::gcra::{BanRule, Rate};
use crate::telemetry::metrics::{BackendSample, Metrics};
use crate::upstream::{IdleConns, Transport};

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
    /// When the latency average last took a sample, in [`millis`].
    latency_at_ms: AtomicU64,
    /// Recent failure share as an average of 0/1 outcomes, in millionths.
    failure_ppm: AtomicU32,
    /// When the backend last came back into rotation (health recovered), in [`millis`].
    recovered_at_ms: AtomicU64,
    m_duration: Histogram,
    /// Verdict of the active health checks (true until they say otherwise).
    healthy: AtomicBool,
    /// Outlier ejection end, in [`millis`] (0 or past: not ejected).
    ejected_until_ms: AtomicU64,
    /// Open circuit: no request before this, in [`millis`] (0 or past: may send).
    open_until_ms: AtomicU64,
    /// The breaker's state as last seen, for the lock-free fast path and for stats.
    circuit: AtomicU8,
    pub ejections: AtomicU64,
    /// The passive state machines, changed on each request outcome.
    passive: Mutex<Passive>,
}

struct Passive {
    outlier: Outlier,
    breaker: Breaker,
}

const CIRCUIT_CLOSED: u8 = 0;
const CIRCUIT_OPEN: u8 = 1;
const CIRCUIT_HALF_OPEN: u8 = 2;

fn circuit_code(s: CircuitState) -> u8 {
    match s {
        CircuitState::Closed => CIRCUIT_CLOSED,
        CircuitState::Open => CIRCUIT_OPEN,
        CircuitState::HalfOpen => CIRCUIT_HALF_OPEN,
    }
}

/// Milliseconds since a process-wide origin, for instants kept in atomics.
pub fn millis(t: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| Instant::now() - Duration::from_secs(1));
    u64::try_from(t.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// How long a client has to send its whole request body when `timeouts.client_body_ms` is
/// unset: as nginx's `client_body_timeout`, though here it bounds the whole body rather than
/// each read, so a client trickling a byte at a time cannot hold a backend connection longer.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Weight of the newest latency sample in the moving average.
const LATENCY_ALPHA: f64 = 0.3;

/// An unsampled latency average halves every this long: long enough to keep a slow backend
/// away for a while, short enough that it is re-measured within seconds once it is quiet.
pub const LATENCY_HALF_LIFE_MS: u64 = 2_000;

/// The failure share averages about this many recent outcomes.
const FAILURE_WINDOW: i64 = 20;

/// A backend back from failure gets its full share only after this long.
pub const SLOW_START_MS: u64 = 10_000;

impl Endpoint {
    fn new(
        address: &str,
        metrics: &Metrics,
        workers: usize,
        breaker: &CircuitBreakerPolicy,
        transport: Transport,
    ) -> Result<Endpoint, Invalid> {
        let authority = address
            .parse::<Authority>()
            .map_err(|e| Invalid::new("backend.address", format_args!("{address:?}: {e}")))?;
        Ok(Endpoint {
            address: address.to_owned(),
            authority,
            resolved: address.parse().ok(),
            idle: Arc::new(IdleConns::new(workers, transport)),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            latency_at_ms: AtomicU64::new(0),
            failure_ppm: AtomicU32::new(0),
            recovered_at_ms: AtomicU64::new(0),
            m_duration: metrics.backend_duration.with_label_values(&[address]),
            healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            open_until_ms: AtomicU64::new(0),
            circuit: AtomicU8::new(CIRCUIT_CLOSED),
            ejections: AtomicU64::new(0),
            passive: Mutex::new(Passive {
                outlier: Outlier::new(),
                breaker: Breaker::new(breaker),
            }),
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn latency_us(&self) -> u64 {
        self.latency_us.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if healthy && !was {
            self.recovered_at_ms
                .store(millis(Instant::now()), Ordering::Relaxed);
        }
    }

    /// Smoothed latency as of `now_ms`: halved for every [`LATENCY_HALF_LIFE_MS`] without a
    /// sample, so a backend that was slow once is tried again later instead of being starved.
    pub fn latency_us_at(&self, now_ms: u64) -> u64 {
        let age = now_ms.saturating_sub(self.latency_at_ms.load(Ordering::Relaxed));
        self.latency_us() >> (age / LATENCY_HALF_LIFE_MS).min(63)
    }

    /// Recent failure share, 0.0 to 1.0.
    pub fn failure_rate(&self) -> f64 {
        f64::from(self.failure_ppm.load(Ordering::Relaxed)) / 1e6
    }

    /// Slow start: 0.1 just after a backend came back (health recovered or ejection ended),
    /// rising linearly to 1.0 over [`SLOW_START_MS`].
    pub fn warmth(&self, now_ms: u64) -> f64 {
        let back = self
            .recovered_at_ms
            .load(Ordering::Relaxed)
            .max(self.ejected_until_ms.load(Ordering::Relaxed));
        if back == 0 || now_ms >= back + SLOW_START_MS {
            return 1.0;
        }
        (now_ms.saturating_sub(back) as f64 / SLOW_START_MS as f64).max(0.1)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// The circuit refuses requests until then (None: it may admit one now).
    pub fn circuit_open_until(&self, now_ms: u64) -> Option<u64> {
        let until = self.open_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    pub fn circuit_state(&self) -> CircuitState {
        match self.circuit.load(Ordering::Relaxed) {
            CIRCUIT_OPEN => CircuitState::Open,
            CIRCUIT_HALF_OPEN => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }

    fn passive(&self) -> std::sync::MutexGuard<'_, Passive> {
        self.passive.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_circuit(&self, p: &Passive, now: Instant) {
        let state = p.breaker.state(now);
        self.circuit.store(circuit_code(state), Ordering::Relaxed);
        let until = match (state, p.breaker.retry_at()) {
            (CircuitState::Open, Some(at)) => millis(at),
            _ => 0,
        };
        self.open_until_ms.store(until, Ordering::Relaxed);
    }

    /// Asks the circuit breaker for a request slot. Closed circuits answer without a lock.
    pub fn try_acquire(&self, now: Instant) -> bool {
        if self.circuit.load(Ordering::Relaxed) == CIRCUIT_CLOSED {
            return true;
        }
        let mut p = self.passive();
        let ok = p.breaker.try_acquire(now);
        self.sync_circuit(&p, now);
        ok
    }

    /// Feeds one outcome to the breaker and the outlier detector. `may_eject` is asked only
    /// when this failure would eject the backend (it checks the share already ejected).
    pub fn record_outcome(
        &self,
        failed: bool,
        now: Instant,
        outlier: &OutlierPolicy,
        may_eject: impl FnOnce() -> bool,
    ) {
        let mut p = self.passive();
        let was = self.circuit.load(Ordering::Relaxed);
        p.breaker.record(!failed, now);
        self.sync_circuit(&p, now);
        match self.circuit.load(Ordering::Relaxed) {
            CIRCUIT_OPEN if was != CIRCUIT_OPEN => {
                tracing::warn!(backend = %self.address, "circuit opened");
            }
            CIRCUIT_CLOSED if was != CIRCUIT_CLOSED => {
                tracing::info!(backend = %self.address, "circuit closed after its trial requests succeeded");
            }
            _ => {}
        }
        let would_eject = failed
            && outlier.consecutive_failures > 0
            && p.outlier.consecutive_failures() + 1 >= outlier.consecutive_failures;
        let allowed = would_eject && may_eject();
        if let Some(until) = p.outlier.record(failed, now, outlier, allowed) {
            self.ejected_until_ms
                .store(millis(until), Ordering::Relaxed);
            self.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                backend = %self.address,
                for_ms = until.saturating_duration_since(now).as_millis() as u64,
                times = p.outlier.times_ejected(),
                "backend ejected after consecutive failures"
            );
        }
    }

    fn set_breaker_policy(&self, policy: &CircuitBreakerPolicy) {
        self.passive().breaker.set_policy(policy);
    }

    /// Counts a request as started if the backend is below `limit` requests in flight (0 = no
    /// limit); the guard ends it when dropped (when the response body is done or abandoned), so
    /// in-flight counts cover streaming bodies too. A limited backend wakes one queued request
    /// when a slot frees up.
    pub fn try_start(self: &Arc<Self>, limit: u32, admission: &Arc<Admission>) -> Option<InFlight> {
        if limit == 0 {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        } else {
            // Compare-and-swap, so two workers cannot both take the last slot.
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .ok()?;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            endpoint: Arc::clone(self),
            admission: (limit > 0).then(|| Arc::clone(admission)),
        })
    }

    /// Counts a response whose head was good but whose body the backend cut short: an error in
    /// the statistics, and a failure in the recent failure rate the adaptive strategy scores.
    pub fn body_failed(&self) {
        self.count_outcome(true);
    }

    /// Moves the recent failure share one step towards this outcome; counts a failure as an
    /// error.
    fn count_outcome(&self, failed: bool) {
        let f = self.failure_ppm.load(Ordering::Relaxed);
        let target: i64 = if failed { 1_000_000 } else { 0 };
        let next = i64::from(f) + (target - i64::from(f)) / FAILURE_WINDOW;
        self.failure_ppm
            .store(next.clamp(0, 1_000_000) as u32, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the outcome of one request: `elapsed` to the response head, failed or not.
    pub fn record(&self, elapsed: Duration, failed: bool, now: Instant) {
        self.count_outcome(failed);
        self.latency_at_ms.store(millis(now), Ordering::Relaxed);
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
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    admission: Option<Arc<Admission>>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(a) = &self.admission {
            a.notify_one();
        }
    }
}

/// A backend as one snapshot configures it.
pub struct Slot {
    pub endpoint: Arc<Endpoint>,
    pub weight: u32,
    pub draining: bool,
    /// Most requests in flight from this data plane (0 = unlimited).
    pub max_in_flight: u32,
}

impl Slot {
    pub fn has_capacity(&self) -> bool {
        self.max_in_flight == 0 || self.endpoint.in_flight() < self.max_in_flight
    }
}

/// The configuration in force, derived from one validated snapshot.
pub struct Active {
    pub snapshot: ConfigSnapshot,
    /// Peers whose X-Forwarded-For and X-Priority are believed.
    pub trusted: Vec<IpNet>,
    pub outlier: OutlierPolicy,
    pub retry: RetryPolicy,
    pub queue: QueuePolicy,
    /// Priority of requests with no other indication: the default tier's.
    pub default_priority: u32,
    /// What ip_hash hashes.
    pub hash_source: HashSource,
    /// Rate limits, resolved for the request path.
    pub limits: Limits,
    pub slots: Vec<Slot>,
    pub balancer: Balancer,
    /// Connect, request and response-body timeouts towards backends.
    pub timeouts: crate::upstream::Timeouts,
    /// The longest a client may take to send its whole request body (`timeouts.client_body_ms`).
    pub client_body_timeout: Option<Duration>,
}

/// A tier as the request path needs it.
#[derive(Debug, Clone)]
pub struct TierLimit {
    pub name: String,
    pub rate: Rate,
    pub priority: u32,
}

/// The snapshot's rate-limit policy, resolved once per snapshot.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per client IP, for requests without an API key; None = off.
    pub ip: Option<Rate>,
    pub tiers: HashMap<String, TierLimit>,
    pub default_tier: String,
    /// Keys that differ from the default, by key hash: tier (empty = default) and block.
    pub overrides: HashMap<String, (String, bool)>,
    /// Keys the control plane does not list are refused (401) rather than given the default tier.
    pub reject_unknown: bool,
    pub ban: BanRule,
    pub on_store_failure: StoreFailureMode,
}

impl Limits {
    fn from_policy(rl: &RateLimitPolicy, keys: &[lb_proto::v1::KeyOverride]) -> Limits {
        let rate = |l: &Option<lb_proto::v1::Limit>| {
            l.filter(|l| l.requests > 0).map(|l| Rate {
                requests: l.requests,
                period_ms: l.period_ms,
            })
        };
        let b = rl.ban.unwrap_or_default();
        Limits {
            ip: rate(&rl.ip_limit),
            tiers: rl
                .tiers
                .iter()
                .filter_map(|t| {
                    rate(&t.limit).map(|r| {
                        (
                            t.name.clone(),
                            TierLimit {
                                name: t.name.clone(),
                                rate: r,
                                priority: t.priority,
                            },
                        )
                    })
                })
                .collect(),
            default_tier: rl.default_tier.clone(),
            overrides: keys
                .iter()
                .map(|k| (k.key_hash.clone(), (k.tier.clone(), k.blocked)))
                .collect(),
            reject_unknown: rl.unknown_key == UnknownKeyPolicy::Reject as i32,
            ban: BanRule {
                strikes: b.strikes,
                strike_window_ms: u64::from(b.strike_window_ms),
                base_ban_ms: b.base_ban_ms,
                multiplier: b.multiplier,
                max_ban_ms: b.max_ban_ms,
                strike_decay_ms: b.strike_decay_ms,
            },
            on_store_failure: StoreFailureMode::try_from(rl.on_store_failure)
                .unwrap_or(StoreFailureMode::Local),
        }
    }

    /// The tier of a key: its override, else the default tier.
    pub fn tier_of(&self, key_hash: &str) -> Option<&TierLimit> {
        let name = self
            .overrides
            .get(key_hash)
            .map(|(t, _)| t.as_str())
            .filter(|t| !t.is_empty())
            .unwrap_or(&self.default_tier);
        self.tiers.get(name)
    }
}

/// What ip_hash hashes: the client address, or a header or cookie (falling back to the
/// address when the request has none).
#[derive(Debug, Clone)]
pub enum HashSource {
    Ip,
    Header(http::header::HeaderName),
    Cookie(String),
}

/// The backends as one pick of one request sees them.
pub struct View<'a> {
    pub active: &'a Active,
    pub now_ms: u64,
    /// Backends this request already tried (a retry goes elsewhere).
    pub tried: &'a [usize],
    /// Panic mode: when health checks and ejections leave nothing, use those backends anyway
    /// (an open circuit or a full backend still counts).
    pub ignore_health: bool,
    /// The worker thread picking (its lane of the balancer's state).
    pub worker: usize,
}

impl Candidates for View<'_> {
    fn len(&self) -> usize {
        self.active.slots.len()
    }
    fn usable(&self, i: usize) -> bool {
        let s = &self.active.slots[i];
        let e = &s.endpoint;
        !s.draining
            && !self.tried.contains(&i)
            && s.has_capacity()
            && e.circuit_open_until(self.now_ms).is_none()
            && (self.ignore_health || (e.is_healthy() && !e.is_ejected(self.now_ms)))
    }
    fn in_flight(&self, i: usize) -> u32 {
        self.active.slots[i].endpoint.in_flight()
    }
    fn latency_us(&self, i: usize) -> u64 {
        self.active.slots[i].endpoint.latency_us_at(self.now_ms)
    }
    fn failure_rate(&self, i: usize) -> f64 {
        self.active.slots[i].endpoint.failure_rate()
    }
    fn warmth(&self, i: usize) -> f64 {
        self.active.slots[i].endpoint.warmth(self.now_ms)
    }
    fn lane(&self) -> usize {
        self.worker
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
    /// Requests waiting for a backend with free capacity.
    pub admission: Arc<Admission>,
    pub limiter: Limiter,
    /// Bumped by every apply, for lock-free checks on the request path.
    generation: AtomicU64,
    pub reporter: crate::report::Reporter,
    /// The response cache (its policy follows the snapshot).
    pub cache: crate::cache::Cache,
    /// Highest directive sequence number run (ban lifts), so each runs once.
    directives_seen: AtomicU64,
    applied: watch::Sender<u64>,
    /// Span export, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub tracer: Option<crate::telemetry::otel::Tracing>,
    /// The proxy listener's TLS, when configured; an error here stops `run` before it serves.
    tls: Option<Result<Arc<crate::tls::Tls>, crate::tls::TlsError>>,
    /// TLS to backends, when configured; an error here stops `run` likewise.
    backend_tls: Option<Result<crate::tls::client::BackendTls, crate::tls::TlsError>>,
    /// The `redis_ca` file could not be used; stops `run` likewise.
    redis_ca_error: Option<crate::tls::TlsError>,
}

impl Shared {
    pub fn new(settings: Settings) -> Shared {
        let mut redis_ca_error = None;
        let redis = settings.redis.clone().map(|url| {
            let root_ca = settings.redis_ca.as_ref().and_then(|path| {
                crate::tls::client::read_roots("redis_ca", path)
                    .map(|roots| Arc::from(roots.pem))
                    .inspect_err(|e| tracing::error!(cause = %e, "Redis CA file not usable"))
                    .map_err(|e| redis_ca_error = Some(e))
                    .ok()
            });
            crate::ratelimit::RedisTarget { url, root_ca }
        });
        let limiter = Limiter::new(redis);
        let backend_tls = settings.backend_tls.as_ref().map(|b| {
            crate::tls::client::BackendTls::load(b)
                .inspect_err(|e| tracing::error!(cause = %e, "backend TLS not usable"))
        });
        let tracer = settings.tracing.as_ref().and_then(|t| {
            crate::telemetry::otel::Tracing::start(t, "data-plane", &settings.node_id)
                .inspect_err(|e| tracing::error!(cause = %e, "traces are not exported"))
                .ok()
        });
        let metrics = Metrics::new();
        let tls = settings.tls.clone().map(|files| {
            crate::tls::Tls::load(files, metrics.tls().clone())
                .map(Arc::new)
                .inspect_err(|e| tracing::error!(cause = %e, "TLS certificate not usable"))
        });
        Shared {
            settings,
            active: ArcSwapOption::empty(),
            endpoints: Mutex::new(HashMap::new()),
            metrics,
            control_plane_connected: AtomicBool::new(false),
            last_rejected: Mutex::new(None),
            admission: Arc::new(Admission::new(0)),
            limiter,
            generation: AtomicU64::new(0),
            reporter: crate::report::Reporter::default(),
            cache: crate::cache::Cache::new(crate::cache::Policy::from(
                &lb_proto::defaults::cache(),
            )),
            directives_seen: AtomicU64::new(u64::MAX),
            applied: watch::channel(0).0,
            tracer,
            tls,
            backend_tls,
            redis_ca_error,
        }
    }

    /// The proxy listener's TLS, when configured and loaded.
    pub fn tls(&self) -> Option<&Arc<crate::tls::Tls>> {
        self.tls.as_ref().and_then(|t| t.as_ref().ok())
    }

    /// The reason TLS (the listener's, to backends or to Redis) is configured but cannot be
    /// used, if so.
    pub fn tls_error(&self) -> Option<&crate::tls::TlsError> {
        self.tls
            .as_ref()
            .and_then(|t| t.as_ref().err())
            .or_else(|| self.backend_tls.as_ref().and_then(|t| t.as_ref().err()))
            .or(self.redis_ca_error.as_ref())
    }

    /// How connections to the backend at `address` are opened.
    fn transport(&self, address: &str) -> Result<Transport, Invalid> {
        match &self.backend_tls {
            None => Ok(Transport::Plain),
            Some(Ok(tls)) => tls
                .for_backend(address)
                .map(|(connector, name)| Transport::Tls { connector, name })
                .map_err(|e| Invalid::new("backend.address", e)),
            Some(Err(e)) => Err(Invalid::new("backend_tls", e)),
        }
    }

    /// The configuration in force, if any yet.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active.load_full()
    }

    /// Changes with every applied configuration (even one with the same version number),
    /// read without a lock.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
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
                let breaker = snapshot.circuit_breaker.unwrap_or_default();
                let endpoint = match endpoints.get(&b.address) {
                    Some(e) => {
                        e.set_breaker_policy(&breaker);
                        Arc::clone(e)
                    }
                    None => {
                        let e = Arc::new(Endpoint::new(
                            &b.address,
                            &self.metrics,
                            self.settings.workers,
                            &breaker,
                            self.transport(&b.address)?,
                        )?);
                        endpoints.insert(b.address.clone(), Arc::clone(&e));
                        e
                    }
                };
                let queue = snapshot.queue.unwrap_or_default();
                slots.push(Slot {
                    endpoint,
                    weight: b.weight,
                    draining: b.draining,
                    max_in_flight: if b.max_in_flight > 0 {
                        b.max_in_flight
                    } else {
                        queue.max_in_flight_per_backend
                    },
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
        let body_idle_timeout = match timeouts.body_idle_ms {
            None => request_timeout,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        };
        let client_body_timeout = match timeouts.client_body_ms {
            None => Some(DEFAULT_CLIENT_BODY_TIMEOUT),
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        };
        let rl = snapshot.rate_limit.clone().unwrap_or_default();
        let trusted = rl
            .trusted_proxies
            .iter()
            .filter_map(|c| {
                c.parse::<IpNet>()
                    .ok()
                    .or_else(|| c.parse::<IpAddr>().ok().map(IpNet::from))
            })
            .collect();
        let default_priority = rl
            .tiers
            .iter()
            .find(|t| t.name == rl.default_tier)
            .map_or(0, |t| t.priority);
        let hash = snapshot.hash.clone().unwrap_or_default();
        let hash_source = match hash.source.as_str() {
            "header" => http::header::HeaderName::from_bytes(hash.name.as_bytes())
                .map(HashSource::Header)
                .map_err(|_| {
                    Invalid::new(
                        "hash.name",
                        format_args!("{:?} is not a header name", hash.name),
                    )
                })?,
            "cookie" => HashSource::Cookie(hash.name.clone()),
            _ => HashSource::Ip,
        };
        let limits = Limits::from_policy(&rl, &snapshot.keys);
        Ok(Active {
            limits,
            hash_source,
            trusted,
            outlier: snapshot.outlier.unwrap_or_default(),
            retry: snapshot.retry.unwrap_or_default(),
            queue: snapshot.queue.unwrap_or_default(),
            default_priority,
            snapshot,
            slots,
            balancer,
            timeouts: crate::upstream::Timeouts {
                connect: connect_timeout,
                request: request_timeout,
                body_idle: body_idle_timeout,
            },
            client_body_timeout,
        })
    }

    /// The Prometheus text of every metric, per-backend counters included.
    pub fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        let now_ms = millis(Instant::now());
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
                healthy: e.is_healthy(),
                ejected: e.is_ejected(now_ms),
                circuit: match e.circuit_state() {
                    CircuitState::Closed => 0,
                    CircuitState::Open => 1,
                    CircuitState::HalfOpen => 2,
                },
            })
            .collect();
        Metrics::render_backends(&mut out, &backends);
        out.push_str(&format!(
            "# HELP lb_queue_depth Requests waiting in the priority queue for a backend with room\n\
             # TYPE lb_queue_depth gauge\n\
             lb_queue_depth {}\n",
            self.admission.depth()
        ));
        let c = self.cache.stats();
        out.push_str(&format!(
            "# HELP lb_cache_lookups_total Cache lookups by result and, for hits, the tier that answered\n\
             # TYPE lb_cache_lookups_total counter\n\
             lb_cache_lookups_total{{result=\"hit\",tier=\"memory\"}} {}\n\
             lb_cache_lookups_total{{result=\"hit\",tier=\"shared\"}} {}\n\
             lb_cache_lookups_total{{result=\"hit\",tier=\"coalesced\"}} {}\n\
             lb_cache_lookups_total{{result=\"stale\",tier=\"any\"}} {}\n\
             lb_cache_lookups_total{{result=\"miss\",tier=\"none\"}} {}\n\
             lb_cache_lookups_total{{result=\"bypass\",tier=\"none\"}} {}\n\
             # HELP lb_cache_memory_bytes Bytes held by the in-process cache tier\n\
             # TYPE lb_cache_memory_bytes gauge\nlb_cache_memory_bytes {}\n\
             # HELP lb_cache_evictions_total Entries evicted from the in-process tier to stay within its bound\n\
             # TYPE lb_cache_evictions_total counter\nlb_cache_evictions_total {}\n\
             # HELP lb_cache_store_degraded 1 while Redis is configured but unreachable and only the in-process tier serves\n\
             # TYPE lb_cache_store_degraded gauge\nlb_cache_store_degraded {}\n",
            c.hits_memory,
            c.hits_shared,
            c.hits_coalesced,
            c.hits_stale,
            c.leads + c.passes,
            c.bypasses,
            c.memory.bytes,
            c.memory.evictions,
            u8::from(c.degraded),
        ));
        out.push_str(&format!(
            "# HELP lb_ratelimit_store_degraded 1 while Redis is configured but unreachable and limits are enforced per data plane\n\
             # TYPE lb_ratelimit_store_degraded gauge\nlb_ratelimit_store_degraded {}\n",
            u8::from(self.limiter.is_degraded())
        ));
        out
    }

    /// Runs the snapshot's directives not run yet. The first snapshot only sets the mark: its
    /// directives predate this process, whose in-process state they cannot concern.
    fn run_directives(&self, snapshot: &ConfigSnapshot) {
        let newest = snapshot.directives.iter().map(|d| d.seq).max().unwrap_or(0);
        let seen = self.directives_seen.swap(newest, Ordering::Relaxed);
        if seen == u64::MAX {
            return;
        }
        for d in snapshot.directives.iter().filter(|d| d.seq > seen) {
            match &d.kind {
                Some(directive::Kind::LiftBan(l)) => {
                    self.limiter.lift_local_ban(&l.client);
                    tracing::info!(client = %l.client, "ban lifted");
                }
                Some(directive::Kind::Purge(p)) => {
                    if let Some(purge) = crate::cache::Purge::from_proto(p) {
                        let cache = self.cache.clone();
                        let redis = self.limiter.redis().cloned();
                        tracing::info!(?purge, "cache purge");
                        // Every data plane purges its memory tier, and Redis too (the same
                        // keys many times over is harmless; one data plane missing is not).
                        tokio::spawn(async move {
                            let conn = match &redis {
                                Some(target) => crate::ratelimit::connect(target).await,
                                None => None,
                            };
                            if let Err(e) = cache.purge(conn.as_ref(), &purge).await {
                                tracing::warn!(cause = %e, "cache purge in redis failed");
                            }
                        });
                    }
                }
                None => {}
            }
        }
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
        self.admission.set_capacity(active.queue.capacity as usize);
        self.cache.set_policy(crate::cache::Policy::from(
            &active.snapshot.cache.clone().unwrap_or_default(),
        ));
        self.run_directives(&active.snapshot);
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.active.store(Some(Arc::new(active)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.applied.send_replace(version);
    }
}
