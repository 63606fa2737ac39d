//! Slow start: a backend back in rotation (its health checks passing again, or its ejection
//! over) gets a small share of new requests at first, growing to its full share over
//! [`DURATION_MS`], so a cold cache or a just-restarted process is not flooded at once.

/// A backend back from failure gets its full share only after this long.
pub const DURATION_MS: u64 = 10_000;

/// The least share a backend just back gets.
pub const FLOOR: f64 = 0.1;

/// The share of its weight a backend back in rotation since `back_ms` gets at `now_ms`: from
/// [`FLOOR`] rising linearly to 1.0 over [`DURATION_MS`]; `back_ms` 0 means it never left.
pub fn warmth(back_ms: u64, now_ms: u64) -> f64 {
    if back_ms == 0 || now_ms >= back_ms + DURATION_MS {
        return 1.0;
    }
    (now_ms.saturating_sub(back_ms) as f64 / DURATION_MS as f64).max(FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_warms_from_a_tenth_to_its_full_share() {
        assert_eq!(warmth(0, 123_456), 1.0, "never left rotation");
        let back = 50_000;
        assert_eq!(warmth(back, back), FLOOR);
        assert_eq!(warmth(back, back + 500), FLOOR);
        assert_eq!(warmth(back, back + DURATION_MS / 2), 0.5);
        assert_eq!(warmth(back, back + DURATION_MS), 1.0);
        // An ejection still running (its end in the future) counts as just back.
        assert_eq!(warmth(back, back - 1_000), FLOOR);
    }
}
