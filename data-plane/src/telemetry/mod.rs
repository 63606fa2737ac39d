//! What an operator sees of a data plane.
//!
//! - [`metrics`]: the Prometheus registry and its collectors.
//! - [`otel`]: OpenTelemetry span export and `traceparent` propagation.
//! - [`logging`]: log set-up and the shutdown signal.

pub mod logging;
pub mod metrics;
pub mod otel;
