//! TLS on the control plane's gRPC and HTTP listeners, end to end: a data plane configured
//! over `https://` and verified against a CA file (Watch and Report both over TLS), the Admin
//! API and the REST endpoints, dashboards' WebSocket and `/metrics` over TLS; plain clients
//! turned away; a data plane that does not trust the certificate gets nothing, keeps its last
//! configuration and keeps retrying; certificate reloads reach both listeners; bad files are
//! refused at start naming the file.
//!
//! Certificates come from the shared test PKI (`data-plane/tests/support/pki.rs`, rcgen), signed
//! by test CAs.

mod common;
#[path = "../../data-plane/tests/support/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    Answered, Cp, Dp, Reply, TOKEN, admin_client_on, get, http_client, serve_command,
    snapshot_with, wait_until,
};
use control_plane::settings::{CommonArgs, Settings};
use control_plane::tls::ServerTls;
use data_plane::tls::TlsFiles;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use lb_proto::v1::GetConfigRequest;
use mock_backends::MockBackends;
use pki::{Ca, TempDir, install_provider, tls_connect};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

// ---------------------------------------------------------------------------------------------
// Certificates (made by the shared `pki` helper)

/// The names every server certificate here is for.
const NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// One HTTP/1.1 connection over TLS.
struct Https {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The leaf certificate the server presented.
    peer: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
}

impl Https {
    async fn open(addr: SocketAddr, roots: Arc<RootCertStore>) -> Https {
        let tls = tls_connect(addr, roots, b"http/1.1", rustls::DEFAULT_VERSIONS)
            .await
            .unwrap();
        let (_, state) = tls.get_ref();
        let peer = state.peer_certificates().unwrap()[0].clone();
        let alpn = state.alpn_protocol().map(<[u8]>::to_vec);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        Https { sender, peer, alpn }
    }

    async fn send(&mut self, method: Method, path: &str, token: Option<&str>, body: &str) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        self.sender.ready().await.unwrap();
        Reply::read(self.sender.send_request(req).await.unwrap()).await
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, None, "").await
    }
}

/// A gRPC channel over TLS trusting `ca_pem`.
async fn tls_channel(url: &str, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))?
        .connect()
        .await
}

/// A series' value in the control plane's TLS metrics.
fn metric(tls: &ServerTls, series: &str) -> f64 {
    let text = tls.render_metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

const HANDSHAKE_ERRORS: &str = "lb_cp_tls_handshake_failures_total{reason=\"error\"}";

/// A control plane serving TLS with a certificate from `ca`, over three mock backends.
async fn tls_stack(ca: &Ca, dir: &TempDir) -> (MockBackends, Cp, Arc<ServerTls>) {
    let files = dir.install(&ca.leaf(NAMES));
    let tls = Arc::new(ServerTls::load(files).unwrap());
    let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 3])
        .await
        .unwrap();
    let cp = Cp::start_tls(snapshot_with(&mock.addrs()), Arc::clone(&tls)).await;
    (mock, cp, tls)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_data_plane_and_admin_clients_work_over_tls() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("cp-tls-serve");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let (mock, cp, tls) = tls_stack(&ca, &dir).await;

    // A data plane verifying the control plane against the CA gets the configuration over
    // the Watch stream, and proxies with it.
    let dp = Dp::join_with(&cp.tls_url(), "dp-tls", |s| {
        s.control_plane_ca = Some(ca_file.clone());
    })
    .await;
    dp.wait_version(1).await;
    cp.wait_acked(&["dp-tls"], 1).await;
    let client = http_client();
    for _ in 0..3 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }

    // REST over HTTPS, on HTTP/1.1: a change is pushed to the data plane over TLS.
    let mut https = Https::open(cp.http, ca.roots()).await;
    assert_eq!(https.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let health = https.get("/healthz").await;
    assert_eq!((health.status, &health.body[..]), (200, &b"ok\n"[..]));
    let changed = https
        .send(
            Method::POST,
            "/change_strategy",
            Some(TOKEN),
            r#"{"strategy":"least_connections"}"#,
        )
        .await;
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    dp.wait_version(2).await;
    cp.wait_acked(&["dp-tls"], 2).await;

    // The Report stream runs over TLS too: the control plane adds up what the data plane saw.
    wait_until("the data plane's report", || {
        cp.cp.traffic.totals().requests >= 3
    })
    .await;
    let stats = https.get("/stats").await;
    assert_eq!(stats.status, 200);
    let stats = stats.json();
    assert!(
        stats["totals"]["requests"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    assert_eq!(stats["strategy"], "least_connections");
    assert_eq!(stats["data_planes"][0]["id"], "dp-tls");
    assert_eq!(stats["data_planes"][0]["applied_version"], 2);

    // The certificate's metrics are on /metrics.
    let metrics = https.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("lb_cp_tls_certificate_expiry_timestamp_seconds ")
            && text.contains("lb_cp_tls_reloads_total{result=\"ok\"} 0"),
        "{text}"
    );

    // The dashboards' feed upgrades to a WebSocket over TLS and pushes at once.
    let mut ws = Https::open(cp.http, ca.roots()).await;
    let req = Request::get("/ws")
        .header("host", "localhost")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::default())
        .unwrap();
    let resp = ws.sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut upgraded = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), upgraded.read_exact(&mut first))
        .await
        .expect("the feed pushes a message")
        .unwrap();
    assert_eq!(first[0], 0x81, "a final text frame");

    // gRPC Admin over TLS, with the token and without.
    let channel = tls_channel(&cp.tls_url(), &ca.pem).await.unwrap();
    let config = admin_client_on(channel.clone(), Some(TOKEN))
        .get_config(GetConfigRequest::default())
        .await
        .answer();
    assert_eq!(config.version, 2);
    let refused = admin_client_on(channel, None)
        .get_config(GetConfigRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Plain clients get nothing from either listener.
    let failures = metric(&tls, HANDSHAKE_ERRORS);
    let plain = client
        .request(
            Request::get(cp.http_url("/healthz"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let plain_grpc = Channel::from_shared(cp.url()).unwrap().connect().await;
    let plain_call = match plain_grpc {
        Ok(ch) => admin_client_on(ch, Some(TOKEN))
            .get_config(GetConfigRequest::default())
            .await
            .err()
            .map(|s| s.code()),
        Err(_) => Some(tonic::Code::Unavailable),
    };
    assert!(
        plain_call.is_some(),
        "plain gRPC got an answer from the TLS port"
    );
    wait_until("the plain clients' handshakes counted", || {
        metric(&tls, HANDSHAKE_ERRORS) >= failures + 2.0
    })
    .await;

    // A client offering only HTTP/2 is refused by the HTTP listener (it offers HTTP/1.1).
    assert!(
        tls_connect(cp.http, ca.roots(), b"h2", rustls::DEFAULT_VERSIONS)
            .await
            .is_err()
    );

    // Shutdown is graceful with the WebSocket and HTTPS connections open.
    dp.stop().await;
    tokio::time::timeout(Duration::from_secs(10), cp.stop())
        .await
        .expect("the control plane stops");
    mock.shutdown().await;
}

#[tokio::test]
async fn a_data_plane_with_the_wrong_ca_gets_nothing_and_keeps_trying() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let other = Ca::new("some other CA");
    let dir = TempDir::new("cp-tls-wrong-ca");
    let wrong_ca = dir.write("other-ca.pem", &other.pem);
    let (mock, cp, tls) = tls_stack(&ca, &dir).await;
    let before = metric(&tls, HANDSHAKE_ERRORS);

    let dp = Dp::join_with(&cp.tls_url(), "dp-wrong-ca", |s| {
        s.control_plane_ca = Some(wrong_ca.clone());
    })
    .await;
    // Watch and Report each try, then try again after their backoff.
    wait_until("repeated refused handshakes", || {
        metric(&tls, HANDSHAKE_ERRORS) >= before + 4.0
    })
    .await;
    assert!(dp.shared.active().is_none());
    assert_eq!(*dp.shared.applied_version().borrow(), 0);
    let ready = get(&http_client(), &format!("http://{}/readyz", dp.admin)).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["version"], 0);
    // The control plane saw no data plane: nothing connected, nothing NACKed.
    assert!(cp.cp.data_planes().is_empty());
    assert_eq!(cp.cp.snapshot().version, 1);

    // What the data plane logs names the certificate problem, not just "transport error".
    let e = data_plane::control::discovery::endpoint(&dp.shared.settings)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    let cause = data_plane::control::discovery::error_chain(&e);
    assert!(
        cause.contains("invalid peer certificate") && cause.contains("UnknownIssuer"),
        "{cause}"
    );

    dp.stop().await;
    cp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_data_plane_keeps_its_configuration_when_the_certificate_stops_being_trusted() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("cp-tls-keep");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let (mock, cp, _) = tls_stack(&ca, &dir).await;
    let dp = Dp::join_with(&cp.tls_url(), "dp-keep", |s| {
        s.control_plane_ca = Some(ca_file.clone());
    })
    .await;
    dp.wait_version(1).await;

    // The control plane comes back on the same address with a certificate from another CA.
    let (grpc, initial) = (cp.grpc, cp.cp.snapshot());
    cp.stop().await;
    let other = Ca::new("some other CA");
    let other_dir = TempDir::new("cp-tls-keep-other");
    let tls = Arc::new(ServerTls::load(other_dir.install(&other.leaf(NAMES))).unwrap());
    let listener = tokio::net::TcpListener::bind(grpc).await.unwrap();
    let cp = Cp::start_on_with_tls(
        (*initial).clone(),
        None,
        listener,
        common::listener().await,
        Some(Arc::clone(&tls)),
    )
    .await;
    wait_until("the data plane's handshakes refused", || {
        metric(&tls, HANDSHAKE_ERRORS) >= 2.0
    })
    .await;
    // It serves on with what it had.
    assert_eq!(*dp.shared.applied_version().borrow(), 1);
    assert_eq!(get(&http_client(), &dp.url("/data")).await.status, 200);
    let ready = get(&http_client(), &format!("http://{}/readyz", dp.admin)).await;
    assert_eq!(ready.status, 200);
    assert!(cp.cp.data_planes().is_empty());

    dp.stop().await;
    cp.stop().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn a_reload_reaches_both_listeners() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("cp-tls-reload");
    let (mock, cp, tls) = tls_stack(&ca, &dir).await;
    let first = Https::open(cp.http, ca.roots()).await.peer;

    let second = ca.leaf(NAMES);
    let second_der = second.der();
    dir.install(&second);
    tls.tls().reload().unwrap();
    // The file poll may have reloaded it too; at least one reload, and it took.
    assert!(metric(&tls, "lb_cp_tls_reloads_total{result=\"ok\"}") >= 1.0);
    assert_ne!(first, second_der);
    assert_eq!(Https::open(cp.http, ca.roots()).await.peer, second_der);
    let grpc = tls_connect(cp.grpc, ca.roots(), b"h2", rustls::DEFAULT_VERSIONS)
        .await
        .unwrap();
    let (_, state) = grpc.get_ref();
    assert_eq!(state.peer_certificates().unwrap()[0], second_der);
    assert_eq!(state.alpn_protocol(), Some(&b"h2"[..]));

    // A broken file changes nothing but the error count.
    dir.write("cert.pem", "-----BEGIN CERTIFICATE-----\nbroken\n");
    let e = tls.tls().reload().unwrap_err().to_string();
    assert!(e.contains("cert.pem"), "{e}");
    assert!(metric(&tls, "lb_cp_tls_reloads_total{result=\"error\"}") >= 1.0);
    assert_eq!(Https::open(cp.http, ca.roots()).await.peer, second_der);

    // The gRPC connection above is still open and idle (it never sent a request): the stop
    // cuts it off at the drain deadline rather than waiting for it.
    tokio::time::pause();
    tokio::time::timeout(control_plane::DRAIN_TIMEOUT * 2, cp.stop())
        .await
        .expect("the stop is not held up by an idle connection");
    drop(grpc);
    mock.shutdown().await;
}

/// Runs `control-plane serve` with these files; its exit code and standard error.
fn run_binary(files: &TlsFiles) -> (Option<i32>, String) {
    let out = serve_command()
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn load(files: &TlsFiles) -> Result<Settings, String> {
    Settings::load(CommonArgs {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        ..Default::default()
    })
    .map_err(|e| e.to_string())
}

#[test]
fn bad_files_are_refused_at_start_naming_the_file() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("cp-tls-refuse");
    let files = dir.install(&ca.leaf(NAMES));
    let other = ca.leaf(NAMES);
    let cases: Vec<(&str, TlsFiles, &str, &str)> = vec![
        (
            "missing file",
            TlsFiles {
                cert: dir.join("absent.pem"),
                ..files.clone()
            },
            "absent.pem",
            "cannot read",
        ),
        (
            "garbage certificate",
            TlsFiles {
                cert: dir.write("garbage.pem", "this is not a certificate\n"),
                ..files.clone()
            },
            "garbage.pem",
            "no certificate",
        ),
        (
            "garbage key",
            TlsFiles {
                key: dir.write("garbage-key.pem", "-----BEGIN PRIVATE KEY-----\nxx\n"),
                ..files.clone()
            },
            "garbage-key.pem",
            "tls_key",
        ),
        (
            "mismatched key",
            TlsFiles {
                key: dir.write("other-key.pem", &other.key_pem),
                ..files.clone()
            },
            "other-key.pem",
            "does not match",
        ),
        (
            "expired certificate",
            {
                let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
                p.not_before = rcgen::date_time_ymd(2019, 1, 1);
                p.not_after = rcgen::date_time_ymd(2020, 1, 1);
                let key = rcgen::KeyPair::generate().unwrap();
                TlsFiles {
                    cert: dir.write("expired.pem", &p.self_signed(&key).unwrap().pem()),
                    key: dir.write("expired-key.pem", &key.serialize_pem()),
                }
            },
            "expired.pem",
            "expired at 2020-01-01T00:00:00Z",
        ),
    ];
    for (what, files, named, reason) in cases {
        let e = load(&files)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(e.contains(named) && e.contains(reason), "{what}: {e}");
        let (code, stderr) = run_binary(&files);
        assert!(code.is_some_and(|c| c != 0), "{what}: {code:?} {stderr}");
        assert!(
            stderr.contains(named) && stderr.contains(reason),
            "{what}: {stderr}"
        );
    }
    // Only one of the two.
    let e = Settings::load(CommonArgs {
        tls_cert: Some(files.cert.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("tls_key: missing"), "{e}");
    // In the TOML file, under the documented keys.
    let toml = dir.write(
        "cp.toml",
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            dir.join("absent.pem"),
            files.key
        ),
    );
    let e = Settings::load(CommonArgs {
        config: Some(toml),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("tls_cert ") && e.contains("absent.pem"),
        "{e}"
    );
    // The good pair loads.
    assert_eq!(load(&files).unwrap().tls, Some(files));
}

#[tokio::test]
async fn dev_refuses_tls_rather_than_ignoring_it() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("cp-tls-dev");
    let files = dir.install(&ca.leaf(NAMES));
    let args = control_plane::dev::DevArgs {
        common: CommonArgs {
            backends: Some(vec![control_plane::settings::BackendEntry::Short(
                "127.0.0.1:9".into(),
            )]),
            tls_cert: Some(files.cert),
            tls_key: Some(files.key),
            ..Default::default()
        },
        data_planes: 1,
        listen: None,
        admin_listen: None,
        ports: String::new(),
        backend_protocol: "http".into(),
    };
    let e = control_plane::dev::run(args, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("tls_cert") && e.contains("serve"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS: data planes present client certificates instead of the cluster token

/// A client certificate for `names` from `ca`, written under `dir` with this file prefix.
fn client_files(dir: &TempDir, prefix: &str, ca: &Ca, names: &[&str]) -> TlsFiles {
    let leaf = ca.client_leaf(names);
    TlsFiles {
        cert: dir.write(&format!("{prefix}-cert.pem"), &leaf.cert_pem),
        key: dir.write(&format!("{prefix}-key.pem"), &leaf.key_pem),
    }
}

/// A Watch call over TLS naming data plane `id`, presenting `identity` when given: the first
/// snapshot's version, or the refusal's code.
async fn watch_as(
    url: &str,
    ca_pem: &str,
    identity: Option<&TlsFiles>,
    id: &str,
) -> Result<u64, tonic::Code> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(files) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(&files.cert).unwrap(),
            std::fs::read(&files.key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|_| tonic::Code::Unavailable)?;
    let hello = lb_proto::v1::WatchRequest {
        node: Some(lb_proto::v1::Node {
            id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut snapshots = lb_proto::v1::discovery_client::DiscoveryClient::new(channel)
        .watch(tokio_stream::iter([hello]))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let first = snapshots.message().await.map_err(|s| s.code())?;
    Ok(first.map_or(0, |s| s.version))
}

#[tokio::test]
async fn a_data_plane_may_authenticate_with_a_client_certificate_naming_it() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let clients = Ca::new("lb data planes CA");
    let stranger = Ca::new("some other CA");
    let dir = TempDir::new("cp-mtls");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let clients_file = dir.write("clients-ca.pem", &clients.pem);
    let tls = ServerTls::load(dir.install(&ca.leaf(NAMES)))
        .unwrap()
        .with_client_ca(&clients_file)
        .unwrap();
    assert!(tls.verifies_clients());
    let mock = MockBackends::start(&["127.0.0.1:0".parse().unwrap(); 2])
        .await
        .unwrap();
    // No cluster token: the certificate is the only credential.
    let cp = Cp::start_tls(snapshot_with(&mock.addrs()), Arc::new(tls)).await;

    // A data plane presenting a certificate for its node id is configured, and reports.
    let mine = client_files(&dir, "dp-mtls", &clients, &["dp-mtls"]);
    let dp = Dp::join_with(&cp.tls_url(), "dp-mtls", |s| {
        s.control_plane_ca = Some(ca_file.clone());
        s.control_plane_identity = Some(mine.clone());
    })
    .await;
    dp.wait_version(1).await;
    cp.wait_acked(&["dp-mtls"], 1).await;
    let client = http_client();
    for _ in 0..3 {
        assert_eq!(get(&client, &dp.url("/data")).await.status, 200);
    }
    wait_until("the data plane's report", || {
        cp.cp.traffic.totals().requests >= 3
    })
    .await;

    let url = cp.tls_url();
    // Without a certificate (and no token): refused.
    assert_eq!(
        watch_as(&url, &ca.pem, None, "dp-x").await,
        Err(tonic::Code::Unauthenticated)
    );
    // A certificate for another data plane's name cannot speak for this one.
    assert_eq!(
        watch_as(&url, &ca.pem, Some(&mine), "dp-other").await,
        Err(tonic::Code::PermissionDenied)
    );
    let probe = client_files(&dir, "dp-probe", &clients, &["dp-probe"]);
    assert_eq!(
        watch_as(&url, &ca.pem, Some(&probe), "dp-probe").await,
        Ok(1)
    );
    // A certificate from a CA the control plane does not trust fails the handshake.
    let forged = client_files(&dir, "forged", &stranger, &["dp-mtls"]);
    assert!(
        watch_as(&url, &ca.pem, Some(&forged), "dp-mtls")
            .await
            .is_err()
    );
    // The refused ones never became known data planes.
    let ids: Vec<String> = cp
        .cp
        .data_planes()
        .iter()
        .map(|d| d.node.as_ref().map(|n| n.id.clone()).unwrap_or_default())
        .collect();
    assert!(ids.contains(&"dp-mtls".to_owned()), "{ids:?}");
    assert!(
        !ids.iter().any(|id| id == "dp-x" || id == "dp-other"),
        "{ids:?}"
    );

    dp.stop().await;
    cp.stop().await;
    mock.shutdown().await;
}

#[test]
fn client_certificate_settings_are_checked_at_start() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("cp-mtls-settings");
    let ca_file = dir.write("ca.pem", &ca.pem);
    // The control plane asks for client certificates only on a TLS listener.
    let e = Settings::load(CommonArgs {
        client_ca: Some(ca_file.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("client_ca") && e.contains("TLS"), "{e}");
    let files = dir.install(&ca.leaf(NAMES));
    let s = Settings::load(CommonArgs {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        client_ca: Some(ca_file.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.client_ca.as_deref(), Some(ca_file.as_path()));

    // A data plane's certificate needs its key, an https:// control plane, and readable files.
    let mine = client_files(&dir, "dp", &ca, &["dp-a"]);
    let dp = |cert: Option<&std::path::Path>, key: Option<&std::path::Path>, url: &str| {
        data_plane::Settings::load(data_plane::Args {
            control_plane: Some(url.into()),
            control_plane_cert: cert.map(Into::into),
            control_plane_key: key.map(Into::into),
            ..Default::default()
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let https = "https://cp.example:50051";
    assert_eq!(dp(Some(&mine.cert), Some(&mine.key), https), Ok(()));
    let e = dp(Some(&mine.cert), None, https).unwrap_err();
    assert!(e.contains("control_plane_key"), "{e}");
    let e = dp(Some(&mine.cert), Some(&mine.key), "http://cp.example:50051").unwrap_err();
    assert!(
        e.contains("control_plane_cert") && e.contains("https://"),
        "{e}"
    );
    let missing = dir.path().join("missing.pem");
    let e = dp(Some(&missing), Some(&mine.key), https).unwrap_err();
    assert!(
        e.contains("control_plane_cert") && e.contains("missing.pem"),
        "{e}"
    );
}
