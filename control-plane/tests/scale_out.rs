//! Scale-out behind DNS, end to end: three data planes on one port at 127.0.0.1, .2 and .3 (all
//! of 127/8 is local on Linux), one Redis, a control plane on that Redis, and clients that resolve
//! one name, `lb.test`, to the three addresses, as clients of a name with an A record per data
//! plane do. Whichever plane a request reaches, the answer is the same: one rate limit, one
//! cache, one hash placement; and a plane going away costs nothing that a retry on the next
//! address does not fix.
//!
//! The clients open a connection, and so look the name up, for every request, and the resolver
//! rotates its answer on each lookup (round-robin DNS): requests spread evenly and predictably
//! over the planes, and each answer says which plane served it (the connection's peer address).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::{Ready, ready};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::redis_server::RedisServer;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
use hyper_util::rt::TokioExecutor;
use lb_proto::v1::*;
use mock_backends::MockBackends;
use tokio::net::TcpListener;

/// The one name clients know.
const NAME: &str = "lb.test";

/// Where the data planes listen, all on the same port.
const PLANES: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
];

/// Binds one port on every address of [`PLANES`]: a free port on the first, then the same port
/// on the others, again with another port when one of them is taken.
async fn same_port_listeners() -> Vec<TcpListener> {
    const ATTEMPTS: usize = 50;
    for _ in 0..ATTEMPTS {
        let first = TcpListener::bind((PLANES[0], 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for ip in &PLANES[1..] {
            match TcpListener::bind((*ip, port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => break,
            }
        }
        if listeners.len() == PLANES.len() {
            return listeners;
        }
    }
    panic!("no port free on all of {PLANES:?} in {ATTEMPTS} attempts");
}

/// Redis, mock backends, a control plane on Redis and three data planes on Redis, one per
/// address of [`PLANES`], on one port.
struct Fleet {
    redis: RedisServer,
    mock: MockBackends,
    cp: Cp,
    dps: Vec<Dp>,
    port: u16,
}

impl Fleet {
    async fn start(tweak: impl FnOnce(&mut ConfigSnapshot)) -> Fleet {
        let redis = RedisServer::start().await;
        let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
            .await
            .unwrap();
        let mut snapshot = snapshot_with(&mock.addrs());
        tweak(&mut snapshot);
        let cp = Cp::start_redis(snapshot, &redis.url()).await;
        let listeners = same_port_listeners().await;
        let port = listeners[0].local_addr().unwrap().port();
        let mut dps = Vec::new();
        for (i, proxy) in listeners.into_iter().enumerate() {
            let url = redis.url();
            let id = format!("dp-{}", i + 1);
            let dp = Dp::join_on(&cp.url(), &id, proxy, listener().await, move |s| {
                s.redis = Some(url);
            })
            .await;
            dps.push(dp);
        }
        for dp in &dps {
            dp.wait_version(1).await;
        }
        Fleet {
            redis,
            mock,
            cp,
            dps,
            port,
        }
    }

    /// What `lb.test` resolves to.
    fn addrs(&self) -> Vec<SocketAddr> {
        self.dps.iter().map(|d| d.addr).collect()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{NAME}:{}{path}", self.port)
    }

    /// 2xx responses each data plane has sent.
    fn successes(&self) -> Vec<u64> {
        self.dps
            .iter()
            .map(|d| d.shared.metrics.responses[0].get())
            .collect()
    }
}

/// A round-robin DNS server for [`NAME`]: every data plane, the list rotated by one on each
/// lookup.
#[derive(Clone)]
struct Dns {
    addrs: Arc<[SocketAddr]>,
    lookups: Arc<AtomicUsize>,
    /// Lookups answered with each address (by index in `addrs`) first.
    led: Arc<[AtomicU64]>,
}

impl Dns {
    /// Answers with `addrs` rotated by `first` on the first lookup.
    fn new(addrs: &[SocketAddr], first: usize) -> Dns {
        Dns {
            addrs: addrs.into(),
            lookups: Arc::new(AtomicUsize::new(first)),
            led: addrs.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl tower::Service<Name> for Dns {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        if name.as_str() != NAME {
            return ready(Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name}: no such host"),
            )));
        }
        let n = self.lookups.fetch_add(1, Ordering::Relaxed) % self.addrs.len();
        self.led[n].fetch_add(1, Ordering::Relaxed);
        let mut addrs = self.addrs.to_vec();
        addrs.rotate_left(n);
        ready(Ok(addrs.into_iter()))
    }
}

type DnsClient = Client<HttpConnector<Dns>, Full<Bytes>>;

/// A client of [`NAME`] that connects, and so looks the name up, for every request, from
/// `local` when given. hyper-util's connector tries the resolved addresses in order and goes on
/// to the next when a connect fails.
fn dns_client(dns: Dns, local: Option<IpAddr>) -> DnsClient {
    let mut connector = HttpConnector::new_with_resolver(dns);
    connector.set_local_address(local);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// A response, and the data plane that sent it.
struct Answer {
    plane: SocketAddr,
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or("<not text>"))
    }
}

/// Sends `req`; the error says what failed (connect, reset, body) without panicking, so the
/// caller can retry.
async fn fetch(client: &DnsClient, req: http::Request<Full<Bytes>>) -> Result<Answer, String> {
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let plane = resp
        .extensions()
        .get::<HttpInfo>()
        .map(HttpInfo::remote_addr)
        .ok_or("no connection info on the response")?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body from {plane}: {e:?}"))?
        .to_bytes();
    Ok(Answer {
        plane,
        status,
        headers,
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_key_gets_exactly_five_through_one_name_over_three_planes() {
    let fleet = Fleet::start(|_| {}).await;
    let key = fleet
        .cp
        .admin(Some(TOKEN))
        .await
        .create_api_key(new_key("", "scale-out"))
        .await
        .answer();
    assert_eq!(key.tier, "free", "a key created without a tier is free");

    let client = dns_client(Dns::new(&fleet.addrs(), 0), None);
    let url = fleet.url("/data");
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let (client, req) = (
                client.clone(),
                get_with(&url, &[("x-api-key", &key.api_key)]),
            );
            tokio::spawn(async move { fetch(&client, req).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(
            t.await
                .unwrap()
                .expect("every request of the burst answered"),
        );
    }
    // plane -> (admitted, refused)
    let mut by_plane: BTreeMap<SocketAddr, (u32, u32)> = BTreeMap::new();
    for a in &answers {
        let counts = by_plane.entry(a.plane).or_default();
        if a.status == 200 {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    assert_eq!(
        by_plane.len(),
        3,
        "the burst did not reach all three planes (plane -> (admitted, refused)): {by_plane:?}"
    );
    let admitted: u32 = by_plane.values().map(|c| c.0).sum();
    assert_eq!(
        admitted, 5,
        "a free key (5 per 60 s) got {admitted} of 300 requests through; shared through Redis the \
         limit must hold across planes (plane -> (admitted, refused)): {by_plane:?}"
    );
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(
            a.status, 429,
            "a refused request from {} was not a 429: {:?}",
            a.plane, a.body
        );
        let retry_after = a.header("retry-after");
        assert!(
            retry_after.parse::<u64>().is_ok_and(|s| s > 0),
            "a 429 from {} has Retry-After {retry_after:?}, not a positive number of seconds",
            a.plane
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cached_through_one_plane_is_a_hit_through_the_other_two() {
    let fleet = Fleet::start(|s| {
        s.cache = Some(CachePolicy {
            enabled: true,
            ..lb_proto::defaults::cache()
        });
    })
    .await;
    let client = dns_client(Dns::new(&fleet.addrs(), 0), None);
    let url = fleet.url("/cacheable?max_age=60");
    let fill = fetch(&client, get_with(&url, &[])).await.unwrap();
    assert_eq!(
        (fill.status, fill.header("x-cache")),
        (200, "MISS"),
        "the first request, through {}, should miss and fill",
        fill.plane
    );
    fleet.redis.wait_for_cache_entries(1).await;
    let mut planes = BTreeSet::from([fill.plane]);
    for _ in 0..2 {
        let hit = fetch(&client, get_with(&url, &[])).await.unwrap();
        assert_eq!(
            (hit.status, hit.header("x-cache")),
            (200, "HIT"),
            "filled through {}, but not a hit through {}",
            fill.plane,
            hit.plane
        );
        assert_eq!(
            hit.body, fill.body,
            "{} served another body than the one stored through {}",
            hit.plane, fill.plane
        );
        planes.insert(hit.plane);
    }
    assert_eq!(
        planes.len(),
        3,
        "the three requests did not reach the three planes: {planes:?}"
    );
    assert_eq!(
        served(&fleet.mock, "/cacheable"),
        1,
        "the backends saw more than the one request that filled the cache"
    );
}

/// One client of the hash tests: where it connects from, and the user header it sends.
struct Visitor {
    who: String,
    local: Option<IpAddr>,
    user: Option<String>,
}

/// Sends each client's requests through the name, twice per plane (so each reaches every
/// plane); checks that each client stays on one backend; returns client -> backend.
async fn placements(fleet: &Fleet, clients: &[Visitor]) -> BTreeMap<String, String> {
    let mut placement = BTreeMap::new();
    for Visitor { who, local, user } in clients {
        let client = dns_client(Dns::new(&fleet.addrs(), 0), *local);
        let headers: Vec<(&str, &str)> = user.iter().map(|u| ("x-user", u.as_str())).collect();
        // plane -> backends it sent this client to
        let mut seen: BTreeMap<SocketAddr, BTreeSet<String>> = BTreeMap::new();
        for _ in 0..2 * PLANES.len() {
            let a = fetch(&client, get_with(&fleet.url("/data"), &headers))
                .await
                .unwrap();
            assert_eq!(a.status, 200, "{who} through {}: {:?}", a.plane, a.body);
            let backend = a.header("x-backend").to_owned();
            assert!(!backend.is_empty(), "no X-Backend from {}", a.plane);
            seen.entry(a.plane).or_default().insert(backend);
        }
        assert_eq!(
            seen.len(),
            PLANES.len(),
            "{who} did not reach every plane: {seen:?}"
        );
        let backends: BTreeSet<&String> = seen.values().flatten().collect();
        assert_eq!(
            backends.len(),
            1,
            "{who} landed on different backends (plane -> backends): {seen:?}"
        );
        placement.insert(who.clone(), backends.into_iter().next().unwrap().clone());
    }
    placement
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_puts_a_client_address_on_one_backend_whichever_plane_it_reaches() {
    let fleet = Fleet::start(|s| s.strategy = "ip_hash".into()).await;
    // Distinct clients: each connects from its own loopback address.
    let clients: Vec<_> = (1..=12u8)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
            Visitor {
                who: ip.to_string(),
                local: Some(ip),
                user: None,
            }
        })
        .collect();
    let placement = placements(&fleet, &clients).await;
    let distinct: BTreeSet<_> = placement.values().collect();
    assert!(
        distinct.len() >= 2,
        "12 client addresses all hashed to one backend: {placement:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_on_a_header_puts_a_user_on_one_backend_whichever_plane_it_reaches() {
    let fleet = Fleet::start(|s| {
        s.strategy = "ip_hash".into();
        s.hash = Some(HashPolicy {
            source: "header".into(),
            name: "x-user".into(),
        });
    })
    .await;
    let users: Vec<_> = (0..30)
        .map(|u| {
            let user = format!("user-{u}");
            Visitor {
                who: user.clone(),
                local: None,
                user: Some(user),
            }
        })
        .collect();
    let placement = placements(&fleet, &users).await;
    let distinct: BTreeSet<_> = placement.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "30 users did not spread over the three backends: {placement:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plane_stopped_mid_run_costs_nothing_a_retry_on_the_next_address_does_not_fix() {
    const LOOPS: usize = 6;
    const VICTIM: usize = 1;
    let mut fleet = Fleet::start(|_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped_plane = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let url = fleet.url("/data");
    let mut dnses = Vec::new();
    let loops: Vec<_> = (0..LOOPS)
        .map(|k| {
            // Each loop its own lookups, so a retry looks up again and leads with the address
            // after the one that failed.
            let dns = Dns::new(&fleet.addrs(), k);
            dnses.push(dns.clone());
            let client = dns_client(dns, None);
            let (stop, stopped_plane, ok, url) =
                (stop.clone(), stopped_plane.clone(), ok.clone(), url.clone());
            tokio::spawn(async move {
                // Requests that did not end with a 200, and the retried ones (whether they
                // started once the plane was down, and why the first attempt failed).
                let mut failures = Vec::new();
                let mut retried = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let after_stop = stopped_plane.load(Ordering::Relaxed);
                    let answer = match fetch(&client, get_with(&url, &[])).await {
                        Ok(a) => Ok(a),
                        Err(first) => {
                            retried.push((after_stop, format!("request {n}: {first}")));
                            fetch(&client, get_with(&url, &[]))
                                .await
                                .map_err(|again| format!("{first}; then, retried: {again}"))
                        }
                    };
                    match answer {
                        Ok(a) if a.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(a) => failures.push(format!(
                            "request {n}: {} from {}: {:?}",
                            a.status, a.plane, a.body
                        )),
                        Err(e) => failures.push(format!("request {n}: {e}")),
                    }
                }
                (failures, retried)
            })
        })
        .collect();

    let progress = |more: u64| {
        let ok = ok.clone();
        let target = ok.load(Ordering::Relaxed) + more;
        async move {
            wait_until("the loops to progress", || {
                ok.load(Ordering::Relaxed) >= target
            })
            .await
        }
    };
    progress(60).await;
    // Mid-run: the loops keep going while the plane drains and closes its listener.
    let stopping = fleet.dps[VICTIM].begin_stop();
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the stopped plane drained within 10 s")
        .unwrap()
        .unwrap();
    stopped_plane.store(true, Ordering::Relaxed);
    let led_by_victim = |dnses: &[Dns]| -> u64 {
        dnses
            .iter()
            .map(|d| d.led[VICTIM].load(Ordering::Relaxed))
            .sum()
    };
    let led_at_stop = led_by_victim(&dnses);
    let served_at_stop = fleet.successes();
    progress(150).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut retried = Vec::new();
    for l in loops {
        let (f, r) = l.await.unwrap();
        failures.extend(f);
        retried.extend(r);
    }
    let served_after = fleet.successes();
    eprintln!(
        "{} requests ok; 2xx per plane at the stop {served_at_stop:?}, at the end \
         {served_after:?}; retried: {retried:#?}",
        ok.load(Ordering::Relaxed)
    );
    let late_retries: Vec<_> = retried.iter().filter(|(late, _)| *late).collect();

    assert!(
        failures.is_empty(),
        "requests that did not end with a 200, even after a retry on the next address: {failures:#?}"
    );
    assert!(
        late_retries.is_empty(),
        "once the plane was down, a request still needed a retry (connect errors should fall over \
         to the next address by themselves): {late_retries:#?}"
    );
    let led_after_stop = led_by_victim(&dnses) - led_at_stop;
    assert!(
        led_after_stop > 0,
        "no lookup after the stop led with the stopped plane: its failover went untested"
    );
    assert_eq!(
        served_after[VICTIM], served_at_stop[VICTIM],
        "the stopped plane answered after it stopped"
    );
    for (i, (after, before)) in served_after.iter().zip(&served_at_stop).enumerate() {
        assert!(
            i == VICTIM || after > before,
            "plane {} served nothing after the stop: {served_at_stop:?} -> {served_after:?}",
            fleet.dps[i].addr
        );
    }
}
