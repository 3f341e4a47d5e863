//! Generating a CA and a serving certificate for installs without cert-manager, and for `serve --dev`.
//!
//! The API server only talks to a webhook over TLS, and checks the serving certificate against
//! the `caBundle` in the webhook configuration. Without cert-manager someone has to make that CA:
//! `lightstep-tekton-webhook certs` does, once, with a fresh key pair (ECDSA P-256) for the CA
//! and another for the server. The CA lives exactly as long as the serving certificate it signs;
//! rotation is "run `certs` again and re-apply the overlay", which replaces both, so there is no
//! long-lived CA key to guard. Because kubelet delivers the new Secret to the pods a minute or two
//! after the API server sees the new `caBundle`, the bundle keeps the previous run's CA as well
//! for one round. The CA key is still written (`ca.key`, mode 0600) for teams that want to sign
//! a replacement serving certificate themselves; it never needs to reach the cluster.
//!
//! Files are written to a temporary name and renamed into place, so a server watching the
//! directory never reads half a certificate.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File names inside a certificate directory. `tls.crt`/`tls.key` are the names Kubernetes uses
/// for a `kubernetes.io/tls` Secret, so the directory can become one unchanged.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The kustomize patch source the self-signed overlay reads the `caBundle` from.
pub const CA_BUNDLE_FILE: &str = "ca-bundle.yaml";

/// Certificates are back-dated by this much so a node whose clock runs a little behind the
/// machine that ran `certs` does not see a certificate from the future.
const BACKDATE: Duration = Duration::minutes(5);

/// Lifetime of the development certificates `serve --dev` creates: long enough not to bother
/// anyone during development, short enough not to be mistaken for a production credential.
const DEV_VALIDITY_DAYS: u32 = 90;

/// Default lifetime of `certs` output: one year, the usual rotation interval for cluster-internal
/// serving certificates (cert-manager's overlay renews on its own schedule instead).
const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// Upper bound on `--days`: ten years. Beyond that the number is almost certainly a typo.
const MAX_VALIDITY_DAYS: u32 = 3650;

/// A CA and a serving certificate it signed, all PEM.
#[derive(Clone)]
pub struct Bundle {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Bundle {
    // Private keys stay out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("ca_key_pem", &"<redacted>")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Bundle {
    /// The webhook configuration's `caBundle`: the CA certificate PEM, base64 (standard alphabet).
    pub fn ca_bundle(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.ca_cert_pem.as_bytes())
    }
}

/// Why certificates could not be made or written. The message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("at least one DNS name or IP address is needed for the serving certificate")]
    NoNames,
    #[error("{name:?} is not a valid DNS name or IP address: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("--days must be between 1 and {MAX_VALIDITY_DAYS}, not {0}")]
    InvalidValidity(u32),
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: cannot create the directory: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn generate_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> CertError {
    move |source| CertError::Generate { what, source }
}

/// The names the API server may use for a Service: it connects to `<svc>.<ns>.svc`, and the
/// others cover clients inside the cluster that use a shorter or the fully qualified form.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Makes a fresh CA and a serving certificate for `sans` (DNS names or IP literals) signed by it,
/// both valid for `validity_days` from now.
pub fn generate(sans: &[String], validity_days: u32) -> Result<Bundle, CertError> {
    if sans.is_empty() {
        return Err(CertError::NoNames);
    }
    if validity_days == 0 || validity_days > MAX_VALIDITY_DAYS {
        return Err(CertError::InvalidValidity(validity_days));
    }
    let subject_alt_names = sans
        .iter()
        .map(|name| san(name))
        .collect::<Result<Vec<_>, _>>()?;

    let not_before = OffsetDateTime::now_utc() - BACKDATE;
    let not_after = not_before + BACKDATE + Duration::days(i64::from(validity_days));

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = common_name("lightstep-tekton-webhook CA");
    // pathlen 0: this CA signs serving certificates only, never another CA.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(generate_error("CA key"))?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(generate_error("CA certificate"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&sans[0]);
    params.subject_alt_names = subject_alt_names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(generate_error("serving key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(generate_error("serving certificate"))?;

    Ok(Bundle {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = |reason: &str| CertError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 {
        return Err(invalid("a DNS name has 1 to 253 characters"));
    }
    if !name.split('.').all(valid_label) {
        return Err(invalid(
            "each dot-separated label needs 1 to 63 letters, digits or '-', not at either end",
        ));
    }
    let ia5 = name
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| invalid(&e.to_string()))?;
    Ok(SanType::DnsName(ia5))
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Writes `ca.crt`, `ca.key`, `tls.crt` and `tls.key` into `dir` (created if missing); the two
/// keys are readable by the owner only.
pub fn write_bundle(dir: &Path, bundle: &Bundle) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&dir.join(CA_CERT_FILE), &bundle.ca_cert_pem, false)?;
    write_file(&dir.join(CA_KEY_FILE), &bundle.ca_key_pem, true)?;
    // The key before the certificate: a server that reloads on a certificate change then finds
    // the matching key already in place.
    write_file(&dir.join(KEY_FILE), &bundle.key_pem, true)?;
    write_file(&dir.join(CERT_FILE), &bundle.cert_pem, false)?;
    Ok(())
}

/// Writes `contents` to a temporary file next to `path` and renames it over `path`.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let write_error = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        // `mode` only applies when the file is created; a stale temporary file keeps its own.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(if secret {
                0o600
            } else {
                0o644
            }))?;
        }
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    #[cfg(not(unix))]
    let _ = secret;
    result.map_err(write_error)
}

/// Where the development certificates are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a development CA and a serving certificate for `localhost` and `127.0.0.1` in `dir`
/// unless all four files are already there, in which case they are reused (so a CA a developer
/// has trusted stays valid across restarts). A partial set is replaced as a whole.
pub fn ensure_dev(dir: &Path) -> Result<DevPaths, CertError> {
    let paths = DevPaths {
        dir: dir.to_path_buf(),
        ca_cert: dir.join(CA_CERT_FILE),
        cert: dir.join(CERT_FILE),
        key: dir.join(KEY_FILE),
    };
    let complete = [
        &paths.ca_cert,
        &dir.join(CA_KEY_FILE),
        &paths.cert,
        &paths.key,
    ]
    .iter()
    .all(|p| p.is_file());
    if !complete {
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        let bundle = generate(&names, DEV_VALIDITY_DAYS)?;
        write_bundle(dir, &bundle)?;
    }
    Ok(paths)
}

/// Name of the `MutatingWebhookConfiguration` and of the `ValidatingWebhookConfiguration` in
/// `manifests/base`.
pub const WEBHOOK_CONFIGURATION: &str = "lightstep-tekton-webhook";
/// The mutating webhooks (opt-in, enforced), each of which needs the `caBundle`.
pub const WEBHOOK_NAMES: [&str; 2] = ["inject.lightstep-tekton.io", "enforce.lightstep-tekton.io"];
/// The validating webhooks (the policy ConfigMap, TracingPolicies), which need it too.
pub const VALIDATING_WEBHOOK_NAMES: [&str; 2] = [
    "policy.validate.lightstep-tekton.io",
    "tracingpolicy.validate.lightstep-tekton.io",
];

/// The `caBundle` in the form the self-signed overlay consumes: strategic-merge patches of both
/// webhook configurations (webhooks merge by name), which every kustomize version applies.
/// `ca_pems` is one or more PEM certificates; the API server trusts any of them.
pub fn render_ca_bundle(ca_pems: &str) -> String {
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_pems.as_bytes());
    let mut out = String::from(
        "# Generated by `lightstep-tekton-webhook certs`; do not edit or commit.\n\
         # Read by manifests/overlays/self-signed.\n",
    );
    let configurations = [
        ("MutatingWebhookConfiguration", &WEBHOOK_NAMES),
        ("ValidatingWebhookConfiguration", &VALIDATING_WEBHOOK_NAMES),
    ];
    for (i, (kind, names)) in configurations.into_iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&format!(
            "apiVersion: admissionregistration.k8s.io/v1\n\
             kind: {kind}\n\
             metadata:\n  name: {WEBHOOK_CONFIGURATION}\n\
             webhooks:\n"
        ));
        for name in names {
            out.push_str(&format!(
                "  - name: {name}\n    clientConfig:\n      caBundle: {ca_bundle}\n"
            ));
        }
    }
    out
}

/// `lightstep-tekton-webhook certs`: a CA and a serving certificate for the webhook's Service.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Name of the webhook's Service; the certificate carries its in-cluster DNS names.
    #[arg(long, default_value = "lightstep-tekton-webhook")]
    pub service: String,

    /// Namespace of the webhook's Service.
    #[arg(long, default_value = "lightstep-tekton")]
    pub namespace: String,

    /// Directory for ca.crt, ca.key, tls.crt, tls.key and ca-bundle.yaml (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Lifetime of the CA and the serving certificate, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    pub days: u32,

    /// Extra DNS name or IP address for the serving certificate (repeatable).
    #[arg(long = "san", value_name = "NAME")]
    pub extra_sans: Vec<String>,

    /// Trust only the new CA. By default the caBundle also keeps the CA found in DIR from the
    /// previous run, so pods still serving the old certificate stay trusted while they reload.
    #[arg(long)]
    pub drop_previous_ca: bool,
}

/// Runs `certs`: writes the files and prints the `caBundle` for tools that want it directly.
pub fn run(args: CertsArgs) -> ExitCode {
    match write_for_service(&args) {
        Ok(written) => {
            eprintln!(
                "wrote {CA_CERT_FILE}, {CA_KEY_FILE}, {CERT_FILE}, {KEY_FILE} and {CA_BUNDLE_FILE} \
                 to {} (valid {} days; keep {CA_KEY_FILE} out of the cluster)",
                args.out.display(),
                args.days
            );
            if written.kept_previous_ca {
                eprintln!(
                    "the caBundle also trusts the previous CA, so pods still serving the old \
                     certificate keep working until they reload; the next run drops it"
                );
            }
            println!("{}", written.ca_bundle);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What one `certs` run wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The `caBundle` (base64 of one or two CA certificates, PEM).
    pub ca_bundle: String,
    /// Whether the CA of the previous run in the same directory is still in the `caBundle`.
    pub kept_previous_ca: bool,
}

/// Generates and writes everything `certs` produces.
pub fn write_for_service(args: &CertsArgs) -> Result<Written, CertError> {
    let mut sans = service_dns_names(&args.service, &args.namespace);
    sans.extend(args.extra_sans.iter().cloned());
    let bundle = generate(&sans, args.days)?;
    let previous_ca = if args.drop_previous_ca {
        None
    } else {
        previous_ca(&args.out.join(CA_CERT_FILE))?
    };
    let mut ca_pems = bundle.ca_cert_pem.clone();
    let previous_ca = previous_ca.filter(|p| *p != bundle.ca_cert_pem);
    if let Some(previous) = &previous_ca {
        ca_pems.push_str(previous);
    }
    write_bundle(&args.out, &bundle)?;
    write_file(
        &args.out.join(CA_BUNDLE_FILE),
        &render_ca_bundle(&ca_pems),
        false,
    )?;
    Ok(Written {
        ca_bundle: base64::engine::general_purpose::STANDARD.encode(ca_pems.as_bytes()),
        kept_previous_ca: previous_ca.is_some(),
    })
}

/// The single CA certificate a previous run left at `path`, if any.
fn previous_ca(path: &Path) -> Result<Option<String>, CertError> {
    match fs::read_to_string(path) {
        Ok(pem) => {
            let pem = pem.trim().to_string() + "\n";
            let single = pem.starts_with("-----BEGIN CERTIFICATE-----")
                && pem.matches("-----BEGIN").count() == 1;
            Ok(single.then_some(pem))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rcgen::PublicKeyData as _;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
    }

    /// Verifies `bundle.cert_pem` against `bundle.ca_cert_pem` as a TLS server certificate for
    /// `name` with rustls's own verifier, the one a TLS client (the API server's role here) runs.
    fn verify(bundle: &Bundle, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(der(&bundle.ca_cert_pem))
            .expect("CA is a trust anchor");
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("a verifier");
        let server_name = ServerName::try_from(name.to_string()).expect("server name");
        let leaf = der(&bundle.cert_pem);
        verifier
            .verify_server_cert(&leaf, &[], &server_name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn serving_certificate_verifies_against_its_ca_for_every_san() {
        let names = service_dns_names("hook", "ops");
        let mut sans = names.clone();
        sans.push("10.0.0.7".to_string());
        let bundle = generate(&sans, 30).unwrap();
        for name in names.iter().chain(["10.0.0.7".to_string()].iter()) {
            verify(&bundle, name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        assert!(verify(&bundle, "other.ops.svc").is_err());
        assert!(verify(&bundle, "10.0.0.8").is_err());
    }

    #[test]
    fn serving_certificate_does_not_verify_against_another_ca() {
        let sans = vec!["hook.ops.svc".to_string()];
        let one = generate(&sans, 30).unwrap();
        let other = generate(&sans, 30).unwrap();
        let mixed = Bundle {
            ca_cert_pem: other.ca_cert_pem.clone(),
            ..one
        };
        assert!(verify(&mixed, "hook.ops.svc").is_err());
    }

    #[test]
    fn private_keys_match_their_certificates() {
        let bundle = generate(&["localhost".to_string()], 1).unwrap();
        let ca_key = KeyPair::from_pem(&bundle.ca_key_pem).unwrap();
        let key = KeyPair::from_pem(&bundle.key_pem).unwrap();
        // The SubjectPublicKeyInfo of each key appears verbatim inside its certificate.
        let contains =
            |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
        assert!(contains(
            &der(&bundle.ca_cert_pem),
            &ca_key.subject_public_key_info()
        ));
        assert!(contains(
            &der(&bundle.cert_pem),
            &key.subject_public_key_info()
        ));
        assert!(!contains(
            &der(&bundle.cert_pem),
            &ca_key.subject_public_key_info()
        ));
    }

    #[test]
    fn service_dns_names_cover_every_form_the_cluster_uses() {
        assert_eq!(
            service_dns_names("svc", "ns"),
            ["svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local"]
        );
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        assert!(matches!(generate(&[], 30), Err(CertError::NoNames)));
        assert!(matches!(
            generate(&["a".into()], 0),
            Err(CertError::InvalidValidity(0))
        ));
        let err = generate(&["bad name".into()], 30).unwrap_err();
        assert!(err.to_string().contains("\"bad name\""), "{err}");
        assert!(generate(&["-x.example".into()], 30).is_err());
    }

    #[test]
    fn bundle_is_written_with_private_keys_for_the_owner_only() {
        let dir = std::env::temp_dir().join(format!("ltw-certs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let bundle = generate(&["localhost".to_string()], 1).unwrap();
        write_bundle(&dir.join("nested"), &bundle).unwrap();
        let read = |name: &str| fs::read_to_string(dir.join("nested").join(name)).unwrap();
        assert_eq!(read(CA_CERT_FILE), bundle.ca_cert_pem);
        assert_eq!(read(CA_KEY_FILE), bundle.ca_key_pem);
        assert_eq!(read(CERT_FILE), bundle.cert_pem);
        assert_eq!(read(KEY_FILE), bundle.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                fs::metadata(dir.join("nested").join(name))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode(CA_KEY_FILE), 0o600);
            assert_eq!(mode(KEY_FILE), 0o600);
            assert_eq!(mode(CERT_FILE), 0o644);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dev_certificates_are_created_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("ltw-dev-certs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let paths = ensure_dev(&dir).unwrap();
        assert_eq!(paths.cert, dir.join(CERT_FILE));
        let first = fs::read_to_string(&paths.cert).unwrap();
        let bundle = Bundle {
            ca_cert_pem: fs::read_to_string(&paths.ca_cert).unwrap(),
            ca_key_pem: String::new(),
            cert_pem: first.clone(),
            key_pem: String::new(),
        };
        verify(&bundle, "localhost").unwrap();
        verify(&bundle, "127.0.0.1").unwrap();

        ensure_dev(&dir).unwrap();
        assert_eq!(fs::read_to_string(&paths.cert).unwrap(), first, "reused");

        fs::remove_file(&paths.key).unwrap();
        ensure_dev(&dir).unwrap();
        assert_ne!(fs::read_to_string(&paths.cert).unwrap(), first, "replaced");
        assert!(paths.key.is_file());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ca_bundle_is_the_base64_of_the_ca_pem() {
        let bundle = generate(&["localhost".to_string()], 1).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(bundle.ca_bundle())
            .unwrap();
        assert_eq!(decoded, bundle.ca_cert_pem.as_bytes());
        let patch = render_ca_bundle(&bundle.ca_cert_pem);
        assert_eq!(
            patch
                .matches(&format!("caBundle: {}\n", bundle.ca_bundle()))
                .count(),
            WEBHOOK_NAMES.len() + VALIDATING_WEBHOOK_NAMES.len()
        );
    }
}
