use anyhow::Context;
use clap::{Parser, Subcommand};
use control_plane::settings::MIN_ADMIN_TOKEN;
use control_plane::settings::{CommonArgs, Settings};
use control_plane::{dev, random_token};
use data_plane::common::{error_report, init_tracing, secret, shutdown_signal as os_signal};

#[derive(Parser)]
#[command(
    name = "control-plane",
    version,
    about = "Control plane of the load balancer, and the all-in-one dev stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the production control plane
    #[command(after_help = control_plane::settings::ENVIRONMENT_HELP)]
    Serve(CommonArgs),
    /// Run the whole stack in one process: mock backends, control plane, data planes
    #[command(after_help = control_plane::settings::ENVIRONMENT_HELP)]
    Dev(dev::DevArgs),
    /// Exit 0 when the control plane with these settings answers 200 on its HTTP listener's
    /// /healthz, else 1 (for container health checks; the image has no curl). With TLS on
    /// that listener, a TCP connection is all it checks.
    #[command(after_help = control_plane::settings::ENVIRONMENT_HELP)]
    Healthcheck(CommonArgs),
}

/// mimalloc: fewer cycles per allocation than the system allocator on the request path, where
/// hyper and the header maps allocate per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // One process-wide crypto provider (ring) for any TLS built without naming one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::Serve(a) => a.log_format.as_deref() == Some("json"),
        Command::Dev(a) => a.common.log_format.as_deref() == Some("json"),
        Command::Healthcheck(args) => return healthcheck(args.clone()),
    };
    init_tracing(json);
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command {
                    Command::Serve(args) => serve(args).await,
                    Command::Dev(args) => dev::run(args, stop_signal()).await,
                    Command::Healthcheck(_) => unreachable!("answered before the runtime starts"),
                }
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-plane: {}", error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn healthcheck(args: CommonArgs) -> std::process::ExitCode {
    let checked = Settings::load(args)
        .map_err(|e| error_report(&e.into()))
        .and_then(|s| match s.tls {
            None => data_plane::common::healthcheck(s.http_listen, "/healthz"),
            Some(_) => data_plane::common::accepts(s.http_listen),
        });
    match checked {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-plane healthcheck: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: CommonArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args)?;
    let tls = match settings.tls.clone() {
        Some(files) => {
            let tls = control_plane::tls::ServerTls::load(files)?;
            let tls = match &settings.client_ca {
                Some(ca) => tls.with_client_ca(ca)?,
                None => tls,
            };
            Some(std::sync::Arc::new(tls))
        }
        None => None,
    };
    let token = match secret("LB_ADMIN_TOKEN")? {
        Some(t) if t.chars().count() < MIN_ADMIN_TOKEN => anyhow::bail!(
            "LB_ADMIN_TOKEN has {} characters; use at least {MIN_ADMIN_TOKEN} (for example \
             `openssl rand -hex 16`)",
            t.chars().count()
        ),
        Some(t) => t,
        None => {
            let t = random_token().context("cannot draw an admin token")?;
            eprintln!("LB_ADMIN_TOKEN is not set; admin token for this run: {t}");
            t
        }
    };
    let cluster_token = secret("LB_CLUSTER_TOKEN")?;
    if cluster_token.is_none() && settings.client_ca.is_none() && !settings.insecure_discovery {
        anyhow::bail!(
            "no cluster credential: set LB_CLUSTER_TOKEN (or LB_CLUSTER_TOKEN_FILE) here and on \
             every data plane, or --client-ca for data planes' client certificates (mutual TLS), \
             or pass --insecure-discovery to let anyone who reaches the gRPC port read the \
             configuration and send reports"
        );
    }
    if settings.insecure_discovery {
        tracing::warn!(
            "--insecure-discovery: Discovery is open to anyone who reaches the gRPC port"
        );
    }
    let cp = control_plane::open(
        settings.redis.as_deref(),
        settings.redis_root_ca()?.as_deref(),
        settings.state_file.clone(),
        settings.initial.clone(),
        token,
        cluster_token,
        None,
    )
    .await
    .context("cannot load the control plane's state")?;
    control_plane::warn_overridden(&cp, &settings);
    control_plane::start_tracing(&cp, settings.tracing.as_ref());
    let _ = cp.public_origins.set(settings.public_origins.clone());
    // A fleet of data planes reconnects at once after a restart: the long accept queue keeps
    // their handshakes from being dropped.
    let grpc = data_plane::common::listen(settings.grpc_listen)
        .with_context(|| format!("cannot listen on {} (--grpc-listen)", settings.grpc_listen))?;
    let http = data_plane::common::listen(settings.http_listen)
        .with_context(|| format!("cannot listen on {} (--http-listen)", settings.http_listen))?;
    control_plane::serve_with_tls(cp, grpc, http, tls, stop_signal()).await
}

/// The first SIGINT or SIGTERM, logged under this binary's name.
async fn stop_signal() {
    os_signal().await;
    tracing::info!("shutdown signal received");
}
