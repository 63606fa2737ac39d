//! Backends as the data plane tracks them: one [`Endpoint`] per backend address, shared by every
//! snapshot that lists it, so in-flight counts, latency and breaker state survive a strategy or
//! weight change. The request path updates it with plain atomics; the breaker and outlier state
//! machines ([`crate::policy`]) sit behind one small lock, taken only on an outcome.
//!
//! - [`ewma`]: the latency average and its decay (pure, clock passed in).
//! - [`slow_start`]: the share a backend back from failure gets (pure, clock passed in).
//! - [`probe`]: the active health checks, a task per backend.

pub mod ewma;
pub mod probe;
pub mod slow_start;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::Authority;
use lb_proto::v1::{CircuitBreakerPolicy, OutlierPolicy};
use lb_proto::validate::Invalid;
use prometheus::Histogram;
use tokio::time::Instant;

use crate::clock::millis;
use crate::policy::admission::Admission;
use crate::policy::breaker::{Breaker, CircuitState};
use crate::policy::outlier::Outlier;
use crate::telemetry::metrics::Metrics;
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

impl Endpoint {
    /// The authority of a backend address (`[scheme://]host:port`), as the `Host` of requests
    /// that name none.
    pub fn authority(address: &str) -> Result<Authority, Invalid> {
        lb_proto::validate::backend_target(address)
            .1
            .parse::<Authority>()
            .map_err(|e| Invalid::new("backend.address", format_args!("{address:?}: {e}")))
    }

    pub(crate) fn new(
        address: &str,
        authority: Authority,
        metrics: &Metrics,
        workers: usize,
        breaker: &CircuitBreakerPolicy,
        transport: Transport,
    ) -> Endpoint {
        let (protocol, target) = lb_proto::validate::backend_target(address);
        Endpoint {
            address: address.to_owned(),
            authority,
            resolved: target.parse().ok(),
            idle: Arc::new(IdleConns::new(workers, transport, protocol)),
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
        }
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

    /// Smoothed latency as of `now_ms` ([`ewma::decayed`]).
    pub fn latency_us_at(&self, now_ms: u64) -> u64 {
        ewma::decayed(
            self.latency_us(),
            self.latency_at_ms.load(Ordering::Relaxed),
            now_ms,
        )
    }

    /// Recent failure share, 0.0 to 1.0.
    pub fn failure_rate(&self) -> f64 {
        f64::from(self.failure_ppm.load(Ordering::Relaxed)) / f64::from(ewma::PPM)
    }

    /// Slow start ([`slow_start::warmth`]) since the backend came back: health recovered or
    /// ejection ended.
    pub fn warmth(&self, now_ms: u64) -> f64 {
        let back = self
            .recovered_at_ms
            .load(Ordering::Relaxed)
            .max(self.ejected_until_ms.load(Ordering::Relaxed));
        slow_start::warmth(back, now_ms)
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

    /// The circuit breaker's policy in force.
    pub fn breaker_policy(&self) -> CircuitBreakerPolicy {
        *self.passive().breaker.policy()
    }

    pub(crate) fn set_breaker_policy(&self, policy: &CircuitBreakerPolicy) {
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
        // A lost race only drops one outcome from the average.
        self.failure_ppm
            .store(ewma::failure_step(f, failed), Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a request that failed at `done` after `elapsed` (started at `started`): its
    /// latency and failure share, and the breaker and the outlier detector.
    pub fn record_failure(
        &self,
        elapsed: Duration,
        started: Instant,
        done: Instant,
        outlier: &OutlierPolicy,
        may_eject: impl FnOnce() -> bool,
    ) {
        self.record(elapsed, true, started);
        self.record_outcome(true, done, outlier, may_eject);
    }

    /// Records a try that timed out at `done`: a failure for the failure share, the breaker and
    /// the outlier detector, but no latency sample (the time waited is the timeout's, not the
    /// backend's: fed to the average, it would stretch the next derived per-try timeout).
    pub fn record_timeout(
        &self,
        done: Instant,
        outlier: &OutlierPolicy,
        may_eject: impl FnOnce() -> bool,
    ) {
        self.count_outcome(true);
        self.record_outcome(true, done, outlier, may_eject);
    }

    /// Records the outcome of one request: `elapsed` to the response head, failed or not.
    pub fn record(&self, elapsed: Duration, failed: bool, now: Instant) {
        self.count_outcome(failed);
        self.latency_at_ms.store(millis(now), Ordering::Relaxed);
        self.m_duration.observe(elapsed.as_secs_f64());
        let sample = elapsed.as_micros().min(u128::from(u64::MAX / 2)) as u64;
        let old = self.latency_us.load(Ordering::Relaxed);
        // A lost race only drops one sample from the average.
        self.latency_us
            .store(ewma::update(old, sample), Ordering::Relaxed);
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
