//! TLS as a client: to backends (`https://` backends, and every backend with `backend_tls`),
//! and the trust roots of a `rediss://` Redis (`redis_ca`).
//!
//! Backend certificates are checked against the CA file of `backend_ca` when it is set. With
//! `backend_tls` it is required and the system's roots are never used: those backends are the
//! operator's own services, usually under a private CA, and trusting every public CA as well
//! would let anyone with a public certificate for the name stand in for a backend. An
//! `https://` backend with no `backend_ca` is checked against the system's roots, as a browser
//! would (a public service named by its URL). The name checked is `backend_server_name` when set
//! (backends addressed by IP under one certificate name), else each backend's host: a DNS name
//! (also sent as SNI), or an IP address matched against the certificate's IP SANs.
//!
//! ALPN: `https://` backends are offered `h2` then `http/1.1`, and spoken to in what they pick;
//! plain backends under `backend_tls` are offered `http/1.1` only (they were named as HTTP/1.1).
//!
//! One client configuration serves every backend and worker: its session cache lets reconnects
//! resume instead of running a full handshake, at the cost of one short lock per new connection
//! (never per request).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::TlsError;

/// ALPN offered to backends named as HTTP/1.1 under `backend_tls`.
const HTTP1_ALPN: &[&[u8]] = &[b"http/1.1"];
/// ALPN offered to `https://` backends, in order of preference.
const HTTPS_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The `backend_tls`, `backend_ca` and `backend_server_name` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendTlsSettings {
    /// TLS to every backend (`backend_tls`), not only to `https://` ones.
    pub all: bool,
    /// PEM file of the CA certificates backend certificates must chain to; none: the system's
    /// roots (`https://` backends only).
    pub ca: Option<PathBuf>,
    /// Name every backend certificate is checked against, instead of the backend's host.
    pub server_name: Option<ServerName<'static>>,
}

/// CA certificates read from a PEM file: the file's bytes and the parsed trust anchors.
pub struct Roots {
    pub pem: Vec<u8>,
    pub store: RootCertStore,
}

/// Reads a PEM file of CA certificates for `setting`, refusing a file that cannot be read,
/// holds no certificate, or holds one that cannot serve as a trust anchor.
pub fn read_roots(setting: &'static str, path: &Path) -> Result<Roots, TlsError> {
    let err = |problem: String| TlsError {
        setting,
        path: path.to_owned(),
        problem,
    };
    let pem = super::read_bounded(path).map_err(err)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks)".to_owned(),
        ));
    }
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            err(format!(
                "certificate {} is not usable as a CA certificate: {e}",
                i + 1
            ))
        })?;
    }
    Ok(Roots { pem, store })
}

/// Reads a `backend_server_name` value.
pub fn parse_server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| format!("{name:?} is neither a DNS name nor an IP address"))
}

/// The client side of TLS to backends: the configurations shared by every connection (one per
/// ALPN offer) and the name override.
pub struct BackendTls {
    http1: TlsConnector,
    https: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl BackendTls {
    /// Reads the CA file (or the system's roots when there is none) and builds the
    /// configurations: TLS 1.3 and 1.2, the default in-memory session cache for resumption.
    pub fn load(settings: &BackendTlsSettings) -> Result<BackendTls, TlsError> {
        let (roots, source) = match &settings.ca {
            Some(ca) => (read_roots("backend_ca", ca)?.store, ca.clone()),
            None => (system_roots()?, PathBuf::from("(the system's roots)")),
        };
        let config = |alpn: &[&[u8]]| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| TlsError {
                    setting: "backend_ca",
                    path: source.clone(),
                    problem: format!("cannot build the TLS configuration: {e}"),
                })?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(BackendTls {
            http1: config(HTTP1_ALPN)?,
            https: config(HTTPS_ALPN)?,
            server_name: settings.server_name.clone(),
        })
    }

    /// The connector and the name to verify for the backend at `address` (`host:port`):
    /// offering HTTP/2 as well (`https://` backends) or HTTP/1.1 only.
    pub fn for_backend(
        &self,
        address: &str,
        offer_h2: bool,
    ) -> Result<(TlsConnector, ServerName<'static>), String> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let host = address
                    .rsplit_once(':')
                    .map_or(address, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                ServerName::try_from(host.to_owned()).map_err(|_| {
                    format!(
                        "backend {address}: {host:?} cannot be checked in a certificate (not a \
                         DNS name or IP address); set backend_server_name"
                    )
                })?
            }
        };
        let connector = if offer_h2 { &self.https } else { &self.http1 };
        Ok((connector.clone(), name))
    }
}

/// The system's trust roots (the platform's certificate store, `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` honoured), refused when there are none.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(TlsError {
            setting: "backend_ca",
            path: PathBuf::from("(the system's roots)"),
            problem: format!(
                "no usable trust root on this system ({why}); set backend_ca for https:// backends"
            ),
        });
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dp-tls-client-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn roots_are_refused_naming_the_setting_and_file() {
        let dir = scratch("roots");
        let err = |path: &Path| read_roots("backend_ca", path).err().unwrap().to_string();

        let missing = dir.join("missing.pem");
        let e = err(&missing);
        assert!(
            e.starts_with("backend_ca ") && e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = err(&empty);
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let key_only = dir.join("key.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_only, key.serialize_pem()).unwrap();
        let e = err(&key_only);
        assert!(e.contains("key.pem") && e.contains("no certificate"), "{e}");
        let bad_der = dir.join("bad.pem");
        std::fs::write(
            &bad_der,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = err(&bad_der);
        assert!(e.contains("bad.pem") && e.contains("certificate 1"), "{e}");

        let good = dir.join("ca.pem");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&good, p.self_signed(&key).unwrap().pem()).unwrap();
        let roots = read_roots("redis_ca", &good).unwrap();
        assert_eq!(roots.store.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_name_checked_is_the_host_or_the_override() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = scratch("names");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, p.self_signed(&key).unwrap().pem()).unwrap();
        let mut settings = BackendTlsSettings {
            all: true,
            ca: Some(ca),
            server_name: None,
        };
        let tls = BackendTls::load(&settings).unwrap();
        let name =
            |tls: &BackendTls, a: &str| tls.for_backend(a, false).map(|(_, n)| n.to_str().into_owned());
        assert_eq!(name(&tls, "api.internal:443").unwrap(), "api.internal");
        assert_eq!(name(&tls, "10.0.0.7:8443").unwrap(), "10.0.0.7");
        assert_eq!(name(&tls, "[::1]:8443").unwrap(), "::1");
        let e = name(&tls, "bad_host!:80").unwrap_err();
        assert!(e.contains("backend_server_name"), "{e}");

        settings.server_name = Some(parse_server_name("backends.internal").unwrap());
        let tls = BackendTls::load(&settings).unwrap();
        assert_eq!(name(&tls, "10.0.0.7:8443").unwrap(), "backends.internal");
        assert!(parse_server_name("not a name").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
