//! Load balancing that survives failure, end to end: health checks, outlier ejection, retries,
//! circuit breakers, the priority queue, drain and removal, the latency-aware strategies, and
//! ip_hash. Data planes in this process, their configuration applied directly, in front of
//! backends whose faults the tests switch at run time (`support/backends.rs`).

#[path = "support/backends.rs"]
mod backends;
#[path = "support/dp.rs"]
mod dp;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use backends::{Backends, Faults};
use bytes::Bytes;
use dp::common::{get, get_with, http_client, send};
use dp::{Dp, poll_until, wait_until};
use http_body_util::Full;
use lb_proto::v1::*;

/// Three backends and a data plane in front of them, with the default policies changed by
/// `adjust`.
async fn stack(adjust: impl FnOnce(&mut ConfigSnapshot)) -> (Backends, Dp) {
    let backends = Backends::start(3).await;
    let dp = serve(&backends, adjust).await;
    (backends, dp)
}

async fn serve(backends: &Backends, adjust: impl FnOnce(&mut ConfigSnapshot)) -> Dp {
    let mut snapshot = dp::snapshot(&backends.addrs());
    adjust(&mut snapshot);
    Dp::start(|_| {}, snapshot).await
}

/// Probes every second (the shortest interval allowed), quick ejections.
fn fast_failover(s: &mut ConfigSnapshot) {
    s.health_check = Some(HealthCheckPolicy {
        path: "/health".into(),
        interval_ms: 1000,
        timeout_ms: 500,
        healthy_threshold: 1,
        unhealthy_threshold: 2,
        jitter_percent: 0,
        ..Default::default()
    });
    s.outlier = Some(OutlierPolicy {
        consecutive_failures: 3,
        base_ejection_ms: 1000,
        max_ejection_ms: 10_000,
        max_ejection_percent: 50,
    });
}

fn refusing() -> Faults {
    Faults {
        refuse_connections: true,
        ..Faults::default()
    }
}

/// Runs `loops` concurrent request loops against `urls` until stopped; counts non-2xx answers.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(urls: Vec<String>, loops: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let client = http_client();
        let tasks = (0..loops)
            .map(|k| {
                let (stop, ok, failed, client) =
                    (stop.clone(), ok.clone(), failed.clone(), client.clone());
                let url = urls[k % urls.len()].clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = get(&client, &url).await;
                        if r.status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            eprintln!("failed: {} {:?}", r.status, r.body);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn wait_for(&self, more: u64) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        let ok = self.ok.clone();
        wait_until("load to progress", || ok.load(Ordering::Relaxed) >= target).await;
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Whether the backend at `addr` is healthy, and whether it is ejected.
fn backend_state(dp: &Dp, addr: std::net::SocketAddr) -> (bool, bool) {
    let active = dp.shared.active().unwrap();
    let e = &active.slots[dp.slot_of(addr)].endpoint;
    let now = data_plane::clock::millis(tokio::time::Instant::now());
    (e.is_healthy(), e.is_ejected(now))
}

#[tokio::test]
async fn killing_a_backend_under_load_costs_no_request_and_it_comes_back() {
    let (backends, dp) = stack(fast_failover).await;
    let load = Load::start(vec![dp.url("/data")], 4);
    load.wait_for(100).await;

    let dead = &backends[0];
    dead.set_faults(refusing());
    wait_until("the dead backend to leave rotation", || {
        let (healthy, ejected) = backend_state(&dp, dead.addr());
        !healthy || ejected
    })
    .await;
    load.wait_for(300).await;

    dead.set_faults(Faults::default());
    dead.reset_stats();
    wait_until("the backend to be healthy and in rotation again", || {
        let (healthy, ejected) = backend_state(&dp, dead.addr());
        healthy && !ejected && dead.requests() > 0
    })
    .await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    let stats = dp.admin_json("/stats").await;
    assert!(
        stats["backends"][0]["ejections"].as_u64().unwrap() >= 1
            || stats["retries"].as_u64().unwrap() > 0
    );
}

#[tokio::test]
async fn all_backends_down_fails_fast_then_recovers() {
    let (backends, dp) = stack(fast_failover).await;
    let client = http_client();
    backends.set_faults(&refusing());
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_secs(5), get(&client, &dp.url("/data")))
            .await
            .expect("an answer, not a hang");
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert!(r.headers.contains_key("retry-after"));
    }
    backends.set_faults(&Faults::default());
    poll_until("a 200 after the backends came back", || async {
        let r = get(&client, &dp.url("/data")).await;
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.status)
        }
    })
    .await;
}

#[tokio::test]
async fn open_circuits_fail_fast_with_retry_after() {
    let (backends, dp) = stack(|s| {
        s.circuit_breaker = Some(dp::breaker(50, 4, 30_000));
        s.outlier = Some(dp::no_ejection());
    })
    .await;
    backends.set_faults(&Faults {
        error_status: 500,
        ..Faults::default()
    });
    let client = http_client();
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let r = get(&client, &dp.url("/data")).await;
        statuses.push(r.status);
        if r.status == 503 {
            assert_eq!(r.json()["error"], "circuit_open");
            let after: u64 = r.header("retry-after").parse().unwrap();
            assert!((1..=30).contains(&after));
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    let served = backends.served("/data");
    let after = get(&client, &dp.url("/data")).await;
    assert_eq!(after.status, 503);
    assert_eq!(
        served,
        backends.served("/data"),
        "an open circuit sends nothing to the backends"
    );
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_after_reaching_a_backend() {
    let (backends, dp) = stack(|_| {}).await;
    let client = http_client();
    let post = http::Request::post(dp.url("/abort"))
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    assert_eq!(send(&client, post).await.status, 502);
    assert_eq!(
        backends.served("/abort"),
        1,
        "a POST that reached a backend is never sent again"
    );
    let r = get(&client, &dp.url("/abort")).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        backends.served("/abort"),
        1 + 3,
        "a GET is tried on every backend (max_attempts 3)"
    );
    let per_backend: Vec<u64> = backends.all().iter().map(|b| b.served("/abort")).collect();
    assert!(
        per_backend.iter().all(|&n| n >= 1),
        "retries go to other backends: {per_backend:?}"
    );
}

#[tokio::test]
async fn priority_queue_serves_enterprise_first_and_sheds_overflow() {
    let (mut backends, dp) = stack(|s| {
        s.queue = Some(QueuePolicy {
            max_in_flight_per_backend: 1,
            capacity: 10,
            timeout_ms: 20_000,
        });
        s.rate_limit.as_mut().unwrap().trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let client = http_client();
    // Every request is held at its backend until the test lets it go: which request a freed
    // slot takes is then the queue's choice alone, one at a time.
    let request = |prio: u32, who: String| {
        let req = get_with(
            &dp.url(&format!("/hold?who={who}")),
            &[("x-priority", &prio.to_string())],
        );
        let client = client.clone();
        tokio::spawn(async move {
            let r = send(&client, req).await;
            (who, r.status, r.headers.contains_key("retry-after"))
        })
    };
    // Fill the three backends' single slots.
    let blockers: Vec<_> = (0..3)
        .map(|i| request(10, format!("blocker-{i}")))
        .collect();
    let mut held = VecDeque::new();
    for _ in 0..3 {
        held.push_back(backends.next_held().await);
    }
    // Then five free-tier and five enterprise requests queue, free first.
    let mut queued = Vec::new();
    for i in 0..5 {
        queued.push(request(10, format!("free-{i}")));
    }
    wait_until("free requests to queue", || {
        dp.shared.admission.depth() == 5
    })
    .await;
    for i in 0..5 {
        queued.push(request(40, format!("enterprise-{i}")));
    }
    wait_until("the queue to fill", || dp.shared.admission.depth() == 10).await;
    // The queue is full: overflow is shed at once.
    let (_, status, retry_after) = request(20, "overflow".into()).await.unwrap();
    assert_eq!((status, retry_after), (503, true));

    // Each request let go frees one slot, which the queue gives to the next it serves.
    let mut served = Vec::new();
    for _ in 0..10 {
        held.pop_front().unwrap().release();
        let next = backends.next_held().await;
        let who = next.target.trim_start_matches("/hold?who=").to_owned();
        served.push(who.split('-').next().unwrap().to_owned());
        held.push_back(next);
    }
    held.into_iter().for_each(backends::Held::release);
    for t in blockers.into_iter().chain(queued) {
        let (who, status, _) = t.await.unwrap();
        assert_eq!(status, 200, "{who}");
    }
    assert_eq!(
        served,
        [["enterprise"; 5], ["free"; 5]].concat(),
        "the order the queue served its requests in"
    );
    assert_eq!(dp.shared.admission.depth(), 0);
}

#[tokio::test]
async fn drain_and_removal_under_load_lose_nothing() {
    let (backends, dp) = stack(|_| {}).await;
    let load = Load::start(vec![dp.url("/slow?ms=5"), dp.url("/data")], 6);
    load.wait_for(100).await;
    let gone = backends[1].addr();
    dp.update(|s| {
        let b = s
            .backends
            .iter_mut()
            .find(|b| b.address == gone.to_string());
        b.unwrap().draining = true;
    });
    let active = dp.shared.active().unwrap();
    let draining = &active.slots[dp.slot_of(gone)].endpoint;
    wait_until("requests in flight to finish", || draining.in_flight() == 0).await;
    let before = backends[1].requests();
    load.wait_for(100).await;
    assert_eq!(
        backends[1].requests(),
        before,
        "a drained backend gets no new request"
    );
    dp.update(|s| s.backends.retain(|b| b.address != gone.to_string()));
    load.wait_for(100).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} of {} failed", ok + failed);
}

/// Each backend's share of `n` GETs of `/data`.
async fn shares(backends: &Backends, dp: &Dp, n: usize) -> Vec<f64> {
    backends.reset_stats();
    let client = http_client();
    for _ in 0..n {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
    backends.shares("/data")
}

#[tokio::test]
async fn latency_aware_strategies_avoid_a_slow_backend_and_come_back_to_it() {
    for strategy in ["least_response_time", "adaptive"] {
        let (backends, dp) = stack(|s| s.strategy = strategy.into()).await;
        // Others answer at once; this one takes 30 ms.
        backends[2].set_faults(Faults {
            latency: Duration::from_millis(30),
            ..Faults::default()
        });
        shares(&backends, &dp, 30).await; // let the averages settle
        let slow = shares(&backends, &dp, 300).await;
        assert!(
            slow[2] < 0.15,
            "{strategy}: slow backend got {:.1}%",
            slow[2] * 100.0
        );
        backends[2].set_faults(Faults::default());
        poll_until(
            &format!("{strategy}: the recovered backend's share"),
            || async {
                let back = shares(&backends, &dp, 150).await[2];
                if back > 0.2 { Ok(()) } else { Err(back) }
            },
        )
        .await;
    }
}

/// The backend (by name) a GET of `/data` with this `x-user` reached through `dp`.
async fn backend_for_user(dp: &Dp, user: &str) -> String {
    let req = http::Request::get("/data")
        .header("host", "localhost")
        .header("x-user", user)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let seen = dp.send(req).await.unwrap();
    assert_eq!(seen.status, 200);
    seen.text()
}

#[tokio::test]
async fn ip_hash_agrees_across_data_planes() {
    let backends = Backends::start(3).await;
    let by_user = |s: &mut ConfigSnapshot| {
        s.strategy = "ip_hash".into();
        s.hash = Some(HashPolicy {
            source: "header".into(),
            name: "x-user".into(),
        });
    };
    let dps = [
        serve(&backends, by_user).await,
        serve(&backends, by_user).await,
    ];
    let mut placement: BTreeMap<String, String> = BTreeMap::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let mut seen = Vec::new();
        for dp in &dps {
            for _ in 0..2 {
                seen.push(backend_for_user(dp, &user).await);
            }
        }
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "{user} moved: {seen:?}"
        );
        placement.insert(user, seen[0].clone());
    }
    let distinct: BTreeSet<_> = placement.values().collect();
    assert_eq!(distinct.len(), 3, "30 users spread over all backends");
}

#[tokio::test]
async fn ip_hash_keeps_each_client_address_on_one_backend_and_spreads_them() {
    let (_backends, dp) = stack(|s| s.strategy = "ip_hash".into()).await;
    // Thirty client machines: each connects from its own loopback address.
    let mut placement: BTreeMap<String, String> = BTreeMap::new();
    for i in 10..40u8 {
        let client = std::net::Ipv4Addr::new(127, 0, 0, i);
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            let (status, backend) = dp::get_as(client, dp.addr, "/data").await;
            assert_eq!(status, 200, "{client}");
            seen.insert(backend);
        }
        assert_eq!(seen.len(), 1, "{client} moved between backends: {seen:?}");
        placement.insert(client.to_string(), seen.pop_first().unwrap());
    }
    let distinct: BTreeSet<_> = placement.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "30 client addresses did not spread over the three backends: {placement:?}"
    );
}

#[tokio::test]
async fn unhealthy_answers_garbage_or_hanging_health_checks_do_not_crash() {
    // A "backend" that answers anything with garbage.
    let garbage = dp::listener().await;
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"\x00\x01 not http at all\r\n\r\n").await;
            });
        }
    });
    let (backends, dp) = stack(|s| {
        fast_failover(s);
        s.backends.push(Backend {
            address: garbage_addr.to_string(),
            weight: 1,
            ..Default::default()
        });
    })
    .await;
    // And one whose health check hangs past the timeout.
    let hanging = &backends[1];
    hanging.set_faults(Faults {
        latency: Duration::from_secs(5),
        ..Faults::default()
    });
    wait_until("garbage and hanging backends to be unhealthy", || {
        !backend_state(&dp, garbage_addr).0 && !backend_state(&dp, hanging.addr()).0
    })
    .await;
    assert!(backend_state(&dp, backends[0].addr()).0 && backend_state(&dp, backends[2].addr()).0);
    for _ in 0..10 {
        let (status, backend) = dp.get("/data").await;
        assert_eq!(status, 200);
        assert_ne!(backend, hanging.name(), "unhealthy backend got traffic");
    }
}
