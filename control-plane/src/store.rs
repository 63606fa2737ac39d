//! Where the control plane keeps its state. The embedded [`MemoryStore`] holds it in the process
//! and, given a file, writes every committed change there (atomically: write, then rename) so a
//! restart loses nothing.

use std::path::PathBuf;

use lb_proto::v1::ConfigSnapshot;
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
}

/// Durable state of the control plane.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The state last saved, if any.
    async fn load(&self) -> Result<Option<ConfigSnapshot>, StoreError>;
    /// Saves a committed state; when this returns Ok, a restart sees it.
    async fn save(&self, state: &ConfigSnapshot) -> Result<(), StoreError>;
}

/// The embedded store: in memory, optionally backed by a file.
pub struct MemoryStore {
    file: Option<PathBuf>,
    state: tokio::sync::Mutex<Option<ConfigSnapshot>>,
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
    async fn load(&self) -> Result<Option<ConfigSnapshot>, StoreError> {
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
            let decoded =
                ConfigSnapshot::decode(bytes.as_slice()).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            *state = Some(decoded);
        }
        Ok(state.clone())
    }

    async fn save(&self, snapshot: &ConfigSnapshot) -> Result<(), StoreError> {
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
