//! Reading the header fields the policy decides on, whatever they hold: `Cache-Control` and its
//! targeted variants (RFC 9213) into [`CacheControl`], delta-seconds, field-name lists, and
//! HTTP-dates in every format recipients must accept. Bounded work, no panics.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The parsed directives of one or more `Cache-Control` field lines. Durations are in
/// seconds, already capped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    /// Unqualified `no-cache` (or one whose field names cannot be read).
    pub no_cache: bool,
    /// The field names of a qualified `no-cache="…"`: the response may be reused without
    /// them.
    pub no_cache_fields: Vec<HeaderName>,
    /// Unqualified `private` (or one whose field names cannot be read).
    pub private: bool,
    /// The field names of a qualified `private="…"`: a shared cache stores the response
    /// without them.
    pub private_fields: Vec<HeaderName>,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    /// `max-age` and `s-maxage`: a value that is not delta-seconds (negative, fractional,
    /// empty) counts as 0, so the response is stale at once (RFC 9111 section 4.2.1).
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// Largest delta-seconds kept before the lifetime cap; larger values count as this much.
const DELTA_OVERFLOW: u64 = 1 << 31;

/// Parses delta-seconds: digits only (optionally quoted by the caller), else `None`.
pub(super) fn delta_seconds(v: &[u8]) -> Option<u64> {
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

pub(super) fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Splits on commas outside quoted strings.
pub(super) fn split_elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
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

/// The field names of a qualified `private` or `no-cache`; `None` when there is no
/// argument or it holds no valid name (the directive then counts as unqualified).
/// A directive that may name fields (`no-cache="…"`, `private="…"`): its names are added to
/// `fields` (at most [`MAX_FIELD_NAMES`]); without readable names it is `unqualified`.
fn qualified(value: Option<&[u8]>, fields: &mut Vec<HeaderName>, unqualified: &mut bool) {
    match field_names(value) {
        Some(names) => {
            fields.extend(names);
            fields.truncate(MAX_FIELD_NAMES);
        }
        None => *unqualified = true,
    }
}

fn field_names(value: Option<&[u8]>) -> Option<Vec<HeaderName>> {
    let v = unquote(value?)?;
    let names: Vec<HeaderName> = v
        .split(|&b| b == b',')
        .map(trim)
        .filter(|n| !n.is_empty())
        .take(MAX_FIELD_NAMES)
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect();
    (!names.is_empty()).then_some(names)
}

/// Field names kept from one qualified directive, at most: bounds the work a hostile header
/// can cause.
pub(super) const MAX_FIELD_NAMES: usize = 64;

/// The field of a response that targets this cache (RFC 9213).
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The directives this cache follows (RFC 9213 section 2.2: a targeted field, when valid,
/// replaces `Cache-Control` for the caches it targets, the most specific one first): the
/// operator's own targeted field, else `CDN-Cache-Control`, each when the response has it with
/// at least one directive; else `Cache-Control`.
pub fn response_cache_control(headers: &HeaderMap, own: Option<&HeaderName>) -> CacheControl {
    for name in own.into_iter().chain([&CDN_CACHE_CONTROL]) {
        if headers.contains_key(name) {
            let targeted = parse_cache_control(headers.get_all(name).iter());
            if targeted != CacheControl::default() {
                return targeted;
            }
        }
    }
    cache_control(headers)
}

/// Parses every `Cache-Control` field line of `headers`.
pub fn cache_control(headers: &HeaderMap) -> CacheControl {
    parse_cache_control(headers.get_all(header::CACHE_CONTROL).iter())
}

fn parse_cache_control<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> CacheControl {
    let mut cc = CacheControl::default();
    // First occurrence decides, even when malformed, so these record "seen" separately.
    let mut seen = [false; 4];
    for line in lines {
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
                qualified(value, &mut cc.no_cache_fields, &mut cc.no_cache);
            } else if is("private") {
                qualified(value, &mut cc.private_fields, &mut cc.private);
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
                    // An invalid max-age or s-maxage makes the response stale; an invalid
                    // stale window is no window.
                    *field = if i < 2 { Some(delta().unwrap_or(0)) } else { delta() };
                }
            }
        }
    }
    cc
}

/// Parses an HTTP-date in any of the three formats recipients must accept (RFC 9110 section
/// 5.6.7) into unix ms, also with a one-digit day or hour (which some servers send, and RFC
/// 9110 asks recipients to be robust to); `None` when it is none of them (or names the wrong
/// weekday).
pub fn http_date(v: &HeaderValue) -> Option<u64> {
    let text = v.to_str().ok()?.trim();
    let t = httpdate::parse_http_date(text)
        .ok()
        .or_else(|| loose_http_date(text))?;
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// Longest date text worth repairing: any valid HTTP-date is shorter.
const MAX_DATE_LEN: usize = 64;

/// A date with runs of spaces collapsed and a one-digit day or hour padded, read again.
fn loose_http_date(text: &str) -> Option<std::time::SystemTime> {
    if text.len() > MAX_DATE_LEN {
        return None;
    }
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    // asctime ("Sun Nov  6 08:49:37 1994") has its day third, the other two formats second.
    let asctime = words.len() == 5;
    let mut out = String::with_capacity(MAX_DATE_LEN);
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let b = w.as_bytes();
        let one_digit = b.len() == 1 && b[0].is_ascii_digit();
        if one_digit && i == 1 && !asctime {
            out.push('0');
        } else if one_digit && i == 2 && asctime {
            out.push(' ');
        } else if b.len() == 7 && b[1] == b':' && b[4] == b':' {
            out.push('0');
        }
        out.push_str(w);
    }
    (out != text)
        .then(|| httpdate::parse_http_date(&out).ok())
        .flatten()
}
