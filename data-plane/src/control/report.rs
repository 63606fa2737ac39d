//! Reports to the control plane (`lb.v1.Discovery/Report`): every second, what this data plane
//! saw in that second (counters as deltas, per-backend numbers and latency histograms, API key
//! activity by key id, bans it enforces itself) and a sample of its request log. The control
//! plane adds the reports of every data plane up for the dashboards, `/stats` and `GetStats`.
//!
//! Everything but the request log and key activity ([`crate::telemetry::report`]) is read from
//! existing counters once per interval, off the request path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_proto::v1::discovery_client::DiscoveryClient;
use lb_proto::v1::{
    BackendReport, BanInfo, CircuitState, Counters, HealthState, Node, StatsReport,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::clock::{millis, unix_ms};
use crate::policy::backoff::Backoff;
use crate::policy::breaker;
use crate::shared::Shared;

/// Report interval.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Totals {
    responses: [u64; 4],
    /// Cache hits, misses, stale answers, bypasses.
    cache: [u64; 4],
    refused: HashMap<String, u64>,
    retries: u64,
    backends: HashMap<String, (u64, u64, Vec<u64>)>,
}

fn delta(now: u64, before: &mut u64) -> u64 {
    let d = now.saturating_sub(*before);
    *before = now;
    d
}

/// Builds the report of the interval that just ended.
fn build(shared: &Shared, node: &Node, totals: &mut Totals) -> StatsReport {
    let m = &shared.metrics;
    let mut c = Counters::default();
    let classes: Vec<u64> = (0..4)
        .map(|i| delta(m.responses[i].get(), &mut totals.responses[i]))
        .collect();
    (
        c.responses_2xx,
        c.responses_3xx,
        c.responses_4xx,
        c.responses_5xx,
    ) = (classes[0], classes[1], classes[2], classes[3]);
    c.requests = classes.iter().sum();
    for reason in [
        "rate_limited",
        "banned",
        "blocked",
        "shed",
        "no_backend",
        "circuit_open",
        "backend_unreachable",
    ] {
        let now = m.refused.with_label_values(&[reason]).get();
        let d = delta(now, totals.refused.entry(reason.to_owned()).or_default());
        match reason {
            "rate_limited" => c.rate_limited = d,
            "banned" => c.banned = d,
            "blocked" => c.blocked = d,
            "shed" => c.shed = d,
            _ => c.no_backend += d,
        }
    }
    c.retries = delta(m.retries.get(), &mut totals.retries);
    let cs = shared.cache.stats();
    c.cache_hits = delta(
        cs.hits_memory + cs.hits_shared + cs.hits_coalesced,
        &mut totals.cache[0],
    );
    c.cache_misses = delta(cs.leads + cs.passes, &mut totals.cache[1]);
    c.cache_stale = delta(cs.hits_stale, &mut totals.cache[2]);
    c.cache_bypass = delta(cs.bypasses, &mut totals.cache[3]);
    let now_ms = millis(tokio::time::Instant::now());
    let backends = shared
        .active()
        .map(|a| {
            a.slots
                .iter()
                .map(|s| {
                    let e = &s.endpoint;
                    let entry = totals.backends.entry(e.address.clone()).or_default();
                    let requests = delta(e.requests.load(Ordering::Relaxed), &mut entry.0);
                    let errors = delta(e.errors.load(Ordering::Relaxed), &mut entry.1);
                    let (bounds, cumulative) = m.backend_histogram(&e.address);
                    if entry.2.len() != cumulative.len() {
                        entry.2 = vec![0; cumulative.len()];
                    }
                    let interval: Vec<u64> = cumulative
                        .iter()
                        .zip(entry.2.iter_mut())
                        .map(|(&n, b)| delta(n, b))
                        .collect();
                    // Prometheus buckets are cumulative; the report counts each bucket alone.
                    let counts: Vec<u64> = interval
                        .iter()
                        .scan(0, |below, &n| {
                            let own = n.saturating_sub(*below);
                            *below = n;
                            Some(own)
                        })
                        .collect();
                    BackendReport {
                        address: e.address.clone(),
                        requests,
                        errors,
                        in_flight: e.in_flight(),
                        ewma_latency_us: e.latency_us(),
                        health: if e.is_healthy() {
                            HealthState::Healthy
                        } else {
                            HealthState::Unhealthy
                        } as i32,
                        circuit: match e.circuit_state() {
                            breaker::CircuitState::Closed => CircuitState::Closed,
                            breaker::CircuitState::Open => CircuitState::Open,
                            breaker::CircuitState::HalfOpen => CircuitState::HalfOpen,
                        } as i32,
                        ejected: e.is_ejected(now_ms),
                        latency_bounds_us: bounds,
                        latency_counts: counts,
                        draining: s.draining,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let (log, keys) = shared.reporter.take();
    let bans = shared
        .limiter
        .local_bans()
        .into_iter()
        .map(|(client, until_ms, count)| BanInfo {
            client,
            until_ms,
            count,
            node_id: String::new(),
        })
        .collect();
    StatsReport {
        node: Some(node.clone()),
        applied_version: shared.active().map_or(0, |a| a.version()),
        timestamp_ms: unix_ms(),
        interval_ms: INTERVAL.as_millis() as u32,
        counters: Some(c),
        backends,
        log,
        keys,
        bans,
        store_degraded: shared.limiter.is_degraded(),
        queue_depth: shared.admission.depth() as u32,
    }
}

/// Streams a report every [`INTERVAL`] until `stop`; reconnects with backoff.
pub async fn run(shared: Arc<Shared>, node: Node, mut stop: watch::Receiver<bool>) {
    let mut totals = Totals::default();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let session = async {
            let channel = crate::control::discovery::endpoint(&shared.settings)?
                .connect()
                .await?;
            let (tx, rx) = mpsc::channel::<StatsReport>(4);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            if let Some(token) = &shared.settings.cluster_token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
            }
            let mut client = DiscoveryClient::new(channel);
            let call = tokio::spawn(async move { client.report(request).await });
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let report = build(&shared, &node, &mut totals);
                if tx.send(report).await.is_err() {
                    break;
                }
            }
            drop(tx);
            let ended = call.await?;
            ended
                .map(|_| ())
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        };
        let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = tokio::select! {
            r = session => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(e) = result {
            tracing::debug!(cause = %crate::control::discovery::error_chain(&*e), "report stream ended");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
