//! What the requests of one client connection share.

use std::net::SocketAddr;

use http::header::HeaderValue;

use crate::policy::balance::hash_bytes;

/// What the requests of one client connection share, computed once per connection.
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The client connected over TLS: backends are told `X-Forwarded-Proto: https`.
    pub tls: bool,
    /// The peer's address as a header value, for X-Forwarded-For.
    pub(crate) peer_ip: HeaderValue,
    /// Hash of the peer's address, for ip_hash.
    pub(crate) affinity: u64,
    /// Told when one of the connection's HTTP/2 streams took nothing for the send timeout: the
    /// connection is then closed, as a stalled HTTP/1 connection is.
    pub stalled: tokio::sync::Notify,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, tls: bool) -> ClientConn {
        let affinity = match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
        };
        ClientConn {
            peer,
            tls,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            affinity,
            stalled: tokio::sync::Notify::new(),
        }
    }

    /// The scheme the client used: "https" or "http".
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}
