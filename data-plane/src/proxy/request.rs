//! The request as the proxy passes it on: its id, the hop-by-hop fields taken out, the
//! forwarding fields (`X-Forwarded-For`, `-Proto`, `-Host`, `X-Request-Id`) put in, an
//! origin-form target, and what the balancer keys on (affinity) and the queue orders by
//! (priority).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use super::refusal::Refusal;
use super::tunnel::{self, Upgrade};
use super::request_id::X_REQUEST_ID;
use super::client::ClientConn;
use crate::config::active::{Active, HashSource};
use crate::policy::balance::hash_bytes;
use crate::upstream::Outgoing;
use crate::upstream::request_body::RequestBody;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes the hop-by-hop fields of a message on its way through (RFC 9110 section 7.6.1): the
/// classic set, and those `Connection` names. One pass finds them; most messages carry none.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if crate::upstream::is_hop_by_hop(name) {
            found.push(name.clone());
        }
    }
    if found.is_empty() {
        return;
    }
    for token in super::head::connection_tokens(headers) {
        // `close` and `keep-alive` name no field to remove (or one removed anyway).
        if token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive") {
            continue;
        }
        if let Ok(n) = HeaderName::from_bytes(token)
            && !found.contains(&n)
        {
            found.push(n);
        }
    }
    for n in found {
        headers.remove(n);
    }
}

/// Whether the client's connection closes after this request: `Connection: close`, or HTTP/1.0
/// without `Connection: keep-alive`. HTTP/2 streams share a connection that stays.
pub fn closes_after<B>(req: &Request<B>) -> bool {
    let says = |word: &[u8]| super::head::connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case(word));
    match req.version() {
        Version::HTTP_09 | Version::HTTP_10 => !says(b"keep-alive"),
        Version::HTTP_11 => says(b"close"),
        _ => false,
    }
}

/// Refuses a request head the proxy will not guess about (RFC 9112): `CONNECT` (but RFC 8441's
/// extended one, see [`super::tunnel`]), a transfer coding other than one final `chunked` (the
/// server decodes `chunked` whatever precedes it, and the rest would be dropped silently), and on
/// HTTP/1.1 a missing `Host`, more than one, or one that is not a host and port.
pub fn check_head(parts: &http::request::Parts) -> Result<(), Refusal> {
    if parts.method == http::Method::CONNECT
        && parts.extensions.get::<hyper::ext::Protocol>().is_none()
    {
        return Err(Refusal::MethodNotAllowed);
    }
    let mut codings = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    if let Some(first) = codings.next()
        && (!first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some())
    {
        return Err(Refusal::UnsupportedTransferCoding);
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::BadRequest("more than one Host field"));
    }
    if let Some(h) = host
        && h.to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .is_none_or(|a| a.as_str().contains('@'))
    {
        return Err(Refusal::BadRequest("the Host field is not a host and port"));
    }
    if host.is_none() && parts.version == Version::HTTP_11 && parts.uri.authority().is_none() {
        return Err(Refusal::BadRequest("an HTTP/1.1 request needs a Host field"));
    }
    Ok(())
}

/// What ip_hash keys on: the configured header or cookie when present, else the client address.
pub fn affinity(headers: &HeaderMap, conn: &ClientConn, active: &Active) -> u64 {
    let value = match &active.hash_source {
        HashSource::Ip => None,
        HashSource::Header(name) => headers.get(name).map(HeaderValue::as_bytes),
        HashSource::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes()),
    };
    value.map_or(conn.affinity, hash_bytes)
}

/// Whether the client connection's peer is a proxy in `trusted_proxies`.
fn trusted_peer(conn: &ClientConn, active: &Active) -> bool {
    !active.trusted.is_empty() && active.trusted.iter().any(|n| n.contains(&conn.peer.ip()))
}

/// Queue priority: `X-Priority` from a trusted peer, else `base` (the client's tier's).
pub fn priority(headers: &HeaderMap, conn: &ClientConn, active: &Active, base: u32) -> u32 {
    if trusted_peer(conn, active)
        && let Some(p) = headers
            .get(&X_PRIORITY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
    {
        return p;
    }
    base
}

/// The request rewritten for a backend, with its body: origin-form target, HTTP/1.1, hop-by-hop
/// fields out, forwarding fields in, and the fields of a switch of protocols it asks for. Also
/// whether the client named a host (if not, each attempt names its backend's).
pub fn outgoing(
    mut parts: http::request::Parts,
    conn: &ClientConn,
    active: &Active,
    id: &HeaderValue,
    body: RequestBody,
    upgrade: Option<&Upgrade>,
) -> (Outgoing, bool) {
    // The client's host, kept for the backend (Host) and recorded in X-Forwarded-Host: the
    // target's authority, which wins over `Host` (RFC 9112 section 3.2.2; `:authority` on
    // HTTP/2), else `Host`.
    let host = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(header::HOST).cloned());
    // Origin form on the backend connection: the path and query only.
    parts.uri = match parts.uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    // Backends speak HTTP/1.1 on pooled connections whatever the client spoke; a WebSocket
    // over HTTP/2 becomes the GET that asks for one.
    parts.version = Version::HTTP_11;
    if upgrade == Some(&Upgrade::WebSocketOverH2) {
        parts.method = http::Method::GET;
    }
    let switch = upgrade.map(|u| tunnel::fields(u, &parts.headers));
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok()
        }
        _ => Some(conn.peer_ip.clone()),
    };
    let proto = HeaderValue::from_static(conn.scheme());
    // What a proxy in front says of the request is believed only from a trusted peer; from
    // anyone else it is replaced (the forwarded host, protocol) or left out (the rest).
    let trusted = trusted_peer(conn, active);
    let keep_forwarded_host = trusted && h.contains_key(&X_FORWARDED_HOST);
    if !trusted {
        h.remove(header::FORWARDED);
        h.remove(&X_REAL_IP);
    }
    // The fields the proxy sets, written straight into the backend's head in place of the
    // client's (`None`: the client's left out), rather than edited into its map first. The
    // client's X-Forwarded-For stays as it came if it cannot be extended, and a forwarded host
    // set by a proxy in front is kept.
    let fields = [
        Some((&X_PRIORITY, None)),
        Some((&X_FORWARDED_PROTO, Some(&proto))),
        Some((&header::HOST, host.as_ref())),
        Some((&X_REQUEST_ID, Some(id))),
        xff.as_ref().map(|v| (&X_FORWARDED_FOR, Some(v))),
        (!keep_forwarded_host).then_some((&X_FORWARDED_HOST, host.as_ref())),
    ];
    let switch_fields = switch.iter().flatten().flatten().map(|(n, v)| Some((n, Some(v))));
    let mut set: [(&HeaderName, Option<&HeaderValue>); 10] = [(&X_PRIORITY, None); 10];
    let mut n = 0;
    for f in fields.into_iter().chain(switch_fields).flatten() {
        set[n] = f;
        n += 1;
    }
    let out = Outgoing::with_fields(&parts, &set[..n], body);
    let out = if upgrade.is_some() { out.upgrade() } else { out };
    (out, host.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn a_connection_closes_after_a_request_as_http_1_says() {
        let req = |version, connection: Option<&'static str>| {
            let mut b = Request::builder().version(version);
            if let Some(c) = connection {
                b = b.header(header::CONNECTION, c);
            }
            b.body(()).unwrap()
        };
        assert!(!closes_after(&req(Version::HTTP_11, None)));
        assert!(closes_after(&req(Version::HTTP_11, Some("Close"))));
        assert!(closes_after(&req(Version::HTTP_11, Some("x-a, close"))));
        assert!(!closes_after(&req(Version::HTTP_11, Some("keep-alive"))));
        assert!(closes_after(&req(Version::HTTP_10, None)));
        assert!(!closes_after(&req(Version::HTTP_10, Some("Keep-Alive"))));
        assert!(!closes_after(&req(Version::HTTP_2, Some("close"))));
    }

}
