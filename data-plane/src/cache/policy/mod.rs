//! Cache freshness policy (RFC 9111 for a shared cache, RFC 5861 stale extensions): which
//! requests may use the cache, which responses may be stored and for how long. Plain
//! synchronous code with the clock passed in as unix milliseconds; it never reads a clock and
//! never panics, whatever the headers hold.
//!
//! Choices made where the RFCs leave room, or where this cache is deliberately stricter (the
//! whole list, rule by rule, is in `docs/cache.md`):
//! - Only `no-store` in a request's `Cache-Control` is honoured. Request `no-cache`, `max-age`,
//!   `min-fresh` and `max-stale` are ignored, so a client cannot force every request through to
//!   the backends the cache protects.
//! - Requests with `Range`, `Upgrade` (WebSocket) or conditional headers on a miss are passed
//!   through: 206 is not stored, an upgrade is not a cacheable exchange, and a 304 from a
//!   backend carries no body to store. A conditional request on a hit gets a 304 when its
//!   validators match ([`not_modified`]).
//! - Freshness is explicit (`s-maxage`, `max-age`, `Expires`), else heuristic from
//!   `Last-Modified` (the policy's percentage, capped), else none unless the operator set
//!   `default_ttl_ms` (a non-conforming override, off by default). A response with no
//!   freshness is stored only when it has a validator, to be revalidated on each use.
//! - Unqualified `no-cache` means "revalidate before each use": stored only with a validator,
//!   stale at once, no stale windows. Qualified `no-cache="f"` and `private="f"` store the
//!   response without the fields named ([`Storable::strip`]); unqualified `private` and
//!   `Vary: *` are not stored.
//! - A response carrying `Set-Cookie` is never stored, even when `public` (handing one
//!   client's cookie to every other client is worse than a miss; nginx and Varnish default to
//!   the same), unless `private` or `no-cache` names the field, which is then left out.
//! - A response to a request with `Authorization` or `Cookie` is stored only when the backend
//!   allowed it explicitly: `public`, `s-maxage` or `must-revalidate` (RFC 9111 section 3.5),
//!   and only such entries are served to later requests with credentials. `X-API-Key` (like
//!   an `api_key` query parameter) is not a credential here: it meters a client rather than
//!   changing what it sees, and the default configuration leaves `api_key` out of keys too.
//! - Server errors other than 501 are never stored, even with explicit freshness:
//!   `stale-if-error` is the way to answer for a failing backend.
//! - `s-maxage` implies `proxy-revalidate`, but an explicit `stale-while-revalidate` or
//!   `stale-if-error` next to it is taken as the backend's intent and honoured; an explicit
//!   `must-revalidate` or `proxy-revalidate` turns both stale windows off.
//! - Delta-seconds: a `max-age` or `s-maxage` that is not all digits (quotes allowed) makes the
//!   response stale at once (RFC 9111 section 4.2.1); one too large for any integer counts as
//!   2^31 s (section 1.2.2); every lifetime is capped at [`MAX_LIFETIME_MS`]. When a
//!   directive repeats, its first occurrence decides. Disagreeing `Expires` lines, like an
//!   invalid one, mean already expired.
//! - `CDN-Cache-Control` (RFC 9213), when it holds a directive, replaces `Cache-Control` for
//!   every decision here ([`response_cache_control`]).
//! - Every list read from a header is bounded ([`MAX_FIELD_NAMES`] names), so hostile
//!   headers cost bounded work.

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

use super::Policy;

mod fields;
pub use fields::{
    CDN_CACHE_CONTROL, CacheControl, cache_control, http_date, response_cache_control,
};
use fields::{MAX_FIELD_NAMES, delta_seconds, split_elements, trim};

/// Longest lifetime given to anything: a year. Larger values are almost always mistakes
/// (`max-age=999999999999`), and a bound keeps the arithmetic far from overflow.
pub const MAX_LIFETIME_MS: u64 = 365 * 24 * 3600 * 1000;

/// Why a request does not use the cache at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Caching is turned off in the configuration.
    Disabled,
    /// Only GET and HEAD are cached.
    Method,
    /// The request said `Cache-Control: no-store`.
    NoStore,
    /// A range request: partial content is not cached.
    Range,
    /// A protocol upgrade (WebSocket).
    Upgrade,
    /// Path and query together are longer than [`super::key::MAX_KEY_BYTES`].
    KeyTooLong,
}

impl Bypass {
    /// A label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Disabled => "disabled",
            Bypass::Method => "method",
            Bypass::NoStore => "no_store",
            Bypass::Range => "range",
            Bypass::Upgrade => "upgrade",
            Bypass::KeyTooLong => "key_too_long",
        }
    }
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Not in the heuristically cacheable set (206 deliberately left out).
    Status,
    NoStore,
    NoCache,
    Private,
    /// `Vary: *`: no request could ever match it.
    VaryStar,
    SetCookie,
    /// The request had credentials and the response did not allow sharing it.
    Credentials,
    /// Its freshness and stale windows are all over already.
    Expired,
    /// The body exceeds the policy's `max_entry_bytes`.
    TooLarge,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Status => "status",
            NotStored::NoStore => "no_store",
            NotStored::NoCache => "no_cache",
            NotStored::Private => "private",
            NotStored::VaryStar => "vary_star",
            NotStored::SetCookie => "set_cookie",
            NotStored::Credentials => "credentials",
            NotStored::Expired => "expired",
            NotStored::TooLarge => "too_large",
        }
    }

    /// True when the reason lies in the response alone, so the next request for the same
    /// resource will very likely be refused the same way.
    pub fn is_intrinsic(self) -> bool {
        !matches!(self, NotStored::Credentials)
    }
}

/// Until when a stored response may be used, in unix ms. Both stale windows start where
/// freshness ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freshness {
    pub fresh_until_ms: u64,
    pub stale_while_revalidate_until_ms: u64,
    pub stale_if_error_until_ms: u64,
    /// Until when it is kept at all: the end of its windows, or, when it has a validator,
    /// [`VALIDATION_KEEP_MS`] later, to be revalidated instead of fetched whole.
    pub keep_until_ms: u64,
}

/// What a stored response is good for at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Serve it.
    Fresh,
    /// Serve it, and refresh it in the background.
    StaleRevalidate,
    /// Serve it only when the backend fails.
    StaleIfError,
    /// Useless.
    Expired,
}

impl Freshness {
    pub fn state(&self, now_ms: u64) -> State {
        if now_ms < self.fresh_until_ms {
            State::Fresh
        } else if now_ms < self.stale_while_revalidate_until_ms {
            State::StaleRevalidate
        } else if now_ms < self.stale_if_error_until_ms {
            State::StaleIfError
        } else {
            State::Expired
        }
    }

    /// The end of its last window: past it, it serves no request without validation.
    pub fn windows_end_ms(&self) -> u64 {
        self.fresh_until_ms
            .max(self.stale_while_revalidate_until_ms)
            .max(self.stale_if_error_until_ms)
    }

    /// When the entry leaves the stores.
    pub fn expires_at_ms(&self) -> u64 {
        self.keep_until_ms.max(self.windows_end_ms())
    }
}

/// True when the request carries credentials that may make a response personal.
pub fn has_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION) || headers.contains_key(header::COOKIE)
}

/// True for a conditional request, which on a miss is passed through (see the module header).
pub fn is_conditional(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_NONE_MATCH) || headers.contains_key(header::IF_MODIFIED_SINCE)
}

/// Whether a request may use the cache at all. Credentials do not bypass: the caller passes
/// [`has_credentials`] on, and such a request is served only entries stored as public.
pub fn request_bypass(method: &Method, headers: &HeaderMap) -> Option<Bypass> {
    if method != Method::GET && method != Method::HEAD {
        return Some(Bypass::Method);
    }
    if headers.contains_key(header::UPGRADE) {
        return Some(Bypass::Upgrade);
    }
    if headers.contains_key(header::RANGE) {
        return Some(Bypass::Range);
    }
    if cache_control(headers).no_store {
        return Some(Bypass::NoStore);
    }
    None
}

/// The statuses RFC 9110 section 15.1 calls heuristically cacheable, less 206 (partial
/// content passes through, see the module header).
pub fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses that may be stored when the response gives explicit freshness: every final
/// status but 206 (passed through), 304 (no representation to store; it updates one, see
/// [`updated_headers`]) and server errors other than 501 (a failure is never what a later
/// client should get in place of a retry; `stale-if-error` covers them).
fn storable_status(status: StatusCode) -> bool {
    let s = status.as_u16();
    (200..500).contains(&s) && s != 206 && s != 304 || s == 501
}

/// The names a response varies on, lower-cased, sorted and deduplicated; `Err` for `Vary: *`.
/// A name that is not a valid header name cannot match any request header and is dropped.
pub fn vary(headers: &HeaderMap) -> Result<Vec<HeaderName>, NotStored> {
    let mut names = Vec::new();
    for line in headers.get_all(header::VARY) {
        for n in line.as_bytes().split(|&b| b == b',') {
            let n = trim(n);
            if n == b"*" {
                return Err(NotStored::VaryStar);
            }
            if names.len() < MAX_FIELD_NAMES
                && let Ok(name) = HeaderName::from_bytes(n)
            {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Ok(names)
}

/// What a storable response gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storable {
    pub freshness: Freshness,
    /// May be served to requests with credentials.
    pub public: bool,
    /// See [`vary`].
    pub vary: Vec<HeaderName>,
    /// Its age when it arrived (RFC 9111 section 4.2.3 `corrected_initial_age`), in ms.
    pub initial_age_ms: u64,
    /// Fields left out of the stored response (`private="…"`, `no-cache="…"`).
    pub strip: Vec<HeaderName>,
}

/// How long a stale response with a validator is kept past its last window, to be
/// revalidated with a conditional request rather than fetched whole (nginx's `inactive`
/// default is the same ten minutes).
pub const VALIDATION_KEEP_MS: u64 = 10 * 60 * 1000;

/// The `Age` a response arrived with: the first member of the first line, in seconds; an
/// invalid value is ignored (RFC 9111 section 5.1).
pub fn age_value(headers: &HeaderMap) -> u64 {
    headers
        .get(header::AGE)
        .and_then(|v| v.as_bytes().split(|&b| b == b',').next())
        .and_then(|v| delta_seconds(trim(v)))
        .unwrap_or(0)
}

/// RFC 9111 section 4.2.3: the age of a response when it arrived at `response_ms`, for a
/// request sent at `request_ms`, in ms, capped at [`MAX_LIFETIME_MS`].
pub fn initial_age_ms(headers: &HeaderMap, request_ms: u64, response_ms: u64) -> u64 {
    let date = headers.get(header::DATE).and_then(http_date);
    let apparent = date.map_or(0, |d| response_ms.saturating_sub(d));
    let delay = response_ms.saturating_sub(request_ms);
    let corrected = age_value(headers).saturating_mul(1000).saturating_add(delay);
    apparent.max(corrected).min(MAX_LIFETIME_MS)
}

/// The freshness lifetime a response states (RFC 9111 section 4.2.1), in ms: `s-maxage`,
/// `max-age`, else `Expires` less `Date`. `None` when it states none. Several `Expires`
/// lines that disagree, like an invalid one, mean already expired.
fn explicit_lifetime_ms(cc: &CacheControl, headers: &HeaderMap, response_ms: u64) -> Option<u64> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(s.saturating_mul(1000));
    }
    let mut lines = headers.get_all(header::EXPIRES).iter();
    let first = lines.next()?;
    if lines.any(|l| l != first) {
        return Some(0);
    }
    let expires = http_date(first).unwrap_or(0);
    let date = headers.get(header::DATE).and_then(http_date);
    Some(expires.saturating_sub(date.unwrap_or(response_ms)))
}

/// Heuristic freshness (RFC 9111 section 4.2.2): the policy's fraction of the time since
/// `Last-Modified` (as of `Date`, else arrival), capped by `heuristic_max_ms`; 0 without a
/// valid `Last-Modified`.
fn heuristic_lifetime_ms(headers: &HeaderMap, policy: &Policy, response_ms: u64) -> u64 {
    let Some(modified) = headers.get(header::LAST_MODIFIED).and_then(http_date) else {
        return 0;
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_ms);
    let since = date.saturating_sub(modified).min(MAX_LIFETIME_MS);
    (since / 100)
        .saturating_mul(u64::from(policy.heuristic_percent.min(100)))
        .min(policy.heuristic_max_ms)
}

/// True when a stored response can be validated: it has an `ETag` or a `Last-Modified`.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Decides whether a response may be stored and for how long, at `now_ms` (its arrival),
/// for a request sent at the same instant. See [`storable_exchange`].
#[cfg(any(test, feature = "internals"))]
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    req_has_credentials: bool,
    policy: &Policy,
    now_ms: u64,
) -> Result<Storable, NotStored> {
    storable_exchange(
        status,
        headers,
        req_has_credentials,
        policy,
        now_ms,
        now_ms,
    )
}

/// Decides whether a response that arrived at `response_ms`, for a request sent at
/// `request_ms`, may be stored (RFC 9111 section 3) and for how long (section 4.2).
pub fn storable_exchange(
    status: StatusCode,
    headers: &HeaderMap,
    req_has_credentials: bool,
    policy: &Policy,
    request_ms: u64,
    response_ms: u64,
) -> Result<Storable, NotStored> {
    if !storable_status(status) {
        return Err(NotStored::Status);
    }
    let own = policy.targeted_field.as_ref();
    let cc = response_cache_control(headers, own);
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    let vary = vary(headers)?;
    let mut strip = cc.private_fields.clone();
    strip.extend(cc.no_cache_fields.iter().cloned());
    // The operator's targeted field is for this cache alone: never stored, never served.
    strip.extend(own.filter(|n| headers.contains_key(*n)).cloned());
    if headers.contains_key(header::SET_COOKIE) && !strip.contains(&header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let public = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    if req_has_credentials && !public {
        return Err(NotStored::Credentials);
    }
    let validator = has_validator(headers);
    // Unqualified no-cache: stored only to be revalidated before every use.
    if cc.no_cache && !validator {
        return Err(NotStored::NoCache);
    }
    let heuristic_ok = cacheable_status(status) || cc.public;
    let lifetime_ms = if cc.no_cache {
        0
    } else {
        match explicit_lifetime_ms(&cc, headers, response_ms) {
            Some(l) => l,
            None if !heuristic_ok => return Err(NotStored::Status),
            None => match heuristic_lifetime_ms(headers, policy, response_ms) {
                0 => policy.default_ttl_ms,
                l => l,
            },
        }
    }
    .min(MAX_LIFETIME_MS);
    let initial_age_ms = initial_age_ms(headers, request_ms, response_ms);
    // Freshness already used up upstream is subtracted; the point it went stale may lie in
    // the past, and the stale windows still count from there.
    let stale_at = (response_ms + lifetime_ms).saturating_sub(initial_age_ms);
    let (swr, sie) = if cc.must_revalidate || cc.proxy_revalidate || cc.no_cache {
        (0, 0)
    } else {
        let window = |s: Option<u64>, cap: u64| s.unwrap_or(0).saturating_mul(1000).min(cap);
        (
            window(
                cc.stale_while_revalidate,
                policy.max_stale_while_revalidate_ms,
            ),
            window(cc.stale_if_error, policy.max_stale_if_error_ms),
        )
    };
    let mut freshness = Freshness {
        fresh_until_ms: stale_at,
        stale_while_revalidate_until_ms: stale_at + swr,
        stale_if_error_until_ms: stale_at + sie,
        keep_until_ms: 0,
    };
    let end = freshness.windows_end_ms();
    freshness.keep_until_ms = if validator {
        end.max(response_ms) + VALIDATION_KEEP_MS
    } else {
        end
    };
    if freshness.keep_until_ms <= response_ms {
        return Err(NotStored::Expired);
    }
    Ok(Storable {
        freshness,
        public,
        vary,
        initial_age_ms,
        strip,
    })
}

/// The stored header fields updated with those of a `304 Not Modified` (RFC 9111 section
/// 3.2): every field the 304 carries replaces the stored ones of that name, except those
/// that describe the stored body's bytes (`Content-Length`, `Content-Encoding`,
/// `Content-Range`); fields never stored are dropped when the result is stored.
pub fn updated_headers(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut out = stored.clone();
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in not_modified {
        if [
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            header::CONTENT_RANGE,
        ]
        .contains(name)
        {
            continue;
        }
        if !replaced.contains(&name) {
            out.remove(name);
            replaced.push(name);
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// True when a conditional request's validators match a stored response's, so a 304 may be
/// sent instead of it. `If-None-Match` uses the weak comparison and, when present, decides
/// alone (RFC 9110 section 13.2.2).
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if req.contains_key(header::IF_NONE_MATCH) {
        let opaque = |t: &[u8]| -> Vec<u8> {
            let t = trim(t);
            t.strip_prefix(b"W/").unwrap_or(t).to_vec()
        };
        let ours = stored.get(header::ETAG).map(|e| opaque(e.as_bytes()));
        return req.get_all(header::IF_NONE_MATCH).iter().any(|line| {
            split_elements(line.as_bytes()).any(|t| {
                let t = trim(t);
                // "*" matches any stored representation, with or without an ETag.
                t == b"*" || (!t.is_empty() && ours.as_ref().is_some_and(|o| opaque(t) == *o))
            })
        });
    }
    match (
        req.get(header::IF_MODIFIED_SINCE).and_then(http_date),
        stored.get(header::LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
