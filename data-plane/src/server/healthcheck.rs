//! `healthcheck`: the binaries ask their own listener whether they are ready, for container
//! health checks in images without a shell or curl (Docker's `HEALTHCHECK`, compose's
//! `healthcheck`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;

/// An error and its sources, `outer: inner: …`.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// How long the whole check may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Where to reach a listener bound to `addr`: a wildcard address is asked on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    target
}

/// Whether the listener bound to `addr` accepts a TCP connection (for a listener speaking TLS,
/// which [`healthcheck`] cannot ask over plain HTTP).
pub fn accepts(addr: SocketAddr) -> Result<(), String> {
    let target = reachable(addr);
    std::net::TcpStream::connect_timeout(&target, TIMEOUT)
        .map(drop)
        .map_err(|e| format!("{target}: {e}"))
}

/// GETs `path` from the HTTP listener bound to `addr` (a wildcard address is asked on
/// loopback): `Ok` on 200, else what went wrong.
pub fn healthcheck(addr: SocketAddr, path: &str) -> Result<(), String> {
    let url = format!("http://{}{path}", reachable(addr));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    runtime.block_on(async {
        let client = hyper_util::client::legacy::Client::builder(
            hyper_util::rt::TokioExecutor::new(),
        )
        .build_http::<Empty<Bytes>>();
        let uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        match tokio::time::timeout(TIMEOUT, client.get(uri)).await {
            Err(_) => Err(format!("{url}: no answer in {TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("{url}: {}", causes(&e))),
            Ok(Ok(r)) if r.status() == http::StatusCode::OK => Ok(()),
            Ok(Ok(r)) => Err(format!("{url}: {}", r.status())),
        }
    })
}
