//! A circuit breaker per backend: closed → open when the failure rate over a sliding window
//! reaches `failure_rate_percent` (with at least `min_requests` in the window) → half-open after
//! `open_ms`, admitting `half_open_trials` trial requests → closed if every trial succeeds, open
//! again on any failure.
//!
//! Where outlier detection ([`crate::policy::outlier`]) reacts to runs of failures, the breaker reacts
//! to a rate, so it also catches a backend that fails one request in two. `min_requests` keeps
//! it from opening on two failures out of three at low traffic.
//!
//! The window is a ring of [`BUCKETS`] time buckets: recording is constant time and memory is
//! fixed whatever the traffic, at the cost of a window whose edge moves in steps of one bucket
//! (it covers between 9 and 10 buckets' worth of time), which does not matter for a rate.
//!
//! Outcomes are not tied to the request that `try_acquire` admitted: a request admitted while
//! closed that completes during half-open counts as a trial. It did just complete against the
//! backend, so it is evidence about its present health all the same.

use std::time::Duration;

use lb_proto::v1::CircuitBreakerPolicy;
use tokio::time::Instant;

/// Buckets in the sliding window. Ten keeps the window's stepping at a tenth of its length while
/// a rate check sums only ten counters.
pub const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// When the last trial slot was handed out, to recover from trials never reported.
        since: Instant,
        admitted: u32,
        succeeded: u32,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    /// Which bucket-length slice of time since the window's origin this bucket counts.
    index: u64,
    total: u32,
    failures: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    /// Set by the first outcome: the breaker never reads the clock itself.
    origin: Option<Instant>,
    bucket_ms: u64,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn new(window_ms: u32) -> Self {
        Window {
            origin: None,
            bucket_ms: (u64::from(window_ms) / BUCKETS as u64).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// Adds one outcome and returns (total, failures) over the window.
    fn add(&mut self, failure: bool, now: Instant) -> (u64, u64) {
        let origin = *self.origin.get_or_insert(now);
        let elapsed = now.saturating_duration_since(origin).as_millis();
        let index = u64::try_from(elapsed).unwrap_or(u64::MAX) / self.bucket_ms;
        let bucket = &mut self.buckets[(index % BUCKETS as u64) as usize];
        // A bucket from a later index means an outcome reported with a slightly older `now`
        // than one already counted; it is counted as current rather than wiping newer counts.
        if bucket.index < index {
            *bucket = Bucket {
                index,
                total: 0,
                failures: 0,
            };
        }
        bucket.total = bucket.total.saturating_add(1);
        bucket.failures = bucket.failures.saturating_add(u32::from(failure));
        let newest = index.max(bucket.index);
        self.buckets
            .iter()
            .filter(|b| b.index + BUCKETS as u64 > newest)
            .fold((0, 0), |(t, f), b| {
                (t + u64::from(b.total), f + u64::from(b.failures))
            })
    }
}

/// The circuit breaker of one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breaker {
    policy: CircuitBreakerPolicy,
    window: Window,
    phase: Phase,
}

impl Breaker {
    pub fn new(policy: &CircuitBreakerPolicy) -> Self {
        Breaker {
            policy: *policy,
            window: Window::new(policy.window_ms),
            phase: Phase::Closed,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &CircuitBreakerPolicy {
        &self.policy
    }

    fn off(&self) -> bool {
        self.policy.failure_rate_percent == 0
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(u64::from(self.policy.open_ms))
    }

    /// Replaces the policy (a new snapshot), keeping the state. A new window length starts an
    /// empty window, since counts in buckets of the old length cannot be split into the new
    /// ones; at worst that delays opening by one window. Turning breaking off closes the
    /// circuit, so turning it on again later does not resurrect a stale open state.
    pub fn set_policy(&mut self, policy: &CircuitBreakerPolicy) {
        if policy.window_ms != self.policy.window_ms {
            self.window = Window::new(policy.window_ms);
        }
        if policy.failure_rate_percent == 0 {
            self.phase = Phase::Closed;
        }
        self.policy = *policy;
    }

    /// May a request be sent now? Closed: yes. Open: no until `open_ms` has passed, then the
    /// circuit turns half-open. Half-open: yes while trial slots remain, each yes taking one.
    ///
    /// If every slot was handed out and no outcome arrived for `open_ms` (the trials were
    /// cancelled and never reported), a new round of trials starts: otherwise the backend
    /// would never be tried again.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        if self.off() {
            return true;
        }
        if let Phase::Open { until } = self.phase {
            if now < until {
                return false;
            }
            self.phase = Phase::HalfOpen {
                since: now,
                admitted: 0,
                succeeded: 0,
            };
        }
        let trials = self.policy.half_open_trials.max(1);
        let open_for = self.open_for();
        match &mut self.phase {
            Phase::Closed => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen {
                since,
                admitted,
                succeeded,
            } => {
                if *admitted >= trials && now >= *since + open_for {
                    *admitted = 0;
                    *succeeded = 0;
                }
                if *admitted < trials {
                    *admitted += 1;
                    *since = now;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Outcome of a request that was allowed.
    pub fn record(&mut self, success: bool, now: Instant) {
        if self.off() {
            return;
        }
        let open_for = self.open_for();
        let trials = self.policy.half_open_trials.max(1);
        match &mut self.phase {
            Phase::Closed => {
                let (total, failures) = self.window.add(!success, now);
                let min = u64::from(self.policy.min_requests.max(1));
                let rate = u64::from(self.policy.failure_rate_percent);
                if total >= min && failures * 100 >= total * rate {
                    self.phase = Phase::Open {
                        until: now + open_for,
                    };
                }
            }
            // A straggler sent before the circuit opened; the circuit already acted.
            Phase::Open { .. } => {}
            Phase::HalfOpen { succeeded, .. } => {
                if !success {
                    self.phase = Phase::Open {
                        until: now + open_for,
                    };
                } else {
                    *succeeded += 1;
                    if *succeeded >= trials {
                        self.phase = Phase::Closed;
                        // The failures that opened it are history: start counting afresh.
                        self.window = Window::new(self.policy.window_ms);
                    }
                }
            }
        }
    }

    /// The state as of `now`: an open circuit whose time has passed reports half-open.
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.phase {
            _ if self.off() => CircuitState::Closed,
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } if now < until => CircuitState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// When an open circuit will admit a trial (for Retry-After); `None` unless open.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open { until } if !self.off() => Some(until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> CircuitBreakerPolicy {
        CircuitBreakerPolicy {
            failure_rate_percent: 50,
            window_ms: 10_000,
            min_requests: 4,
            open_ms: 5_000,
            half_open_trials: 2,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends one request through the breaker if allowed, returning whether it was allowed.
    fn send(b: &mut Breaker, success: bool, now: Instant) -> bool {
        let allowed = b.try_acquire(now);
        if allowed {
            b.record(success, now);
        }
        allowed
    }

    #[test]
    fn opens_at_the_rate_once_enough_requests() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        // Three failures are below min_requests: still closed.
        for _ in 0..3 {
            assert!(send(&mut b, false, t0));
        }
        assert_eq!(b.state(t0), CircuitState::Closed);
        // The fourth request makes 4 with 3 failures (75 % ≥ 50 %): open.
        assert!(send(&mut b, true, t0 + ms(1)));
        assert_eq!(b.state(t0 + ms(1)), CircuitState::Open);
        assert_eq!(b.retry_at(), Some(t0 + ms(5_001)));
        assert!(!b.try_acquire(t0 + ms(5_000)));
    }

    #[test]
    fn stays_closed_below_the_rate() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        // 1 failure in 4: the rate peaks at 2 in 5 (40 %), never 50 %.
        for i in 0..30 {
            assert!(send(&mut b, i % 4 != 0, t0 + ms(i * 10)));
        }
        assert_eq!(b.state(t0 + ms(300)), CircuitState::Closed);
        assert_eq!(b.retry_at(), None);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        for _ in 0..3 {
            send(&mut b, false, t0);
        }
        // Ten seconds later those three are out of the window: four successes keep it closed,
        // where with them counted it would be 3 of 7 failures (43 %) and the fifth would open it.
        let later = t0 + ms(10_000);
        for _ in 0..4 {
            assert!(send(&mut b, true, later));
        }
        assert!(send(&mut b, false, later));
        assert_eq!(b.state(later), CircuitState::Closed);
    }

    #[test]
    fn half_open_closes_after_all_trials_succeed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        for _ in 0..4 {
            send(&mut b, false, t0);
        }
        let t1 = t0 + ms(5_000);
        assert_eq!(b.state(t1), CircuitState::HalfOpen);
        let admitted: Vec<bool> = (0..4).map(|_| b.try_acquire(t1)).collect();
        assert_eq!(admitted, [true, true, false, false]);
        b.record(true, t1);
        assert_eq!(b.state(t1), CircuitState::HalfOpen);
        b.record(true, t1);
        assert_eq!(b.state(t1), CircuitState::Closed);
        // A fresh window: three failures are not enough to reopen.
        for _ in 0..3 {
            assert!(send(&mut b, false, t1));
        }
        assert_eq!(b.state(t1), CircuitState::Closed);
    }

    #[test]
    fn a_failed_trial_reopens_for_open_ms() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        for _ in 0..4 {
            send(&mut b, false, t0);
        }
        let t1 = t0 + ms(6_000);
        assert!(b.try_acquire(t1));
        assert!(b.try_acquire(t1));
        b.record(true, t1);
        b.record(false, t1 + ms(10));
        assert_eq!(b.state(t1 + ms(10)), CircuitState::Open);
        assert_eq!(b.retry_at(), Some(t1 + ms(5_010)));
        assert!(!b.try_acquire(t1 + ms(5_009)));
        assert!(b.try_acquire(t1 + ms(5_010)));
    }

    #[test]
    fn unreported_trials_do_not_wedge_half_open() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        for _ in 0..4 {
            send(&mut b, false, t0);
        }
        let t1 = t0 + ms(5_000);
        assert!(b.try_acquire(t1));
        assert!(b.try_acquire(t1));
        assert!(!b.try_acquire(t1 + ms(4_999)));
        assert!(b.try_acquire(t1 + ms(5_000)));
    }

    #[test]
    fn off_means_always_closed() {
        let t0 = Instant::now();
        let p = CircuitBreakerPolicy {
            failure_rate_percent: 0,
            ..policy()
        };
        let mut b = Breaker::new(&p);
        for _ in 0..100 {
            assert!(send(&mut b, false, t0));
        }
        assert_eq!(b.state(t0), CircuitState::Closed);
        assert_eq!(b.retry_at(), None);
    }

    #[test]
    fn set_policy_keeps_state_and_turning_off_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&policy());
        for _ in 0..4 {
            send(&mut b, false, t0);
        }
        b.set_policy(&CircuitBreakerPolicy {
            window_ms: 20_000,
            ..policy()
        });
        assert_eq!(b.state(t0), CircuitState::Open);
        b.set_policy(&CircuitBreakerPolicy {
            failure_rate_percent: 0,
            ..policy()
        });
        assert!(b.try_acquire(t0));
        b.set_policy(&policy());
        assert_eq!(b.state(t0), CircuitState::Closed);
    }

    proptest! {
        #[test]
        fn opens_only_at_the_configured_rate(outcomes in proptest::collection::vec((any::<bool>(), 0u64..3_000), 1..400),
                                              rate in 1u32..=100, min in 1u32..20) {
            let p = CircuitBreakerPolicy { failure_rate_percent: rate, min_requests: min, ..policy() };
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = Breaker::new(&p);
            // The reference: every outcome recorded while closed, with its time.
            let mut seen: Vec<(Instant, bool)> = Vec::new();
            for (success, step) in outcomes {
                now += Duration::from_millis(step);
                let was = b.state(now);
                if !b.try_acquire(now) {
                    prop_assert_ne!(was, CircuitState::Closed);
                    continue;
                }
                b.record(success, now);
                if was == CircuitState::Closed {
                    seen.push((now, success));
                    // The rate over the window's last ten 1 s buckets, counted from the window's
                    // first outcome, decides: open exactly when it meets the policy.
                    let origin = seen[0].0;
                    let bucket = |t: Instant| (t - origin).as_millis() / 1_000;
                    let recent: Vec<bool> = seen.iter()
                        .filter(|(t, _)| bucket(*t) + 10 > bucket(now))
                        .map(|&(_, s)| s).collect();
                    let failures = recent.iter().filter(|s| !**s).count() as u64;
                    let trips = recent.len() as u64 >= u64::from(min)
                        && failures * 100 >= recent.len() as u64 * u64::from(rate);
                    prop_assert_eq!(b.state(now) == CircuitState::Open, trips);
                    if trips {
                        seen.clear();
                    }
                } else if b.state(now) == CircuitState::Closed {
                    seen.clear();
                }
            }
        }
    }
}
