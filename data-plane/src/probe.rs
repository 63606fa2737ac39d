//! Active health checking: every data plane probes every backend on its own, with the snapshot's
//! path, interval, timeout and thresholds, so a backend unreachable from one data plane only is
//! taken out of that data plane's rotation only. One task per backend; the first probe is spread
//! over one interval and each later one jittered, so data planes and backends never fall into
//! lockstep. A probe that errors, answers garbage, hangs past the timeout or answers a status
//! outside 200-399 counts as a failure; the flip itself is [`crate::health::HealthState`]'s call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::health::{self, HealthState};
use crate::state::{Endpoint, Shared};

type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// Largest probe answer read; a backend streaming an endless health body is cut off there.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// The probe tasks, one per backend in the configuration.
#[derive(Default)]
pub struct Prober {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Prober {
    /// Starts probing backends that joined the configuration and stops those that left.
    pub fn sync(&self, shared: &Arc<Shared>) {
        let Some(active) = shared.active() else {
            return;
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<&str, &Arc<Endpoint>> = active
            .slots
            .iter()
            .map(|s| (s.endpoint.address.as_str(), &s.endpoint))
            .collect();
        tasks.retain(|addr, task| {
            let keep = wanted.contains_key(addr.as_str());
            if !keep {
                task.abort();
            }
            keep
        });
        for (addr, endpoint) in wanted {
            if !tasks.contains_key(addr) {
                let task = tokio::spawn(probe_loop(Arc::clone(shared), Arc::clone(endpoint)));
                tasks.insert(addr.to_owned(), task);
            }
        }
    }

    pub fn stop(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, t) in tasks.drain() {
            t.abort();
        }
    }
}

fn client() -> ProbeClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(http)
}

async fn probe_loop(shared: Arc<Shared>, endpoint: Arc<Endpoint>) {
    let client = client();
    let mut state = HealthState::new();
    let mut first = true;
    loop {
        let Some(policy) = shared
            .active()
            .and_then(|a| a.snapshot.health_check.clone())
        else {
            return;
        };
        let delay = if first {
            health::first_probe_delay(&policy, fastrand::f64())
        } else {
            health::next_probe_delay(&policy, fastrand::f64())
        };
        first = false;
        tokio::time::sleep(delay).await;
        // The policy may have changed while sleeping.
        let Some(policy) = shared
            .active()
            .and_then(|a| a.snapshot.health_check.clone())
        else {
            return;
        };
        let timeout = Duration::from_millis(u64::from(policy.timeout_ms));
        let ok = probe(&client, &endpoint, &policy.path, timeout).await;
        if let Some(healthy) = state.observe(ok, &policy) {
            endpoint.set_healthy(healthy);
            if healthy {
                tracing::info!(backend = %endpoint.address, "backend healthy again; back in rotation");
            } else {
                tracing::warn!(backend = %endpoint.address, path = %policy.path, "backend failed its health checks; out of rotation");
            }
        }
    }
}

/// One probe: true when the backend answered a healthy status, in full, within `timeout`.
async fn probe(client: &ProbeClient, endpoint: &Endpoint, path: &str, timeout: Duration) -> bool {
    let Ok(uri) = format!("http://{}{path}", endpoint.address).parse::<http::Uri>() else {
        return false;
    };
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "lb-health-check")
        .body(Empty::new());
    let Ok(req) = req else { return false };
    let exchange = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY);
        body.collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Some(status)) => health::is_healthy_status(status),
        _ => false,
    }
}
