//! Who may talk to the control plane's Discovery service, and with what. `serve` refuses to start
//! without a cluster credential (unless told `--insecure-discovery`) or with a short admin token;
//! with a cluster token, Watch and Report need it, and a report stream speaks for one data plane
//! only.

mod common;
#[path = "../../data-plane/tests/support/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Stack, free_port, serve_command};
use control_plane::cluster::ControlPlane;
use control_plane::store::MemoryStore;
use lb_proto::v1::discovery_client::DiscoveryClient;
use lb_proto::v1::{Node, StatsReport, WatchRequest};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;

const CLUSTER_TOKEN: &str = "cluster-token-for-the-tests";

/// `control-plane serve` on free ports with this environment: its exit code and standard error,
/// or `None` (and what it printed) when it was still running after it logged that it serves.
fn serve(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let mut child = serve_command()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("control plane started") {
            let _ = child.kill();
            let _ = child.wait();
            return (None, seen);
        }
    }
    (child.wait().unwrap().code(), seen)
}

#[test]
fn serve_refuses_to_start_without_a_cluster_credential() {
    let admin = ("LB_ADMIN_TOKEN", "an-admin-token-long-enough");
    let (code, err) = serve(&[admin], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("LB_CLUSTER_TOKEN") && err.contains("--insecure-discovery"),
        "{err}"
    );
    // Told to, it serves without one.
    let (code, err) = serve(&[admin], &["--insecure-discovery"]);
    assert_eq!(code, None, "{err}");
    // With a token, it serves.
    let (code, err) = serve(&[admin, ("LB_CLUSTER_TOKEN", CLUSTER_TOKEN)], &[]);
    assert_eq!(code, None, "{err}");
}

#[test]
fn client_certificates_are_a_cluster_credential() {
    let ca = pki::Ca::new("lb test CA");
    let dir = pki::TempDir::new("credentials-client-ca");
    let files = dir.install(&ca.leaf(&["localhost"]));
    let ca_file = dir.write("ca.pem", &ca.pem);
    let admin = ("LB_ADMIN_TOKEN", "an-admin-token-long-enough");
    let tls = [
        "--tls-cert",
        files.cert.to_str().unwrap(),
        "--tls-key",
        files.key.to_str().unwrap(),
    ];
    let (code, err) = serve(
        &[admin],
        &[&tls[..], &["--client-ca", ca_file.to_str().unwrap()]].concat(),
    );
    assert_eq!(code, None, "{err}");
    // Without TLS there is no client certificate to ask for.
    let (code, err) = serve(&[admin], &["--client-ca", ca_file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("client_ca"), "{err}");
}

#[test]
fn serve_reads_the_cluster_token_from_a_file() {
    let dir = std::env::temp_dir().join(format!("lb-credentials-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster-token");
    std::fs::write(&file, format!("{CLUSTER_TOKEN}\n")).unwrap();
    let admin = ("LB_ADMIN_TOKEN", "an-admin-token-long-enough");
    let path = file.to_str().unwrap();
    let (code, err) = serve(&[admin, ("LB_CLUSTER_TOKEN_FILE", path)], &[]);
    assert_eq!(code, None, "{err}");
    // Both ways at once is ambiguous.
    let both = [
        admin,
        ("LB_CLUSTER_TOKEN_FILE", path),
        ("LB_CLUSTER_TOKEN", CLUSTER_TOKEN),
    ];
    let (code, err) = serve(&both, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not both"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_refuses_a_short_admin_token() {
    let cluster = ("LB_CLUSTER_TOKEN", CLUSTER_TOKEN);
    let (code, err) = serve(&[("LB_ADMIN_TOKEN", "short"), cluster], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("at least 16"), "{err}");
}

#[test]
fn help_names_the_tokens() {
    for sub in ["serve", "dev"] {
        let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for var in [
            "LB_ADMIN_TOKEN",
            "LB_CLUSTER_TOKEN",
            "LB_CLUSTER_TOKEN_FILE",
        ] {
            assert!(help.contains(var), "{sub} --help lacks {var}:\n{help}");
        }
    }
}

/// A control plane requiring the cluster token, in this process: its gRPC address.
async fn control_plane() -> (SocketAddr, oneshot::Sender<()>) {
    let (grpc, _http, stop) = control_plane_with_http().await;
    (grpc, stop)
}

/// The same, with its HTTP address.
async fn control_plane_with_http() -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let store = Arc::new(MemoryStore::new(None));
    let mut initial = lb_proto::defaults::snapshot();
    initial.version = 1;
    let cp = ControlPlane::new(
        store,
        initial,
        "admin-token-for-the-tests".into(),
        Some(CLUSTER_TOKEN.into()),
    )
    .await
    .unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(control_plane::serve(Arc::new(cp), grpc, http, async {
        let _ = rx.await;
    }));
    (addr, http_addr, tx)
}

async fn client(addr: SocketAddr) -> DiscoveryClient<tonic::transport::Channel> {
    DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        ..Default::default()
    })
}

/// A Watch call's outcome: the version of the first snapshot, or the refusal's code.
async fn watch(addr: SocketAddr, token: Option<&str>) -> Result<u64, Code> {
    let hello = WatchRequest {
        node: node("dp-a"),
        ..Default::default()
    };
    let stream = tokio_stream::iter([hello]);
    let mut snapshots = client(addr)
        .await
        .watch(with_token(stream, token))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let first = snapshots.message().await.map_err(|s| s.code())?;
    Ok(first.map_or(0, |s| s.version))
}

/// A Report call with these reports: its outcome's code.
async fn report(addr: SocketAddr, token: Option<&str>, nodes: &[&str]) -> Code {
    let reports: Vec<StatsReport> = nodes
        .iter()
        .map(|id| StatsReport {
            node: node(id),
            ..Default::default()
        })
        .collect();
    let sent = client(addr)
        .await
        .report(with_token(tokio_stream::iter(reports), token))
        .await;
    match sent {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn watch_and_report_need_the_cluster_token() {
    let (addr, _stop) = control_plane().await;
    assert_eq!(watch(addr, Some(CLUSTER_TOKEN)).await, Ok(1));
    assert_eq!(watch(addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        watch(addr, Some("wrong")).await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(report(addr, Some(CLUSTER_TOKEN), &["dp-a"]).await, Code::Ok);
    assert_eq!(report(addr, None, &["dp-a"]).await, Code::Unauthenticated);
    assert_eq!(
        report(addr, Some("wrong"), &["dp-a"]).await,
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn a_report_stream_speaks_for_one_data_plane() {
    let (addr, _stop) = control_plane().await;
    let token = Some(CLUSTER_TOKEN);
    assert_eq!(report(addr, token, &["dp-a", "dp-a"]).await, Code::Ok);
    assert_eq!(
        report(addr, token, &["dp-a", "dp-b"]).await,
        Code::PermissionDenied
    );
    assert_eq!(report(addr, token, &[""]).await, Code::InvalidArgument);
}

#[tokio::test]
async fn a_data_plane_with_the_token_gets_its_configuration() {
    let (addr, _stop) = control_plane().await;
    let start = |token: Option<&str>| {
        let token = token.map(str::to_owned);
        async move {
            let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let settings = data_plane::Settings {
                control_plane: format!("http://{addr}"),
                node_id: "dp-token".into(),
                cluster_token: token,
                workers: 1,
                ..data_plane::Settings::default()
            };
            let shared = Arc::new(data_plane::Shared::new(settings));
            let (tx, rx) = oneshot::channel::<()>();
            tokio::spawn(data_plane::run_shared(
                Arc::clone(&shared),
                proxy,
                admin,
                async {
                    let _ = rx.await;
                },
            ));
            (shared, tx)
        }
    };
    let (with, _a) = start(Some(CLUSTER_TOKEN)).await;
    let mut applied = with.applied_version();
    tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|v| *v == 1))
        .await
        .expect("the configuration arrives with the token")
        .unwrap();
}

/// The status a WebSocket upgrade of `/ws` gets, sent with these `Host` and `Origin`.
async fn ws_upgrade(http: SocketAddr, host: &str, origin: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nhost: {host}\r\norigin: {origin}\r\nupgrade: websocket\r\n\
         connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         sec-websocket-version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_page_from_a_rebound_dns_name_cannot_open_the_live_feed() {
    let (_grpc, http, _stop) = control_plane_with_http().await;
    let port = http.port();
    let here = format!("127.0.0.1:{port}");
    assert_eq!(
        ws_upgrade(http, &here, &format!("http://{here}")).await,
        101
    );
    // evil.example resolves to this address: its page's origin equals the Host it sends.
    let evil = format!("evil.example:{port}");
    assert_eq!(
        ws_upgrade(http, &evil, &format!("http://{evil}")).await,
        403
    );
}

#[tokio::test]
async fn healthcheck_asks_the_http_listener_of_the_same_settings() {
    let stack = Stack::start(0).await;
    let run = |addr: String| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args(["healthcheck", "--http-listen", &addr])
            .env_clear()
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let addr = stack.cp.http.to_string();
    let (code, err) = tokio::task::spawn_blocking(move || run(addr))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    let closed = format!("127.0.0.1:{}", free_port());
    let (code, err) = tokio::task::spawn_blocking(move || run(closed))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("control-plane healthcheck:"), "{err}");
    stack.cp.stop().await;
}
