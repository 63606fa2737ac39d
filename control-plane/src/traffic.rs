//! What the data planes report, added up: totals since the control plane started, each
//! backend as the data planes see it now, and the recent request log (bounded), for `GetStats`,
//! `TailLog`, `/stats` and `/logs`. A data plane whose reports stop for [`GONE_AFTER_MS`] no
//! longer counts towards the current backend view.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use lb_proto::v1::{BackendReport, Counters, HealthState, RequestLogEntry, StatsReport};
use tokio::sync::broadcast;

/// Request log entries kept for new readers.
pub const LOG_KEPT: usize = 1000;
/// A data plane silent this long is gone from the live view.
pub const GONE_AFTER_MS: u64 = 5_000;

#[derive(Default)]
struct Inner {
    totals: Counters,
    /// Latest report per data plane: when, and its backends.
    planes: HashMap<String, (u64, Vec<BackendReport>)>,
    /// Requests and errors per backend since start.
    backend_totals: HashMap<String, (u64, u64)>,
    log: VecDeque<RequestLogEntry>,
}

pub struct Traffic {
    inner: Mutex<Inner>,
    log_tx: broadcast::Sender<RequestLogEntry>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            inner: Mutex::new(Inner::default()),
            log_tx: broadcast::channel(LOG_KEPT).0,
        }
    }
}

fn add(total: &mut Counters, c: &Counters) {
    total.requests += c.requests;
    total.responses_2xx += c.responses_2xx;
    total.responses_3xx += c.responses_3xx;
    total.responses_4xx += c.responses_4xx;
    total.responses_5xx += c.responses_5xx;
    total.rate_limited += c.rate_limited;
    total.banned += c.banned;
    total.blocked += c.blocked;
    total.cache_hits += c.cache_hits;
    total.cache_misses += c.cache_misses;
    total.cache_stale += c.cache_stale;
    total.cache_bypass += c.cache_bypass;
    total.shed += c.shed;
    total.retries += c.retries;
    total.no_backend += c.no_backend;
}

impl Traffic {
    pub fn record(&self, report: StatsReport, now_ms: u64) {
        let Some(id) = report.node.as_ref().map(|n| n.id.clone()) else {
            return;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &report.counters {
            add(&mut inner.totals, c);
        }
        for b in &report.backends {
            let t = inner.backend_totals.entry(b.address.clone()).or_default();
            t.0 += b.requests;
            t.1 += b.errors;
        }
        for entry in report.log {
            let _ = self.log_tx.send(entry.clone());
            if inner.log.len() >= LOG_KEPT {
                inner.log.pop_front();
            }
            inner.log.push_back(entry);
        }
        inner.planes.insert(id, (now_ms, report.backends));
    }

    pub fn totals(&self) -> Counters {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).totals
    }

    /// Each backend over the live data planes: requests and errors since start, in flight
    /// summed, latency averaged, unhealthy or ejected if any data plane says so.
    pub fn backends(&self, now_ms: u64) -> Vec<BackendReport> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut merged: Vec<BackendReport> = Vec::new();
        let mut seen: HashMap<String, (usize, u64)> = HashMap::new();
        for (at, backends) in inner.planes.values() {
            if now_ms.saturating_sub(*at) > GONE_AFTER_MS {
                continue;
            }
            for b in backends {
                let (i, n) = seen.entry(b.address.clone()).or_insert_with(|| {
                    merged.push(BackendReport {
                        address: b.address.clone(),
                        health: HealthState::Healthy as i32,
                        ..Default::default()
                    });
                    (merged.len() - 1, 0)
                });
                let m = &mut merged[*i];
                m.in_flight += b.in_flight;
                m.ewma_latency_us = (m.ewma_latency_us * *n + b.ewma_latency_us) / (*n + 1);
                *n += 1;
                if b.health == HealthState::Unhealthy as i32 {
                    m.health = b.health;
                }
                m.circuit = m.circuit.max(b.circuit);
                m.ejected |= b.ejected;
                m.draining |= b.draining;
            }
        }
        for m in &mut merged {
            if let Some((r, e)) = inner.backend_totals.get(&m.address) {
                (m.requests, m.errors) = (*r, *e);
            }
        }
        merged
    }

    /// Data planes heard from within [`GONE_AFTER_MS`].
    pub fn live(&self, now_ms: u64) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .planes
            .values()
            .filter(|(at, _)| now_ms.saturating_sub(*at) <= GONE_AFTER_MS)
            .count()
    }

    /// The last `n` log entries, oldest first.
    pub fn recent_log(&self, n: usize) -> Vec<RequestLogEntry> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.log.iter().rev().take(n).rev().cloned().collect()
    }

    pub fn subscribe_log(&self) -> broadcast::Receiver<RequestLogEntry> {
        self.log_tx.subscribe()
    }
}
