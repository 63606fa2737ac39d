//! Start-up settings of a data plane. Each comes from a flag, an `LB_*` environment variable, the
//! `--config` file or its default, in that order of precedence ([`super::layers`]). Everything else a data plane knows
//! arrives from the control plane in snapshots.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use super::error::SettingsError;
use crate::tls::TlsFiles;
use crate::tls::client::BackendTlsSettings;

/// What the binary does besides serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Exit 0 when the data plane with these settings answers 200 on its admin listener's
    /// /readyz, else 1 (for container health checks; the image has no curl)
    Healthcheck,
}

/// The settings of the `data-plane` binary, each declared once: its flag, its key in the
/// `--config` file and its `LB_` variable all come from the field's name ([`super::layers`]).
#[derive(Debug, Default, clap::Parser, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(
    name = "data-plane",
    version,
    about = "One data plane: the proxy that clients talk to",
    after_help = "Environment:
  LB_CLUSTER_TOKEN (or LB_CLUSTER_TOKEN_FILE)  the credential presented on the control plane's
                                               Discovery service (required by `control-plane
                                               serve` unless it runs --insecure-discovery)
  OTEL_EXPORTER_OTLP_ENDPOINT                  export traces over OTLP (standard OTel variables)

Every flag is also a key of the --config file (TOML, YAML or JSON: the flag's name with '_' for
'-') and an environment variable (LB_ and the key in capitals: LB_MAX_BODY_BYTES); a flag wins
over its variable, a variable over the file. Durations (the *_ms settings) take milliseconds or
a number with a unit: 250ms, 10s, 5m."
)]
pub struct Args {
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,
    /// Settings file: TOML, YAML or JSON by its extension, with any of the settings below (keys
    /// as the flags, with '_' for '-')
    #[arg(long, env = "LB_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Proxy listener [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
    pub listen: Option<SocketAddr>,
    /// Admin listener: /healthz /readyz /stats /metrics [default: 127.0.0.1:9901]
    #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
    pub admin_listen: Option<SocketAddr>,
    /// Control plane gRPC endpoint; https:// speaks TLS [default: http://127.0.0.1:50051]
    #[arg(long, value_name = "URL")]
    pub control_plane: Option<String>,
    /// PEM CA certificates an https:// control plane's certificate must chain to; read again
    /// at each connection [default: the system's roots]
    #[arg(long, value_name = "FILE")]
    pub control_plane_ca: Option<PathBuf>,
    /// PEM client certificate chain presented to an https:// control plane that checks client
    /// certificates (mutual TLS); it must name this data plane's node id. Needs
    /// --control-plane-key [default: none]
    #[arg(long, value_name = "FILE")]
    pub control_plane_cert: Option<PathBuf>,
    /// PEM private key of --control-plane-cert [default: none]
    #[arg(long, value_name = "FILE")]
    pub control_plane_key: Option<PathBuf>,
    /// This data plane's unique name [default: hostname-pid]
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Redis URL for shared rate-limit state and cache; redis+cluster://host:port,... for a
    /// Redis Cluster [default: none, per-instance state]
    #[arg(long = "redis", value_name = "URL")]
    #[serde(alias = "redis")]
    pub redis_url: Option<String>,
    /// Directory where the last good snapshot is kept, to boot from when the control plane is
    /// unreachable at start [default: none]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Networks backends may be in (comma-separated CIDRs); a snapshot with a backend elsewhere is
    /// refused (NACK) [default: any]
    #[arg(
        long,
        value_name = "CIDRS",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "super::layers::comma_list::deserialize")]
    pub allowed_backends: Option<Vec<String>>,
    /// Most client connections open at once [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most client connections open at once from one client address, for an edge data plane
    /// that clients reach directly (0 = no limit; behind a load balancer every client shares
    /// its address) [default: 0]
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Most upgraded connections (WebSockets and other protocols switched to with `Upgrade`)
    /// open at once; past it an upgrade is answered 503 [default: 5000]
    #[arg(long, value_name = "N")]
    pub max_tunnels: Option<usize>,
    /// Largest request body in bytes [default: 104857600]
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Largest request head (request line and headers) in bytes [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time a client has to send its request head, in ms [default: 10000]
    #[arg(long, value_name = "MS", value_parser = lb_proto::duration::parse_ms)]
    #[serde(default, deserialize_with = "lb_proto::duration::opt_millis")]
    pub header_timeout_ms: Option<u64>,
    /// Time a client may take nothing of a response being written to it, in ms; an HTTP/2
    /// stream that gets no flow-control window for this long is reset [default: 60000]
    #[arg(long, value_name = "MS", value_parser = lb_proto::duration::parse_ms)]
    #[serde(default, deserialize_with = "lb_proto::duration::opt_millis")]
    pub send_timeout_ms: Option<u64>,
    /// Most requests one HTTP/2 client connection may have open at once [default: 100]
    #[arg(long, value_name = "N")]
    pub max_concurrent_streams: Option<u32>,
    /// On shutdown, time given to requests in flight, in ms [default: 10000]
    #[arg(long, value_name = "MS", value_parser = lb_proto::duration::parse_ms)]
    #[serde(default, deserialize_with = "lb_proto::duration::opt_millis")]
    pub drain_timeout_ms: Option<u64>,
    /// Log format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Proxy worker threads, each with its own event loop and backend connection pool
    /// [default: one per CPU]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Bind proxy worker threads to CPUs: auto (one worker per CPU when there are exactly as
    /// many workers as CPUs this process may use) or off [default: off]
    #[arg(long, value_name = "MODE")]
    pub cpu_affinity: Option<String>,
    /// PEM certificate chain (leaf first): the proxy listener then speaks TLS only. Needs
    /// --tls-key; reloaded on SIGHUP and when the file changes [default: none, plain HTTP]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or SEC1) of --tls-cert [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Connect to backends over TLS (HTTP/1.1), their certificates checked against
    /// --backend-ca; health checks too [default: false]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub backend_tls: Option<bool>,
    /// PEM CA certificates that backend certificates must chain to; required with
    /// --backend-tls [default: none]
    #[arg(long, value_name = "FILE")]
    pub backend_ca: Option<PathBuf>,
    /// Name checked in every backend's certificate (and sent as SNI) instead of the backend's
    /// own host, for backends addressed by IP [default: each backend's host; an IP address is
    /// checked against the certificate's IP addresses]
    #[arg(long, value_name = "NAME")]
    pub backend_server_name: Option<String>,
    /// PEM CA certificates that a rediss:// Redis's certificate must chain to [default: the
    /// system's roots]
    #[arg(long, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
}

/// Settings in force, every one resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub control_plane: String,
    /// CA certificates (PEM) an https:// control plane is verified against; `None`: the
    /// system's roots.
    pub control_plane_ca: Option<PathBuf>,
    /// Client certificate and key presented to the control plane (mutual TLS).
    pub control_plane_identity: Option<TlsFiles>,
    pub node_id: String,
    pub redis: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub allowed_backends: Vec<IpNet>,
    pub max_connections: usize,
    /// Most connections from one client address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Most upgraded connections open at once.
    pub max_tunnels: usize,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// A write to a client that makes no progress for this long ends its connection.
    pub send_timeout: Duration,
    /// Most concurrent streams on one HTTP/2 client connection.
    pub max_concurrent_streams: u32,
    pub drain_timeout: Duration,
    pub log_json: bool,
    pub workers: usize,
    /// Whether each worker is bound to a CPU of its own when there is one per worker.
    pub pin_workers: bool,
    /// Presented on `Discovery` calls when the control plane requires it (`LB_CLUSTER_TOKEN`).
    pub cluster_token: Option<String>,
    /// Span export (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER_ARG`); `None` is off.
    pub tracing: Option<crate::telemetry::otel::TraceSettings>,
    /// Certificate and key of the proxy listener; `None` is plain HTTP.
    pub tls: Option<TlsFiles>,
    /// TLS to backends (the CA file and name override); `None` is plain HTTP.
    pub backend_tls: Option<BackendTlsSettings>,
    /// CA file for a `rediss://` Redis; `None`: the system's roots.
    pub redis_ca: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 9901).into(),
            control_plane: "http://127.0.0.1:50051".to_owned(),
            control_plane_ca: None,
            control_plane_identity: None,
            node_id: default_node_id(),
            redis: None,
            state_dir: None,
            allowed_backends: Vec::new(),
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_tunnels: 5000,
            max_body_bytes: 100 << 20,
            max_header_bytes: 64 << 10,
            header_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_concurrent_streams: 100,
            drain_timeout: Duration::from_secs(10),
            log_json: false,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            pin_workers: false,
            cluster_token: None,
            tracing: None,
            tls: None,
            backend_tls: None,
            redis_ca: None,
        }
    }
}

/// A listener address as flags give it: an IP address and a port. A host name is refused with
/// a message saying so (a listener binds an address; `localhost` may name several).
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        let name = s.rsplit_once(':').map(|(h, _)| h).unwrap_or(s);
        if name.is_empty() || name.parse::<std::net::IpAddr>().is_ok() {
            format!("{s:?} is not an IP address and port, such as 127.0.0.1:8080 or [::1]:8080")
        } else {
            format!(
                "{s:?}: a listener needs an IP address, not the name {name:?} (for example \
                 127.0.0.1:8080 for loopback, 0.0.0.0:8080 for every interface)"
            )
        }
    })
}

/// A secret from the environment: the variable `name`, or the file named by `name_FILE` (as
/// Kubernetes mounts secrets), trimmed; `None` when neither is set or the value is empty. Both
/// set is an error, as is a file that cannot be read.
pub fn secret(name: &'static str) -> Result<Option<String>, SettingsError> {
    let file_var = format!("{name}_FILE");
    let direct = std::env::var(name).ok().filter(|v| !v.is_empty());
    let file = std::env::var_os(&file_var).filter(|v| !v.is_empty());
    let value = match (direct, file) {
        (Some(_), Some(_)) => {
            return Err(SettingsError::Invalid {
                key: name,
                message: format!("set {name} or {file_var}, not both"),
            });
        }
        (Some(v), None) => v,
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            std::fs::read_to_string(&path)
                .map_err(|source| SettingsError::Read {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned()
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(value).filter(|v| !v.is_empty()))
}

/// `hostname-pid`, unique per process on a host.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "data-plane".to_owned());
    format!("{host}-{}", std::process::id())
}

impl Settings {
    /// Resolves the flags given in `args` over the process's `LB_*` variables over the file
    /// over defaults.
    pub fn load(args: Args) -> Result<Settings, SettingsError> {
        Settings::load_with_env(args, super::layers::process_env())
    }

    /// [`Settings::load`] with the settings' variables taken from `env` in place of the
    /// process's (the secrets and the OpenTelemetry variables are still read from the process).
    pub fn load_with_env(
        args: Args,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let args: Args = super::layers::layered(args.config.as_deref(), env, &args)?;
        let d = Settings::default();
        let allowed = args.allowed_backends
            .unwrap_or_default();
        let allowed_backends = allowed
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_net(s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = tls_files(
            args.tls_cert,
            args.tls_key,
        )?;
        let backend_tls = backend_tls(
            args.backend_tls.unwrap_or(false),
            args.backend_ca,
            args.backend_server_name,
        )?;
        let log_format = args.log_format
            .unwrap_or_else(|| "text".into());
        let s = Settings {
            listen: args.listen.unwrap_or(d.listen),
            admin_listen: args.admin_listen
                .unwrap_or(d.admin_listen),
            control_plane: args.control_plane
                .unwrap_or(d.control_plane),
            control_plane_ca: args.control_plane_ca,
            control_plane_identity: match (
                args.control_plane_cert,
                args.control_plane_key,
            ) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (Some(_), None) | (None, Some(_)) => {
                    return Err(SettingsError::Invalid {
                        key: "control_plane_cert",
                        message: "control_plane_cert and control_plane_key go together".into(),
                    });
                }
            },
            node_id: args.node_id.unwrap_or(d.node_id),
            redis: args.redis_url.filter(|r| !r.is_empty()),
            state_dir: args.state_dir,
            allowed_backends,
            max_connections: args.max_connections
                .unwrap_or(d.max_connections),
            max_connections_per_ip: args.max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            max_tunnels: args.max_tunnels
                .unwrap_or(d.max_tunnels),
            max_body_bytes: args.max_body_bytes
                .unwrap_or(d.max_body_bytes),
            max_header_bytes: args.max_header_bytes
                .unwrap_or(d.max_header_bytes),
            header_timeout: args.header_timeout_ms
                .map_or(d.header_timeout, Duration::from_millis),
            send_timeout: args.send_timeout_ms
                .map_or(d.send_timeout, Duration::from_millis),
            max_concurrent_streams: args.max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            drain_timeout: args.drain_timeout_ms
                .map_or(d.drain_timeout, Duration::from_millis),
            log_json: match log_format.as_str() {
                "text" => false,
                "json" => true,
                other => {
                    return Err(SettingsError::Invalid {
                        key: "log_format",
                        message: format!("{other:?}; valid: text, json"),
                    });
                }
            },
            workers: args.workers.unwrap_or(d.workers),
            pin_workers: match args.cpu_affinity.as_deref() {
                None => d.pin_workers,
                Some("auto") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(SettingsError::Invalid {
                        key: "cpu_affinity",
                        message: format!("{other:?}; valid: auto, off"),
                    });
                }
            },
            cluster_token: secret("LB_CLUSTER_TOKEN")?,
            tracing: crate::telemetry::otel::TraceSettings::from_env().map_err(|message| {
                SettingsError::Invalid {
                    key: "tracing",
                    message,
                }
            })?,
            tls,
            backend_tls,
            redis_ca: args.redis_ca,
        };
        s.validate()?;
        if let Some(ca) = &s.control_plane_ca {
            crate::tls::client::read_roots("control_plane_ca", ca)?;
        }
        if let Some(files) = &s.control_plane_identity {
            crate::tls::load(files, crate::tls::unix_seconds(std::time::SystemTime::now()))
                .map_err(|mut e| {
                    e.setting = if e.setting == "tls_key" {
                        "control_plane_key"
                    } else {
                        "control_plane_cert"
                    };
                    e
                })?;
        }
        if let Some(ca) = s.backend_tls.as_ref().and_then(|b| b.ca.as_ref()) {
            crate::tls::client::read_roots("backend_ca", ca)?;
        }
        if let Some(ca) = &s.redis_ca {
            crate::tls::client::read_roots("redis_ca", ca)?;
        }
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, message: &str| {
            Err(SettingsError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if !(self.control_plane.starts_with("http://")
            || self.control_plane.starts_with("https://"))
        {
            return invalid("control_plane", "must be an http:// or https:// URL");
        }
        if self.control_plane.parse::<http::Uri>().is_err() {
            return invalid("control_plane", "is not a URL");
        }
        if self.control_plane_ca.is_some() && !self.control_plane.starts_with("https://") {
            return invalid(
                "control_plane_ca",
                "is set, but control_plane is not an https:// URL: the CA would not be used",
            );
        }
        if self.control_plane_identity.is_some() && !self.control_plane.starts_with("https://") {
            return invalid(
                "control_plane_cert",
                "is set, but control_plane is not an https:// URL: the certificate would not be used",
            );
        }
        if self.node_id.is_empty()
            || self.node_id.len() > 128
            || self.node_id.chars().any(char::is_control)
        {
            return invalid("node_id", "must be 1-128 printable characters");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if !(1..=1024).contains(&self.workers) {
            return invalid("workers", "must be 1 to 1024");
        }
        if self.max_header_bytes < 8192 {
            return invalid("max_header_bytes", "must be at least 8192");
        }
        if self.header_timeout.is_zero() {
            return invalid("header_timeout_ms", "must be at least 1");
        }
        if self.max_concurrent_streams == 0 {
            return invalid("max_concurrent_streams", "must be at least 1");
        }
        if self.send_timeout.is_zero() {
            return invalid("send_timeout_ms", "must be at least 1");
        }
        if let Some(r) = &self.redis
            && let Err(e) = crate::redis::endpoints(r)
        {
            return invalid("redis", &e.0);
        }
        if self.redis_ca.is_some()
            && !self
                .redis
                .as_ref()
                .is_some_and(|r| crate::redis::RedisTarget::new(r.as_str()).is_tls())
        {
            return invalid(
                "redis_ca",
                "is set, but redis is not a rediss:// URL: the CA would not be used",
            );
        }
        Ok(())
    }
}

/// The backend TLS settings: TLS to every backend (`backend_tls`, which needs a CA file), and
/// the CA file and name override, which apply to `https://` backends as well.
fn backend_tls(
    on: bool,
    ca: Option<PathBuf>,
    server_name: Option<String>,
) -> Result<Option<BackendTlsSettings>, SettingsError> {
    let invalid = |key, message: &str| SettingsError::Invalid {
        key,
        message: message.to_owned(),
    };
    let server_name = match server_name.filter(|n| !n.is_empty()) {
        Some(n) => Some(
            crate::tls::client::parse_server_name(&n)
                .map_err(|m| invalid("backend_server_name", &m))?,
        ),
        None => None,
    };
    if on && ca.is_none() {
        return Err(invalid(
            "backend_ca",
            "missing: backend_tls is on, so the CA file backend certificates are checked \
             against must be set (--backend-ca)",
        ));
    }
    if !on && ca.is_none() && server_name.is_none() {
        return Ok(None);
    }
    Ok(Some(BackendTlsSettings {
        all: on,
        ca,
        server_name,
    }))
}

/// The `tls_cert` and `tls_key` settings of a TLS listener: both or neither. The pair is loaded
/// and checked here, so a bad file is refused at start, before anything binds, rather than at
/// the first handshake.
pub fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<TlsFiles>, SettingsError> {
    let files = match (cert, key) {
        (Some(cert), Some(key)) => TlsFiles { cert, key },
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(SettingsError::Invalid {
                key: "tls_key",
                message: "missing: tls_cert (--tls-cert) is set, so the key must be too".to_owned(),
            });
        }
        (None, Some(_)) => {
            return Err(SettingsError::Invalid {
                key: "tls_cert",
                message: "missing: tls_key (--tls-key) is set, so the certificate must be too"
                    .to_owned(),
            });
        }
    };
    crate::tls::load(
        &files,
        crate::tls::unix_seconds(std::time::SystemTime::now()),
    )?;
    Ok(Some(files))
}

fn parse_net(s: &str) -> Result<IpNet, SettingsError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| SettingsError::Invalid {
            key: "allowed_backends",
            message: format!("{s:?} is not an address or CIDR range"),
        })
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
