//! TLS on the proxy listener: the certificate and key files, their checks, and reloading them
//! without a restart. The control plane serves its gRPC and HTTP listeners with the same [`Tls`].
//!
//! The certificate in use sits behind an `ArcSwap` that the rustls resolver reads on every
//! handshake, so a reload is one pointer swap: handshakes after it present the new certificate,
//! and connections already open keep the session they negotiated. A reload that fails (missing
//! file, bad PEM, key not matching, certificate expired) changes nothing but a counter and a log
//! line; the previous certificate stays in use. Reloads happen on SIGHUP and when either file's
//! modification time, size or inode changes, polled every [`POLL`], which needs no file-watching
//! dependency and also sees the symlink swaps that Kubernetes uses for mounted secrets.
//!
//! The handshake itself runs on the proxy worker that accepted the connection (see the crate's
//! `worker`), bounded by the header timeout.
//!
//! [`client`] holds the other direction: TLS to backends and the CA file of a `rediss://` Redis.

pub mod client;
pub mod x509;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::telemetry::metrics::TlsMetrics;
pub use x509::CertInfo;

/// How often the files are checked for changes.
pub const POLL: Duration = Duration::from_secs(2);
/// Largest certificate or key file read: far above any real chain, a bound against pointing
/// the setting at something that never ends.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// ALPN, in order of preference; the server detects the protocol from the first bytes anyway.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The two files of the `tls_cert` and `tls_key` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// Why a certificate or key cannot be used, naming the setting and the file.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {}: {problem}", path.display())]
pub struct TlsError {
    pub setting: &'static str,
    pub path: PathBuf,
    pub problem: String,
}

/// A certificate chain and key that passed every check.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Unix seconds of a wall-clock time (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Reads and checks both files: PEM, a certificate, a key, the key matching the certificate,
/// and the certificate valid at `now` (Unix seconds).
pub fn load(files: &TlsFiles, now: i64) -> Result<Loaded, TlsError> {
    let cert_err = |problem: String| TlsError {
        setting: "tls_cert",
        path: files.cert.clone(),
        problem,
    };
    let key_err = |problem: String| TlsError {
        setting: "tls_key",
        path: files.key.clone(),
        problem,
    };
    let cert_pem = read_bounded(&files.cert).map_err(cert_err)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM file: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err(
            "no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks)".to_owned(),
        ));
    };
    let info = x509::parse(leaf).map_err(|e| cert_err(e.to_owned()))?;
    if now < info.not_before.unix {
        return Err(cert_err(format!(
            "the certificate is not valid before {}",
            info.not_before.text
        )));
    }
    if now > info.not_after.unix {
        return Err(cert_err(format!(
            "the certificate expired at {}",
            info.not_after.text
        )));
    }
    let key_pem = read_bounded(&files.key).map_err(key_err)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => key_err(
            "no private key in the file (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \
             \"EC PRIVATE KEY\")"
                .to_owned(),
        ),
        e => key_err(format!("not a PEM file: {e}")),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("not a usable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // A key type whose public half rustls cannot compute is accepted: the handshake is the
        // check then.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(key_err(format!(
                "the key does not match the certificate in {}",
                files.cert.display()
            )));
        }
        Err(e) => {
            return Err(cert_err(format!(
                "cannot read the certificate's public key: {e}"
            )));
        }
    }
    Ok(Loaded {
        key: Arc::new(certified),
        info,
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(buf)
}

/// What tells a file changed: modification time, size and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

impl TlsMetrics {
    /// The metrics of a TLS listener under `prefix` (`lb_tls` gives `lb_tls_reloads_total`,
    /// `lb_tls_certificate_expiry_timestamp_seconds`, `lb_tls_handshake_failures_total`), registered in
    /// `registry`; `of` names the listener in their help texts.
    pub fn register(
        registry: &prometheus::Registry,
        prefix: &str,
        of: &str,
    ) -> prometheus::Result<TlsMetrics> {
        use prometheus::{IntCounterVec, IntGauge, Opts};
        let reloads = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_reloads_total"),
                format!("Certificate reloads of {of}, by result (ok or error)"),
            ),
            &["result"],
        )?;
        let expiry = IntGauge::new(
            format!("{prefix}_certificate_expiry_timestamp_seconds"),
            format!("Expiry (notAfter) of the certificate in use by {of}, in Unix seconds"),
        )?;
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_handshake_failures_total"),
                format!(
                    "Client TLS handshakes with {of} that failed, by reason (error or timeout)"
                ),
            ),
            &["reason"],
        )?;
        for label in ["ok", "error"] {
            reloads.with_label_values(&[label]);
        }
        for label in ["error", "timeout"] {
            handshake_failures.with_label_values(&[label]);
        }
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        Ok(TlsMetrics {
            reloads,
            expiry,
            handshake_failures,
        })
    }
}

/// Hands rustls the certificate in use, for every handshake.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS side of the proxy listener: the server configuration, the certificate in use and
/// its reloading.
pub struct Tls {
    files: TlsFiles,
    resolver: Arc<CertResolver>,
    config: Arc<ServerConfig>,
    metrics: TlsMetrics,
    /// The files' stamps at the last load attempt, successful or not; held during a reload so
    /// that reloads run one at a time.
    seen: Mutex<[Option<Stamp>; 2]>,
    info: Mutex<CertInfo>,
    /// Counts reload attempts, for those waiting on one.
    attempts: watch::Sender<u64>,
}

impl Tls {
    /// Loads the files and builds the server configuration: TLS 1.3 and 1.2, ALPN h2 and
    /// http/1.1, stateless session tickets.
    pub fn load(files: TlsFiles, metrics: TlsMetrics) -> Result<Tls, TlsError> {
        let seen = [stamp(&files.cert), stamp(&files.key)];
        let loaded = load(&files, unix_seconds(SystemTime::now()))?;
        let resolver = Arc::new(CertResolver {
            current: ArcSwap::new(loaded.key),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError {
                setting: "tls_cert",
                path: files.cert.clone(),
                problem: format!("cannot build the TLS configuration: {e}"),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // Stateless tickets: resumption without a session cache locked by every worker.
        match rustls::crypto::ring::Ticketer::new() {
            Ok(t) => config.ticketer = t,
            Err(e) => tracing::warn!(cause = %e, "TLS session tickets are off"),
        }
        metrics.expiry.set(loaded.info.not_after.unix);
        tracing::info!(
            cert = %files.cert.display(),
            serial = %loaded.info.serial,
            not_after = %loaded.info.not_after.text,
            "TLS certificate loaded"
        );
        Ok(Tls {
            files,
            resolver,
            config: Arc::new(config),
            metrics,
            seen: Mutex::new(seen),
            info: Mutex::new(loaded.info),
            attempts: watch::channel(0).0,
        })
    }

    /// An acceptor presenting the certificate in use at each handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// As [`Tls::acceptor`], offering only the protocols in `alpn`, for a listener that speaks
    /// fewer than the proxy. It shares the certificate in use, so reloads reach it too.
    pub fn acceptor_with_alpn(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        let mut config = ServerConfig::clone(&self.config);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }

    /// As [`Tls::acceptor_with_alpn`], asking clients for a certificate chained to `roots`
    /// (mutual TLS): one that presents an untrusted certificate is refused at the handshake;
    /// one that presents none is accepted, and its calls need another credential. It shares the
    /// certificate in use, so reloads reach it too.
    pub fn acceptor_verifying_clients(
        &self,
        alpn: &[&[u8]],
        roots: rustls::RootCertStore,
    ) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let refuse = |problem: String| TlsError {
            setting: "client_ca",
            path: self.files.cert.clone(),
            problem,
        };
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| refuse(format!("cannot check client certificates: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| refuse(format!("cannot build the TLS configuration: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::clone(&self.resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.ticketer = Arc::clone(&self.config.ticketer);
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Serial number and validity of the certificate in use.
    pub fn certificate(&self) -> CertInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts reload attempts; changes after each one.
    pub fn attempts(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    /// Reads both files again and, if they pass every check, puts them in use for new
    /// handshakes. On failure the current certificate stays; the error is logged and counted.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        *seen = [stamp(&self.files.cert), stamp(&self.files.key)];
        let result = load(&self.files, unix_seconds(SystemTime::now()));
        let outcome = match result {
            Ok(loaded) => {
                self.resolver.current.store(loaded.key);
                self.metrics.expiry.set(loaded.info.not_after.unix);
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    cert = %self.files.cert.display(),
                    serial = %loaded.info.serial,
                    not_after = %loaded.info.not_after.text,
                    "TLS certificate reloaded"
                );
                *self.info.lock().unwrap_or_else(|e| e.into_inner()) = loaded.info;
                Ok(())
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(cause = %e, "TLS certificate reload failed; the current one stays in use");
                Err(e)
            }
        };
        drop(seen);
        self.attempts.send_modify(|n| *n += 1);
        outcome
    }

    /// Whether either file changed since the last load attempt.
    fn files_changed(&self) -> bool {
        let now = [stamp(&self.files.cert), stamp(&self.files.key)];
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    /// Reloads on SIGHUP and when a file changes, until `stop` turns true.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(cause = %e, "no certificate reload on SIGHUP"))
            .ok();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = poll.tick() => false,
                _ = hup => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            let tls = Arc::clone(&self);
            // File reads block; keep them off the event loop.
            let _ = tokio::task::spawn_blocking(move || {
                if forced || tls.files_changed() {
                    let _ = tls.reload();
                }
            })
            .await;
        }
    }

    /// Counts a failed client handshake.
    pub fn handshake_failed(&self, timeout: bool) {
        let reason = if timeout { "timeout" } else { "error" };
        self.metrics
            .handshake_failures
            .with_label_values(&[reason])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scratch::Dir;

    fn cert(
        before: (i32, u8, u8),
        after: (i32, u8, u8),
        key: &rcgen::KeyPair,
    ) -> (String, x509::CertInfo) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.not_before = rcgen::date_time_ymd(before.0, before.1, before.2);
        p.not_after = rcgen::date_time_ymd(after.0, after.1, after.2);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0xab]));
        let c = p.self_signed(key).unwrap();
        let info = x509::parse(c.der()).unwrap();
        (c.pem(), info)
    }

    #[test]
    fn validity_is_read_from_real_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let (_, info) = cert((2020, 1, 2), (2049, 12, 31), &key);
        assert_eq!(info.not_before.text, "2020-01-02T00:00:00Z");
        assert_eq!(info.not_before.unix, 1_577_923_200);
        assert_eq!(info.not_after.text, "2049-12-31T00:00:00Z");
        assert_eq!(info.serial, "01ab");
        // From 2050 on, the other time form.
        let (_, info) = cert((1975, 1, 1), (4096, 1, 1), &key);
        assert_eq!(info.not_after.text, "4096-01-01T00:00:00Z");
        assert_eq!(info.not_before.text, "1975-01-01T00:00:00Z");
    }

    #[test]
    fn load_checks_every_part() {
        let dir = Dir::new("tls-load");
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let (pem, _) = cert((2020, 1, 1), (2030, 1, 1), &key);
        let files = TlsFiles {
            cert: dir.write("cert.pem", &pem),
            key: dir.write("key.pem", &key.serialize_pem()),
        };
        let mid_2025 = 1_750_000_000;
        load(&files, mid_2025).unwrap();
        let err = |files: &TlsFiles, now| load(files, now).err().unwrap().to_string();

        let e = err(&files, 1_500_000_000);
        assert!(
            e.contains("cert.pem") && e.contains("not valid before 2020"),
            "{e}"
        );
        let e = err(&files, 2_000_000_000);
        assert!(
            e.contains("cert.pem") && e.contains("expired at 2030"),
            "{e}"
        );

        let wrong = TlsFiles {
            key: dir.write("other.pem", &other.serialize_pem()),
            ..files.clone()
        };
        let e = err(&wrong, mid_2025);
        assert!(
            e.contains("tls_key") && e.contains("other.pem") && e.contains("does not match"),
            "{e}"
        );

        let swapped = TlsFiles {
            cert: files.key.clone(),
            key: files.cert.clone(),
        };
        let e = err(&swapped, mid_2025);
        assert!(
            e.contains("tls_cert") && e.contains("no certificate"),
            "{e}"
        );
        let no_key = TlsFiles {
            key: files.cert.clone(),
            ..files.clone()
        };
        let e = err(&no_key, mid_2025);
        assert!(e.contains("tls_key") && e.contains("no private key"), "{e}");

        let garbage = TlsFiles {
            cert: dir.write("garbage.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n"),
            ..files.clone()
        };
        let e = err(&garbage, mid_2025);
        assert!(e.contains("garbage.pem"), "{e}");
        let bad_der = TlsFiles {
            cert: dir.write(
                "bad-der.pem",
                "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
            ),
            ..files.clone()
        };
        let e = err(&bad_der, mid_2025);
        assert!(
            e.contains("bad-der.pem") && e.contains("certificate"),
            "{e}"
        );
        let missing = TlsFiles {
            cert: dir.0.join("missing.pem"),
            ..files.clone()
        };
        let e = err(&missing, mid_2025);
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
    }
}
