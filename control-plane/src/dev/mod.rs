//! `control-plane dev`: the whole stack in one process for trying it out: mock backends, the
//! control plane and N data planes, each on its documented port (or the ports given), on
//! 127.0.0.1 unless a listener flag says otherwise, with a generated admin token. Every flag
//! and the configuration are checked before any port is bound. One Ctrl-C stops everything,
//! data planes first so that requests in flight finish.
//!
//! Without Redis, the data planes decide with one in-process limiter state, which the control
//! plane reads for usage and bans ([`limits`]): what it answers is what the proxy enforces.

pub mod limits;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::random_token;
use crate::settings::{BackendEntry, CommonArgs, Settings, parse_backends};
use crate::{ControlPlane, ratelimit::SharedLimits};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Data planes to run; the Nth listens on --listen and --admin-listen ports + N-1
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub data_planes: u16,
    /// First data plane's proxy listener [default: 127.0.0.1:8080]
    #[arg(long, env = "LB_LISTEN", value_name = "ADDR", value_parser = data_plane::common::socket_addr)]
    pub listen: Option<SocketAddr>,
    /// First data plane's admin listener [default: 127.0.0.1:9901]
    #[arg(long, env = "LB_ADMIN_LISTEN", value_name = "ADDR", value_parser = data_plane::common::socket_addr)]
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

/// The listener of data plane `by` + 1: the first one's port + `by` (port 0, any free port,
/// stays 0).
fn offset(addr: SocketAddr, by: u16) -> anyhow::Result<SocketAddr> {
    if addr.port() == 0 {
        return Ok(addr);
    }
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
        LOOPBACK
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Everything `dev` resolved from its flags, environment and file, checked, before any port is
/// bound.
struct Plan {
    settings: Settings,
    /// Mock backends to start on these ports; `None` when --backends names existing ones.
    mock_ports: Option<Vec<u16>>,
    /// Proxy and admin listener of each data plane.
    planes: Vec<(SocketAddr, SocketAddr)>,
    token: String,
}

fn plan(args: DevArgs) -> anyhow::Result<Plan> {
    if args.data_planes == 0 {
        anyhow::bail!("--data-planes must be at least 1");
    }
    let mut common = args.common;
    // Backends given by flag or variable replace the mock ones.
    let given =
        common.backends.is_some() || std::env::var_os("LB_BACKENDS").is_some_and(|v| !v.is_empty());
    let mock_ports = match given {
        true => {
            for entry in common.backends.iter().flatten() {
                if let BackendEntry::Short(list) = entry {
                    parse_backends(list)?;
                }
            }
            None
        }
        false => {
            let ports = mock_backends::parse_ports(&args.ports)
                .map_err(|e| anyhow::anyhow!("--ports: {e}"))?;
            let scheme = if args.backend_protocol == "h2c" {
                "h2c://"
            } else {
                ""
            };
            let list: Vec<String> = ports
                .iter()
                .map(|p| format!("{scheme}{}", SocketAddr::new(LOOPBACK, *p)))
                .collect();
            common.backends = Some(vec![BackendEntry::Short(list.join(","))]);
            Some(ports)
        }
    };
    let mut settings = Settings::load_with_default_ip(common, LOOPBACK)?;
    if mock_ports.is_some() {
        // The backends are the mock ones, on the ports given.
        for g in &mut settings.given {
            if g.setting == crate::initial::Initial::Backends {
                g.named = "--ports (the mock backends)";
            }
        }
    }
    if settings.tls.is_some() {
        anyhow::bail!(
            "tls_cert, tls_key (--tls-cert, --tls-key, LB_TLS_CERT, LB_TLS_KEY): `dev` serves \
             plain HTTP and gRPC; TLS is for `control-plane serve`"
        );
    }
    let listen = args.listen.unwrap_or((LOOPBACK, 8080).into());
    let admin_listen = args.admin_listen.unwrap_or((LOOPBACK, 9901).into());
    let planes = (0..args.data_planes)
        .map(|i| Ok((offset(listen, i)?, offset(admin_listen, i)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Plan {
        settings,
        mock_ports,
        planes,
        token: admin_token()?,
    })
}

fn admin_token() -> anyhow::Result<String> {
    match data_plane::common::secret("LB_ADMIN_TOKEN")? {
        Some(t) => {
            if t.chars().count() < crate::settings::MIN_ADMIN_TOKEN {
                tracing::warn!(
                    "LB_ADMIN_TOKEN is shorter than {} characters; `serve` would refuse it",
                    crate::settings::MIN_ADMIN_TOKEN
                );
            }
            Ok(t)
        }
        None => random_token().context("cannot draw an admin token"),
    }
}

/// One data plane of the stack: where it listens, and its task.
struct Plane {
    proxy: SocketAddr,
    admin: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
}

/// A running `dev` stack.
pub struct Stack {
    pub cp: Arc<ControlPlane>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub token: String,
    mock: Option<mock_backends::MockBackends>,
    planes: Vec<Plane>,
    redis: bool,
    stop_planes: watch::Sender<bool>,
    stop_cp: watch::Sender<bool>,
    cp_task: JoinHandle<anyhow::Result<()>>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Stack {
    /// Checks every setting, then binds every port and starts every part.
    pub async fn start(args: DevArgs) -> anyhow::Result<Stack> {
        let plan = plan(args)?;
        let Plan {
            settings, token, ..
        } = &plan;
        let mock = match &plan.mock_ports {
            Some(ports) => {
                let listeners = ports
                    .iter()
                    .map(|p| bind(SocketAddr::new(LOOPBACK, *p), "--ports"))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Some(mock_backends::MockBackends::from_listeners(listeners)?)
            }
            None => None,
        };
        // The stack's data planes present a credential of its own, as `serve` requires one.
        let cluster_token = random_token().context("cannot draw a cluster token")?;
        let local = data_plane::LocalLimits::default();
        let in_process: Arc<dyn SharedLimits> = Arc::new(limits::InProcessLimits(local.clone()));
        let cp = crate::open(
            settings.redis.as_deref(),
            settings.redis_root_ca()?.as_deref(),
            settings.state_file.clone(),
            settings.initial.clone(),
            token.clone(),
            Some(cluster_token.clone()),
            Some(in_process),
        )
        .await
        .context("cannot load the control plane's state")?;
        crate::warn_overridden(&cp, settings);
        crate::start_tracing(&cp, settings.tracing.as_ref());
        let _ = cp.public_origins.set(settings.public_origins.clone());
        let grpc = bind(settings.grpc_listen, "--grpc-listen")?;
        let http = bind(settings.http_listen, "--http-listen")?;
        let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
        let (stop_cp, cp_rx) = watch::channel(false);
        let cp_task = tokio::spawn(crate::serve(Arc::clone(&cp), grpc, http, stopped(cp_rx)));
        let (stop_planes, planes_rx) = watch::channel(false);
        let mut planes = Vec::new();
        for (i, (listen, admin_listen)) in plan.planes.iter().enumerate() {
            let proxy = bind(*listen, "--listen")?;
            let admin = bind(*admin_listen, "--admin-listen")?;
            let dp = data_plane::Settings {
                listen: proxy.local_addr()?,
                admin_listen: admin.local_addr()?,
                control_plane: local_url(grpc_addr),
                node_id: format!("dev-{}", i + 1),
                cluster_token: Some(cluster_token.clone()),
                redis: settings.redis.clone(),
                redis_ca: settings.redis_ca.clone(),
                log_json: settings.log_json,
                tracing: settings.tracing.clone(),
                ..data_plane::Settings::default()
            };
            let (proxy_addr, admin_addr) = (dp.listen, dp.admin_listen);
            let shared = Arc::new(data_plane::Shared::with_local_limits(dp, &local));
            planes.push(Plane {
                proxy: proxy_addr,
                admin: admin_addr,
                task: tokio::spawn(data_plane::run_shared(
                    shared,
                    proxy,
                    admin,
                    stopped(planes_rx.clone()),
                )),
            });
        }
        Ok(Stack {
            cp,
            grpc: grpc_addr,
            http: http_addr,
            token: plan.token,
            mock,
            planes,
            redis: plan.settings.redis.is_some(),
            stop_planes,
            stop_cp,
            cp_task,
        })
    }

    /// Each data plane's proxy listener.
    pub fn proxies(&self) -> Vec<SocketAddr> {
        self.planes.iter().map(|p| p.proxy).collect()
    }

    /// Each data plane's admin listener.
    pub fn admins(&self) -> Vec<SocketAddr> {
        self.planes.iter().map(|p| p.admin).collect()
    }

    /// What the stack prints at start: every URL, the admin token, where state is kept.
    pub fn banner(&self) -> String {
        use std::fmt::Write as _;
        let mut b = String::from("\nload balancer stack running (Ctrl-C stops it)\n\n");
        for (i, p) in self.planes.iter().enumerate() {
            let _ = writeln!(
                b,
                "  data plane {}      {}/   (admin {}/stats /metrics /readyz)",
                i + 1,
                local_url(p.proxy),
                local_url(p.admin)
            );
        }
        let (grpc, http) = (local_url(self.grpc), local_url(self.http));
        let _ = writeln!(
            b,
            "  control plane gRPC {grpc}   (lb.v1.Admin, lb.v1.Discovery, reflection)"
        );
        let _ = writeln!(
            b,
            "  control plane HTTP {http}/stats   /metrics   /openapi.json"
        );
        let _ = writeln!(
            b,
            "  dashboards         {http}/dashboard   {http}/dashboard/ratelimit"
        );
        for a in self.mock.iter().flat_map(|m| m.addrs()) {
            let _ = writeln!(b, "  mock backend       http://{a}/data");
        }
        let _ = writeln!(b, "  admin token        {}", self.token);
        let state = if self.redis {
            "Redis (--redis), shared with other control planes"
        } else {
            "embedded, in this process"
        };
        let _ = writeln!(b, "  state              {state}");
        let _ = writeln!(
            b,
            "\n  try: curl {}/data\n       curl -X POST {http}/change_strategy -H 'Authorization: Bearer {}' -d '{{\"strategy\":\"least_connections\"}}'",
            local_url(self.planes[0].proxy),
            self.token
        );
        b
    }

    /// Stops the data planes (requests in flight finish), then the control plane, then the
    /// mock backends.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_planes.send(true);
        for p in self.planes {
            p.task.await??;
        }
        let _ = self.stop_cp.send(true);
        self.cp_task.await??;
        if let Some(m) = self.mock {
            m.shutdown().await;
        }
        Ok(())
    }
}

pub async fn run(
    args: DevArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let stack = Stack::start(args).await?;
    println!("{}", stack.banner());
    shutdown.await;
    stack.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(planes: u16) -> DevArgs {
        DevArgs {
            common: CommonArgs::default(),
            data_planes: planes,
            listen: None,
            admin_listen: None,
            ports: "5001,5002".into(),
            backend_protocol: "http".into(),
        }
    }

    #[test]
    fn every_listener_is_on_loopback_unless_told_otherwise() {
        let p = plan(args(2)).unwrap();
        assert_eq!(p.settings.grpc_listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(p.settings.http_listen, "127.0.0.1:5000".parse().unwrap());
        let planes: Vec<(SocketAddr, SocketAddr)> = vec![
            (
                "127.0.0.1:8080".parse().unwrap(),
                "127.0.0.1:9901".parse().unwrap(),
            ),
            (
                "127.0.0.1:8081".parse().unwrap(),
                "127.0.0.1:9902".parse().unwrap(),
            ),
        ];
        assert_eq!(p.planes, planes);
        assert_eq!(p.mock_ports, Some(vec![5001, 5002]));

        let mut told = args(1);
        told.listen = Some("0.0.0.0:8080".parse().unwrap());
        told.common.http_listen = Some("0.0.0.0:5000".parse().unwrap());
        let p = plan(told).unwrap();
        assert_eq!(p.planes[0].0, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(p.settings.http_listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(p.settings.grpc_listen, "127.0.0.1:50051".parse().unwrap());
    }
}
