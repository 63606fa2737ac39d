//! The cluster's state and who runs it. Every change goes through [`ControlPlane::update`]: it is
//! applied to a copy of the current snapshot, validated whole, given the next version, saved, and
//! only then published to every Watch stream, so a refused change leaves nothing behind and a
//! published one survives a restart. Data planes are tracked with the version each acknowledged
//! and its last NACK.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lb_proto::v1::{ConfigSnapshot, DataPlaneInfo, Node, WatchRequest};
use lb_proto::validate::{self, Invalid};
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// Most data planes remembered; past it, the longest-gone disconnected ones are forgotten.
const MAX_DATA_PLANES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error("cannot save the change: {0}")]
    Store(#[from] StoreError),
}

impl From<UpdateError> for tonic::Status {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Invalid(i) => tonic::Status::invalid_argument(i.to_string()),
            UpdateError::NotFound(m) => tonic::Status::not_found(m),
            UpdateError::Store(s) => tonic::Status::unavailable(s.to_string()),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct PlaneRecord {
    info: DataPlaneInfo,
    /// Which Watch stream is the live one, so a stale stream closing late does not mark a
    /// reconnected data plane gone.
    stream: u64,
}

pub struct ControlPlane {
    /// Serialises changes; the published snapshot is in `current`.
    writer: tokio::sync::Mutex<()>,
    current: watch::Sender<Arc<ConfigSnapshot>>,
    planes: Mutex<BTreeMap<String, PlaneRecord>>,
    planes_changed: watch::Sender<u64>,
    next_stream: std::sync::atomic::AtomicU64,
    store: Arc<dyn Store>,
    pub admin_token: String,
    pub cluster_token: Option<String>,
    stop: watch::Sender<bool>,
}

impl ControlPlane {
    /// Starts from the stored state, or from `initial` (saved as version 1) when there is none.
    pub async fn new(
        store: Arc<dyn Store>,
        initial: ConfigSnapshot,
        admin_token: String,
        cluster_token: Option<String>,
    ) -> Result<ControlPlane, UpdateError> {
        let snapshot = match store.load().await? {
            Some(s) => {
                validate::snapshot(&s)?;
                tracing::info!(version = s.version, "state loaded from the store");
                s
            }
            None => {
                let mut s = initial;
                s.version = s.version.max(1);
                s.created_at_ms = now_ms();
                validate::snapshot(&s)?;
                store.save(&s).await?;
                s
            }
        };
        Ok(ControlPlane {
            writer: tokio::sync::Mutex::new(()),
            current: watch::channel(Arc::new(snapshot)).0,
            planes: Mutex::new(BTreeMap::new()),
            planes_changed: watch::channel(0).0,
            next_stream: std::sync::atomic::AtomicU64::new(1),
            store,
            admin_token,
            cluster_token,
            stop: watch::channel(false).0,
        })
    }

    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.current.borrow().clone()
    }

    /// Each published snapshot, newest only (a slow reader skips intermediate versions).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigSnapshot>> {
        self.current.subscribe()
    }

    /// Applies `change` to a copy of the state, validates, saves and publishes it.
    pub async fn update(
        &self,
        change: impl FnOnce(&mut ConfigSnapshot) -> Result<(), UpdateError>,
    ) -> Result<u64, UpdateError> {
        let _writer = self.writer.lock().await;
        let mut next = (*self.snapshot()).clone();
        change(&mut next)?;
        next.version += 1;
        next.created_at_ms = now_ms();
        validate::snapshot(&next)?;
        self.store.save(&next).await?;
        let version = next.version;
        self.current.send_replace(Arc::new(next));
        tracing::info!(version, "configuration changed");
        Ok(version)
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

    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }
}
