//! Whom the OTLP client trusts: the platform's roots plus an optional CA file, through rustls
//! with ring.
//!
//! One client configuration serves gRPC and HTTP alike (hyper-rustls does the handshake for
//! both, so tonic carries no TLS stack of its own).

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// Reads the extra CA file: every certificate in it, each checked to be one rustls can use as
/// a trust anchor. Errors say what is wrong with the file, never quote it.
pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it ({})", e.kind()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "not PEM (expected -----BEGIN CERTIFICATE----- blocks)".to_owned())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    let mut probe = RootCertStore::empty();
    for cert in &certs {
        probe
            .add(cert.clone())
            .map_err(|_| "holds a certificate that is not a usable X.509 CA".to_owned())?;
    }
    Ok(certs)
}

/// The rustls client configuration: the platform's roots (those it can parse; a platform store
/// with one odd entry should not stop exports) and then the extra CAs.
pub(crate) fn client_config(
    extra: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if !native.errors.is_empty() || ignored > 0 {
        tracing::debug!(
            added,
            ignored,
            errors = native.errors.len(),
            "some platform root certificates could not be used"
        );
    }
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|_| "caFile: holds a certificate that is not a usable X.509 CA".to_owned())?;
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA: the platform has none and caFile is not set; set caFile".to_owned(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| "the ring provider offers no TLS version".to_owned())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
