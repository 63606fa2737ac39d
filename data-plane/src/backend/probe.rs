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
    let pool = Arc::new(IdleConns::new(
        1,
        endpoint.idle.transport().clone(),
        endpoint.idle.protocol(),
    ));
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
        let outcome = if policy.kind == "grpc" {
            grpc_probe(&pool, &endpoint, &policy.grpc_service, timeout).await
        } else {
            probe(&pool, &endpoint, &policy.path, timeout).await
        };
        if let Some(healthy) = state.observe(outcome.is_ok(), &policy) {
            endpoint.set_healthy(healthy);
            match outcome {
                Ok(()) => {
                    tracing::info!(backend = %endpoint.address, "backend healthy again; back in rotation");
                }
                Err(cause) => {
                    let asked = if policy.kind == "grpc" {
                        format!("grpc.health.v1.Health/Check {:?}", policy.grpc_service)
                    } else {
                        policy.path.clone()
                    };
                    tracing::warn!(backend = %endpoint.address, probe = %asked, cause = %cause, "backend failed its health checks; out of rotation");
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
    match tokio::time::timeout(timeout, exchange(pool, endpoint, req, timeout)).await {
        Ok(Ok((status, _))) if health::is_healthy_status(status) => Ok(()),
        Ok(Ok((status, _))) => Err(format!("answered {status}")),
        Ok(Err(cause)) => Err(cause),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    /// 1 = SERVING, 2 = NOT_SERVING, 3 = SERVICE_UNKNOWN.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// One gRPC probe (`grpc.health.v1.Health/Check` for `service`): `Ok` when the backend
/// answered SERVING with grpc-status 0 within `timeout`; otherwise why not.
async fn grpc_probe(
    pool: &Arc<IdleConns>,
    endpoint: &Endpoint,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    let message = prost::Message::encode_to_vec(&HealthCheckRequest {
        service: service.to_owned(),
    });
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    body.extend_from_slice(&message);
    let req = http::Request::post("/grpc.health.v1.Health/Check")
        .header(http::header::HOST, endpoint.authority.as_str())
        .header(http::header::USER_AGENT, "lb-health-check")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(())
        .map_err(|e| e.to_string())?;
    let req = upstream::Outgoing::new(
        &req.into_parts().0,
        RequestBody::Fixed(Some(bytes::Bytes::from(body))),
    );
    let answer = match tokio::time::timeout(timeout, exchange(pool, endpoint, req, timeout)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(cause)) => return Err(cause),
        Err(_) => return Err(format!("no answer within {} ms", timeout.as_millis())),
    };
    let (status, collected) = answer;
    if status != 200 {
        return Err(format!("answered HTTP {status}"));
    }
    let grpc_status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let trailers = collected.trailers.as_ref().and_then(grpc_status);
    match trailers.or_else(|| grpc_status(&collected.headers)).as_deref() {
        Some("0") => {}
        Some(code) => return Err(format!("answered grpc-status {code}")),
        None => return Err("answered without a grpc-status".to_owned()),
    }
    let frame = collected.body;
    let message = match frame.first_chunk::<5>() {
        Some(&[0, a, b, c, d]) if frame.len() - 5 == u32::from_be_bytes([a, b, c, d]) as usize => {
            &frame[5..]
        }
        _ => return Err("answered no single uncompressed gRPC message".to_owned()),
    };
    let answer: HealthCheckResponse =
        prost::Message::decode(message).map_err(|e| format!("answer not a HealthCheckResponse: {e}"))?;
    match answer.status {
        1 => Ok(()),
        2 => Err("answered NOT_SERVING".to_owned()),
        3 => Err(format!("does not know the service {service:?} (SERVICE_UNKNOWN)")),
        s => Err(format!("answered status {s}")),
    }
}

/// A probe's answer: its head, body (at most [`MAX_PROBE_BODY`]) and trailers.
struct Collected {
    headers: http::HeaderMap,
    body: bytes::Bytes,
    trailers: Option<http::HeaderMap>,
}

/// Sends a probe's request and reads its answer whole.
async fn exchange(
    pool: &Arc<IdleConns>,
    endpoint: &Endpoint,
    req: upstream::Outgoing,
    timeout: Duration,
) -> Result<(u16, Collected), String> {
    let resp = upstream::send(
        pool,
        0,
        endpoint.authority.as_str(),
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
    let (parts, body) = resp.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_PROBE_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok((
        parts.status.as_u16(),
        Collected {
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        },
    ))
}
