//! Certificates for TLS tests, made with rcgen: a CA, server certificates it signs, written as
//! PEM files to a scratch directory, and a TLS client connection trusting the CA. Shared by the
//! data plane's and the control plane's tests.

#![allow(dead_code)]

// Each support file can be used on its own, so each that needs these loads them.
#[allow(clippy::duplicate_mod)]
#[path = "common.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;

pub use common::TempDir;

use data_plane::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A server certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// The certificate, DER: what a client sees the server present.
    pub fn der(&self) -> CertificateDer<'static> {
        der(&self.cert_pem)
    }
}

/// Year, month, day.
pub type Date = (i32, u8, u8);

/// The first certificate in `pem`, DER.
pub fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A trust store holding this CA only.
    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(der(&self.pem)).unwrap();
        Arc::new(roots)
    }

    /// A server certificate for `names` (DNS names, or IP addresses as IP SANs).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, None, None)
    }

    /// A certificate for `names` that serves as client and server both, as the nodes of a
    /// Redis Cluster over TLS need (each connects to the others' bus with it).
    pub fn peer_leaf(&self, names: &[&str]) -> Leaf {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        self.issue(names, None, None, &[ServerAuth, ClientAuth])
    }

    /// A client certificate for `names` (DNS names): what a data plane presents to a control
    /// plane checking client certificates.
    pub fn client_leaf(&self, names: &[&str]) -> Leaf {
        self.issue(names, None, None, &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// As [`Ca::leaf`], with this serial number and, when given, valid from the first date to
    /// the second.
    pub fn leaf_with(
        &self,
        names: &[&str],
        serial: Option<u8>,
        validity: Option<(Date, Date)>,
    ) -> Leaf {
        self.issue(
            names,
            serial,
            validity,
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    fn issue(
        &self,
        names: &[&str],
        serial: Option<u8>,
        validity: Option<(Date, Date)>,
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, "test server");
        p.extended_key_usages = usages.to_vec();
        if let Some(serial) = serial {
            p.serial_number = Some(SerialNumber::from_slice(&[serial]));
        }
        if let Some((b, a)) = validity {
            p.not_before = rcgen::date_time_ymd(b.0, b.1, b.2);
            p.not_after = rcgen::date_time_ymd(a.0, a.1, a.2);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Makes ring the process's rustls provider (once; later calls change nothing), for the
/// libraries that take the process default.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TempDir {
    /// Writes a certificate and its key as `cert.pem` and `key.pem`.
    pub fn install(&self, leaf: &Leaf) -> TlsFiles {
        TlsFiles {
            key: self.write("key.pem", &leaf.key_pem),
            cert: self.write("cert.pem", &leaf.cert_pem),
        }
    }
}

/// A TLS connection to `addr` for the name `localhost`, offering `alpn` and `versions`,
/// trusting `roots`. Every connection does a full handshake (no resumption), so each one shows
/// the certificate in use.
pub async fn tls_connect(
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
    config.resumption = rustls::client::Resumption::disabled();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}
