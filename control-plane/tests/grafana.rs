//! The Grafana dashboard against a real Prometheus (Debian's `prometheus` package): Prometheus
//! scrapes a running fleet (a control plane, two data planes, traffic) with the scrape settings
//! of `deploy/prometheus.yml`, and every PromQL expression of every panel in
//! `deploy/grafana/dashboards/*.json` must return data through Prometheus's HTTP API. `promtool`
//! checks `deploy/prometheus.yml` itself.
//!
//! Needs `/usr/bin/prometheus` and `/usr/bin/promtool` and fails, saying so, without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use lb_proto::v1::{CachePolicy, QueuePolicy};
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn require_installed() {
    for path in [PROMETHEUS, PROMTOOL] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: this test runs a real Prometheus; install the Debian package \
             prometheus (`apt-get install prometheus`; .ci/run does it)"
        );
    }
}

/// `deploy/prometheus.yml` with its jobs' targets replaced by the fleet's addresses (the file
/// names compose services; DNS discovery becomes a static list), everything else as written.
fn scrape_config(control_planes: &[String], data_planes: &[String]) -> String {
    let text = std::fs::read_to_string(deploy("prometheus.yml")).unwrap();
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let jobs = doc["scrape_configs"].as_sequence_mut().unwrap();
    jobs.retain(|job| {
        matches!(
            job["job_name"].as_str(),
            Some("control-plane" | "data-plane")
        )
    });
    assert_eq!(jobs.len(), 2, "a job for each plane in prometheus.yml");
    for job in jobs.iter_mut() {
        let targets = match job["job_name"].as_str() {
            Some("control-plane") => control_planes,
            _ => data_planes,
        };
        let map = job.as_mapping_mut().unwrap();
        map.remove("dns_sd_configs");
        let statics: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&format!("- targets: {}", serde_json::json!(targets))).unwrap();
        map.insert("static_configs".into(), statics);
    }
    serde_yaml_ng::to_string(&doc).unwrap()
}

/// The scrape interval `deploy/prometheus.yml` sets, in seconds.
fn scrape_interval_s() -> u64 {
    let text = std::fs::read_to_string(deploy("prometheus.yml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let interval = doc["global"]["scrape_interval"].as_str().unwrap();
    interval.trim_end_matches('s').parse().unwrap()
}

/// Every PromQL expression of every panel of every dashboard: (dashboard, panel, expression).
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let dir = deploy("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut panels: Vec<&Value> = doc["panels"].as_array().unwrap().iter().collect();
        // Panels inside collapsed rows.
        let nested: Vec<&Value> = panels
            .iter()
            .filter_map(|p| p["panels"].as_array())
            .flatten()
            .collect();
        panels.extend(nested);
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let title = p["title"].as_str().unwrap_or_default().to_owned();
                    out.push((name.clone(), title, expr.to_owned()));
                }
            }
        }
    }
    assert!(!out.is_empty(), "no PromQL in {}", dir.display());
    out
}

/// Grafana's template variables as the dashboard would fill them: every instance, and
/// `$__rate_interval` as Grafana computes it for a 1-minute step (4 scrape intervals).
fn substitute(expr: &str, interval_s: u64) -> String {
    expr.replace("$instance", ".*")
        .replace("${instance}", ".*")
        .replace("$__rate_interval", &format!("{}s", 4 * interval_s))
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus process, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    fn start(config: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let file = dir.write("prometheus.yml", config);
        let check = Command::new(PROMTOOL)
            .args(["check", "config"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "promtool rejects the test's config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// An instant query: the result vector, or the API's error.
    async fn query(&self, client: &HttpClient, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            form_encode(expr)
        );
        // Not `get`: until Prometheus listens, a refused connection is an answer to wait on.
        let ask = async {
            let reply = client.get(url.parse().unwrap()).await?;
            let body = http_body_util::BodyExt::collect(reply.into_body()).await?;
            Ok::<_, Box<dyn std::error::Error>>(body.to_bytes())
        };
        let body = tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .map_err(|_| "no answer in 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a result vector holds a number (NaN, a ratio of zero rates, is no data on a panel).
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|r| {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| !v.is_nan())
    })
}

#[test]
fn promtool_accepts_the_deployed_prometheus_config() {
    require_installed();
    let out = Command::new(PROMTOOL)
        .args(["check", "config"])
        .arg(deploy("prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_panel_query_returns_data_from_a_real_prometheus() {
    require_installed();
    let stack = Stack::start_with(2, |s| {
        s.cache = Some(CachePolicy {
            enabled: true,
            ..lb_proto::defaults::cache()
        });
        // Two requests in flight per backend: bursts of slow requests wait in the queue.
        s.queue = Some(QueuePolicy {
            max_in_flight_per_backend: 2,
            capacity: 64,
            timeout_ms: 5_000,
        });
    })
    .await;
    let cp = &stack.cp;
    let mut admin = cp.admin(Some(TOKEN)).await;
    let key = admin
        .create_api_key(new_key("free", "prometheus"))
        .await
        .answer();
    for dp in &stack.dps {
        dp.wait_version(cp.cp.version()).await;
    }

    // Traffic for as long as the test runs: forwarded requests, cache hits, errors, a free key
    // over its limit, and bursts of slow requests that queue, on both data planes.
    let urls: Vec<String> = stack.dps.iter().map(|dp| dp.url("")).collect();
    let traffic = tokio::spawn(async move {
        let client = http_client();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            for base in &urls {
                for path in ["/data", "/cacheable", "/status/503"] {
                    get(&client, &format!("{base}{path}")).await;
                }
                let keyed = get_with(&format!("{base}/data"), &[("x-api-key", &key.api_key)]);
                send(&client, keyed).await;
                let mut burst = tokio::task::JoinSet::new();
                for _ in 0..10 {
                    // A query of its own each: not a cache hit.
                    n += 1;
                    let (client, url) = (client.clone(), format!("{base}/slow?ms=20&n={n}"));
                    burst.spawn(async move { get(&client, &url).await });
                }
                burst.join_all().await;
            }
        }
    });

    let config = scrape_config(
        &[cp.http.to_string()],
        &stack
            .dps
            .iter()
            .map(|dp| dp.admin.to_string())
            .collect::<Vec<_>>(),
    );
    let prometheus = Prometheus::start(&config);
    let client = http_client();
    let interval = scrape_interval_s();
    let queries = panel_queries();

    // Every target scraped twice, so that rates have two points.
    poll_within(
        Duration::from_secs(10 * interval),
        "two scrapes of each of the 3 targets",
        || async {
            let r = prometheus
                .query(&client, "count_over_time(up[1m]) >= 2 and up == 1")
                .await;
            match r {
                Ok(v) if v.len() == 3 => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    // Then each panel query returns a number; asked again until a deadline, as a series may
    // first appear in the latest scrape.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4 * interval);
    let mut pending: Vec<(String, String)> = queries
        .iter()
        .map(|(file, panel, expr)| (format!("{file} / {panel}"), substitute(expr, interval)))
        .collect();
    let mut missing = Vec::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (name, promql) in pending {
            match prometheus.query(&client, &promql).await {
                Ok(v) if has_data(&v) => {}
                Ok(v) => still.push((name, promql, format!("no data: {v:?}"))),
                // A query Prometheus refuses is wrong however long we wait.
                Err(e) => missing.push(format!("{name}: {promql}: {e}")),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            missing.extend(still.into_iter().map(|(n, q, e)| format!("{n}: {q}: {e}")));
            break;
        }
        pending = still.into_iter().map(|(n, q, _)| (n, q)).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    traffic.abort();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    drop(prometheus);
    for dp in stack.dps {
        dp.stop().await;
    }
    stack.cp.stop().await;
}
