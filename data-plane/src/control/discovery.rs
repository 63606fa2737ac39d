//! The configuration stream from the control plane (`lb.v1.Discovery/Watch`). Each snapshot is
//! validated and either applied in one swap and acknowledged, or refused with a NACK naming the
//! problem while the previous configuration keeps serving. When the stream breaks, the data plane
//! keeps its last good configuration and reconnects with jittered exponential backoff.
//!
//! With a state directory, every applied snapshot is also written to disk, and a data plane that
//! cannot reach the control plane at start boots from it instead of refusing traffic.
//!
//! An `https://` control plane is reached over TLS (ALPN h2), its certificate checked against
//! `control_plane_ca` when set, else the system's roots. The CA file is read again for each
//! connection, so replacing it needs no restart; a certificate that fails the check is one more
//! failed connection: logged with the cause, retried with backoff, the configuration in force
//! kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_proto::v1::discovery_client::DiscoveryClient;
use lb_proto::v1::{ConfigSnapshot, Node, WatchRequest};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::settings::Settings;
use crate::policy::backoff::Backoff;
use crate::shared::Shared;

const SNAPSHOT_FILE: &str = "snapshot.pb";
/// Bound on the TCP connect and, separately, the TLS handshake to the control plane: a control
/// plane that does not answer in this time is tried again after the backoff.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest saved snapshot read back at boot; a bound against a corrupt or foreign file.
const MAX_SAVED_BYTES: u64 = 64 << 20;

/// Largest snapshot accepted from the control plane.
pub const MAX_SNAPSHOT_BYTES: usize = 128 << 20;

pub fn node(shared: &Shared) -> Node {
    Node {
        id: shared.settings.node_id.clone(),
        build: env!("CARGO_PKG_VERSION").to_owned(),
        listen: shared.settings.listen.to_string(),
        admin_listen: shared.settings.admin_listen.to_string(),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The control plane's endpoint for both streams (Watch and Report): plain for `http://`, TLS
/// for `https://`.
pub fn endpoint(settings: &Settings) -> Result<Endpoint, BoxError> {
    let endpoint = Endpoint::from_shared(settings.control_plane.clone())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if !settings.control_plane.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = ClientTlsConfig::new().timeout(CONNECT_TIMEOUT);
    let tls = match &settings.control_plane_ca {
        Some(path) => {
            let roots = crate::tls::client::read_roots("control_plane_ca", path)?;
            tls.ca_certificate(Certificate::from_pem(roots.pem))
        }
        None => tls.with_native_roots(),
    };
    // Mutual TLS: this data plane's certificate, read again at each connection (so a renewed
    // one is used at the next).
    let tls = match &settings.control_plane_identity {
        Some(files) => {
            let cert = std::fs::read(&files.cert)?;
            let key = std::fs::read(&files.key)?;
            tls.identity(Identity::from_pem(cert, key))
        }
        None => tls,
    };
    Ok(endpoint.tls_config(tls)?)
}

/// An error with its causes, `outer: inner: ...`: a transport error alone says only
/// "transport error", the certificate problem is in its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Runs the stream until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut saved = match &shared.settings.state_dir {
        Some(dir) => load_saved(dir).await,
        None => None,
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let outcome = tokio::select! {
            r = session(&shared) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        shared
            .control_plane_connected
            .store(false, Ordering::Relaxed);
        shared.metrics.control_plane_connected.set(0);
        match outcome {
            Ok(true) => {
                backoff.reset();
                tracing::warn!(control_plane = %shared.settings.control_plane, "configuration stream ended; reconnecting");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(control_plane = %shared.settings.control_plane, cause = %error_chain(&*e), "control plane unreachable")
            }
        }
        // Unreachable at start: serve the last good snapshot rather than nothing.
        if shared.active().is_none()
            && let Some(snapshot) = saved.take()
        {
            let version = snapshot.version;
            match shared.prepare(snapshot) {
                Ok(active) => {
                    shared.apply(active);
                    tracing::info!(node_id = %shared.settings.node_id, version, "booted from the saved snapshot");
                }
                Err(e) => tracing::warn!(cause = %e, "saved snapshot is not valid; ignored"),
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One stream. `Ok(true)` when at least one snapshot arrived (the control plane was reached).
async fn session(shared: &Shared) -> Result<bool, BoxError> {
    let endpoint = endpoint(&shared.settings)?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await?;
    // Every registered API key travels in the snapshot (about 85 bytes each): room for a
    // million of them, beyond the 4 MiB tonic allows by default.
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
    let (tx, rx) = mpsc::channel(8);
    let me = node(shared);
    let current = shared.active().map_or(0, |a| a.version());
    tx.send(WatchRequest {
        node: Some(me.clone()),
        applied_version: current,
        ..Default::default()
    })
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &shared.settings.cluster_token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let mut stream = client.watch(request).await?.into_inner();
    shared
        .control_plane_connected
        .store(true, Ordering::Relaxed);
    shared.metrics.control_plane_connected.set(1);
    tracing::info!(node_id = %shared.settings.node_id, control_plane = %shared.settings.control_plane, "configuration stream open");
    let mut received = false;
    while let Some(snapshot) = stream.message().await? {
        received = true;
        let reply = receive(shared, snapshot).await;
        tx.send(WatchRequest {
            node: Some(me.clone()),
            ..reply
        })
        .await?;
    }
    Ok(received)
}

/// Applies or refuses one snapshot; the answer to send back.
async fn receive(shared: &Shared, snapshot: ConfigSnapshot) -> WatchRequest {
    let version = snapshot.version;
    let current = shared.active();
    if current.as_ref().is_some_and(|a| a.snapshot == snapshot) {
        return WatchRequest {
            applied_version: version,
            ..Default::default()
        };
    }
    let encoded = shared
        .settings
        .state_dir
        .is_some()
        .then(|| snapshot.encode_to_vec());
    match shared.prepare(snapshot) {
        Ok(active) => {
            let strategy = active.snapshot.strategy.clone();
            let backends = active.slots.len();
            shared.apply(active);
            shared
                .metrics
                .config_updates
                .with_label_values(&["applied"])
                .inc();
            tracing::info!(node_id = %shared.settings.node_id, version, strategy, backends, "configuration applied");
            if let (Some(dir), Some(bytes)) = (&shared.settings.state_dir, encoded)
                && let Err(e) = save(dir, &bytes).await
            {
                tracing::warn!(dir = %dir.display(), cause = %e, "cannot save the snapshot");
            }
            WatchRequest {
                applied_version: version,
                ..Default::default()
            }
        }
        Err(e) => {
            shared
                .metrics
                .config_updates
                .with_label_values(&["rejected"])
                .inc();
            tracing::warn!(version, cause = %e, "configuration rejected; keeping the previous one");
            *shared
                .last_rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((version, e.to_string()));
            WatchRequest {
                applied_version: current.map_or(0, |a| a.version()),
                rejected_version: version,
                error: e.to_string(),
                ..Default::default()
            }
        }
    }
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

/// Writes atomically: a crash mid-write leaves the previous file, never half of a new one.
async fn save(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, snapshot_path(dir)).await
}

async fn load_saved(dir: &Path) -> Option<ConfigSnapshot> {
    let path = snapshot_path(dir);
    let meta = tokio::fs::metadata(&path).await.ok()?;
    if meta.len() > MAX_SAVED_BYTES {
        tracing::warn!(path = %path.display(), "saved snapshot is too large; ignored");
        return None;
    }
    let bytes = tokio::fs::read(&path).await.ok()?;
    match ConfigSnapshot::decode(bytes.as_slice()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "saved snapshot does not decode; ignored");
            None
        }
    }
}
