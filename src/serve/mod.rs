//! `lightstep-tekton-webhook serve`: the HTTPS endpoint kube-apiserver calls.
//!
//! Routes: `POST /mutate` (inject mode), `POST /enforce` (enforce mode), `GET /healthz`,
//! `GET /readyz`; metrics on a separate plain-HTTP port (`GET /metrics`).
//!
//! The handler is glue: read the body within limits, take the current policy, call
//! [`admission::review`], record one log line and the metrics, send the reply. Everything a client
//! can get wrong has an answer that does not involve the decision: 400 for a body that is not an
//! AdmissionReview, 413 over [`MAX_BODY`], 408 for a body that stalls, a closed connection for
//! headers that stall or for a client that stops reading its replies (hyper has no write
//! timeout, so `WriteClock` times each write). Each connection is its own task, so a slow or
//! hostile client costs one connection slot and nothing else; [`Limits::max_connections`] bounds
//! the slots, and clients over it wait in the kernel's accept queue rather than in memory.
//!
//! The connection loop is hyper's HTTP/1.1 server (the only protocol the API server uses for
//! webhooks) behind our own accept loop, not `axum::serve`, because the loop has to do TLS with
//! a configuration that can change between two connections ([`tls::TlsStore`]), bound the
//! connections, and drain them on shutdown.
//!
//! Shutdown (SIGTERM, Ctrl-C, or the future given to [`Server::run`] in tests): `/readyz` turns
//! 503 at once, the server keeps serving for `--shutdown-delay` so the endpoint controller can
//! take the pod out of the Service, then stops accepting, lets each connection finish the request
//! it is on (hyper's graceful shutdown), and waits at most `--drain-timeout` for them. A second
//! signal exits at once.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument as _;

use crate::admission;
use crate::admission::decide::Mode;
use crate::certs;
use crate::cluster::{self, Cluster};
use crate::policy::Policy;
use crate::policy::selection::{Fallback, Selected};
use crate::runtime::reload::{Change, FileSet};
use crate::runtime::telemetry::{self, LogFormat, Metrics, Rejection, ReloadKind};
use crate::runtime::tls::{self, TlsPaths, TlsStore};

/// Largest AdmissionReview accepted. The API server refuses objects over 3 MiB, and a review of
/// an UPDATE carries two of them; a CREATE of the largest pod fits with room to spare.
pub const MAX_BODY: usize = 6 * 1024 * 1024;

/// Where `serve` listens without `--listen`: every interface, the port the Service targets.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443);
/// `serve --dev` is for one machine: loopback only.
const DEV_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
/// The metrics port without `--metrics-listen` (the usual Prometheus scrape port for exporters).
const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090);
const DEV_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

/// After a failed accept (out of file descriptors, say), wait this long before the next one so
/// the loop does not spin while connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Largest request head (request line and headers) accepted; more gets 431 and the connection
/// is closed. The API server sends a few hundred bytes; hyper's own bound would be its ~400 KB
/// read buffer. (hyper also answers 431 past 100 headers, its default, kept.)
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Bytes read from the socket at a time. rustls reads 4 KiB at a time; a buffer under it turns
/// the five `recvfrom` calls of a 16 KB review into one. 32 KiB per connection is 8 MiB at the
/// default connection limit.
const READ_BUFFER: usize = 32 * 1024;

/// Where `serve --dev` keeps its certificates unless `--dev-dir` says otherwise (git-ignored).
const DEV_CERTS_DIR: &str = "certs/dev";

/// The fixture `serve --dev` suggests posting: a PipelineRun task pod with Tekton tracing on.
const DEV_FIXTURE: &str = "tests/fixtures/tekton-pipeline-task-traced.json";

/// Process settings of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve HTTPS on [default: 0.0.0.0:8443; 127.0.0.1:8443 with --dev].
    #[arg(long, value_name = "ADDR", env = "LIGHTSTEP_TEKTON_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Serving certificate, PEM (leaf first, then intermediates). Re-read when it changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "LIGHTSTEP_TEKTON_TLS_CERT",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key of the serving certificate, PEM. Re-read when it changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "LIGHTSTEP_TEKTON_TLS_KEY",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    pub tls_key: Option<PathBuf>,

    /// Require clients (the API server) to present a certificate signed by this CA (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "LIGHTSTEP_TEKTON_CLIENT_CA",
        conflicts_with = "dev"
    )]
    pub client_ca: Option<PathBuf>,

    /// Policy file (YAML); the embedded default (Lightstep profile) when omitted. Re-read when it
    /// changes; an invalid new version is refused and the previous one kept.
    #[arg(long, value_name = "FILE", env = "LIGHTSTEP_TEKTON_POLICY")]
    pub policy: Option<PathBuf>,

    /// Choose each pod's policy among the cluster's TracingPolicies (watched, with the
    /// namespaces' labels; needs the in-cluster service account or KUBECONFIG); --policy applies
    /// where none matches. /readyz waits until both are listed.
    #[arg(long, env = "LIGHTSTEP_TEKTON_WATCH_TRACING_POLICIES", value_name = "BOOL",
          action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false,
          default_missing_value = "true")]
    pub watch_tracing_policies: bool,

    /// Address of the plain-HTTP metrics endpoint (/metrics) [default: 0.0.0.0:9090;
    /// 127.0.0.1:9090 with --dev].
    #[arg(long, value_name = "ADDR", env = "LIGHTSTEP_TEKTON_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format on standard error; RUST_LOG filters (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LIGHTSTEP_TEKTON_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Development mode: create a CA and a certificate for localhost and 127.0.0.1 in --dev-dir
    /// if missing, listen on 127.0.0.1:8443, and print a curl command to try it.
    #[arg(long)]
    pub dev: bool,

    /// Where --dev keeps its certificates [default: certs/dev].
    #[arg(long, value_name = "DIR", requires = "dev")]
    pub dev_dir: Option<PathBuf>,

    /// How often to check the certificate, key, CA and policy files for changes.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, env = "LIGHTSTEP_TEKTON_RELOAD_INTERVAL",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub reload_interval: u64,

    /// After SIGTERM, keep serving this long with /readyz failing, so the pod leaves the
    /// Service's endpoints before it stops accepting [default: 5; 0 with --dev].
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_delay: Option<u64>,

    /// Then wait at most this long for requests in flight to finish.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub drain_timeout: u64,

    /// Most client connections served at once; more wait in the kernel's accept queue.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_connections: u32,

    /// Time a client gets for its TLS handshake, for its request headers (an idle keep-alive
    /// connection is closed after it too), separately for its body, and to take each reply.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout: u64,
}

/// Limits that protect the server from its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    pub max_connections: u32,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long a reply may wait on a client that does not read it.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: MAX_BODY,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
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
    #[error("--policy {path}: {reason}")]
    Policy { path: String, reason: String },
    #[error("{flag} {addr}: cannot listen: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--dev: {0}")]
    Dev(#[from] certs::CertError),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// The policy being served, and the file it came from.
struct PolicyStore {
    path: Option<PathBuf>,
    files: Mutex<FileSet>,
    current: RwLock<Arc<Policy>>,
}

impl PolicyStore {
    fn load(path: Option<PathBuf>) -> Result<PolicyStore, ServeError> {
        let mut files = FileSet::new(path.iter().cloned().collect());
        let policy = match &path {
            None => Policy::embedded_default(),
            Some(p) => {
                let contents = files.read().map_err(|(_, e)| ServeError::Policy {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?;
                parse_policy(&contents[0]).map_err(|reason| ServeError::Policy {
                    path: p.display().to_string(),
                    reason,
                })?
            }
        };
        Ok(PolicyStore {
            path,
            files: Mutex::new(files),
            current: RwLock::new(Arc::new(policy)),
        })
    }

    fn current(&self) -> Arc<Policy> {
        // A poisoned lock still holds a complete policy: writers only assign.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `None` when nothing changed; otherwise whether the new file was applied.
    fn reload(&self) -> Option<Result<(), String>> {
        self.path.as_ref()?;
        let change = self.files.lock().unwrap_or_else(|e| e.into_inner()).poll();
        match change {
            Change::Unchanged => None,
            Change::Unreadable(reason) => Some(Err(reason)),
            Change::Changed(contents) => Some(parse_policy(&contents[0]).map(|policy| {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
            })),
        }
    }
}

fn parse_policy(bytes: &[u8]) -> Result<Policy, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    Policy::from_yaml(text).map_err(|e| e.to_string())
}

/// What the handlers share.
struct AppState {
    policy: Arc<PolicyStore>,
    /// The watch caches, with `--watch-tracing-policies`.
    cluster: Option<Arc<Cluster>>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    limits: Limits,
}

/// A server with its certificate validated, its policy loaded and its ports bound.
pub struct Server {
    settings: Settings,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    tls: Arc<TlsStore>,
    state: Arc<AppState>,
    watch: Option<cluster::Watch>,
}

impl Server {
    /// Validates the certificate and policy, then binds both ports. Nothing is served yet.
    pub async fn bind(settings: Settings) -> Result<Server, ServeError> {
        let tls = Arc::new(TlsStore::load(settings.tls.clone())?);
        let policy = Arc::new(PolicyStore::load(settings.policy.clone())?);
        let watch = match settings.watch_tracing_policies {
            true => Some(cluster::Watch::connect().await?),
            false => None,
        };
        let metrics = Arc::new(Metrics::new());
        metrics.set_certificate_expiry(tls.identity().not_after);
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    flag: "--listen",
                    addr: settings.listen,
                    source,
                })?;
        let metrics_listener = match settings.metrics_listen {
            None => None,
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServeError::Bind {
                            flag: "--metrics-listen",
                            addr,
                            source,
                        })?,
                )
            }
        };
        let state = Arc::new(AppState {
            policy,
            cluster: watch.as_ref().map(|w| w.cluster()),
            metrics,
            ready: AtomicBool::new(false),
            limits: settings.limits.clone(),
        });
        Ok(Server {
            settings,
            listener,
            metrics_listener,
            tls,
            state,
            watch,
        })
    }

    /// The HTTPS address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener.local_addr().expect("bound listener")
    }

    /// The metrics address actually bound, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// Serves until `shutdown` completes, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            settings,
            listener,
            metrics_listener,
            tls,
            state,
            watch,
        } = self;
        let watcher = watch.map(|w| tokio::spawn(w.run()));
        let (drain_tx, drain_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(settings.limits.max_connections as usize));

        let poller = tokio::spawn(poll_files(
            tls.clone(),
            state.clone(),
            settings.reload_interval,
        ));
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_server =
            metrics_listener.map(|l| tokio::spawn(serve_metrics(l, state.metrics.clone())));

        let router = router(state.clone());
        state.ready.store(true, Ordering::SeqCst);
        tracing::info!(
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            metrics = %metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            certificate_not_after = tls.identity().not_after,
            client_auth = settings.tls.client_ca.is_some(),
            policy = %settings.policy.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded default".into()),
            watch_tracing_policies = watcher.is_some(),
            "serving"
        );

        let accept = accept_loop(
            listener,
            tls,
            router,
            state.clone(),
            permits.clone(),
            drain_rx,
        );
        let trigger = async {
            shutdown.await;
            state.ready.store(false, Ordering::SeqCst);
            tracing::info!(
                delay_s = settings.shutdown_delay.as_secs_f64(),
                "shutting down: readiness off, still serving until the delay ends"
            );
            tokio::time::sleep(settings.shutdown_delay).await;
            // Receivers live as long as the accept loop and the connections; none may be left.
            let _ = drain_tx.send(true);
        };
        tokio::join!(accept, trigger);

        // Every open connection holds a permit: having them all back means all are closed.
        let all = settings.limits.max_connections;
        match tokio::time::timeout(settings.drain_timeout, permits.acquire_many(all)).await {
            Ok(_) => tracing::info!("all connections closed; exiting"),
            Err(_) => tracing::warn!(
                still_open = all as usize - permits.available_permits(),
                "drain timeout reached; closing the remaining connections"
            ),
        }
        poller.abort();
        if let Some(m) = metrics_server {
            m.abort();
        }
        if let Some(w) = watcher {
            w.abort();
        }
    }
}

/// The plain-HTTP metrics endpoint. It keeps answering while the server drains, so the last
/// scrape sees the last requests; `run` stops it at the very end.
async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

/// Accepts connections until the drain starts; each gets its own task and a permit.
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<TlsStore>,
    router: Router,
    state: Arc<AppState>,
    permits: Arc<Semaphore>,
    drain: watch::Receiver<bool>,
) {
    let mut stop = drain.clone();
    loop {
        let permit = tokio::select! {
            biased;
            _ = drained(&mut stop) => return,
            // The semaphore is never closed.
            p = permits.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let (tcp, peer) = tokio::select! {
            biased;
            _ = drained(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let connection = Connection {
            acceptor: tls.acceptor(),
            router: router.clone(),
            state: state.clone(),
            drain: drain.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            connection.serve(tcp, peer).await;
        });
    }
}

/// Completes once the drain has started (at once if it already has).
async fn drained(drain: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after the drain started.
    let _ = drain.wait_for(|d| *d).await;
}

/// One client connection: TLS handshake, then HTTP/1.1 requests until either side closes.
struct Connection {
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    state: Arc<AppState>,
    drain: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(mut self, tcp: TcpStream, peer: SocketAddr) {
        let _open = OpenConnection::new(self.state.metrics.clone());
        // Small replies: send each as soon as it is written.
        let _ = tcp.set_nodelay(true);
        let limits = &self.state.limits;
        let stream = match tokio::time::timeout(
            limits.handshake_timeout,
            self.acceptor
                .accept(BufReader::with_capacity(READ_BUFFER, tcp)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.state.metrics.handshake_failed();
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.state.metrics.handshake_failed();
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(MAX_HEADER_BYTES)
            .keep_alive(true);
        let writes = Arc::new(WriteClock::new());
        let conn = http.serve_connection(
            TokioIo::new(Watched {
                inner: stream,
                writes: writes.clone(),
            }),
            TowerToHyperService::new(self.router.clone()),
        );
        tokio::pin!(conn);
        // hyper has no write timeout: a client that stops reading its replies would keep the
        // connection (and its slot) forever once the socket buffers are full.
        let stalled = writes.stalled_longer_than(limits.write_timeout);
        tokio::pin!(stalled);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = drained(&mut self.drain) => {
                // Finish the request in progress (if any), then close.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stalled.as_mut() => Ok(()),
                }
            }
            _ = stalled.as_mut() => {
                tracing::debug!(%peer, "client stopped reading its replies; connection closed");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection closed with an error");
        }
    }
}

/// When a write to the client started waiting, if one is waiting now.
struct WriteClock {
    origin: Instant,
    /// Milliseconds from `origin` to the start of the wait, plus one; 0 when no write waits.
    waiting_since: AtomicU64,
}

impl WriteClock {
    fn new() -> WriteClock {
        WriteClock {
            origin: Instant::now(),
            waiting_since: AtomicU64::new(0),
        }
    }

    fn note<T>(&self, poll: &Poll<T>) {
        if poll.is_pending() {
            if self.waiting_since.load(Ordering::Relaxed) == 0 {
                let now = self.origin.elapsed().as_millis() as u64 + 1;
                self.waiting_since.store(now, Ordering::Relaxed);
            }
        } else {
            self.waiting_since.store(0, Ordering::Relaxed);
        }
    }

    /// Completes once a single write has waited longer than `limit`.
    async fn stalled_longer_than(&self, limit: Duration) {
        // Checking a quarter of the limit apart cuts a stalled client off within 1.25 limits.
        let every = (limit / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let since = self.waiting_since.load(Ordering::Relaxed);
            if since != 0 {
                let waited = self
                    .origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since - 1));
                if waited > limit {
                    return;
                }
            }
        }
    }
}

/// The connection's stream, with its writes timed by a [`WriteClock`].
struct Watched<S> {
    inner: S,
    writes: Arc<WriteClock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.writes.note(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.writes.note(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.writes.note(&poll);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts an open connection in the gauge for as long as it lives, however its task ends.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<Metrics>) -> OpenConnection {
        metrics.connection_opened();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// Polls the certificate and policy files and swaps in valid new versions.
async fn poll_files(tls: Arc<TlsStore>, state: Arc<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (tls2, policy) = (tls.clone(), state.policy.clone());
        // File reads block; a slow volume must not stall a worker that serves requests.
        let Ok((tls_result, policy_result)) =
            tokio::task::spawn_blocking(move || (tls2.reload(), policy.reload())).await
        else {
            continue;
        };
        let metrics = &state.metrics;
        match tls_result {
            tls::Reload::Unchanged => {}
            tls::Reload::Applied { not_after } => {
                metrics.reloaded(ReloadKind::Tls, true);
                metrics.set_certificate_expiry(not_after);
                tracing::info!(not_after, "serving certificate reloaded");
            }
            tls::Reload::Refused(reason) => {
                metrics.reloaded(ReloadKind::Tls, false);
                tracing::warn!(%reason, "new certificate refused; still serving the previous one");
            }
        }
        match policy_result {
            None => {}
            Some(Ok(())) => {
                metrics.reloaded(ReloadKind::Policy, true);
                tracing::info!(fingerprint = %state.policy.current().fingerprint(), "policy reloaded");
            }
            Some(Err(reason)) => {
                metrics.reloaded(ReloadKind::Policy, false);
                tracing::warn!(%reason, "new policy refused; still using the previous one");
            }
        }
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/enforce", post(enforce))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

// The whole request rather than a `HeaderMap` extractor, which would copy the headers.
async fn mutate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    admit(&state, Mode::Inject, &parts.headers, body).await
}

async fn enforce(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    admit(&state, Mode::Enforce, &parts.headers, body).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if state.cluster.as_ref().is_some_and(|c| !c.synced()) {
        let waiting = "waiting for the first list of TracingPolicies and namespaces\n";
        (StatusCode::SERVICE_UNAVAILABLE, waiting).into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

/// One AdmissionReview: read the body within limits, decide, record, reply.
async fn admit(state: &AppState, mode: Mode, headers: &HeaderMap, body: Body) -> Response {
    let span = telemetry::admission_span(mode, headers);
    let limits = &state.limits;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return reject(
            state,
            mode,
            Rejection::TooLarge,
            &format!(
                "body of {} bytes is over the {} byte limit",
                declared.unwrap_or_default(),
                limits.max_body
            ),
        );
    }
    let read = axum::body::to_bytes(body, limits.max_body).instrument(span.clone());
    let bytes = match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if is_length_limit(&e) => {
            return reject(
                state,
                mode,
                Rejection::TooLarge,
                &format!("body is over the {} byte limit", limits.max_body),
            );
        }
        Ok(Err(e)) => {
            return reject(
                state,
                mode,
                Rejection::BodyTimeout,
                &format!("reading the body: {e}"),
            );
        }
        Err(_) => {
            return reject(
                state,
                mode,
                Rejection::BodyTimeout,
                &format!(
                    "the body did not arrive within {} s",
                    limits.body_timeout.as_secs_f64()
                ),
            );
        }
    };

    let started = Instant::now();
    let policy = state.policy.current();
    let snapshot = state.cluster.as_ref().map(|c| c.snapshot());
    // Cached state only: choosing a policy makes no API call.
    let select = |namespace: &str| match (&state.cluster, &snapshot) {
        (Some(cluster), Some(snapshot)) => cluster.select(snapshot, namespace, &policy),
        _ => Selected::fallback(&policy, Fallback::NotWatching),
    };
    // `review` is written not to panic; if a bug makes it, this request fails alone.
    let result = span.in_scope(|| {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            admission::review_with(&bytes, mode, select)
        }))
    });
    match result {
        Ok(Ok(reply)) => {
            span.record("uid", reply.uid.as_str());
            span.record("decision", reply.outcome.as_str());
            telemetry::record_admission(&state.metrics, &reply, started.elapsed());
            let mut response = Response::new(Body::from(reply.body));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Ok(Err(bad)) => reject(state, mode, Rejection::BadRequest, &bad.to_string()),
        Err(_) => reject(
            state,
            mode,
            Rejection::Internal,
            "deciding failed unexpectedly",
        ),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A plain-text, one-line answer for a request that gets no AdmissionReview.
fn reject(state: &AppState, mode: Mode, rejection: Rejection, detail: &str) -> Response {
    let line = detail.replace(['\n', '\r'], " ");
    telemetry::record_rejection(&state.metrics, mode, rejection, &line);
    let status = match rejection {
        Rejection::BadRequest => StatusCode::BAD_REQUEST,
        Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        Rejection::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = (status, format!("{line}\n")).into_response();
    if matches!(rejection, Rejection::TooLarge | Rejection::BodyTimeout) {
        // The rest of the body is never read, so the connection cannot carry another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Resolves the command line into settings; with `--dev`, creates the certificates first.
pub fn settings(args: &ServeArgs) -> Result<Settings, ServeError> {
    let (tls, listen, metrics_listen, delay) = if args.dev {
        let dir = args
            .dev_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEV_CERTS_DIR));
        let paths = certs::ensure_dev(&dir)?;
        (
            TlsPaths {
                cert: paths.cert,
                key: paths.key,
                client_ca: None,
            },
            args.listen.unwrap_or(DEV_LISTEN),
            args.metrics_listen.unwrap_or(DEV_METRICS_LISTEN),
            args.shutdown_delay.unwrap_or(0),
        )
    } else {
        (
            TlsPaths {
                // clap requires both without --dev.
                cert: args.tls_cert.clone().unwrap_or_default(),
                key: args.tls_key.clone().unwrap_or_default(),
                client_ca: args.client_ca.clone(),
            },
            args.listen.unwrap_or(DEFAULT_LISTEN),
            args.metrics_listen.unwrap_or(DEFAULT_METRICS_LISTEN),
            args.shutdown_delay.unwrap_or(5),
        )
    };
    Ok(Settings {
        listen,
        metrics_listen: Some(metrics_listen),
        tls,
        policy: args.policy.clone(),
        watch_tracing_policies: args.watch_tracing_policies,
        limits: Limits {
            max_body: MAX_BODY,
            max_connections: args.max_connections,
            handshake_timeout: Duration::from_secs(args.read_timeout),
            header_timeout: Duration::from_secs(args.read_timeout),
            body_timeout: Duration::from_secs(args.read_timeout),
            write_timeout: Duration::from_secs(args.read_timeout),
        },
        reload_interval: Duration::from_secs(args.reload_interval),
        shutdown_delay: Duration::from_secs(delay),
        drain_timeout: Duration::from_secs(args.drain_timeout),
    })
}

/// Completes on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}

/// `serve`: telemetry, settings, bind, serve until a signal, drain, flush. Exit 0 after a clean
/// shutdown, 1 when the server could not start.
pub fn run(args: ServeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", ServeError::Runtime(e));
            return ExitCode::from(1);
        }
    };
    let guard = match runtime.block_on(async { telemetry::init(args.log_format) }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let settings = settings(&args)?;
        let server = Server::bind(settings).await?;
        if args.dev {
            print_dev_hint(&args, server.local_addr());
        }
        server
            .run(async {
                shutdown_signal().await;
                // A second signal means "now": skip the delay and the drain.
                tokio::spawn(async {
                    shutdown_signal().await;
                    eprintln!("second signal: exiting without draining");
                    std::process::exit(1);
                });
            })
            .await;
        Ok::<(), ServeError>(())
    });
    // Flush spans while the runtime's workers still run the exporter task.
    drop(guard);
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line either way: a JSON object for log pipelines, plain text for a person.
            if args.log_format == LogFormat::Json {
                tracing::error!(error = %e, "cannot serve");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::from(1)
        }
    }
}

fn print_dev_hint(args: &ServeArgs, addr: SocketAddr) {
    let dir = args
        .dev_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEV_CERTS_DIR));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    fn state() -> Arc<AppState> {
        Arc::new(AppState {
            policy: Arc::new(PolicyStore::load(None).unwrap()),
            cluster: None,
            metrics: Arc::new(Metrics::new()),
            ready: AtomicBool::new(true),
            limits: Limits::default(),
        })
    }

    async fn call(app: Router, method: &str, uri: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes.to_vec())
    }

    #[tokio::test]
    async fn router_answers_reviews_and_refuses_the_rest() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tekton-pipeline-task-traced.json"
        ))
        .unwrap();
        let s = state();
        let (status, body) = call(router(s.clone()), "POST", "/mutate", fixture.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["response"]["patchType"], "JSONPatch");

        let (status, body) = call(router(s.clone()), "POST", "/enforce", b"{".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 1);

        let (status, _) = call(router(s.clone()), "GET", "/mutate", Vec::new()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        let (status, _) = call(
            router(s.clone()),
            "POST",
            "/mutate",
            vec![b' '; MAX_BODY + 1],
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

        let (status, _) = call(router(s.clone()), "GET", "/readyz", Vec::new()).await;
        assert_eq!(status, StatusCode::OK);
        s.ready.store(false, Ordering::SeqCst);
        let (status, _) = call(router(s.clone()), "GET", "/readyz", Vec::new()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _) = call(router(s.clone()), "GET", "/healthz", Vec::new()).await;
        assert_eq!(status, StatusCode::OK);

        let metrics = s.metrics.encode();
        assert!(metrics.contains("admissions_total{mode=\"inject\",outcome=\"patched\"} 1"));
        assert!(metrics.contains("http_rejections_total{reason=\"too-large\"} 1"));
    }

    #[test]
    fn policy_store_keeps_the_old_policy_when_the_new_one_is_invalid() {
        let dir = std::env::temp_dir().join(format!("policy-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.yaml");
        std::fs::write(
            &path,
            "profile: otlp\nexporter:\n  endpoint: http://collector:4317\n",
        )
        .unwrap();
        let store = PolicyStore::load(Some(path.clone())).unwrap();
        let first = store.current().fingerprint();
        assert!(store.reload().is_none());
        std::fs::write(&path, "profile: nonsense\n").unwrap();
        assert!(matches!(store.reload(), Some(Err(_))));
        assert_eq!(store.current().fingerprint(), first);
        std::fs::write(&path, "profile: lightstep\n").unwrap();
        assert!(matches!(store.reload(), Some(Ok(()))));
        assert_ne!(store.current().fingerprint(), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
