//! What this data plane saw, gathered on the request path for its reports to the control plane
//! ([`crate::control::report`]): its request log, and the activity of each API key.
//!
//! The log takes every request up to [`LOG_EVERY_UP_TO`] per interval, so a light user sees each
//! of theirs; past that one request in [`SAMPLE_EVERY`] per thread, up to [`LOG_PER_INTERVAL`]
//! entries. Answers the data plane gives itself (refusals) are all counted: identical ones of an
//! interval (same decision, status, client and key) make one entry with a count, so a flood of a
//! client's 429s is one line, not the whole log.
//!
//! The request path touches it through [`Reporter::sample`] (a read of a shared counter, and an
//! atomic add for the requests logged) and, for the requests logged and the refusals, a short
//! lock of its thread's shard; keyed requests also count their key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use lb_proto::v1::{KeyActivity, RequestLogEntry};

use crate::clock::unix_ms;

/// Requests logged each interval before sampling starts (the interval is a second).
pub const LOG_EVERY_UP_TO: u64 = 50;
/// Request log entries kept per interval; past it requests are counted, not logged.
pub const LOG_PER_INTERVAL: u64 = 200;
/// Past [`LOG_EVERY_UP_TO`], requests per thread between two that may be logged: logging every
/// request would make the log's counter the hottest shared line of the request path.
pub const SAMPLE_EVERY: u64 = 16;
/// Keys tracked per interval; past it new keys are not reported until the next interval.
const KEYS_PER_INTERVAL: usize = 10_000;
/// Locks the log is split over, one per thread up to this many, so that worker threads logging
/// at once do not wait on each other.
const SHARDS: usize = 8;

/// What a response says about how it was produced, attached by the request path.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub backend: Option<String>,
    pub decision: &'static str,
    pub key_id: Option<String>,
    pub tier: Option<String>,
}

impl Outcome {
    /// Whether the data plane answered the request itself, refusing it (or failing it) rather
    /// than relaying a backend's answer or a cached one.
    pub fn is_refusal(&self) -> bool {
        !matches!(self.decision, "" | "proxied" | "cache_hit")
    }
}

/// Refusals that are coalesced into one entry.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Kind {
    decision: String,
    status: u32,
    client: String,
    key_id: String,
}

impl Kind {
    fn of(e: &RequestLogEntry) -> Kind {
        Kind {
            decision: e.decision.clone(),
            status: e.status,
            client: e.client.clone(),
            key_id: e.key_id.clone(),
        }
    }
}

/// One thread's part of the interval's log.
#[derive(Default)]
struct Shard {
    entries: Vec<RequestLogEntry>,
    /// The entry of `entries` each kind of refusal of the interval is counted in.
    refusals: HashMap<Kind, usize>,
}

pub struct Reporter {
    /// Log entries taken this interval (an entry to come counts from when it is promised).
    logged: AtomicU64,
    shards: [Mutex<Shard>; SHARDS],
    keys: Mutex<HashMap<String, KeyActivity>>,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter {
            logged: AtomicU64::new(0),
            shards: std::array::from_fn(|_| Mutex::default()),
            keys: Mutex::default(),
        }
    }
}

/// The shard of the calling thread.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    SHARD.with(|s| *s)
}

impl Reporter {
    /// Whether to log the next request in full: each of the first [`LOG_EVERY_UP_TO`] of an
    /// interval, then one in [`SAMPLE_EVERY`] per thread while fewer than [`LOG_PER_INTERVAL`]
    /// entries are taken. A `true` promises the request an entry: pass it to [`Reporter::log`]
    /// or [`Reporter::refused`].
    pub fn sample(&self) -> bool {
        // Under load the shared count is only read, until a sampled request takes a place.
        if self.logged.load(Ordering::Relaxed) < LOG_EVERY_UP_TO {
            return self.logged.fetch_add(1, Ordering::Relaxed) < LOG_PER_INTERVAL;
        }
        thread_local!(static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        let n = SEEN.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        n % SAMPLE_EVERY == 1 && self.logged.fetch_add(1, Ordering::Relaxed) < LOG_PER_INTERVAL
    }

    /// Logs a request [`Reporter::sample`] chose.
    pub fn log(&self, entry: RequestLogEntry) {
        self.shard().entries.push(RequestLogEntry { count: 1, ..entry });
    }

    /// Counts a refusal: in the entry of an identical one of this interval if there is one,
    /// else in a new entry (when `sampled` promised it one, or one is left this interval).
    pub fn refused(&self, entry: RequestLogEntry, sampled: bool) {
        let kind = Kind::of(&entry);
        let mut shard = self.shard();
        if let Some(&i) = shard.refusals.get(&kind) {
            shard.entries[i].count += 1;
            return;
        }
        if sampled || self.logged.fetch_add(1, Ordering::Relaxed) < LOG_PER_INTERVAL {
            let i = shard.entries.len();
            shard.entries.push(RequestLogEntry { count: 1, ..entry });
            shard.refusals.insert(kind, i);
        }
    }

    fn shard(&self) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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

    /// The interval's log, oldest first, and key activity; the next interval starts empty.
    pub(crate) fn take(&self) -> (Vec<RequestLogEntry>, Vec<KeyActivity>) {
        let mut log = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.refusals.clear();
            log.append(&mut shard.entries);
        }
        self.logged.store(0, Ordering::Relaxed);
        log.sort_by_key(|e| e.timestamp_ms);
        let keys = std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()));
        (log, keys.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(decision: &str, client: &str) -> RequestLogEntry {
        RequestLogEntry {
            decision: decision.into(),
            status: 429,
            client: client.into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_request_is_logged_up_to_the_rate_then_one_in_sample_every() {
        let r = Reporter::default();
        let chosen = (0..LOG_EVERY_UP_TO).filter(|_| r.sample()).count() as u64;
        assert_eq!(chosen, LOG_EVERY_UP_TO);
        let more = (0..SAMPLE_EVERY * 10).filter(|_| r.sample()).count() as u64;
        assert_eq!(more, 10);
        // The next interval starts over.
        let _ = r.take();
        assert!((0..LOG_EVERY_UP_TO).all(|_| r.sample()));
    }

    #[test]
    fn the_log_of_an_interval_is_bounded() {
        let r = Reporter::default();
        let chosen = (0..SAMPLE_EVERY * LOG_PER_INTERVAL * 2)
            .filter(|_| r.sample())
            .count() as u64;
        assert_eq!(chosen, LOG_PER_INTERVAL);
        for i in 0..LOG_PER_INTERVAL {
            r.refused(entry("rate_limited", &format!("10.0.0.{i}")), false);
        }
        assert!(r.take().0.is_empty(), "no place was left for new refusals");
    }

    #[test]
    fn identical_refusals_of_an_interval_make_one_entry_with_their_count() {
        let r = Reporter::default();
        for _ in 0..1000 {
            r.refused(entry("rate_limited", "10.0.0.1"), false);
        }
        r.refused(entry("banned", "10.0.0.1"), false);
        r.refused(entry("rate_limited", "10.0.0.2"), false);
        let (log, _) = r.take();
        let counts: Vec<(&str, &str, u64)> = log
            .iter()
            .map(|e| (e.decision.as_str(), e.client.as_str(), e.count))
            .collect();
        assert_eq!(
            counts,
            [
                ("rate_limited", "10.0.0.1", 1000),
                ("banned", "10.0.0.1", 1),
                ("rate_limited", "10.0.0.2", 1)
            ]
        );
        // The next interval starts a new entry.
        r.refused(entry("rate_limited", "10.0.0.1"), false);
        assert_eq!(r.take().0[0].count, 1);
    }
}
