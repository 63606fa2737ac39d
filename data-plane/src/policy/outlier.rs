//! Passive outlier detection, as Envoy's consecutive-5xx detector: real requests are the probes.
//! A backend that fails `consecutive_failures` requests in a row is ejected for a while; each
//! further ejection lasts longer (base × count, capped), so a backend that keeps failing spends
//! most of its time out, while one that failed once is back soon.
//!
//! Counting consecutive failures rather than a rate reacts within a handful of requests at any
//! traffic level and needs no window; the trade-off is that a backend failing every other
//! request is never ejected here. The circuit breaker ([`crate::policy::breaker`]) covers that case.
//!
//! Ejection is capped by a share of the backends ([`max_ejected`]): a fault that makes every
//! backend fail (a bad deploy, a shared database down) must not empty the pool, since serving
//! some errors beats serving none. If nothing usable is left anyway, [`panic_mode`] tells the
//! caller to ignore the flags and use every backend.

use std::time::Duration;

use lb_proto::v1::OutlierPolicy;
use tokio::time::Instant;

/// Outlier state of one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outlier {
    consecutive: u32,
    times_ejected: u32,
    /// End of the current or most recent ejection; kept after it passes, as the decay of
    /// `times_ejected` is measured from it.
    ejected_until: Option<Instant>,
}

impl Outlier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one request outcome (`failure` = 5xx, connection failure or timeout). When the
    /// consecutive failures reach `policy.consecutive_failures` (0 turns detection off) and
    /// `may_eject` is true (the caller checked [`max_ejected`]), ejects the backend until
    /// `now + min(base_ejection_ms × times_ejected, max_ejection_ms)`, counting this ejection,
    /// and returns that instant. A success resets the consecutive failures.
    ///
    /// While ejected, outcomes are ignored: they only arrive in panic mode or from requests
    /// sent before the ejection, and the ejection already acts on the failures that caused it.
    /// The backend comes back with a clean count, as in Envoy.
    ///
    /// Decay: once `max_ejection_ms` has passed since the end of the last ejection with no new
    /// one, the next recorded outcome resets `times_ejected` to 0, so a backend that had a bad
    /// hour last week starts from the base ejection again. The wait is `max_ejection_ms`, the
    /// longest any ejection lasts, so a backend only forgets after staying good for at least as
    /// long as it could have been out.
    pub fn record(
        &mut self,
        failure: bool,
        now: Instant,
        policy: &OutlierPolicy,
        may_eject: bool,
    ) -> Option<Instant> {
        if self.is_ejected(now) {
            return None;
        }
        if let Some(until) = self.ejected_until
            && now >= until + Duration::from_millis(u64::from(policy.max_ejection_ms))
        {
            self.times_ejected = 0;
            self.ejected_until = None;
        }
        if !failure {
            self.consecutive = 0;
            return None;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        // `>=`, not `==`: a backend that reached the threshold while the ejection cap was full
        // is ejected by its next failure once the cap has room.
        if policy.consecutive_failures == 0 || self.consecutive < policy.consecutive_failures {
            return None;
        }
        if !may_eject {
            return None;
        }
        self.times_ejected = self.times_ejected.saturating_add(1);
        let ms = u64::from(policy.base_ejection_ms)
            .saturating_mul(u64::from(self.times_ejected))
            .min(u64::from(policy.max_ejection_ms));
        let until = now + Duration::from_millis(ms);
        self.ejected_until = Some(until);
        self.consecutive = 0;
        Some(until)
    }

    /// End of the current or most recent ejection (check [`Outlier::is_ejected`] for "now").
    #[cfg(test)]
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Ejections so far, as of the last recorded outcome (decay is applied when one is recorded).
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }
}

/// How many of `total` backends may be ejected at once under `max_ejection_percent`:
/// `floor(total × percent / 100)`, raised to 1 when that is 0 but `total > 1` and `percent > 0`.
///
/// Flooring keeps the share at or under the percentage (Envoy compares the current share
/// against it, which lets 2 of 3 out at 50 %); the raise to 1 keeps detection useful in small
/// pools, where 10 % of 3 backends would otherwise never eject anything. Below 100 % this never
/// allows all of them: `total × percent / 100 < total` floors to at most `total - 1`, and the
/// raise to 1 applies only when `total ≥ 2`.
pub fn max_ejected(total: usize, percent: u32) -> usize {
    if percent >= 100 {
        return total;
    }
    let share = total.saturating_mul(percent as usize) / 100;
    if share == 0 && total > 1 && percent > 0 {
        1
    } else {
        share
    }
}

/// Whether the caller should ignore health, ejection and circuit flags and use every backend:
/// true when none is usable but some exist. Failing every request for certain is worse than
/// trying backends that are merely suspected.
pub fn panic_mode(usable: usize, total: usize) -> bool {
    usable == 0 && total > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 3,
            base_ejection_ms: 1_000,
            max_ejection_ms: 3_500,
            max_ejection_percent: 50,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Records failures until one ejects, returning the ejection's length.
    fn eject(o: &mut Outlier, now: Instant, p: &OutlierPolicy) -> Duration {
        for _ in 1..p.consecutive_failures {
            assert_eq!(o.record(true, now, p, true), None);
        }
        o.record(true, now, p, true).expect("ejected") - now
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let p = policy();
        let t0 = Instant::now();
        let mut o = Outlier::new();
        let got: Vec<_> = [true, true, false, true, true]
            .into_iter()
            .map(|f| o.record(f, t0, &p, true))
            .collect();
        assert_eq!(got, [None; 5]);
        assert_eq!(o.record(true, t0, &p, true), Some(t0 + secs(1)));
        assert!(o.is_ejected(t0));
        assert!(o.is_ejected(t0 + Duration::from_millis(999)));
        assert!(!o.is_ejected(t0 + secs(1)));
        assert_eq!(o.times_ejected(), 1);
        assert_eq!(o.ejected_until(), Some(t0 + secs(1)));
    }

    #[test]
    fn ejections_grow_linearly_up_to_the_cap() {
        let p = policy();
        let t0 = Instant::now();
        let mut o = Outlier::new();
        let mut now = t0;
        let mut lengths = Vec::new();
        for _ in 0..5 {
            let d = eject(&mut o, now, &p);
            lengths.push(d.as_millis());
            now += d;
        }
        assert_eq!(lengths, [1_000, 2_000, 3_000, 3_500, 3_500]);
        assert_eq!(o.times_ejected(), 5);
    }

    #[test]
    fn outcomes_while_ejected_are_ignored() {
        let p = policy();
        let t0 = Instant::now();
        let mut o = Outlier::new();
        eject(&mut o, t0, &p);
        for _ in 0..10 {
            assert_eq!(o.record(true, t0 + secs(0), &p, true), None);
        }
        assert_eq!(o.ejected_until(), Some(t0 + secs(1)));
        // Back with a clean count: two failures are not enough.
        assert_eq!(o.record(true, t0 + secs(1), &p, true), None);
        assert_eq!(o.record(true, t0 + secs(1), &p, true), None);
        assert_eq!(o.consecutive_failures(), 2);
    }

    #[test]
    fn the_cap_defers_ejection_to_the_next_failure() {
        let p = policy();
        let t0 = Instant::now();
        let mut o = Outlier::new();
        for _ in 0..5 {
            assert_eq!(o.record(true, t0, &p, false), None);
        }
        assert_eq!(o.record(true, t0, &p, true), Some(t0 + secs(1)));
    }

    #[test]
    fn off_when_threshold_is_zero() {
        let p = OutlierPolicy {
            consecutive_failures: 0,
            ..policy()
        };
        let t0 = Instant::now();
        let mut o = Outlier::new();
        assert!((0..100).all(|_| o.record(true, t0, &p, true).is_none()));
        assert!(!o.is_ejected(t0));
    }

    #[test]
    fn ejection_count_decays_after_a_quiet_max_ejection() {
        let p = policy();
        let t0 = Instant::now();
        let mut o = Outlier::new();
        let end = t0 + eject(&mut o, t0, &p);
        let end = end + eject(&mut o, end, &p);
        assert_eq!(o.times_ejected(), 2);
        // Just short of max_ejection_ms after the end: still remembered, the third is 3 s.
        let mut kept = o.clone();
        let before = end + Duration::from_millis(3_499);
        assert_eq!(eject(&mut kept, before, &p), secs(3));
        // At max_ejection_ms after the end, any outcome resets the count.
        let after = end + Duration::from_millis(3_500);
        assert_eq!(o.record(false, after, &p, true), None);
        assert_eq!(o.times_ejected(), 0);
        assert_eq!(eject(&mut o, after, &p), secs(1));
    }

    #[test]
    fn max_ejected_examples() {
        let cases = [
            ((0, 50), 0),
            ((1, 50), 0),
            ((1, 100), 1),
            ((2, 50), 1),
            ((3, 50), 1),
            ((3, 10), 1),
            ((3, 0), 0),
            ((10, 50), 5),
            ((10, 99), 9),
            ((10, 100), 10),
            ((100, 10), 10),
        ];
        for ((total, percent), want) in cases {
            assert_eq!(max_ejected(total, percent), want, "{total} {percent}");
        }
    }

    #[test]
    fn panic_only_when_nothing_is_usable() {
        assert!(panic_mode(0, 3));
        assert!(!panic_mode(1, 3));
        assert!(!panic_mode(0, 0));
    }

    proptest! {
        #[test]
        fn never_ejects_everyone_below_100(total in 0usize..10_000, percent in 0u32..100) {
            let m = max_ejected(total, percent);
            prop_assert!(m < total.max(1));
            prop_assert!(m <= total * percent as usize / 100 || m == 1);
        }

        #[test]
        fn ejection_length_is_bounded(outcomes in proptest::collection::vec((any::<bool>(), 0u64..5_000), 1..300)) {
            let p = policy();
            let t0 = Instant::now();
            let mut now = t0;
            let mut o = Outlier::new();
            for (failure, step) in outcomes {
                now += Duration::from_millis(step);
                if let Some(until) = o.record(failure, now, &p, true) {
                    let len = until - now;
                    prop_assert!(len >= Duration::from_millis(1_000));
                    prop_assert!(len <= Duration::from_millis(3_500));
                    prop_assert!(o.is_ejected(now));
                }
            }
        }
    }
}
