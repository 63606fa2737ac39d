//! Moving averages of a backend's recent behaviour, as plain functions of their inputs (the
//! clock passed in), for the strategies that score backends: the latency of response heads, and
//! the share of recent requests that failed.
//!
//! The latency average weighs the newest sample by [`ALPHA`] and halves for every
//! [`HALF_LIFE_MS`] without one, so a backend that was slow once is tried again later instead of
//! being starved. The failure share moves a twentieth of the way to each outcome (0 or 1), so it
//! averages about the last [`FAILURE_WINDOW`] outcomes.

/// Weight of the newest latency sample in the moving average.
pub const ALPHA: f64 = 0.3;

/// An unsampled latency average halves every this long: long enough to keep a slow backend
/// away for a while, short enough that it is re-measured within seconds once it is quiet.
pub const HALF_LIFE_MS: u64 = 2_000;

/// The failure share averages about this many recent outcomes.
pub const FAILURE_WINDOW: i64 = 20;

/// The failure share's scale: 1,000,000 is every recent request failed.
pub const PPM: u32 = 1_000_000;

/// The latency average after one more sample, in µs; `old` 0 means no sample yet. Never 0
/// once sampled, so "measured" stays distinguishable from "not yet".
pub fn update(old_us: u64, sample_us: u64) -> u64 {
    if old_us == 0 {
        return sample_us.max(1);
    }
    ((old_us as f64) + ALPHA * (sample_us as f64 - old_us as f64)).max(1.0) as u64
}

/// The latency average as of `now_ms`, last sampled at `sampled_ms`: halved for every
/// [`HALF_LIFE_MS`] since.
pub fn decayed(avg_us: u64, sampled_ms: u64, now_ms: u64) -> u64 {
    let age = now_ms.saturating_sub(sampled_ms);
    avg_us >> (age / HALF_LIFE_MS).min(63)
}

/// The failure share (in millionths) after one more outcome.
pub fn failure_step(ppm: u32, failed: bool) -> u32 {
    let target: i64 = if failed { i64::from(PPM) } else { 0 };
    let next = i64::from(ppm) + (target - i64::from(ppm)) / FAILURE_WINDOW;
    next.clamp(0, i64::from(PPM)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_is_the_average_and_later_ones_weigh_three_tenths() {
        assert_eq!(update(0, 1000), 1000);
        assert_eq!(update(0, 0), 1, "a measured average is never 0");
        assert_eq!(update(1000, 2000), 1300);
        assert_eq!(update(1000, 0), 700);
    }

    #[test]
    fn an_unsampled_average_halves_every_half_life() {
        assert_eq!(decayed(8000, 1000, 1000), 8000);
        assert_eq!(decayed(8000, 1000, 1000 + HALF_LIFE_MS - 1), 8000);
        assert_eq!(decayed(8000, 1000, 1000 + HALF_LIFE_MS), 4000);
        assert_eq!(decayed(8000, 1000, 1000 + 3 * HALF_LIFE_MS), 1000);
        assert_eq!(decayed(8000, 1000, u64::MAX), 0);
        // A clock read before the sample (another thread's) decays nothing.
        assert_eq!(decayed(8000, 5000, 1000), 8000);
    }

    #[test]
    fn the_failure_share_tracks_about_the_last_twenty_outcomes() {
        let mut ppm = 0;
        for _ in 0..20 {
            ppm = failure_step(ppm, true);
        }
        // 1 - (19/20)^20 ≈ 64 % after twenty failures in a row.
        assert!((600_000..680_000).contains(&ppm), "{ppm}");
        for _ in 0..200 {
            ppm = failure_step(ppm, true);
        }
        assert!(ppm > 990_000 && ppm <= PPM, "{ppm}");
        for _ in 0..200 {
            ppm = failure_step(ppm, false);
        }
        assert!(ppm < 10_000, "{ppm}");
    }
}
