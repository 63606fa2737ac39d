//! TLS as a client: to backends (`backend_tls`), and the trust roots of a `rediss://` Redis
//! (`redis_ca`).
//!
//! Backend certificates are checked against the CA file of `backend_ca` only, never the system's
//! roots: backends are the operator's own services, usually under a private CA, and trusting
//! every public CA as well would let anyone with a public certificate for the name stand in for
//! a backend. The name checked is `backend_server_name` when set (backends addressed by IP under
//! one certificate name), else each backend's host: a DNS name (also sent as SNI), or an IP
//! address matched against the certificate's IP SANs.
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

/// ALPN offered to backends: the pool speaks HTTP/1.1 only.
const BACKEND_ALPN: &[u8] = b"http/1.1";

/// The `backend_ca` and `backend_server_name` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTlsSettings {
    /// PEM file of the CA certificates backend certificates must chain to.
    pub ca: PathBuf,
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

/// The client side of TLS to backends: the configuration shared by every connection and the
/// name override.
pub struct BackendTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl BackendTls {
    /// Reads the CA file and builds the configuration: TLS 1.3 and 1.2, ALPN http/1.1, the
    /// default in-memory session cache for resumption.
    pub fn load(settings: &BackendTlsSettings) -> Result<BackendTls, TlsError> {
        let roots = read_roots("backend_ca", &settings.ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError {
                setting: "backend_ca",
                path: settings.ca.clone(),
                problem: format!("cannot build the TLS configuration: {e}"),
            })?
            .with_root_certificates(roots.store)
            .with_no_client_auth();
        config.alpn_protocols = vec![BACKEND_ALPN.to_vec()];
        Ok(BackendTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: settings.server_name.clone(),
        })
    }

    /// The connector and the name to verify for the backend at `address` (`host:port`).
    pub fn for_backend(
        &self,
        address: &str,
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
        Ok((self.connector.clone(), name))
    }
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
            ca,
            server_name: None,
        };
        let tls = BackendTls::load(&settings).unwrap();
        let name =
            |tls: &BackendTls, a: &str| tls.for_backend(a).map(|(_, n)| n.to_str().into_owned());
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
