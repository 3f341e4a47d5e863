//! `lightstep-tekton-webhook export`: the run-span exporter as a command. Its arguments, and
//! [`run`], which wires the cluster room's watches and Lease, the policy file, the admin port
//! and the [`Controller`] together; the process around it is `crate::runtime::bootstrap`'s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::{mpsc, oneshot, watch};

use super::controller::{Controller, Settings};
use super::metrics::ExportMetrics;
use crate::cluster::runs::RunWatch;
use crate::cluster::{self, ClusterArgs, EXPORTER_LEASE, LeaderElection};
use crate::policy::args::PolicyArgs;
use crate::policy::loader::{LoadError, PolicyReload, PolicyStore};
use crate::runtime::admin::{self, BindError, Readiness};
use crate::runtime::args::{AdminArgs, TelemetryArgs};
use crate::runtime::bootstrap;
use crate::runtime::metrics::{EXPORTER, Registry};

/// The admin port without `--metrics-listen`: the same port the webhook's pods use.
const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090);

/// Watch events waiting for the controller. It handles one in microseconds; 1,024 absorbs a
/// relist's burst of changes without holding the watch back, and bounds what a stalled
/// controller can make the watch hold.
const EVENT_BUFFER: usize = 1024;

/// How often the policy file is looked at for changes (as `serve` does, by default).
const POLICY_RELOAD: Duration = Duration::from_secs(10);

/// The admin port's bounds: the webhook's defaults (its `--read-timeout` is 10 s), ample for a
/// scrape or a kubelet probe; a client slower than that is cut off.
const ADMIN_LIMITS: admin::AdminLimits = admin::AdminLimits {
    max_connections: admin::MAX_CONNECTIONS,
    header_timeout: Duration::from_secs(10),
    write_timeout: Duration::from_secs(10),
};

/// Process settings of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    policy: PolicyArgs,

    /// The namespace label whose value `enabled` or `enforced` opts a namespace's runs in.
    #[arg(long, value_name = "KEY", default_value = "lightstep-tekton.io/inject")]
    namespace_label: String,

    /// Runs that finished before the exporter started are exported only if they finished
    /// within this window (e.g. 15m, 2h, 0s).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    backfill: Duration,

    /// File holding the backend's token (the mounted Secret key), re-read when it changes; the
    /// header is the policy's `token.header`. Without it, no token is sent.
    #[arg(long, value_name = "FILE", env = "LIGHTSTEP_TEKTON_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// Print each run's OTLP/JSON request on stdout (one line per run) instead of sending it;
    /// mark nothing, take no Lease.
    #[arg(long)]
    dry_run: bool,

    /// Most runs queued, backing off or in flight; runs that do not fit are found again by the
    /// periodic rescan.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    queue_capacity: u32,

    /// Most exports in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,

    /// How long after a PipelineRun finished to wait for its TaskRuns to finish in the cache
    /// before exporting it with those that did.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    child_grace: Duration,

    /// How often the caches are rescanned for due runs that did not fit in the queue (and for
    /// finalizers to release: a namespace or policy that left scope, a store deadline).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    rescan_interval: Duration,

    /// How long after a run finished the exporter's finalizer may hold its deletion while its
    /// export fails; then the run is marked `deadline`, released and counted lost. Size it
    /// above the longest backend outage to ride out, and know that a deleted run stays until
    /// then.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration,
          env = "LIGHTSTEP_TEKTON_STORE_DEADLINE")]
    store_deadline: Duration,

    /// Remove the exporter's finalizer (lightstep-tekton.io/export) from every PipelineRun and
    /// TaskRun that has it, print which, and exit: what an uninstall runs once the exporter is
    /// stopped, so no run waits on it. Exit 0 when none is left holding it. Needs list, get
    /// and patch on tekton.dev pipelineruns and taskruns; no Lease, policy or token.
    #[arg(long)]
    release_finalizers: bool,

    /// With --release-finalizers: only this namespace's runs [default: all namespaces].
    #[arg(long, value_name = "NAMESPACE", requires = "release_finalizers")]
    namespace: Option<String>,

    /// With --release-finalizers: first wait up to this long (e.g. 60s) until no exporter holds
    /// its Lease (in --lease-namespace), and fail if one still does. What the chart's hook Job
    /// uses, as the exporter's pods may still be stopping.
    #[arg(long, value_name = "DURATION", requires = "release_finalizers", value_parser = parse_duration)]
    wait_for_exporter: Option<Duration>,
    /// Permanent failures of a run's export (the backend refused the request itself: HTTP 400
    /// or 413, gRPC INVALID_ARGUMENT or RESOURCE_EXHAUSTED without RetryInfo; or the policy's
    /// exporter cannot be built) after which it is marked `rejected:<trace id>` and released.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_rejections: u32,

    /// A run's OTLP request larger than this many bytes is sent in several requests, split by
    /// span; the default is the Collector's gRPC limit (4 MiB) less 64 KiB of headroom.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024 - 64 * 1024,
          value_parser = clap::value_parser!(u64).range(65_536..=268_435_456))]
    max_request_bytes: u64,

    /// Most writes on runs (marks, finalizer holds and releases) a second, across the
    /// exporter; 0 for no limit. A 429 from the API server pauses every write for a second.
    #[arg(long, value_name = "QPS", default_value_t = 100.0,
          value_parser = parse_qps)]
    mark_qps: f64,

    /// A PEM file of CA certificates the OTLP client trusts besides the platform's roots (a
    /// private collector's CA), for every policy's destination.
    #[arg(long, value_name = "FILE", env = "LIGHTSTEP_TEKTON_OTLP_CA_FILE")]
    otlp_ca_file: Option<PathBuf>,

    /// Leader election: only the holder of the Lease exports.
    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(flatten)]
    admin: AdminArgs,

    #[command(flatten)]
    telemetry: TelemetryArgs,
}

/// Why `export` could not start; each message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("--otlp-ca-file: cannot read {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// `export`: watch, elect, export until a signal. Exit 0 after a clean shutdown. With
/// `--release-finalizers`, the one-shot of [`super::release`] instead.
pub fn run(args: ExportArgs) -> ExitCode {
    if args.release_finalizers {
        let wait = args
            .wait_for_exporter
            .map(|limit| (args.cluster.clone(), limit));
        return super::release::run(args.namespace, wait, &args.telemetry);
    }
    let telemetry = args.telemetry.clone();
    bootstrap::run("export", &telemetry, |shutdown| async move {
        if let Some(path) = &args.otlp_ca_file
            && let Err(e) = std::fs::read(path)
        {
            return Err(ExportError::CaFile {
                path: path.display().to_string(),
                reason: e.kind().to_string(),
            });
        }
        let policy = Arc::new(PolicyStore::load(args.policy.policy.clone()));
        if let Some(reason) = policy.refused() {
            tracing::error!(%reason, "the policy file is invalid: only runs a TracingPolicy selects are exported until it is fixed");
        }
        let mut registry = Registry::new();
        let component = registry.component(EXPORTER);
        let metrics = ExportMetrics::register(component);
        let watch = RunWatch::connect(args.policy.watch_tracing_policies, component).await?;
        let election = match args.dry_run {
            true => None,
            false => Some(LeaderElection::new(
                watch.client(),
                args.cluster.lease(EXPORTER_LEASE)?,
                component,
            )),
        };
        let listen = args.admin.metrics_listen.unwrap_or(DEFAULT_METRICS_LISTEN);
        let listener = admin::bind("--metrics-listen", listen).await?;
        let settings = Settings {
            namespace_label: args.namespace_label.clone(),
            backfill: args.backfill,
            child_grace: args.child_grace,
            queue_capacity: args.queue_capacity as usize,
            concurrency: args.concurrency as usize,
            rescan_interval: args.rescan_interval,
            store_deadline: args.store_deadline,
            max_rejections: args.max_rejections,
            max_request_bytes: usize::try_from(args.max_request_bytes).unwrap_or(usize::MAX),
            token_file: args.token_file.clone(),
            ca_file: args.otlp_ca_file.clone(),
            dry_run: args.dry_run,
        };
        let (runs, cluster) = (watch.runs(), watch.cluster());
        let marker = (!args.dry_run).then(|| watch.marker(args.mark_qps));
        let controller = Controller::new(
            settings,
            runs.clone(),
            cluster.clone(),
            policy.clone(),
            marker,
            metrics,
        );
        // A standby is ready too: it has its caches and takes over without a restart.
        let ready: Readiness = Arc::new(move || Controller::synced(&runs, &cluster));
        let heartbeat = controller.heartbeat();
        let live: Readiness = Arc::new(move || heartbeat.alive());
        let admin = tokio::spawn(admin::serve_with_probes(
            listener,
            Arc::new(registry),
            ready,
            live,
            ADMIN_LIMITS,
        ));
        // A dry run leads from the start, alone; the sender lives as long as the command.
        let (_always, always) = watch::channel(true);
        let leading = election.as_ref().map_or(always, LeaderElection::subscribe);
        tracing::info!(dry_run = args.dry_run, backfill_s = args.backfill.as_secs(), policy = %policy.current().map(|p| p.marker().to_owned()).unwrap_or_else(|| "none (invalid file)".to_owned()), "exporter starting");
        let (events, received) = mpsc::channel(EVENT_BUFFER);
        let (stop, stopped) = oneshot::channel::<()>();
        let work = async move {
            tokio::select! {
                () = watch.run(events) => {}
                () = controller.run(received, leading, shutdown.requested()) => {}
                () = reload_policy(policy) => {}
            }
            // Exporting has stopped; now the Lease may go.
            let _ = stop.send(());
        };
        let campaign = async move {
            if let Some(election) = election {
                election
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await;
            }
        };
        tokio::join!(work, campaign);
        admin.abort();
        Ok::<(), ExportError>(())
    })
}

/// Re-reads the policy file every [`POLICY_RELOAD`]; never returns.
async fn reload_policy(policy: Arc<PolicyStore>) {
    let mut tick = tokio::time::interval(POLICY_RELOAD);
    loop {
        tick.tick().await;
        let store = policy.clone();
        match tokio::task::spawn_blocking(move || store.reload()).await {
            Ok(PolicyReload::Applied { fingerprint }) => {
                tracing::info!(%fingerprint, "policy reloaded");
            }
            Ok(PolicyReload::Refused(reason) | PolicyReload::StillRefused(reason)) => {
                tracing::warn!(%reason, "policy file refused; keeping the previous one (or none)");
            }
            Ok(PolicyReload::Unchanged) | Err(_) => {}
        }
    }
}

/// `90`, `90s`, `15m`, `2h`: a whole number of seconds, minutes or hours.
/// A rate: a finite number, 0 or more.
fn parse_qps(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(qps) if qps.is_finite() && qps >= 0.0 => Ok(qps),
        _ => Err("expected a number of writes a second, 0 or more (0: no limit)".to_owned()),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| "expected a whole number followed by s, m or h (e.g. 15m)".to_owned())?;
    let seconds = match unit {
        "s" => Some(number),
        "m" => number.checked_mul(60),
        "h" => number.checked_mul(3600),
        _ => None,
    };
    seconds
        .map(Duration::from_secs)
        .ok_or_else(|| "expected a whole number followed by s, m or h (e.g. 15m)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("-5m").is_err());
    }
}
