//! The OTLP client's settings, and the one constructor that checks them.
//!
//! Endpoint rule: for gRPC the endpoint is `scheme://host[:port]` (the method path is fixed by
//! the protocol), for HTTP/protobuf it is the full traces URL, used as given, as with
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`. An HTTP endpoint with no path at all
//! (`https://collector:4318`) is taken as a base and gets `/v1/traces`, as with
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, because posting spans to `/` is never what was meant;
//! [`traces_url`] applies the base rule for callers that read the generic variable.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hyper::Uri;
use hyper::header::HeaderName;
use rustls::pki_types::CertificateDer;

use super::retry::RetryPolicy;
use super::tls;
use super::token::{TokenError, TokenHeader, TokenSource};

/// Lightstep's public ingest endpoint, gRPC over TLS: the default that must work as is.
pub const LIGHTSTEP_ENDPOINT: &str = "https://ingest.lightstep.com:443";

/// The header Lightstep reads the access token from.
pub const LIGHTSTEP_TOKEN_HEADER: &str = "lightstep-access-token";

/// The path OTLP/HTTP receivers serve traces on (OTLP specification).
const TRACES_PATH: &str = "/v1/traces";

/// The wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `opentelemetry.proto.collector.trace.v1.TraceService/Export` over HTTP/2.
    Grpc,
    /// `POST` of the protobuf request to the traces URL.
    HttpProtobuf,
}

impl FromStr for Protocol {
    type Err = ConfigError;

    /// Accepts the values of `OTEL_EXPORTER_OTLP_PROTOCOL` this client speaks.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            _ => Err(ConfigError::Protocol),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        })
    }
}

/// What the caller asks for, as it comes from a policy, flags or `OTEL_*` variables.
/// [`Config::new`] checks it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// See the module doc for the gRPC and HTTP rules.
    pub endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub protocol: String,
    /// A PEM file of CA certificates trusted in addition to the platform's roots (a private
    /// collector's CA).
    pub ca_file: Option<PathBuf>,
    /// The header that carries the token.
    pub token_header: String,
    /// Where the token comes from; `None` sends no token header (an in-cluster collector).
    pub token: Option<TokenSource>,
    /// The limit on each attempt, connecting included.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for Settings {
    /// Lightstep over gRPC, no token source yet (the caller says where the token lives).
    fn default() -> Self {
        Self {
            endpoint: LIGHTSTEP_ENDPOINT.to_owned(),
            protocol: "grpc".to_owned(),
            ca_file: None,
            token_header: LIGHTSTEP_TOKEN_HEADER.to_owned(),
            token: None,
            // Ten seconds, the OTLP exporter default (OTEL_EXPORTER_OTLP_TIMEOUT): a batch of
            // spans crosses the internet to Lightstep well within it.
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

/// Settings that failed the check. Each message names the field and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("endpoint: {0}")]
    Endpoint(&'static str),
    #[error("protocol: expected `grpc` or `http/protobuf`")]
    Protocol,
    #[error("caFile {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("tokenHeader: expected an HTTP header name (letters, digits, `-`)")]
    TokenHeader,
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("timeout: expected more than zero")]
    Timeout,
    #[error("retry.{0}")]
    Retry(&'static str),
}

/// Checked settings, ready for [`super::Client::new`].
#[derive(Debug)]
pub struct Config {
    pub(crate) endpoint: Uri,
    pub(crate) protocol: Protocol,
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
    pub(crate) token: Option<TokenHeader>,
    pub(crate) timeout: Duration,
    pub(crate) retry: RetryPolicy,
}

impl Config {
    /// Checks the settings; reads the CA file and the token once, so a bad file fails here
    /// rather than at the first export.
    pub fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let protocol: Protocol = settings.protocol.parse()?;
        let endpoint = endpoint(&settings.endpoint, protocol)?;
        let extra_roots = match &settings.ca_file {
            Some(path) => tls::read_ca_file(path).map_err(|reason| ConfigError::CaFile {
                path: path.clone(),
                reason,
            })?,
            None => Vec::new(),
        };
        let token = match &settings.token {
            Some(from) => {
                let name = HeaderName::from_bytes(settings.token_header.as_bytes())
                    .map_err(|_| ConfigError::TokenHeader)?;
                Some(TokenHeader::load(name, from.clone())?)
            }
            None => None,
        };
        if settings.timeout.is_zero() {
            return Err(ConfigError::Timeout);
        }
        let retry = settings.retry;
        if retry.max_attempts == 0 {
            return Err(ConfigError::Retry(
                "maxAttempts: expected at least 1 (1 means no retries)",
            ));
        }
        if retry.initial_backoff.is_zero() {
            return Err(ConfigError::Retry(
                "initialBackoff: expected more than zero",
            ));
        }
        if retry.max_backoff < retry.initial_backoff {
            return Err(ConfigError::Retry(
                "maxBackoff: expected at least initialBackoff",
            ));
        }
        Ok(Self {
            endpoint,
            protocol,
            extra_roots,
            token,
            timeout: settings.timeout,
            retry,
        })
    }

    pub fn endpoint(&self) -> &Uri {
        &self.endpoint
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// The traces URL for a base endpoint, by the `OTEL_EXPORTER_OTLP_ENDPOINT` rule: `/v1/traces`
/// appended to whatever path the base has.
pub fn traces_url(base: &str) -> String {
    format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
}

fn endpoint(raw: &str, protocol: Protocol) -> Result<Uri, ConfigError> {
    let uri: Uri = raw
        .parse()
        .map_err(|_| ConfigError::Endpoint("expected an absolute http:// or https:// URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ConfigError::Endpoint(
                "expected an absolute http:// or https:// URL",
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::Endpoint("expected a host"));
    }
    // Credentials in the URL would end up in every log line that names the endpoint.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ConfigError::Endpoint(
            "expected no user:password@ part; the token goes in the token header",
        ));
    }
    let bare = matches!(uri.path(), "" | "/") && uri.query().is_none();
    match protocol {
        Protocol::Grpc if !bare => Err(ConfigError::Endpoint(
            "a gRPC endpoint is scheme://host:port, without a path",
        )),
        Protocol::Grpc => Ok(uri),
        Protocol::HttpProtobuf if bare => traces_url(raw)
            .parse()
            .map_err(|_| ConfigError::Endpoint("expected an absolute http:// or https:// URL")),
        Protocol::HttpProtobuf => Ok(uri),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoint: &str, protocol: &str) -> Settings {
        Settings {
            endpoint: endpoint.into(),
            protocol: protocol.into(),
            ..Settings::default()
        }
    }

    #[test]
    fn the_lightstep_default_is_valid_grpc_over_tls() {
        let config = Config::new(&Settings::default()).unwrap();
        assert_eq!(config.protocol(), Protocol::Grpc);
        assert_eq!(config.endpoint().scheme_str(), Some("https"));
        assert_eq!(config.endpoint().host(), Some("ingest.lightstep.com"));
        assert_eq!(config.endpoint().port_u16(), Some(443));
    }

    #[test]
    fn http_endpoints_are_traces_urls_and_bases_get_the_path() {
        let given = Config::new(&settings("http://otel:4318/custom/traces", "http/protobuf"));
        assert_eq!(given.unwrap().endpoint(), "http://otel:4318/custom/traces");
        let base = Config::new(&settings("http://otel:4318", "http/protobuf"));
        assert_eq!(base.unwrap().endpoint(), "http://otel:4318/v1/traces");
        assert_eq!(
            traces_url("http://otel:4318/otlp/"),
            "http://otel:4318/otlp/v1/traces"
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        let cases = [
            (settings("ftp://otel:4317", "grpc"), "endpoint: "),
            (settings("otel:4317", "grpc"), "endpoint: "),
            (settings("not a url", "grpc"), "endpoint: "),
            (settings("http://otel:4317/v1/traces", "grpc"), "endpoint: "),
            (settings("http://otel:4317", "http/json"), "protocol: "),
            (settings("https://me:pw@otel:4317", "grpc"), "endpoint: "),
            (
                Settings {
                    token_header: "bad header".into(),
                    token: Some(TokenSource::Env("PATH".into())),
                    ..Settings::default()
                },
                "tokenHeader: ",
            ),
            (
                Settings {
                    timeout: Duration::ZERO,
                    ..Settings::default()
                },
                "timeout: ",
            ),
            (
                Settings {
                    retry: RetryPolicy {
                        max_attempts: 0,
                        ..RetryPolicy::default()
                    },
                    ..Settings::default()
                },
                "retry.maxAttempts: ",
            ),
            (
                Settings {
                    retry: RetryPolicy {
                        max_backoff: Duration::from_millis(1),
                        ..RetryPolicy::default()
                    },
                    ..Settings::default()
                },
                "retry.maxBackoff: ",
            ),
            (
                Settings {
                    ca_file: Some("/nonexistent/ca.pem".into()),
                    ..Settings::default()
                },
                "caFile /nonexistent/ca.pem: cannot read it",
            ),
        ];
        for (settings, prefix) in cases {
            let error = Config::new(&settings).unwrap_err().to_string();
            assert!(
                error.starts_with(prefix),
                "{error:?} should start with {prefix:?}"
            );
        }
    }

    #[test]
    fn a_ca_file_must_hold_pem_certificates() {
        let dir = std::env::temp_dir().join(format!("otlp-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let good = dir.join("good.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&good, params.self_signed(&key).unwrap().pem()).unwrap();
        for (path, expected) in [
            (&not_pem, Some("holds no PEM certificate")),
            (&garbage, Some("not a usable X.509 CA")),
            (&good, None),
        ] {
            let result = Config::new(&Settings {
                ca_file: Some(path.clone()),
                ..Settings::default()
            });
            match expected {
                Some(reason) => {
                    let error = result.unwrap_err().to_string();
                    assert!(error.starts_with("caFile "), "{error}");
                    assert!(error.contains(reason), "{error}");
                }
                None => assert_eq!(result.unwrap().extra_roots.len(), 1),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
