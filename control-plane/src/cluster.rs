//! The cluster's state and who runs it. The state is the configuration data planes get and the
//! API key registry it is partly derived from (`ConfigSnapshot.keys`, see [`crate::keys`]). Every
//! change goes through [`ControlPlane::change`] (or [`ControlPlane::update`] for configuration
//! only): it is applied to a copy of the current state, validated whole, given the next version,
//! saved, and only then published to every Watch stream, so a refused change leaves nothing
//! behind and a published one survives a restart. A newer state saved by another control plane
//! on the same store is taken over with [`ControlPlane::adopt`] or [`ControlPlane::reload`],
//! which publish without saving. Data planes are tracked with the version each acknowledged and
//! its last NACK.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use lb_proto::v1::{ConfigSnapshot, DataPlaneInfo, Node, StoredState, WatchRequest};
use lb_proto::validate::{self, Invalid};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::keys::{self, KeyRegistry};
use crate::ratelimit::SharedLimits;
use crate::store::{Store, StoreError};

/// Most data planes remembered; past it, the longest-gone disconnected ones are forgotten.
const MAX_DATA_PLANES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    /// Saving the change failed; nothing was published.
    #[error("cannot save the change: {0}")]
    Store(#[from] StoreError),
    /// Reading state the answer depends on failed (the store, or the shared rate-limit state).
    #[error("{0}")]
    Unavailable(StoreError),
    /// The operating system gave no random bytes for a secret.
    #[error("no random bytes from the operating system: {0}")]
    Entropy(getrandom::Error),
}

impl From<keys::KeyError> for UpdateError {
    fn from(e: keys::KeyError) -> Self {
        match e {
            keys::KeyError::Invalid(e) => UpdateError::Invalid(e),
            keys::KeyError::NotFound(what) => UpdateError::NotFound(what),
        }
    }
}

impl UpdateError {
    /// True when another control plane's change won; the caller may retry on the new state.
    pub fn is_conflict(&self) -> bool {
        matches!(self, UpdateError::Store(StoreError::Conflict { .. }))
    }
}

impl From<UpdateError> for tonic::Status {
    fn from(e: UpdateError) -> Self {
        let message = e.to_string();
        match e {
            UpdateError::Invalid(_) => tonic::Status::invalid_argument(message),
            UpdateError::NotFound(_) => tonic::Status::not_found(message),
            UpdateError::Store(StoreError::Conflict { .. }) => tonic::Status::aborted(message),
            UpdateError::Store(_) | UpdateError::Unavailable(_) | UpdateError::Entropy(_) => {
                tonic::Status::unavailable(message)
            }
        }
    }
}

struct PlaneRecord {
    info: DataPlaneInfo,
    /// Which Watch stream is the live one, so a stale stream closing late does not mark a
    /// reconnected data plane gone.
    stream: u64,
}

/// A change in progress: a copy of the configuration, and of the key registry once
/// [`Draft::keys_mut`] asks for it (so configuration changes never copy the registry).
pub struct Draft {
    pub config: ConfigSnapshot,
    keys: Arc<KeyRegistry>,
}

impl Draft {
    pub fn keys(&self) -> &KeyRegistry {
        &self.keys
    }

    pub fn keys_mut(&mut self) -> &mut KeyRegistry {
        Arc::make_mut(&mut self.keys)
    }
}

pub struct ControlPlane {
    /// Serialises changes and adoptions; the published snapshot is in `current`, the registry it
    /// was derived from in `keys`.
    writer: tokio::sync::Mutex<()>,
    current: watch::Sender<Arc<ConfigSnapshot>>,
    keys: Mutex<Arc<KeyRegistry>>,
    shared_limits: Option<Arc<dyn SharedLimits>>,
    planes: Mutex<BTreeMap<String, PlaneRecord>>,
    planes_changed: watch::Sender<u64>,
    next_stream: std::sync::atomic::AtomicU64,
    store: Arc<dyn Store>,
    pub admin_token: String,
    pub cluster_token: Option<String>,
    stop: watch::Sender<bool>,
    /// The data planes' reports, added up.
    pub traffic: crate::traffic::Traffic,
    /// Span export for Admin calls, set once at start when configured.
    pub tracer: std::sync::OnceLock<Arc<data_plane::common::Tracing>>,
    /// Where reports from this control plane's data planes are also sent, for other control
    /// planes to add up (set when the state is in Redis).
    pub report_sink: std::sync::OnceLock<tokio::sync::mpsc::Sender<lb_proto::v1::StatsReport>>,
    /// The listeners' TLS, when served with it (set by the first such serve), for `/metrics`.
    pub tls: std::sync::OnceLock<Arc<crate::tls::ServerTls>>,
    /// Origins whose pages may open the dashboards' WebSocket (none: IP and localhost pages).
    pub public_origins: std::sync::OnceLock<Vec<String>>,
}

/// Checks a state as loaded or about to be published, with `config.keys` derived from the
/// registry.
fn prepare(state: StoredState) -> Result<(ConfigSnapshot, KeyRegistry), Invalid> {
    let mut config = state
        .config
        .ok_or_else(|| Invalid::new("config", "missing from the stored state"))?;
    let registry = KeyRegistry::from_records(state.keys)?;
    config.keys = registry.overrides(keys::default_tier(&config));
    validate::snapshot(&config)?;
    registry.check_tiers(&config)?;
    Ok((config, registry))
}

impl ControlPlane {
    /// Starts from the stored state, or from `initial` (saved as version 1) when there is none.
    pub async fn new(
        store: Arc<dyn Store>,
        initial: ConfigSnapshot,
        admin_token: String,
        cluster_token: Option<String>,
    ) -> Result<ControlPlane, UpdateError> {
        let state = match store.load().await.map_err(UpdateError::Unavailable)? {
            Some(s) => {
                tracing::info!(
                    version = s.config.as_ref().map_or(0, |c| c.version),
                    keys = s.keys.len(),
                    "state loaded from the store"
                );
                s
            }
            None => {
                let mut config = initial;
                config.version = config.version.max(1);
                config.created_at_ms = now_ms();
                let keys = config.keys.iter().map(keys::record_from_override).collect();
                let state = StoredState {
                    config: Some(config),
                    keys,
                };
                prepare(state.clone())?;
                match store.save(&state).await {
                    Ok(()) => state,
                    // Another control plane started on the same empty store first: use its state.
                    Err(e @ StoreError::Conflict { .. }) => {
                        match store.load().await.map_err(UpdateError::Unavailable)? {
                            Some(s) => s,
                            None => return Err(e.into()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let (config, registry) = prepare(state)?;
        Ok(ControlPlane {
            writer: tokio::sync::Mutex::new(()),
            current: watch::channel(Arc::new(config)).0,
            keys: Mutex::new(Arc::new(registry)),
            shared_limits: None,
            planes: Mutex::new(BTreeMap::new()),
            planes_changed: watch::channel(0).0,
            next_stream: std::sync::atomic::AtomicU64::new(1),
            store,
            admin_token,
            cluster_token,
            stop: watch::channel(false).0,
            traffic: crate::traffic::Traffic::default(),
            tracer: std::sync::OnceLock::new(),
            report_sink: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            public_origins: std::sync::OnceLock::new(),
        })
    }

    /// Reads key usage and bans from the data planes' shared rate-limit state.
    #[must_use]
    pub fn with_shared_limits(mut self, shared: Arc<dyn SharedLimits>) -> ControlPlane {
        self.shared_limits = Some(shared);
        self
    }

    pub fn shared_limits(&self) -> Option<&Arc<dyn SharedLimits>> {
        self.shared_limits.as_ref()
    }

    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.current.borrow().clone()
    }

    /// The version of the published state.
    pub fn version(&self) -> u64 {
        self.current.borrow().version
    }

    /// The key registry the published snapshot was derived from.
    pub fn keys(&self) -> Arc<KeyRegistry> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Each published snapshot, newest only (a slow reader skips intermediate versions).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigSnapshot>> {
        self.current.subscribe()
    }

    /// Applies `change` to a copy of the configuration, validates, saves and publishes it.
    /// `keys` is derived from the key registry and recomputed; key changes go through
    /// [`ControlPlane::change`].
    pub async fn update(
        &self,
        change: impl FnOnce(&mut ConfigSnapshot) -> Result<(), UpdateError>,
    ) -> Result<u64, UpdateError> {
        self.change(|draft| change(&mut draft.config))
            .await
            .map(|(version, ())| version)
    }

    /// Applies `change` to a copy of the whole state (configuration and key registry), validates,
    /// saves and publishes it; returns the new version and what `change` returned. A change that
    /// leaves the state as it was is no change: the current version is returned and nothing is
    /// published. When another control plane saved a newer state first, the change is refused
    /// ([`UpdateError::is_conflict`]) and that state is loaded, so a retry applies to it.
    pub async fn change<T>(
        &self,
        change: impl FnOnce(&mut Draft) -> Result<T, UpdateError>,
    ) -> Result<(u64, T), UpdateError> {
        let _writer = self.writer.lock().await;
        let current = self.snapshot();
        let current_keys = self.keys();
        let mut draft = Draft {
            config: (*current).clone(),
            keys: Arc::clone(&current_keys),
        };
        let out = change(&mut draft)?;
        let Draft { mut config, keys } = draft;
        config.keys = keys.overrides(keys::default_tier(&config));
        if config == *current
            && (Arc::ptr_eq(&keys, &current_keys) || keys.to_records() == current_keys.to_records())
        {
            return Ok((current.version, out));
        }
        config.version += 1;
        config.created_at_ms = now_ms();
        validate::snapshot(&config)?;
        keys.check_tiers(&config)?;
        let state = StoredState {
            config: Some(config.clone()),
            keys: keys.to_records(),
        };
        if let Err(e) = self.store.save(&state).await {
            if matches!(e, StoreError::Conflict { .. }) {
                tracing::warn!(error = %e, "change refused by the store");
                if let Err(reload) = self.reload_locked().await {
                    tracing::warn!(error = %reload, "cannot load the newer state");
                }
            }
            return Err(e.into());
        }
        let version = config.version;
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = keys;
        self.current.send_replace(Arc::new(config));
        tracing::info!(version, "configuration changed");
        Ok((version, out))
    }

    /// Publishes `state` when it is newer than the current one, without saving it (it comes from
    /// the store). Returns whether it was newer.
    pub async fn adopt(&self, state: StoredState) -> Result<bool, UpdateError> {
        let _writer = self.writer.lock().await;
        self.adopt_locked(state)
    }

    /// Loads the stored state and adopts it when it is newer.
    pub async fn reload(&self) -> Result<bool, UpdateError> {
        let _writer = self.writer.lock().await;
        self.reload_locked().await
    }

    /// Saves the published state again, for a store that lost it (a Redis restarted without
    /// persistence, or failed over to a replica that lagged). A store that holds a newer state
    /// refuses, and that state is loaded instead.
    pub async fn resave(&self) -> Result<(), UpdateError> {
        let _writer = self.writer.lock().await;
        let state = StoredState {
            config: Some((*self.snapshot()).clone()),
            keys: self.keys().to_records(),
        };
        match self.store.save(&state).await {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict { .. }) => self.reload_locked().await.map(|_| ()),
            Err(e) => Err(e.into()),
        }
    }

    async fn reload_locked(&self) -> Result<bool, UpdateError> {
        match self.store.load().await.map_err(UpdateError::Unavailable)? {
            Some(state) => self.adopt_locked(state),
            None => Ok(false),
        }
    }

    fn adopt_locked(&self, state: StoredState) -> Result<bool, UpdateError> {
        let version = state.config.as_ref().map_or(0, |c| c.version);
        if version <= self.version() {
            return Ok(false);
        }
        let (config, registry) = prepare(state)?;
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(registry);
        self.current.send_replace(Arc::new(config));
        tracing::info!(version, "newer state adopted from the store");
        Ok(true)
    }

    /// Registers a data plane's new Watch stream; returns the stream's id.
    pub fn connect(&self, node: Node, peer: String, applied_version: u64) -> u64 {
        let stream = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut planes = self.planes.lock().unwrap_or_else(|e| e.into_inner());
        if planes.len() >= MAX_DATA_PLANES && !planes.contains_key(&node.id) {
            let oldest = planes
                .iter()
                .filter(|(_, p)| !p.info.connected)
                .min_by_key(|(_, p)| p.info.last_seen_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                planes.remove(&k);
            }
        }
        let record = planes
            .entry(node.id.clone())
            .or_insert_with(|| PlaneRecord {
                info: DataPlaneInfo::default(),
                stream,
            });
        record.stream = stream;
        record.info.node = Some(node);
        record.info.connected = true;
        record.info.peer = peer;
        record.info.applied_version = applied_version;
        record.info.last_seen_ms = now_ms();
        drop(planes);
        self.planes_changed.send_modify(|n| *n += 1);
        stream
    }

    /// Records an ACK or NACK from a data plane.
    pub fn acknowledge(&self, id: &str, stream: u64, msg: &WatchRequest) {
        let mut planes = self.planes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = planes.get_mut(id).filter(|p| p.stream == stream) {
            p.info.applied_version = msg.applied_version;
            p.info.last_seen_ms = now_ms();
            if msg.rejected_version != 0 {
                p.info.last_nack_version = msg.rejected_version;
                p.info.last_nack_error = msg.error.chars().take(4096).collect();
                tracing::warn!(data_plane = id, version = msg.rejected_version, error = %msg.error, "snapshot rejected");
            } else {
                tracing::debug!(
                    data_plane = id,
                    version = msg.applied_version,
                    "snapshot acknowledged"
                );
            }
        }
        drop(planes);
        self.planes_changed.send_modify(|n| *n += 1);
    }

    pub fn disconnect(&self, id: &str, stream: u64) {
        let mut planes = self.planes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = planes.get_mut(id).filter(|p| p.stream == stream) {
            p.info.connected = false;
            p.info.last_seen_ms = now_ms();
        }
        drop(planes);
        self.planes_changed.send_modify(|n| *n += 1);
    }

    pub fn data_planes(&self) -> Vec<DataPlaneInfo> {
        let planes = self.planes.lock().unwrap_or_else(|e| e.into_inner());
        planes.values().map(|p| p.info.clone()).collect()
    }

    /// Changes whenever a data plane connects, acknowledges, rejects or leaves.
    pub fn watch_data_planes(&self) -> watch::Receiver<u64> {
        self.planes_changed.subscribe()
    }

    /// Ends every Watch stream (at shutdown), so data planes move on to another control plane.
    pub fn stop_streams(&self) {
        self.stop.send_replace(true);
    }

    /// Whether the store answers now (see [`Store::ping`]).
    pub async fn store_reachable(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }
}
