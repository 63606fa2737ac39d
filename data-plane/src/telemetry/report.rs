//! What this data plane saw, gathered on the request path for its reports to the control plane
//! ([`crate::control::report`]): a sample of its request log, and the activity of each API key.
//!
//! The request path only touches it through [`Reporter::sample`] (one atomic add) and, for the
//! few requests sampled, a short lock to queue a log entry; keyed requests also count their key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lb_proto::v1::{KeyActivity, RequestLogEntry};

use crate::clock::unix_ms;

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

    pub(crate) fn take(&self) -> (Vec<RequestLogEntry>, Vec<KeyActivity>) {
        self.sampled.store(0, Ordering::Relaxed);
        let log = std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        let keys = std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()));
        (log, keys.into_values().collect())
    }
}
