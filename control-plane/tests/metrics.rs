//! `/metrics` of a data plane and of the control plane, read with a Prometheus text parser:
//! well formed, conventionally named, and counting exactly the requests sent.

mod common;
#[path = "common/prom.rs"]
mod prom;

use common::*;

const SENT: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_the_requests_sent() {
    let stack = Stack::start(1).await;
    let dp = &stack.dps[0];
    let client = http_client();
    for i in 0..SENT {
        let path = if i % 10 == 9 {
            "/status/500"
        } else {
            "/api/data"
        };
        get(&client, &dp.url(path)).await;
    }
    let metrics_url = format!("http://{}/metrics", dp.admin);

    // Per-backend counters are updated as responses finish: wait for the last one.
    let m = poll_until(
        "the backend request counters to reach the number sent",
        || async {
            let reply = get(&client, &metrics_url).await;
            assert_eq!(reply.status, 200);
            let text = String::from_utf8(reply.body.to_vec()).unwrap();
            let parsed = prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let counted = parsed.sum("lb_backend_requests_total", &[]);
            if counted as usize >= SENT {
                Ok(parsed)
            } else {
                Err(counted)
            }
        },
    )
    .await;

    let n = SENT as f64;
    assert_eq!(m.sum("lb_http_responses_total", &[]), n);
    assert_eq!(
        m.sum("lb_http_responses_total", &[("code_class", "5xx")]),
        3.0
    );
    assert_eq!(m.sum("lb_http_request_duration_seconds_count", &[]), n);
    assert_eq!(
        m.family("lb_http_request_duration_seconds")
            .map(|f| f.kind.as_str()),
        Some("histogram")
    );
    assert_eq!(m.sum("lb_backend_requests_total", &[]), n);
    // Round robin over three backends (one rotation per worker thread): each gets some.
    for addr in stack.mock.addrs() {
        let got = m.sum(
            "lb_backend_requests_total",
            &[("backend", &addr.to_string())],
        );
        assert!(got >= 1.0, "{addr} got no requests");
    }
    // 500 is not retried: every request sent shows
    // up once, at the backend and in the responses.
    assert_eq!(m.sum("lb_backend_request_duration_seconds_count", &[]), n);
    assert_eq!(m.sum("lb_config_version", &[]), 1.0);

    // The control plane's exposition is well formed too.
    let reply = get(&client, &stack.cp.http_url("/metrics")).await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let cp = prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cp.sum("lb_cp_config_version", &[]), 1.0);
    assert_eq!(cp.sum("lb_cp_data_planes", &[("state", "connected")]), 1.0);
}
