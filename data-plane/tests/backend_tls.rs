//! TLS to backends, end to end: requests proxied to a hyper + rustls backend on a reused
//! keep-alive connection, health probes over TLS, a backend whose certificate is from another
//! CA or for another name never sees a request (the client gets the usual 503, or the request
//! moves to another backend), and bad settings refused naming the file.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/dp.rs"]
mod dp;
#[path = "support/pki.rs"]
mod pki;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bin::run_binary;
use bytes::Bytes;
use data_plane::Settings;
use data_plane::tls::client::{BackendTlsSettings, parse_server_name};
use data_plane::upstream;
use dp::{Dp, snapshot, wait_until};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lb_proto::v1::{ConfigSnapshot, HealthCheckPolicy};
use pki::{Ca, Leaf, TempDir, install_provider};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// One request as a backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which TLS connection (numbered in accept order) carried it.
    conn: usize,
    path: String,
    probe: bool,
    alpn: Option<Vec<u8>>,
    version: http::Version,
}

#[derive(Default)]
struct Log {
    requests: Vec<Seen>,
    handshakes_ok: usize,
    handshakes_failed: usize,
}

/// A backend speaking HTTP/1.1 over TLS only (or HTTP/2 as well, as ALPN settles), with
/// `leaf`; answers "tls-backend".
struct TlsBackend {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl TlsBackend {
    async fn start(leaf: &Leaf) -> TlsBackend {
        Self::start_with(leaf, &[b"http/1.1"]).await
    }

    async fn start_with(leaf: &Leaf, alpn: &[&[u8]]) -> TlsBackend {
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let log2 = Arc::clone(&log);
        tokio::spawn(async move {
            let mut next = 0;
            while let Ok((tcp, _)) = l.accept().await {
                let (acceptor, log) = (acceptor.clone(), Arc::clone(&log2));
                let conn = next;
                next += 1;
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        log.lock().unwrap().handshakes_failed += 1;
                        return;
                    };
                    log.lock().unwrap().handshakes_ok += 1;
                    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let probe = req
                            .headers()
                            .get("user-agent")
                            .is_some_and(|v| v == "lb-health-check");
                        log.lock().unwrap().requests.push(Seen {
                            conn,
                            path: req.uri().path().to_owned(),
                            probe,
                            alpn: alpn.clone(),
                            version: req.version(),
                        });
                        async move {
                            let mut resp = Response::new(Full::new(Bytes::from("tls-backend")));
                            resp.headers_mut()
                                .insert("cache-control", "no-store".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        TlsBackend { addr, log }
    }

    fn proxied(&self) -> Vec<Seen> {
        let log = self.log.lock().unwrap();
        log.requests.iter().filter(|s| !s.probe).cloned().collect()
    }

    fn probes(&self) -> usize {
        let log = self.log.lock().unwrap();
        log.requests.iter().filter(|s| s.probe).count()
    }

    fn failed_handshakes(&self) -> usize {
        self.log.lock().unwrap().handshakes_failed
    }
}

/// A configuration probing every second, one probe deciding either way.
fn probed(backends: &[SocketAddr]) -> ConfigSnapshot {
    let mut s = snapshot(backends);
    s.health_check = Some(HealthCheckPolicy {
        path: "/health".into(),
        interval_ms: 1_000,
        timeout_ms: 500,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        jitter_percent: 0,
        ..Default::default()
    });
    s
}

fn backend_tls(ca: std::path::PathBuf, name: Option<&str>) -> impl FnOnce(&mut Settings) {
    move |s| {
        s.backend_tls = Some(BackendTlsSettings {
            all: true,
            ca: Some(ca),
            server_name: name.map(|n| parse_server_name(n).unwrap()),
        });
    }
}

#[tokio::test]
async fn requests_and_probes_go_over_tls_on_a_reused_connection() {
    install_provider();
    let ca = Ca::new("backend CA");
    let dir = TempDir::new("backend-tls-ok");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let backend = TlsBackend::start(&ca.leaf(&["localhost", "127.0.0.1"])).await;
    let dp = Dp::start(backend_tls(ca_file, None), probed(&[backend.addr])).await;

    for i in 0..5 {
        assert_eq!(
            dp.get(&format!("/item/{i}")).await,
            (StatusCode::OK, "tls-backend".to_owned())
        );
    }
    let seen = backend.proxied();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[4].path, "/item/4");
    assert!(
        seen.iter().all(|s| s.conn == seen[0].conn),
        "one keep-alive connection carries every request: {seen:?}"
    );
    assert_eq!(seen[0].alpn.as_deref(), Some(&b"http/1.1"[..]));

    // Probes succeed over TLS: the backend answers them and stays in rotation.
    wait_until("two probes over TLS", || backend.probes() >= 2).await;
    let endpoint = Arc::clone(&dp.shared.active().unwrap().slots[0].endpoint);
    assert!(endpoint.is_healthy());
    assert_eq!(backend.failed_handshakes(), 0);
    dp.stop().await;
}

/// The configuration with `backends` named `https://`.
fn https(backends: &[SocketAddr]) -> ConfigSnapshot {
    let mut s = probed(backends);
    for b in &mut s.backends {
        b.address = format!("https://{}", b.address);
    }
    s
}

#[tokio::test]
async fn https_backends_are_spoken_to_in_what_alpn_settles() {
    install_provider();
    let ca = Ca::new("backend CA");
    let dir = TempDir::new("backend-https");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let both = TlsBackend::start_with(&leaf, &[b"h2", b"http/1.1"]).await;
    let http1 = TlsBackend::start_with(&leaf, &[b"http/1.1"]).await;
    // No --backend-tls: only the https:// backends speak TLS, checked against backend_ca.
    let only_ca = |s: &mut Settings| {
        s.backend_tls = Some(BackendTlsSettings {
            all: false,
            ca: Some(ca_file),
            server_name: None,
        });
    };
    let dp = Dp::start(only_ca, https(&[both.addr, http1.addr])).await;

    for i in 0..6 {
        assert_eq!(
            dp.get(&format!("/item/{i}")).await,
            (StatusCode::OK, "tls-backend".to_owned())
        );
    }
    let (h2, h1) = (both.proxied(), http1.proxied());
    assert_eq!((h2.len(), h1.len()), (3, 3), "round robin: {h2:?} {h1:?}");
    assert!(
        h2.iter()
            .all(|s| s.version == http::Version::HTTP_2 && s.alpn.as_deref() == Some(b"h2")),
        "{h2:?}"
    );
    assert!(
        h2.iter().all(|s| s.conn == h2[0].conn),
        "one multiplexed connection: {h2:?}"
    );
    assert!(
        h1.iter()
            .all(|s| s.version == http::Version::HTTP_11 && s.conn == h1[0].conn),
        "{h1:?}"
    );
    // Probes speak what the backend speaks, and pass.
    wait_until("probes over TLS", || {
        both.probes() >= 1 && http1.probes() >= 1
    })
    .await;
    for slot in &dp.shared.active().unwrap().slots {
        assert!(slot.endpoint.is_healthy(), "{}", slot.endpoint.address);
    }
    dp.stop().await;
}

#[tokio::test]
async fn https_backends_without_backend_ca_are_checked_against_the_system_roots() {
    install_provider();
    // A certificate from a private CA is not trusted by the system's roots: no request reaches
    // the backend.
    let ca = Ca::new("private CA");
    let backend = TlsBackend::start_with(&ca.leaf(&["127.0.0.1"]), &[b"h2"]).await;
    let dp = Dp::start(|_| {}, https(&[backend.addr])).await;
    let (status, body) = dp.get("/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(backend.proxied().is_empty());
    wait_until("a refused handshake", || backend.failed_handshakes() >= 1).await;
    dp.stop().await;
}

#[tokio::test]
async fn a_backend_with_a_certificate_from_another_ca_gets_no_request() {
    install_provider();
    let ca = Ca::new("backend CA");
    let stranger = Ca::new("some other CA");
    let dir = TempDir::new("backend-tls-other-ca");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let backend = TlsBackend::start(&stranger.leaf(&["localhost", "127.0.0.1"])).await;
    let dp = Dp::start(backend_tls(ca_file, None), probed(&[backend.addr])).await;

    let (status, body) = dp.get("/secret").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "backend_unreachable", "{body}");
    assert!(backend.proxied().is_empty());
    assert!(backend.failed_handshakes() >= 1);
    // The probes fail the same way and take it out of rotation.
    let endpoint = Arc::clone(&dp.shared.active().unwrap().slots[0].endpoint);
    wait_until("the backend is marked unhealthy", || !endpoint.is_healthy()).await;
    assert!(backend.proxied().is_empty());

    // The error the proxy logs names the check that failed, and counts as a connect failure
    // (the request is handed back, unsent).
    let (parts, ()) = Request::get("/").body(()).unwrap().into_parts();
    let req = upstream::Outgoing::new(
        &parts,
        data_plane::upstream::request_body::RequestBody::empty(),
    );
    let Err((e, returned)) = upstream::send(
        &endpoint.idle,
        0,
        endpoint.authority.as_str(),
        endpoint.resolved,
        upstream::Timeouts {
            connect: Duration::from_secs(2),
            request: None,
            body_idle: None,
        },
        req,
    )
    .await
    else {
        panic!("a certificate from another CA is accepted");
    };
    let cause = e.to_string();
    assert!(e.not_sent() && returned.is_some(), "{cause}");
    assert!(
        cause.contains("TLS handshake with 127.0.0.1 failed")
            && cause.contains("invalid peer certificate"),
        "{cause}"
    );
    dp.stop().await;
}

#[tokio::test]
async fn the_name_checked_is_the_host_or_the_configured_name() {
    install_provider();
    let ca = Ca::new("backend CA");
    let dir = TempDir::new("backend-tls-names");
    let ca_file = dir.write("ca.pem", &ca.pem);
    // A certificate for a DNS name only, the backend addressed by IP.
    let backend = TlsBackend::start(&ca.leaf(&["backend.internal"])).await;

    let by_ip = Dp::start(
        backend_tls(ca_file.clone(), None),
        snapshot(&[backend.addr]),
    )
    .await;
    assert_eq!(by_ip.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    by_ip.stop().await;
    let wrong = Dp::start(
        backend_tls(ca_file.clone(), Some("other.internal")),
        snapshot(&[backend.addr]),
    )
    .await;
    assert_eq!(wrong.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    wrong.stop().await;
    assert!(backend.proxied().is_empty());

    let named = Dp::start(
        backend_tls(ca_file, Some("backend.internal")),
        snapshot(&[backend.addr]),
    )
    .await;
    assert_eq!(
        named.get("/").await,
        (StatusCode::OK, "tls-backend".to_owned())
    );
    assert_eq!(backend.proxied().len(), 1);
    named.stop().await;
}

#[tokio::test]
async fn a_failed_handshake_moves_the_request_to_another_backend() {
    install_provider();
    let ca = Ca::new("backend CA");
    let stranger = Ca::new("some other CA");
    let dir = TempDir::new("backend-tls-retry");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let bad = TlsBackend::start(&stranger.leaf(&["127.0.0.1"])).await;
    let good = TlsBackend::start(&ca.leaf(&["127.0.0.1"])).await;
    let mut config = snapshot(&[bad.addr, good.addr]);
    config.strategy = "round_robin".into();
    let dp = Dp::start(backend_tls(ca_file, None), config).await;
    for _ in 0..6 {
        assert_eq!(
            dp.get("/").await,
            (StatusCode::OK, "tls-backend".to_owned())
        );
    }
    assert!(bad.proxied().is_empty());
    assert_eq!(good.proxied().len(), 6);
    assert!(bad.failed_handshakes() >= 1);
    dp.stop().await;
}

#[test]
fn bad_settings_are_refused_naming_the_file() {
    install_provider();
    let dir = TempDir::new("backend-tls-settings");
    let ca = Ca::new("backend CA");
    let good = dir.write("ca.pem", &ca.pem);
    let empty = dir.write("empty.pem", "");
    let key_only = dir.write("key-only.pem", &ca.leaf(&["localhost"]).key_pem);
    let missing = dir.join("missing.pem");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (vec!["--backend-tls".into()], "backend_ca", "missing"),
        (
            vec![
                "--backend-tls".into(),
                "--backend-ca".into(),
                path(&missing),
            ],
            "missing.pem",
            "cannot read",
        ),
        (
            vec!["--backend-tls".into(), "--backend-ca".into(), path(&empty)],
            "empty.pem",
            "no certificate",
        ),
        (
            vec![
                "--backend-tls".into(),
                "--backend-ca".into(),
                path(&key_only),
            ],
            "key-only.pem",
            "no certificate",
        ),
        (
            vec![
                "--backend-tls".into(),
                "--backend-ca".into(),
                path(&good),
                "--backend-server-name".into(),
                "not a name".into(),
            ],
            "backend_server_name",
            "neither a DNS name",
        ),
        (
            vec![
                "--redis".into(),
                "rediss://127.0.0.1:1".into(),
                "--redis-ca".into(),
                path(&empty),
            ],
            "empty.pem",
            "no certificate",
        ),
        (
            vec![
                "--redis".into(),
                "redis://127.0.0.1:1".into(),
                "--redis-ca".into(),
                path(&good),
            ],
            "redis_ca",
            "not a rediss:// URL",
        ),
    ];
    for (args, named, reason) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = run_binary(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named) && stderr.contains(reason),
            "{args:?}: {stderr}"
        );
    }

    // The environment and the file say the same.
    let (code, stderr) = run_binary(&[], &[("LB_BACKEND_TLS", "true")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("backend_ca: missing"), "{stderr}");
    let (code, stderr) = run_binary(
        &[],
        &[("LB_BACKEND_TLS", "1"), ("LB_BACKEND_CA", &path(&missing))],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");
    let toml = dir.write(
        "dp.toml",
        &format!(
            "backend_tls = true\nbackend_ca = {:?}\nbackend_server_name = \"backends.internal\"\n",
            path(&good)
        ),
    );
    let s = Settings::load(data_plane::Args {
        config: Some(toml),
        ..Default::default()
    })
    .unwrap();
    let b = s.backend_tls.unwrap();
    assert_eq!(b.ca, Some(good));
    assert_eq!(b.server_name.unwrap().to_str(), "backends.internal");

    // Settings made in code are checked too: the data plane will not run on them.
    let shared = data_plane::Shared::new(Settings {
        backend_tls: Some(BackendTlsSettings {
            all: true,
            ca: Some(missing.clone()),
            server_name: None,
        }),
        ..Settings::default()
    });
    let e = shared.tls_error().expect("refused").to_string();
    assert!(e.contains("backend_ca") && e.contains("missing.pem"), "{e}");
    let e = shared
        .prepare(snapshot(&["127.0.0.1:1".parse().unwrap()]))
        .err()
        .expect("no configuration without its backend TLS")
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
}
