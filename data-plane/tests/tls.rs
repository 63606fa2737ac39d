//! TLS on the proxy listener, end to end: HTTPS over HTTP/1.1 and h2 (ALPN) and TLS 1.2, the
//! backend told `X-Forwarded-Proto: https`, start-up refusals naming the file, certificate
//! reloads that leave open connections alone, and the handshake timeout (and, on a plain
//! listener, the cut-off of a client that sends nothing).
//!
//! The data plane runs in this process with its configuration applied directly (no control
//! plane: its URL points at a closed port) in front of a small hyper backend. Certificates are
//! made here with rcgen, signed by a test CA that the client trusts.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/dp.rs"]
mod dp;
#[path = "support/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use data_plane::Settings;
use data_plane::tls::TlsFiles;
use dp::{Dp, snapshot};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pki::{Ca, Date, Leaf, TempDir, install_provider, tls_connect};
use rustls::RootCertStore;
use rustls::SupportedProtocolVersion;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server certificate for localhost from `ca`, numbered `serial`.
fn leaf(ca: &Ca, serial: u8, validity: Option<(Date, Date)>) -> Leaf {
    ca.leaf_with(&["localhost", "127.0.0.1"], Some(serial), validity)
}

/// A data plane in front of a backend that answers with the `X-Forwarded-Proto` it received.
async fn start(tls: Option<TlsFiles>, header_timeout: Duration) -> Dp {
    let backend = dp::backend(|req| {
        req.headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_owned()
    })
    .await;
    Dp::start(
        |s| {
            s.node_id = "tls-test".into();
            s.header_timeout = header_timeout;
            s.tls = tls;
        },
        snapshot(&[backend]),
    )
    .await
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

impl Client {
    async fn open(
        addr: SocketAddr,
        roots: Arc<RootCertStore>,
        alpn: &[u8],
        versions: &[&'static SupportedProtocolVersion],
    ) -> Client {
        let tls = tls_connect(addr, roots, alpn, versions).await.unwrap();
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

/// Connects, sends nothing, and waits for the data plane to close the connection.
async fn connect_silently_and_be_cut_off(addr: SocketAddr) {
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the data plane closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn https_over_http1_and_h2_tells_the_backend_https() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let leaf = leaf(&ca, 1, None);
    let dir = TempDir::new("dp-tls-serve");
    let dp = start(Some(dir.install(&leaf)), Duration::from_secs(5)).await;

    let mut h1 = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.peer, leaf.der());
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
    let expiry = dp.metric("lb_tls_certificate_expiry_timestamp_seconds");
    assert!(expiry > 4_000_000_000.0, "{expiry}");
    dp.stop().await;
}

#[tokio::test]
async fn plain_listener_still_says_http() {
    install_provider();
    let dp = start(None, Duration::from_secs(5)).await;
    assert_eq!(dp.get("/").await.1, "http");
    assert!(
        !dp.shared.render_metrics().contains("lb_tls_"),
        "no TLS series without TLS"
    );
    dp.stop().await;
}

#[tokio::test]
async fn a_plain_client_that_sends_nothing_is_cut_off() {
    install_provider();
    let dp = start(None, Duration::from_millis(300)).await;
    connect_silently_and_be_cut_off(dp.addr).await;
    // A client that sends its request a few bytes at a time is served.
    let mut slow = TcpStream::connect(dp.addr).await.unwrap();
    for piece in [
        "GE",
        "T / HTTP/1.1\r\nhost: localhost\r\n",
        "connection: close\r\n\r\n",
    ] {
        slow.write_all(piece.as_bytes()).await.unwrap();
        slow.flush().await.unwrap();
    }
    let mut resp = String::new();
    slow.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("http"), "{resp}");
    dp.stop().await;
}

/// Runs the binary with these files; its exit code and standard error.
fn run_binary(files: &TlsFiles) -> (Option<i32>, String) {
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    bin::run_binary(&["--tls-cert", cert, "--tls-key", key], &[])
}

#[test]
fn bad_files_are_refused_at_start_naming_the_file() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("dp-tls-refuse");
    let good = leaf(&ca, 1, None);
    let other = leaf(&ca, 2, None);
    let files = dir.install(&good);
    let cases: Vec<(&str, TlsFiles, &Path, &str)> = vec![
        (
            "missing file",
            TlsFiles {
                cert: dir.join("absent.pem"),
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
                let old = leaf(&ca, 3, Some(((2019, 1, 1), (2020, 1, 1))));
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
                let early = leaf(&ca, 4, Some(((2090, 1, 1), (2091, 1, 1))));
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
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("dp-tls-reload");
    let first = leaf(&ca, 0xa1, None);
    let dp = start(Some(dir.install(&first)), Duration::from_secs(5)).await;
    let tls = Arc::clone(dp.shared.tls().expect("TLS is loaded"));
    let ok = "lb_tls_reloads_total{result=\"ok\"}";
    let error = "lb_tls_reloads_total{result=\"error\"}";

    let mut before = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(before.peer, first.der());
    assert_eq!(before.get("/1").await.2, "https");
    let mut before_h2 = Client::open(dp.addr, ca.roots(), b"h2", TLS13).await;
    assert_eq!(before_h2.get("/1").await.2, "https");

    // A new certificate: new connections get it, open ones go on.
    let second = leaf(&ca, 0xb2, None);
    dir.install(&second);
    tls.reload().unwrap();
    assert_eq!(tls.certificate().serial, "b2");
    assert!(dp.metric(ok) >= 1.0);
    let mut after = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(after.peer, second.der());
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
    assert_eq!(still.peer, second.der());
    assert_eq!(still.get("/4").await.2, "https");
    assert_eq!(before.get("/5").await.0, StatusCode::OK);
    assert_eq!(after.get("/5").await.0, StatusCode::OK);

    // A mismatched pair fails the same way.
    let third = leaf(&ca, 0xc3, None);
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
    assert_eq!(last.peer, third.der());
    assert_eq!(last.get("/6").await.2, "https");
    assert_eq!(before.get("/7").await.0, StatusCode::OK);
    dp.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_cut_off() {
    install_provider();
    let ca = Ca::new("lb test CA");
    let dir = TempDir::new("dp-tls-timeout");
    let dp = start(
        Some(dir.install(&leaf(&ca, 1, None))),
        Duration::from_millis(300),
    )
    .await;
    connect_silently_and_be_cut_off(dp.addr).await;
    dp.wait_metric("lb_tls_handshake_failures_total{reason=\"timeout\"}", 1.0)
        .await;
    // The slot is free again: a real client gets through.
    let mut c = Client::open(dp.addr, ca.roots(), b"http/1.1", TLS13).await;
    assert_eq!(c.get("/").await.2, "https");
    dp.stop().await;
}
