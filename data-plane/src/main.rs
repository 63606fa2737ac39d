use anyhow::Context;
use clap::Parser;
use data_plane::common::{error_report, init_tracing, shutdown_signal as os_signal};
use data_plane::{Args, Command, Settings};

/// mimalloc: fewer cycles per allocation than the system allocator on the request path, where
/// hyper and the header maps allocate per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // One process-wide crypto provider (ring) for any TLS built without naming one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let command = args.command;
    let settings = match Settings::load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("data-plane: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if command == Some(Command::Healthcheck) {
        return match data_plane::healthcheck(settings.admin_listen, "/readyz") {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("data-plane healthcheck: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    init_tracing(settings.log_json);
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(serve(settings)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("data-plane: {}", error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let proxy = data_plane::listen(settings.listen)
        .with_context(|| format!("cannot listen on {} (--listen)", settings.listen))?;
    let admin = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--admin-listen)",
                settings.admin_listen
            )
        })?;
    data_plane::run(settings, proxy, admin, stop_signal()).await?;
    Ok(())
}

/// The first SIGINT or SIGTERM, logged under this binary's name.
async fn stop_signal() {
    os_signal().await;
    tracing::info!("shutdown signal received");
}
