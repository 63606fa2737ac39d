//! The dashboards: two pages with one script and one style sheet, embedded in the binary (no
//! CDN, no build step, no external fonts), fed by one WebSocket, `/ws`, that pushes the
//! cluster's state about once a second. The JSON views here are shared with the REST endpoints
//! (`/stats`, `/admin/users`, `/logs`), so both surfaces say the same thing the same way.
//!
//! Each socket pulls what it has not sent yet from bounded shared state: the per-second history
//! and the numbered request log in [`crate::traffic::Traffic`]. Nothing is queued per client,
//! so a slow client costs no memory: its task waits on its own send (bounded by
//! [`SEND_TIMEOUT`], then the socket is dropped) and its next message carries everything it
//! missed, up to what is kept.
//!
//! The feed is public, like `/stats`. API keys and the request log are admin data: a socket gets
//! them once its client sends the admin token as a text message `{"token": "…"}` (a browser
//! cannot put an `Authorization` header on a WebSocket). Anything else the client sends is
//! ignored. A socket opened from another site's page (an `Origin` that is not this host) is
//! refused, so a page elsewhere cannot read the feed through the operator's browser.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lb_proto::v1::{ApiKeyInfo, BanInfo, CircuitState, HealthState, RequestLogEntry};
use lb_proto::validate;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::constant_time_eq;
use crate::clock::now_ms;
use crate::cluster::ControlPlane;
use crate::keys;
use crate::traffic::{GONE_AFTER_MS, RATE_WINDOW_S, Second};

/// How often a socket gets the state.
pub const PUSH_EVERY: Duration = Duration::from_secs(1);
/// A client that takes longer than this to accept one message is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from a client: the token message is well under it; a larger one
/// ends the connection (the page reconnects), so a client cannot make the server buffer more.
pub const MAX_CLIENT_MESSAGE: usize = 4096;
/// Request log entries per message; the first admin message carries the last this many.
pub const LOG_PER_MESSAGE: usize = 200;
/// API keys per message, most recently seen first: a page is not the place for all of them.
pub const KEYS_PER_MESSAGE: usize = 500;

const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const RATELIMIT_HTML: &str = include_str!("../assets/ratelimit.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");
/// A 32×32 icon (ICO holding one uncompressed bitmap): the two pages link it, and browsers
/// ask for `/favicon.ico` on their own.
const FAVICON: &[u8] = include_bytes!("../assets/favicon.ico");

/// Same-origin everything; inline script and style are not used, so they are not allowed.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
        ],
        body,
    )
        .into_response()
}

pub async fn balancing_page() -> Response {
    asset("text/html; charset=utf-8", DASHBOARD_HTML)
}

pub async fn ratelimit_page() -> Response {
    asset("text/html; charset=utf-8", RATELIMIT_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

pub async fn favicon() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/x-icon"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        FAVICON,
    )
        .into_response()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn circuit_name(c: i32) -> &'static str {
    match CircuitState::try_from(c) {
        Ok(CircuitState::Closed) => "closed",
        Ok(CircuitState::Open) => "open",
        Ok(CircuitState::HalfOpen) => "half_open",
        _ => "unknown",
    }
}

/// `live`: its Watch stream is open and it reported (or spoke on the stream) within
/// [`GONE_AFTER_MS`]; `gone`: the stream is open but it has been silent longer;
/// `disconnected`: the stream is closed.
fn liveness(connected: bool, last_heard_ms: u64, now_ms: u64) -> &'static str {
    if !connected {
        "disconnected"
    } else if now_ms.saturating_sub(last_heard_ms) <= GONE_AFTER_MS {
        "live"
    } else {
        "gone"
    }
}

/// Requests that got past the rate limits, bans and blocks.
fn allowed(c: &lb_proto::v1::Counters) -> u64 {
    c.requests
        .saturating_sub(c.rate_limited)
        .saturating_sub(c.banned)
        .saturating_sub(c.blocked)
}

/// Requests the data planes answered themselves with a refusal: rate-limited, banned, blocked
/// (or an unknown key), or shed by the admission queue.
fn refused(c: &lb_proto::v1::Counters) -> u64 {
    c.rate_limited + c.banned + c.blocked + c.shed
}

fn second_json(s: &Second) -> Value {
    let c = &s.counters;
    let backends: serde_json::Map<String, Value> = s
        .backends
        .iter()
        .map(|(a, (r, _))| (a.clone(), json!(r)))
        .collect();
    json!({
        "t": s.t,
        "requests": c.requests,
        "allowed": allowed(c),
        "rate_limited": c.rate_limited,
        "banned": c.banned,
        "blocked": c.blocked,
        "shed": c.shed,
        "refused": refused(c),
        "cache_hits": c.cache_hits,
        "errors": c.responses_5xx,
        "forwarded": s.backends.values().map(|(r, _)| r).sum::<u64>(),
        "backends": backends,
    })
}

/// The cluster now: configuration, totals, backends merged over the data planes, the data
/// planes themselves. `/stats` answers it; every `/ws` message starts from it.
pub fn overview(cp: &ControlPlane, now_ms: u64) -> Value {
    let s = cp.snapshot();
    let seen = cp.traffic.backends(now_ms);
    let window = cp.traffic.backend_window(now_ms);
    let reports = cp.traffic.planes();
    let backends: Vec<_> = s
        .backends
        .iter()
        .map(|b| {
            let reported = seen.iter().find(|t| t.address == b.address);
            let t = reported.cloned().unwrap_or_default();
            let w = window.get(&b.address).cloned().unwrap_or_default();
            let health = match reported {
                None => "unknown",
                Some(t) if t.health == HealthState::Unhealthy as i32 => "unhealthy",
                Some(_) => "healthy",
            };
            json!({
                "address": b.address,
                "weight": b.weight,
                "draining": b.draining,
                "requests": t.requests,
                "errors": t.errors,
                "in_flight": t.in_flight,
                "latency_ewma_ms": ms(t.ewma_latency_us),
                "healthy": t.health != HealthState::Unhealthy as i32,
                "ejected": t.ejected,
                "health": health,
                "circuit": circuit_name(t.circuit),
                "requests_per_s": w.requests as f64 / RATE_WINDOW_S as f64,
                "error_rate": (w.requests > 0).then(|| w.errors as f64 / w.requests as f64),
                "latency_p50_ms": w.p50_us.map(ms),
                "latency_p99_ms": w.p99_us.map(ms),
            })
        })
        .collect();
    let mut degraded = Vec::new();
    let planes: Vec<_> = cp
        .data_planes()
        .into_iter()
        .map(|p| {
            let id = p.node.as_ref().map(|n| n.id.clone());
            let report = id.as_ref().and_then(|id| reports.get(id)).cloned();
            let last_report_ms = report.as_ref().map_or(0, |r| r.last_report_ms);
            let live = liveness(p.connected, last_report_ms.max(p.last_seen_ms), now_ms);
            let store_degraded = report.as_ref().is_some_and(|r| r.store_degraded);
            if store_degraded && live == "live" {
                degraded.extend(id.clone());
            }
            json!({
                "id": id,
                "listen": p.node.as_ref().map(|n| n.listen.clone()),
                "connected": p.connected,
                "applied_version": p.applied_version,
                "last_nack_version": p.last_nack_version,
                "last_nack_error": p.last_nack_error,
                "last_seen_ms": p.last_seen_ms,
                "liveness": live,
                "last_report_ms": last_report_ms,
                "store_degraded": store_degraded,
                "queue_depth": report.as_ref().map_or(0, |r| r.queue_depth),
            })
        })
        .collect();
    let c = cp.traffic.totals();
    let last = cp
        .traffic
        .history((now_ms / 1000).saturating_sub(2), now_ms)
        .pop()
        .unwrap_or_default();
    json!({
        "version": s.version,
        "strategy": s.strategy,
        "strategies": validate::STRATEGIES,
        "totals": {
            "requests": c.requests,
            "2xx": c.responses_2xx,
            "3xx": c.responses_3xx,
            "4xx": c.responses_4xx,
            "5xx": c.responses_5xx,
            "rate_limited": c.rate_limited,
            "banned": c.banned,
            "blocked": c.blocked,
            "cache_hits": c.cache_hits,
            "cache_misses": c.cache_misses,
            "retries": c.retries,
            "shed": c.shed,
            "no_backend": c.no_backend,
        },
        "per_second": second_json(&last),
        "rate_window_s": RATE_WINDOW_S,
        "backends": backends,
        "data_planes_reporting": cp.traffic.live(now_ms),
        "data_planes": planes,
        "store_degraded": !degraded.is_empty(),
        "degraded_data_planes": degraded,
        "timestamp_ms": now_ms,
    })
}

/// The longest ban in force on `key_id` among `bans`, in milliseconds from `now_ms` (0: none).
fn banned_for_ms(key_id: &str, bans: &[BanInfo], now_ms: u64) -> u64 {
    bans.iter()
        .filter(|b| b.client.strip_prefix("key:") == Some(key_id))
        .map(|b| b.until_ms.saturating_sub(now_ms))
        .max()
        .unwrap_or(0)
}

/// One API key as `/admin/users` and the dashboard show it. `bans` are the bans in force
/// (`None` when they could not be read): `status` is `blocked`, `banned` or `active`, and
/// `banned_for_ms` the time left on its ban (null when unknown).
pub fn key_json(k: &ApiKeyInfo, bans: Option<&[BanInfo]>, now_ms: u64) -> Value {
    let banned = bans.map(|b| banned_for_ms(&k.key_id, b, now_ms));
    let status = if k.blocked {
        "blocked"
    } else if banned.is_some_and(|ms| ms > 0) {
        "banned"
    } else {
        "active"
    };
    json!({
        "api_key_id": k.key_id,
        "tier": k.tier,
        "blocked": k.blocked,
        "status": status,
        "banned_for_ms": banned,
        "label": k.label,
        "created_at_ms": k.created_at_ms,
        "last_seen_ms": k.last_seen_ms,
        "requests": k.requests,
        "rejected": k.rejected,
    })
}

/// One ban as `/admin/bans` and the dashboard show it. `data_plane` is the one data plane that
/// enforces it, or null when every data plane does (shared state in Redis).
pub fn ban_json(b: &BanInfo, now_ms: u64) -> Value {
    json!({
        "client": b.client,
        "api_key_id": b.client.strip_prefix("key:"),
        "until_ms": b.until_ms,
        "ends_in_ms": b.until_ms.saturating_sub(now_ms),
        "count": b.count,
        "data_plane": (!b.node_id.is_empty()).then_some(&b.node_id),
    })
}

/// One request log entry as `/logs` and the dashboard show it.
pub fn log_json(e: &RequestLogEntry) -> Value {
    json!({
        "timestamp_ms": e.timestamp_ms,
        "request_id": e.request_id,
        "method": e.method,
        "path": e.path,
        "status": e.status,
        "backend": e.backend,
        "latency_ms": ms(e.latency_us),
        "client": e.client,
        "key_id": e.key_id,
        "tier": e.tier,
        "decision": e.decision,
        "data_plane": e.node_id,
        // Identical refusals of one report interval come as one entry.
        "count": e.count.max(1),
    })
}

/// What one socket has sent so far.
#[derive(Default)]
struct Cursor {
    admin: bool,
    /// Last history second sent (Unix seconds); 0 before the first message.
    last_second: u64,
    /// Number of the next request log entry to send.
    log_from: u64,
}

impl Cursor {
    async fn message(&mut self, cp: &ControlPlane, now_ms: u64) -> String {
        let mut v = overview(cp, now_ms);
        let history = cp.traffic.history(self.last_second, now_ms);
        if let Some(last) = history.last() {
            self.last_second = last.t;
        }
        let snapshot = cp.snapshot();
        let tiers: Vec<&str> = snapshot
            .rate_limit
            .iter()
            .flat_map(|rl| rl.tiers.iter().map(|t| t.name.as_str()))
            .collect();
        v["type"] = json!("state");
        v["history"] = history.iter().map(second_json).collect();
        v["tiers"] = json!(tiers);
        v["default_tier"] = json!(keys::default_tier(&snapshot));
        v["admin"] = json!(self.admin);
        if self.admin {
            let bans = crate::ops::bans::list_bans(cp).await;
            let mut all = crate::ops::keys::list(cp);
            let total = all.len();
            all.sort_by(|a, b| {
                (b.last_seen_ms, b.created_at_ms).cmp(&(a.last_seen_ms, a.created_at_ms))
            });
            all.truncate(KEYS_PER_MESSAGE);
            let known = bans.as_deref().ok();
            v["keys"] = all.iter().map(|k| key_json(k, known, now_ms)).collect();
            v["keys_total"] = json!(total);
            match &bans {
                Ok(bans) => v["bans"] = bans.iter().map(|b| ban_json(b, now_ms)).collect(),
                Err(e) => v["bans_error"] = json!(e.to_string()),
            }
            let (log, next) = cp.traffic.log_since(self.log_from, LOG_PER_MESSAGE);
            self.log_from = next;
            v["log"] = log.iter().map(log_json).collect();
        }
        v.to_string()
    }
}

/// The one message a client may send.
#[derive(Deserialize)]
struct ClientMessage {
    token: String,
}

/// Whether a browser page may open the feed: one from a configured public origin, or, with
/// none configured, one from this host when it is named by an IP address or `localhost`. A page
/// whose host name resolved to this address by a DNS name nobody configured (DNS rebinding) has
/// an origin equal to its `Host` too, so matching `Host` is not enough. A request with no
/// `Origin` is not a browser page.
fn allowed_origin(headers: &HeaderMap, public: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().map(str::to_ascii_lowercase) else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if !public.is_empty() {
        return public.iter().any(|p| p == origin);
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    let (Some(o), Some(h)) = (origin_host, host) else {
        return false;
    };
    o.eq_ignore_ascii_case(h)
        && o.parse::<http::uri::Authority>().is_ok_and(|a| {
            a.host() == "localhost"
                || a.host()
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok()
        })
}

/// `GET /ws`: the live feed.
pub async fn ws(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let public = cp.public_origins.get().map_or(&[][..], Vec::as_slice);
    if !allowed_origin(&headers, public) {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": "WebSocket from another origin refused"})),
        )
            .into_response();
    }
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| feed(cp, socket))
}

async fn send(socket: &mut WebSocket, text: String) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

async fn feed(cp: Arc<ControlPlane>, mut socket: WebSocket) {
    let mut cursor = Cursor::default();
    let mut tick = tokio::time::interval(PUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = cp.stopping();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let msg = cursor.message(&cp, now_ms()).await;
                if !send(&mut socket, msg).await {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let Ok(m) = serde_json::from_str::<ClientMessage>(text.as_str()) else {
                        continue;
                    };
                    if constant_time_eq(m.token.as_bytes(), cp.admin_token.as_bytes()) {
                        cursor.admin = true;
                        let msg = cursor.message(&cp, now_ms()).await;
                        if !send(&mut socket, msg).await {
                            break;
                        }
                    } else {
                        cursor.admin = false;
                        let msg = json!({"type": "auth", "admin": false, "error": "wrong admin token"});
                        if !send(&mut socket, msg.to_string()).await {
                            break;
                        }
                    }
                }
                // Pings are answered by the WebSocket layer; binary and pongs mean nothing here.
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
            // Mapped to (): the guard wait_for returns must not live across awaits.
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_names() {
        assert_eq!(liveness(false, 1000, 1000), "disconnected");
        assert_eq!(liveness(true, 1000, 1000 + GONE_AFTER_MS), "live");
        assert_eq!(liveness(true, 1000, 1001 + GONE_AFTER_MS), "gone");
    }

    #[test]
    fn origin_must_be_this_host_when_given() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5000"));
        assert!(allowed_origin(&h, &[]));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:5000"),
        );
        assert!(allowed_origin(&h, &[]));
        for bad in ["http://evil.example", "null", "http://127.0.0.1:5001"] {
            h.insert(header::ORIGIN, HeaderValue::from_static(bad));
            assert!(!allowed_origin(&h, &[]), "{bad}");
        }
        for (host, origin) in [
            ("localhost:5000", "http://localhost:5000"),
            ("[::1]:5000", "http://[::1]:5000"),
        ] {
            h.insert(header::HOST, HeaderValue::from_static(host));
            h.insert(header::ORIGIN, HeaderValue::from_static(origin));
            assert!(allowed_origin(&h, &[]), "{origin}");
        }
    }

    #[test]
    fn a_dns_name_needs_to_be_a_configured_origin() {
        // DNS rebinding: evil.example resolves to this host; its page's origin matches Host.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.example:5000"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example:5000"),
        );
        assert!(!allowed_origin(&h, &[]));
        let public = vec!["https://lb.example.com".to_owned()];
        assert!(!allowed_origin(&h, &public));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://LB.example.com"),
        );
        assert!(allowed_origin(&h, &public));
    }

    #[test]
    fn a_key_with_a_ban_in_force_is_banned_unless_blocked() {
        let key = ApiKeyInfo {
            key_id: "k1".into(),
            ..Default::default()
        };
        let ban = |client: &str, until_ms| BanInfo {
            client: client.into(),
            until_ms,
            count: 1,
            node_id: String::new(),
        };
        let bans = [
            ban("key:k1", 5_000),
            ban("key:k1", 9_000),
            ban("ip:1.2.3.4", 50_000),
        ];
        let v = key_json(&key, Some(&bans), 1_000);
        assert_eq!(
            (&v["status"], &v["banned_for_ms"]),
            (&json!("banned"), &json!(8_000))
        );
        let v = key_json(&key, Some(&bans), 9_000);
        assert_eq!(
            (&v["status"], &v["banned_for_ms"]),
            (&json!("active"), &json!(0))
        );
        let v = key_json(&key, None, 1_000);
        assert_eq!(
            (&v["status"], &v["banned_for_ms"]),
            (&json!("active"), &Value::Null)
        );
        let blocked = ApiKeyInfo {
            blocked: true,
            ..key
        };
        assert_eq!(key_json(&blocked, Some(&bans), 1_000)["status"], "blocked");
    }

    #[test]
    fn allowed_is_what_no_limit_refused() {
        let c = lb_proto::v1::Counters {
            requests: 10,
            rate_limited: 3,
            banned: 2,
            blocked: 1,
            ..Default::default()
        };
        assert_eq!(allowed(&c), 4);
    }
}
