//! Retry decisions: which requests may be retried, how long to wait first, and whether the
//! data plane can afford another retry right now.
//!
//! Only idempotent methods are retried: repeating a POST the backend may already have acted on
//! could apply it twice.
//!
//! The budget is Finagle's and Linkerd's: retries may add at most `budget_percent` to the
//! traffic, measured over the last [`WINDOW_SECS`] seconds, plus a small allowance of
//! `min_retries_per_second` so a quiet data plane can still retry. A fixed "up to N attempts"
//! rule alone multiplies the load by N exactly when backends are failing, and that retry storm
//! keeps them down; a budget caps the extra load whatever fails. The trade-off: during a full
//! outage most requests fail on their first error instead of being retried.

use std::time::Duration;

use lb_proto::v1::RetryPolicy;
use tokio::time::Instant;

/// Idempotent methods per RFC 9110 §9.2.2: GET, HEAD, OPTIONS, PUT, DELETE, TRACE.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// Doublings after which the backoff cap stops growing: 2^20 × 1 ms is already over 17 minutes,
/// far past any configured maximum, and bounding the shift keeps it from overflowing.
const MAX_DOUBLINGS: u32 = 20;

/// Backoff before retry number `retry` (1 = the first retry): uniform in
/// [0, min(base × 2^(retry-1), max)] ("full jitter"), `unit` being uniform in [0, 1). Full
/// jitter spreads the retries of requests that failed together, so they do not come back as
/// one wave.
pub fn backoff(retry: u32, policy: &RetryPolicy, unit: f64) -> Duration {
    let doublings = retry.saturating_sub(1).min(MAX_DOUBLINGS);
    let cap_ms = u64::from(policy.backoff_base_ms)
        .saturating_mul(1 << doublings)
        .min(u64::from(policy.backoff_max_ms));
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    Duration::from_millis(cap_ms).mul_f64(unit)
}

/// Seconds over which requests fund retries. Ten is Finagle's default: long enough to smooth
/// bursts, short enough that a burst of traffic long gone cannot fund a retry storm now.
pub const WINDOW_SECS: usize = 10;

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Second {
    /// Seconds since the budget's origin that this bucket counts.
    index: u64,
    deposits: u64,
    /// Retries paid for by deposits (not those paid by the per-second allowance).
    withdrawals: u64,
}

/// The retry budget of one data plane (or of one route, as the caller chooses).
///
/// Two sources pay for a retry, tried in this order:
/// - deposits: each first attempt deposits `budget_percent / 100` of a retry. Deposits and the
///   retries they paid for are counted in a ring of [`WINDOW_SECS`] one-second buckets, and a
///   retry is paid for when `(retries + 1) × 100 ≤ deposits × budget_percent` in the window.
///   Integer arithmetic, so the bound is exact.
/// - the allowance: a token bucket refilled at `min_retries_per_second`, holding at most one
///   second's worth. It starts full, as a data plane that has been quiet for a second would be
///   (a fresh or quiet data plane can still retry a failing request on every backend), so over
///   any run the allowance pays for at most `min_retries_per_second × (1 + seconds)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryBudget {
    /// Set by the first call: the budget never reads the clock itself.
    origin: Option<Instant>,
    seconds: [Second; WINDOW_SECS],
    /// Allowance tokens in billionths, refilled exactly from nanoseconds elapsed.
    allowance: u64,
    refilled_at: Option<Instant>,
}

impl RetryBudget {
    pub fn new() -> Self {
        Self::default()
    }

    fn current(&mut self, now: Instant) -> (u64, &mut Second) {
        let origin = *self.origin.get_or_insert(now);
        let index = now.saturating_duration_since(origin).as_secs();
        let slot = &mut self.seconds[(index % WINDOW_SECS as u64) as usize];
        // A bucket of a later second means a caller reporting with a slightly older `now`; it is
        // counted there rather than wiping newer counts.
        if slot.index < index {
            *slot = Second {
                index,
                deposits: 0,
                withdrawals: 0,
            };
        }
        (index.max(slot.index), slot)
    }

    fn window(&self, newest: u64) -> (u64, u64) {
        self.seconds
            .iter()
            .filter(|s| s.index + WINDOW_SECS as u64 > newest)
            .fold((0, 0), |(d, w), s| (d + s.deposits, w + s.withdrawals))
    }

    /// One request sent (its first attempt).
    pub fn deposit(&mut self, now: Instant) {
        let (_, slot) = self.current(now);
        slot.deposits = slot.deposits.saturating_add(1);
    }

    /// May one retry happen now? A true answer spends the budget for it.
    pub fn try_withdraw(&mut self, now: Instant, policy: &RetryPolicy) -> bool {
        let (newest, _) = self.current(now);
        let (deposits, withdrawals) = self.window(newest);
        if (withdrawals + 1) * 100 <= deposits.saturating_mul(u64::from(policy.budget_percent)) {
            self.current(now).1.withdrawals += 1;
            return true;
        }
        self.refill(now, policy);
        if self.allowance >= NANOS_PER_SEC {
            self.allowance -= NANOS_PER_SEC;
            return true;
        }
        false
    }

    fn refill(&mut self, now: Instant, policy: &RetryPolicy) {
        let rate = u64::from(policy.min_retries_per_second);
        let capacity = rate * NANOS_PER_SEC;
        let Some(last) = self.refilled_at else {
            self.refilled_at = Some(now);
            self.allowance = capacity;
            return;
        };
        if now <= last {
            return;
        }
        // Past one second the bucket is full anyway; clamping first keeps the product in range.
        let nanos = now
            .duration_since(last)
            .as_nanos()
            .min(u128::from(NANOS_PER_SEC)) as u64;
        self.allowance = (self.allowance + nanos * rate).min(capacity);
        self.refilled_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(percent: u32, min_per_second: u32) -> RetryPolicy {
        RetryPolicy {
            budget_percent: percent,
            min_retries_per_second: min_per_second,
            ..lb_proto::defaults::retry()
        }
    }

    #[test]
    fn idempotent_methods() {
        use http::Method;
        let yes = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ];
        assert!(yes.iter().all(is_idempotent));
        let no = [
            Method::POST,
            Method::PATCH,
            Method::CONNECT,
            Method::from_bytes(b"PURGE").unwrap(),
        ];
        assert!(!no.iter().any(is_idempotent));
    }

    #[test]
    fn backoff_caps_double_up_to_the_maximum() {
        let p = RetryPolicy {
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            ..lb_proto::defaults::retry()
        };
        // A unit of 1 (the top of the range, accepted) yields the cap itself.
        let caps: Vec<u128> = (1..=6).map(|r| backoff(r, &p, 1.0).as_millis()).collect();
        assert_eq!(caps, [25, 50, 100, 200, 250, 250]);
        assert_eq!(backoff(3, &p, 0.5), Duration::from_millis(50));
        assert_eq!(backoff(1, &p, 0.0), Duration::ZERO);
        assert_eq!(backoff(0, &p, 0.5), backoff(1, &p, 0.5));
        assert_eq!(backoff(u32::MAX, &p, 0.5), Duration::from_millis(125));
        assert_eq!(backoff(2, &p, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn deposits_fund_their_percentage() {
        let t0 = Instant::now();
        let p = policy(20, 0);
        let mut b = RetryBudget::new();
        for _ in 0..10 {
            b.deposit(t0);
        }
        // 20 % of 10 requests: two retries.
        let got: Vec<bool> = (0..4).map(|_| b.try_withdraw(t0, &p)).collect();
        assert_eq!(got, [true, true, false, false]);
        // Five more requests fund one more (3 of 15).
        for _ in 0..5 {
            b.deposit(t0);
        }
        let got: Vec<bool> = (0..2).map(|_| b.try_withdraw(t0, &p)).collect();
        assert_eq!(got, [true, false]);
    }

    #[test]
    fn old_deposits_expire() {
        let t0 = Instant::now();
        let p = policy(50, 0);
        let mut b = RetryBudget::new();
        for _ in 0..100 {
            b.deposit(t0);
        }
        // At 9.999 s the burst still counts; at 10 s it has left the window.
        assert!(b.try_withdraw(t0 + Duration::from_millis(9_999), &p));
        assert!(!b.try_withdraw(t0 + Duration::from_secs(10), &p));
        assert!(!b.try_withdraw(t0 + Duration::from_secs(60), &p));
    }

    #[test]
    fn allowance_starts_full_and_refills_per_second() {
        let t0 = Instant::now();
        let p = policy(0, 10);
        let mut b = RetryBudget::new();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!((0..12).filter(|_| b.try_withdraw(at(0), &p)).count(), 10);
        assert!(!b.try_withdraw(at(0), &p));
        // One token every 100 ms.
        assert!(!b.try_withdraw(at(99), &p));
        assert!(b.try_withdraw(at(100), &p));
        assert!(!b.try_withdraw(at(100), &p));
        // A long quiet spell fills the bucket to one second's worth, no more.
        let got = (0..12).filter(|_| b.try_withdraw(at(60_000), &p)).count();
        assert_eq!(got, 10);
    }

    #[test]
    fn no_budget_no_allowance_no_retry() {
        let t0 = Instant::now();
        let p = policy(0, 0);
        let mut b = RetryBudget::new();
        for _ in 0..1000 {
            b.deposit(t0);
        }
        assert!(!b.try_withdraw(t0, &p));
        assert!(!b.try_withdraw(t0 + Duration::from_secs(5), &p));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Deposit,
        Withdraw,
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Deposit),
            4 => Just(Op::Withdraw),
            1 => (0u64..3_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #[test]
        fn retries_stay_within_budget(ops in proptest::collection::vec(op(), 0..600),
                                      percent in 0u32..=100, min_per_second in 0u32..20) {
            let p = policy(percent, min_per_second);
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = RetryBudget::new();
            let mut deposits: Vec<Instant> = Vec::new();
            let mut allowed: u64 = 0;
            for op in ops {
                match op {
                    Op::Deposit => { b.deposit(now); deposits.push(now); }
                    Op::Wait(ms) => now += Duration::from_millis(ms),
                    Op::Withdraw => {
                        if b.try_withdraw(now, &p) {
                            allowed += 1;
                        }
                        // Over the whole run: the percentage of every deposit plus the allowance.
                        let elapsed = (now - t0).as_secs_f64();
                        let bound = (deposits.len() as f64 * f64::from(percent) / 100.0).floor()
                            + f64::from(min_per_second) * (elapsed + 1.0);
                        prop_assert!(allowed as f64 <= bound, "{allowed} > {bound}");
                    }
                }
            }
        }

        #[test]
        fn with_no_allowance_deposits_pay_for_every_retry(
            ops in proptest::collection::vec(op(), 0..600), percent in 0u32..=100,
        ) {
            // Retries are withdrawn only against deposits visible in the window, and a deposit
            // leaves the window no later than the retries it paid for, so over any run retries
            // never exceed the percentage of all deposits: no slack at all.
            let p = policy(percent, 0);
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = RetryBudget::new();
            let (mut deposits, mut allowed) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Deposit => { b.deposit(now); deposits += 1; }
                    Op::Wait(ms) => now += Duration::from_millis(ms),
                    Op::Withdraw => {
                        allowed += u64::from(b.try_withdraw(now, &p));
                        prop_assert!(allowed * 100 <= deposits * u64::from(percent));
                    }
                }
            }
        }
    }
}
