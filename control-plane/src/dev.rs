//! `control-plane dev`: the whole stack in one process for trying it out: mock backends, the
//! control plane and N data planes, each on its documented port (or the ports given), with a
//! generated admin token. One Ctrl-C stops everything, data planes first so that requests in
//! flight finish.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::random_token;
use crate::settings::{CommonArgs, Settings, parse_backends};

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Data planes to run; the Nth listens on --listen and --admin-listen ports + N-1
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub data_planes: u16,
    /// First data plane's proxy listener [default: 0.0.0.0:8080]
    #[arg(long, env = "LB_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// First data plane's admin listener [default: 127.0.0.1:9901]
    #[arg(long, env = "LB_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Ports of the mock backends (unless --backends names existing ones)
    #[arg(
        long,
        env = "LB_MOCK_PORTS",
        value_name = "PORTS",
        default_value = "5001,5002,5003"
    )]
    pub ports: String,
    /// How the mock backends are spoken to: `http` (HTTP/1.1) or `h2c` (HTTP/2 in clear text,
    /// which gRPC needs); they answer both
    #[arg(
        long,
        env = "LB_MOCK_PROTOCOL",
        value_name = "PROTOCOL",
        default_value = "http",
        value_parser = ["http", "h2c"]
    )]
    pub backend_protocol: String,
}

fn offset(addr: SocketAddr, by: u16) -> anyhow::Result<SocketAddr> {
    let port = addr
        .port()
        .checked_add(by)
        .with_context(|| format!("port {} + {by} is past 65535", addr.port()))?;
    Ok(SocketAddr::new(addr.ip(), port))
}

fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    data_plane::listen(addr).with_context(|| format!("cannot listen on {addr} ({flag})"))
}

/// A loopback URL for a listener that may be bound to every interface.
fn local_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

pub async fn run(
    args: DevArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if args.data_planes == 0 {
        anyhow::bail!("--data-planes must be at least 1");
    }
    let mut common = args.common.clone();
    let mock = if common.backends.is_none() {
        let ports =
            mock_backends::parse_ports(&args.ports).map_err(|e| anyhow::anyhow!("--ports: {e}"))?;
        let mut listeners = Vec::new();
        for p in &ports {
            listeners.push(bind(SocketAddr::from(([127, 0, 0, 1], *p)), "--ports")?);
        }
        let mock = mock_backends::MockBackends::from_listeners(listeners)?;
        let scheme = match args.backend_protocol.as_str() {
            "h2c" => "h2c://",
            _ => "",
        };
        common.backends = Some(
            mock.addrs()
                .iter()
                .map(|a| format!("{scheme}{a}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        Some(mock)
    } else {
        if let Some(b) = &common.backends {
            parse_backends(b)?;
        }
        None
    };
    let settings = Settings::load(common)?;
    if settings.tls.is_some() {
        anyhow::bail!(
            "tls_cert, tls_key (--tls-cert, --tls-key, LB_TLS_CERT, LB_TLS_KEY): `dev` serves \
             plain HTTP and gRPC; TLS is for `control-plane serve`"
        );
    }
    let token = match data_plane::common::secret("LB_ADMIN_TOKEN")? {
        Some(t) => {
            if t.chars().count() < crate::settings::MIN_ADMIN_TOKEN {
                tracing::warn!(
                    "LB_ADMIN_TOKEN is shorter than {} characters; `serve` would refuse it",
                    crate::settings::MIN_ADMIN_TOKEN
                );
            }
            t
        }
        None => random_token().context("cannot draw an admin token")?,
    };
    // The stack's data planes present a credential of its own, as `serve` requires one.
    let cluster_token = random_token().context("cannot draw a cluster token")?;
    let cp = crate::open(
        settings.redis.as_deref(),
        settings.redis_root_ca()?.as_deref(),
        settings.state_file.clone(),
        settings.initial.clone(),
        token.clone(),
        Some(cluster_token.clone()),
    )
    .await
    .context("cannot load the control plane's state")?;
    crate::start_tracing(&cp, settings.tracing.as_ref());
    let _ = cp.public_origins.set(settings.public_origins.clone());
    let grpc = bind(settings.grpc_listen, "--grpc-listen")?;
    let http = bind(settings.http_listen, "--http-listen")?;
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (cp_stop_tx, cp_stop_rx) = watch::channel(false);
    let cp_task = tokio::spawn(crate::serve(Arc::clone(&cp), grpc, http, wait(cp_stop_rx)));

    let listen = args.listen.unwrap_or(([0, 0, 0, 0], 8080).into());
    let admin_listen = args.admin_listen.unwrap_or(([127, 0, 0, 1], 9901).into());
    let mut planes = Vec::new();
    let mut urls = Vec::new();
    for i in 0..args.data_planes {
        let listen = offset(listen, i)?;
        let admin_listen = offset(admin_listen, i)?;
        let proxy = bind(listen, "--listen")?;
        let admin = bind(admin_listen, "--admin-listen")?;
        let dp = data_plane::Settings {
            listen,
            admin_listen,
            control_plane: local_url(grpc_addr),
            node_id: format!("dev-{}", i + 1),
            cluster_token: Some(cluster_token.clone()),
            redis: settings.redis.clone(),
            redis_ca: settings.redis_ca.clone(),
            log_json: settings.log_json,
            tracing: settings.tracing.clone(),
            ..data_plane::Settings::default()
        };
        urls.push((
            local_url(proxy.local_addr()?),
            local_url(admin.local_addr()?),
        ));
        planes.push(tokio::spawn(data_plane::run(
            dp,
            proxy,
            admin,
            wait(stop_rx.clone()),
        )));
    }

    println!("\nload balancer stack running (Ctrl-C stops it)\n");
    for (i, (proxy, admin)) in urls.iter().enumerate() {
        println!(
            "  data plane {}      {proxy}/   (admin {admin}/stats /metrics /readyz)",
            i + 1
        );
    }
    println!(
        "  control plane gRPC {}   (lb.v1.Admin, lb.v1.Discovery, reflection)",
        local_url(grpc_addr)
    );
    println!(
        "  control plane HTTP {}/stats   /metrics   /openapi.json",
        local_url(http_addr)
    );
    println!(
        "  dashboards         {0}/dashboard   {0}/dashboard/ratelimit",
        local_url(http_addr)
    );
    if let Some(m) = &mock {
        for a in m.addrs() {
            println!("  mock backend       http://{a}/data");
        }
    }
    println!("  admin token        {token}");
    println!(
        "  state              {}",
        if settings.redis.is_some() {
            "Redis (--redis), shared with other control planes"
        } else {
            "embedded, in this process"
        }
    );
    println!(
        "\n  try: curl {}/data\n       curl -X POST {}/change_strategy -H 'Authorization: Bearer {token}' -d '{{\"strategy\":\"least_connections\"}}'\n",
        urls[0].0,
        local_url(http_addr)
    );

    shutdown.await;
    // Data planes first, so requests in flight still reach their backends.
    let _ = stop_tx.send(true);
    for p in planes {
        p.await??;
    }
    let _ = cp_stop_tx.send(true);
    cp_task.await??;
    if let Some(m) = mock {
        m.shutdown().await;
    }
    Ok(())
}
