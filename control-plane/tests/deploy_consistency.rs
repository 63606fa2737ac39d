//! The deploy files against the code they run. For `deploy/compose.yaml`, every manifest under
//! `deploy/kubernetes/`, `deploy/prometheus.yml`, the OpenTelemetry collector, Tempo and Grafana
//! files and `deploy/Dockerfile`:
//!
//! - every flag given to one of our binaries is one its command line declares (clap's own
//!   definition for the control plane and the data plane, and the real `control-plane` binary
//!   run with the same arguments and `--help`; the mock backends' `#[arg]` attributes), and every
//!   environment variable is either a clap `env` of that command or a name its sources read;
//! - the settings each container ends up with (its flags, then its variables, then the TOML file
//!   it mounts, through the binaries' own `Settings::load`) are valid, and every port the files
//!   publish, declare, probe, scrape or connect to is a listener of those settings, bound to all
//!   interfaces;
//! - the names they refer to exist: services and aliases, Kubernetes Services and the container
//!   ports behind them, Secrets and their keys, ConfigMaps, the HPA's target, data sources;
//! - every HTTP path probed or scraped is served with 200 by a running data plane, control plane
//!   or mock backend, the gRPC health check answers SERVING, and every metric (and grouping
//!   label) the Grafana dashboard queries is in the `/metrics` of a running stack.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::{Args as _, CommandFactory as _, FromArgMatches as _};
use common::*;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

// ---------------------------------------------------------------------------------------------
// Files

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file (multi-document files included), empty ones left out.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one document expected");
    docs.remove(0)
}

/// A scalar as text (strings, numbers, booleans).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(scalar).collect())
        .unwrap_or_default()
}

fn entries(v: &Value) -> Vec<(String, &Value)> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, v)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every Rust source file of a crate, concatenated.
fn sources(dir: &str) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let mut items: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        items.sort();
        for p in items {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(&root().join(dir), &mut out);
    out
}

/// `host:port` of an `http://`, `redis://` or bare `host:port` address.
fn host_port(url: &str, default_port: u16) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse()
                .unwrap_or_else(|_| panic!("{url}: port is not a number")),
        ),
        None => (authority.to_owned(), default_port),
    }
}

// ---------------------------------------------------------------------------------------------
// The binaries' command lines

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binary {
    ControlPlane,
    DataPlane,
    MockBackends,
}

impl Binary {
    /// The binary a container runs, from the program of its command (a name looked up on the
    /// image's PATH, or a path).
    fn of(program: &str) -> Option<Binary> {
        match program.rsplit('/').next().unwrap() {
            "control-plane" => Some(Binary::ControlPlane),
            "data-plane" => Some(Binary::DataPlane),
            "mock-backends" => Some(Binary::MockBackends),
            _ => None,
        }
    }

    fn crate_dirs(self) -> &'static [&'static str] {
        match self {
            // The control plane links the data-plane library (settings, telemetry).
            Binary::ControlPlane => &["control-plane/src", "data-plane/src"],
            Binary::DataPlane => &["data-plane/src"],
            Binary::MockBackends => &["mock-backends/src"],
        }
    }
}

/// What a command line accepts: long flags, and the environment variable of each.
#[derive(Default)]
struct Surface {
    flags: BTreeSet<String>,
    flag_of_env: BTreeMap<String, String>,
    defaults: BTreeMap<String, String>,
}

impl Surface {
    fn of_clap(cmd: &clap::Command) -> Surface {
        let mut s = Surface::default();
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            s.flags.insert(long.to_owned());
            // A setting's variable is LB_ and its name in capitals (`layered`), or the
            // flag's clap `env` where it has one (--config).
            let env = a.get_env().map_or_else(
                || format!("LB_{}", a.get_id().as_str().to_ascii_uppercase()),
                |e| e.to_string_lossy().into_owned(),
            );
            s.flag_of_env.insert(env, long.to_owned());
            if let Some(d) = a.get_default_values().first() {
                s.defaults
                    .insert(long.to_owned(), d.to_string_lossy().into_owned());
            }
        }
        s
    }

    /// The mock backends keep their command line in their `main.rs`, which no library exposes:
    /// read its `#[arg(...)]` attributes and the fields they annotate.
    fn of_mock_backends() -> Surface {
        fn quoted(attr: &str, key: &str) -> Option<String> {
            let i = attr.find(&format!("{key} = \""))? + key.len() + 4;
            Some(attr[i..].split('"').next()?.to_owned())
        }
        let src = read("mock-backends/src/main.rs");
        let mut s = Surface::default();
        let mut rest = src.as_str();
        while let Some(i) = rest.find("#[arg(") {
            let after = &rest[i + "#[arg(".len()..];
            let end = after.find(")]").expect("an #[arg(...)] attribute ends");
            let attr = &after[..end];
            rest = &after[end + 2..];
            let field = rest
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("#[") && !l.starts_with("//"))
                .expect("a field follows #[arg]");
            let name = field.split(':').next().unwrap().trim();
            let name = name.strip_prefix("pub ").unwrap_or(name).replace('_', "-");
            if !attr.split(',').any(|p| p.trim() == "long") {
                continue;
            }
            s.flags.insert(name.clone());
            if let Some(env) = quoted(attr, "env") {
                s.flag_of_env.insert(env, name.clone());
            }
            if let Some(d) = quoted(attr, "default_value") {
                s.defaults.insert(name, d);
            }
        }
        assert!(
            s.flags.contains("ports") && s.flags.contains("host"),
            "mock-backends/src/main.rs: --ports and --host not found"
        );
        s
    }
}

fn control_plane_serve() -> clap::Command {
    control_plane::settings::CommonArgs::augment_args(clap::Command::new("serve"))
}

/// Runs the real `control-plane` binary with `args` and `--help`: clap refuses an unknown
/// subcommand or flag, or a value it cannot parse, before it gets to `--help`.
fn control_plane_accepts(args: &[String], origin: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{origin}: `control-plane {}` is refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Containers running our binaries, and the settings they end up with

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Listener {
    Proxy,
    Admin,
    Grpc,
    Http,
    Mock,
}

/// HTTP paths that probes and scrapers ask for, by listener, and whether a gRPC health probe is
/// used: checked against a running stack.
#[derive(Default)]
struct Needs {
    http: BTreeSet<(Listener, String)>,
    grpc_health: bool,
}

struct Container {
    origin: String,
    binary: Binary,
    /// After the program.
    args: Vec<String>,
    /// `None`: the value comes from a Secret, a field of the pod or the shell of whoever runs
    /// compose.
    env: Vec<(String, Option<String>)>,
    /// Ports published or declared for the container.
    ports: Vec<u16>,
    /// Files mounted from ConfigMaps, by path.
    files: BTreeMap<String, String>,
}

enum Resolved {
    ControlPlane(Box<control_plane::settings::Settings>),
    DataPlane(Box<data_plane::Settings>),
    Mock { host: IpAddr, ports: Vec<u16> },
}

impl Resolved {
    fn listeners(&self) -> Vec<(Listener, SocketAddr)> {
        match self {
            Resolved::ControlPlane(s) => {
                vec![
                    (Listener::Grpc, s.grpc_listen),
                    (Listener::Http, s.http_listen),
                ]
            }
            Resolved::DataPlane(s) => {
                vec![
                    (Listener::Proxy, s.listen),
                    (Listener::Admin, s.admin_listen),
                ]
            }
            Resolved::Mock { host, ports } => ports
                .iter()
                .map(|p| (Listener::Mock, SocketAddr::new(*host, *p)))
                .collect(),
        }
    }

    /// The listener on `port`, which must be bound to every interface to be reached from
    /// outside the container.
    fn reachable(&self, port: u16, origin: &str, what: &str) -> Listener {
        let listeners = self.listeners();
        let Some((l, addr)) = listeners.iter().find(|(_, a)| a.port() == port) else {
            panic!("{origin}: {what} uses port {port}, where nothing listens ({listeners:?})");
        };
        assert!(
            addr.ip().is_unspecified(),
            "{origin}: {what} uses port {port}, but that listener is bound to {addr}, \
             unreachable from outside the container"
        );
        *l
    }
}

/// Where the image built by deploy/Dockerfile has `path` from: `COPY <src> <dir>/` lines.
fn image_file(path: &str) -> Option<PathBuf> {
    read("deploy/Dockerfile").lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"COPY") || words.iter().any(|w| w.starts_with("--from")) {
            return None;
        }
        let (src, dst) = (words.get(1)?, words.get(2)?);
        let rest = path
            .strip_prefix(dst.trim_end_matches('/'))?
            .strip_prefix('/')?;
        Some(root().join(src).join(rest))
    })
}

/// Checks a container's command line and environment against its binary, and resolves its
/// settings with the binary's own loader.
fn resolve(c: &Container, tmp: &Path) -> Resolved {
    let origin = &c.origin;
    let (surface, parse_args) = match c.binary {
        Binary::ControlPlane => {
            assert_eq!(
                c.args.first().map(String::as_str),
                Some("serve"),
                "{origin}: a deployed control plane runs `control-plane serve`"
            );
            control_plane_accepts(&c.args, origin);
            (Surface::of_clap(&control_plane_serve()), &c.args[1..])
        }
        Binary::DataPlane => (Surface::of_clap(&data_plane::Args::command()), &c.args[..]),
        Binary::MockBackends => (Surface::of_mock_backends(), &c.args[..]),
    };

    // Flags, with the --config file swapped for a local copy.
    let mut argv: Vec<String> = Vec::new();
    let mut given = BTreeSet::new();
    let mut it = parse_args.iter();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--") else {
            panic!("{origin}: unexpected argument {a:?}");
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (flag, None),
        };
        assert!(
            surface.flags.contains(name),
            "{origin}: --{name} is not a flag of {:?} (it has: {:?})",
            c.binary,
            surface.flags
        );
        let value = inline.or_else(|| it.next().cloned()).unwrap_or_else(|| {
            panic!("{origin}: --{name} has no value");
        });
        let value = if name == "config" {
            config_file(c, &value, tmp)
        } else {
            value
        };
        given.insert(name.to_owned());
        argv.push(format!("--{name}"));
        argv.push(value);
    }

    // Variables: a clap `env` of the command (applied below as the flag it stands for, as it
    // beats the file), or a name the binary's code reads itself.
    let code: String = c.binary.crate_dirs().iter().copied().map(sources).collect();
    for (name, value) in &c.env {
        match surface.flag_of_env.get(name) {
            Some(flag) => {
                if let Some(v) = value
                    && !given.contains(flag)
                {
                    argv.push(format!("--{flag}"));
                    argv.push(if flag == "config" {
                        config_file(c, v, tmp)
                    } else {
                        v.clone()
                    });
                }
            }
            None => assert!(
                code.contains(&format!("\"{name}\"")),
                "{origin}: {name} is neither a setting of {:?} (variables: {:?}) nor read by \
                 its code",
                c.binary,
                surface.flag_of_env.keys().collect::<Vec<_>>()
            ),
        }
    }

    // Settings as the binary resolves them. The process environment is kept out: only the
    // files' own variables count.
    let without_env = |cmd: clap::Command| cmd.mut_args(|a| a.env(None::<&'static str>));
    match c.binary {
        Binary::ControlPlane => {
            let m = without_env(control_plane_serve())
                .try_get_matches_from(std::iter::once("serve".to_owned()).chain(argv))
                .unwrap_or_else(|e| panic!("{origin}: {e}"));
            let args = control_plane::settings::CommonArgs::from_arg_matches(&m).unwrap();
            Resolved::ControlPlane(Box::new(
                control_plane::settings::Settings::load_with_env(
                    args,
                    std::net::Ipv4Addr::UNSPECIFIED.into(),
                    Vec::new(),
                )
                .unwrap_or_else(|e| panic!("{origin}: {e}")),
            ))
        }
        Binary::DataPlane => {
            let m = without_env(data_plane::Args::command())
                .try_get_matches_from(std::iter::once("data-plane".to_owned()).chain(argv))
                .unwrap_or_else(|e| panic!("{origin}: {e}"));
            let args = data_plane::Args::from_arg_matches(&m).unwrap();
            Resolved::DataPlane(Box::new(
                data_plane::Settings::load_with_env(args, [])
                    .unwrap_or_else(|e| panic!("{origin}: {e}")),
            ))
        }
        Binary::MockBackends => {
            let value = |flag: &str| {
                argv.chunks(2)
                    .find(|kv| kv[0] == format!("--{flag}"))
                    .map(|kv| kv[1].clone())
                    .or_else(|| surface.defaults.get(flag).cloned())
                    .unwrap_or_else(|| panic!("{origin}: --{flag} has no value or default"))
            };
            Resolved::Mock {
                host: value("host")
                    .parse()
                    .unwrap_or_else(|e| panic!("{origin}: --host: {e}")),
                ports: mock_backends::parse_ports(&value("ports"))
                    .unwrap_or_else(|e| panic!("{origin}: --ports: {e}")),
            }
        }
    }
}

/// A local file with the content the container finds at `path`: a mounted ConfigMap key, or a
/// file the image has.
fn config_file(c: &Container, path: &str, tmp: &Path) -> String {
    if let Some(content) = c.files.get(path) {
        let name: String = format!("{}-{path}", c.origin)
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
            .collect();
        let local = tmp.join(name);
        std::fs::write(&local, content).unwrap();
        return local.to_string_lossy().into_owned();
    }
    let local = image_file(path).unwrap_or_else(|| {
        panic!(
            "{}: --config {path}: neither mounted nor in the image",
            c.origin
        )
    });
    assert!(
        local.is_file(),
        "{}: --config {path} is {}, which does not exist",
        c.origin,
        local.display()
    );
    local.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// deploy/compose.yaml and the files it mounts

fn compose_ports(v: &Value) -> Vec<u16> {
    let mut out = Vec::new();
    for p in v.as_sequence().into_iter().flatten() {
        if let Some(t) = p.get("target") {
            out.push(t.as_u64().unwrap() as u16);
            continue;
        }
        let spec = scalar(p).unwrap();
        let container = spec.split('/').next().unwrap().rsplit(':').next().unwrap();
        match container.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()),
            None => out.push(container.parse().unwrap()),
        }
    }
    out
}

fn compose_env(v: &Value) -> Vec<(String, Option<String>)> {
    let pairs: Vec<(String, Option<String>)> = match v {
        Value::Mapping(_) => entries(v)
            .into_iter()
            .map(|(k, v)| (k, scalar(v)))
            .collect(),
        Value::Sequence(_) => strings(v)
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (kv, None),
            })
            .collect(),
        _ => Vec::new(),
    };
    // A `${...}` value is filled in by compose from the caller's environment.
    pairs
        .into_iter()
        .map(|(k, v)| (k, v.filter(|v| !v.contains("${"))))
        .collect()
}

struct Compose {
    services: BTreeMap<String, Value>,
    /// Service name or network alias → the services answering to it.
    dns: BTreeMap<String, Vec<String>>,
    ours: BTreeMap<String, Resolved>,
}

impl Compose {
    fn service(&self, name: &str, origin: &str) -> Vec<&str> {
        self.dns
            .get(name)
            .unwrap_or_else(|| panic!("{origin}: no compose service or alias {name:?}"))
            .iter()
            .map(String::as_str)
            .collect()
    }

    /// The listeners of our containers answering to `host` on `port`.
    fn listeners(&self, host: &str, port: u16, origin: &str) -> Vec<Listener> {
        self.service(host, origin)
            .into_iter()
            .map(|s| {
                let r = self.ours.get(s).unwrap_or_else(|| {
                    panic!(
                        "{origin}: {host} is compose service {s}, which runs none of our binaries"
                    )
                });
                r.reachable(port, origin, &format!("{host}:{port}"))
            })
            .collect()
    }

    fn image(&self, service: &str) -> String {
        scalar(&self.services[service]["image"]).unwrap_or_default()
    }
}

fn load_compose(needs: &mut Needs) -> Compose {
    let doc = yaml("deploy/compose.yaml");
    // Each test its own copies of mounted files.
    let tmp = TempDir::new("deploy-compose");
    let services: BTreeMap<String, Value> = entries(&doc["services"])
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    let volumes: BTreeSet<String> = entries(&doc["volumes"])
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut dns: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ours = BTreeMap::new();
    for (name, svc) in &services {
        let origin = format!("deploy/compose.yaml service {name}");
        dns.entry(name.clone()).or_default().push(name.clone());
        for (_, net) in entries(&svc["networks"]) {
            for alias in strings(&net["aliases"]) {
                dns.entry(alias).or_default().push(name.clone());
            }
        }
        for v in strings(&svc["volumes"]) {
            let src = v.split(':').next().unwrap();
            if src.starts_with('.') || src.starts_with('/') {
                let local = root().join("deploy").join(src);
                assert!(
                    local.exists(),
                    "{origin}: mounts {src}, which does not exist"
                );
            } else {
                assert!(
                    volumes.contains(src),
                    "{origin}: volume {src} is not declared"
                );
            }
        }
        let build = &svc["build"];
        if !build.is_null() {
            let context = root()
                .join("deploy")
                .join(scalar(&build["context"]).unwrap());
            let dockerfile = scalar(&build["dockerfile"]).unwrap();
            assert!(
                context.join(&dockerfile).is_file(),
                "{origin}: no {dockerfile} in the build context"
            );
        }
        let command = strings(&svc["command"]);
        let Some(binary) = command.first().and_then(|p| Binary::of(p)) else {
            assert!(
                build.is_null(),
                "{origin}: builds our image but runs none of our binaries (command {command:?}; \
                 write the command as a list)"
            );
            continue;
        };
        // The image has no shell or curl: a health check runs the binary's own `healthcheck`,
        // with the settings the service runs with.
        if !svc["healthcheck"].is_null() {
            let test = strings(&svc["healthcheck"]["test"]);
            assert!(
                test.first().map(String::as_str) == Some("CMD")
                    && test.get(1) == command.first()
                    && test.iter().any(|a| a == "healthcheck"),
                "{origin}: a health check is [CMD, <its binary>, …, healthcheck]: {test:?}"
            );
            let checked: Vec<&String> = test[2..].iter().filter(|a| *a != "healthcheck").collect();
            let served: Vec<&String> = command[1..].iter().filter(|a| *a != "serve").collect();
            assert_eq!(
                checked, served,
                "{origin}: the health check's settings differ"
            );
        }
        let c = Container {
            origin: origin.clone(),
            binary,
            args: command[1..].to_vec(),
            env: compose_env(&svc["environment"]),
            ports: compose_ports(&svc["ports"]),
            files: BTreeMap::new(),
        };
        let r = resolve(&c, tmp.path());
        for p in &c.ports {
            r.reachable(*p, &origin, "a published port");
        }
        ours.insert(name.clone(), r);
    }
    let compose = Compose {
        services,
        dns,
        ours,
    };
    check_compose_references(&compose, needs);
    compose
}

fn check_compose_references(compose: &Compose, needs: &mut Needs) {
    let collector = yaml("deploy/otel-collector.yaml");
    let tempo = yaml("deploy/tempo.yaml");
    let otlp_grpc = |v: &Value| {
        host_port(
            &scalar(&v["otlp"]["protocols"]["grpc"]["endpoint"]).unwrap(),
            4317,
        )
        .1
    };
    let collector_port = otlp_grpc(&collector["receivers"]);
    let tempo_otlp_port = otlp_grpc(&tempo["distributor"]["receivers"]);
    let tempo_http_port = tempo["server"]["http_listen_port"].as_u64().unwrap() as u16;

    for (name, r) in &compose.ours {
        let origin = format!("deploy/compose.yaml service {name}");
        let svc = &compose.services[name];
        let redis = match r {
            Resolved::ControlPlane(s) => {
                for b in &s.initial.backends {
                    let (host, port) = host_port(&b.address, 0);
                    for l in compose.listeners(&host, port, &origin) {
                        assert_eq!(
                            l,
                            Listener::Mock,
                            "{origin}: backend {} is not a mock backend",
                            b.address
                        );
                    }
                }
                s.redis.clone()
            }
            Resolved::DataPlane(s) => {
                let (host, port) = host_port(&s.control_plane, 50051);
                for l in compose.listeners(&host, port, &origin) {
                    assert_eq!(
                        l,
                        Listener::Grpc,
                        "{origin}: {} is not a control plane's gRPC listener",
                        s.control_plane
                    );
                }
                s.redis.clone()
            }
            Resolved::Mock { .. } => None,
        };
        if let Some(url) = redis {
            let (host, _) = host_port(&url, 6379);
            for s in compose.service(&host, &origin) {
                assert!(
                    compose.image(s).starts_with("redis:"),
                    "{origin}: {url} is not Redis"
                );
            }
        }
        let env = compose_env(&svc["environment"]);
        if let Some((_, Some(endpoint))) =
            env.iter().find(|(k, _)| k == "OTEL_EXPORTER_OTLP_ENDPOINT")
        {
            let (host, port) = host_port(endpoint, 4317);
            for s in compose.service(&host, &origin) {
                assert!(
                    compose.image(s).contains("opentelemetry-collector"),
                    "{origin}: {endpoint} is not the OpenTelemetry collector"
                );
            }
            assert_eq!(
                port, collector_port,
                "{origin}: {endpoint} is not the collector's OTLP gRPC port"
            );
        }
    }

    // Collector → Tempo.
    let pipeline = &collector["service"]["pipelines"]["traces"];
    assert!(strings(&pipeline["receivers"]).contains(&"otlp".to_owned()));
    for exporter in strings(&pipeline["exporters"]) {
        let endpoint = scalar(&collector["exporters"][exporter.as_str()]["endpoint"]).unwrap();
        let (host, port) = host_port(&endpoint, 4317);
        for s in compose.service(&host, "deploy/otel-collector.yaml") {
            assert!(
                compose.image(s).starts_with("grafana/tempo"),
                "collector exports to {endpoint}, not Tempo"
            );
        }
        assert_eq!(
            port, tempo_otlp_port,
            "deploy/otel-collector.yaml: Tempo receives OTLP gRPC on {tempo_otlp_port}"
        );
    }

    // Prometheus scrapes every control plane and data plane, on listeners and paths they serve.
    let prometheus = yaml("deploy/prometheus.yml");
    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"].as_sequence().unwrap() {
        let name = scalar(&job["job_name"]).unwrap();
        let origin = format!("deploy/prometheus.yml job {name}");
        let path = scalar(&job["metrics_path"]).unwrap_or_else(|| "/metrics".into());
        let mut targets: Vec<(String, u16)> = Vec::new();
        for sc in job["static_configs"].as_sequence().into_iter().flatten() {
            targets.extend(strings(&sc["targets"]).iter().map(|t| host_port(t, 80)));
        }
        for sd in job["dns_sd_configs"].as_sequence().into_iter().flatten() {
            let port = sd["port"].as_u64().unwrap() as u16;
            targets.extend(strings(&sd["names"]).into_iter().map(|n| (n, port)));
        }
        for (host, port) in targets {
            for s in compose.service(&host, &origin) {
                if compose.ours.contains_key(s) {
                    let l = compose.ours[s].reachable(port, &origin, "a scrape target");
                    assert!(
                        matches!(l, Listener::Admin | Listener::Http),
                        "{origin}: {host}:{port} is the {l:?} listener, which has no metrics"
                    );
                    needs.http.insert((l, path.clone()));
                    scraped.insert(s.to_owned());
                } else if compose.image(s).starts_with("grafana/tempo") {
                    assert_eq!(
                        port, tempo_http_port,
                        "{origin}: Tempo serves HTTP on {tempo_http_port}"
                    );
                }
            }
        }
    }
    for (name, r) in &compose.ours {
        if !matches!(r, Resolved::Mock { .. }) {
            assert!(
                scraped.contains(name),
                "deploy/prometheus.yml scrapes no metrics of service {name}"
            );
        }
    }

    // Grafana: provisioned data sources and dashboards.
    let grafana = compose
        .services
        .iter()
        .find(|(_, s)| scalar(&s["image"]).is_some_and(|i| i.starts_with("grafana/grafana")))
        .map(|(n, _)| n.clone())
        .expect("a Grafana service");
    let mounts: BTreeMap<String, String> = strings(&compose.services[&grafana]["volumes"])
        .iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    assert_eq!(
        mounts.get("./grafana/provisioning").map(String::as_str),
        Some("/etc/grafana/provisioning")
    );
    let datasources = yaml("deploy/grafana/provisioning/datasources/datasources.yaml");
    let mut uids = BTreeSet::new();
    for ds in datasources["datasources"].as_sequence().unwrap() {
        let url = scalar(&ds["url"]).unwrap();
        let (host, port) = host_port(&url, 80);
        let services = compose.service(&host, "grafana data source");
        if scalar(&ds["type"]).as_deref() == Some("tempo") {
            assert!(
                services
                    .iter()
                    .all(|s| compose.image(s).starts_with("grafana/tempo"))
            );
            assert_eq!(port, tempo_http_port, "grafana data source {url}");
        }
        uids.insert(scalar(&ds["uid"]).unwrap());
    }
    let providers = yaml("deploy/grafana/provisioning/dashboards/dashboards.yaml");
    for p in providers["providers"].as_sequence().unwrap() {
        let path = scalar(&p["options"]["path"]).unwrap();
        assert_eq!(
            mounts.get("./grafana/dashboards"),
            Some(&path),
            "the dashboards provider reads {path}, where deploy/grafana/dashboards is not mounted"
        );
    }
    for (file, dash) in dashboards() {
        let mut used = BTreeSet::new();
        datasource_uids(&dash, &mut used);
        for uid in used {
            assert!(
                uids.contains(&uid),
                "{file}: data source {uid:?} is not provisioned"
            );
        }
    }
}

fn dashboards() -> Vec<(String, serde_json::Value)> {
    let dir = root().join("deploy/grafana/dashboards");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&p).unwrap();
            let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            out.push((p.display().to_string(), v));
        }
    }
    assert!(!out.is_empty(), "no dashboard in deploy/grafana/dashboards");
    out
}

fn datasource_uids(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(uid) = m
                .get("datasource")
                .and_then(|d| d.get("uid"))
                .and_then(|u| u.as_str())
                && !uid.starts_with('$')
            {
                out.insert(uid.to_owned());
            }
            m.values().for_each(|v| datasource_uids(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| datasource_uids(v, out)),
        _ => {}
    }
}

fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(file: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push((file.to_owned(), e.to_owned()));
                }
                m.values().for_each(|v| walk(file, v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(file, v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (file, dash) in dashboards() {
        walk(&file, &dash, &mut out);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// deploy/kubernetes/

struct Workload {
    origin: String,
    kind: String,
    name: String,
    spec: Value,
    labels: BTreeMap<String, String>,
    /// Our containers, resolved.
    ours: Vec<Resolved>,
    /// Every container port (ours or not), by name and number.
    ports: Vec<(Option<String>, u16)>,
    image: String,
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    entries(v)
        .into_iter()
        .filter_map(|(k, v)| Some((k, scalar(v)?)))
        .collect()
}

fn port_ref(v: &Value, named: &BTreeMap<String, u16>, origin: &str) -> u16 {
    match v {
        Value::Number(n) => n.as_u64().unwrap() as u16,
        Value::String(s) => *named
            .get(s)
            .unwrap_or_else(|| panic!("{origin}: no container port named {s:?}")),
        _ => panic!("{origin}: port {v:?}"),
    }
}

fn kubernetes_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

struct Cluster {
    workloads: Vec<Workload>,
    /// Service name → its ports: (port, workload index, container port).
    services: BTreeMap<String, Vec<(u16, usize, u16)>>,
}

impl Cluster {
    /// The workload and container port behind `host:port`, `host` being a Service name
    /// (short, or qualified with the namespace).
    fn behind(&self, host: &str, port: u16, origin: &str) -> (&Workload, u16) {
        let name = host.split('.').next().unwrap();
        let ports = self
            .services
            .get(name)
            .unwrap_or_else(|| panic!("{origin}: no Service {name:?}"));
        let (_, w, target) = ports
            .iter()
            .find(|(p, _, _)| *p == port)
            .unwrap_or_else(|| panic!("{origin}: Service {name} has no port {port}"));
        (&self.workloads[*w], *target)
    }

    fn our_listener(&self, host: &str, port: u16, origin: &str) -> Listener {
        let (w, target) = self.behind(host, port, origin);
        let r = w.ours.first().unwrap_or_else(|| {
            panic!(
                "{origin}: {host} leads to {}, which runs none of our binaries",
                w.origin
            )
        });
        r.reachable(target, origin, host)
    }
}

fn load_kubernetes(needs: &mut Needs) -> Cluster {
    // Each test its own copies of mounted files.
    let tmp = TempDir::new("deploy-kubernetes");
    let mut objects: Vec<(String, Value)> = Vec::new();
    for f in kubernetes_files() {
        if f.starts_with("kustomization.") {
            continue;
        }
        for d in yaml_docs(&format!("deploy/kubernetes/{f}")) {
            objects.push((f.clone(), d));
        }
    }
    let kind_of = |v: &Value| scalar(&v["kind"]).unwrap_or_default();
    let name_of = |v: &Value| scalar(&v["metadata"]["name"]).unwrap_or_default();
    let config_maps: BTreeMap<String, BTreeMap<String, String>> = objects
        .iter()
        .filter(|(_, o)| kind_of(o) == "ConfigMap")
        .map(|(_, o)| (name_of(o), labels(&o["data"])))
        .collect();
    let secrets: BTreeMap<String, BTreeSet<String>> = objects
        .iter()
        .filter(|(_, o)| kind_of(o) == "Secret")
        .map(|(_, o)| {
            let mut keys: BTreeSet<String> = labels(&o["stringData"]).into_keys().collect();
            keys.extend(labels(&o["data"]).into_keys());
            (name_of(o), keys)
        })
        .collect();

    let mut workloads = Vec::new();
    for (file, o) in &objects {
        let kind = kind_of(o);
        if !["Deployment", "StatefulSet", "DaemonSet"].contains(&kind.as_str()) {
            continue;
        }
        let name = name_of(o);
        let origin = format!("deploy/kubernetes/{file} {kind}/{name}");
        let pod = o["spec"]["template"]["spec"].clone();
        let pod_labels = labels(&o["spec"]["template"]["metadata"]["labels"]);
        for (k, v) in labels(&o["spec"]["selector"]["matchLabels"]) {
            assert_eq!(
                pod_labels.get(&k),
                Some(&v),
                "{origin}: selector does not match the pod labels"
            );
        }
        let volumes: BTreeMap<String, Value> = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| (scalar(&v["name"]).unwrap(), v.clone()))
            .collect();
        let mut w = Workload {
            origin: origin.clone(),
            kind,
            name,
            spec: o["spec"].clone(),
            labels: pod_labels,
            ours: Vec::new(),
            ports: Vec::new(),
            image: String::new(),
        };
        for ct in pod["containers"].as_sequence().unwrap() {
            let cname = scalar(&ct["name"]).unwrap();
            let origin = format!("{origin} container {cname}");
            w.image = scalar(&ct["image"]).unwrap_or_default();
            let mut named = BTreeMap::new();
            let mut declared = Vec::new();
            for p in ct["ports"].as_sequence().into_iter().flatten() {
                let n = p["containerPort"].as_u64().unwrap() as u16;
                let pname = scalar(&p["name"]);
                if let Some(pn) = &pname {
                    named.insert(pn.clone(), n);
                }
                declared.push(n);
                w.ports.push((pname, n));
            }
            let command = strings(&ct["command"]);
            let Some(binary) = command.first().and_then(|p| Binary::of(p)) else {
                assert!(
                    !w.image.starts_with("lb:"),
                    "{origin}: runs our image but none of our binaries ({command:?})"
                );
                continue;
            };
            let mut env = Vec::new();
            for e in ct["env"].as_sequence().into_iter().flatten() {
                let n = scalar(&e["name"]).unwrap();
                if let Some(r) = e["valueFrom"].get("secretKeyRef") {
                    let (s, k) = (scalar(&r["name"]).unwrap(), scalar(&r["key"]).unwrap());
                    assert!(
                        secrets.get(&s).is_some_and(|keys| keys.contains(&k)),
                        "{origin}: {n} refers to key {k} of Secret {s}, which is not defined"
                    );
                }
                env.push((n, scalar(&e["value"])));
            }
            let mut files = BTreeMap::new();
            for m in ct["volumeMounts"].as_sequence().into_iter().flatten() {
                let vol = &volumes[&scalar(&m["name"]).unwrap()];
                let dir = scalar(&m["mountPath"]).unwrap();
                if let Some(cm) = vol.get("configMap") {
                    let cm = scalar(&cm["name"]).unwrap();
                    let data = config_maps
                        .get(&cm)
                        .unwrap_or_else(|| panic!("{origin}: no ConfigMap {cm}"));
                    for (k, v) in data {
                        files.insert(format!("{dir}/{k}"), v.clone());
                    }
                }
            }
            let c = Container {
                origin: origin.clone(),
                binary,
                args: command[1..]
                    .iter()
                    .chain(&strings(&ct["args"]))
                    .cloned()
                    .collect(),
                env,
                ports: declared,
                files,
            };
            let r = resolve(&c, tmp.path());
            for p in &c.ports {
                r.reachable(*p, &origin, "a container port");
            }
            check_pod_container(&origin, ct, &pod, &r, &named, needs);
            let annotations = &o["spec"]["template"]["metadata"]["annotations"];
            if let Some(port) = scalar(&annotations["prometheus.io/port"]) {
                let l = r.reachable(port.parse().unwrap(), &origin, "prometheus.io/port");
                assert!(
                    matches!(l, Listener::Admin | Listener::Http),
                    "{origin}: prometheus.io/port is the {l:?} listener, which has no metrics"
                );
                let path =
                    scalar(&annotations["prometheus.io/path"]).unwrap_or_else(|| "/metrics".into());
                needs.http.insert((l, path));
            }
            w.ours.push(r);
        }
        workloads.push(w);
    }

    let mut services = BTreeMap::new();
    for (file, o) in objects.iter().filter(|(_, o)| kind_of(o) == "Service") {
        let name = name_of(o);
        let origin = format!("deploy/kubernetes/{file} Service/{name}");
        let selector = labels(&o["spec"]["selector"]);
        let matched: Vec<usize> = workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            matched.len(),
            1,
            "{origin}: selects {} workloads",
            matched.len()
        );
        let w = matched[0];
        let named: BTreeMap<String, u16> = workloads[w]
            .ports
            .iter()
            .filter_map(|(n, p)| Some((n.clone()?, *p)))
            .collect();
        let mut ports = Vec::new();
        for p in o["spec"]["ports"].as_sequence().unwrap() {
            let port = p["port"].as_u64().unwrap() as u16;
            let target = match p.get("targetPort") {
                Some(t) => port_ref(t, &named, &origin),
                None => port,
            };
            assert!(
                workloads[w].ports.iter().any(|(_, n)| *n == target),
                "{origin}: port {port} targets {target}, which {} does not declare",
                workloads[w].origin
            );
            for r in &workloads[w].ours {
                r.reachable(target, &origin, &format!("port {port}"));
            }
            ports.push((port, w, target));
        }
        services.insert(name, ports);
    }
    let cluster = Cluster {
        workloads,
        services,
    };
    check_kubernetes_references(&cluster, &objects);
    cluster
}

/// Probes, hooks, security settings and the drain of one of our containers.
fn check_pod_container(
    origin: &str,
    ct: &Value,
    pod: &Value,
    r: &Resolved,
    named: &BTreeMap<String, u16>,
    needs: &mut Needs,
) {
    let mut handlers: Vec<(String, &Value)> = ["readinessProbe", "livenessProbe", "startupProbe"]
        .iter()
        .map(|p| (p.to_string(), &ct[*p]))
        .collect();
    handlers.push(("preStop".into(), &ct["lifecycle"]["preStop"]));
    handlers.push(("postStart".into(), &ct["lifecycle"]["postStart"]));
    let mut pre_stop_sleep = 0;
    for (what, h) in handlers {
        if h.is_null() {
            continue;
        }
        let origin = format!("{origin} {what}");
        assert!(
            h.get("exec").is_none(),
            "{origin}: the image has no shell or tools for an exec handler"
        );
        if let Some(g) = h.get("httpGet") {
            let l = r.reachable(port_ref(&g["port"], named, &origin), &origin, "httpGet");
            assert!(
                matches!(l, Listener::Admin | Listener::Http | Listener::Mock),
                "{origin}: probes the {l:?} listener, which serves no probe path of its own"
            );
            needs
                .http
                .insert((l, scalar(&g["path"]).unwrap_or_else(|| "/".into())));
        }
        if let Some(g) = h.get("grpc") {
            let l = r.reachable(port_ref(&g["port"], named, &origin), &origin, "grpc");
            assert_eq!(
                l,
                Listener::Grpc,
                "{origin}: gRPC health is served on the control plane's gRPC listener"
            );
            needs.grpc_health = true;
        }
        if let Some(t) = h.get("tcpSocket") {
            r.reachable(port_ref(&t["port"], named, &origin), &origin, "tcpSocket");
        }
        if let Some(s) = h.get("sleep") {
            pre_stop_sleep = s["seconds"].as_u64().unwrap();
        }
    }

    let sc = &ct["securityContext"];
    let non_root = sc["runAsNonRoot"]
        .as_bool()
        .or(pod["securityContext"]["runAsNonRoot"].as_bool());
    assert_eq!(non_root, Some(true), "{origin}: runAsNonRoot");
    assert_eq!(
        sc["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{origin}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{origin}: allowPrivilegeEscalation"
    );
    assert!(
        strings(&sc["capabilities"]["drop"]).contains(&"ALL".to_owned()),
        "{origin}: drop ALL capabilities"
    );

    // What the binary writes must be on a volume: the root filesystem is read-only.
    let mounts: Vec<String> = ct["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|m| m["readOnly"].as_bool() != Some(true))
        .filter_map(|m| scalar(&m["mountPath"]))
        .collect();
    let writes = match r {
        Resolved::ControlPlane(s) if s.redis.is_none() => s.state_file.clone(),
        Resolved::DataPlane(s) => s.state_dir.clone(),
        _ => None,
    };
    if let Some(path) = writes {
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{origin}: writes {}, which is on no writable volume",
            path.display()
        );
    }

    if let Resolved::DataPlane(s) = r {
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(
            grace > pre_stop_sleep + s.drain_timeout.as_secs(),
            "{origin}: terminationGracePeriodSeconds {grace} leaves no room for the preStop sleep \
             ({pre_stop_sleep} s) and the drain ({} s)",
            s.drain_timeout.as_secs()
        );
    }
}

fn check_kubernetes_references(cluster: &Cluster, objects: &[(String, Value)]) {
    let kind_of = |v: &Value| scalar(&v["kind"]).unwrap_or_default();
    for w in &cluster.workloads {
        for r in &w.ours {
            let origin = &w.origin;
            let redis = match r {
                Resolved::ControlPlane(s) => {
                    for b in &s.initial.backends {
                        let (host, port) = host_port(&b.address, 0);
                        let l = cluster.our_listener(&host, port, origin);
                        assert_eq!(l, Listener::Mock, "{origin}: backend {}", b.address);
                    }
                    s.redis.clone()
                }
                Resolved::DataPlane(s) => {
                    let (host, port) = host_port(&s.control_plane, 50051);
                    let l = cluster.our_listener(&host, port, origin);
                    assert_eq!(
                        l,
                        Listener::Grpc,
                        "{origin}: {} is not a control plane's gRPC listener",
                        s.control_plane
                    );
                    s.redis.clone()
                }
                Resolved::Mock { .. } => None,
            };
            if let Some(url) = redis {
                let (host, port) = host_port(&url, 6379);
                let (target, _) = cluster.behind(&host, port, origin);
                assert!(
                    target.image.starts_with("redis:"),
                    "{origin}: {url} is not Redis"
                );
            }
        }
    }

    let data_plane = cluster
        .workloads
        .iter()
        .find(|w| w.ours.iter().any(|r| matches!(r, Resolved::DataPlane(_))))
        .expect("a data-plane workload");
    let selects_data_plane = |o: &Value| {
        let sel = labels(&o["spec"]["selector"]);
        !sel.is_empty() && sel.iter().all(|(k, v)| data_plane.labels.get(k) == Some(v))
    };
    assert!(
        objects.iter().any(|(_, o)| kind_of(o) == "Service"
            && scalar(&o["spec"]["clusterIP"]).as_deref() == Some("None")
            && selects_data_plane(o)),
        "a headless Service (clusterIP: None) over the data planes"
    );
    assert!(
        objects.iter().any(|(_, o)| kind_of(o) == "Service"
            && scalar(&o["spec"]["clusterIP"]).as_deref() != Some("None")
            && selects_data_plane(o)),
        "a Service for clients over the data planes"
    );

    for (file, o) in objects {
        let origin = format!("deploy/kubernetes/{file} {}", kind_of(o));
        match kind_of(o).as_str() {
            "HorizontalPodAutoscaler" => {
                assert_eq!(
                    scalar(&o["apiVersion"]).as_deref(),
                    Some("autoscaling/v2"),
                    "{origin}"
                );
                let t = &o["spec"]["scaleTargetRef"];
                let target = cluster
                    .workloads
                    .iter()
                    .find(|w| {
                        Some(&w.kind) == scalar(&t["kind"]).as_ref()
                            && Some(&w.name) == scalar(&t["name"]).as_ref()
                    })
                    .unwrap_or_else(|| panic!("{origin}: no workload {t:?}"));
                assert!(
                    target.spec.get("replicas").is_none(),
                    "{origin}: {} sets replicas, which every apply would reset under the autoscaler",
                    target.origin
                );
                assert!(
                    o["spec"]["minReplicas"].as_u64().unwrap_or(1) >= 2,
                    "{origin}: minReplicas"
                );
            }
            "PodDisruptionBudget" => {
                let sel = labels(&o["spec"]["selector"]["matchLabels"]);
                assert!(
                    cluster
                        .workloads
                        .iter()
                        .any(|w| !sel.is_empty()
                            && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))),
                    "{origin}: selects no workload"
                );
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn compose_file_matches_the_binaries() {
    let mut needs = Needs::default();
    let compose = load_compose(&mut needs);
    let kinds: Vec<_> = compose.ours.values().collect();
    assert!(
        kinds
            .iter()
            .filter(|r| matches!(r, Resolved::ControlPlane(s) if s.redis.is_some()))
            .count()
            >= 2
    );
    let dp = &compose.services["data-plane"];
    assert!(
        dp["deploy"]["replicas"].as_u64().unwrap_or(1) >= 3,
        "three data-plane replicas under one name"
    );
    assert!(needs.http.contains(&(Listener::Admin, "/metrics".into())));
    assert!(needs.http.contains(&(Listener::Http, "/metrics".into())));
}

#[test]
fn kubernetes_manifests_match_the_binaries() {
    let mut needs = Needs::default();
    let cluster = load_kubernetes(&mut needs);
    let control_planes = cluster
        .workloads
        .iter()
        .find(|w| {
            w.ours
                .iter()
                .any(|r| matches!(r, Resolved::ControlPlane(s) if s.redis.is_some()))
        })
        .expect("control planes on Redis");
    assert!(control_planes.spec["replicas"].as_u64().unwrap_or(1) >= 2);
    for path in ["/readyz", "/healthz"] {
        assert!(
            needs.http.contains(&(Listener::Admin, path.into())),
            "data planes probe {path}"
        );
    }
}

#[test]
fn kustomization_lists_every_manifest_but_the_secret_placeholder() {
    let k = yaml("deploy/kubernetes/kustomization.yaml");
    let listed: BTreeSet<String> = strings(&k["resources"]).into_iter().collect();
    let files: BTreeSet<String> = kubernetes_files()
        .into_iter()
        .filter(|f| !f.starts_with("kustomization.") && f != "secret.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn dockerfile_ships_every_binary_and_the_example_configs() {
    let text = read("deploy/Dockerfile");
    assert!(text.contains("cargo build --release --locked --bins"));
    for bin in ["control-plane", "data-plane", "mock-backends"] {
        assert!(
            text.contains(&format!("target/release/{bin}")),
            "{bin} is not copied"
        );
    }
    for f in ["control-plane.toml", "data-plane.toml"] {
        let local = image_file(&format!("/etc/lb/{f}")).expect("the example configs in /etc/lb");
        assert_eq!(local, root().join("deploy/config/").join(f));
    }
    let user = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER");
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "runs as {user}"
    );
    let cmd = text
        .lines()
        .filter_map(|l| l.strip_prefix("CMD "))
        .next_back()
        .expect("a CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    assert_eq!(Binary::of(&cmd[0]), Some(Binary::ControlPlane));
    control_plane_accepts(&cmd[1..], "deploy/Dockerfile CMD");
    let ignore = read(".dockerignore");
    for p in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim_end_matches('/') == p),
            ".dockerignore: {p}"
        );
    }
}

/// The metric names in a PromQL expression, with the labels it matches or groups by.
fn promql_names(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    let mut grouped = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && (ident(bytes[i - 1]) || bytes[i - 1] == b'$')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let word = &expr[start..i];
        let rest = expr[i..].trim_start();
        if word == "by" || word == "without" {
            if let Some(list) = rest.strip_prefix('(').and_then(|r| r.split(')').next()) {
                grouped.extend(list.split(',').map(|l| l.trim().to_owned()));
            }
            continue;
        }
        if !word.starts_with("lb_") {
            continue;
        }
        let mut matched = BTreeSet::new();
        if let Some(body) = rest.strip_prefix('{').and_then(|r| r.split('}').next()) {
            for m in body.split(',') {
                let name = m.split(['=', '!']).next().unwrap().trim();
                if !name.is_empty() {
                    matched.insert(name.to_owned());
                }
            }
        }
        out.push((word.to_owned(), matched));
    }
    for (_, labels) in &mut out {
        labels.extend(grouped.iter().cloned());
    }
    out
}

#[tokio::test]
async fn probe_and_scrape_paths_are_served_and_dashboard_metrics_are_exported() {
    let mut needs = Needs::default();
    load_compose(&mut needs);
    load_kubernetes(&mut needs);

    // A stack with a per-IP limit of one request, so that one request is forwarded (backend
    // series appear) and the next refused (the refusal counter appears).
    let stack = Stack::start_with(1, |s| {
        s.rate_limit.as_mut().unwrap().ip_limit = Some(lb_proto::v1::Limit {
            requests: 1,
            period_ms: 60_000,
        });
    })
    .await;
    let dp = &stack.dps[0];
    let client = http_client();
    assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    assert_eq!(get(&client, &dp.url("/data")).await.status, 429);

    let base = |l: Listener| match l {
        Listener::Admin => format!("http://{}", dp.admin),
        Listener::Http => stack.cp.http_url(""),
        Listener::Mock => format!("http://{}", stack.mock.addrs()[0]),
        Listener::Proxy | Listener::Grpc => unreachable!("no HTTP probe path of its own"),
    };
    assert!(!needs.http.is_empty());
    for (l, path) in &needs.http {
        let r = get(&client, &format!("{}{path}", base(*l))).await;
        assert_eq!(r.status, 200, "GET {path} on the {l:?} listener");
    }
    // A mock backend answers most paths; a probe must ask the one that reports its health.
    stack.mock.backend(0).set_faults(mock_backends::Faults {
        fail_health: true,
        ..Default::default()
    });
    for (_, path) in needs.http.iter().filter(|(l, _)| *l == Listener::Mock) {
        let r = get(&client, &format!("{}{path}", base(Listener::Mock))).await;
        assert_eq!(r.status, 503, "GET {path} on an unhealthy mock backend");
    }
    if needs.grpc_health {
        let channel = tonic::transport::Channel::from_shared(stack.cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        assert_serving(channel, "").await;
    }

    let mut exposition = get(&client, &format!("http://{}/metrics", dp.admin))
        .await
        .body
        .to_vec();
    exposition.extend(get(&client, &stack.cp.http_url("/metrics")).await.body);
    let exposition = String::from_utf8(exposition).unwrap();
    let samples: Vec<&str> = exposition.lines().filter(|l| !l.starts_with('#')).collect();
    let exprs = dashboard_exprs();
    assert!(!exprs.is_empty());
    for (file, expr) in exprs {
        let names = promql_names(&expr);
        assert!(!names.is_empty(), "{file}: no lb_ metric in {expr}");
        for (name, labels) in names {
            let lines: Vec<&str> = samples
                .iter()
                .copied()
                .filter(|l| {
                    l.strip_prefix(name.as_str())
                        .is_some_and(|r| r.starts_with(['{', ' ']))
                })
                .collect();
            assert!(!lines.is_empty(), "{file}: {name} is not exported ({expr})");
            for label in labels {
                if ["instance", "job"].contains(&label.as_str()) {
                    continue;
                }
                let series = names_with_label(&samples, &expr, &label);
                assert!(
                    series,
                    "{file}: no metric of `{expr}` has the label {label}"
                );
            }
        }
    }
}

/// Whether any metric named in `expr` is exported with `label`.
fn names_with_label(samples: &[&str], expr: &str, label: &str) -> bool {
    promql_names(expr).iter().any(|(name, _)| {
        samples.iter().any(|l| {
            l.strip_prefix(name.as_str())
                .and_then(|r| r.strip_prefix('{'))
                .is_some_and(|r| {
                    r.split('}')
                        .next()
                        .unwrap()
                        .split(',')
                        .any(|kv| kv.starts_with(&format!("{label}=")))
                })
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Kubernetes hygiene

/// Every document of every manifest under deploy/kubernetes (the kustomization aside).
fn manifests() -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.sort();
    files
        .into_iter()
        .flat_map(|f| {
            let rel = format!("deploy/kubernetes/{f}");
            yaml_docs(&rel).into_iter().map(move |d| (rel.clone(), d))
        })
        .collect()
}

#[test]
fn kubernetes_objects_carry_the_recommended_labels_and_run_restricted() {
    let all = manifests();
    for (file, doc) in &all {
        let kind = scalar(&doc["kind"]).unwrap_or_default();
        let name = scalar(&doc["metadata"]["name"]).unwrap_or_default();
        let labels = &doc["metadata"]["labels"];
        assert!(
            scalar(&labels["app.kubernetes.io/part-of"]).is_some(),
            "{file}: {kind} {name} lacks app.kubernetes.io/part-of"
        );
        if matches!(kind.as_str(), "Deployment" | "StatefulSet" | "Service") {
            for label in ["app.kubernetes.io/name", "app.kubernetes.io/component"] {
                assert!(
                    scalar(&labels[label]).is_some(),
                    "{file}: {kind} {name} lacks {label}"
                );
            }
        }
        if matches!(kind.as_str(), "Deployment" | "StatefulSet") {
            let pod = &doc["spec"]["template"]["spec"];
            let sc = &pod["securityContext"];
            assert_eq!(
                scalar(&sc["runAsNonRoot"]).as_deref(),
                Some("true"),
                "{file}: {name}"
            );
            assert_eq!(
                scalar(&sc["seccompProfile"]["type"]).as_deref(),
                Some("RuntimeDefault"),
                "{file}: {name}"
            );
            for c in pod["containers"].as_sequence().unwrap() {
                let image = scalar(&c["image"]).unwrap();
                assert!(
                    image.contains(':') && !image.ends_with(":latest"),
                    "{file}: {name} runs {image}: pin a version"
                );
                let sc = &c["securityContext"];
                assert_eq!(
                    scalar(&sc["allowPrivilegeEscalation"]).as_deref(),
                    Some("false"),
                    "{file}: {name}"
                );
                assert_eq!(
                    strings(&sc["capabilities"]["drop"]),
                    ["ALL"],
                    "{file}: {name}"
                );
            }
        }
    }
    let ns = all.iter().find(|(_, d)| d["kind"] == "Namespace").unwrap();
    assert_eq!(
        scalar(&ns.1["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]).as_deref(),
        Some("restricted")
    );
    let k = yaml("deploy/kubernetes/kustomization.yaml");
    let pairs = &k["labels"][0]["pairs"];
    for label in [
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
    ] {
        assert!(
            scalar(&pairs[label]).is_some(),
            "kustomization lacks {label}"
        );
    }
    assert_ne!(scalar(&k["images"][0]["newTag"]).as_deref(), Some("latest"));
    // Compose pins its images too.
    let compose = yaml("deploy/compose.yaml");
    for (service, s) in entries(&compose["services"]) {
        let image = scalar(&s["image"]).unwrap();
        assert!(
            !image.ends_with(":latest") && image.contains(':'),
            "{service}: {image}"
        );
    }
}

#[test]
fn network_policies_let_only_the_control_plane_be_reached_on_50051() {
    let policies: Vec<Value> = manifests()
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    // Everything is denied unless a policy allows it.
    assert!(policies.iter().any(|p| {
        p["spec"]["podSelector"]
            .as_mapping()
            .is_some_and(|m| m.is_empty())
            && strings(&p["spec"]["policyTypes"]) == ["Ingress", "Egress"]
            && p["spec"]["ingress"].is_null()
    }));
    let ingress_ports = |app: &str| -> Vec<String> {
        policies
            .iter()
            .filter(|p| p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == app)
            .flat_map(|p| {
                p["spec"]["ingress"]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
            })
            .flat_map(|rule| rule["ports"].as_sequence().cloned().unwrap_or_default())
            .filter_map(|port| scalar(&port["port"]))
            .collect()
    };
    for app in ["data-plane", "redis", "mock-backends"] {
        assert!(!ingress_ports(app).contains(&"50051".to_owned()), "{app}");
    }
    assert!(ingress_ports("control-plane").contains(&"50051".to_owned()));
    assert_eq!(ingress_ports("redis"), ["6379"]);
    // The data planes may reach the control planes' 50051.
    let data_plane = policies
        .iter()
        .find(|p| p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "data-plane")
        .unwrap();
    assert!(
        data_plane["spec"]["egress"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|rule| {
                rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                    == "control-plane"
                    && scalar(&rule["ports"][0]["port"]).as_deref() == Some("50051")
            })
    );
}
