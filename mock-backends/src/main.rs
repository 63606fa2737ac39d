//! `mock-backends`: serves one mock backend per port until SIGINT or SIGTERM.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Mock HTTP backends with runtime fault injection (see `/_admin/fault`).
#[derive(Parser, Debug)]
#[command(name = "mock-backends", version, about)]
struct Args {
    /// Comma-separated ports; each one is an independent backend named backend-<port>.
    #[arg(long, env = "LB_MOCK_PORTS", default_value = "5001,5002,5003", value_parser = parse_ports_arg)]
    ports: Ports,

    /// Address to listen on.
    #[arg(long, env = "LB_MOCK_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
}

/// Wrapper so clap treats the whole list as one value.
#[derive(Clone, Debug)]
struct Ports(Vec<u16>);

fn parse_ports_arg(s: &str) -> Result<Ports, String> {
    mock_backends::parse_ports(s).map(Ports)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let mut listeners = Vec::with_capacity(args.ports.0.len());
    for port in &args.ports.0 {
        let addr = SocketAddr::new(args.host, *port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        listeners.push(listener);
    }
    mock_backends::run(listeners, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = sigterm.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
