//! Rules every configuration snapshot obeys, checked by the control plane before it commits a
//! change and by each data plane on receipt. Every error names the offending field, so an
//! operator reading a NACK or an `InvalidArgument` knows what to fix.

use std::collections::HashSet;
use std::fmt;

use crate::v1::{
    Backend, ConfigSnapshot, HealthCheckPolicy, Limit, StoreFailureMode, Tier, UnknownKeyPolicy,
};

/// Every balancing strategy, in the order they are documented.
pub const STRATEGIES: &[&str] = &[
    "round_robin",
    "least_connections",
    "weighted_round_robin",
    "ip_hash",
    "least_response_time",
    "adaptive",
];

/// Highest backend weight; keeps weighted arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 10_000;

/// Most backends in one snapshot; a bound on what one push can make a data plane allocate.
pub const MAX_BACKENDS: usize = 10_000;

/// A snapshot (or a change to one) that breaks a rule: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Invalid {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

fn check(ok: bool, field: &str, message: impl fmt::Display) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(field, message))
    }
}

fn required<'a, T>(v: &'a Option<T>, field: &str) -> Result<&'a T, Invalid> {
    v.as_ref().ok_or_else(|| Invalid::new(field, "missing"))
}

/// A strategy name, with the valid ones listed when it is unknown.
pub fn strategy(name: &str) -> Result<(), Invalid> {
    check(
        STRATEGIES.contains(&name),
        "strategy",
        format_args!(
            "unknown strategy {name:?}; valid strategies: {}",
            STRATEGIES.join(", ")
        ),
    )
}

/// How a data plane speaks to a backend: the scheme of its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendProtocol {
    /// `http://` or no scheme: HTTP/1.1 over pooled connections.
    Http1,
    /// `h2c://`: HTTP/2 in clear text, with prior knowledge.
    H2c,
    /// `https://`: TLS, with HTTP/2 or HTTP/1.1 as ALPN settles.
    Https,
}

/// The schemes a backend address may carry.
pub const BACKEND_SCHEMES: [&str; 3] = ["http", "h2c", "https"];

/// A backend address `[scheme://]host:port` split: its protocol (unknown schemes read as
/// HTTP/1.1; [`backend_address`] refuses them) and its `host:port`.
pub fn backend_target(address: &str) -> (BackendProtocol, &str) {
    match address.split_once("://") {
        Some(("h2c", rest)) => (BackendProtocol::H2c, rest),
        Some(("https", rest)) => (BackendProtocol::Https, rest),
        Some((_, rest)) => (BackendProtocol::Http1, rest),
        None => (BackendProtocol::Http1, address),
    }
}

/// `[scheme://]host:port`: a scheme of [`BACKEND_SCHEMES`] (`http` when none), an IPv4 address,
/// a bracketed IPv6 address or a DNS name, and a port 1-65535.
pub fn backend_address(address: &str) -> Result<(), Invalid> {
    let bad = |why: &str| {
        Invalid::new(
            "backend.address",
            format_args!("{address:?} is not [scheme://]host:port ({why})"),
        )
    };
    if let Some((scheme, _)) = address.split_once("://")
        && !BACKEND_SCHEMES.contains(&scheme)
    {
        return Err(bad(&format!(
            "unknown scheme {scheme:?}; valid: {}",
            BACKEND_SCHEMES.join(", ")
        )));
    }
    let (_, target) = backend_target(address);
    let (host, port) = target.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| bad("bad IPv6 address"));
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad("bad host name"));
    }
    // All-numeric dotted names that failed IPv4 parsing are typos, not host names.
    if host
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad("bad IPv4 address"));
    }
    Ok(())
}

/// A backend weight: 1 to [`MAX_WEIGHT`].
pub fn weight(w: u32) -> Result<(), Invalid> {
    check(
        (1..=MAX_WEIGHT).contains(&w),
        "backend.weight",
        format_args!("{w} is out of range; weights are 1 to {MAX_WEIGHT}"),
    )
}

pub fn backends(list: &[Backend]) -> Result<(), Invalid> {
    check(
        list.len() <= MAX_BACKENDS,
        "backends",
        format_args!("{} backends; at most {MAX_BACKENDS}", list.len()),
    )?;
    let mut seen = HashSet::with_capacity(list.len());
    for b in list {
        backend_address(&b.address)?;
        weight(b.weight)
            .map_err(|e| Invalid::new(format!("backend {}.weight", b.address), e.message))?;
        // One backend, one protocol: `h2c://a:1` beside `a:1` is a mistake, not two backends.
        check(
            seen.insert(backend_target(&b.address).1),
            "backends",
            format_args!("duplicate backend {}", b.address),
        )?;
    }
    Ok(())
}

/// A limit of `requests` per `period_ms`; 0 requests turns it off.
pub fn limit(l: &Limit, field: &str) -> Result<(), Invalid> {
    if l.requests == 0 {
        return Ok(());
    }
    check(
        l.period_ms >= 1 && l.period_ms <= 365 * 24 * 3600 * 1000,
        &format!("{field}.period_ms"),
        format_args!("{} is out of range (1 ms to 1 year)", l.period_ms),
    )?;
    check(
        l.requests <= 1_000_000_000,
        &format!("{field}.requests"),
        format_args!("{} is more than 1000000000", l.requests),
    )
}

/// Tier names: 1-32 of lower-case letters, digits, '-' and '_'.
pub fn tier_name(name: &str) -> Result<(), Invalid> {
    check(
        !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
        "tier.name",
        format_args!("{name:?} is not a tier name (1-32 of a-z, 0-9, '-', '_')"),
    )
}

pub fn tier(t: &Tier) -> Result<(), Invalid> {
    tier_name(&t.name)?;
    let l = required(&t.limit, &format!("tier {}.limit", t.name))?;
    check(
        l.requests > 0,
        &format!("tier {}.limit.requests", t.name),
        "must be at least 1",
    )?;
    limit(l, &format!("tier {}.limit", t.name))
}

/// The kind of probe, and what it needs: a gRPC probe asks over HTTP/2, so every backend must
/// be named `h2c://` or `https://`.
fn health_check_kind(hc: &HealthCheckPolicy, backends: &[Backend]) -> Result<(), Invalid> {
    match hc.kind.as_str() {
        "" | "http" => Ok(()),
        "grpc" => {
            check(
                hc.grpc_service.len() <= 256
                    && !hc.grpc_service.bytes().any(|b| b < b' ' || b == 0x7f),
                "health_check.grpc_service",
                "must be at most 256 bytes, without control characters",
            )?;
            match backends
                .iter()
                .find(|b| backend_target(&b.address).0 == BackendProtocol::Http1)
            {
                Some(b) => Err(Invalid::new(
                    "health_check.kind",
                    format_args!(
                        "\"grpc\" probes need HTTP/2, but backend {} is HTTP/1.1 (name it \
                         h2c:// or https://)",
                        b.address
                    ),
                )),
                None => Ok(()),
            }
        }
        other => Err(Invalid::new(
            "health_check.kind",
            format_args!("{other:?} is not a kind of probe (http or grpc)"),
        )),
    }
}

/// The whole snapshot.
pub fn snapshot(s: &ConfigSnapshot) -> Result<(), Invalid> {
    check(s.version > 0, "version", "must be above 0")?;
    strategy(&s.strategy)?;
    backends(&s.backends)?;

    let hc = required(&s.health_check, "health_check")?;
    health_check_kind(hc, &s.backends)?;
    check(
        hc.kind == "grpc"
            || hc.path.starts_with('/')
                && hc.path.len() <= 1024
                && !hc.path.bytes().any(|b| b <= b' ' || b == 0x7f),
        "health_check.path",
        format_args!(
            "{:?} must start with '/' and contain no spaces or control characters",
            hc.path
        ),
    )?;
    check(
        (1_000..=3_600_000).contains(&hc.interval_ms),
        "health_check.interval_ms",
        format_args!("{} is out of range (1000 to 3600000)", hc.interval_ms),
    )?;
    check(
        hc.timeout_ms >= 1 && hc.timeout_ms < hc.interval_ms,
        "health_check.timeout_ms",
        format_args!("{} must be at least 1 and below interval_ms", hc.timeout_ms),
    )?;
    for (v, f) in [
        (hc.healthy_threshold, "health_check.healthy_threshold"),
        (hc.unhealthy_threshold, "health_check.unhealthy_threshold"),
    ] {
        check(
            (1..=100).contains(&v),
            f,
            format_args!("{v} is out of range (1 to 100)"),
        )?;
    }
    check(
        hc.jitter_percent <= 50,
        "health_check.jitter_percent",
        format_args!("{} is above 50", hc.jitter_percent),
    )?;

    let o = required(&s.outlier, "outlier")?;
    check(
        o.max_ejection_percent <= 100,
        "outlier.max_ejection_percent",
        format_args!("{} is above 100", o.max_ejection_percent),
    )?;
    check(
        o.consecutive_failures == 0
            || (o.base_ejection_ms >= 1 && o.max_ejection_ms >= o.base_ejection_ms),
        "outlier.max_ejection_ms",
        "must be at least base_ejection_ms, which must be at least 1",
    )?;

    let cb = required(&s.circuit_breaker, "circuit_breaker")?;
    check(
        cb.failure_rate_percent <= 100,
        "circuit_breaker.failure_rate_percent",
        format_args!("{} is above 100", cb.failure_rate_percent),
    )?;
    if cb.failure_rate_percent > 0 {
        check(
            cb.window_ms >= 100,
            "circuit_breaker.window_ms",
            "must be at least 100",
        )?;
        check(
            cb.open_ms >= 1,
            "circuit_breaker.open_ms",
            "must be at least 1",
        )?;
        check(
            cb.half_open_trials >= 1,
            "circuit_breaker.half_open_trials",
            "must be at least 1",
        )?;
    }

    let r = required(&s.retry, "retry")?;
    check(
        (1..=5).contains(&r.max_attempts),
        "retry.max_attempts",
        format_args!("{} is out of range (1 to 5)", r.max_attempts),
    )?;
    check(
        r.budget_percent <= 100,
        "retry.budget_percent",
        format_args!("{} is above 100", r.budget_percent),
    )?;
    check(
        r.backoff_max_ms >= r.backoff_base_ms,
        "retry.backoff_max_ms",
        "must be at least backoff_base_ms",
    )?;

    let q = required(&s.queue, "queue")?;
    check(q.timeout_ms >= 1, "queue.timeout_ms", "must be at least 1")?;
    check(
        q.capacity <= 1_000_000,
        "queue.capacity",
        format_args!("{} is above 1000000", q.capacity),
    )?;

    let rl = required(&s.rate_limit, "rate_limit")?;
    limit(
        required(&rl.ip_limit, "rate_limit.ip_limit")?,
        "rate_limit.ip_limit",
    )?;
    let mut names = HashSet::new();
    for t in &rl.tiers {
        tier(t)?;
        check(
            names.insert(t.name.as_str()),
            "rate_limit.tiers",
            format_args!("duplicate tier {}", t.name),
        )?;
    }
    check(
        names.contains(rl.default_tier.as_str()),
        "rate_limit.default_tier",
        format_args!("{:?} is not a configured tier", rl.default_tier),
    )?;
    check(
        StoreFailureMode::try_from(rl.on_store_failure).is_ok(),
        "rate_limit.on_store_failure",
        format_args!(
            "{} is not a failure mode; valid: local, open, closed",
            rl.on_store_failure
        ),
    )?;
    check(
        UnknownKeyPolicy::try_from(rl.unknown_key).is_ok(),
        "rate_limit.unknown_key",
        format_args!(
            "{} is not an unknown-key policy; valid: default_tier, reject",
            rl.unknown_key
        ),
    )?;
    for cidr in &rl.trusted_proxies {
        check(
            parse_cidr(cidr),
            "rate_limit.trusted_proxies",
            format_args!("{cidr:?} is not an address or CIDR range"),
        )?;
    }
    let ban = required(&rl.ban, "rate_limit.ban")?;
    if ban.strikes > 0 {
        check(
            ban.strike_window_ms >= 1,
            "rate_limit.ban.strike_window_ms",
            "must be at least 1",
        )?;
        check(
            ban.base_ban_ms >= 1,
            "rate_limit.ban.base_ban_ms",
            "must be at least 1",
        )?;
        check(
            ban.multiplier >= 1,
            "rate_limit.ban.multiplier",
            "must be at least 1",
        )?;
        check(
            ban.max_ban_ms >= ban.base_ban_ms,
            "rate_limit.ban.max_ban_ms",
            "must be at least base_ban_ms",
        )?;
    }
    for k in &s.keys {
        check(
            k.key_hash.len() == 64
                && k.key_hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "keys.key_hash",
            format_args!("{:?} is not a lower-case hex SHA-256", k.key_hash),
        )?;
        check(
            k.tier.is_empty() || names.contains(k.tier.as_str()),
            "keys.tier",
            format_args!("{:?} is not a configured tier", k.tier),
        )?;
    }

    let c = required(&s.cache, "cache")?;
    if c.enabled {
        check(
            c.heuristic_percent <= 100,
            "cache.heuristic_percent",
            "must be at most 100",
        )?;
        let field = c.targeted_field.as_str();
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        check(
            field.is_empty()
                || (field.len() <= 64
                    && field.bytes().all(tchar)
                    && !field.eq_ignore_ascii_case("cache-control")),
            "cache.targeted_field",
            format_args!("{field:?} is not a field name of its own (e.g. \"lb-cache-control\")"),
        )?;
        check(
            c.memory_bytes >= c.max_entry_bytes,
            "cache.memory_bytes",
            "must be at least max_entry_bytes",
        )?;
    }
    let h = required(&s.hash, "hash")?;
    match h.source.as_str() {
        "" | "ip" => {}
        "header" | "cookie" => check(
            !h.name.is_empty()
                && h.name.len() <= 256
                && h.name.bytes().all(|b| b.is_ascii_graphic()),
            "hash.name",
            "a header or cookie name is needed",
        )?,
        other => {
            return Err(Invalid::new(
                "hash.source",
                format_args!("{other:?}; valid: ip, header, cookie"),
            ));
        }
    }
    let t = required(&s.timeouts, "timeouts")?;
    check(
        t.connect_ms >= 1,
        "timeouts.connect_ms",
        "must be at least 1",
    )?;
    Ok(())
}

/// True when `s` is an IP address or an address/prefix range.
pub fn parse_cidr(s: &str) -> bool {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defaults;

    fn valid() -> ConfigSnapshot {
        let mut s = defaults::snapshot();
        s.version = 1;
        s.backends = vec![Backend {
            address: "127.0.0.1:5001".into(),
            weight: 1,
            ..Default::default()
        }];
        s
    }

    #[test]
    fn defaults_are_valid() {
        snapshot(&valid()).unwrap();
    }

    #[test]
    fn cache_settings_are_checked_when_the_cache_is_on() {
        let with = |f: &dyn Fn(&mut crate::v1::CachePolicy)| {
            let mut s = valid();
            let c = s.cache.as_mut().unwrap();
            c.enabled = true;
            f(c);
            snapshot(&s)
        };
        // No freshness of its own for silent responses is the default, and valid.
        with(&|c| c.default_ttl_ms = 0).unwrap();
        with(&|c| c.targeted_field = "lb-cache-control".into()).unwrap();
        let e = with(&|c| c.heuristic_percent = 101).unwrap_err();
        assert_eq!(e.field, "cache.heuristic_percent");
        for bad in ["cache-control", "Cache-Control", "two words", "a:b"] {
            let e = with(&|c| c.targeted_field = bad.into()).unwrap_err();
            assert_eq!(e.field, "cache.targeted_field", "{bad}");
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:80",
            "[::1]:8080",
            "backend-1.internal:5001",
            "localhost:1",
            "http://127.0.0.1:80",
            "h2c://grpc.internal:50051",
            "https://[::1]:443",
        ] {
            backend_address(ok).unwrap();
        }
        assert_eq!(backend_target("h2c://a:1"), (BackendProtocol::H2c, "a:1"));
        assert_eq!(backend_target("a:1"), (BackendProtocol::Http1, "a:1"));
        for bad in [
            "127.0.0.1",
            "host:0",
            "host:99999",
            ":80",
            "300.1.1.1:80",
            "a b:80",
            "[::1:80",
            "-x:80",
            "grpc://a:1",
            "h2c://a:1/path",
            "h2c://",
        ] {
            let e = backend_address(bad).unwrap_err();
            assert_eq!(e.field, "backend.address", "{bad}");
        }
    }

    #[test]
    fn unknown_failure_modes_and_key_policies_are_refused_by_name() {
        let mut s = valid();
        s.rate_limit.as_mut().unwrap().on_store_failure = 7;
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.field, "rate_limit.on_store_failure");
        assert!(e.to_string().contains("valid: local, open, closed"), "{e}");
        let mut s = valid();
        s.rate_limit.as_mut().unwrap().unknown_key = -1;
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.field, "rate_limit.unknown_key");
    }

    #[test]
    fn unknown_strategy_lists_valid_ones() {
        let e = strategy("fastest").unwrap_err();
        assert!(
            e.to_string().contains("round_robin, least_connections"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_and_zero_weight_backends_are_refused() {
        let mut s = valid();
        s.backends.push(s.backends[0].clone());
        assert!(
            snapshot(&s)
                .unwrap_err()
                .message
                .contains("duplicate backend")
        );
        let mut s = valid();
        s.backends[0].weight = 0;
        assert!(snapshot(&s).unwrap_err().field.contains("weight"));
    }

    #[test]
    fn grpc_probes_need_http2_backends() {
        let mut s = valid();
        let hc = s.health_check.as_mut().unwrap();
        hc.kind = "tcp".into();
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.field, "health_check.kind");
        assert!(e.message.contains("\"tcp\""), "{e}");

        s.health_check.as_mut().unwrap().kind = "grpc".into();
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.field, "health_check.kind");
        assert!(e.message.contains(&s.backends[0].address), "{e}");
        for b in &mut s.backends {
            b.address = format!("h2c://{}", b.address);
        }
        // A gRPC probe has no path.
        s.health_check.as_mut().unwrap().path = String::new();
        snapshot(&s).unwrap();
        s.health_check.as_mut().unwrap().grpc_service = "a\nb".into();
        assert_eq!(snapshot(&s).unwrap_err().field, "health_check.grpc_service");
    }

    #[test]
    fn fields_are_named() {
        let mut s = valid();
        s.health_check.as_mut().unwrap().path = "health".into();
        assert_eq!(snapshot(&s).unwrap_err().field, "health_check.path");
        let mut s = valid();
        s.queue.as_mut().unwrap().timeout_ms = 0;
        assert_eq!(snapshot(&s).unwrap_err().field, "queue.timeout_ms");
        let mut s = valid();
        s.rate_limit.as_mut().unwrap().default_tier = "gold".into();
        assert_eq!(snapshot(&s).unwrap_err().field, "rate_limit.default_tier");
        let mut s = valid();
        s.version = 0;
        assert_eq!(snapshot(&s).unwrap_err().field, "version");
    }

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.0.0.0/8"));
        assert!(parse_cidr("::1"));
        assert!(!parse_cidr("10.0.0.0/33"));
        assert!(!parse_cidr("nonsense"));
    }
}
