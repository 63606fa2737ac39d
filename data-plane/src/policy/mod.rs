//! Policy: the decisions of the request path in plain synchronous Rust with the clock passed in,
//! so each is unit-tested and benchmarked without sockets or sleeps. The I/O code calls them;
//! they call no I/O.
//!
//! - [`balance`]: the six strategies, built once per backend set, picking per request.
//! - [`breaker`]: the per-backend circuit breaker (closed, open, half-open).
//! - [`outlier`]: ejection after consecutive failures, with a cap on the share ejected.
//! - [`retry`]: which requests may be sent again, and the retry budget.
//! - [`backoff`]: jittered exponential backoff.
//! - [`admission`]: the bounded priority queue for backends at their in-flight limit.
//! - [`health`]: active health-check verdicts from thresholds.

pub mod admission;
pub mod backoff;
pub mod balance;
pub mod breaker;
pub mod health;
pub mod outlier;
pub mod retry;
