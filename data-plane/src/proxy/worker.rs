//! What the requests of one worker thread share, and what those of one client connection do.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;

use crate::config::active::Active;
use crate::policy::balance::hash_bytes;
use crate::policy::retry::RetryBudget;
use crate::shared::Shared;

/// What the requests of one worker thread share.
pub struct Worker {
    pub shared: Arc<Shared>,
    /// Index of the worker thread, selecting its connection pools.
    pub id: usize,
    /// This thread's retry budget (a share of its own traffic).
    pub budget: std::sync::Mutex<RetryBudget>,
    /// This thread's connection to the shared rate-limit store, if one is configured.
    pub redis: Option<crate::redis::RedisConn>,
    /// Rate-limit decisions through Redis, batched per thread.
    pub(crate) limits: Option<crate::ratelimit::Batcher>,
    /// This thread's upgraded connections (WebSockets), for a drain to wait for.
    pub tunnels: super::tunnel::Tunnels,
    /// This thread's handle on the configuration in force, and its version.
    // Deliberately two allocations: the outer count is this thread's alone (see `active`).
    #[allow(clippy::redundant_allocation)]
    active: std::sync::Mutex<Option<(u64, Arc<Arc<Active>>)>>,
}

impl Worker {
    /// Must be called on the worker's own runtime (its Redis connection lives there).
    pub async fn new(shared: Arc<Shared>, id: usize) -> Worker {
        let redis = match &shared.redis {
            Some(link) => link.connect().await,
            None => None,
        };
        let limits = redis.clone().map(crate::ratelimit::Batcher::spawn);
        Worker {
            shared,
            id,
            budget: std::sync::Mutex::new(RetryBudget::new()),
            redis,
            limits,
            tunnels: super::tunnel::Tunnels::default(),
            active: std::sync::Mutex::new(None),
        }
    }

    /// The configuration in force, through this worker's own handle: the handle's count is
    /// touched by this thread only, where cloning the shared one would bounce its count between
    /// cores on every request.
    #[allow(clippy::redundant_allocation)]
    pub fn active(&self) -> Option<Arc<Arc<Active>>> {
        let version = self.shared.generation();
        let mut cached = self.active.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((v, a)) if *v == version => Some(Arc::clone(a)),
            _ => {
                let a = Arc::new(self.shared.active()?);
                *cached = Some((version, Arc::clone(&a)));
                Some(a)
            }
        }
    }

    pub fn budget(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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
