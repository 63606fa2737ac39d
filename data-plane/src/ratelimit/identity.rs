//! Who a request comes from: its API key (from `X-API-Key`, `Authorization: Bearer`, or the
//! `api_key` query parameter, in that order) and its client address (the socket peer, or the
//! `X-Forwarded-For` entry its trusted proxies recorded).
//!
//! A key is never kept or logged in clear: it is identified by its SHA-256 (the control plane
//! stores only that) and shown as a key id, the first 16 hex digits of the hash.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

/// Longest API key accepted; a bound on what a client can make the data plane hash and store.
pub const MAX_KEY_LEN: usize = 256;

/// An API key, as the data plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Lower-case hex SHA-256 of the key.
    pub hash: String,
}

impl ApiKey {
    pub fn id(&self) -> &str {
        &self.hash[..16]
    }
}

/// Why a request's API key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the API key is empty")]
    Empty,
    #[error("the API key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("the API key may contain only visible ASCII characters")]
    BadCharacters,
}

pub fn hash_key(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

fn check_key(raw: &[u8]) -> Result<ApiKey, KeyError> {
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::BadCharacters);
    }
    Ok(ApiKey {
        hash: hash_key(raw),
    })
}

/// The request's API key, if it presents one.
pub fn api_key(headers: &HeaderMap, query: Option<&str>) -> Result<Option<ApiKey>, KeyError> {
    if let Some(v) = headers.get("x-api-key") {
        return check_key(v.as_bytes()).map(Some);
    }
    if let Some(v) = headers.get(http::header::AUTHORIZATION)
        && let Some(token) = v
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| v.as_bytes().strip_prefix(b"bearer "))
    {
        return check_key(token.trim_ascii()).map(Some);
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("api_key=") {
                let decoded = percent_decode(v);
                return check_key(&decoded).map(Some);
            }
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

/// The client's address: the peer, unless the peer is a trusted proxy; then the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy. A malformed header from a
/// trusted proxy is ignored (the peer is used); an untrusted peer's header is never read.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if trusted.is_empty() || !trusted.iter().any(|n| n.contains(&peer)) {
        return peer;
    }
    let mut entries: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else { return peer };
        for part in s.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => entries.push(ip),
                Err(_) => return peer,
            }
        }
    }
    entries
        .into_iter()
        .rev()
        .find(|ip| !trusted.iter().any(|n| n.contains(ip)))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn keys_from_each_place_in_order() {
        let k = |h: &[(&str, &str)], q| api_key(&headers(h), q).unwrap().map(|k| k.id().to_owned());
        let id = |s: &str| hash_key(s.as_bytes())[..16].to_owned();
        assert_eq!(k(&[("x-api-key", "a")], Some("api_key=b")), Some(id("a")));
        assert_eq!(k(&[("authorization", "Bearer b")], None), Some(id("b")));
        assert_eq!(k(&[], Some("x=1&api_key=c%2Fd")), Some(id("c/d")));
        assert_eq!(k(&[], Some("x=1")), None);
        assert_eq!(
            api_key(&headers(&[("x-api-key", "")]), None),
            Err(KeyError::Empty)
        );
        let long = "k".repeat(10_000);
        assert_eq!(
            api_key(&headers(&[("x-api-key", &long)]), None),
            Err(KeyError::TooLong)
        );
        assert_eq!(
            api_key(&HeaderMap::new(), Some("api_key=a%01b")),
            Err(KeyError::BadCharacters)
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let outsider: IpAddr = "203.0.113.1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.9")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(outsider, &h, &trusted),
            outsider,
            "untrusted peers' headers are ignored"
        );
        let bad = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(peer, &bad, &trusted), peer, "malformed: the peer");
        assert_eq!(client_ip(peer, &h, &[]), peer);
    }
}
