//! `lb.v1.Discovery`: the Watch stream that carries snapshots to data planes and their ACKs and
//! NACKs back, and the Report stream of their statistics.

use std::pin::Pin;
use std::sync::Arc;

use lb_proto::v1::discovery_server::Discovery;
use lb_proto::v1::{ConfigSnapshot, ReportAck, StatsReport, WatchRequest};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use rustls::pki_types::{CertificateDer, ServerName};

use crate::auth;
use crate::cluster::ControlPlane;

pub struct DiscoveryService {
    pub cp: Arc<ControlPlane>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let certificate = self.authenticate(&request)?;
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream ended before the data plane said who it is")
        })?;
        let node = first
            .node
            .clone()
            .filter(|n| !n.id.is_empty() && n.id.len() <= 128)
            .ok_or_else(|| {
                Status::invalid_argument(
                    "node.id: the first message must name the data plane (1-128 characters)",
                )
            })?;
        let id = node.id.clone();
        if let Some(cert) = &certificate {
            names(cert, &id)?;
        }
        let stream = self.cp.connect(node, peer.clone(), first.applied_version);
        tracing::info!(data_plane = %id, peer = %peer, applied_version = first.applied_version, "data plane connected");

        let (tx, rx) = mpsc::channel(2);
        let cp = Arc::clone(&self.cp);
        tokio::spawn(async move {
            let mut snapshots = cp.subscribe();
            let mut stop = cp.stopping();
            let first = snapshots.borrow_and_update().clone();
            if tx.send(Ok((*first).clone())).await.is_ok() {
                loop {
                    tokio::select! {
                        changed = snapshots.changed() => {
                            if changed.is_err() { break; }
                            let s = snapshots.borrow_and_update().clone();
                            if tx.send(Ok((*s).clone())).await.is_err() { break; }
                        }
                        msg = inbound.message() => match msg {
                            Ok(Some(m)) => cp.acknowledge(&id, stream, &m),
                            Ok(None) | Err(_) => break,
                        },
                        // Mapped to (): the guard wait_for returns must not live across awaits.
                        () = async { let _ = stop.wait_for(|s| *s).await; } => break,
                    }
                }
            }
            cp.disconnect(&id, stream);
            tracing::info!(data_plane = %id, "data plane disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report(
        &self,
        request: Request<Streaming<StatsReport>>,
    ) -> Result<Response<ReportAck>, Status> {
        let certificate = self.authenticate(&request)?;
        let mut inbound = request.into_inner();
        // A report stream never ends on its own; at shutdown it must, or the server would wait
        // for it forever.
        let mut stop = self.cp.stopping();
        // The data plane this stream reports for: named by its first report, and by every
        // later one, or the stream is refused.
        let mut reporter: Option<String> = None;
        loop {
            tokio::select! {
                msg = inbound.message() => match msg? {
                    Some(report) => {
                        let named = report.node.as_ref().map(|n| n.id.as_str()).unwrap_or("");
                        match &reporter {
                            None if named.is_empty() || named.len() > 128 => {
                                return Err(Status::invalid_argument(
                                    "node.id: a report must name its data plane (1-128 characters)",
                                ));
                            }
                            None => {
                                if let Some(cert) = &certificate {
                                    names(cert, named)?;
                                }
                                reporter = Some(named.to_owned());
                            }
                            Some(id) if id != named => {
                                tracing::warn!(data_plane = %id, named, "report naming another data plane refused");
                                return Err(Status::permission_denied(format!(
                                    "this stream reports for data plane {id:?}; a report naming {named:?} is refused"
                                )));
                            }
                            Some(_) => {}
                        }
                        if let Some(sink) = self.cp.report_sink.get() {
                            // Dropped when the sink is full: Redis is slow, the local view stays.
                            let _ = sink.try_send(report.clone());
                        }
                        self.cp.traffic.record(report, crate::clock::now_ms());
                    }
                    None => break,
                },
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
        }
        Ok(Response::new(ReportAck {}))
    }
}

impl DiscoveryService {
    /// A stream's credential: a client certificate (mutual TLS; rustls has checked it against
    /// the client CA), returned to check the data plane's name against, or the cluster token.
    /// With neither configured (`--insecure-discovery`), anyone.
    fn authenticate<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<CertificateDer<'static>>, Status> {
        if let Some(leaf) = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
        {
            return Ok(Some(leaf));
        }
        if let Some(token) = &self.cp.cluster_token {
            auth::check(request.metadata(), token, "cluster token")?;
            return Ok(None);
        }
        if self.cp.tls.get().is_some_and(|t| t.verifies_clients()) {
            return Err(Status::unauthenticated(
                "a client certificate chained to the control plane's client CA is needed",
            ));
        }
        Ok(None)
    }
}

/// A data plane presenting a client certificate is the data plane it names: its node id must
/// be a name the certificate is valid for (a DNS name in its subject alternative names).
fn names(cert: &CertificateDer<'static>, id: &str) -> Result<(), Status> {
    let refuse = || {
        Status::permission_denied(format!(
            "the client certificate does not name data plane {id:?}"
        ))
    };
    let name = ServerName::try_from(id.to_owned()).map_err(|_| refuse())?;
    let leaf = webpki::EndEntityCert::try_from(cert).map_err(|_| refuse())?;
    leaf.verify_is_valid_for_subject_name(&name)
        .map_err(|_| refuse())
}
