//! Configuration: the settings a data plane starts with, and the configuration in force.
//!
//! - [`settings`]: flags, environment and TOML file.
//! - [`active`]: the configuration in force, built from a snapshot.

pub mod active;
pub mod settings;
