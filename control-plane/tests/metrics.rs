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
    // Each circuit is in one state, closed.
    for addr in stack.mock.addrs() {
        let a = addr.to_string();
        let state = |s| m.sum("lb_backend_circuit_state", &[("backend", &a), ("state", s)]);
        assert_eq!(
            (state("closed"), state("open"), state("half_open")),
            (1.0, 0.0, 0.0)
        );
    }
    // The conventional process and build series, as on every exporter.
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(m.sum(name, &[]) > 0.0, "{name}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(m.sum("lb_build_info", &[("version", version)]), 1.0);

    // The control plane's exposition is well formed too.
    let reply = get(&client, &stack.cp.http_url("/metrics")).await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let cp = prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cp.sum("lb_cp_config_version", &[]), 1.0);
    assert_eq!(cp.sum("lb_cp_data_planes", &[("state", "connected")]), 1.0);
    assert_eq!(cp.sum("lb_build_info", &[("version", version)]), 1.0);
    assert!(cp.sum("process_resident_memory_bytes", &[]) > 0.0);
}

/// A markdown table of the families in `text`: name, type, label names, help.
fn table(text: &str) -> String {
    let parsed = prom::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut families = parsed.families.clone();
    families.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for f in families {
        let mut labels: Vec<&str> = f
            .samples
            .iter()
            .flat_map(|s| s.labels.keys())
            .map(String::as_str)
            .filter(|l| !matches!(*l, "le" | "quantile"))
            .collect();
        labels.sort_unstable();
        labels.dedup();
        let labels = if labels.is_empty() {
            "—".to_owned()
        } else {
            labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            f.name, f.kind, labels, f.help
        ));
    }
    out
}

/// Replaces the generated block named `name` in `doc`; panics when it is missing.
fn replace_block(doc: &str, name: &str, body: &str) -> String {
    let begin = format!("<!-- generated: {name} -->\n");
    let end = format!("<!-- end: {name} -->");
    let start = doc
        .find(&begin)
        .unwrap_or_else(|| panic!("docs/metrics.md lacks {begin:?}"))
        + begin.len();
    let stop = start
        + doc[start..]
            .find(&end)
            .unwrap_or_else(|| panic!("docs/metrics.md lacks {end:?}"));
    format!("{}{body}{}", &doc[..start], &doc[stop..])
}

/// docs/metrics.md lists what the registries export, every family of both planes with its type,
/// labels and help: `LB_BLESS=1 cargo test -p control-plane --test metrics` rewrites the lists.
#[tokio::test]
async fn docs_list_every_metric_of_both_planes() {
    use data_plane::telemetry::metrics::{BackendSample, LiveValues, Metrics};
    // A data plane's registry with every family present: a backend, a TLS listener, one of
    // each labelled event.
    let m = Metrics::new();
    m.tls();
    m.register_live(|| LiveValues {
        backends: vec![BackendSample {
            address: "10.0.0.1:8080".into(),
            requests: 1,
            errors: 0,
            in_flight: 0,
            healthy: true,
            ejected: false,
            circuit: 0,
        }],
        ..Default::default()
    });
    m.backend_duration
        .with_label_values(&["10.0.0.1:8080"])
        .observe(0.001);
    m.refused.with_label_values(&["shed"]).inc();
    m.config_updates.with_label_values(&["applied"]).inc();
    m.worker_connections.with_label_values(&["0"]).set(0);
    let data_plane = table(&m.render());

    // A control plane's /metrics, and the TLS metrics its listeners add.
    let stack = Stack::start(0).await;
    let reply = get(&http_client(), &stack.cp.http_url("/metrics")).await;
    let mut text = String::from_utf8(reply.body.to_vec()).unwrap();
    let tls = prometheus::Registry::new();
    data_plane::common::TlsMetrics::register(&tls, "lb_cp_tls", control_plane::tls::METRICS_OF)
        .unwrap();
    prometheus::TextEncoder::new()
        .encode_utf8(&tls.gather(), &mut text)
        .unwrap();
    let control_plane = table(&text);

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let wanted = replace_block(
        &replace_block(&doc, "data plane metrics", &data_plane),
        "control plane metrics",
        &control_plane,
    );
    if std::env::var_os("LB_BLESS").is_some() {
        std::fs::write(&path, &wanted).unwrap();
    } else {
        assert!(
            doc == wanted,
            "docs/metrics.md differs from the registries; `LB_BLESS=1 cargo test -p control-plane \
             --test metrics` rewrites its lists. Wanted:\n{data_plane}\n{control_plane}"
        );
    }
    stack.cp.stop().await;
}
