//! Configuration: the settings a data plane starts with.
//!
//! - [`settings`]: flags, environment and TOML file.

pub mod settings;
