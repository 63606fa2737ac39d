//! The limiter's arithmetic: GCRA (the generic cell rate algorithm) plus strikes and escalating
//! bans, as pure functions of a client's state and the time. The in-process store runs this
//! code; the Redis script (`redis.rs`) is its line-by-line twin, and the same tests run against
//! both stores.
//!
//! "N requests per P ms" means: a sustained rate of N per P (requests spaced T = P/N apart), and
//! an idle client may send a burst of up to N at once. So any span of L ms admits at most
//! N + ceil(L/T) - 1 requests: exactly N for simultaneous requests, and at most 2N - 1 in one
//! P-long span for a client that bursts and then keeps to the rate (as "100 per 60 s" admits 100
//! at once, then one every 600 ms). GCRA keeps one number per client, the theoretical
//! arrival time (TAT) of its next request; a request at `now` is admitted when
//! `max(TAT, now) + T - now <= P`, and then TAT moves to `max(TAT, now) + T`. It is exact (no
//! window edges where 2N get through), needs no timer, and is one read-modify-write.
//!
//! Tier changes take effect at once: TAT is stored with the T it was computed with, and under a
//! different T the outstanding debt `TAT - now` is rescaled by the ratio, so a client that used
//! 80% of its free quota has used 80% of its premium quota the moment it is upgraded (and can
//! send the remaining 20% of the larger quota at once), never the reverse.
//!
//! Bans: each rejection is a strike; `strikes` strikes within `strike_window_ms` ban the client
//! for `base_ban_ms × multiplier^(bans so far)`, capped at `max_ban_ms`. The ban count is
//! forgotten after `strike_decay_ms` without a new ban.

/// A limit of `requests` per `period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub period_ms: u64,
}

impl Rate {
    /// No limit to count against: a check under it only tells whether the client is banned,
    /// and changes nothing (a created API key's address, say, whose own limit is its key's).
    pub const BAN_ONLY: Rate = Rate {
        requests: 0,
        period_ms: 0,
    };

    /// The emission interval T in ms (fractional).
    pub fn interval(&self) -> f64 {
        self.period_ms as f64 / self.requests.max(1) as f64
    }
}

/// Ban settings, in ms; `strikes == 0` turns bans off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BanRule {
    pub strikes: u32,
    pub strike_window_ms: u64,
    pub base_ban_ms: u64,
    pub multiplier: u32,
    pub max_ban_ms: u64,
    pub strike_decay_ms: u64,
}

impl BanRule {
    /// Length of ban number `n` (1 = the first).
    pub fn duration(&self, n: u32) -> u64 {
        let mut d = self.base_ban_ms.min(self.max_ban_ms);
        for _ in 1..n {
            d = d.saturating_mul(u64::from(self.multiplier.max(1)));
            if d >= self.max_ban_ms {
                return self.max_ban_ms;
            }
        }
        d
    }
}

/// One client's state; times are unix ms (or any fixed origin).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientState {
    /// Theoretical arrival time, 0 = none.
    pub tat: f64,
    /// Emission interval `tat` was computed with.
    pub interval: f64,
    pub strikes: u32,
    pub strikes_until: u64,
    pub ban_until: u64,
    pub bans: u32,
    /// The ban count is forgotten after this.
    pub bans_until: u64,
}

/// What the limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Limited,
    Banned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub limit: u64,
    /// Requests that would still be admitted now.
    pub remaining: u64,
    /// Ms until the client's quota is whole again.
    pub reset_ms: u64,
    /// Ms until a request may be admitted (0 when allowed).
    pub retry_after_ms: u64,
}

/// Checks one request at `now` and updates `s` ([`Rate::BAN_ONLY`]: checks the ban only).
pub fn check(s: &mut ClientState, now: u64, rate: Rate, ban: BanRule) -> Decision {
    let nowf = now as f64;
    let t = rate.interval();
    let p = rate.period_ms as f64;
    if s.ban_until > now {
        return Decision {
            verdict: Verdict::Banned,
            limit: rate.requests,
            remaining: 0,
            reset_ms: s.ban_until - now,
            retry_after_ms: s.ban_until - now,
        };
    }
    if rate.requests == 0 {
        return Decision {
            verdict: Verdict::Allowed,
            limit: 0,
            remaining: 0,
            reset_ms: 0,
            retry_after_ms: 0,
        };
    }
    let mut tat = s.tat.max(nowf);
    if s.tat > nowf && s.interval > 0.0 && (s.interval - t).abs() > f64::EPSILON {
        tat = nowf + (s.tat - nowf) * t / s.interval;
    }
    let next = tat + t;
    if next - nowf <= p + 1e-9 {
        s.tat = next;
        s.interval = t;
        let used = next - nowf;
        return Decision {
            verdict: Verdict::Allowed,
            limit: rate.requests,
            remaining: (((p - used) / t) + 1e-9).floor().max(0.0) as u64,
            reset_ms: used.ceil() as u64,
            retry_after_ms: 0,
        };
    }
    // Refused: the state keeps its (rescaled) debt, and the refusal is a strike.
    s.tat = tat;
    s.interval = t;
    let retry_after_ms = (next - nowf - p).ceil().max(1.0) as u64;
    let mut verdict = Verdict::Limited;
    let mut reset_ms = (tat - nowf).ceil().max(0.0) as u64;
    if ban.strikes > 0 {
        if s.strikes_until <= now {
            s.strikes = 0;
            s.strikes_until = now + ban.strike_window_ms;
        }
        s.strikes += 1;
        if s.strikes >= ban.strikes {
            if s.bans_until <= now {
                s.bans = 0;
            }
            s.bans += 1;
            let d = ban.duration(s.bans);
            s.ban_until = now + d;
            s.bans_until = s.ban_until + ban.strike_decay_ms;
            s.strikes = 0;
            s.strikes_until = 0;
            verdict = Verdict::Banned;
            reset_ms = d;
        }
    }
    Decision {
        verdict,
        limit: rate.requests,
        remaining: 0,
        reset_ms,
        retry_after_ms: if verdict == Verdict::Banned {
            reset_ms
        } else {
            retry_after_ms
        },
    }
}

/// True when a state holds nothing worth keeping at `now` (it can be forgotten).
pub fn is_idle(s: &ClientState, now: u64) -> bool {
    (s.tat as u64) <= now && s.ban_until <= now && s.strikes_until <= now && s.bans_until <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE: Rate = Rate {
        requests: 5,
        period_ms: 60_000,
    };
    const NO_BAN: BanRule = BanRule {
        strikes: 0,
        strike_window_ms: 0,
        base_ban_ms: 0,
        multiplier: 1,
        max_ban_ms: 0,
        strike_decay_ms: 0,
    };

    #[test]
    fn a_ban_only_check_reports_a_ban_and_counts_nothing() {
        let mut s = ClientState::default();
        let now = 1_000_000;
        for _ in 0..100 {
            assert_eq!(
                check(&mut s, now, Rate::BAN_ONLY, NO_BAN).verdict,
                Verdict::Allowed
            );
        }
        assert_eq!(s, ClientState::default(), "nothing counted");
        s.ban_until = now + 5_000;
        let d = check(&mut s, now, Rate::BAN_ONLY, NO_BAN);
        assert_eq!((d.verdict, d.retry_after_ms), (Verdict::Banned, 5_000));
    }

    #[test]
    fn burst_of_n_then_one_per_interval() {
        let mut s = ClientState::default();
        let now = 1_000_000;
        let remaining: Vec<u64> = (0..5)
            .map(|_| check(&mut s, now, FREE, NO_BAN).remaining)
            .collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0]);
        let d = check(&mut s, now, FREE, NO_BAN);
        assert_eq!(d.verdict, Verdict::Limited);
        assert_eq!(d.retry_after_ms, 12_000);
        assert_eq!(
            check(&mut s, now + 11_999, FREE, NO_BAN).verdict,
            Verdict::Limited
        );
        assert_eq!(
            check(&mut s, now + 12_000, FREE, NO_BAN).verdict,
            Verdict::Allowed
        );
        assert_eq!(
            check(&mut s, now + 12_000, FREE, NO_BAN).verdict,
            Verdict::Limited
        );
    }

    #[test]
    fn never_more_than_the_burst_plus_the_rate() {
        // Requests every 100 ms for 10 minutes: any 60 s span admits at most 5 + 60/12 - 1.
        let mut s = ClientState::default();
        let admitted: Vec<u64> = (0..6000u64)
            .map(|i| 1_000_000 + i * 100)
            .filter(|&t| check(&mut s, t, FREE, NO_BAN).verdict == Verdict::Allowed)
            .collect();
        for (i, &t) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|&&u| u < t + 60_000)
                .count();
            assert!(
                in_window <= 9,
                "{in_window} admitted in the minute after {t}"
            );
        }
        // Long-run rate: 5 per minute plus the initial burst.
        assert!(admitted.len() as u64 <= 5 + 10 * 5);
    }

    #[test]
    fn upgrade_applies_at_once_and_downgrade_too() {
        let premium = Rate {
            requests: 100,
            period_ms: 60_000,
        };
        let mut s = ClientState::default();
        let now = 5_000_000;
        for _ in 0..5 {
            check(&mut s, now, FREE, NO_BAN);
        }
        assert_eq!(check(&mut s, now, FREE, NO_BAN).verdict, Verdict::Limited);
        // Upgraded: five free requests of debt (one minute) become five premium requests of
        // debt (three seconds), so the next request is admitted at once.
        let d = check(&mut s, now + 600, premium, NO_BAN);
        assert_eq!(d.verdict, Verdict::Allowed, "{d:?}");
        // Half a minute later half the premium quota is back.
        let d = check(&mut s, now + 30_600, premium, NO_BAN);
        assert!(d.remaining >= 48, "{d:?}");
        // Downgraded with one premium request of debt: that is one free request of debt, and
        // this request makes two: three of five left.
        let d = check(&mut s, now + 30_600, FREE, NO_BAN);
        assert_eq!(d.remaining, 3, "{d:?}");
    }

    #[test]
    fn bans_escalate_and_decay() {
        let ban = BanRule {
            strikes: 3,
            strike_window_ms: 60_000,
            base_ban_ms: 300_000,
            multiplier: 2,
            max_ban_ms: 86_400_000,
            strike_decay_ms: 3_600_000,
        };
        let mut s = ClientState::default();
        let mut now = 10_000_000;
        let mut ban_lengths = Vec::new();
        for _ in 0..3 {
            loop {
                let d = check(&mut s, now, FREE, ban);
                if d.verdict == Verdict::Banned {
                    ban_lengths.push(d.retry_after_ms);
                    now += d.retry_after_ms;
                    break;
                }
                now += 10;
            }
        }
        assert_eq!(ban_lengths, [300_000, 600_000, 1_200_000]);
        // Quiet for longer than the decay: back to the base ban.
        now += 3_600_001 + 60_000;
        loop {
            let d = check(&mut s, now, FREE, ban);
            if d.verdict == Verdict::Banned {
                assert_eq!(d.retry_after_ms, 300_000);
                break;
            }
            now += 10;
        }
        assert_eq!(ban.duration(30), 86_400_000);
    }
}
