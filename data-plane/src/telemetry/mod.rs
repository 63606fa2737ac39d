//! What an operator sees of a data plane.
//!
//! - [`metrics`]: the Prometheus registry and its collectors.
//! - [`otel`]: OpenTelemetry span export and `traceparent` propagation.
//! - [`report`]: the request log sample and key activity for the control plane's reports.
//! - [`logging`]: log set-up and the shutdown signal.

pub mod logging;
pub mod metrics;
pub mod otel;
pub mod report;
