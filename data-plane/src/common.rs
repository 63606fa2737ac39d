//! What the control plane shares with the data plane, and the only part of this crate it uses
//! outside its all-in-one `dev` launcher: process set-up (logging, the shutdown signal, a
//! listener with a deep accept queue), certificates (loading, checks, reloads), the way to Redis
//! (one server or a cluster), OpenTelemetry span export, the process and build metrics, and
//! reading settings in layers.
//!
//! Everything else in this crate is the data plane's own; the two planes otherwise meet only in
//! the gRPC contract of `lb-proto` and the Redis key layout it defines.

pub use crate::config::layers::{comma_list, layered, process_env};
pub use crate::config::settings::{SettingsError, default_node_id, secret, socket_addr, tls_files};
pub use crate::redis::{
    Endpoints, RedisConn, RedisTarget, Scan, Timeouts as RedisTimeouts, UrlError, endpoints,
};
pub use crate::server::healthcheck::{accepts, healthcheck};
pub use crate::server::{LISTEN_BACKLOG, listen};
pub use crate::telemetry::logging::{error_report, init_tracing, log_layer, shutdown_signal};
pub use crate::telemetry::metrics::{TlsMetrics, register_process_and_build};
pub use crate::telemetry::otel::{Span, Status, TraceSettings, Tracing, context_of};
pub use crate::tls::client::{Roots, read_roots};
pub use crate::tls::load as load_certificate;
pub use crate::tls::{Tls, TlsError, TlsFiles};
