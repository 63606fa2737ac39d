//! TLS on both of the control plane's listeners, gRPC and HTTP, with one certificate. Loading,
//! the checks and reloading are the data plane's ([`data_plane::common::Tls`]): a reload on SIGHUP
//! or a file change swaps the certificate for new handshakes on both listeners at once.
//!
//! Connections are accepted and their handshakes run here, each in its own task bounded by
//! [`HANDSHAKE_TIMEOUT`]; finished TLS streams are handed to the servers, tonic through
//! `serve_with_incoming_shutdown` and axum through its `Listener` trait, so both keep their own
//! graceful shutdown and axum its WebSocket upgrades. A slow or silent client delays no accept.
//!
//! ALPN: gRPC offers only `h2`. HTTP offers only `http/1.1`: over HTTP/2 a browser opens the
//! dashboards' `/ws` with an extended CONNECT, which the route (a GET upgrade) does not take.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use data_plane::common::TlsMetrics;
use data_plane::common::{Tls, TlsError, TlsFiles};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

/// Time a client has to finish its handshake: as long as a data plane gives its clients to
/// send a request head by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on one listener; past it, accepting waits for one to end, so
/// a flood of connections that never finish their handshake costs bounded memory.
const MAX_HANDSHAKES: usize = 1024;
/// ALPN of the gRPC listener.
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTP listener.
pub const HTTP_ALPN: &[&[u8]] = &[b"http/1.1"];

/// The certificate of both listeners, and its metrics.
pub struct ServerTls {
    tls: Arc<Tls>,
    registry: prometheus::Registry,
    /// CA certificates data planes' client certificates chain to (mutual TLS on gRPC).
    client_roots: Option<rustls::RootCertStore>,
}

/// What the help texts of the `lb_cp_tls_*` metrics name.
pub const METRICS_OF: &str = "the control plane's gRPC and HTTP listeners";

impl ServerTls {
    /// Loads and checks the files; the error names the setting and the file.
    pub fn load(files: TlsFiles) -> Result<ServerTls, TlsError> {
        let registry = prometheus::Registry::new();
        let metrics =
            TlsMetrics::register(&registry, "lb_cp_tls", METRICS_OF).map_err(|e| TlsError {
                setting: "tls_cert",
                path: files.cert.clone(),
                problem: format!("cannot register the TLS metrics: {e}"),
            })?;
        let tls = Tls::load(files, metrics)?;
        Ok(ServerTls {
            tls: Arc::new(tls),
            registry,
            client_roots: None,
        })
    }

    /// Asks gRPC clients for a certificate chained to the CA certificates of `ca` (mutual
    /// TLS): a data plane may then present one naming it instead of the cluster token.
    pub fn with_client_ca(mut self, ca: &std::path::Path) -> Result<ServerTls, TlsError> {
        self.client_roots = Some(data_plane::common::read_roots("client_ca", ca)?.store);
        Ok(self)
    }

    /// Whether gRPC clients are asked for certificates.
    pub fn verifies_clients(&self) -> bool {
        self.client_roots.is_some()
    }

    /// The certificate in use, its reloads and its metrics.
    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    /// The TLS metrics in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(cause = %e, "cannot encode the TLS metrics");
        }
        out
    }

    /// Accepts on `listener` and hands over connections that finished a handshake offering
    /// `alpn`. The returned task ends, closing the socket, once the [`TlsListener`] is dropped.
    pub fn listen(
        &self,
        listener: TcpListener,
        alpn: &[&[u8]],
        name: &'static str,
    ) -> std::io::Result<(TlsListener, JoinHandle<()>)> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        // Client certificates are asked for on gRPC only: browsers reach the HTTP listener.
        let acceptor = match (&self.client_roots, name) {
            (Some(roots), "grpc") => self
                .tls
                .acceptor_verifying_clients(alpn, roots.clone())
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            _ => self.tls.acceptor_with_alpn(alpn),
        };
        let task = tokio::spawn(accept(listener, acceptor, Arc::clone(&self.tls), name, tx));
        Ok((TlsListener { rx, local_addr }, task))
    }
}

/// Connections that finished their TLS handshake, in the order they finished.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    /// The connections as the stream of incoming connections tonic serves.
    pub fn into_stream(self) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
        use tokio_stream::StreamExt;
        ReceiverStream::new(self.rx).map(|(stream, _)| Ok(stream))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accepting task ended, which it does only once this listener is gone; there
            // is nothing more to hand out.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Accepts until `tx`'s receiver is dropped; then stops, dropping handshakes in progress.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tls: Arc<Tls>,
    name: &'static str,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        if handshakes.len() >= MAX_HANDSHAKES {
            tokio::select! {
                _ = handshakes.join_next() => continue,
                () = tx.closed() => break,
            }
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    tracing::warn!(listener = name, cause = %e, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        () = tx.closed() => break,
                    }
                }
            },
            () = tx.closed() => break,
        };
        let _ = stream.set_nodelay(true);
        let (accepting, tls, tx) = (acceptor.accept(stream), Arc::clone(&tls), tx.clone());
        handshakes.spawn(async move {
            // Failures are the client's doing (a plain-text client, an untrusted certificate,
            // a scanner): counted, and logged at debug level only.
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accepting).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Err(e)) => {
                    tls.handshake_failed(false);
                    tracing::debug!(listener = name, client = %peer, cause = %e, "TLS handshake failed");
                }
                Err(_) => {
                    tls.handshake_failed(true);
                    tracing::debug!(listener = name, client = %peer, "TLS handshake timed out");
                }
            }
        });
    }
}
