//! Default policies. The rate-limit numbers are the original system's (free 5, basic 20,
//! premium 100, enterprise 1000 requests per 60 s; 100 per 60 s per IP; bans of 300 s doubling);
//! health checks every 10 s as there, with a 2 s timeout. The cache follows RFC 9111: a response
//! that states no freshness gets 10% of its age since `Last-Modified` (at most a day), or none.

use crate::v1::{
    Backend, BanPolicy, CachePolicy, CircuitBreakerPolicy, ConfigSnapshot, HashPolicy,
    HealthCheckPolicy, Limit, OutlierPolicy, QueuePolicy, RateLimitPolicy, RetryPolicy,
    StoreFailureMode, Tier, TimeoutPolicy, UnknownKeyPolicy,
};

/// Strategy used when none is configured.
pub const STRATEGY: &str = "round_robin";

/// One minute, the period of every default limit.
const MINUTE_MS: u64 = 60_000;

pub fn tiers() -> Vec<Tier> {
    [
        ("free", 5, 10),
        ("basic", 20, 20),
        ("premium", 100, 30),
        ("enterprise", 1000, 40),
    ]
    .into_iter()
    .map(|(name, requests, priority)| Tier {
        name: name.to_owned(),
        limit: Some(Limit {
            requests,
            period_ms: MINUTE_MS,
        }),
        priority,
    })
    .collect()
}

pub fn health_check() -> HealthCheckPolicy {
    HealthCheckPolicy {
        path: "/health".to_owned(),
        interval_ms: 10_000,
        timeout_ms: 2_000,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        jitter_percent: 10,
        kind: "http".to_owned(),
        grpc_service: String::new(),
    }
}

pub fn rate_limit() -> RateLimitPolicy {
    RateLimitPolicy {
        ip_limit: Some(Limit {
            requests: 100,
            period_ms: MINUTE_MS,
        }),
        tiers: tiers(),
        default_tier: "free".to_owned(),
        unknown_key: UnknownKeyPolicy::DefaultTier as i32,
        ban: Some(ban()),
        on_store_failure: StoreFailureMode::Local as i32,
        trusted_proxies: Vec::new(),
    }
}

pub fn backend() -> Backend {
    Backend {
        address: String::new(),
        weight: 1,
        draining: false,
        max_in_flight: 0,
    }
}

pub fn ban() -> BanPolicy {
    BanPolicy {
        strikes: 10,
        strike_window_ms: MINUTE_MS as u32,
        base_ban_ms: 300_000,
        multiplier: 2,
        max_ban_ms: 24 * 3600 * 1000,
        strike_decay_ms: 24 * 3600 * 1000,
    }
}

pub fn outlier() -> OutlierPolicy {
    OutlierPolicy {
        consecutive_failures: 5,
        base_ejection_ms: 30_000,
        max_ejection_ms: 300_000,
        max_ejection_percent: 50,
    }
}

pub fn circuit_breaker() -> CircuitBreakerPolicy {
    CircuitBreakerPolicy {
        failure_rate_percent: 50,
        window_ms: 10_000,
        min_requests: 20,
        open_ms: 5_000,
        half_open_trials: 3,
    }
}

pub fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        budget_percent: 20,
        min_retries_per_second: 10,
        backoff_base_ms: 25,
        backoff_max_ms: 250,
    }
}

pub fn queue() -> QueuePolicy {
    QueuePolicy {
        max_in_flight_per_backend: 0,
        capacity: 1000,
        timeout_ms: 5_000,
    }
}

/// Off unless configured: caching responses that say nothing about freshness changes what
/// clients see, so an operator opts in.
pub fn cache() -> CachePolicy {
    CachePolicy {
        enabled: false,
        default_ttl_ms: 0,
        max_entry_bytes: 1 << 20,
        memory_bytes: 64 << 20,
        ignored_query_params: vec!["api_key".to_owned()],
        max_stale_while_revalidate_ms: 60_000,
        max_stale_if_error_ms: 300_000,
        coalesce_timeout_ms: 5_000,
        heuristic_percent: 10,
        heuristic_max_ms: 86_400_000,
        targeted_field: String::new(),
    }
}

pub fn hash() -> HashPolicy {
    HashPolicy {
        source: "ip".to_owned(),
        name: String::new(),
    }
}

pub fn timeouts() -> TimeoutPolicy {
    TimeoutPolicy {
        connect_ms: 1_000,
        request_ms: 30_000,
        body_idle_ms: None,
        client_body_ms: None,
        try_ms: None,
        tunnel_idle_ms: None,
    }
}

/// A complete snapshot with no backends and every policy at its default; version 0 (unset).
pub fn snapshot() -> ConfigSnapshot {
    ConfigSnapshot {
        version: 0,
        strategy: STRATEGY.to_owned(),
        backends: Vec::new(),
        health_check: Some(health_check()),
        outlier: Some(outlier()),
        circuit_breaker: Some(circuit_breaker()),
        retry: Some(retry()),
        queue: Some(queue()),
        rate_limit: Some(rate_limit()),
        keys: Vec::new(),
        cache: Some(cache()),
        hash: Some(hash()),
        timeouts: Some(timeouts()),
        directives: Vec::new(),
        created_at_ms: 0,
    }
}
