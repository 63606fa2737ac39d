//! The configuration in force, built from one validated snapshot: the backends as slots of
//! their endpoints, the balancer, and every policy resolved for the request path. Swapped as a
//! whole when a snapshot is applied, so each request runs under one configuration.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use lb_proto::v1::{
    ConfigSnapshot, OutlierPolicy, QueuePolicy, RateLimitPolicy, RetryPolicy, StoreFailureMode,
    UnknownKeyPolicy,
};
use lb_proto::validate::Invalid;

use tokio::time::Instant;

use crate::backend::Endpoint;
use crate::clock::millis;
use crate::policy::balance::{Balancer, Candidates};
use crate::policy::outlier;
use crate::ratelimit::gcra::{BanRule, Rate};

/// How long a client has to send its whole request body when `timeouts.client_body_ms` is
/// unset: as nginx's `client_body_timeout`, though here it bounds the whole body rather than
/// each read, so a client trickling a byte at a time cannot hold a backend connection longer.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an upgraded connection may carry nothing when `timeouts.tunnel_idle_ms` is unset:
/// an hour, as HAProxy's `timeout tunnel` is often set; WebSocket applications ping well within
/// it.
pub const DEFAULT_TUNNEL_IDLE: Duration = Duration::from_secs(3600);

/// A backend as one snapshot configures it.
pub struct Slot {
    pub endpoint: Arc<Endpoint>,
    pub weight: u32,
    pub draining: bool,
    /// Most requests in flight from this data plane (0 = unlimited).
    pub max_in_flight: u32,
}

impl Slot {
    pub fn has_capacity(&self) -> bool {
        self.max_in_flight == 0 || self.endpoint.in_flight() < self.max_in_flight
    }
}

/// The configuration in force, derived from one validated snapshot.
pub struct Active {
    pub snapshot: ConfigSnapshot,
    /// Peers whose X-Forwarded-For and X-Priority are believed.
    pub trusted: Vec<IpNet>,
    pub outlier: OutlierPolicy,
    pub retry: RetryPolicy,
    pub queue: QueuePolicy,
    /// Priority of requests with no other indication: the default tier's.
    pub default_priority: u32,
    /// What ip_hash hashes.
    pub hash_source: HashSource,
    /// Rate limits, resolved for the request path.
    pub limits: Limits,
    pub slots: Vec<Slot>,
    pub balancer: Balancer,
    /// Connect, request and response-body timeouts towards backends.
    pub timeouts: crate::upstream::Timeouts,
    /// The longest a client may take to send its whole request body (`timeouts.client_body_ms`).
    pub client_body_timeout: Option<Duration>,
    /// How long one try of a request that may be sent again waits for its head.
    pub try_timeout: TryTimeout,
    /// How long an upgraded connection may carry nothing before it is closed
    /// (`timeouts.tunnel_idle_ms`).
    pub tunnel_idle: Option<Duration>,
}

/// The per-try timeout of requests that may be sent again (`timeouts.try_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryTimeout {
    /// Only the request timeout applies.
    Off,
    Fixed(Duration),
    /// [`TRY_LATENCY_FACTOR`] times the backend's average latency, at least [`MIN_TRY_TIMEOUT`].
    Derived,
}

/// A try waits this many times its backend's average latency before it gives up on it.
pub const TRY_LATENCY_FACTOR: u32 = 10;

/// The least a derived per-try timeout waits: a backend's latency is measured in microseconds
/// on a fast network, where one slow garbage collection must not count as a failure.
pub const MIN_TRY_TIMEOUT: Duration = Duration::from_secs(1);

impl TryTimeout {
    /// The timeout of a try to a backend averaging `latency`, no longer than `request`.
    pub fn of(self, latency: Duration, request: Option<Duration>) -> Option<Duration> {
        let t = match self {
            TryTimeout::Off => return request,
            TryTimeout::Fixed(t) => t,
            TryTimeout::Derived => (latency * TRY_LATENCY_FACTOR).max(MIN_TRY_TIMEOUT),
        };
        Some(request.map_or(t, |r| r.min(t)))
    }
}

/// A tier as the request path needs it.
#[derive(Debug, Clone)]
pub struct TierLimit {
    pub name: String,
    pub rate: Rate,
    pub priority: u32,
}

/// The snapshot's rate-limit policy, resolved once per snapshot.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per client IP, for requests without an API key; None = off.
    pub ip: Option<Rate>,
    pub tiers: HashMap<String, TierLimit>,
    pub default_tier: String,
    /// Keys that differ from the default, by key hash: tier (empty = default) and block.
    pub overrides: HashMap<String, (String, bool)>,
    /// Keys the control plane does not list are refused (401) rather than given the default tier.
    pub reject_unknown: bool,
    pub ban: BanRule,
    pub on_store_failure: StoreFailureMode,
}

impl Limits {
    fn from_policy(rl: &RateLimitPolicy, keys: &[lb_proto::v1::KeyOverride]) -> Limits {
        let rate = |l: &Option<lb_proto::v1::Limit>| {
            l.filter(|l| l.requests > 0).map(|l| Rate {
                requests: l.requests,
                period_ms: l.period_ms,
            })
        };
        let b = rl.ban.unwrap_or_default();
        Limits {
            ip: rate(&rl.ip_limit),
            tiers: rl
                .tiers
                .iter()
                .filter_map(|t| {
                    rate(&t.limit).map(|r| {
                        (
                            t.name.clone(),
                            TierLimit {
                                name: t.name.clone(),
                                rate: r,
                                priority: t.priority,
                            },
                        )
                    })
                })
                .collect(),
            default_tier: rl.default_tier.clone(),
            overrides: keys
                .iter()
                .map(|k| (k.key_hash.clone(), (k.tier.clone(), k.blocked)))
                .collect(),
            reject_unknown: rl.unknown_key == UnknownKeyPolicy::Reject as i32,
            ban: BanRule {
                strikes: b.strikes,
                strike_window_ms: u64::from(b.strike_window_ms),
                base_ban_ms: b.base_ban_ms,
                multiplier: b.multiplier,
                max_ban_ms: b.max_ban_ms,
                strike_decay_ms: b.strike_decay_ms,
            },
            on_store_failure: StoreFailureMode::try_from(rl.on_store_failure)
                .unwrap_or(StoreFailureMode::Local),
        }
    }

    /// The tier of a key: its override, else the default tier.
    pub fn tier_of(&self, key_hash: &str) -> Option<&TierLimit> {
        let name = self
            .overrides
            .get(key_hash)
            .map(|(t, _)| t.as_str())
            .filter(|t| !t.is_empty())
            .unwrap_or(&self.default_tier);
        self.tiers.get(name)
    }
}

/// What ip_hash hashes: the client address, or a header or cookie (falling back to the
/// address when the request has none).
#[derive(Debug, Clone)]
pub enum HashSource {
    Ip,
    Header(http::header::HeaderName),
    Cookie(String),
}

/// The backends as one pick of one request sees them.
pub struct View<'a> {
    pub active: &'a Active,
    pub now_ms: u64,
    /// Backends this request already tried (a retry goes elsewhere).
    pub tried: &'a [usize],
    /// Panic mode: when health checks and ejections leave nothing, use those backends anyway
    /// (an open circuit or a full backend still counts).
    pub ignore_health: bool,
    /// The worker thread picking (its lane of the balancer's state).
    pub worker: usize,
}

impl Candidates for View<'_> {
    fn len(&self) -> usize {
        self.active.slots.len()
    }
    fn usable(&self, i: usize) -> bool {
        let s = &self.active.slots[i];
        let e = &s.endpoint;
        !s.draining
            && !self.tried.contains(&i)
            && s.has_capacity()
            && e.circuit_open_until(self.now_ms).is_none()
            && (self.ignore_health || (e.is_healthy() && !e.is_ejected(self.now_ms)))
    }
    fn in_flight(&self, i: usize) -> u32 {
        self.active.slots[i].endpoint.in_flight()
    }
    fn latency_us(&self, i: usize) -> u64 {
        self.active.slots[i].endpoint.latency_us_at(self.now_ms)
    }
    fn failure_rate(&self, i: usize) -> f64 {
        self.active.slots[i].endpoint.failure_rate()
    }
    fn warmth(&self, i: usize) -> f64 {
        self.active.slots[i].endpoint.warmth(self.now_ms)
    }
    fn lane(&self) -> usize {
        self.worker
    }
}

/// What a data plane checks of a snapshot beyond the contract's rules, before it builds
/// anything from it.
pub fn check(snapshot: &ConfigSnapshot) -> Result<(), Invalid> {
    hash_source(snapshot).map(|_| ())
}

/// What ip_hash hashes, as the snapshot names it.
fn hash_source(snapshot: &ConfigSnapshot) -> Result<HashSource, Invalid> {
    let hash = snapshot.hash.clone().unwrap_or_default();
    Ok(match hash.source.as_str() {
        "header" => http::header::HeaderName::from_bytes(hash.name.as_bytes())
            .map(HashSource::Header)
            .map_err(|_| {
                Invalid::new(
                    "hash.name",
                    format_args!("{:?} is not a header name", hash.name),
                )
            })?,
        "cookie" => HashSource::Cookie(hash.name.clone()),
        _ => HashSource::Ip,
    })
}

impl Active {
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// Whether one more backend may be ejected now without passing the configured share.
    pub fn may_eject(&self, now: Instant) -> bool {
        let now_ms = millis(now);
        let ejected = self
            .slots
            .iter()
            .filter(|s| s.endpoint.is_ejected(now_ms))
            .count();
        ejected < outlier::max_ejected(self.slots.len(), self.outlier.max_ejection_percent)
    }

    /// Resolves a validated snapshot's policies for the request path, over `slots`, its
    /// backends in order.
    pub fn build(snapshot: ConfigSnapshot, slots: Vec<Slot>) -> Result<Active, Invalid> {
        let ids: Vec<&str> = snapshot
            .backends
            .iter()
            .map(|b| b.address.as_str())
            .collect();
        let weights: Vec<u32> = snapshot.backends.iter().map(|b| b.weight).collect();
        let balancer = Balancer::build(&snapshot.strategy, &ids, &weights);
        let timeouts = snapshot.timeouts.unwrap_or_default();
        let connect_timeout = Duration::from_millis(u64::from(timeouts.connect_ms));
        let request_timeout = (timeouts.request_ms > 0)
            .then(|| Duration::from_millis(u64::from(timeouts.request_ms)));
        let body_idle_timeout = match timeouts.body_idle_ms {
            None => request_timeout,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        };
        let try_timeout = match timeouts.try_ms {
            None => TryTimeout::Derived,
            Some(0) => TryTimeout::Off,
            Some(ms) => TryTimeout::Fixed(Duration::from_millis(u64::from(ms))),
        };
        let client_body_timeout = match timeouts.client_body_ms {
            None => Some(DEFAULT_CLIENT_BODY_TIMEOUT),
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        };
        let tunnel_idle = match timeouts.tunnel_idle_ms {
            None => Some(DEFAULT_TUNNEL_IDLE),
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        };
        let rl = snapshot.rate_limit.clone().unwrap_or_default();
        let trusted = rl
            .trusted_proxies
            .iter()
            .filter_map(|c| {
                c.parse::<IpNet>()
                    .ok()
                    .or_else(|| c.parse::<IpAddr>().ok().map(IpNet::from))
            })
            .collect();
        let default_priority = rl
            .tiers
            .iter()
            .find(|t| t.name == rl.default_tier)
            .map_or(0, |t| t.priority);
        let hash_source = hash_source(&snapshot)?;
        let limits = Limits::from_policy(&rl, &snapshot.keys);
        Ok(Active {
            limits,
            hash_source,
            trusted,
            outlier: snapshot.outlier.unwrap_or_default(),
            retry: snapshot.retry.unwrap_or_default(),
            queue: snapshot.queue.unwrap_or_default(),
            default_priority,
            snapshot,
            slots,
            balancer,
            timeouts: crate::upstream::Timeouts {
                connect: connect_timeout,
                request: request_timeout,
                body_idle: body_idle_timeout,
            },
            client_body_timeout,
            tunnel_idle,
            try_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_waits_ten_times_its_backends_latency_at_least_a_second_at_most_the_request() {
        let ms = Duration::from_millis;
        let request = Some(ms(30_000));
        assert_eq!(TryTimeout::Derived.of(ms(2), request), Some(ms(1_000)));
        assert_eq!(TryTimeout::Derived.of(ms(250), request), Some(ms(2_500)));
        assert_eq!(TryTimeout::Derived.of(ms(9_000), request), Some(ms(30_000)));
        assert_eq!(TryTimeout::Derived.of(ms(250), None), Some(ms(2_500)));
        assert_eq!(TryTimeout::Fixed(ms(300)).of(ms(1), request), Some(ms(300)));
        assert_eq!(TryTimeout::Off.of(ms(1), request), request);
        assert_eq!(TryTimeout::Off.of(ms(1), None), None);
    }
}
