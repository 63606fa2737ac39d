//! End to end: mock backends, the control plane and data planes in one process, talking over
//! real sockets, gRPC and HTTP.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use lb_proto::v1::*;
use tonic::Code;

#[tokio::test]
async fn requests_reach_every_backend_with_forwarding_headers() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let dp = &stack.dps[0];
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let r = get(&client, &dp.url("/data?x=1")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-request-id"].len(), 32);
        let body = r.json();
        assert_eq!(body["query"], "x=1");
        assert_eq!(
            body["request_id"].as_str().unwrap(),
            r.headers["x-request-id"].to_str().unwrap()
        );
        seen.insert(body["backend"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 3, "round robin reaches all three: {seen:?}");

    let req = http::Request::get(dp.url("/echo"))
        .header("x-request-id", "client-id-1")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .header("x-priority", "enterprise")
        .header("host", "api.example.com")
        .body(Full::default())
        .unwrap();
    let r = send(&client, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-request-id"], "client-id-1");
    let echo = r.json();
    let h = &echo["headers"];
    assert_eq!(h["x-request-id"], "client-id-1");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example.com");
    assert_eq!(h["host"], "api.example.com");
    assert!(
        h.get("x-hop").is_none(),
        "header named in Connection is hop-by-hop: {h}"
    );
    assert!(
        h.get("x-priority").is_none(),
        "X-Priority is read by the proxy, never passed on: {h}"
    );

    // An X-Forwarded-Host from a peer that is not a trusted proxy is replaced by the host the
    // client named (a trusted proxy's passes as it came: data-plane/tests/strict_parsing.rs).
    let req = http::Request::get(dp.url("/echo"))
        .header("x-forwarded-host", "www.example.org")
        .header("host", "internal.example.com")
        .body(Full::default())
        .unwrap();
    let h = &send(&client, req).await.json()["headers"];
    assert_eq!(h["x-forwarded-host"], "internal.example.com");
    assert_eq!(h["host"], "internal.example.com");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn ten_megabyte_bodies_stream_both_ways() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let dp = &stack.dps[0];
    let body: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let req = http::Request::post(dp.url("/echo/stream"))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let r = send(&client, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "echoed body differs");

    let r = get(&client, &dp.url("/bytes?n=10485760&chunked=1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 10 * 1024 * 1024);
    assert!(
        r.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8)
    );
}

#[tokio::test]
async fn set_strategy_reaches_two_data_planes_which_acknowledge() {
    let stack = Stack::start(2).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let started = Instant::now();
    let v = admin
        .set_strategy(strategy("least_connections"))
        .await
        .new_version();
    assert_eq!(v, 2);
    stack.cp.wait_acked(&["dp-1", "dp-2"], v).await;
    eprintln!(
        "strategy change acknowledged by 2 data planes in {:?}",
        started.elapsed()
    );
    for dp in &stack.dps {
        assert_eq!(dp.strategy(), "least_connections");
    }
    let planes = admin
        .list_data_planes(ListDataPlanesRequest {})
        .await
        .answer();
    assert_eq!(planes.current_version, v);
    assert_eq!(planes.data_planes.len(), 2);
    assert!(
        planes
            .data_planes
            .iter()
            .all(|p| p.connected && p.applied_version == v)
    );
}

#[tokio::test]
async fn admin_needs_the_token() {
    let stack = Stack::start(0).await;
    let mut none = stack.cp.admin(None).await;
    let e = none.get_strategy(GetStrategyRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong = stack.cp.admin(Some("nope")).await;
    let e = wrong.set_strategy(strategy("ip_hash")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(stack.cp.cp.snapshot().strategy, "round_robin");
}

#[tokio::test]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let stack = Stack::start(0).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let e = admin.set_strategy(strategy("fastest")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for s in lb_proto::validate::STRATEGIES {
        assert!(e.message().contains(s), "{}", e.message());
    }
    let existing = stack.mock.addrs()[0].to_string();
    let cases = [
        AddBackendRequest {
            address: "not-an-address".into(),
            ..Default::default()
        },
        AddBackendRequest {
            address: "10.0.0.1:99999".into(),
            ..Default::default()
        },
        AddBackendRequest {
            address: existing.clone(),
            ..Default::default()
        },
    ];
    for c in cases {
        let e = admin.add_backend(c.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{c:?}");
        assert!(e.message().contains("backend"), "{}", e.message());
    }
    let e = admin
        .set_backend_weight(SetBackendWeightRequest {
            address: existing.clone(),
            weight: 0,
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "weight");
    let e = admin
        .remove_backend(RemoveBackendRequest {
            address: "10.9.9.9:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    stack.cp.assert_unchanged(1);
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
        // A field set to 0 is named in the mask (otherwise 0 keeps the current value).
        let name = field.rsplit('.').next().unwrap().to_owned();
        let e = admin
            .set_policy(SetPolicyRequest {
                policy: Some(policy),
                update_mask: vec![name],
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
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().version, 2);
}

#[tokio::test]
async fn a_cache_purge_travels_to_the_data_planes_and_a_bad_target_is_refused() {
    let stack = Stack::start(1).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let purge = CachePurge {
        target: Some(cache_purge::Target::PathPrefix("/cache".into())),
    };
    let v = admin.purge_cache(purge.clone()).await.new_version();
    // What the data planes do with it is the data plane's (data-plane/tests/cache.rs).
    stack.dps[0].wait_version(v).await;
    let directives = stack.dps[0]
        .shared
        .active()
        .unwrap()
        .snapshot
        .directives
        .clone();
    assert!(
        directives
            .iter()
            .any(|d| d.kind == Some(directive::Kind::Purge(purge.clone()))),
        "{directives:?}"
    );
    for target in [
        cache_purge::Target::PathPrefix("no-slash".into()),
        cache_purge::Target::Key("not-a-key".into()),
        cache_purge::Target::All(false),
    ] {
        let bad = admin
            .purge_cache(CachePurge {
                target: Some(target.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{target:?}");
    }
    stack.cp.assert_unchanged(v);
}

#[tokio::test]
async fn rejected_snapshot_is_nacked_and_the_old_config_keeps_serving() {
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let cp = Cp::start(snapshot_with(&mock.addrs()), None).await;
    let dp = Dp::join_with(&cp.url(), "guarded", |s| {
        s.allowed_backends = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    dp.wait_version(1).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let v = admin
        .add_backend(AddBackendRequest {
            address: "10.255.255.1:80".into(),
            weight: 1,
            ..Default::default()
        })
        .await
        .new_version();
    let mut changes = cp.cp.watch_data_planes();
    let nacked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = cp
                .cp
                .data_planes()
                .into_iter()
                .find(|p| p.last_nack_version == v)
            {
                return p;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("NACK recorded");
    assert_eq!(nacked.applied_version, 1);
    assert!(
        nacked.last_nack_error.contains("10.255.255.1:80"),
        "{}",
        nacked.last_nack_error
    );
    assert_eq!(dp.shared.active().unwrap().version(), 1);
    let client = http_client();
    for _ in 0..4 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
}

#[tokio::test]
async fn control_plane_outage_costs_nothing_and_it_catches_up() {
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
        .await
        .unwrap();
    let dir = TempDir::new("outage");
    let state = dir.join("cp-state.pb");
    let cp = Cp::start(snapshot_with(&mock.addrs()), Some(state.clone())).await;
    let grpc = cp.grpc;
    let http_addr = cp.http;
    let dp = Dp::join(&cp.url(), "survivor").await;
    dp.wait_version(1).await;
    cp.stop().await;

    let client = http_client();
    for _ in 0..6 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }

    // Same address, same state file: a restart of the control plane.
    let grpc_l = tokio::net::TcpListener::bind(grpc).await.unwrap();
    let http_l = tokio::net::TcpListener::bind(http_addr).await.unwrap();
    let cp = Cp::start_on(lb_proto::defaults::snapshot(), Some(state), grpc_l, http_l).await;
    assert_eq!(
        cp.cp.snapshot().backends.len(),
        3,
        "state survived the restart"
    );
    cp.wait_connected("survivor").await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let v = admin
        .set_strategy(strategy("weighted_round_robin"))
        .await
        .new_version();
    assert_eq!(v, 2);
    cp.wait_acked(&["survivor"], v).await;
    assert_eq!(dp.strategy(), "weighted_round_robin");
}

#[tokio::test]
async fn data_plane_boots_from_its_saved_snapshot_when_the_control_plane_is_down() {
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    let dir = TempDir::new("boot");
    let cp = Cp::start(snapshot_with(&mock.addrs()), None).await;
    let url = cp.url();
    let state_dir = dir.join("dp");
    let sd = state_dir.clone();
    let dp = Dp::join_with(&url, "phoenix", move |s| s.state_dir = Some(sd)).await;
    dp.wait_version(1).await;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let v = admin.set_strategy(strategy("ip_hash")).await.new_version();
    cp.wait_acked(&["phoenix"], v).await;
    dp.stop().await;
    cp.stop().await;

    let dp = Dp::join_with(&url, "phoenix", move |s| s.state_dir = Some(state_dir)).await;
    dp.wait_version(v).await;
    assert_eq!(dp.strategy(), "ip_hash");
    let client = http_client();
    assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    let ready = get(&client, &format!("http://{}/readyz", dp.admin)).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["control_plane_connected"], false);
}

#[tokio::test]
async fn reflection_lists_every_service_and_health_says_serving() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let stack = Stack::start(0).await;
    let channel = tonic::transport::Channel::from_shared(stack.cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .answer();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["lb.v1.Admin", "lb.v1.Discovery", "grpc.health.v1.Health"] {
        assert!(names.contains(s), "{s} missing from {names:?}");
    }

    // Describing a symbol works too (what grpcurl does before a call).
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("lb.v1.Admin".into())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .answer();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(MessageResponse::FileDescriptorResponse(_))
    ));

    for service in ["lb.v1.Admin", "lb.v1.Discovery", ""] {
        assert_serving(channel.clone(), service).await;
    }
}

#[tokio::test]
async fn no_usable_backend_is_a_503_saying_why() {
    let stack = Stack::start(1).await;
    let mut admin = stack.cp.admin(Some(TOKEN)).await;
    let mut v = 0;
    for a in stack.mock.addrs() {
        v = admin
            .drain_backend(DrainBackendRequest {
                address: a.to_string(),
                drain: true,
            })
            .await
            .new_version();
    }
    stack.dps[0].wait_version(v).await;
    let r = get(&http_client(), &stack.dps[0].url("/data")).await;
    assert_eq!(r.status, 503);
    let body = r.json();
    assert_eq!(body["error"], "no_backend");
    assert!(
        body["message"].as_str().unwrap().contains("draining"),
        "{body}"
    );
}

#[tokio::test]
async fn backend_closing_mid_response_is_a_502_and_the_pool_recovers() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let dp = &stack.dps[0];
    let r = get(&client, &dp.url("/abort")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "bad_gateway");
    for _ in 0..6 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
}

#[tokio::test]
async fn oversized_headers_and_bodies_are_refused() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let dp = &stack.dps[0];
    let req = http::Request::get(dp.url("/data"))
        .header("x-big", "a".repeat(100 * 1024))
        .body(Full::default())
        .unwrap();
    let r = client.request(req).await.unwrap();
    assert_eq!(r.status(), 431);

    let dp2 = Dp::join_with(&stack.cp.url(), "small-bodies", |s| s.max_body_bytes = 1024).await;
    dp2.wait_version(1).await;
    let req = http::Request::post(dp2.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    assert_eq!(send(&client, req).await.status, 413);
    assert_eq!(get(&client, &dp2.url("/data")).await.status, 200);
}

#[tokio::test]
async fn http2_clients_are_proxied_to_http1_backends() {
    let stack = Stack::start(1).await;
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let r = get(&client, &stack.dps[0].url("/data")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["backend"]
            .as_str()
            .unwrap()
            .starts_with("backend-")
    );
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let mut stack = Stack::start(1).await;
    let client = http_client();
    let url = stack.dps[0].url("/slow?ms=300");
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { get(&client, &url).await }
    });
    let backends = stack.mock.backends().to_vec();
    wait_until("the slow request to reach a backend", || {
        backends
            .iter()
            .any(|b| b.stats().by_path.contains_key("/slow"))
    })
    .await;
    let stopping = stack.dps[0].begin_stop();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "request in flight finished during the drain");
    stopping.await.unwrap().unwrap();
    let refused = tokio::net::TcpStream::connect(stack.dps[0].addr).await;
    assert!(refused.is_err(), "no longer accepting after shutdown");
}

#[tokio::test]
async fn admin_listener_reports_readiness_stats_and_metrics() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let dp = &stack.dps[0];
    for _ in 0..5 {
        get(&client, &dp.url("/data")).await;
    }
    let admin = |p: &str| format!("http://{}{p}", dp.admin);
    assert_eq!(get(&client, &admin("/healthz")).await.status, 200);
    let ready = get(&client, &admin("/readyz")).await;
    assert_eq!(
        (ready.status, ready.json()["version"].as_u64()),
        (200, Some(1))
    );
    let stats = get(&client, &admin("/stats")).await.json();
    assert_eq!(stats["responses"]["2xx"], 5);
    assert_eq!(backend_requests(&stats), 5);
    let metrics = get(&client, &admin("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("lb_http_responses_total{code_class=\"2xx\"} 5"),
        "{text}"
    );
    assert!(text.contains("lb_config_version 1"), "{text}");

    // Not ready before any configuration.
    let lonely = Dp::join("http://127.0.0.1:1", "lonely").await;
    let r = get(&client, &format!("http://{}/readyz", lonely.admin)).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        get(&client, &lonely.url("/data")).await.json()["error"],
        "not_configured"
    );
}

#[tokio::test]
async fn rest_change_strategy_needs_the_token_and_names_bad_input() {
    let stack = Stack::start(1).await;
    let client = http_client();
    let url = format!("http://{}/change_strategy", stack.cp.http);
    let post = |token: Option<&str>, body: &str| {
        let mut b = http::Request::post(&url).header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    };
    assert_eq!(
        send(&client, post(None, r#"{"strategy":"ip_hash"}"#))
            .await
            .status,
        401
    );
    assert_eq!(
        send(&client, post(Some("bad"), r#"{"strategy":"ip_hash"}"#))
            .await
            .status,
        403
    );
    let r = send(&client, post(Some(TOKEN), r#"{"strategy":"warp"}"#)).await;
    r.assert_error(400, "round_robin");
    let r = send(&client, post(Some(TOKEN), r#"{"strat":"ip_hash"}"#)).await;
    r.assert_error(400, "strategy");
    let r = send(&client, post(Some(TOKEN), r#"{"strategy":"ip_hash"}"#)).await;
    assert_eq!(r.status, 200);
    let v = r.json()["version"].as_u64().unwrap();
    stack.dps[0].wait_version(v).await;
    let stats = get(&client, &format!("http://{}/stats", stack.cp.http))
        .await
        .json();
    assert_eq!(stats["strategy"], "ip_hash");
}

#[test]
fn malformed_config_file_exits_non_zero_naming_file_and_key() {
    let dir = TempDir::new("badconf");
    let file = dir.join("broken.toml");
    std::fs::write(&file, "[health_check]\ninterval_ms = \"often\"\n").unwrap();
    let out = serve_command().arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml") && err.contains("interval_ms"),
        "{err}"
    );
}

#[tokio::test]
async fn reports_from_two_data_planes_add_up_on_the_control_plane() {
    let stack = Stack::start(2).await;
    let client = http_client();
    for i in 0..20 {
        assert_eq!(
            get(&client, &stack.dps[i % 2].url("/data")).await.status,
            200
        );
    }
    let admin = stack.cp.admin(Some(TOKEN)).await;
    // Reports arrive once a second: wait for the counts, not for a time.
    let admin = tokio::sync::Mutex::new(admin);
    let stats = poll_within(Duration::from_secs(15), "reports to add up", || async {
        let s = admin.lock().await.get_stats(GetStatsRequest {}).await;
        let s = s.unwrap().into_inner();
        let added_up = s.totals.as_ref().is_some_and(|t| t.requests >= 20);
        if added_up { Ok(s) } else { Err(s) }
    })
    .await;
    let totals = stats.totals.unwrap();
    assert_eq!((totals.requests, totals.responses_2xx), (20, 20));
    assert_eq!(stats.data_planes, 2);
    let per_backend: u64 = stats.backends.iter().map(|b| b.requests).sum();
    assert_eq!(per_backend, 20);
    let rest = get(&client, &format!("http://{}/stats", stack.cp.http))
        .await
        .json();
    assert_eq!(rest["totals"]["requests"], 20);
}

/// Reads one HTTP/1.1 response with a `content-length` off `conn`, keeping what follows it in
/// `buf`; returns its status line.
async fn read_response(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> String {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                buf.drain(..end + 4 + length);
                return head.lines().next().unwrap().to_owned();
            }
        }
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_burst_of_connections_is_spread_over_the_workers_and_all_served() {
    use tokio::io::AsyncWriteExt;
    const WORKERS: usize = 4;
    const CONNECTIONS: usize = 40;
    let mock = mock_backends::MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
        .await
        .unwrap();
    let cp = Cp::start(snapshot_with(&mock.addrs()), None).await;
    let dp = Dp::join_with(&cp.url(), "dp-1", |s| s.workers = WORKERS).await;
    dp.wait_version(1).await;

    // Every client writes two requests the moment it connects, before any worker has it.
    let request =
        b"GET /data HTTP/1.1\r\nhost: t\r\n\r\nGET /data?again=1 HTTP/1.1\r\nhost: t\r\n\r\n";
    let addr = dp.addr;
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
                conn.write_all(request).await.unwrap();
                let mut buf = Vec::new();
                let first = read_response(&mut conn, &mut buf).await;
                let second = read_response(&mut conn, &mut buf).await;
                (conn, [first, second])
            })
        })
        .collect();
    let mut open = Vec::new();
    for c in clients {
        let answered = tokio::time::timeout(WAIT, c).await;
        let (conn, statuses) = answered.expect("both answers within the wait").unwrap();
        assert_eq!(statuses, ["http/1.1 200 ok", "http/1.1 200 ok"]);
        open.push(conn);
    }
    // All still open: each worker serves its share, whichever accepted them.
    let loads: Vec<i64> = (0..WORKERS)
        .map(|w| {
            dp.shared
                .metrics
                .worker_connections
                .with_label_values(&[&w.to_string()])
                .get()
        })
        .collect();
    assert_eq!(loads.iter().sum::<i64>(), CONNECTIONS as i64, "{loads:?}");
    let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
    assert!(max - min <= 3, "connections per worker: {loads:?}");
    drop(open);
    wait_until("the connections to close", || {
        dp.shared.metrics.connections.get() == 0
    })
    .await;
}
