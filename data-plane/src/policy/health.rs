//! Active health checking, the policy half: the state of one backend as probes come back, and
//! when to probe next. The prober (which sends the GET and times it out) lives with the I/O and
//! feeds results in here.
//!
//! A backend starts healthy. Holding new backends back until a first probe passes would delay
//! every scale-out and every data-plane restart by up to one interval, while a backend that is in
//! fact down is caught within a few requests by passive outlier detection ([`crate::policy::outlier`]).
//! The price is a few failed requests when a dead backend is added, which retries absorb.
//!
//! The state flips only after a run of identical results (hysteresis), so one lost probe does
//! not take a backend out and one lucky probe does not bring a broken one back.

use std::time::Duration;

use lb_proto::v1::HealthCheckPolicy;

/// The validator's lower bound for `interval_ms`. A policy that skipped validation (a `Default`
/// one has an interval of 0) must not make the prober spin.
const MIN_INTERVAL_MS: u64 = 1_000;

/// Health of one backend as seen by active probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    healthy: bool,
    /// Consecutive results that disagree with the current state. Results that agree reset it,
    /// so only an unbroken run flips the state.
    streak: u32,
}

impl HealthState {
    pub fn new() -> Self {
        HealthState {
            healthy: true,
            streak: 0,
        }
    }

    #[cfg(test)]
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// One probe result; returns `Some(new_state)` when the state flips. A healthy backend
    /// turns unhealthy after `unhealthy_threshold` consecutive failures; an unhealthy one turns
    /// healthy after `healthy_threshold` consecutive successes. A threshold of 0 (never valid)
    /// acts as 1.
    pub fn observe(&mut self, ok: bool, policy: &HealthCheckPolicy) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let threshold = if self.healthy {
            policy.unhealthy_threshold
        } else {
            policy.healthy_threshold
        };
        if self.streak < threshold.max(1) {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(ok)
    }
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

fn interval_ms(policy: &HealthCheckPolicy) -> u64 {
    u64::from(policy.interval_ms).max(MIN_INTERVAL_MS)
}

fn unit_clamped(unit: f64) -> f64 {
    // NaN would otherwise poison the duration arithmetic (mul_f64 panics on it).
    if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    }
}

/// Delay before the next probe: the interval plus up to `jitter_percent` of it, `unit` being a
/// uniform random number in [0, 1). The jitter only ever lengthens the interval, so a backend is
/// never probed more often than configured.
pub fn next_probe_delay(policy: &HealthCheckPolicy, unit: f64) -> Duration {
    let interval = Duration::from_millis(interval_ms(policy));
    let jitter = interval.mul_f64(f64::from(policy.jitter_percent) / 100.0 * unit_clamped(unit));
    interval + jitter
}

/// Delay before the first probe of a backend, uniform over one interval: when N data planes
/// start together (or N backends arrive in one snapshot), their probes start spread out instead
/// of hitting the backends in lockstep.
pub fn first_probe_delay(policy: &HealthCheckPolicy, unit: f64) -> Duration {
    Duration::from_millis(interval_ms(policy)).mul_f64(unit_clamped(unit))
}

/// Whether a probe's status counts as healthy: 2xx, and 3xx too, since a backend that redirects
/// its health path is up and answering. An answer that cannot be parsed, or none within the
/// timeout, is the caller's to count as a failure.
pub fn is_healthy_status(status: u16) -> bool {
    (200..=399).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(healthy: u32, unhealthy: u32) -> HealthCheckPolicy {
        HealthCheckPolicy {
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            ..lb_proto::defaults::health_check()
        }
    }

    fn run(state: &mut HealthState, results: &[bool], p: &HealthCheckPolicy) -> Vec<Option<bool>> {
        results.iter().map(|&ok| state.observe(ok, p)).collect()
    }

    #[test]
    fn starts_healthy() {
        assert!(HealthState::new().is_healthy());
        assert!(HealthState::default().is_healthy());
    }

    #[test]
    fn flips_only_after_unbroken_runs() {
        let p = policy(2, 3);
        let mut s = HealthState::new();
        // Two failures, a success breaks the run, then three failures flip it.
        let got = run(&mut s, &[false, false, true, false, false, false], &p);
        assert_eq!(got, [None, None, None, None, None, Some(false)]);
        assert!(!s.is_healthy());
        // Further failures change nothing; one success, a failure, then two successes flip back.
        let got = run(&mut s, &[false, true, false, true, true, true], &p);
        assert_eq!(got, [None, None, None, None, Some(true), None]);
        assert!(s.is_healthy());
    }

    #[test]
    fn threshold_of_one_flips_at_once() {
        let p = policy(1, 1);
        let mut s = HealthState::new();
        let got = run(&mut s, &[false, true, false, false, true], &p);
        assert_eq!(
            got,
            [Some(false), Some(true), Some(false), None, Some(true)]
        );
    }

    #[test]
    fn zero_threshold_acts_as_one() {
        let p = policy(0, 0);
        let mut s = HealthState::new();
        assert_eq!(s.observe(false, &p), Some(false));
        assert_eq!(s.observe(true, &p), Some(true));
    }

    #[test]
    fn delays() {
        let p = HealthCheckPolicy {
            interval_ms: 10_000,
            jitter_percent: 10,
            ..lb_proto::defaults::health_check()
        };
        assert_eq!(next_probe_delay(&p, 0.0), Duration::from_secs(10));
        assert_eq!(next_probe_delay(&p, 0.5), Duration::from_millis(10_500));
        assert_eq!(first_probe_delay(&p, 0.0), Duration::ZERO);
        assert_eq!(first_probe_delay(&p, 0.25), Duration::from_millis(2_500));
        assert_eq!(next_probe_delay(&p, f64::NAN), Duration::from_secs(10));
    }

    #[test]
    fn unvalidated_interval_does_not_spin() {
        let p = HealthCheckPolicy::default();
        assert_eq!(next_probe_delay(&p, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn statuses() {
        let healthy: Vec<u16> = [100, 199, 200, 204, 301, 399, 400, 404, 500, 503]
            .into_iter()
            .filter(|&s| is_healthy_status(s))
            .collect();
        assert_eq!(healthy, [200, 204, 301, 399]);
    }

    proptest! {
        #[test]
        fn delays_stay_in_range(interval in 1_000u32..=3_600_000, jitter in 0u32..=50, unit in 0.0f64..1.0) {
            let p = HealthCheckPolicy { interval_ms: interval, jitter_percent: jitter, ..Default::default() };
            let i = Duration::from_millis(u64::from(interval));
            let next = next_probe_delay(&p, unit);
            prop_assert!(next >= i);
            prop_assert!(next <= i + i * jitter / 100);
            prop_assert!(first_probe_delay(&p, unit) <= i);
        }

        #[test]
        fn a_flip_needs_a_full_run(results in proptest::collection::vec(any::<bool>(), 0..200),
                                   healthy in 1u32..5, unhealthy in 1u32..5) {
            let p = policy(healthy, unhealthy);
            let mut s = HealthState::new();
            for (i, &ok) in results.iter().enumerate() {
                if let Some(now) = s.observe(ok, &p) {
                    let need = if now { healthy } else { unhealthy } as usize;
                    prop_assert!(i + 1 >= need);
                    prop_assert!(results[i + 1 - need..=i].iter().all(|&r| r == now));
                }
            }
        }
    }
}
