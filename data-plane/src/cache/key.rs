//! Cache keys. The primary key of a request is the SHA-256 of its method (HEAD shares GET's
//! entry), lower-cased host, path, and query with the policy's ignored parameters removed (the
//! others kept in their order). Only that hash leaves the process: Redis keys are
//! `lb:cache:{<hex>}:<format>`, so credentials carried in a query (`api_key=…`) never appear in clear in
//! Redis, in logs or in purge commands; [`CacheKey::id`] is the hex form to show and to purge by.
//!
//! A response with `Vary` is stored in two parts: under the primary key, a small vary spec
//! (the header names, lower-cased and sorted); under a variant key, the entry itself. The
//! variant key hashes the primary key with the request's values of those headers. Every Redis
//! key of one primary key shares its hash tag, so the lock and entries of a resource live in one
//! slot on Redis Cluster.

use std::fmt;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};
use http::{Method, Uri};
use sha2::{Digest, Sha256};

use super::policy::Bypass;

/// Longest path plus query (as received, before ignored parameters are removed) that is
/// cached. Longer requests bypass the cache: such keys are rare, expensive to hash and store,
/// and mostly generated noise.
pub const MAX_KEY_BYTES: usize = 8192;

/// A SHA-256 digest identifying a stored record.
pub type Digest32 = [u8; 32];

/// The primary key of a request. It keeps the path (for purges by prefix) and the digest,
/// never the query: the query may hold credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct CacheKey {
    primary: Digest32,
    path: Arc<str>,
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheKey")
            .field("id", &self.id())
            .field("path", &self.path)
            .finish()
    }
}

pub fn hex(d: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

/// Parses 64 lower- or upper-case hex digits.
pub fn parse_id(s: &str) -> Option<Digest32> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// The query without the ignored parameters, in the original order. Names are compared
/// byte for byte, undecoded: `api%5Fkey` is not `api_key`.
fn filtered_query<'a>(query: &'a str, ignored: &'a [String]) -> impl Iterator<Item = &'a str> {
    query.split('&').filter(move |p| {
        let name = p.split_once('=').map_or(*p, |(n, _)| n);
        !p.is_empty() && !ignored.iter().any(|i| i == name)
    })
}

impl CacheKey {
    /// The key of a request for `host` and `uri` (its path and query are used). `Err` when
    /// path and query exceed [`MAX_KEY_BYTES`].
    pub fn new(
        method: &Method,
        host: &str,
        uri: &Uri,
        ignored_query_params: &[String],
    ) -> Result<CacheKey, Bypass> {
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        if path.len() + query.len() > MAX_KEY_BYTES {
            return Err(Bypass::KeyTooLong);
        }
        let method = if method == Method::HEAD {
            "GET"
        } else {
            method.as_str()
        };
        // Newlines cannot occur in a method, host, path or query, so they separate the parts
        // unambiguously.
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update(b"\n");
        for b in host.bytes() {
            h.update([b.to_ascii_lowercase()]);
        }
        h.update(b"\n");
        h.update(path.as_bytes());
        h.update(b"\n");
        for (i, p) in filtered_query(query, ignored_query_params).enumerate() {
            if i > 0 {
                h.update(b"&");
            }
            h.update(p.as_bytes());
        }
        Ok(CacheKey {
            primary: h.finalize().into(),
            path: Arc::from(path),
        })
    }

    pub fn primary(&self) -> &Digest32 {
        &self.primary
    }

    /// The hex digest: what logs show and purges name.
    pub fn id(&self) -> String {
        hex(&self.primary)
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

/// The digest of one variant of a resource: the primary digest itself without `Vary`, else
/// a hash of it and the request's values of the `vary` headers, normalised as RFC 9111
/// section 4.1 allows: the field lines combined, and the list members taken without the
/// whitespace around them (empty ones dropped), so `en, fr`, `en,fr` and two lines `en` and
/// `fr` are one variant. An absent header differs from an empty one.
pub fn variant(primary: &Digest32, vary: &[HeaderName], headers: &HeaderMap) -> Digest32 {
    if vary.is_empty() {
        return *primary;
    }
    let mut h = Sha256::new();
    h.update(primary);
    for name in vary {
        h.update((name.as_str().len() as u64).to_be_bytes());
        h.update(name.as_str().as_bytes());
        let values = headers.get_all(name);
        h.update([u8::from(values.iter().next().is_some())]);
        for v in values {
            for member in v.as_bytes().split(|&b| b == b',') {
                let member = member.trim_ascii();
                if !member.is_empty() {
                    h.update((member.len() as u64).to_be_bytes());
                    h.update(member);
                }
            }
        }
        // No member is this long: ends the header's members unambiguously.
        h.update(u64::MAX.to_be_bytes());
    }
    h.finalize().into()
}

/// The version of the record format ([`super::entry`]) in record keys: data planes of
/// releases that write another format use other keys, so neither reads the other's records
/// (which it could not decode) during a rolling upgrade; purges and the index cover both.
pub const FORMAT: &str = "2";

/// The Redis key of a record: the primary digest's own, or one of its variants.
pub fn redis_key(primary: &Digest32, variant: &Digest32) -> String {
    if variant == primary {
        format!("lb:cache:{{{}}}:{FORMAT}", hex(primary))
    } else {
        format!("lb:cache:{{{}}}:{FORMAT}:v:{}", hex(primary), hex(variant))
    }
}

/// The Redis key of the fill lock of a record.
pub fn lock_key(primary: &Digest32, variant: &Digest32) -> String {
    if variant == primary {
        format!("lb:cache:lock:{{{}}}", hex(primary))
    } else {
        format!("lb:cache:lock:{{{}}}:{}", hex(primary), hex(variant))
    }
}

/// Every Redis key this cache writes starts with this.
pub const REDIS_PREFIX: &str = "lb:cache:";

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key(method: Method, host: &str, uri: &str, ignored: &[&str]) -> Result<CacheKey, Bypass> {
        let ignored: Vec<String> = ignored.iter().map(|s| (*s).to_owned()).collect();
        CacheKey::new(&method, host, &uri.parse::<Uri>().unwrap(), &ignored)
    }

    fn id(uri: &str, ignored: &[&str]) -> String {
        key(Method::GET, "example.com", uri, ignored).unwrap().id()
    }

    #[test]
    fn head_shares_get_and_host_case_does_not_matter() {
        let a = key(Method::GET, "Example.COM", "/a?x=1", &[]).unwrap();
        let b = key(Method::HEAD, "example.com", "/a?x=1", &[]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, key(Method::GET, "other.com", "/a?x=1", &[]).unwrap());
        assert_eq!(a.path(), "/a");
        assert_eq!(a.id().len(), 64);
        assert_eq!(parse_id(&a.id()), Some(*a.primary()));
        assert_eq!(parse_id(&a.id().to_uppercase()), Some(*a.primary()));
        assert_eq!(parse_id("xyz"), None);
    }

    #[test]
    fn ignored_parameters_are_removed_and_the_rest_keep_their_order() {
        let ig = ["api_key", "utm_source"];
        assert_eq!(id("/p?a=1&api_key=secret&b=2", &ig), id("/p?a=1&b=2", &ig));
        assert_eq!(id("/p?api_key=1&utm_source=x", &ig), id("/p", &ig));
        assert_eq!(id("/p?a=1&&b=2", &ig), id("/p?a=1&b=2", &ig));
        assert_eq!(id("/p?api_key", &ig), id("/p", &ig));
        assert_ne!(id("/p?a=1&b=2", &ig), id("/p?b=2&a=1", &ig));
        assert_ne!(id("/p?api_key=1", &[]), id("/p?api_key=2", &[]));
        assert_ne!(id("/p?api%5Fkey=1", &ig), id("/p", &ig));
        assert_ne!(id("/p?a=1", &ig), id("/pa=1", &ig));
        // The digest never shows the query.
        let k = key(Method::GET, "h", "/p?api_key=secret", &[]).unwrap();
        assert!(!format!("{k:?}").contains("secret"));
        assert!(!redis_key(k.primary(), k.primary()).contains("secret"));
    }

    #[test]
    fn keys_over_8_kib_of_path_and_query_bypass() {
        let at_limit = format!("/{}?{}", "a".repeat(4000), "b".repeat(MAX_KEY_BYTES - 4001));
        assert!(key(Method::GET, "h", &at_limit, &[]).is_ok());
        let over = format!("/{}?{}", "a".repeat(4000), "b".repeat(MAX_KEY_BYTES - 4000));
        assert_eq!(key(Method::GET, "h", &over, &[]), Err(Bypass::KeyTooLong));
        let long_path = format!("/{}", "a".repeat(MAX_KEY_BYTES));
        assert_eq!(
            key(Method::GET, "h", &long_path, &[]),
            Err(Bypass::KeyTooLong)
        );
    }

    #[test]
    fn variants_hash_the_varied_values() {
        let p = *key(Method::GET, "h", "/", &[]).unwrap().primary();
        let ae = HeaderName::from_static("accept-encoding");
        let mut gzip = HeaderMap::new();
        gzip.insert(&ae, HeaderValue::from_static("gzip"));
        let mut br = HeaderMap::new();
        br.insert(&ae, HeaderValue::from_static("br"));
        let mut empty = HeaderMap::new();
        empty.insert(&ae, HeaderValue::from_static(""));
        let none = HeaderMap::new();
        assert_eq!(variant(&p, &[], &gzip), p);
        let v = |h: &HeaderMap| variant(&p, std::slice::from_ref(&ae), h);
        assert_ne!(v(&gzip), v(&br));
        assert_ne!(v(&empty), v(&none));
        assert_eq!(v(&gzip), v(&gzip.clone()));
        assert!(redis_key(&p, &v(&gzip)).starts_with(&redis_key(&p, &p)));
        assert_ne!(lock_key(&p, &p), lock_key(&p, &v(&gzip)));
    }

    #[test]
    fn s4_1_varied_values_are_normalised_by_list_member() {
        let p = *key(Method::GET, "h", "/", &[]).unwrap().primary();
        let al = HeaderName::from_static("accept-language");
        let of = |lines: &[&str]| {
            let mut m = HeaderMap::new();
            for l in lines {
                m.append(&al, HeaderValue::from_str(l).unwrap());
            }
            variant(&p, std::slice::from_ref(&al), &m)
        };
        let one = of(&["en, fr"]);
        assert_eq!(one, of(&["en,fr"]));
        assert_eq!(one, of(&[" en ,\tfr "]));
        assert_eq!(one, of(&["en", "fr"]));
        assert_eq!(one, of(&["en,,fr,"]));
        assert_ne!(one, of(&["fr, en"]), "order is meaningful");
        assert_ne!(one, of(&["enfr"]));
    }
}
