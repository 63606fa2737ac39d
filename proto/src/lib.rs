//! The `lb.v1` gRPC contract: the configuration snapshot pushed to data planes, the Discovery
//! service that carries it (and the data planes' reports back), and the operators' Admin service.
//!
//! - [`v1`]: the generated messages, clients and servers.
//! - [`validate`]: the rules every snapshot obeys. The control plane checks them before it commits
//!   a change and a data plane checks them again on receipt (it may run a different build), so a
//!   snapshot that breaks them is refused at both ends and never half-applied.
//! - [`defaults`]: the default policies (the original system's numbers), used where a
//!   configuration file says nothing.
//! - [`duration`]: durations as settings write them (`250`, `"10s"`).
//! - [`redis_keys`]: the rate-limit state's layout in Redis, which both planes use.

pub mod defaults;
pub mod duration;
#[cfg(test)]
mod fuzz;
pub mod redis_keys;
pub mod validate;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("lb.v1");
}

/// Encoded `FileDescriptorSet` of every `lb.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lb_descriptor.bin"));
