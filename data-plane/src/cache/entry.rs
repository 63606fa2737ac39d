//! Stored responses and their binary encoding, shared by both tiers.
//!
//! The encoding is hand-written and length-prefixed: `LBC` magic, a version byte, a kind byte
//! (entry or vary spec), then fixed-width big-endian fields. Every length is checked against
//! the bytes left and every header against `http`'s rules, so bytes from Redis that are
//! truncated, foreign or hostile decode to an error, never to a panic or a huge allocation.
//!
//! Headers that describe one connection or one exchange are not stored: hop-by-hop ones (and
//! those `Connection` names), `Age` (recomputed on every hit), `Set-Cookie` (never stored, see
//! [`super::policy`]), `X-Cache`, `Cache-Status`, `X-Request-Id` and the rate-limit headers of
//! the request that filled the entry. `CDN-Cache-Control` is stored (a 304 may update it) but
//! never served.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::policy::{CDN_CACHE_CONTROL, Freshness, State, Storable, not_modified};
use super::status::{self, CACHE_STATUS};
use crate::upstream::is_hop_by_hop;

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it was stored (unix ms).
    pub stored_at_ms: u64,
    /// Its age when it arrived (RFC 9111 section 4.2.3), in ms.
    pub initial_age_ms: u64,
    pub freshness: Freshness,
    /// May be served to requests with credentials.
    pub public: bool,
    /// The header names it varies on (see [`super::key::variant`]).
    pub vary: Vec<HeaderName>,
    /// The request path, for purges by prefix.
    pub path: String,
}

/// What a primary key holds when its response varies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarySpec {
    pub vary: Vec<HeaderName>,
    pub path: String,
}

/// What one store key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Entry(Entry),
    Vary(VarySpec),
}

/// `X-Cache` on a response served from the cache.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Headers that belong to one exchange with a client, not to the response: carried from the
/// backend's 304 onto the stored response served in its place.
pub const PER_EXCHANGE: [&str; 6] = [
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

/// Headers left out of stored entries besides the hop-by-hop ones, those `Connection` names and
/// the [`PER_EXCHANGE`] ones: what the cache writes itself on each answer, and `Set-Cookie`.
const NOT_STORED: [&str; 4] = ["age", "set-cookie", "x-cache", "cache-status"];

fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.keys_len());
    for (name, value) in headers {
        let n = name.as_str();
        if is_hop_by_hop(name)
            || NOT_STORED.contains(&n)
            || PER_EXCHANGE.contains(&n)
            || named.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

impl Entry {
    /// An entry for a response judged storable at `now_ms`.
    pub fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        storable: Storable,
        path: &str,
        now_ms: u64,
    ) -> Entry {
        let mut headers = stored_headers(headers);
        for name in &storable.strip {
            headers.remove(name);
        }
        Entry {
            status,
            headers,
            body,
            stored_at_ms: now_ms,
            initial_age_ms: storable.initial_age_ms,
            freshness: storable.freshness,
            public: storable.public,
            vary: storable.vary,
            path: path.to_owned(),
        }
    }

    pub fn state(&self, now_ms: u64) -> State {
        self.freshness.state(now_ms)
    }

    /// Its `Age` in seconds at `now_ms`: its age on arrival plus the time since (RFC 9111
    /// section 4.2.3 `current_age`).
    pub fn age_s(&self, now_ms: u64) -> u64 {
        (self.initial_age_ms + now_ms.saturating_sub(self.stored_at_ms)) / 1000
    }

    /// True when it can be revalidated with a conditional request.
    pub fn has_validator(&self) -> bool {
        super::policy::has_validator(&self.headers)
    }

    /// Memory it takes, roughly: what the memory tier's byte bound counts.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        let vary: usize = self.vary.iter().map(|n| n.as_str().len() + 32).sum();
        (std::mem::size_of::<Entry>() + headers + vary + self.path.len() + self.body.len()) as u64
    }

    /// The response to serve for a request with `req_headers`: a 304 when its validators
    /// match, the body left out for HEAD, `Age`, `X-Cache` (`HIT` when fresh, `STALE`
    /// otherwise) and `Cache-Status` (a hit) set, `CDN-Cache-Control` left out.
    pub fn response(&self, req_headers: &HeaderMap, head: bool, now_ms: u64) -> Response<Bytes> {
        let not_modified = not_modified(req_headers, &self.headers);
        let body = if head || not_modified {
            Bytes::new()
        } else {
            self.body.clone()
        };
        let mut resp = Response::new(body);
        if not_modified {
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            // RFC 9110 section 15.4.5: the validator and caching fields, not the content ones.
            for name in [
                header::CACHE_CONTROL,
                header::CONTENT_LOCATION,
                header::DATE,
                header::ETAG,
                header::EXPIRES,
                header::VARY,
            ] {
                for v in self.headers.get_all(&name) {
                    resp.headers_mut().append(name.clone(), v.clone());
                }
            }
        } else {
            *resp.status_mut() = self.status;
            *resp.headers_mut() = self.headers.clone();
        }
        let h = resp.headers_mut();
        // Meant for this cache alone (RFC 9213), never for clients.
        if h.contains_key(&CDN_CACHE_CONTROL) {
            h.remove(&CDN_CACHE_CONTROL);
        }
        h.insert(header::AGE, HeaderValue::from(self.age_s(now_ms)));
        let label = if self.state(now_ms) == State::Fresh {
            "HIT"
        } else {
            "STALE"
        };
        h.insert(X_CACHE, HeaderValue::from_static(label));
        h.insert(
            CACHE_STATUS,
            status::hit(status::ttl_s(self.freshness.fresh_until_ms, now_ms)),
        );
        resp
    }
}

/// Why bytes read from a store are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a cache record (bad magic or version)")]
    Magic,
    #[error("truncated cache record")]
    Truncated,
    #[error("invalid {0} in cache record")]
    Invalid(&'static str),
    #[error("trailing bytes after cache record")]
    Trailing,
}

const MAGIC: &[u8; 4] = b"LBC\x02";
const KIND_ENTRY: u8 = 1;
const KIND_VARY: u8 = 2;
/// More header lines than this in one stored response is taken as corruption.
const MAX_HEADERS: usize = 1024;

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&s[..n]);
}

fn put_vary(out: &mut Vec<u8>, vary: &[HeaderName]) {
    out.extend_from_slice(&(vary.len().min(MAX_HEADERS) as u16).to_be_bytes());
    for n in vary.iter().take(MAX_HEADERS) {
        put_str16(out, n.as_str().as_bytes());
    }
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Entry(e) => e.encode(),
            Record::Vary(v) => {
                let mut out = Vec::with_capacity(16 + v.path.len());
                out.extend_from_slice(MAGIC);
                out.push(KIND_VARY);
                put_str16(&mut out, v.path.as_bytes());
                put_vary(&mut out, &v.vary);
                out
            }
        }
    }

    pub fn decode(bytes: Bytes) -> Result<Record, DecodeError> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        let record = match r.u8()? {
            KIND_ENTRY => {
                let status =
                    StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Invalid("status"))?;
                let public = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("flags")),
                };
                let stored_at_ms = r.u64()?;
                let initial_age_ms = r.u64()?;
                let freshness = Freshness {
                    fresh_until_ms: r.u64()?,
                    stale_while_revalidate_until_ms: r.u64()?,
                    stale_if_error_until_ms: r.u64()?,
                    keep_until_ms: r.u64()?,
                };
                let path = r.path()?;
                let vary = r.vary()?;
                let count = usize::from(r.u16()?);
                if count > MAX_HEADERS {
                    return Err(DecodeError::Invalid("header count"));
                }
                let mut headers = HeaderMap::with_capacity(count);
                for _ in 0..count {
                    let n = usize::from(r.u16()?);
                    let name = HeaderName::from_bytes(r.take(n)?)
                        .map_err(|_| DecodeError::Invalid("header name"))?;
                    let n = r.u32()? as usize;
                    let value = HeaderValue::from_bytes(r.take(n)?)
                        .map_err(|_| DecodeError::Invalid("header value"))?;
                    headers.append(name, value);
                }
                let n = r.u32()? as usize;
                let start = r.pos;
                r.take(n)?;
                let body = bytes.slice(start..start + n);
                Record::Entry(Entry {
                    status,
                    headers,
                    body,
                    stored_at_ms,
                    initial_age_ms,
                    freshness,
                    public,
                    vary,
                    path,
                })
            }
            KIND_VARY => {
                let path = r.path()?;
                let vary = r.vary()?;
                Record::Vary(VarySpec { vary, path })
            }
            _ => return Err(DecodeError::Invalid("kind")),
        };
        if r.pos != bytes.len() {
            return Err(DecodeError::Trailing);
        }
        Ok(record)
    }

    pub fn path(&self) -> &str {
        match self {
            Record::Entry(e) => &e.path,
            Record::Vary(v) => &v.path,
        }
    }
}

impl Entry {
    /// Header values longer than 4 GiB and bodies longer than 4 GiB cannot be encoded; the
    /// policy's `max_entry_bytes` keeps far below that, and such a field would be cut.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight() as usize);
        out.extend_from_slice(MAGIC);
        out.push(KIND_ENTRY);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        out.push(u8::from(self.public));
        for n in [
            self.stored_at_ms,
            self.initial_age_ms,
            self.freshness.fresh_until_ms,
            self.freshness.stale_while_revalidate_until_ms,
            self.freshness.stale_if_error_until_ms,
            self.freshness.keep_until_ms,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        put_str16(&mut out, self.path.as_bytes());
        put_vary(&mut out, &self.vary);
        let count = self.headers.len().min(MAX_HEADERS);
        out.extend_from_slice(&(count as u16).to_be_bytes());
        for (name, value) in self.headers.iter().take(count) {
            put_str16(&mut out, name.as_str().as_bytes());
            let v = &value.as_bytes()[..value.len().min(u32::MAX as usize)];
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        let body = &self.body[..self.body.len().min(u32::MAX as usize)];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn path(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u16()?);
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Invalid("path"))?;
        Ok(s.to_owned())
    }

    fn vary(&mut self) -> Result<Vec<HeaderName>, DecodeError> {
        let count = usize::from(self.u16()?);
        if count > MAX_HEADERS {
            return Err(DecodeError::Invalid("vary count"));
        }
        let mut names = Vec::with_capacity(count);
        for _ in 0..count {
            let n = usize::from(self.u16()?);
            names.push(
                HeaderName::from_bytes(self.take(n)?)
                    .map_err(|_| DecodeError::Invalid("vary name"))?,
            );
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        Entry {
            status: StatusCode::NOT_FOUND,
            headers: h,
            body: Bytes::from_static(b"hello world"),
            stored_at_ms: 1_000_000,
            initial_age_ms: 3_000,
            freshness: Freshness {
                fresh_until_ms: 1_010_000,
                stale_while_revalidate_until_ms: 1_020_000,
                stale_if_error_until_ms: 1_030_000,
                keep_until_ms: 1_030_000,
            },
            public: true,
            vary: vec![HeaderName::from_static("accept-encoding")],
            path: "/p".to_owned(),
        }
    }

    #[test]
    fn records_round_trip() {
        let e = sample();
        let bytes = Bytes::from(e.encode());
        assert_eq!(Record::decode(bytes).unwrap(), Record::Entry(e.clone()));
        let v = Record::Vary(VarySpec {
            vary: e.vary.clone(),
            path: "/q".to_owned(),
        });
        assert_eq!(Record::decode(Bytes::from(v.encode())).unwrap(), v);
    }

    #[test]
    fn garbage_decodes_to_errors() {
        let good = sample().encode();
        for n in 0..good.len() {
            assert!(
                Record::decode(Bytes::copy_from_slice(&good[..n])).is_err(),
                "prefix {n}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            Record::decode(Bytes::from(long)),
            Err(DecodeError::Trailing)
        );
        assert_eq!(
            Record::decode(Bytes::from_static(b"HTTP/1.1 200 OK")),
            Err(DecodeError::Magic)
        );
        let mut rng = fastrand::Rng::with_seed(42);
        for _ in 0..5000 {
            let mut b = good.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..b.len());
                b[i] = rng.u8(..);
            }
            let _ = Record::decode(Bytes::from(b));
        }
        for _ in 0..2000 {
            let mut b = MAGIC.to_vec();
            b.extend((0..rng.usize(0..200)).map(|_| rng.u8(..)));
            let _ = Record::decode(Bytes::from(b));
        }
    }

    #[test]
    fn per_exchange_headers_are_not_stored() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::AGE, HeaderValue::from_static("5"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("3"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let kept = stored_headers(&h);
        assert_eq!(kept.len(), 1);
        assert!(kept.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn responses_carry_age_and_x_cache_and_honour_head_and_validators() {
        let e = sample();
        let none = HeaderMap::new();
        let r = e.response(&none, false, 1_005_000);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::AGE], "8");
        assert_eq!(r.headers()[X_CACHE], "HIT");
        assert_eq!(r.body().as_ref(), b"hello world");
        assert_eq!(r.headers().get_all("x-multi").iter().count(), 2);
        let r = e.response(&none, true, 1_015_000);
        assert!(r.body().is_empty());
        assert_eq!(r.headers()[X_CACHE], "STALE");
        let mut cond = HeaderMap::new();
        cond.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""));
        let r = e.response(&cond, false, 1_005_000);
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert!(r.body().is_empty());
        assert!(r.headers().contains_key(header::ETAG));
        assert!(!r.headers().contains_key(header::CONTENT_TYPE));
    }
}
