//! Argument groups every long-running command flattens into its own `clap` arguments, so a
//! flag means the same thing, with the same environment variable and default, in each command.
//!
//! A group holds what the user types; turning it into settings (defaults that depend on `--dev`,
//! paths checked) is the command's job.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::runtime::telemetry::LogFormat;
use crate::runtime::tls::TlsPaths;

/// How the process reports on itself.
#[derive(Debug, Clone, Args)]
pub(crate) struct TelemetryArgs {
    /// Log format on standard error; RUST_LOG filters (default: info). Spans go over OTLP/HTTP
    /// when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LIGHTSTEP_TEKTON_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,
}

/// The plain-HTTP admin port (`GET /metrics`).
#[derive(Debug, Clone, Args)]
pub(crate) struct AdminArgs {
    /// Address of the plain-HTTP metrics endpoint (/metrics) [default: 0.0.0.0:9090;
    /// 127.0.0.1:9090 with --dev].
    #[arg(long, value_name = "ADDR", env = "LIGHTSTEP_TEKTON_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

/// The serving certificate, its key, the CA clients must be signed by, and how often to look
/// for new versions of them.
///
/// The files are required unless the command has a `--dev` flag that makes its own (the
/// attributes name it); a command without one must not flatten this group.
#[derive(Debug, Clone, Args)]
pub(crate) struct TlsArgs {
    /// Serving certificate, PEM (leaf first, then intermediates). Re-read when it changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "LIGHTSTEP_TEKTON_TLS_CERT",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    tls_cert: Option<PathBuf>,

    /// Private key of the serving certificate, PEM. Re-read when it changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "LIGHTSTEP_TEKTON_TLS_KEY",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    tls_key: Option<PathBuf>,

    /// Require clients (the API server) to present a certificate signed by this CA (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "LIGHTSTEP_TEKTON_CLIENT_CA",
        conflicts_with = "dev"
    )]
    client_ca: Option<PathBuf>,

    /// How often to check the certificate, key, CA and policy files for changes.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, env = "LIGHTSTEP_TEKTON_RELOAD_INTERVAL",
          value_parser = clap::value_parser!(u64).range(1..))]
    reload_interval: u64,
}

impl TlsArgs {
    /// The files given on the command line; `None` when they were not (only with `--dev`,
    /// which clap enforces).
    pub(crate) fn paths(&self) -> Option<TlsPaths> {
        Some(TlsPaths {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.client_ca.clone(),
        })
    }

    pub(crate) fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval)
    }
}
