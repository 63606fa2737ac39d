//! Load balancing that survives failure, end to end: health checks, outlier ejection, retries,
//! circuit breakers, the priority queue, drain, and the latency-aware strategies.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use lb_proto::v1::*;
use mock_backends::Faults;
use tonic::Code;

/// Probes every second (the shortest interval allowed), quick ejections.
fn fast_failover(s: &mut ConfigSnapshot) {
    s.health_check = Some(HealthCheckPolicy {
        path: "/health".into(),
        interval_ms: 1000,
        timeout_ms: 500,
        healthy_threshold: 1,
        unhealthy_threshold: 2,
        jitter_percent: 0,
    });
    s.outlier = Some(OutlierPolicy {
        consecutive_failures: 3,
        base_ejection_ms: 1000,
        max_ejection_ms: 10_000,
        max_ejection_percent: 50,
    });
}

/// Runs `loops` concurrent request loops against `url` until stopped; counts non-2xx answers.
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
        eventually("load to progress", || ok.load(Ordering::Relaxed) >= target).await;
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

fn backend_state(dp: &Dp, i: usize) -> (bool, bool) {
    let active = dp.shared.active().unwrap();
    let e = &active.slots[i].endpoint;
    let now = data_plane::clock::millis(tokio::time::Instant::now());
    (e.is_healthy(), e.is_ejected(now))
}

#[tokio::test]
async fn killing_a_backend_under_load_costs_no_request_and_it_comes_back() {
    let stack = Stack::start_with(1, fast_failover).await;
    let dp = &stack.dps[0];
    let load = Load::start(vec![dp.url("/data")], 4);
    load.wait_for(100).await;

    let dead = stack.mock.backend(0).clone();
    dead.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    eventually("the dead backend to leave rotation", || {
        let (healthy, ejected) = backend_state(dp, 0);
        !healthy || ejected
    })
    .await;
    load.wait_for(300).await;

    dead.set_faults(Faults::default());
    dead.reset_stats();
    eventually("the backend to be healthy and in rotation again", || {
        let (healthy, ejected) = backend_state(dp, 0);
        healthy && !ejected && dead.stats().requests_total > 0
    })
    .await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    let stats = get(&http_client(), &format!("http://{}/stats", dp.admin))
        .await
        .json();
    assert!(
        stats["backends"][0]["ejections"].as_u64().unwrap() >= 1
            || stats["retries"].as_u64().unwrap() > 0
    );
}

#[tokio::test]
async fn all_backends_down_fails_fast_then_recovers() {
    let stack = Stack::start_with(1, fast_failover).await;
    let dp = &stack.dps[0];
    let client = http_client();
    for b in stack.mock.backends() {
        b.set_faults(Faults {
            refuse_connections: true,
            ..Faults::default()
        });
    }
    for _ in 0..5 {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            get(&client, &dp.url("/data")),
        )
        .await
        .expect("an answer, not a hang");
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert!(r.headers.contains_key("retry-after"));
    }
    for b in stack.mock.backends() {
        b.set_faults(Faults::default());
    }
    let mut recovered = false;
    for _ in 0..200 {
        if get(&client, &dp.url("/data")).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(recovered, "no 200 after the backends came back");
}

#[tokio::test]
async fn open_circuits_fail_fast_with_retry_after() {
    let stack = Stack::start_with(1, |s| {
        s.circuit_breaker = Some(CircuitBreakerPolicy {
            failure_rate_percent: 50,
            window_ms: 10_000,
            min_requests: 4,
            open_ms: 30_000,
            half_open_trials: 1,
        });
        s.outlier = Some(OutlierPolicy {
            consecutive_failures: 0,
            ..lb_proto::defaults::outlier()
        });
    })
    .await;
    for b in stack.mock.backends() {
        b.set_faults(Faults {
            error_status: 500,
            ..Faults::default()
        });
    }
    let client = http_client();
    let dp = &stack.dps[0];
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let r = get(&client, &dp.url("/data")).await;
        statuses.push(r.status);
        if r.status == 503 {
            assert_eq!(r.json()["error"], "circuit_open");
            let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=30).contains(&after));
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    let served: u64 = stack
        .mock
        .backends()
        .iter()
        .map(|b| b.stats().requests_total)
        .sum();
    let after = get(&client, &dp.url("/data")).await;
    assert_eq!(after.status, 503);
    let served_after: u64 = stack
        .mock
        .backends()
        .iter()
        .map(|b| b.stats().requests_total)
        .sum();
    assert_eq!(
        served, served_after,
        "an open circuit sends nothing to the backends"
    );
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_after_reaching_a_backend() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let dp = &stack.dps[0];
    let r = send(
        &client,
        http::Request::post(dp.url("/abort"))
            .body(Full::new(Bytes::from("x")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 502);
    let hits = |s: &Stack| -> u64 {
        s.mock
            .backends()
            .iter()
            .map(|b| b.stats().by_path.get("/abort").copied().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        hits(&stack),
        1,
        "a POST that reached a backend is never sent again"
    );
    let r = get(&client, &dp.url("/abort")).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        hits(&stack),
        1 + 3,
        "a GET is tried on every backend (max_attempts 3)"
    );
    let per_backend: Vec<u64> = stack
        .mock
        .backends()
        .iter()
        .map(|b| b.stats().by_path.get("/abort").copied().unwrap_or(0))
        .collect();
    assert!(
        per_backend.iter().all(|&n| n >= 1),
        "retries go to other backends: {per_backend:?}"
    );
}

#[tokio::test]
async fn priority_queue_serves_enterprise_first_and_sheds_overflow() {
    let stack = Stack::start_with(1, |s| {
        s.queue = Some(QueuePolicy {
            max_in_flight_per_backend: 1,
            capacity: 10,
            timeout_ms: 20_000,
        });
        s.rate_limit.as_mut().unwrap().trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let dp = &stack.dps[0];
    let client = http_client();
    let request = |prio: u32, ms: u32| {
        let client = client.clone();
        let url = dp.url(&format!("/slow?ms={ms}"));
        tokio::spawn(async move {
            let req = http::Request::get(url)
                .header("x-priority", prio.to_string())
                .body(Full::default())
                .unwrap();
            let r = send(&client, req).await;
            (
                prio,
                r.status,
                r.headers.get("retry-after").is_some(),
                tokio::time::Instant::now(),
            )
        })
    };
    // Fill the three backends' single slots with long requests.
    let blockers: Vec<_> = (0..3).map(|_| request(10, 400)).collect();
    let in_flight = || {
        dp.shared
            .active()
            .unwrap()
            .slots
            .iter()
            .map(|s| s.endpoint.in_flight())
            .sum::<u32>()
    };
    eventually("the slots to fill", || in_flight() == 3).await;
    // Then five free-tier and five enterprise requests queue, free first.
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(request(10, 50));
    }
    eventually("free requests to queue", || {
        dp.shared.admission.depth() == 5
    })
    .await;
    for _ in 0..5 {
        queued.push(request(40, 50));
    }
    eventually("the queue to fill", || dp.shared.admission.depth() == 10).await;
    // The queue is full: overflow is shed at once.
    let overflow = request(20, 50).await.unwrap();
    assert_eq!((overflow.1, overflow.2), (503, true));

    let mut done = Vec::new();
    for t in queued {
        done.push(t.await.unwrap());
    }
    for b in blockers {
        assert_eq!(b.await.unwrap().1, 200);
    }
    assert!(done.iter().all(|d| d.1 == 200), "{done:?}");
    // Three slots serve the queue in rounds: enterprise requests leave it first, so the first
    // three to finish are enterprise ones and the last three free ones (the round in between
    // mixes the last enterprise requests with the first free one).
    let mut order: Vec<_> = done.iter().map(|d| (d.3, d.0)).collect();
    order.sort();
    let prios: Vec<u32> = order.iter().map(|o| o.1).collect();
    assert_eq!(&prios[..3], &[40, 40, 40], "{prios:?}");
    assert_eq!(&prios[7..], &[10, 10, 10], "{prios:?}");
    assert_eq!(dp.shared.admission.depth(), 0);
}

#[tokio::test]
async fn drain_and_removal_under_load_lose_nothing() {
    let stack = Stack::start(1).await;
    let dp = &stack.dps[0];
    let load = Load::start(vec![dp.url("/slow?ms=5"), dp.url("/data")], 6);
    load.wait_for(100).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let gone = stack.mock.addrs()[1].to_string();
    let v = admin
        .drain_backend(DrainBackendRequest {
            address: gone.clone(),
            drain: true,
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    dp.wait_version(v).await;
    let draining = stack.mock.backend(1).clone();
    eventually("requests in flight to finish", || {
        dp.shared.active().unwrap().slots[1].endpoint.in_flight() == 0
    })
    .await;
    let before = draining.stats().requests_total;
    load.wait_for(100).await;
    assert_eq!(
        draining.stats().requests_total,
        before,
        "a drained backend gets no new request"
    );
    let v = admin
        .remove_backend(RemoveBackendRequest { address: gone })
        .await
        .unwrap()
        .into_inner()
        .version;
    dp.wait_version(v).await;
    load.wait_for(100).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} of {} failed", ok + failed);
}

async fn shares(stack: &Stack, dp: &Dp, n: usize) -> Vec<f64> {
    for b in stack.mock.backends() {
        b.reset_stats();
    }
    let client = http_client();
    for _ in 0..n {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
    let counts: Vec<u64> = stack
        .mock
        .backends()
        .iter()
        .map(|b| b.stats().by_path.get("/data").copied().unwrap_or(0))
        .collect();
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| c as f64 / total as f64).collect()
}

#[tokio::test]
async fn latency_aware_strategies_avoid_a_slow_backend_and_come_back_to_it() {
    for strategy in ["least_response_time", "adaptive"] {
        let stack = Stack::start_with(1, |s| s.strategy = strategy.into()).await;
        let dp = &stack.dps[0];
        // Others answer in about a millisecond; this one takes 30 ms.
        stack.mock.backend(2).set_faults(Faults {
            latency_ms: 30,
            ..Faults::default()
        });
        shares(&stack, dp, 30).await; // let the averages settle
        let slow = shares(&stack, dp, 300).await;
        assert!(
            slow[2] < 0.15,
            "{strategy}: slow backend got {:.1}%",
            slow[2] * 100.0
        );
        stack.mock.backend(2).set_faults(Faults::default());
        let mut back = 0.0;
        for _ in 0..20 {
            back = shares(&stack, dp, 150).await[2];
            if back > 0.2 {
                break;
            }
        }
        assert!(
            back > 0.2,
            "{strategy}: recovered backend only got {:.1}%",
            back * 100.0
        );
    }
}

#[tokio::test]
async fn ip_hash_agrees_across_data_planes() {
    let stack = Stack::start_with(2, |s| {
        s.strategy = "ip_hash".into();
        s.hash = Some(HashPolicy {
            source: "header".into(),
            name: "x-user".into(),
        });
    })
    .await;
    let client = http_client();
    let mut placement: BTreeMap<String, String> = BTreeMap::new();
    for user in 0..30 {
        let mut seen = Vec::new();
        for dp in &stack.dps {
            for _ in 0..2 {
                let req = http::Request::get(dp.url("/data"))
                    .header("x-user", format!("user-{user}"))
                    .body(Full::default())
                    .unwrap();
                seen.push(
                    send(&client, req).await.json()["backend"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "user-{user} moved: {seen:?}"
        );
        placement.insert(format!("user-{user}"), seen[0].clone());
    }
    let distinct: std::collections::BTreeSet<_> = placement.values().collect();
    assert_eq!(distinct.len(), 3, "30 users spread over all backends");
}

#[tokio::test]
async fn unhealthy_answers_garbage_or_hanging_health_checks_do_not_crash() {
    // A "backend" that answers anything with garbage.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = garbage.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"\x00\x01 not http at all\r\n\r\n").await;
            });
        }
    });
    let stack = Stack::start_with(1, |s| {
        fast_failover(s);
        s.backends.push(Backend {
            address: garbage_addr.to_string(),
            weight: 1,
            ..Default::default()
        });
    })
    .await;
    let dp = &stack.dps[0];
    // And one whose health check hangs past the timeout.
    stack.mock.backend(1).set_faults(Faults {
        latency_ms: 5_000,
        ..Faults::default()
    });
    eventually("garbage and hanging backends to be unhealthy", || {
        !backend_state(dp, 3).0 && !backend_state(dp, 1).0
    })
    .await;
    assert!(backend_state(dp, 0).0 && backend_state(dp, 2).0);
    let client = http_client();
    for _ in 0..10 {
        let r = get(&client, &dp.url("/data")).await;
        assert_eq!(r.status, 200);
        let b = r.json()["backend"].as_str().unwrap().to_owned();
        assert!(
            b != stack.mock.backend(1).name(),
            "unhealthy backend got traffic"
        );
    }
}

#[tokio::test]
async fn bad_policies_are_refused_naming_the_field() {
    let stack = Stack::start(0).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    use set_policy_request::Policy;
    let cases = [
        (
            Policy::HealthCheck(HealthCheckPolicy {
                path: "health".into(),
                ..lb_proto::defaults::health_check()
            }),
            "health_check.path",
        ),
        (
            Policy::HealthCheck(HealthCheckPolicy {
                unhealthy_threshold: 0,
                ..lb_proto::defaults::health_check()
            }),
            "health_check.unhealthy_threshold",
        ),
        (
            Policy::Queue(QueuePolicy {
                timeout_ms: 0,
                ..lb_proto::defaults::queue()
            }),
            "queue.timeout_ms",
        ),
        (
            Policy::Outlier(OutlierPolicy {
                max_ejection_percent: 101,
                ..lb_proto::defaults::outlier()
            }),
            "outlier.max_ejection_percent",
        ),
        (
            Policy::Retry(RetryPolicy {
                max_attempts: 9,
                ..lb_proto::defaults::retry()
            }),
            "retry.max_attempts",
        ),
    ];
    for (policy, field) in cases {
        let e = admin
            .set_policy(SetPolicyRequest {
                policy: Some(policy),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    assert_eq!(stack.cp.cp.snapshot().version, 1);
    let ok = admin
        .set_policy(SetPolicyRequest {
            policy: Some(Policy::Retry(RetryPolicy {
                max_attempts: 2,
                ..lb_proto::defaults::retry()
            })),
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().version, 2);
}
