//! Rate-limit state as data planes keep it in Redis, seen from the control plane: key usage and
//! bans to show, bans to lift. Data planes write the state; the control plane only reads it and
//! deletes bans, through the layout of [`lb_proto::redis_keys`].
//!
//! The arithmetic is here, with the clock passed in; the Redis reads are behind [`SharedLimits`].

use std::net::IpAddr;

use lb_proto::v1::{BanInfo, Directive, Limit, directive};
use lb_proto::validate::Invalid;

use crate::keys;
use crate::store::StoreError;

/// Directives kept in a snapshot: enough that a data plane reconnecting after a short outage
/// still finds every one it missed, few enough that snapshots stay small.
pub const MAX_DIRECTIVES: usize = 256;

/// Checks a client as an operator names it and returns its canonical form (the address as data
/// planes print it, so `ip:2001:DB8::1` finds the ban of `ip:2001:db8::1`).
pub fn canonical_client(client: &str) -> Result<String, Invalid> {
    let bad = || {
        Invalid::new(
            "client",
            format_args!(
                "{client:?} is neither ip:<address> nor key:<{} hex digits>",
                keys::KEY_ID_LEN
            ),
        )
    };
    if let Some(ip) = client.strip_prefix("ip:") {
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        return Ok(format!("ip:{ip}"));
    }
    if let Some(id) = client.strip_prefix("key:") {
        keys::validate_key_id(id).map_err(|_| bad())?;
        return Ok(client.to_owned());
    }
    Err(bad())
}

/// A GCRA record as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcraState {
    /// Theoretical arrival time, unix ms.
    pub tat_ms: f64,
    /// Emission interval `tat_ms` was computed with; `None` when not recorded.
    pub interval_ms: Option<f64>,
}

/// What a client may still do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Requests that would be admitted now.
    pub remaining: u64,
    /// Milliseconds until the whole limit is available again.
    pub reset_ms: u64,
}

/// Absorbs float rounding so that an exact multiple of the interval is not counted one short.
const EPSILON: f64 = 1e-6;

/// GCRA usage for `limit` (N requests per P ms) at `now_ms`.
///
/// With emission interval T = P / N, a request at `now` is admitted when
/// `max(tat, now) + T - now <= P`. The time already used is `tat - now`; when the state was
/// written under another tier (a different T), it is rescaled to this one so the share of the
/// limit used is kept. Then `remaining = floor((P - used) / T)` within `0..=N`, and
/// `reset = ceil(used)`.
pub fn usage(limit: &Limit, state: Option<GcraState>, now_ms: u64) -> Usage {
    let (n, p) = (limit.requests, limit.period_ms);
    if n == 0 || p == 0 {
        return Usage {
            remaining: 0,
            reset_ms: 0,
        };
    }
    let full = Usage {
        remaining: n,
        reset_ms: 0,
    };
    let Some(state) = state else {
        return full;
    };
    let now = now_ms as f64;
    if !state.tat_ms.is_finite() || state.tat_ms <= now {
        return full;
    }
    let (n_f, p_f) = (n as f64, p as f64);
    let interval = p_f / n_f;
    let mut used = state.tat_ms - now;
    if let Some(t) = state.interval_ms.filter(|t| t.is_finite() && *t > 0.0)
        && (t - interval).abs() > EPSILON
    {
        used = used * interval / t;
    }
    let remaining = ((p_f - used) / interval + EPSILON).floor().clamp(0.0, n_f);
    let reset = (used - EPSILON).ceil().max(0.0);
    Usage {
        remaining: remaining as u64,
        reset_ms: reset as u64,
    }
}

/// The data planes' shared rate-limit state (Redis), as the control plane reads it.
#[tonic::async_trait]
pub trait SharedLimits: Send + Sync + 'static {
    /// The GCRA record of `identity`, `None` when it has none.
    async fn gcra(&self, identity: &str) -> Result<Option<GcraState>, StoreError>;
    /// Bans whose `until` is after `now_ms`.
    async fn bans(&self, now_ms: u64) -> Result<Vec<BanInfo>, StoreError>;
    /// The ban of `identity` when it lasts past `now_ms`.
    async fn ban(&self, identity: &str, now_ms: u64) -> Result<Option<BanInfo>, StoreError>;
    /// Deletes the ban and strikes of `identity`.
    async fn lift(&self, identity: &str) -> Result<(), StoreError>;
}

/// Appends a directive with the next sequence number, keeping the last [`MAX_DIRECTIVES`].
pub fn push_directive(directives: &mut Vec<Directive>, kind: directive::Kind) {
    let seq = directives.iter().map(|d| d.seq).max().unwrap_or(0) + 1;
    directives.push(Directive {
        seq,
        kind: Some(kind),
    });
    if directives.len() > MAX_DIRECTIVES {
        let excess = directives.len() - MAX_DIRECTIVES;
        directives.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proto::v1::BanLift;

    const FREE: Limit = Limit {
        requests: 5,
        period_ms: 60_000,
    };

    fn at(tat_ms: f64, interval_ms: Option<f64>) -> Option<GcraState> {
        Some(GcraState {
            tat_ms,
            interval_ms,
        })
    }

    #[test]
    fn no_state_or_past_tat_is_the_full_limit() {
        let full = Usage {
            remaining: 5,
            reset_ms: 0,
        };
        assert_eq!(usage(&FREE, None, 1_000), full);
        assert_eq!(usage(&FREE, at(900.0, Some(12_000.0)), 1_000), full);
        assert_eq!(usage(&FREE, at(1_000.0, Some(12_000.0)), 1_000), full);
    }

    #[test]
    fn used_time_counts_in_whole_intervals() {
        let now = 1_000_000;
        // One request made just now: T = 12 s used, four left.
        let u = usage(&FREE, at(now as f64 + 12_000.0, Some(12_000.0)), now);
        assert_eq!((u.remaining, u.reset_ms), (4, 12_000));
        // Half an interval more used: still three whole ones left.
        let u = usage(&FREE, at(now as f64 + 30_000.0, Some(12_000.0)), now);
        assert_eq!((u.remaining, u.reset_ms), (2, 30_000));
        // Exhausted.
        let u = usage(&FREE, at(now as f64 + 60_000.0, Some(12_000.0)), now);
        assert_eq!((u.remaining, u.reset_ms), (0, 60_000));
        // Fractional tat rounds the reset up.
        let u = usage(&FREE, at(now as f64 + 0.5, None), now);
        assert_eq!((u.remaining, u.reset_ms), (4, 1));
    }

    #[test]
    fn state_from_another_tier_is_rescaled() {
        let now = 50;
        // Three requests at basic (T = 3 s) are 9 s; at free (T = 12 s) they are 36 s.
        let u = usage(&FREE, at(now as f64 + 9_000.0, Some(3_000.0)), now);
        assert_eq!((u.remaining, u.reset_ms), (2, 36_000));
        // The other way: more than a whole limit's worth clamps to 0 remaining.
        let premium = Limit {
            requests: 100,
            period_ms: 60_000,
        };
        let u = usage(&premium, at(now as f64 + 60_000.0, Some(12_000.0)), now);
        assert_eq!((u.remaining, u.reset_ms), (95, 3_000));
        let u = usage(&FREE, at(now as f64 + 120_000.0, Some(12_000.0)), now);
        assert_eq!(u.remaining, 0);
    }

    #[test]
    fn more_time_used_never_leaves_more_remaining() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let limit = Limit {
                requests: rng.u64(1..2_000),
                period_ms: rng.u64(1..3_600_000),
            };
            let now = rng.u64(0..1 << 40);
            let used = rng.f64() * 2.0 * limit.period_ms as f64;
            let more = used + rng.f64() * limit.period_ms as f64;
            let t = if rng.bool() {
                None
            } else {
                Some(rng.f64() * 10_000.0 + 0.001)
            };
            let a = usage(&limit, at(now as f64 + used, t), now);
            let b = usage(&limit, at(now as f64 + more, t), now);
            assert!(a.remaining <= limit.requests, "{limit:?} {a:?}");
            assert!(b.remaining <= a.remaining, "{limit:?} {a:?} {b:?}");
            assert!(b.reset_ms >= a.reset_ms, "{limit:?} {a:?} {b:?}");
        }
    }

    #[test]
    fn clients_are_checked_and_canonical() {
        assert_eq!(canonical_client("ip:10.0.0.1").unwrap(), "ip:10.0.0.1");
        assert_eq!(
            canonical_client("ip:2001:DB8::1").unwrap(),
            "ip:2001:db8::1"
        );
        assert_eq!(
            canonical_client("key:0123456789abcdef").unwrap(),
            "key:0123456789abcdef"
        );
        for bad in [
            "",
            "10.0.0.1",
            "ip:",
            "ip:nope",
            "key:xyz",
            "key:0123456789ABCDEF",
            "user:1",
        ] {
            assert_eq!(canonical_client(bad).unwrap_err().field, "client", "{bad}");
        }
    }

    #[test]
    fn directives_are_numbered_and_bounded() {
        let mut d = Vec::new();
        for i in 0..300 {
            push_directive(
                &mut d,
                directive::Kind::LiftBan(BanLift {
                    client: format!("ip:10.0.0.{}", i % 250),
                }),
            );
        }
        assert_eq!(d.len(), MAX_DIRECTIVES);
        assert_eq!(d.first().unwrap().seq, 45);
        assert_eq!(d.last().unwrap().seq, 300);
    }
}
