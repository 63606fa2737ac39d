//! Configuration: the settings a data plane starts with, and the configuration in force.
//!
//! - [`settings`]: the data plane's start-up settings.
//! - [`error`]: a setting that cannot be used, named with its source.
//! - [`layers`]: flags over `LB_*` environment over a TOML, YAML or JSON file over defaults.
//! - [`active`]: the configuration in force, built from a snapshot.

pub mod active;
pub mod error;
pub mod layers;
pub mod settings;
