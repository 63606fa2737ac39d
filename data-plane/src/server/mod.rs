//! Client connections: the listener, the proxy workers (one single-threaded event loop each,
//! accepting from the shared listener), the sniffing of HTTP/1 from HTTP/2, the TLS handshake,
//! and the admin listener.
//!
//! - [`spread`]: keeps the workers' connection counts even.
//! - [`affinity`]: optional binding of workers to CPUs.
//! - [`sniff`]: HTTP/1 or HTTP/2 from a connection's first bytes.
//! - [`admin`]: `/healthz`, `/readyz`, `/stats`, `/metrics`.

pub mod admin;
pub mod affinity;
pub mod fd_limit;
pub mod healthcheck;
pub mod http1;
pub mod memory;
pub mod per_ip;
pub mod sniff;
pub mod spread;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use spread::Spread;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::task::TaskTracker;

use crate::proxy;
use crate::upstream::request_body::Inbound;
use crate::shared::Shared;

/// Connections the kernel queues for a listener before they are accepted. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener (the proxy's, and the control plane's) with room for [`LISTEN_BACKLOG`]
/// connections not yet accepted. With the usual 128, a burst of new clients (a fleet
/// reconnecting after a restart, a load balancer in front opening its pool) overflows the queue
/// while the workers are busy, and the kernel drops the extra handshakes: each of those clients
/// waits out a one-second SYN retransmit.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted data plane can take its port back at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs the proxy on `workers` threads, each a single-threaded event loop accepting from the
/// shared listener with its own backend pool: no request crosses threads, as in nginx or
/// HAProxy. A worker ahead of the others by more than [`spread::SLACK`] connections leaves
/// new ones to them ([`spread`]).
pub(crate) async fn serve_proxy(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(shared.settings.max_connections));
    let per_ip = per_ip::PerIp::new(shared.settings.max_connections_per_ip);
    let workers = shared.settings.workers.max(1);
    let m = &shared.metrics;
    let spread = Spread::new(
        m.connections.clone(),
        (0..workers)
            .map(|i| m.worker_connections.with_label_values(&[&i.to_string()]))
            .collect(),
    );
    let cpus = pinned_cpus(shared.settings.pin_workers, workers);
    let mut finished = Vec::new();
    for i in 0..workers {
        let cpu = cpus.as_ref().map(|c| c[i]);
        let listener = listener.try_clone()?;
        let (shared, connections, stop) = (
            Arc::clone(&shared),
            Arc::clone(&connections),
            stop_rx.clone(),
        );
        let per_ip = per_ip.clone();
        let spread = Arc::clone(&spread);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = affinity::pin_current_thread(cpu)
                {
                    tracing::warn!(cause = %e, worker = i, cpu, "proxy worker runs unbound");
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => rt.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(l) => {
                                let accept = Accept {
                                    id: i,
                                    listener: l,
                                    connections,
                                    per_ip,
                                    refused: shared
                                        .metrics
                                        .connections_refused
                                        .with_label_values(&["per_ip_limit"]),
                                    _serving: spread.serve(i),
                                    spread,
                                };
                                worker(shared, accept, stop).await;
                            }
                            Err(e) => {
                                tracing::error!(cause = %e, "proxy worker cannot use the listener")
                            }
                        }
                    }),
                    Err(e) => {
                        tracing::error!(cause = %e, "proxy worker cannot start its event loop")
                    }
                }
                let _ = done_tx.send(());
            })?;
        finished.push(done_rx);
    }
    drop(listener);
    shutdown.await;
    let _ = stop_tx.send(true);
    for f in finished {
        let _ = f.await;
    }
    Ok(())
}

/// The CPU of each worker when they are to be bound to one each ([`affinity`]).
fn pinned_cpus(enabled: bool, workers: usize) -> Option<Vec<usize>> {
    if !enabled {
        return None;
    }
    let allowed = match affinity::allowed_cpus() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read the CPUs this process may use; workers run unbound");
            return None;
        }
    };
    let plan = affinity::plan(enabled, workers, &allowed);
    match &plan {
        Some(cpus) => tracing::info!(?cpus, "proxy workers bound one per CPU"),
        None => tracing::info!(
            workers,
            cpus = allowed.len(),
            "proxy workers run unbound: not one per CPU"
        ),
    }
    plan
}

/// Where one worker's connections come from.
struct Accept {
    id: usize,
    listener: TcpListener,
    connections: Arc<Semaphore>,
    /// Connections by client address, when capped.
    per_ip: Option<Arc<per_ip::PerIp>>,
    /// Connections closed at once for their address's cap.
    refused: prometheus::IntCounter,
    spread: Arc<Spread>,
    /// Counts this worker in the spread while it accepts.
    _serving: spread::Serving,
}

/// A connection for this worker to serve.
struct Accepted {
    stream: TcpStream,
    peer: std::net::SocketAddr,
    /// Held for the connection's life: its place within `--max-connections`, its worker's
    /// count in the spread, and its address's count when capped.
    permit: (OwnedSemaphorePermit, spread::Load, Option<per_ip::PerIpGuard>),
}

impl Accept {
    /// The next connection, within the connection limit and this worker's share.
    async fn next(&mut self) -> Accepted {
        loop {
            self.spread.turn(self.id).await;
            // Backpressure: at the connection limit, stop accepting until one closes.
            let permit = Arc::clone(&self.connections)
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let per_ip = match &self.per_ip {
                        None => None,
                        Some(caps) => match caps.admit(peer.ip()) {
                            Some(guard) => Some(guard),
                            None => {
                                // Closed at once: the address holds its share already.
                                self.refused.inc();
                                tracing::debug!(client = %peer, "connection over the per-address cap closed");
                                continue;
                            }
                        },
                    };
                    return Accepted {
                        stream,
                        peer,
                        permit: (permit, self.spread.take(self.id), per_ip),
                    };
                }
                Err(e) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// One worker: accept, serve each connection, and on stop drain within the deadline.
async fn worker(shared: Arc<Shared>, mut accept: Accept, stop: watch::Receiver<bool>) {
    let id = accept.id;
    let http1 = http1::Limits {
        max_head: shared.settings.max_header_bytes,
        header_timeout: shared.settings.header_timeout,
    };
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(shared.settings.max_concurrent_streams)
        // RFC 8441: WebSockets over HTTP/2 streams.
        .enable_connect_protocol();
    let servers = Arc::new(Servers { http1, http2 });
    let acceptor = shared.tls().map(|t| t.acceptor());
    let ctx = Arc::new(proxy::Worker::new(Arc::clone(&shared), id).await);
    tokio::spawn(keep_timers_armed(shared.settings.header_timeout));
    tokio::spawn(memory::return_freed_memory());
    let connections = TaskTracker::new();
    let mut stopping = stop.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        let Accepted { stream, peer, permit } = tokio::select! {
            a = accept.next() => a,
            () = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let client = Arc::new(proxy::ClientConn::new(peer, acceptor.is_some()));
        let worker_ctx = Arc::clone(&ctx);
        // Everything past the accept runs in the connection's own task, so a slow client delays
        // no accept; the tracker makes a drain wait for it too (bounded by the header timeout
        // until its first request, by the drain timeout after).
        let (servers, stop) = (Arc::clone(&servers), stop.clone());
        let Some(acceptor) = &acceptor else {
            connections.spawn(async move {
                let _held = permit;
                servers.serve(stream, worker_ctx, client, stop).await;
            });
            continue;
        };
        let handshake = handshake(acceptor, stream, peer, Arc::clone(&shared));
        connections.spawn(async move {
            let _held = permit;
            let Some(stream) = handshake.await else {
                return;
            };
            servers.serve(stream, worker_ctx, client, stop).await;
        });
    }
    drop(accept);
    connections.close();
    let deadline = tokio::time::Instant::now() + shared.settings.drain_timeout;
    // Upgraded connections have left their servers' watch: they are drained on their own, to the
    // same deadline, and closed cleanly past it.
    let drained = async { tokio::join!(connections.wait(), ctx.tunnels.drain(deadline)) };
    tokio::select! {
        _ = drained => tracing::debug!("connections drained"),
        () = tokio::time::sleep_until(deadline) => {
            tracing::warn!("drain timeout; closing the remaining connections");
            // The tunnels get their clean close.
            ctx.tunnels.drain(deadline).await;
        }
    }
}

/// The HTTP servers of one worker, one per protocol.
struct Servers {
    http1: http1::Limits,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Servers {
    /// Serves one client connection (plain, or TLS after its handshake) until it closes. Its
    /// first bytes tell HTTP/2 from HTTP/1 ([`sniff`]); a client that sends none within the
    /// header timeout is cut off, as one that never completes a request head is by the server.
    async fn serve<S>(
        &self,
        mut stream: S,
        worker: Arc<proxy::Worker>,
        client: Arc<proxy::ClientConn>,
        stop: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + sniff::ReadArrived + Unpin + Send + 'static,
    {
        let (peer, header_timeout) = (client.peer, worker.shared.settings.header_timeout);
        // On the heap while it waits: the task keeps no room for it once it is done.
        let (protocol, first) = match Box::pin(tokio::time::timeout(
            header_timeout,
            sniff::sniff(&mut stream),
        ))
        .await
        {
            Ok(Ok(sniffed)) => sniffed,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, cause = %e, "client connection ended before a request");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %peer, "client sent nothing within the header timeout");
                return;
            }
        };
        let io = sniff::Sniffed::new(first, stream, worker.shared.settings.send_timeout);
        // The connection's state is allocated once the first bytes arrived, sized for its
        // protocol: the task of a connection that has sent nothing stays small. A request's
        // future lives on the heap while it runs, not in a slot the connection keeps for its
        // whole life: an idle keep-alive connection holds none of it.
        let served = match protocol {
            sniff::Protocol::Http1 => {
                let svc = move |req: http::Request<http1::body::Body>| {
                    Box::pin(proxy::handle(
                        Arc::clone(&worker),
                        Arc::clone(&client),
                        req.map(Inbound::Http1),
                    ))
                };
                Box::pin(http1::serve(io, self.http1, svc, stop))
                    .await
                    .map_err(|e| e.to_string())
            }
            sniff::Protocol::Http2 => {
                let conn = Arc::clone(&client);
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    Box::pin(proxy::handle(
                        Arc::clone(&worker),
                        Arc::clone(&client),
                        req.map(Inbound::Http2),
                    ))
                });
                let serving = self.http2.serve_connection(TokioIo::new(io), svc);
                let serving = until_stopped(serving, stop, |c| c.graceful_shutdown());
                Box::pin(async move {
                    tokio::select! {
                        served = serving => served,
                        // A stream stalled past the send timeout: dropping the connection
                        // closes it.
                        () = conn.stalled.notified() => Ok(()),
                    }
                })
                .await
                .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = served {
            tracing::debug!(client = %peer, cause = %e, "client connection ended with an error");
        }
    }
}

/// Serves a connection until it ends; once `stop` is set, shuts it down gracefully (an HTTP/1
/// connection after its request in progress, an HTTP/2 one with a GOAWAY) and waits for it.
async fn until_stopped<C: Future>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn);
    tokio::select! {
        out = conn.as_mut() => return out,
        _ = stop.wait_for(|s| *s) => shutdown(conn.as_mut()),
    }
    conn.await
}

/// Keeps one timer pending on the worker's event loop for as long as it runs.
///
/// Arming a timer that expires before every other pending one makes tokio wake its event loop
/// (a write to an eventfd, and one more `epoll_wait` to consume it) so the loop recomputes how
/// long to sleep; with no timer pending at all, every new timer is such a timer. A worker whose
/// connections all wait on backends (no request timeout set) has no timer pending, and each
/// keep-alive connection arms its header timer ([`http1`]) when it goes back to waiting for its
/// next request: without this, about one request in ten paid for that wake-up. A period no
/// longer than the header timeout keeps this timer ahead of those.
async fn keep_timers_armed(header_timeout: std::time::Duration) {
    let period = header_timeout.min(std::time::Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
    }
}

/// A client's TLS handshake, bounded by the header timeout: a client that never finishes holds
/// its connection slot no longer than one that never sends its request head. Failures are
/// counted and logged at debug level (they are the client's doing: scanners, wrong protocol,
/// an untrusted certificate).
fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
) -> impl Future<Output = Option<tokio_rustls::server::TlsStream<TcpStream>>> + Send + use<> {
    let accepting = acceptor.accept(stream);
    async move {
        match tokio::time::timeout(shared.settings.header_timeout, accepting).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                if let Some(t) = shared.tls() {
                    t.handshake_failed(false);
                }
                tracing::debug!(client = %peer, cause = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                if let Some(t) = shared.tls() {
                    t.handshake_failed(true);
                }
                tracing::debug!(client = %peer, "TLS handshake timed out");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    /// More clients than the usual backlog of 128 connect while nothing accepts (every worker
    /// busy): every handshake completes and waits in the queue, none is dropped.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connecting = tokio::task::JoinSet::new();
        for _ in 0..300 {
            // A dropped handshake would be retried after a second, and again after three.
            connecting.spawn(tokio::time::timeout(
                Duration::from_secs(10),
                TcpStream::connect(addr),
            ));
        }
        let mut clients = Vec::new();
        while let Some(done) = connecting.join_next().await {
            let stream = done
                .unwrap()
                .expect("a connection was left waiting: the backlog overflowed")
                .unwrap();
            clients.push(stream);
        }
        assert_eq!(clients.len(), 300);
        // Each one was queued (a client can believe it is connected while the listener dropped
        // its last handshake packet): the listener hands every one of them out.
        let accepted = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..300 {
                listener.accept().await.unwrap();
            }
        });
        accepted
            .await
            .expect("a connection was never queued: the backlog overflowed");
    }
}
