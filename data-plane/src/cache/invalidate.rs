//! Invalidation after unsafe requests (RFC 9111 section 4.4). A non-error response (2xx or
//! 3xx) to a request with a method other than GET, HEAD, OPTIONS and TRACE removes what the
//! cache holds for the target URI, and for the `Location` and `Content-Location` of the
//! response when they name the same origin (same host; a reference without a host is
//! resolved against the target). Both tiers: this data plane's memory, then Redis, then the
//! memory tiers of the other data planes, before the response goes to the client.
//!
//! The other data planes learn of it on a Redis pub/sub channel ([`CHANNEL`]): each one
//! subscribes, removes the named resources from its memory tier, and acknowledges on the
//! invalidating plane's own channel (so acknowledgements cost each plane only its own
//! invalidations). The data plane that invalidates waits for as many acknowledgements as the
//! channel had subscribers when it published, for at most [`ACK_WAIT`], so that a client who
//! got the response to its `PUT` and then asks another data plane does not get the old body
//! from that plane's memory. When Redis held no record of the resources, nothing is published:
//! no data plane filled them recently enough to hold them. A data plane that (re)subscribes clears its memory tier first:
//! it may have missed invalidations while it was not listening. Costs fall on unsafe requests
//! only: a hit never looks at Redis for this.
//!
//! On Redis Cluster a message reaches subscribers on every node, but `PUBLISH` counts only
//! those of the node it went to, so the wait may end before every plane has acknowledged.
//!
//! What remains: a record Redis evicted under memory pressure while a data plane still holds it
//! in memory is not announced; a lookup on another data plane that read the old entry from Redis just
//! before it was deleted may copy it into that plane's memory just after the invalidation
//! reached it; that entry then serves until its freshness ends. And while Redis is
//! unreachable, other data planes are not told at all (their memory tiers are cleared when
//! they subscribe again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Uri};
use tokio::sync::watch;

use super::key::{self, CacheKey, Digest32};
use super::{Cache, shared};
use crate::redis::RedisConn;
use crate::redis::link::Link;

/// The pub/sub channel invalidations travel on.
pub const CHANNEL: &str = "lb:cache:invalidate";
/// Longest wait for the other data planes to acknowledge an invalidation.
pub const ACK_WAIT: Duration = Duration::from_millis(250);
/// Resources one response can invalidate: the target, `Location`, `Content-Location`.
const MAX_TARGETS: usize = 3;
/// Delay before subscribing again after a failure, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the subscription is checked with a ping: a connection that died silently is
/// noticed (and the memory tier cleared on subscribing again) within this.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// True for the methods RFC 9110 section 9.2.1 defines as safe; every other method, unknown
/// ones included, invalidates.
pub fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The resources a response with `status` and `headers` to an unsafe request for `target`
/// (its key as a GET, its host and path) invalidates: none for an error, else the target and
/// the same-origin `Location` and `Content-Location`.
pub fn targets(
    status: StatusCode,
    headers: &HeaderMap,
    target: &CacheKey,
    host: &str,
    ignored_query_params: &[String],
) -> Vec<CacheKey> {
    if !(status.is_success() || status.is_redirection()) {
        return Vec::new();
    }
    let mut out = vec![target.clone()];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(uri) = headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| same_origin(v.trim(), host, target.path()))
        else {
            continue;
        };
        if let Ok(k) = CacheKey::new(&Method::GET, host, &uri, ignored_query_params)
            && !out.contains(&k)
            && out.len() < MAX_TARGETS
        {
            out.push(k);
        }
    }
    out
}

/// A `Location` or `Content-Location` value as a path and query on `host`, when it names
/// the same origin: an absolute path, a relative one (resolved against `base`), or an
/// absolute URI whose authority is `host`.
fn same_origin(value: &str, host: &str, base: &str) -> Option<Uri> {
    if let Some(rest) = value.strip_prefix("//") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        return authority
            .eq_ignore_ascii_case(host)
            .then(|| path_uri(path))
            .flatten();
    }
    if value.starts_with('/') {
        return path_uri(value);
    }
    if value.contains("://") {
        let uri = value.parse::<Uri>().ok()?;
        let http = matches!(uri.scheme_str(), Some("http" | "https"));
        let same = uri
            .authority()
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(host));
        return (http && same)
            .then(|| path_uri(uri.path_and_query().map_or("/", |p| p.as_str())))
            .flatten();
    }
    // Another scheme (`mailto:`), or a reference that is only a query or fragment.
    let first_segment = value.split('/').next().unwrap_or("");
    if first_segment.contains(':') || value.starts_with('?') || value.starts_with('#') {
        return None;
    }
    // A relative path: against the target's directory.
    let dir = &base[..=base.rfind('/').unwrap_or(0)];
    path_uri(&format!("{dir}{value}"))
}

fn path_uri(path: &str) -> Option<Uri> {
    let path = path.split('#').next().unwrap_or("");
    let path = if path.is_empty() { "/" } else { path };
    path.parse::<Uri>().ok().filter(|u| u.scheme().is_none())
}

/// A message: `inv <token> <plane> <hex id>,<hex id>…` on [`CHANNEL`], where `plane` names
/// the invalidating data plane's acknowledgement channel ([`ack_channel`]), and `ack <token>`
/// on that channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Invalidate {
        token: String,
        plane: String,
        ids: Vec<Digest32>,
    },
    Ack {
        token: String,
    },
}

/// The channel a data plane's invalidations are acknowledged on.
pub fn ack_channel(plane: &str) -> String {
    format!("{CHANNEL}:ack:{plane}")
}

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Invalidate { token, plane, ids } => {
                let ids: Vec<String> = ids.iter().map(|i| key::hex(i)).collect();
                format!("inv {token} {plane} {}", ids.join(","))
            }
            Message::Ack { token } => format!("ack {token}"),
        }
    }

    /// `None` for anything else (other senders, garbage): ignored.
    pub fn decode(payload: &[u8]) -> Option<Message> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.split(' ');
        let kind = parts.next()?;
        let token = parts.next().filter(|t| t.len() == 32)?.to_owned();
        match (kind, parts.next(), parts.next(), parts.next()) {
            ("ack", None, _, _) => Some(Message::Ack { token }),
            ("inv", Some(plane), Some(ids), None) if plane.len() == 32 => {
                let ids: Option<Vec<Digest32>> = ids
                    .split(',')
                    .take(MAX_TARGETS)
                    .map(key::parse_id)
                    .collect();
                Some(Message::Invalidate {
                    token,
                    plane: plane.to_owned(),
                    ids: ids?,
                })
            }
            _ => None,
        }
    }
}

/// Invalidations this data plane published and waits to see acknowledged: by token, the
/// acknowledgements counted so far.
pub struct Acks {
    /// This data plane's name on the channel: 128 random bits in hex.
    plane: String,
    waiting: Mutex<HashMap<String, watch::Sender<usize>>>,
    /// Subscribed to [`CHANNEL`] now.
    following: AtomicBool,
}

impl Default for Acks {
    fn default() -> Acks {
        Acks {
            plane: super::fill::new_token(),
            waiting: Mutex::default(),
            following: AtomicBool::new(false),
        }
    }
}

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<usize>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expect(&self, token: &str) -> watch::Receiver<usize> {
        let (tx, rx) = watch::channel(0);
        self.lock().insert(token.to_owned(), tx);
        rx
    }

    fn acknowledged(&self, token: &str) {
        if let Some(tx) = self.lock().get(token) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn forget(&self, token: &str) {
        self.lock().remove(token);
    }
}

impl Cache {
    /// True while this data plane follows the other data planes' invalidations (subscribed
    /// to [`CHANNEL`]).
    pub fn follows_invalidations(&self) -> bool {
        self.inner.acks.following.load(Ordering::Relaxed)
    }

    /// Invalidates `keys` in this data plane's memory, in Redis, and in the memory tiers of
    /// the data planes subscribed to [`CHANNEL`], waiting up to [`ACK_WAIT`] for them. Redis
    /// failures are counted and leave the rest done.
    pub async fn invalidate(&self, redis: Option<&RedisConn>, keys: &[CacheKey], now_ms: u64) {
        let memory = self.memory();
        super::inc_by(&self.inner.counters.invalidated, keys.len() as u64);
        for k in keys {
            memory.invalidate(k.primary()).await;
            self.inner.memo.invalidate(k.primary()).await;
        }
        let Some(mut conn) = self.conn(redis, now_ms) else {
            return;
        };
        let mut removed = 0;
        for k in keys {
            match shared::purge_key(&mut conn, k.primary()).await {
                Ok(n) => removed += n,
                Err(e) => {
                    self.redis_failed(now_ms, &e);
                    return;
                }
            }
        }
        if removed == 0 {
            return;
        }
        let token = super::fill::new_token();
        let ids = keys.iter().map(|k| *k.primary()).collect();
        let msg = Message::Invalidate {
            token: token.clone(),
            plane: self.inner.acks.plane.clone(),
            ids,
        };
        let mut acks = self.inner.acks.expect(&token);
        let published = tokio::time::timeout(
            shared::TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(msg.encode())
                .query_async::<usize>(&mut conn),
        )
        .await;
        match published {
            Ok(Ok(receivers)) => {
                self.redis_ok();
                let all = acks.wait_for(|n| *n >= receivers);
                if tokio::time::timeout(ACK_WAIT, all).await.is_err() {
                    tracing::debug!(
                        receivers,
                        "cache invalidation not acknowledged by every data plane in time"
                    );
                }
            }
            Ok(Err(e)) => self.redis_failed(now_ms, &e.into()),
            Err(_) => self.redis_failed(now_ms, &shared::SharedError::Timeout),
        }
        self.inner.acks.forget(&token);
    }

    /// What a data plane does with a message: an invalidation removes the named resources
    /// from its memory tier and gives the acknowledgement to publish, and the channel to
    /// publish it on; an acknowledgement of its own invalidation is counted.
    pub async fn on_message(&self, payload: &[u8]) -> Option<(String, Message)> {
        match Message::decode(payload)? {
            Message::Invalidate { token, plane, ids } => {
                let memory = self.memory();
                for id in &ids {
                    memory.invalidate(id).await;
                    self.inner.memo.invalidate(id).await;
                }
                Some((ack_channel(&plane), Message::Ack { token }))
            }
            Message::Ack { token } => {
                self.inner.acks.acknowledged(&token);
                None
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Follows [`CHANNEL`] for the life of the data plane: subscribes (on any node of a cluster),
/// clears the memory tier (invalidations may have been missed), then applies each message and
/// acknowledges it. Subscribes again after a failure.
pub async fn follow(cache: Cache, link: Arc<Link>, mut stop: watch::Receiver<bool>) {
    let clients = match link.target().node_clients() {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return,
        Err(e) => {
            tracing::error!(cause = %e, "cannot follow cache invalidations");
            return;
        }
    };
    let Some(mut conn) = link.connect().await else {
        return;
    };
    let mut delay = RETRY_FIRST;
    let mut node = 0;
    loop {
        let client = &clients[node % clients.len()];
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            pubsub
                .subscribe(ack_channel(&cache.inner.acks.plane))
                .await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(1), subscribe) => r,
            () = stopped(&mut stop) => return,
        };
        if let Ok(Ok(pubsub)) = subscribed {
            delay = RETRY_FIRST;
            cache.memory().purge_all();
            cache.inner.acks.following.store(true, Ordering::Relaxed);
            let (mut sink, mut messages) = pubsub.split();
            let mut health = tokio::time::interval(HEALTH_INTERVAL);
            health.tick().await;
            loop {
                let msg = tokio::select! {
                    m = messages.next() => m,
                    _ = health.tick() => {
                        let ping = tokio::time::timeout(shared::TIMEOUT, sink.ping::<redis::Value>());
                        if matches!(ping.await, Ok(Ok(_))) { continue } else { break }
                    }
                    () = stopped(&mut stop) => return,
                };
                let Some(msg) = msg else { break };
                if let Some((channel, ack)) = cache.on_message(msg.get_payload_bytes()).await {
                    let sent = tokio::time::timeout(
                        shared::TIMEOUT,
                        redis::cmd("PUBLISH")
                            .arg(channel)
                            .arg(ack.encode())
                            .query_async::<usize>(&mut conn),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(_))) {
                        tracing::debug!("cache invalidation acknowledgement not sent");
                    }
                }
            }
            cache.inner.acks.following.store(false, Ordering::Relaxed);
            tracing::warn!("lost the subscription to cache invalidations; subscribing again");
        }
        node += 1;
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: &str, path: &str) -> CacheKey {
        CacheKey::new(&Method::GET, host, &path.parse().unwrap(), &[]).unwrap()
    }

    fn found(status: u16, fields: &[(&str, &str)]) -> Vec<CacheKey> {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let target = key("a.example", "/items/7");
        targets(
            StatusCode::from_u16(status).unwrap(),
            &h,
            &target,
            "a.example",
            &[],
        )
    }

    #[test]
    fn s4_4_only_safe_methods_leave_the_cache_alone() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(is_safe(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PUT", "DELETE", "PATCH", "PURGE", "FOO"] {
            assert!(!is_safe(&m.parse().unwrap()), "{m}");
        }
    }

    #[test]
    fn s4_4_targets_are_the_uri_and_same_origin_locations_after_non_error_responses() {
        assert_eq!(found(200, &[]), [key("a.example", "/items/7")]);
        assert_eq!(found(303, &[]).len(), 1);
        assert!(found(404, &[]).is_empty());
        assert!(found(500, &[]).is_empty());
        let got = found(
            201,
            &[
                ("location", "/items/8"),
                ("content-location", "http://A.example/items/9?x=1"),
            ],
        );
        assert_eq!(
            got,
            [
                key("a.example", "/items/7"),
                key("a.example", "/items/8"),
                key("a.example", "/items/9?x=1"),
            ]
        );
        assert_eq!(
            found(201, &[("location", "8")])[1],
            key("a.example", "/items/8"),
            "relative to the target"
        );
        for other in [
            "http://b.example/items/8",
            "//b.example/items/8",
            "mailto:x@a.example",
        ] {
            assert_eq!(found(201, &[("location", other)]).len(), 1, "{other}");
        }
    }

    #[test]
    fn messages_round_trip_and_garbage_is_ignored() {
        let token = "0123456789abcdef0123456789abcdef".to_owned();
        let m = Message::Invalidate {
            token: token.clone(),
            plane: "fedcba9876543210fedcba9876543210".to_owned(),
            ids: vec![[1; 32], [2; 32]],
        };
        assert_eq!(Message::decode(m.encode().as_bytes()), Some(m));
        let a = Message::Ack { token };
        assert_eq!(Message::decode(a.encode().as_bytes()), Some(a));
        for bad in [
            &b""[..],
            b"inv",
            b"inv short 00",
            b"ack 0123456789abcdef0123456789abcdef extra",
            b"inv 0123456789abcdef0123456789abcdef zz",
            b"inv 0123456789abcdef0123456789abcdef short 00",
            b"\xff\xfe",
        ] {
            assert_eq!(Message::decode(bad), None);
        }
    }
}
