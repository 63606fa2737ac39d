//! What is wrong with a start-up setting, and where it came from.

use std::path::PathBuf;

/// A setting that cannot be used, naming where it came from.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `message` is the parser's rendering: several lines, a caret under the place.
    #[error("config file {path}:\n{message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}
