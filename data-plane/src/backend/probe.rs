//! Active health checking: every data plane probes every backend on its own, with the snapshot's
//! path, interval, timeout and thresholds, so a backend unreachable from one data plane only is
//! taken out of that data plane's rotation only. One task per backend; the first probe is spread
//! over one interval and each later one jittered, so data planes and backends never fall into
//! lockstep. A probe that errors, answers garbage, hangs past the timeout or answers a status
//! outside 200-399 counts as a failure; the flip itself is [`crate::policy::health::HealthState`]'s call.
//!
//! Probes open their connections as the proxy does ([`crate::upstream`]: plain, or TLS with the
//! same roots and name checks), on a keep-alive connection of their own per backend, so a
//! backend reached over TLS is probed over TLS and a certificate problem fails its probes too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use lb_proto::v1::HealthCheckPolicy;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::Endpoint;
use crate::policy::health::{self, HealthState};
use crate::upstream::request_body::RequestBody;
use crate::upstream::{self, IdleConns};

/// Largest probe answer read; a backend streaming an endless health body is cut off there.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// The probe tasks, one per backend in the configuration, and the policy they follow.
pub struct Prober {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    policy: watch::Sender<Option<HealthCheckPolicy>>,
}

impl Default for Prober {
    fn default() -> Self {
        Prober {
            tasks: Mutex::default(),
            policy: watch::channel(None).0,
        }
    }
}

impl Prober {
    /// Follows a configuration: its health-check policy for every probe, probes started for
    /// backends that joined and stopped for those that left.
    pub fn sync<'a>(
        &self,
        endpoints: impl IntoIterator<Item = &'a Arc<Endpoint>>,
        policy: Option<HealthCheckPolicy>,
    ) {
        self.policy.send_replace(policy);
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<&str, &Arc<Endpoint>> = endpoints
            .into_iter()
            .map(|e| (e.address.as_str(), e))
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
                let task = tokio::spawn(probe_loop(self.policy.subscribe(), Arc::clone(endpoint)));
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

async fn probe_loop(policy: watch::Receiver<Option<HealthCheckPolicy>>, endpoint: Arc<Endpoint>) {
    // The probes' own connection: the proxy's pools belong to the worker threads.
    let pool = Arc::new(IdleConns::new(1, endpoint.idle.transport().clone()));
    let mut state = HealthState::new();
    let mut first = true;
    loop {
        let Some(current) = policy.borrow().clone() else {
            return;
        };
        let delay = if first {
            health::first_probe_delay(&current, fastrand::f64())
        } else {
            health::next_probe_delay(&current, fastrand::f64())
        };
        first = false;
        tokio::time::sleep(delay).await;
        // The policy may have changed while sleeping.
        let Some(policy) = policy.borrow().clone() else {
            return;
        };
        let timeout = Duration::from_millis(u64::from(policy.timeout_ms));
        let outcome = probe(&pool, &endpoint, &policy.path, timeout).await;
        if let Some(healthy) = state.observe(outcome.is_ok(), &policy) {
            endpoint.set_healthy(healthy);
            match outcome {
                Ok(()) => {
                    tracing::info!(backend = %endpoint.address, "backend healthy again; back in rotation");
                }
                Err(cause) => {
                    tracing::warn!(backend = %endpoint.address, path = %policy.path, cause = %cause, "backend failed its health checks; out of rotation");
                }
            }
        }
    }
}

/// One probe: `Ok` when the backend answered a healthy status, in full, within `timeout`;
/// otherwise why not.
async fn probe(
    pool: &Arc<IdleConns>,
    endpoint: &Endpoint,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let req = http::Request::get(path)
        .header(http::header::HOST, endpoint.authority.as_str())
        .header(http::header::USER_AGENT, "lb-health-check")
        .body(())
        .map_err(|e| format!("health check path {path:?}: {e}"))?;
    let req = upstream::Outgoing::new(&req.into_parts().0, RequestBody::empty());
    let exchange = async {
        let resp = upstream::send(
            pool,
            0,
            &endpoint.address,
            endpoint.resolved,
            upstream::Timeouts {
                connect: timeout,
                request: Some(timeout),
                body_idle: None,
            },
            req,
        )
        .await
        .map_err(|(e, _)| e.to_string())?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY);
        body.collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(status)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(status)) if health::is_healthy_status(status) => Ok(()),
        Ok(Ok(status)) => Err(format!("answered {status}")),
        Ok(Err(cause)) => Err(cause),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}
