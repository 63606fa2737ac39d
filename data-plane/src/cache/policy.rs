//! Cache freshness policy (RFC 9111 for a shared cache, RFC 5861 stale extensions): which
//! requests may use the cache, which responses may be stored and for how long. Plain
//! synchronous code with the clock passed in as unix milliseconds; it never reads a clock and
//! never panics, whatever the headers hold.
//!
//! Choices made where the RFCs leave room, or where this cache is deliberately stricter:
//! - Only `no-store` in a request's `Cache-Control` is honoured. Request `no-cache`, `max-age`,
//!   `min-fresh` and `max-stale` are ignored, so a client cannot force every request through to
//!   the backends the cache protects.
//! - Requests with `Range`, `Upgrade` (WebSocket) or conditional headers on a miss are passed
//!   through: 206 is not stored, an upgrade is not a cacheable exchange, and a 304 from a
//!   backend carries no body to store. A conditional request on a hit gets a 304 when its
//!   validators match ([`not_modified`]).
//! - Response `no-cache` (qualified or not) means "revalidate before each use". This cache does
//!   not revalidate, so such responses are not stored at all: correct, if less efficient.
//! - `private`, qualified or not, means not stored; so does `Vary: *`.
//! - A response carrying `Set-Cookie` is never stored, even when `public`: handing one
//!   client's cookie to every other client is worse than a miss (nginx and Varnish default to
//!   the same).
//! - A response to a request with `Authorization` or `Cookie` is stored only when the backend
//!   allowed it explicitly: `public`, `s-maxage` or `must-revalidate` (RFC 9111 section 3.5),
//!   and only such entries are served to later requests with credentials. `X-API-Key` (like
//!   an `api_key` query parameter) is not a credential here: it meters a client rather than
//!   changing what it sees, and the default configuration leaves `api_key` out of keys too.
//! - `s-maxage` implies `proxy-revalidate`, but an explicit `stale-while-revalidate` or
//!   `stale-if-error` next to it is taken as the backend's intent and honoured; an explicit
//!   `must-revalidate` or `proxy-revalidate` turns both stale windows off.
//! - Delta-seconds: a value that is not all digits counts as absent (a malformed `max-age`
//!   falls back to `Expires`, then to the default TTL); one too large for any integer counts as
//!   2^31 s (RFC 9111 section 1.2.2); every lifetime is capped at [`MAX_LIFETIME_MS`]. When a
//!   directive repeats, its first occurrence decides (RFC 9111 section 4.2.1).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::Policy;

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

    /// When the entry becomes useless: the end of its last window.
    pub fn expires_at_ms(&self) -> u64 {
        self.fresh_until_ms
            .max(self.stale_while_revalidate_until_ms)
            .max(self.stale_if_error_until_ms)
    }
}

/// The parsed directives of one or more `Cache-Control` field lines. Durations are in
/// seconds, already capped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// Largest delta-seconds kept before the lifetime cap; larger values count as this much.
const DELTA_OVERFLOW: u64 = 1 << 31;

/// Parses delta-seconds: digits only (optionally quoted by the caller), else `None`.
fn delta_seconds(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for d in v {
        n = n * 10 + u64::from(d - b'0');
        if n >= DELTA_OVERFLOW {
            return Some(DELTA_OVERFLOW);
        }
    }
    Some(n)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Splits on commas outside quoted strings.
fn split_elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < v.len() {
            let b = v[i];
            i += 1;
            if escaped {
                escaped = false;
            } else if quoted && b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = !quoted;
            } else if b == b',' && !quoted {
                let el = &v[start..i - 1];
                start = i;
                return Some(el);
            }
        }
        if start <= v.len() {
            let el = &v[start..];
            start = usize::MAX;
            return Some(el);
        }
        None
    })
}

/// The value of `name=value`, unquoted; `None` for a missing or unterminated value.
fn unquote(v: &[u8]) -> Option<Vec<u8>> {
    let v = trim(v);
    let Some(inner) = v.strip_prefix(b"\"") else {
        return Some(v.to_vec());
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut it = inner.iter();
    while let Some(&b) = it.next() {
        match b {
            b'\\' => out.push(*it.next()?),
            b'"' => return it.as_slice().is_empty().then_some(out),
            _ => out.push(b),
        }
    }
    None
}

/// Parses every `Cache-Control` field line of `headers`.
pub fn cache_control(headers: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    // First occurrence decides, even when malformed, so these record "seen" separately.
    let mut seen = [false; 4];
    for line in headers.get_all(header::CACHE_CONTROL) {
        for el in split_elements(line.as_bytes()) {
            let el = trim(el);
            if el.is_empty() {
                continue;
            }
            let (name, value) = match el.iter().position(|&b| b == b'=') {
                Some(i) => (trim(&el[..i]), Some(&el[i + 1..])),
                None => (el, None),
            };
            let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
            let delta = || value.and_then(unquote).and_then(|v| delta_seconds(&v));
            if is("no-store") {
                cc.no_store = true;
            } else if is("no-cache") {
                cc.no_cache = true;
            } else if is("private") {
                cc.private = true;
            } else if is("public") {
                cc.public = true;
            } else if is("must-revalidate") {
                cc.must_revalidate = true;
            } else if is("proxy-revalidate") {
                cc.proxy_revalidate = true;
            } else {
                let slot = if is("max-age") {
                    Some((0, &mut cc.max_age))
                } else if is("s-maxage") {
                    Some((1, &mut cc.s_maxage))
                } else if is("stale-while-revalidate") {
                    Some((2, &mut cc.stale_while_revalidate))
                } else if is("stale-if-error") {
                    Some((3, &mut cc.stale_if_error))
                } else {
                    None
                };
                if let Some((i, field)) = slot
                    && !seen[i]
                {
                    seen[i] = true;
                    *field = delta();
                }
            }
        }
    }
    cc
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

/// The statuses RFC 9110 section 15.1 calls heuristically cacheable, less 206.
pub fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
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
            if let Ok(name) = HeaderName::from_bytes(n) {
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
    /// The response's `Age` when it arrived, in seconds.
    pub initial_age_s: u64,
}

/// Decides whether a response may be stored and for how long, at `now_ms` (its arrival).
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    req_has_credentials: bool,
    policy: &Policy,
    now_ms: u64,
) -> Result<Storable, NotStored> {
    if !cacheable_status(status) {
        return Err(NotStored::Status);
    }
    let cc = cache_control(headers);
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if cc.no_cache {
        return Err(NotStored::NoCache);
    }
    let vary = vary(headers)?;
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let public = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    if req_has_credentials && !public {
        return Err(NotStored::Credentials);
    }
    let lifetime_ms = match cc.s_maxage.or(cc.max_age) {
        Some(s) => s.saturating_mul(1000),
        None => match headers.get(header::EXPIRES) {
            // An invalid Expires, "0" included, means already expired (RFC 9111 5.3).
            Some(exp) => {
                let expires = http_date(exp).unwrap_or(0);
                let date = headers.get(header::DATE).and_then(http_date);
                expires.saturating_sub(date.unwrap_or(now_ms))
            }
            None => policy.default_ttl_ms,
        },
    }
    .min(MAX_LIFETIME_MS);
    let initial_age_s = headers
        .get(header::AGE)
        .and_then(|v| delta_seconds(trim(v.as_bytes())))
        .unwrap_or(0)
        .min(MAX_LIFETIME_MS / 1000);
    // Freshness already used up upstream is subtracted; the point it went stale may lie in
    // the past, and the stale windows still count from there.
    let stale_at = (now_ms + lifetime_ms).saturating_sub(initial_age_s * 1000);
    let (swr, sie) = if cc.must_revalidate || cc.proxy_revalidate {
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
    let freshness = Freshness {
        fresh_until_ms: stale_at,
        stale_while_revalidate_until_ms: stale_at + swr,
        stale_if_error_until_ms: stale_at + sie,
    };
    if freshness.expires_at_ms() <= now_ms {
        return Err(NotStored::Expired);
    }
    Ok(Storable {
        freshness,
        public,
        vary,
        initial_age_s,
    })
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

/// Parses an HTTP-date in any of the three formats recipients must accept (RFC 9110 section
/// 5.6.7) into unix ms; `None` when it is none of them (or names the wrong weekday).
pub fn http_date(v: &HeaderValue) -> Option<u64> {
    let t = httpdate::parse_http_date(v.to_str().ok()?.trim()).ok()?;
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn policy() -> Policy {
        Policy {
            enabled: true,
            default_ttl_ms: 30_000,
            max_stale_while_revalidate_ms: 60_000,
            max_stale_if_error_ms: 300_000,
            ..Policy::default()
        }
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn store(pairs: &[(&str, &str)]) -> Result<Storable, NotStored> {
        storable(StatusCode::OK, &h(pairs), false, &policy(), NOW)
    }

    fn lifetime(pairs: &[(&str, &str)]) -> u64 {
        store(pairs).unwrap().freshness.fresh_until_ms - NOW
    }

    #[test]
    fn only_get_and_head_without_no_store_range_or_upgrade_use_the_cache() {
        let none = HeaderMap::new();
        assert_eq!(request_bypass(&Method::GET, &none), None);
        assert_eq!(request_bypass(&Method::HEAD, &none), None);
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(request_bypass(&m, &none), Some(Bypass::Method));
        }
        let cases = [
            ("cache-control", "No-Store", Bypass::NoStore),
            ("cache-control", "max-age=0, no-store", Bypass::NoStore),
            ("range", "bytes=0-10", Bypass::Range),
            ("upgrade", "websocket", Bypass::Upgrade),
        ];
        for (k, v, want) in cases {
            assert_eq!(request_bypass(&Method::GET, &h(&[(k, v)])), Some(want));
        }
        // Request no-cache and max-age=0 are ignored on purpose.
        let nc = h(&[("cache-control", "no-cache, max-age=0")]);
        assert_eq!(request_bypass(&Method::GET, &nc), None);
    }

    #[test]
    fn credentials_are_a_flag_not_a_bypass() {
        for (k, v) in [("authorization", "Bearer x"), ("cookie", "a=b")] {
            let req = h(&[(k, v)]);
            assert_eq!(request_bypass(&Method::GET, &req), None);
            assert!(has_credentials(&req));
        }
        assert!(!has_credentials(&h(&[("x-api-key", "k")])));
    }

    #[test]
    fn responses_to_requests_with_credentials_need_explicit_permission() {
        let p = policy();
        let ok = StatusCode::OK;
        let plain = h(&[("cache-control", "max-age=60")]);
        assert_eq!(
            storable(ok, &plain, true, &p, NOW),
            Err(NotStored::Credentials)
        );
        assert!(!storable(ok, &plain, false, &p, NOW).unwrap().public);
        for cc in [
            "public, max-age=60",
            "s-maxage=60",
            "must-revalidate, max-age=60",
        ] {
            let s = storable(ok, &h(&[("cache-control", cc)]), true, &p, NOW).unwrap();
            assert!(s.public, "{cc}");
        }
        assert!(!NotStored::Credentials.is_intrinsic());
    }

    #[test]
    fn no_store_private_no_cache_set_cookie_and_vary_star_are_not_stored() {
        let cases = [
            (
                ("cache-control", "no-store, max-age=60"),
                NotStored::NoStore,
            ),
            (("cache-control", "PRIVATE"), NotStored::Private),
            (
                ("cache-control", "private=\"x-user\", public"),
                NotStored::Private,
            ),
            (("cache-control", "no-cache"), NotStored::NoCache),
            (
                ("cache-control", "no-cache=\"set-cookie\""),
                NotStored::NoCache,
            ),
            (("vary", "accept-encoding, *"), NotStored::VaryStar),
        ];
        for ((k, v), want) in cases {
            assert_eq!(store(&[(k, v)]), Err(want), "{k}: {v}");
        }
        assert_eq!(
            store(&[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "s=1")
            ]),
            Err(NotStored::SetCookie)
        );
    }

    #[test]
    fn only_the_heuristically_cacheable_statuses_are_stored() {
        let p = policy();
        let cc = h(&[("cache-control", "max-age=60")]);
        for s in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            let status = StatusCode::from_u16(s).unwrap();
            assert!(storable(status, &cc, false, &p, NOW).is_ok(), "{s}");
        }
        for s in [201, 206, 302, 304, 400, 403, 500, 502, 503] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(
                storable(status, &cc, false, &p, NOW),
                Err(NotStored::Status),
                "{s}"
            );
        }
    }

    #[test]
    fn vary_names_are_lower_cased_sorted_and_deduplicated() {
        let s = store(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "ACCEPT-ENCODING"),
        ])
        .unwrap();
        let names: Vec<&str> = s.vary.iter().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept-encoding", "accept-language"]);
    }

    #[test]
    fn lifetime_comes_from_s_maxage_then_max_age_then_expires_then_the_default() {
        assert_eq!(
            lifetime(&[("cache-control", "max-age=60, s-maxage=120")]),
            120_000
        );
        assert_eq!(
            lifetime(&[
                ("cache-control", "s-maxage=5"),
                ("cache-control", "max-age=60")
            ]),
            5_000
        );
        assert_eq!(
            lifetime(&[
                ("cache-control", "max-age=60"),
                ("expires", "Thu, 01 Dec 2094 16:00:00 GMT")
            ]),
            60_000
        );
        assert_eq!(
            lifetime(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:59:37 GMT")
            ]),
            600_000
        );
        assert_eq!(lifetime(&[]), 30_000);
        assert_eq!(lifetime(&[("cache-control", "public")]), 30_000);
    }

    #[test]
    fn expires_without_date_counts_from_arrival_and_an_invalid_one_is_in_the_past() {
        // NOW is 2023-11-14T22:13:20Z.
        let exp = lifetime(&[("expires", "Tue, 14 Nov 2023 22:14:20 GMT")]);
        assert_eq!(exp, 60_000);
        assert_eq!(store(&[("expires", "0")]), Err(NotStored::Expired));
        assert_eq!(
            store(&[
                ("expires", "yesterday"),
                ("cache-control", "stale-if-error=10")
            ])
            .unwrap()
            .freshness,
            Freshness {
                fresh_until_ms: NOW,
                stale_while_revalidate_until_ms: NOW,
                stale_if_error_until_ms: NOW + 10_000
            }
        );
    }

    #[test]
    fn age_from_upstream_is_subtracted() {
        assert_eq!(
            lifetime(&[("cache-control", "max-age=60"), ("age", "20")]),
            40_000
        );
        assert_eq!(
            store(&[("cache-control", "max-age=60"), ("age", "100")]),
            Err(NotStored::Expired)
        );
        let s = store(&[
            ("cache-control", "max-age=60, stale-while-revalidate=60"),
            ("age", "90"),
        ])
        .unwrap();
        assert_eq!(s.freshness.state(NOW), State::StaleRevalidate);
        assert_eq!(s.freshness.stale_while_revalidate_until_ms, NOW + 30_000);
        assert_eq!(
            lifetime(&[("cache-control", "max-age=60"), ("age", "x")]),
            60_000
        );
    }

    #[test]
    fn stale_windows_are_capped_by_the_policy_and_off_with_must_revalidate() {
        let f = store(&[(
            "cache-control",
            "max-age=10, stale-while-revalidate=30, stale-if-error=86400",
        )])
        .unwrap()
        .freshness;
        assert_eq!(f.fresh_until_ms, NOW + 10_000);
        assert_eq!(f.stale_while_revalidate_until_ms, NOW + 40_000);
        assert_eq!(f.stale_if_error_until_ms, NOW + 10_000 + 300_000);
        let f = store(&[("cache-control", "max-age=10, stale-while-revalidate=3600")])
            .unwrap()
            .freshness;
        assert_eq!(f.stale_while_revalidate_until_ms, NOW + 70_000);
        for cc in [
            "max-age=10, must-revalidate, stale-if-error=60",
            "max-age=10, proxy-revalidate, stale-while-revalidate=60",
        ] {
            let f = store(&[("cache-control", cc)]).unwrap().freshness;
            assert_eq!(f.expires_at_ms(), NOW + 10_000, "{cc}");
        }
        // Explicit windows next to s-maxage are honoured.
        let f = store(&[("cache-control", "s-maxage=10, stale-if-error=60")])
            .unwrap()
            .freshness;
        assert_eq!(f.stale_if_error_until_ms, NOW + 70_000);
    }

    #[test]
    fn states_follow_the_windows() {
        let f = Freshness {
            fresh_until_ms: 100,
            stale_while_revalidate_until_ms: 200,
            stale_if_error_until_ms: 300,
        };
        assert_eq!(f.state(0), State::Fresh);
        assert_eq!(f.state(99), State::Fresh);
        assert_eq!(f.state(100), State::StaleRevalidate);
        assert_eq!(f.state(200), State::StaleIfError);
        assert_eq!(f.state(300), State::Expired);
        assert_eq!(f.expires_at_ms(), 300);
        // A stale-if-error window shorter than the revalidation one.
        let g = Freshness {
            stale_if_error_until_ms: 150,
            ..f
        };
        assert_eq!(g.state(160), State::StaleRevalidate);
        assert_eq!(g.state(250), State::Expired);
        assert_eq!(g.expires_at_ms(), 200);
    }

    #[test]
    fn cache_control_parsing_is_robust() {
        let cc = |v: &str| cache_control(&h(&[("cache-control", v)]));
        assert_eq!(cc("MAX-AGE=60").max_age, Some(60));
        assert_eq!(cc("max-age=\"60\"").max_age, Some(60));
        assert_eq!(cc("  max-age = 60 ").max_age, Some(60));
        assert_eq!(cc("max-age=60, max-age=10").max_age, Some(60));
        assert_eq!(cc("max-age=abc").max_age, None);
        assert_eq!(cc("max-age=-1").max_age, None);
        assert_eq!(cc("max-age=1.5").max_age, None);
        assert_eq!(cc("max-age=").max_age, None);
        assert_eq!(cc("max-age").max_age, None);
        assert_eq!(cc("max-age=\"60").max_age, None);
        assert_eq!(
            cc("max-age=x, max-age=60").max_age,
            None,
            "first occurrence decides"
        );
        assert_eq!(
            cc("max-age=99999999999999999999999999").max_age,
            Some(1 << 31)
        );
        let c = cc("private=\"a, b\", max-age=5,,, ,no-store=1");
        assert!(c.private && c.no_store);
        assert_eq!(c.max_age, Some(5));
        let c = cc("foo=\"a\\\"b, max-age=9\", s-maxage=7");
        assert_eq!((c.max_age, c.s_maxage), (None, Some(7)));
    }

    #[test]
    fn malformed_max_age_counts_as_absent_and_absurd_ones_are_capped() {
        assert_eq!(lifetime(&[("cache-control", "max-age=soon")]), 30_000);
        assert_eq!(
            lifetime(&[
                ("cache-control", "max-age=-5"),
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
            ]),
            60_000
        );
        assert_eq!(
            lifetime(&[("cache-control", "max-age=999999999999999")]),
            MAX_LIFETIME_MS
        );
        assert_eq!(
            lifetime(&[
                ("date", "Thu, 01 Jan 1970 00:00:00 GMT"),
                ("expires", "Fri, 31 Dec 9999 23:59:59 GMT")
            ]),
            MAX_LIFETIME_MS
        );
    }

    #[test]
    fn a_64_kib_cache_control_header_and_binary_garbage_never_panic() {
        let big = format!("{}max-age=60", "x=\"\\\",".repeat(64 * 1024 / 6));
        let _ = cache_control(&h(&[("cache-control", &big)]));
        let big = format!("{}, max-age=60", "a".repeat(64 * 1024));
        assert_eq!(lifetime(&[("cache-control", &big)]), 60_000);
        let big = "9".repeat(64 * 1024);
        assert_eq!(
            cache_control(&h(&[("cache-control", &format!("max-age={big}"))])).max_age,
            Some(1 << 31)
        );
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..64);
            let alphabet = b"max-age=s,\"\\ =09\tpublicno-store\x80\xff";
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let mut m = HeaderMap::new();
                m.insert(header::CACHE_CONTROL, v.clone());
                m.insert(header::EXPIRES, v.clone());
                m.insert(header::AGE, v.clone());
                m.insert(header::VARY, v);
                let _ = storable(StatusCode::OK, &m, false, &policy(), NOW);
                let _ = not_modified(&m, &m);
            }
        }
    }

    #[test]
    fn http_dates_in_all_three_formats() {
        let d = |s: &str| http_date(&HeaderValue::from_str(s).unwrap());
        let want = Some(784_111_777_000);
        assert_eq!(d("Sun, 06 Nov 1994 08:49:37 GMT"), want);
        assert_eq!(d("Sunday, 06-Nov-94 08:49:37 GMT"), want);
        assert_eq!(d("Sun Nov  6 08:49:37 1994"), want);
        assert_eq!(d("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(d("Thu, 29 Feb 2024 12:00:00 GMT"), Some(1_709_208_000_000));
        for bad in [
            "0",
            "",
            "Sun, 06 Nov 1994 25:00:00 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 PST",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn conditional_requests_match_validators() {
        let stored = h(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert!(not_modified(
            &h(&[("if-none-match", "\"v0\", \"v1\"")]),
            &stored
        ));
        assert!(not_modified(&h(&[("if-none-match", "*")]), &stored));
        assert!(!not_modified(&h(&[("if-none-match", "\"v2\"")]), &stored));
        // If-None-Match decides alone when present.
        assert!(!not_modified(
            &h(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
            ]),
            &stored
        ));
        assert!(not_modified(
            &h(&[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &h(&[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &h(&[("if-modified-since", "garbage")]),
            &stored
        ));
        assert!(is_conditional(&h(&[("if-none-match", "*")])));
    }
}
