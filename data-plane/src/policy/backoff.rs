//! Exponential backoff with full jitter (delay drawn uniformly from zero to the current cap), so
//! a fleet of data planes that lost the control plane at the same moment does not reconnect in
//! one wave.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The cap for the next attempt, before jitter.
    pub fn cap(&self) -> Duration {
        self.base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max)
    }

    /// Delay before the next attempt; `unit` is a uniform random number in [0, 1).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let d = self.cap().mul_f64(unit.clamp(0.0, 1.0));
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let caps: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.cap().as_millis();
                b.next_with(0.5);
                c
            })
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_with(1.0), Duration::from_millis(100));
        assert_eq!(b.next_with(0.0), Duration::ZERO);
    }
}
