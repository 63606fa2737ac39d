//! Settings of `control-plane serve` and `control-plane dev`: flags over `LB_*` environment over a
//! TOML, YAML or JSON file over defaults (`data_plane::common::layered`). The file (or nested
//! variables such as `LB_CACHE__ENABLED`) also holds the initial cluster configuration
//! (backends, strategy, policies, tiers), used when the store is empty.
//!
//! TLS files are loaded and checked here, as the data plane checks its own (missing, not PEM,
//! key not matching, certificate expired or not yet valid), so a bad file stops the start with
//! the file named.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use data_plane::common::TlsFiles;
use data_plane::common::{SettingsError, tls_files};

use crate::initial::{Given, Initial};
use lb_proto::v1::{
    Backend, BanPolicy, CachePolicy, CircuitBreakerPolicy, ConfigSnapshot, HashPolicy,
    HealthCheckPolicy, Limit, OutlierPolicy, QueuePolicy, RetryPolicy, StoreFailureMode, Tier,
    TimeoutPolicy, UnknownKeyPolicy,
};
use lb_proto::{defaults, validate};
use serde::{Deserialize, Serialize};

/// The settings of `serve` and `dev`, each declared once: its flag (the settings of the initial
/// configuration that only the file and variables carry are `arg(skip)`), its key in the
/// `--config` file and its `LB_` variable all come from the field's name.
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonArgs {
    /// Settings file, TOML, YAML or JSON by its extension: listeners, initial backends,
    /// strategy, policies and tiers
    #[arg(long, env = "LB_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC listener: Discovery, Admin, health, reflection [default: 0.0.0.0:50051]
    #[arg(long, value_name = "ADDR", value_parser = data_plane::common::socket_addr)]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP listener: REST admin, /stats, /metrics [default: 0.0.0.0:5000]
    #[arg(long, value_name = "ADDR", value_parser = data_plane::common::socket_addr)]
    pub http_listen: Option<SocketAddr>,
    /// Redis URL for durable state and fan-out between control planes; redis+cluster://host:port,...
    /// for a Redis Cluster [default: embedded store]
    #[arg(long = "redis", value_name = "URL")]
    #[serde(alias = "redis")]
    pub redis_url: Option<String>,
    /// PEM CA certificates that a rediss:// Redis's certificate must chain to [default: the
    /// system's roots]
    #[arg(long, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// Initial backends when the store is empty: host:port[=weight], comma-separated (the file
    /// may also list them as tables with every field of a backend)
    #[arg(long, value_name = "LIST", value_parser = backend_list)]
    #[serde(
        default,
        deserialize_with = "data_plane::common::comma_list::deserialize"
    )]
    pub backends: Option<Vec<BackendEntry>>,
    /// Initial strategy when the store is empty [default: round_robin]
    #[arg(long, value_name = "NAME")]
    pub strategy: Option<String>,
    /// Initial per-IP limit when the store is empty: REQUESTS/SECONDS, 0 = off [default: 100/60]
    #[arg(long, value_name = "N/SECONDS")]
    pub ip_limit: Option<String>,
    /// File the embedded store keeps its state in, so a restart loses nothing [default: none]
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    /// Log format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// PEM certificate chain (leaf first): the gRPC and HTTP listeners then speak TLS only
    /// (`serve`; `dev` stays plain). Needs --tls-key; reloaded on SIGHUP and when the file
    /// changes [default: none, plain]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or SEC1) of --tls-cert [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that data planes' client certificates must chain to: Discovery then
    /// takes a client certificate naming the data plane as its credential (mutual TLS). Needs
    /// --tls-cert [default: none]
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Serve `Discovery` to anyone who reaches the gRPC port, with no cluster credential
    /// (`serve` refuses to start without LB_CLUSTER_TOKEN otherwise) [default: false]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure_discovery: Option<bool>,
    /// Origins the dashboards are served from, as a browser names them
    /// (`https://lb.example.com`, comma-separated): only their pages may open `/ws`
    /// [default: none: pages served from an IP address or localhost only]
    #[arg(long, value_name = "ORIGINS", value_delimiter = ',')]
    #[serde(
        default,
        deserialize_with = "data_plane::common::comma_list::deserialize"
    )]
    pub public_origins: Option<Vec<String>>,
    // The rest of the initial configuration: in the file, or as nested variables
    // (`LB_HEALTH_CHECK__INTERVAL_MS=5s`).
    #[arg(skip)]
    pub health_check: Option<HealthCheckPolicy>,
    #[arg(skip)]
    pub outlier: Option<OutlierPolicy>,
    #[arg(skip)]
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    #[arg(skip)]
    pub retry: Option<RetryPolicy>,
    #[arg(skip)]
    pub queue: Option<QueuePolicy>,
    #[arg(skip)]
    pub cache: Option<CachePolicy>,
    #[arg(skip)]
    pub hash: Option<HashPolicy>,
    #[arg(skip)]
    pub timeouts: Option<TimeoutPolicy>,
    #[arg(skip)]
    pub tiers: Option<Vec<TierEntry>>,
    #[arg(skip)]
    pub default_tier: Option<String>,
    #[arg(skip)]
    pub unknown_key: Option<String>,
    #[arg(skip)]
    pub ban: Option<BanPolicy>,
    #[arg(skip)]
    pub on_store_failure: Option<String>,
    #[arg(skip)]
    #[serde(
        default,
        deserialize_with = "data_plane::common::comma_list::deserialize"
    )]
    pub trusted_proxies: Option<Vec<String>>,
}

/// What `--help` says of the settings that only the environment carries.
pub const ENVIRONMENT_HELP: &str = "Environment:
  LB_ADMIN_TOKEN (or LB_ADMIN_TOKEN_FILE)      bearer token of the Admin service and the REST
                                               admin endpoints; `serve` needs 16 characters or
                                               more, `dev` generates one when unset
  LB_CLUSTER_TOKEN (or LB_CLUSTER_TOKEN_FILE)  the credential data planes present on Discovery;
                                               `serve` refuses to start without one unless
                                               --insecure-discovery; `dev` generates its own
  OTEL_EXPORTER_OTLP_ENDPOINT                  export traces over OTLP (standard OTel variables)";

/// Shortest admin token `serve` accepts.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// An initial backend: `host:port[=weight]` (or several, comma-separated), or every field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackendEntry {
    Short(String),
    Full(Backend),
}

/// `--backends`' value, kept as written; checked by [`parse_backends`].
fn backend_list(s: &str) -> Result<BackendEntry, String> {
    Ok(BackendEntry::from(s.to_owned()))
}

impl From<String> for BackendEntry {
    fn from(list: String) -> BackendEntry {
        BackendEntry::Short(list)
    }
}

/// A tier of the initial configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierEntry {
    name: String,
    requests: u64,
    #[serde(default = "minute", deserialize_with = "lb_proto::duration::millis")]
    period_ms: u64,
    #[serde(default)]
    priority: u32,
}

fn minute() -> u64 {
    60_000
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub redis: Option<String>,
    /// CA file for a `rediss://` Redis; `None`: the system's roots.
    pub redis_ca: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    pub log_json: bool,
    /// The configuration to start from when the store holds none (version 1).
    pub initial: ConfigSnapshot,
    /// The settings of `initial` that were given rather than defaulted, and how.
    pub given: Vec<Given>,
    /// Span export (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER_ARG`); `None` is off.
    pub tracing: Option<data_plane::common::TraceSettings>,
    /// Certificate and key of both listeners; `None` is plain HTTP and gRPC.
    pub tls: Option<TlsFiles>,
    /// Discovery may run without a cluster credential.
    pub insecure_discovery: bool,
    /// CA file of data planes' client certificates (mutual TLS on the gRPC listener).
    pub client_ca: Option<PathBuf>,
    /// Origins whose pages may open the dashboards' WebSocket (lower case, no trailing slash).
    pub public_origins: Vec<String>,
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        message: message.into(),
    }
}

/// `host:port[=weight]`, comma-separated.
pub fn parse_backends(list: &str) -> Result<Vec<Backend>, SettingsError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (address, weight) = match item.split_once('=') {
                Some((a, w)) => (
                    a,
                    w.parse::<u32>().map_err(|_| {
                        invalid("backends", format!("{item:?}: weight is not a number"))
                    })?,
                ),
                None => (item, 1),
            };
            Ok(Backend {
                address: address.to_owned(),
                weight,
                ..defaults::backend()
            })
        })
        .collect()
}

/// `REQUESTS/SECONDS`, or `0` for no limit.
pub fn parse_limit(s: &str) -> Result<Limit, SettingsError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Limit {
            requests: 0,
            period_ms: 60_000,
        });
    }
    let bad = || {
        invalid(
            "ip_limit",
            format!("{s:?} is not REQUESTS/SECONDS (for example 100/60) or 0"),
        )
    };
    let (n, secs) = s.split_once('/').ok_or_else(bad)?;
    let requests = n.trim().parse::<u64>().map_err(|_| bad())?;
    let secs = secs.trim().parse::<f64>().map_err(|_| bad())?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(bad());
    }
    Ok(Limit {
        requests,
        period_ms: (secs * 1000.0).round().max(1.0) as u64,
    })
}

fn log_json(format: Option<String>) -> Result<bool, SettingsError> {
    match format.as_deref().unwrap_or("text") {
        "text" => Ok(false),
        "json" => Ok(true),
        other => Err(invalid(
            "log_format",
            format!("{other:?}; valid: text, json"),
        )),
    }
}

impl Settings {
    /// Resolves the settings of `serve`: listeners on every interface unless told otherwise.
    pub fn load(args: CommonArgs) -> Result<Settings, SettingsError> {
        Settings::load_with_default_ip(args, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Resolves the settings, with listeners not set anywhere on `ip` (`dev`: loopback).
    pub fn load_with_default_ip(args: CommonArgs, ip: IpAddr) -> Result<Settings, SettingsError> {
        Settings::load_with_env(args, ip, data_plane::common::process_env())
    }

    /// [`Settings::load_with_default_ip`] with the settings' variables taken from `env` in place
    /// of the process's (the OpenTelemetry variables are still read from the process).
    pub fn load_with_env(
        flags: CommonArgs,
        ip: IpAddr,
        env: Vec<(String, String)>,
    ) -> Result<Settings, SettingsError> {
        let a: CommonArgs =
            data_plane::common::layered(flags.config.as_deref(), env.iter().cloned(), &flags)?;
        let given = given_by(&flags, &env, &a);
        let tls = tls_files(a.tls_cert, a.tls_key)?;
        let client_ca = a.client_ca;
        if let Some(ca) = &client_ca {
            if tls.is_none() {
                return Err(invalid(
                    "client_ca",
                    "is set, but the listeners do not speak TLS (tls_cert, tls_key)",
                ));
            }
            data_plane::common::read_roots("client_ca", ca)?;
        }
        let mut s = defaults::snapshot();
        if let Some(strategy) = a.strategy {
            validate::strategy(&strategy).map_err(|e| invalid("strategy", e.message))?;
            s.strategy = strategy;
        }
        let mut backends = Vec::new();
        for e in a.backends.unwrap_or_default() {
            match e {
                BackendEntry::Short(list) => backends.extend(parse_backends(&list)?),
                BackendEntry::Full(b) => backends.push(b),
            }
        }
        s.backends = backends;
        let rl = s.rate_limit.get_or_insert_with(defaults::rate_limit);
        if let Some(l) = a.ip_limit {
            rl.ip_limit = Some(parse_limit(&l)?);
        }
        if let Some(tiers) = a.tiers {
            rl.tiers = tiers
                .into_iter()
                .map(|t| Tier {
                    name: t.name,
                    limit: Some(Limit {
                        requests: t.requests,
                        period_ms: t.period_ms,
                    }),
                    priority: t.priority,
                })
                .collect();
        }
        if let Some(t) = a.default_tier {
            rl.default_tier = t;
        }
        if let Some(p) = a.unknown_key {
            rl.unknown_key = match p.as_str() {
                "default_tier" | "free" => UnknownKeyPolicy::DefaultTier,
                "reject" => UnknownKeyPolicy::Reject,
                other => {
                    return Err(invalid(
                        "unknown_key",
                        format!("{other:?}; valid: default_tier, reject"),
                    ));
                }
            } as i32;
        }
        if let Some(p) = a.on_store_failure {
            rl.on_store_failure = match p.as_str() {
                "local" => StoreFailureMode::Local,
                "open" => StoreFailureMode::Open,
                "closed" => StoreFailureMode::Closed,
                other => {
                    return Err(invalid(
                        "on_store_failure",
                        format!("{other:?}; valid: local, open, closed"),
                    ));
                }
            } as i32;
        }
        if let Some(b) = a.ban {
            rl.ban = Some(b);
        }
        if let Some(t) = a.trusted_proxies {
            rl.trusted_proxies = t;
        }
        macro_rules! policy {
            ($($field:ident),*) => { $( if let Some(p) = a.$field { s.$field = Some(p); } )* };
        }
        policy!(
            health_check,
            outlier,
            circuit_breaker,
            retry,
            queue,
            cache,
            hash,
            timeouts
        );
        s.version = 1;
        validate::snapshot(&s).map_err(|e| SettingsError::Invalid {
            key: "config",
            message: e.to_string(),
        })?;
        let redis = a.redis_url.filter(|r| !r.is_empty());
        let redis_ca = a.redis_ca;
        if let Some(r) = &redis {
            data_plane::common::endpoints(r).map_err(|e| invalid("redis", e.0))?;
        }
        if let Some(ca) = &redis_ca {
            if !redis
                .as_ref()
                .is_some_and(|r| data_plane::common::RedisTarget::new(r.as_str()).is_tls())
            {
                return Err(invalid(
                    "redis_ca",
                    "is set, but redis is not a rediss:// URL: the CA would not be used",
                ));
            }
            data_plane::common::read_roots("redis_ca", ca)?;
        }
        Ok(Settings {
            grpc_listen: a.grpc_listen.unwrap_or((ip, 50051).into()),
            http_listen: a.http_listen.unwrap_or((ip, 5000).into()),
            redis,
            redis_ca,
            state_file: a.state_file,
            log_json: log_json(a.log_format)?,
            insecure_discovery: a.insecure_discovery.unwrap_or(false),
            client_ca,
            public_origins: public_origins(a.public_origins.unwrap_or_default())?,
            initial: s,
            given,
            tracing: data_plane::common::TraceSettings::from_env()
                .map_err(|message| invalid("tracing", message))?,
            tls,
        })
    }
}

/// The initial settings that were given, named as they were given: by flag, by variable or in
/// the file. `flags` holds only the flags; `env` the variables; `merged` every layer.
fn given_by(flags: &CommonArgs, env: &[(String, String)], merged: &CommonArgs) -> Vec<Given> {
    let set = |var: &str| env.iter().any(|(k, v)| k == var && !v.is_empty());
    let of = |setting, (flag, in_env, any): (bool, bool, bool), names: [&'static str; 3]| {
        let named = if flag {
            names[0]
        } else if in_env {
            names[1]
        } else if any {
            names[2]
        } else {
            return None;
        };
        Some(Given { setting, named })
    };
    [
        of(
            Initial::Strategy,
            (
                flags.strategy.is_some(),
                set("LB_STRATEGY"),
                merged.strategy.is_some(),
            ),
            ["--strategy", "LB_STRATEGY", "strategy in the config file"],
        ),
        of(
            Initial::Backends,
            (
                flags.backends.is_some(),
                set("LB_BACKENDS"),
                merged.backends.is_some(),
            ),
            ["--backends", "LB_BACKENDS", "backends in the config file"],
        ),
        of(
            Initial::IpLimit,
            (
                flags.ip_limit.is_some(),
                set("LB_IP_LIMIT"),
                merged.ip_limit.is_some(),
            ),
            ["--ip-limit", "LB_IP_LIMIT", "ip_limit in the config file"],
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Origins as a browser sends them: `http` or `https`, a host, an optional port, nothing else.
fn public_origins(list: Vec<String>) -> Result<Vec<String>, SettingsError> {
    list.into_iter()
        .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
        .filter(|o| !o.is_empty())
        .map(|o| {
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"));
            let valid = rest.is_some_and(|r| {
                r.parse::<http::uri::Authority>()
                    .is_ok_and(|a| a.as_str() == r && !r.contains('@'))
            });
            if valid {
                Ok(o)
            } else {
                Err(invalid(
                    "public_origins",
                    format!("{o:?} is not an origin such as https://lb.example.com"),
                ))
            }
        })
        .collect()
}

impl Settings {
    /// The PEM of the `redis_ca` file, for [`crate::redis_store::RedisStore::open_with_ca`];
    /// read again here (it was checked at load), refused naming the file.
    pub fn redis_root_ca(&self) -> Result<Option<Vec<u8>>, SettingsError> {
        match &self.redis_ca {
            Some(ca) => Ok(Some(data_plane::common::read_roots("redis_ca", ca)?.pem)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_and_limits_parse() {
        let b = parse_backends("127.0.0.1:5001=2, 127.0.0.1:5002").unwrap();
        assert_eq!((b[0].weight, b[1].weight), (2, 1));
        assert!(parse_backends("a:1=x").is_err());
        assert_eq!(parse_limit("100/60").unwrap().period_ms, 60_000);
        assert_eq!(parse_limit("0").unwrap().requests, 0);
        assert!(parse_limit("100").is_err());
        assert!(parse_limit("5/0").is_err());
    }

    #[test]
    fn file_policies_fill_missing_fields_from_defaults() {
        let dir = std::env::temp_dir().join(format!("cp-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cp.toml");
        std::fs::write(
            &f,
            "strategy = \"ip_hash\"\nbackends = [\"127.0.0.1:1=3\", { address = \"127.0.0.1:2\" }]\n\
             [health_check]\ninterval_ms = 1000\ntimeout_ms = 500\n\
             [timeouts]\nbody_idle_ms = 0\n\
             [[tiers]]\nname = \"free\"\nrequests = 7\n",
        )
        .unwrap();
        let s = Settings::load(CommonArgs {
            config: Some(f.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.initial.strategy, "ip_hash");
        assert_eq!(s.initial.backends.len(), 2);
        assert_eq!(s.initial.backends[1].weight, 1);
        let hc = s.initial.health_check.unwrap();
        assert_eq!((hc.interval_ms, hc.path.as_str()), (1000, "/health"));
        let t = s.initial.timeouts.unwrap();
        assert_eq!((t.request_ms, t.body_idle_ms), (30_000, Some(0)));
        std::fs::write(&f, "[health_check]\nintervl_ms = 1000\n").unwrap();
        let e = Settings::load(CommonArgs {
            config: Some(f.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cp.toml") && e.contains("intervl_ms"), "{e}");
        std::fs::write(&f, "backends = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n").unwrap();
        let e = Settings::load(CommonArgs {
            config: Some(f),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("duplicate backend"), "{e}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// A file of this repository, by its path from the root.
    fn repo_file(relative: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative)
    }

    fn load(relative: &str) -> Settings {
        Settings::load(CommonArgs {
            config: Some(repo_file(relative)),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn the_shipped_example_config_loads() {
        let s = load("deploy/config/control-plane.toml");
        assert_eq!(s.initial.backends.len(), 3);
        assert_eq!(s.initial.backends[0].weight, 2);
        assert_eq!(s.initial.rate_limit.unwrap().tiers.len(), 4);
    }

    #[test]
    fn the_benchmark_config_probes_the_path_the_benchmark_backends_serve() {
        let hc = load("bench/peers-control-plane.toml")
            .initial
            .health_check
            .unwrap();
        assert_eq!(hc.path, "/data");
        let backend = std::fs::read_to_string(repo_file("bench/backend-nginx.conf")).unwrap();
        assert!(backend.contains(&format!("location = {} ", hc.path)));
    }
}
