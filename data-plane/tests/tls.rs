//! TLS on the proxy listener, end to end: HTTPS over HTTP/1.1 and h2 (ALPN) and TLS 1.2, the
//! backend told `X-Forwarded-Proto: https`, start-up refusals naming the file, certificate
//! reloads that leave open connections alone, and the handshake timeout.
//!
//! The data plane runs in this process with its configuration applied directly (no control
//! plane: its URL points at a closed port) in front of a small hyper backend. Certificates are
//! made here with rcgen, signed by a test CA that the client trusts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use data_plane::tls::TlsFiles;
use data_plane::{Settings, Shared};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "lb test CA");
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            issuer: Issuer::new(p, key),
            der: cert.der().clone(),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        Arc::new(roots)
    }

    /// A server certificate for localhost, with its key.
    fn leaf(&self, serial: u8, validity: Option<(Date, Date)>) -> Leaf {
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("data plane {serial}"));
        p.serial_number = Some(SerialNumber::from_slice(&[serial]));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if let Some((b, a)) = validity {
            p.not_before = rcgen::date_time_ymd(b.0, b.1, b.2);
            p.not_after = rcgen::date_time_ymd(a.0, a.1, a.2);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// Year, month, day.
type Date = (i32, u8, u8);

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

/// A scratch directory, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("dp-tls-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// Writes a file whole or not at all (write, then rename), as a deployment should.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    fn install(&self, leaf: &Leaf) -> TlsFiles {
        TlsFiles {
            key: self.write("key.pem", &leaf.key_pem),
            cert: self.write("cert.pem", &leaf.cert_pem),
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A backend and a data plane

/// Answers every request with the `X-Forwarded-Proto` it received as the body.
async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let proto = req
                        .headers()
                        .get("x-forwarded-proto")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("(none)")
                        .to_owned();
                    let mut resp = Response::new(Full::new(Bytes::from(proto)));
                    resp.headers_mut()
                        .insert("cache-control", "no-store".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A port with nothing listening, for a control plane that is never reached.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

struct Dp {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Dp {
    async fn start(backend: SocketAddr, tls: Option<TlsFiles>, header_timeout: Duration) -> Dp {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = Settings {
            listen: proxy.local_addr().unwrap(),
            admin_listen: admin.local_addr().unwrap(),
            control_plane: format!("http://127.0.0.1:{}", closed_port().await),
            node_id: "tls-test".into(),
            workers: 1,
            header_timeout,
            drain_timeout: Duration::from_secs(2),
            tls,
            ..Settings::default()
        };
        let shared = Arc::new(Shared::new(settings));
        let mut snapshot = lb_proto::defaults::snapshot();
        if let Some(rl) = snapshot.rate_limit.as_mut() {
            rl.ip_limit = Some(lb_proto::v1::Limit {
                requests: 0,
                period_ms: 60_000,
            });
        }
        snapshot.version = 1;
        snapshot.backends = vec![lb_proto::v1::Backend {
            address: backend.to_string(),
            weight: 1,
            ..Default::default()
        }];
        shared.apply(shared.prepare(snapshot).unwrap());
        let addr = proxy.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(data_plane::run_shared(
            Arc::clone(&shared),
            proxy,
            admin,
            async {
                let _ = rx.await;
            },
        ));
        Dp {
            shared,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn metric(&self, series: &str) -> f64 {
        let text = self.shared.render_metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// Waits for a series to reach a value: the proxy counts after the client sees the effect.
    async fn wait_metric(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.metric(series) < value {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed below {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.metric(series), value, "{series}");
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("data plane stops")
                .unwrap()
                .unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A client

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One client connection over TLS.
struct Client {
    sender: Sender,
    /// The leaf certificate the server presented.
    peer: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
    tls_version: rustls::ProtocolVersion,
}

async fn tls_stream(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    alpn: &[u8],
    versions: &[&'static SupportedProtocolVersion],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    // Every connection does a full handshake, so each one shows the certificate in use.
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

impl Client {
    async fn open(
        addr: SocketAddr,
        roots: Arc<RootCertStore>,
        alpn: &[u8],
        versions: &[&'static SupportedProtocolVersion],
    ) -> Client {
        let tls = tls_stream(addr, roots, alpn, versions).await.unwrap();
        let (_, state) = tls.get_ref();
        let peer = state.peer_certificates().unwrap()[0].clone();
        let negotiated = state.alpn_protocol().map(<[u8]>::to_vec);
        let tls_version = state.protocol_version().unwrap();
        let io = TokioIo::new(tls);
        let sender = if negotiated.as_deref() == Some(b"h2") {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Client {
            sender,
            peer,
            alpn: negotiated,
            tls_version,
        }
    }

    async fn get(&mut self, path: &str) -> (StatusCode, Version, String) {
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                let req = Request::get(path)
                    .header("host", "localhost")
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::H2(s) => {
                let req = Request::get(format!("https://localhost{path}"))
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let (status, version) = (resp.status(), resp.version());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, version, String::from_utf8_lossy(&body).into_owned())
    }
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn https_over_http1_and_h2_tells_the_backend_https() {
    install_provider();
    let ca = Ca::new();
    let leaf = ca.leaf(1, None);
    let dir = Dir::new("serve");
    let dp = Dp::start(
        backend().await,
        Some(dir.install(&leaf)),
        Duration::from_secs(5),
    )
    .await;

    let mut h1 = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.peer, leaf.der);
    for _ in 0..2 {
        assert_eq!(
            h1.get("/a").await,
            (StatusCode::OK, Version::HTTP_11, "https".to_owned())
        );
    }

    let mut h2 = Client::open(dp.addr, ca.roots(), b"h2", TLS13).await;
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        h2.get("/b").await,
        (StatusCode::OK, Version::HTTP_2, "https".to_owned())
    );

    let mut old = Client::open(dp.addr, ca.roots(), b"h2", TLS12).await;
    assert_eq!(old.tls_version, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(old.get("/c").await.2, "https");

    // The listener speaks TLS only: a plain HTTP request gets no HTTP answer.
    let mut plain = TcpStream::connect(dp.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf))
        .await
        .expect("the data plane closes a non-TLS connection");
    assert!(
        !buf.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    dp.wait_metric("lb_tls_handshake_failures_total{reason=\"error\"}", 1.0)
        .await;
    let expiry = dp.metric("lb_tls_certificate_expiry_seconds");
    assert!(expiry > 4_000_000_000.0, "{expiry}");
    dp.stop().await;
}

#[tokio::test]
async fn plain_listener_still_says_http() {
    install_provider();
    let dp = Dp::start(backend().await, None, Duration::from_secs(5)).await;
    let tcp = TcpStream::connect(dp.addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"http");
    assert!(
        !dp.shared.render_metrics().contains("lb_tls_"),
        "no TLS series without TLS"
    );
    dp.stop().await;
}

/// Runs the binary; its exit code and standard error.
fn run_binary(files: &TlsFiles) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .env_remove("LB_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_files_are_refused_at_start_naming_the_file() {
    install_provider();
    let ca = Ca::new();
    let dir = Dir::new("refuse");
    let good = ca.leaf(1, None);
    let other = ca.leaf(2, None);
    let files = dir.install(&good);
    let cases: Vec<(&str, TlsFiles, &Path, &str)> = vec![
        (
            "missing file",
            TlsFiles {
                cert: dir.0.join("absent.pem"),
                ..files.clone()
            },
            Path::new("absent.pem"),
            "cannot read",
        ),
        (
            "garbage certificate",
            TlsFiles {
                cert: dir.write("garbage.pem", "this is not a certificate\n"),
                ..files.clone()
            },
            Path::new("garbage.pem"),
            "no certificate",
        ),
        (
            "garbage key",
            TlsFiles {
                key: dir.write("garbage-key.pem", "-----BEGIN PRIVATE KEY-----\nxx\n"),
                ..files.clone()
            },
            Path::new("garbage-key.pem"),
            "tls_key",
        ),
        (
            "mismatched key",
            TlsFiles {
                key: dir.write("other-key.pem", &other.key_pem),
                ..files.clone()
            },
            Path::new("other-key.pem"),
            "does not match",
        ),
        (
            "expired certificate",
            {
                let old = ca.leaf(3, Some(((2019, 1, 1), (2020, 1, 1))));
                TlsFiles {
                    cert: dir.write("expired.pem", &old.cert_pem),
                    key: dir.write("expired-key.pem", &old.key_pem),
                }
            },
            Path::new("expired.pem"),
            "expired at 2020-01-01T00:00:00Z",
        ),
        (
            "not yet valid certificate",
            {
                let early = ca.leaf(4, Some(((2090, 1, 1), (2091, 1, 1))));
                TlsFiles {
                    cert: dir.write("early.pem", &early.cert_pem),
                    key: dir.write("early-key.pem", &early.key_pem),
                }
            },
            Path::new("early.pem"),
            "not valid before 2090",
        ),
    ];
    for (what, files, named, reason) in cases {
        let named = named.to_str().unwrap();
        let e = Settings::load(data_plane::Args {
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            ..Default::default()
        })
        .err()
        .unwrap_or_else(|| panic!("{what}: accepted"))
        .to_string();
        assert!(e.contains(named) && e.contains(reason), "{what}: {e}");
        let (code, stderr) = run_binary(&files);
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert!(stderr.contains(named), "{what}: {stderr}");
    }
    // Only one of the two.
    let e = Settings::load(data_plane::Args {
        tls_cert: Some(files.cert.clone()),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("tls_key"), "{e}");
    // And the good pair loads.
    Settings::load(data_plane::Args {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        ..Default::default()
    })
    .unwrap();
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections_only() {
    install_provider();
    let ca = Ca::new();
    let dir = Dir::new("reload");
    let first = ca.leaf(0xa1, None);
    let dp = Dp::start(
        backend().await,
        Some(dir.install(&first)),
        Duration::from_secs(5),
    )
    .await;
    let tls = Arc::clone(dp.shared.tls().expect("TLS is loaded"));
    let ok = "lb_tls_reloads_total{result=\"ok\"}";
    let error = "lb_tls_reloads_total{result=\"error\"}";

    let mut before = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(before.peer, first.der);
    assert_eq!(before.get("/1").await.2, "https");
    let mut before_h2 = Client::open(dp.addr, ca.roots(), b"h2", TLS13).await;
    assert_eq!(before_h2.get("/1").await.2, "https");

    // A new certificate: new connections get it, open ones go on.
    let second = ca.leaf(0xb2, None);
    dir.install(&second);
    tls.reload().unwrap();
    assert_eq!(tls.certificate().serial, "b2");
    assert!(dp.metric(ok) >= 1.0);
    let mut after = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(after.peer, second.der);
    assert_eq!(after.get("/2").await.2, "https");
    assert_eq!(before.get("/3").await.0, StatusCode::OK);
    assert_eq!(before_h2.get("/3").await.0, StatusCode::OK);

    // A broken file: the reload fails, naming it, and the second certificate stays.
    let errors = dp.metric(error);
    dir.write("cert.pem", "-----BEGIN CERTIFICATE-----\nbroken\n");
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains("cert.pem"), "{e}");
    assert!(dp.metric(error) > errors);
    assert_eq!(tls.certificate().serial, "b2");
    let mut still = Client::open(dp.addr, ca.roots(), b"h2", TLS13).await;
    assert_eq!(still.peer, second.der);
    assert_eq!(still.get("/4").await.2, "https");
    assert_eq!(before.get("/5").await.0, StatusCode::OK);
    assert_eq!(after.get("/5").await.0, StatusCode::OK);

    // A mismatched pair fails the same way.
    let third = ca.leaf(0xc3, None);
    dir.write("cert.pem", &third.cert_pem);
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains("key.pem") && e.contains("does not match"), "{e}");
    assert_eq!(tls.certificate().serial, "b2");

    // Changing the files is enough: the poll sees the new key and reloads on its own.
    let mut attempts = tls.attempts();
    attempts.borrow_and_update();
    dir.write("key.pem", &third.key_pem);
    tokio::time::timeout(Duration::from_secs(15), async {
        while tls.certificate().serial != "c3" {
            attempts.changed().await.unwrap();
        }
    })
    .await
    .expect("the change is picked up");
    let mut last = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(last.peer, third.der);
    assert_eq!(last.get("/6").await.2, "https");
    assert_eq!(before.get("/7").await.0, StatusCode::OK);
    dp.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_cut_off() {
    install_provider();
    let ca = Ca::new();
    let dir = Dir::new("timeout");
    let dp = Dp::start(
        backend().await,
        Some(dir.install(&ca.leaf(1, None))),
        Duration::from_millis(300),
    )
    .await;
    let mut silent = TcpStream::connect(dp.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the data plane closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    dp.wait_metric("lb_tls_handshake_failures_total{reason=\"timeout\"}", 1.0)
        .await;
    // The slot is free again: a real client gets through.
    let mut c = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(c.get("/").await.2, "https");
    dp.stop().await;
}
