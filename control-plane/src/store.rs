//! Where the control plane keeps its state: the configuration and the API key registry, as one
//! [`StoredState`] saved whole on every change. The embedded [`MemoryStore`] holds it in the
//! process and, given a file, writes every committed change there (atomically: write, then
//! rename) so a restart loses nothing. [`crate::redis_store`] shares it between control planes.

use std::path::PathBuf;

use lb_proto::v1::{ConfigSnapshot, StoredState};
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} does not decode: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// Redis did not answer, answered with an error, or cannot be reached.
    #[error("Redis at {addr} is unavailable ({op}): {message}")]
    Redis {
        addr: String,
        op: String,
        message: String,
    },
    /// The Redis URL given does not parse.
    #[error("Redis URL does not parse: {0}")]
    RedisUrl(String),
    /// A Redis key holds something other than what this layout puts there.
    #[error("Redis key {key} holds a value that does not decode: {message}")]
    BadValue { key: String, message: String },
    /// Another control plane saved a state at least as new first; this one was not written.
    #[error(
        "another control plane saved version {stored} first; this change (version {attempted}) \
         lost the race and was not applied; the newer state is loaded, retry"
    )]
    Conflict { stored: u64, attempted: u64 },
}

/// Durable state of the control plane.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The state last saved, if any.
    async fn load(&self) -> Result<Option<StoredState>, StoreError>;
    /// Saves a committed state; when this returns Ok, a restart sees it. A store shared between
    /// control planes refuses a state whose version is not above the stored one
    /// ([`StoreError::Conflict`]).
    async fn save(&self, state: &StoredState) -> Result<(), StoreError>;
    /// Whether the store answers now; a store in this process always does.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Decodes a saved state. A file written before API keys were stored holds a bare
/// `ConfigSnapshot`; its key overrides become registry records so none is lost.
fn decode_state(bytes: &[u8]) -> Result<StoredState, prost::DecodeError> {
    match StoredState::decode(bytes) {
        Ok(s) => Ok(s),
        Err(e) => match ConfigSnapshot::decode(bytes) {
            Ok(config) if config.version > 0 => Ok(StoredState {
                keys: config
                    .keys
                    .iter()
                    .map(crate::keys::record_from_override)
                    .collect(),
                config: Some(config),
            }),
            _ => Err(e),
        },
    }
}

/// The embedded store: in memory, optionally backed by a file.
pub struct MemoryStore {
    file: Option<PathBuf>,
    state: tokio::sync::Mutex<Option<StoredState>>,
}

/// Largest state file read back; a bound against a wrong path given by mistake.
const MAX_STATE_BYTES: u64 = 256 << 20;

impl MemoryStore {
    pub fn new(file: Option<PathBuf>) -> MemoryStore {
        MemoryStore {
            file,
            state: tokio::sync::Mutex::new(None),
        }
    }
}

#[tonic::async_trait]
impl Store for MemoryStore {
    async fn load(&self) -> Result<Option<StoredState>, StoreError> {
        let mut state = self.state.lock().await;
        if state.is_none()
            && let Some(path) = &self.file
        {
            let io = |source| StoreError::Io {
                path: path.clone(),
                source,
            };
            match tokio::fs::metadata(path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io(e)),
                Ok(m) if m.len() > MAX_STATE_BYTES => {
                    return Err(StoreError::Corrupt {
                        path: path.clone(),
                        message: format!("{} bytes is more than {MAX_STATE_BYTES}", m.len()),
                    });
                }
                Ok(_) => {}
            }
            let bytes = tokio::fs::read(path).await.map_err(io)?;
            let decoded = decode_state(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
            *state = Some(decoded);
        }
        Ok(state.clone())
    }

    async fn save(&self, snapshot: &StoredState) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        if let Some(path) = &self.file {
            let io = |source| StoreError::Io {
                path: path.clone(),
                source,
            };
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir).await.map_err(io)?;
            }
            let mut tmp = path.clone().into_os_string();
            tmp.push(".tmp");
            tokio::fs::write(&tmp, snapshot.encode_to_vec())
                .await
                .map_err(io)?;
            tokio::fs::rename(&tmp, path).await.map_err(io)?;
        }
        *state = Some(snapshot.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proto::v1::KeyOverride;

    #[test]
    fn a_bare_snapshot_file_still_loads_with_its_keys() {
        let mut config = lb_proto::defaults::snapshot();
        config.version = 7;
        config.keys.push(KeyOverride {
            key_hash: crate::keys::hash_key("k"),
            tier: "premium".into(),
            blocked: false,
        });
        let state = decode_state(&config.encode_to_vec()).unwrap();
        assert_eq!(state.config.unwrap().version, 7);
        assert_eq!(state.keys.len(), 1);
        assert_eq!(state.keys[0].tier, "premium");

        let stored = StoredState {
            config: Some(lb_proto::defaults::snapshot()),
            keys: state.keys,
        };
        assert_eq!(decode_state(&stored.encode_to_vec()).unwrap(), stored);
        assert!(decode_state(b"\xff\xff\xff").is_err());
    }
}
