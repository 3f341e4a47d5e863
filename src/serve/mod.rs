//! `lightstep-tekton-webhook serve`: the HTTPS endpoint kube-apiserver calls.
//!
//! Routes (`routes`): `POST /mutate` (inject mode), `POST /enforce` (enforce mode),
//! `POST /validate` (the policy ConfigMap and TracingPolicies), `GET /healthz`, `GET /readyz`; metrics on the runtime's admin port (`GET /metrics`).
//!
//! This module is the command: its arguments, the settings they resolve to, and [`run`]. The
//! rest is in rooms of its own: `server` binds and drains, `listener` accepts connections
//! within limits, `routes` answers requests, [`metrics`] counts and logs them, and
//! `crate::policy::loader` keeps the policy file current. The process around it (runtime, telemetry,
//! signals, exit code) is `crate::runtime::bootstrap`'s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::certs;
use crate::cluster;
use crate::policy::args::PolicyArgs;
use crate::runtime::admin::BindError;
use crate::runtime::args::{AdminArgs, TelemetryArgs, TlsArgs};
use crate::runtime::bootstrap;
use crate::runtime::tls::{self, TlsPaths};

mod body;
mod listener;
pub mod metrics;
mod routes;
mod server;

pub use listener::MAX_HEADER_BYTES;
pub use server::Server;

/// Largest AdmissionReview accepted. The API server refuses objects over 3 MiB, and a review of
/// an UPDATE carries two of them; a CREATE of the largest pod fits with room to spare.
const MAX_BODY: usize = 6 * 1024 * 1024;

/// MiB that request bodies being read may hold together without `--max-body-memory`: four
/// bodies of the largest size, or about 1,500 of the usual 16 KB reviews at once (the API
/// server sends a few at a time), and well inside the install's 128 MiB memory limit.
const DEFAULT_BODY_MEMORY_MIB: u32 = 24;

/// One MiB, the unit of `--max-body-memory`.
const MIB: usize = 1024 * 1024;

/// Where `serve` listens without `--listen`: every interface, the port the Service targets.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443);
/// `serve --dev` is for one machine: loopback only.
const DEV_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
/// The metrics port without `--metrics-listen` (the usual Prometheus scrape port for exporters).
const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090);
const DEV_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

/// Seconds `--shutdown-delay` defaults to: long enough for the endpoint controller to take the
/// pod out of the Service (a few seconds in a healthy cluster); nothing to wait for with --dev.
const DEFAULT_SHUTDOWN_DELAY: u64 = 5;

/// Where `serve --dev` keeps its certificates unless `--dev-dir` says otherwise (git-ignored).
const DEV_CERTS_DIR: &str = "certs/dev";

/// The fixture `serve --dev` suggests posting: a PipelineRun task pod with Tekton tracing on.
const DEV_FIXTURE: &str = "tests/fixtures/tekton-pipeline-task-traced.json";

/// Process settings of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve HTTPS on [default: 0.0.0.0:8443; 127.0.0.1:8443 with --dev].
    #[arg(long, value_name = "ADDR", env = "LIGHTSTEP_TEKTON_LISTEN")]
    listen: Option<SocketAddr>,

    #[command(flatten)]
    tls: TlsArgs,

    #[command(flatten)]
    policy: PolicyArgs,

    /// Leader election for TracingPolicy status writes (with --watch-tracing-policies).
    #[command(flatten)]
    cluster: cluster::ClusterArgs,

    #[command(flatten)]
    admin: AdminArgs,

    #[command(flatten)]
    telemetry: TelemetryArgs,

    /// Development mode: create a CA and a certificate for localhost and 127.0.0.1 in --dev-dir
    /// if missing, listen on 127.0.0.1:8443, and print a curl command to try it.
    #[arg(long)]
    dev: bool,

    /// Where --dev keeps its certificates [default: certs/dev].
    #[arg(long, value_name = "DIR", requires = "dev")]
    dev_dir: Option<PathBuf>,

    /// After SIGTERM, keep serving this long with /readyz failing, so the pod leaves the
    /// Service's endpoints before it stops accepting [default: 5; 0 with --dev].
    #[arg(long, value_name = "SECONDS")]
    shutdown_delay: Option<u64>,

    /// Then wait at most this long for requests in flight to finish.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    drain_timeout: u64,

    /// Most client connections served at once; more wait in the kernel's accept queue.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    max_connections: u32,

    /// MiB that request bodies being read may hold together, across all connections; a request
    /// that finds no room before its body timeout gets 503 with Retry-After. At least 6, the
    /// largest body.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_BODY_MEMORY_MIB,
          value_parser = clap::value_parser!(u32).range(6..=65_536))]
    max_body_memory: u32,

    /// Time a client gets for its TLS handshake, for its request headers (an idle keep-alive
    /// connection is closed after it too), separately for its body, and to take each reply.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    read_timeout: u64,
}

/// Limits that protect the server from its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    /// Bytes all bodies being read may hold together (at least `max_body`).
    pub body_budget: usize,
    pub max_connections: u32,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long a reply may wait on a client that does not read it.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        // The flags' defaults: 256 connections, 10 s for each step of a request.
        Limits::new(256, DEFAULT_BODY_MEMORY_MIB, Duration::from_secs(10))
    }
}

impl Limits {
    /// `read_timeout` bounds each of the handshake, the headers, the body and each reply.
    fn new(max_connections: u32, body_memory_mib: u32, read_timeout: Duration) -> Limits {
        Limits {
            max_body: MAX_BODY,
            body_budget: (body_memory_mib as usize * MIB).max(MAX_BODY),
            max_connections,
            handshake_timeout: read_timeout,
            header_timeout: read_timeout,
            body_timeout: read_timeout,
            write_timeout: read_timeout,
        }
    }
}

/// Everything [`Server::bind`] needs, resolved from [`ServeArgs`] (or built by a test).
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsPaths,
    pub policy: Option<PathBuf>,
    /// Watch TracingPolicies and namespaces (see [`cluster`]).
    pub watch_tracing_policies: bool,
    /// The Lease that chooses the one replica writing statuses.
    pub cluster: cluster::ClusterArgs,
    pub limits: Limits,
    pub reload_interval: Duration,
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
}

impl Settings {
    /// Settings for tests and tools: `127.0.0.1:0` for both ports, default limits, short reload
    /// interval, no shutdown delay.
    pub fn local(tls: TlsPaths) -> Settings {
        Settings {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            metrics_listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)),
            tls,
            policy: None,
            watch_tracing_policies: false,
            cluster: cluster::ClusterArgs::default(),
            limits: Limits::default(),
            reload_interval: Duration::from_millis(100),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// Why `serve` could not start; each message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Every message of the certificate maker names the file or directory to fix.
    #[error(transparent)]
    Dev(#[from] certs::CertError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// `serve`: settings, bind, serve until a signal, drain. Exit 0 after a clean shutdown, 1 when
/// the server could not start or a second signal cut the drain short.
pub fn run(args: ServeArgs) -> ExitCode {
    let telemetry = args.telemetry.clone();
    bootstrap::run("serve", &telemetry, |shutdown| async move {
        let settings = settings(&args)?;
        let server = Server::bind(settings).await?;
        if args.dev {
            print_dev_hint(&args, server.local_addr());
        }
        server.run(shutdown.requested()).await;
        Ok::<(), ServeError>(())
    })
}

/// Resolves the command line into settings; with `--dev`, creates the certificates first.
fn settings(args: &ServeArgs) -> Result<Settings, ServeError> {
    let (tls, listen, metrics_listen, delay) = match args.tls.paths() {
        // clap requires both files without --dev, and refuses them with it.
        Some(paths) if !args.dev => (
            paths,
            args.listen.unwrap_or(DEFAULT_LISTEN),
            args.admin.metrics_listen.unwrap_or(DEFAULT_METRICS_LISTEN),
            args.shutdown_delay.unwrap_or(DEFAULT_SHUTDOWN_DELAY),
        ),
        _ => {
            let dev = certs::ensure_dev(&dev_dir(args))?;
            (
                TlsPaths {
                    cert: dev.cert,
                    key: dev.key,
                    client_ca: None,
                },
                args.listen.unwrap_or(DEV_LISTEN),
                args.admin.metrics_listen.unwrap_or(DEV_METRICS_LISTEN),
                args.shutdown_delay.unwrap_or(0),
            )
        }
    };
    Ok(Settings {
        listen,
        metrics_listen: Some(metrics_listen),
        tls,
        policy: args.policy.policy.clone(),
        watch_tracing_policies: args.policy.watch_tracing_policies,
        cluster: args.cluster.clone(),
        limits: Limits::new(
            args.max_connections,
            args.max_body_memory,
            Duration::from_secs(args.read_timeout),
        ),
        reload_interval: args.tls.reload_interval(),
        shutdown_delay: Duration::from_secs(delay),
        drain_timeout: Duration::from_secs(args.drain_timeout),
    })
}

fn dev_dir(args: &ServeArgs) -> PathBuf {
    args.dev_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEV_CERTS_DIR))
}

fn print_dev_hint(args: &ServeArgs, addr: SocketAddr) {
    let dir = dev_dir(args);
    let host = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    let url = SocketAddr::new(host, addr.port());
    let fixture = if Path::new(DEV_FIXTURE).exists() {
        DEV_FIXTURE
    } else {
        "review.json"
    };
    println!(
        "Development server on https://{url} (CA: {}/ca.crt). Try:",
        dir.display()
    );
    println!(
        "  curl --cacert {}/ca.crt -H 'Content-Type: application/json' --data-binary @{fixture} https://{url}/mutate",
        dir.display()
    );
}
