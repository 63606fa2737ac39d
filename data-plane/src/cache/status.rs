//! `Cache-Status` (RFC 9211): what the cache did with a request, on every response that passed
//! through it, under the cache name `lb`. `X-Cache` stays beside it for the clients that read
//! that.
//!
//! - `lb; hit; ttl=N`: served from the cache; `ttl` is the freshness left in seconds, negative
//!   for a stale entry served within `stale-while-revalidate`.
//! - `lb; fwd=uri-miss; stored`: nothing stored; the response went into the cache (`stored`
//!   is left out when it did not, and `detail` says why not).
//! - `lb; fwd=vary-miss; stored`: other variants of the resource are stored, none that this
//!   request selects (its `Vary` headers differ).
//! - `lb; fwd=uri-miss; collapsed`: served the response of a concurrent request for the same
//!   resource, which this one waited for.
//! - `lb; fwd=stale; fwd-status=304; ttl=N`: a stored response was revalidated; the backend's
//!   answer is `fwd-status`.
//! - `lb; fwd=request`: the request asked not to use the cache (`no-store`).
//! - `lb; fwd=method`: a method the cache does not serve (an unsafe one invalidates what is
//!   stored for its target).
//! - `lb; fwd=bypass; detail=…`: the cache was not used for another reason.

use std::fmt::Write as _;

use http::header::{HeaderName, HeaderValue};

/// The field's name.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Why the request went forward (RFC 9211 section 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    UriMiss,
    VaryMiss,
    Stale,
    Request,
    Method,
    Bypass,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Stale => "stale",
            Fwd::Request => "request",
            Fwd::Method => "method",
            Fwd::Bypass => "bypass",
        }
    }
}

/// A hit with `ttl_s` seconds of freshness left.
pub fn hit(ttl_s: i64) -> HeaderValue {
    let mut s = String::with_capacity(24);
    let _ = write!(s, "lb; hit; ttl={ttl_s}");
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("lb; hit"))
}

/// A request that went forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub fwd: Fwd,
    /// The backend's status, when it is not the one the client gets.
    pub fwd_status: Option<u16>,
    pub stored: bool,
    pub collapsed: bool,
    pub ttl_s: Option<i64>,
    /// A token saying why (the not-stored reason, the bypass).
    pub detail: Option<&'static str>,
}

impl Forward {
    pub fn new(fwd: Fwd) -> Forward {
        Forward {
            fwd,
            fwd_status: None,
            stored: false,
            collapsed: false,
            ttl_s: None,
            detail: None,
        }
    }

    pub fn value(&self) -> HeaderValue {
        let mut s = String::with_capacity(48);
        let _ = write!(s, "lb; fwd={}", self.fwd.as_str());
        if let Some(st) = self.fwd_status {
            let _ = write!(s, "; fwd-status={st}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(t) = self.ttl_s {
            let _ = write!(s, "; ttl={t}");
        }
        if let Some(d) = self.detail {
            let _ = write!(s, "; detail={d}");
        }
        HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("lb"))
    }
}

/// Seconds of freshness left at `now_ms` for an entry fresh until `fresh_until_ms`; negative
/// once stale.
pub fn ttl_s(fresh_until_ms: u64, now_ms: u64) -> i64 {
    let left = i128::from(fresh_until_ms) - i128::from(now_ms);
    i64::try_from(left / 1000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_rfc_9211_syntax() {
        assert_eq!(hit(42), "lb; hit; ttl=42");
        assert_eq!(hit(-3), "lb; hit; ttl=-3");
        let mut f = Forward::new(Fwd::UriMiss);
        f.stored = true;
        assert_eq!(f.value(), "lb; fwd=uri-miss; stored");
        let f = Forward {
            fwd_status: Some(304),
            ttl_s: Some(60),
            ..Forward::new(Fwd::Stale)
        };
        assert_eq!(f.value(), "lb; fwd=stale; fwd-status=304; ttl=60");
        let f = Forward {
            detail: Some("no-store"),
            ..Forward::new(Fwd::UriMiss)
        };
        assert_eq!(f.value(), "lb; fwd=uri-miss; detail=no-store");
        assert_eq!(ttl_s(10_500, 1_000), 9);
        assert_eq!(ttl_s(1_000, 4_000), -3);
        assert_eq!(ttl_s(u64::MAX, 0), 18_446_744_073_709_551);
    }
}
