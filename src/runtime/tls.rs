//! The serving certificate: loading, validating and reloading it, and the TLS settings.
//!
//! The API server speaks HTTP/1.1 over TLS to webhooks, so the configuration offers TLS 1.3 and
//! 1.2 only, ALPN `http/1.1` only, and the `ring` provider (no C toolchain beyond `cc`, no
//! OpenSSL). With `--client-ca`, a client must present a certificate signed by that CA.
//!
//! Reloading swaps the whole [`ServerConfig`]: each new connection takes the current one, and
//! connections already open keep theirs. A new certificate/key pair (or CA) is built and checked
//! completely before it replaces the old one, so a half-written or mismatched pair is refused and
//! the last good configuration stays. Checks: the PEM parses, the key is the certificate's, and
//! the certificate is valid now (after its notBefore, before its notAfter). The pair is never logged; errors name the file, not its
//! contents.
//!
//! A certificate refused only because it is not valid yet is read again at the next poll even
//! though the files did not change: time alone makes it servable (an issuer whose clock runs a
//! little ahead of ours), and the files may not change again before the old one expires.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::reload::{Change, FileSet};

/// The only application protocol offered: the API server calls webhooks over HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Where the serving identity comes from.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Why a certificate, key or CA cannot be served; each message names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {reason}")]
    Read {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("--tls-cert {path}: no PEM certificate in the file")]
    NoCertificate { path: String },
    #[error("--tls-cert {path}: not a valid X.509 certificate: {reason}")]
    BadCertificate { path: String, reason: String },
    #[error("--tls-cert {path}: the certificate expired (notAfter {not_after})")]
    Expired { path: String, not_after: String },
    #[error("--tls-cert {path}: the certificate is not valid yet (notBefore {not_before})")]
    NotYetValid { path: String, not_before: String },
    #[error("--tls-key {path}: no usable PEM private key: {reason}")]
    BadKey { path: String, reason: String },
    #[error("--tls-key {key} is not the key of the certificate in --tls-cert {cert}")]
    Mismatch { cert: String, key: String },
    #[error("--client-ca {path}: {reason}")]
    ClientCa { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A validated configuration and what the metrics report about it.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) config: Arc<ServerConfig>,
    /// The certificate's notAfter, in seconds since the Unix epoch.
    pub(crate) not_after: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What a reload attempt did.
#[derive(Debug)]
pub(crate) enum Reload {
    Unchanged,
    Applied {
        not_after: i64,
    },
    /// The new files were refused; the previous configuration is still served.
    Refused(String),
}

/// The configuration being served, and the files it came from.
pub(crate) struct TlsStore {
    paths: TlsPaths,
    files: Mutex<FileSet>,
    current: RwLock<Identity>,
}

impl TlsStore {
    /// Reads and validates the files; fails (before anything is bound) if they cannot be served.
    pub(crate) fn load(paths: TlsPaths) -> Result<TlsStore, TlsError> {
        let mut files = FileSet::new(file_list(&paths));
        let contents = files.read().map_err(|(path, e)| TlsError::Read {
            flag: flag_of(&paths, &path),
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let identity = build(&paths, &contents)?;
        Ok(TlsStore {
            paths,
            files: Mutex::new(files),
            current: RwLock::new(identity),
        })
    }

    /// An acceptor for one new connection, with the configuration current now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.identity().config)
    }

    pub(crate) fn identity(&self) -> Identity {
        // A poisoned lock still holds a complete Identity: writers only assign.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files and switches to them if they changed and are valid.
    pub(crate) fn reload(&self) -> Reload {
        let change = self.files.lock().unwrap_or_else(|e| e.into_inner()).poll();
        match change {
            Change::Unchanged => Reload::Unchanged,
            Change::Unreadable(reason) => Reload::Refused(reason),
            Change::Changed(contents) => match build(&self.paths, &contents) {
                Ok(identity) => {
                    let not_after = identity.not_after;
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = identity;
                    Reload::Applied { not_after }
                }
                Err(e) => {
                    if matches!(e, TlsError::NotYetValid { .. }) {
                        self.files
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .forget();
                    }
                    Reload::Refused(e.to_string())
                }
            },
        }
    }
}

fn file_list(paths: &TlsPaths) -> Vec<PathBuf> {
    let mut list = vec![paths.cert.clone(), paths.key.clone()];
    list.extend(paths.client_ca.clone());
    list
}

fn flag_of(paths: &TlsPaths, path: &PathBuf) -> &'static str {
    if *path == paths.cert {
        "--tls-cert"
    } else if *path == paths.key {
        "--tls-key"
    } else {
        "--client-ca"
    }
}

/// Builds the server configuration from the contents of the cert, key and (optional) CA files.
fn build(paths: &TlsPaths, contents: &[Vec<u8>]) -> Result<Identity, TlsError> {
    let cert_path = paths.cert.display().to_string();
    let key_path = paths.key.display().to_string();
    let chain = CertificateDer::pem_slice_iter(&contents[0])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
        path: cert_path.clone(),
    })?;
    let not_after = check_validity(&cert_path, leaf)?;
    let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| TlsError::BadKey {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&paths.client_ca, contents.get(2)) {
        (Some(ca_path), Some(ca_pem)) => {
            builder.with_client_cert_verifier(client_verifier(ca_path, ca_pem, provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert_path.clone(),
            key: key_path.clone(),
        },
        other => TlsError::BadKey {
            path: key_path.clone(),
            reason: other.to_string(),
        },
    })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Identity {
        config: Arc::new(config),
        not_after,
    })
}

/// Parses the leaf certificate and refuses one that is not valid now; returns its notAfter.
fn check_validity(path: &str, leaf: &CertificateDer<'_>) -> Result<i64, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now().timestamp();
    if validity.not_before.timestamp() > now {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
        });
    }
    if validity.not_after.timestamp() < now {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(validity.not_after.timestamp())
}

fn client_verifier(
    path: &std::path::Path,
    pem: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let shown = path.display().to_string();
    let bad = |reason: String| TlsError::ClientCa {
        path: shown.clone(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rcgen::{CertificateParams, KeyPair};
    use time::{Duration, OffsetDateTime};

    use super::*;

    /// A self-signed certificate for localhost valid from `from` to `until` (from now), and its
    /// key, both PEM.
    fn certificate(from: Duration, until: Duration) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let now = OffsetDateTime::now_utc();
        params.not_before = now + from;
        params.not_after = now + until;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, (cert, key): &(String, String)) -> TlsPaths {
        let paths = TlsPaths {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: None,
        };
        std::fs::write(&paths.cert, cert).unwrap();
        std::fs::write(&paths.key, key).unwrap();
        paths
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_certificate_not_valid_yet_is_refused_at_startup_naming_the_flag() {
        let dir = temp_dir("startup");
        let paths = write(&dir, &certificate(Duration::days(1), Duration::days(30)));
        let error = TlsStore::load(paths).err().expect("refused").to_string();
        assert!(error.starts_with("--tls-cert "), "{error}");
        assert!(error.contains("not valid yet (notBefore"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reload_to_a_certificate_not_valid_yet_keeps_the_last_good_one_and_retries() {
        let dir = temp_dir("reload");
        let good = certificate(Duration::days(-1), Duration::days(30));
        let paths = write(&dir, &good);
        let store = TlsStore::load(paths).unwrap();
        let served = store.identity().not_after;

        write(&dir, &certificate(Duration::days(1), Duration::days(60)));
        for _ in 0..2 {
            // Read again at every poll: only time has to change for it to become servable.
            match store.reload() {
                Reload::Refused(reason) => assert!(reason.contains("not valid yet"), "{reason}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(store.identity().not_after, served);
        }

        // An expired one is refused once: time cannot fix it.
        write(&dir, &certificate(Duration::days(-30), Duration::days(-1)));
        assert!(matches!(store.reload(), Reload::Refused(r) if r.contains("expired")));
        assert!(matches!(store.reload(), Reload::Unchanged));

        write(&dir, &good);
        assert!(matches!(store.reload(), Reload::Applied { not_after } if not_after == served));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
