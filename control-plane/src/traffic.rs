//! What the data planes report, added up: totals since the control plane started, each
//! backend as the data planes see it now, the recent request log (bounded), a per-second
//! history of the last [`HISTORY_SECONDS`] and per API key activity, for `GetStats`, `TailLog`,
//! `/stats`, `/logs` and the dashboards. A data plane whose reports stop for [`GONE_AFTER_MS`]
//! no longer counts towards the current backend view.
//!
//! Reports are put in the second they arrive in, not the one they were measured in: data
//! planes report every second on their own clocks, so a second may hold zero or two reports of
//! one plane. The history is for charts, where that jitter is harmless; totals are exact.
//! Everything kept is bounded: the history by [`HISTORY_SECONDS`] (latency histograms only for
//! the last [`RATE_WINDOW_S`]), backends per second by [`MAX_BACKENDS_PER_SECOND`], keys by
//! [`MAX_KEYS_TRACKED`], data planes by [`MAX_PLANES`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use lb_proto::v1::{
    BackendReport, BanInfo, Counters, HealthState, KeyActivity, RequestLogEntry, StatsReport,
};
use tokio::sync::broadcast;

/// Request log entries kept for new readers.
pub const LOG_KEPT: usize = 1000;
/// A data plane silent this long is gone from the live view.
pub const GONE_AFTER_MS: u64 = 5_000;
/// Seconds of per-second history kept: five minutes of charts for a page opened now.
pub const HISTORY_SECONDS: u64 = 300;
/// Seconds over which request rates, error rates and latency quantiles are computed: long
/// enough to smooth the one-second report jitter, short enough to follow a change.
pub const RATE_WINDOW_S: u64 = 10;
/// Backends counted per second; a report naming more (not a real configuration) is cut.
pub const MAX_BACKENDS_PER_SECOND: usize = 256;
/// API keys whose activity is kept; past it the least recently seen is forgotten.
pub const MAX_KEYS_TRACKED: usize = 10_000;
/// Data planes whose last report is kept; past it the longest silent is forgotten.
pub const MAX_PLANES: usize = 4096;
/// Histogram buckets accepted per backend report (the data planes send 15).
const MAX_LATENCY_BUCKETS: usize = 64;

/// One second of traffic over every data plane.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Second {
    /// Unix time in seconds.
    pub t: u64,
    pub counters: Counters,
    /// Requests and errors per backend address.
    pub backends: BTreeMap<String, (u64, u64)>,
}

/// A latency histogram: counts per upper bound in microseconds, plus the count above the last.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    bounds: Vec<u64>,
    counts: Vec<u64>,
}

impl Histogram {
    fn add(&mut self, bounds: &[u64], counts: &[u64]) {
        if counts.len() != bounds.len() + 1 || bounds.len() > MAX_LATENCY_BUCKETS {
            return;
        }
        if self.bounds != bounds {
            // Data planes of different builds may bucket differently; the newest wins.
            self.bounds = bounds.to_vec();
            self.counts = vec![0; counts.len()];
        }
        for (total, c) in self.counts.iter_mut().zip(counts) {
            *total += c;
        }
    }
}

/// The value below which a fraction `q` of the observations in a histogram fall, interpolated
/// linearly inside its bucket; `None` without observations. Observations above the highest
/// bound are reported as that bound (the histogram knows no more).
pub fn quantile(bounds: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || counts.len() != bounds.len() + 1 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= rank {
            let lower = if i == 0 { 0 } else { bounds[i - 1] };
            let Some(&upper) = bounds.get(i) else {
                return Some(lower);
            };
            let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lower + (within * upper.saturating_sub(lower) as f64).round() as u64);
        }
        below += c;
    }
    bounds.last().copied()
}

/// A backend over the last [`RATE_WINDOW_S`] completed seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendWindow {
    pub requests: u64,
    pub errors: u64,
    /// Latency quantiles in microseconds, from the data planes' histograms.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// What a data plane's last report said about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlaneSeen {
    /// When its last report arrived (Unix milliseconds).
    pub last_report_ms: u64,
    /// It enforces rate limits on its own because the shared store is unreachable.
    pub store_degraded: bool,
    pub queue_depth: u32,
}

/// An API key's activity since the control plane started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeySeen {
    pub tier: String,
    pub requests: u64,
    pub rejected: u64,
    pub last_seen_ms: u64,
}

struct PlaneReport {
    seen: PlaneSeen,
    backends: Vec<BackendReport>,
    /// Bans it enforces on its own (no shared store).
    bans: Vec<BanInfo>,
}

#[derive(Default)]
struct Bucket {
    second: Second,
    /// Per backend; emptied once the second leaves the rate window.
    latency: HashMap<String, Histogram>,
}

#[derive(Default)]
struct Inner {
    totals: Counters,
    /// Latest report per data plane.
    planes: HashMap<String, PlaneReport>,
    /// Requests and errors per backend since start.
    backend_totals: HashMap<String, (u64, u64)>,
    log: VecDeque<RequestLogEntry>,
    /// Log entries ever added; the last one in `log` has number `log_seq - 1`.
    log_seq: u64,
    /// Oldest first, one per second that had a report.
    history: VecDeque<Bucket>,
    keys: HashMap<String, KeySeen>,
}

impl Inner {
    /// The bucket of second `t`, started when new; a report from a clock gone backwards counts
    /// in the newest bucket.
    fn bucket(&mut self, t: u64) -> &mut Bucket {
        let newest = self.history.back().map(|b| b.second.t);
        if newest.is_none_or(|n| n < t) {
            while self
                .history
                .front()
                .is_some_and(|b| b.second.t + HISTORY_SECONDS <= t)
            {
                self.history.pop_front();
            }
            for b in &mut self.history {
                if b.second.t + RATE_WINDOW_S < t && !b.latency.is_empty() {
                    b.latency = HashMap::new();
                }
            }
            self.history.push_back(Bucket {
                second: Second {
                    t,
                    ..Second::default()
                },
                latency: HashMap::new(),
            });
        }
        self.history.back_mut().expect("a bucket was just ensured")
    }

    fn add_keys(&mut self, keys: Vec<KeyActivity>) {
        for k in keys {
            if !self.keys.contains_key(&k.key_id) && self.keys.len() >= MAX_KEYS_TRACKED {
                let oldest = self
                    .keys
                    .iter()
                    .min_by_key(|(_, s)| s.last_seen_ms)
                    .map(|(id, _)| id.clone());
                if let Some(id) = oldest {
                    self.keys.remove(&id);
                }
            }
            let seen = self.keys.entry(k.key_id).or_default();
            seen.requests += k.requests;
            seen.rejected += k.rejected;
            seen.last_seen_ms = seen.last_seen_ms.max(k.last_seen_ms);
            if !k.tier.is_empty() {
                seen.tier = k.tier;
            }
        }
    }
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
        let bucket = inner.bucket(now_ms / 1000);
        if let Some(c) = &report.counters {
            add(&mut bucket.second.counters, c);
        }
        for b in &report.backends {
            let known = bucket.second.backends.contains_key(&b.address);
            if !known && bucket.second.backends.len() >= MAX_BACKENDS_PER_SECOND {
                continue;
            }
            let t = bucket.second.backends.entry(b.address.clone()).or_default();
            t.0 += b.requests;
            t.1 += b.errors;
            if !b.latency_counts.is_empty() {
                bucket
                    .latency
                    .entry(b.address.clone())
                    .or_default()
                    .add(&b.latency_bounds_us, &b.latency_counts);
            }
        }
        for entry in report.log {
            let _ = self.log_tx.send(entry.clone());
            if inner.log.len() >= LOG_KEPT {
                inner.log.pop_front();
            }
            inner.log.push_back(entry);
            inner.log_seq += 1;
        }
        inner.add_keys(report.keys);
        if !inner.planes.contains_key(&id) && inner.planes.len() >= MAX_PLANES {
            let oldest = inner
                .planes
                .iter()
                .min_by_key(|(_, p)| p.seen.last_report_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                inner.planes.remove(&k);
            }
        }
        inner.planes.insert(
            id,
            PlaneReport {
                seen: PlaneSeen {
                    last_report_ms: now_ms,
                    store_degraded: report.store_degraded,
                    queue_depth: report.queue_depth,
                },
                backends: report.backends,
                bans: report.bans,
            },
        );
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
        for plane in inner.planes.values() {
            if now_ms.saturating_sub(plane.seen.last_report_ms) > GONE_AFTER_MS {
                continue;
            }
            for b in &plane.backends {
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
            .filter(|p| now_ms.saturating_sub(p.seen.last_report_ms) <= GONE_AFTER_MS)
            .count()
    }

    /// Bans the data planes heard from within [`GONE_AFTER_MS`] enforce on their own, in force
    /// at `now_ms`, each naming its data plane.
    pub fn reported_bans(&self, now_ms: u64) -> Vec<BanInfo> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let live = inner
            .planes
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.seen.last_report_ms) <= GONE_AFTER_MS);
        live.flat_map(|(id, p)| {
            p.bans
                .iter()
                .filter(|b| b.until_ms > now_ms)
                .map(|b| BanInfo {
                    node_id: id.clone(),
                    ..b.clone()
                })
        })
        .collect()
    }

    /// Forgets the reported bans of `client` (lifted; data planes confirm in their next report).
    pub fn forget_bans(&self, client: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for p in inner.planes.values_mut() {
            p.bans.retain(|b| b.client != client);
        }
    }

    /// What each data plane said about itself in its last report, by node id.
    pub fn planes(&self) -> HashMap<String, PlaneSeen> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .planes
            .iter()
            .map(|(id, p)| (id.clone(), p.seen.clone()))
            .collect()
    }

    /// The last `n` log entries, oldest first.
    pub fn recent_log(&self, n: usize) -> Vec<RequestLogEntry> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.log.iter().rev().take(n).rev().cloned().collect()
    }

    /// Log entries numbered `from` or later that are still kept, at most the last `max`, oldest
    /// first; and the number the next entry will get (the `from` of the next call).
    pub fn log_since(&self, from: u64, max: usize) -> (Vec<RequestLogEntry>, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let first_kept = inner.log_seq - inner.log.len() as u64;
        let skip = usize::try_from(from.saturating_sub(first_kept)).unwrap_or(usize::MAX);
        let fresh = inner.log.len().saturating_sub(skip);
        let entries = inner
            .log
            .iter()
            .skip(inner.log.len() - fresh.min(max))
            .cloned()
            .collect();
        (entries, inner.log_seq)
    }

    pub fn subscribe_log(&self) -> broadcast::Receiver<RequestLogEntry> {
        self.log_tx.subscribe()
    }

    /// Completed seconds after `after` (Unix seconds) and before the current one, oldest first,
    /// at most the last [`HISTORY_SECONDS`]; seconds without a report are there with zeros, so
    /// the answer has one entry per second.
    pub fn history(&self, after: u64, now_ms: u64) -> Vec<Second> {
        let now = now_ms / 1000;
        let start = (after + 1).max(now.saturating_sub(HISTORY_SECONDS));
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = inner
            .history
            .iter()
            .map(|b| &b.second)
            .skip_while(|s| s.t < start)
            .peekable();
        (start..now)
            .map(|t| {
                while kept.peek().is_some_and(|s| s.t < t) {
                    kept.next();
                }
                match kept.peek() {
                    Some(s) if s.t == t => (*s).clone(),
                    _ => Second {
                        t,
                        ..Second::default()
                    },
                }
            })
            .collect()
    }

    /// Each backend over the last [`RATE_WINDOW_S`] completed seconds.
    pub fn backend_window(&self, now_ms: u64) -> HashMap<String, BackendWindow> {
        let now = now_ms / 1000;
        let start = now.saturating_sub(RATE_WINDOW_S);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, BackendWindow> = HashMap::new();
        let mut latency: HashMap<&str, Histogram> = HashMap::new();
        for b in inner
            .history
            .iter()
            .filter(|b| (start..now).contains(&b.second.t))
        {
            for (addr, (r, e)) in &b.second.backends {
                let w = out.entry(addr.clone()).or_default();
                w.requests += r;
                w.errors += e;
            }
            for (addr, h) in &b.latency {
                latency
                    .entry(addr.as_str())
                    .or_default()
                    .add(&h.bounds, &h.counts);
            }
        }
        for (addr, h) in latency {
            let w = out.entry(addr.to_owned()).or_default();
            w.p50_us = quantile(&h.bounds, &h.counts, 0.5);
            w.p99_us = quantile(&h.bounds, &h.counts, 0.99);
        }
        out
    }

    /// Activity of every API key reported since start (at most [`MAX_KEYS_TRACKED`]), by key id.
    pub fn keys(&self) -> HashMap<String, KeySeen> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proto::v1::Node;

    fn report(node: &str, requests: u64, backends: &[(&str, u64, &[u64])]) -> StatsReport {
        StatsReport {
            node: Some(Node {
                id: node.into(),
                ..Default::default()
            }),
            counters: Some(Counters {
                requests,
                responses_2xx: requests,
                ..Default::default()
            }),
            backends: backends
                .iter()
                .map(|(a, r, counts)| BackendReport {
                    address: (*a).into(),
                    requests: *r,
                    latency_bounds_us: if counts.is_empty() {
                        vec![]
                    } else {
                        vec![1000, 10_000]
                    },
                    latency_counts: counts.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let bounds = [1000, 2000, 4000];
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), None);
        assert_eq!(quantile(&bounds, &[10, 0, 0, 0], 0.5), Some(500));
        assert_eq!(quantile(&bounds, &[0, 10, 0, 0], 0.5), Some(1500));
        assert_eq!(quantile(&bounds, &[50, 0, 50, 0], 0.5), Some(1000));
        assert_eq!(quantile(&bounds, &[50, 0, 50, 0], 0.99), Some(3960));
        assert_eq!(quantile(&bounds, &[1, 0, 0, 99], 0.99), Some(4000));
        assert_eq!(quantile(&bounds, &[1, 2], 0.5), None, "malformed");
    }

    #[test]
    fn history_has_one_entry_per_completed_second() {
        let t = Traffic::default();
        let base = 1_000_000u64;
        t.record(report("a", 3, &[("b1", 3, &[])]), base * 1000 + 100);
        t.record(
            report("b", 2, &[("b1", 1, &[]), ("b2", 1, &[])]),
            base * 1000 + 900,
        );
        t.record(report("a", 5, &[("b1", 5, &[])]), (base + 2) * 1000 + 10);
        // The current second (base + 2) is still filling.
        let h = t.history(0, (base + 2) * 1000 + 500);
        assert_eq!(h.len(), HISTORY_SECONDS as usize);
        let tail: Vec<_> = h[h.len() - 2..]
            .iter()
            .map(|s| (s.t, s.counters.requests, s.backends.clone()))
            .collect();
        assert_eq!(
            tail,
            vec![
                (
                    base,
                    5,
                    BTreeMap::from([("b1".into(), (4, 0)), ("b2".into(), (1, 0))])
                ),
                (base + 1, 0, BTreeMap::new()),
            ]
        );
        let later = t.history(base + 1, (base + 4) * 1000);
        assert_eq!(
            later
                .iter()
                .map(|s| (s.t, s.counters.requests))
                .collect::<Vec<_>>(),
            vec![(base + 2, 5), (base + 3, 0)]
        );
        assert!(t.history(base + 3, (base + 4) * 1000).is_empty());
    }

    #[test]
    fn history_and_latency_stay_bounded() {
        let t = Traffic::default();
        for s in 0..2 * HISTORY_SECONDS {
            t.record(report("a", 1, &[("b1", 1, &[1, 0, 0])]), s * 1000);
        }
        let inner = t.inner.lock().unwrap();
        assert_eq!(inner.history.len(), HISTORY_SECONDS as usize);
        let with_latency = inner
            .history
            .iter()
            .filter(|b| !b.latency.is_empty())
            .count();
        assert!(with_latency <= RATE_WINDOW_S as usize + 1, "{with_latency}");
    }

    #[test]
    fn window_sums_requests_and_merges_latency_of_every_plane() {
        let t = Traffic::default();
        let s = 5_000u64;
        t.record(report("a", 4, &[("b1", 4, &[4, 0, 0])]), s * 1000);
        t.record(report("b", 4, &[("b1", 4, &[0, 4, 0])]), s * 1000 + 1);
        t.record(report("a", 2, &[("b1", 2, &[0, 0, 2])]), (s + 1) * 1000);
        let w = t.backend_window((s + 1) * 1000 + 1);
        let b1 = &w["b1"];
        assert_eq!((b1.requests, b1.p50_us), (8, Some(1000)));
        let w = t.backend_window((s + 2) * 1000);
        let b1 = &w["b1"];
        assert_eq!(b1.requests, 10);
        assert_eq!(b1.p99_us, Some(10_000));
    }

    #[test]
    fn log_cursor_returns_each_entry_once() {
        let t = Traffic::default();
        let (none, cursor) = t.log_since(0, 10);
        assert!(none.is_empty());
        let mut r = report("a", 0, &[]);
        r.log = (0..3)
            .map(|i| RequestLogEntry {
                request_id: format!("r{i}"),
                ..Default::default()
            })
            .collect();
        t.record(r.clone(), 1);
        let (got, cursor) = t.log_since(cursor, 10);
        assert_eq!(got.len(), 3);
        let (got, cursor) = t.log_since(cursor, 10);
        assert!(got.is_empty());
        t.record(r, 2);
        let (got, _) = t.log_since(cursor, 2);
        let ids: Vec<_> = got.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(ids, ["r1", "r2"], "the most recent `max`");
    }

    #[test]
    fn key_activity_adds_up_and_stays_bounded() {
        let t = Traffic::default();
        let mut r = report("a", 0, &[]);
        r.keys = vec![KeyActivity {
            key_id: "k1".into(),
            tier: "free".into(),
            requests: 3,
            rejected: 1,
            last_seen_ms: 10,
        }];
        t.record(r.clone(), 1);
        t.record(r, 2);
        let k = &t.keys()["k1"];
        assert_eq!((k.requests, k.rejected, k.last_seen_ms), (6, 2, 10));
        let mut many = report("a", 0, &[]);
        many.keys = (0..MAX_KEYS_TRACKED as u64 + 5)
            .map(|i| KeyActivity {
                key_id: format!("x{i}"),
                requests: 1,
                last_seen_ms: 100 + i,
                ..Default::default()
            })
            .collect();
        t.record(many, 3);
        assert_eq!(t.keys().len(), MAX_KEYS_TRACKED);
    }
}
