//! Memory freed by closed connections goes back to the system.
//!
//! mimalloc (the data plane's allocator) hands a freed page back to the system once its purge
//! delay (1 s) has passed, but only when the thread next frees another page or takes its
//! allocator's slow path 10,000 times: a data plane whose connections have all closed does
//! neither, and keeps their memory for good (`bench/connections.sh`, 9,000 connections with one
//! request each: 316 MB, still 316 MB 30 s after they closed). So each worker thread asks its
//! allocator to collect every few seconds, which costs nothing per request. Purging on every
//! free instead (`MIMALLOC_PURGE_DELAY=0`) returned the memory too (33 MB) but cost 7% more CPU
//! per request (`bench/forwarding-cost.sh`, 6 rounds). The collection is forced: without it,
//! what a data plane kept 30 s after 9,000 connections closed varied from 2 MB to 31 MB from
//! run to run; forced, 15 MB to 24 MB over five runs, with less held while the connections
//! were still open.

use std::time::Duration;

/// How often each worker thread lets its allocator return what it no longer uses.
const EVERY: Duration = Duration::from_secs(5);

/// Runs on a worker thread for as long as it serves.
pub async fn return_freed_memory() {
    loop {
        tokio::time::sleep(EVERY).await;
        collect();
    }
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect` takes no pointer, may be called on any thread at any time, and only
    // releases memory this thread's heap holds no block of (forced: the pages it had set aside
    // too).
    unsafe { libmimalloc_sys::mi_collect(true) }
}
