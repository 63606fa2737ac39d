//! Reports to the control plane (`lb.v1.Discovery/Report`): every second, what this data plane
//! saw in that second (counters as deltas, per-backend numbers and latency histograms, API key
//! activity by key id, bans it enforces itself) and a sample of its request log. The control
//! plane adds the reports of every data plane up for the dashboards, `/stats` and `GetStats`.
//!
//! The request path only touches it through [`Reporter::sample`] (one atomic add) and, for the
//! few requests sampled, a short lock to queue a log entry; keyed requests also count their key.
//! Everything else is read from existing counters once per interval, off the request path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lb_proto::v1::discovery_client::DiscoveryClient;
use lb_proto::v1::{
    BackendReport, BanInfo, CircuitState, Counters, HealthState, KeyActivity, Node,
    RequestLogEntry, StatsReport,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::policy::backoff::Backoff;
use crate::policy::breaker;
use crate::ratelimit::unix_ms;
use crate::state::{Shared, millis};

/// Report interval.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Request log entries kept per interval; past it requests are counted, not logged.
pub const LOG_PER_INTERVAL: u64 = 200;
/// Requests per thread between two that may be logged: logging every request would make the
/// log's lock and counter the hottest shared lines of the request path.
pub const SAMPLE_EVERY: u64 = 16;
/// Keys tracked per interval; past it new keys are not reported until the next interval.
const KEYS_PER_INTERVAL: usize = 10_000;

/// What a response says about how it was produced, attached by the request path.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub backend: Option<String>,
    pub decision: &'static str,
    pub key_id: Option<String>,
    pub tier: Option<String>,
}

#[derive(Default)]
struct Totals {
    responses: [u64; 4],
    /// Cache hits, misses, stale answers, bypasses.
    cache: [u64; 4],
    refused: HashMap<String, u64>,
    retries: u64,
    backends: HashMap<String, (u64, u64, Vec<u64>)>,
}

#[derive(Default)]
pub struct Reporter {
    sampled: AtomicU64,
    log: Mutex<Vec<RequestLogEntry>>,
    keys: Mutex<HashMap<String, KeyActivity>>,
}

impl Reporter {
    /// Whether to log the next request in full (the first [`LOG_PER_INTERVAL`] of an interval).
    pub fn sample(&self) -> bool {
        // One request in SAMPLE_EVERY per thread asks; the shared count is touched only then.
        thread_local!(static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        let n = SEEN.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        n % SAMPLE_EVERY == 1 && self.sampled.fetch_add(1, Ordering::Relaxed) < LOG_PER_INTERVAL
    }

    pub fn log(&self, entry: RequestLogEntry) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if (log.len() as u64) < LOG_PER_INTERVAL {
            log.push(entry);
        }
    }

    /// A keyed request: `rejected` when the limiter refused it.
    pub fn key(&self, key_id: &str, tier: &str, rejected: bool) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if !keys.contains_key(key_id) && keys.len() >= KEYS_PER_INTERVAL {
            return;
        }
        let k = keys
            .entry(key_id.to_owned())
            .or_insert_with(|| KeyActivity {
                key_id: key_id.to_owned(),
                tier: tier.to_owned(),
                ..Default::default()
            });
        k.requests += 1;
        k.rejected += u64::from(rejected);
        k.last_seen_ms = unix_ms();
    }

    fn take(&self) -> (Vec<RequestLogEntry>, Vec<KeyActivity>) {
        self.sampled.store(0, Ordering::Relaxed);
        let log = std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        let keys = std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()));
        (log, keys.into_values().collect())
    }
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
