//! The exporter's loop: hears what changed in the run caches, queues the runs that are due
//! ([`super::decide`]), builds their span trees, sends them, and marks each run once the
//! backend accepted its spans.
//!
//! One task owns the queue; exports run concurrently (at most `concurrency` at a time) as
//! futures it polls, each owning what it needs, so a slow backend never blocks hearing the
//! watches. Only the leader queues and sends; a standby keeps its caches current (the watch
//! runs regardless) and rescans when it becomes the leader.
//!
//! Exactly once, in practice: the annotation `lightstep-tekton.io/exported` is written (a JSON
//! Patch of that annotation and the trace link, removing the exporter's finalizer, conditional
//! on the run's uid) after the backend accepted the spans, and a run that has it is never due
//! again, for this replica, a restart or the other replica. The finalizer (`finalizer`) keeps a
//! deleted run in the cluster until then, or until its store deadline. If
//! the process dies between the backend's answer and the patch, or the patch keeps failing
//! until the leadership moves, the next leader sends that run again: a backend sees a duplicate
//! (the same span ids), never a gap. A failed patch is retried on its own, never by resending.
//!
//! Here: the loop, and which runs are due and in scope. `plan` says what to do with a queued
//! run; `flight` starts it and settles its outcome; `finalizer` holds and releases the
//! exporter's finalizer; `clients` holds one OTLP client per destination.

mod clients;
mod finalizer;
mod flight;
mod heartbeat;
mod plan;

pub use self::heartbeat::Heartbeat;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use self::clients::{Backoffs, ClientKey};
use self::finalizer::{Finalizers, Writes};
use self::flight::InFlight;
use super::decide::{self, Window};
use super::metrics::{ExportMetrics, Lost};
use super::queue::Queue;
use crate::cluster::Cluster;
use crate::cluster::runs::{CachedRun, Marker, RunEvent, RunKey, RunKind, Runs, holds_finalizer};
use crate::otlp::Client;
use crate::policy::Policy;
use crate::policy::loader::PolicyStore;
use crate::policy::selection;

/// How long the loop waits, at shutdown, for exports in flight to get their answer and mark:
/// one OTLP attempt's timeout (10 s) and a patch, so a rolling update sends nothing twice.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// The controller's settings (from `export`'s flags, or a test's).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The namespace label that opts a namespace in (`enabled` or `enforced`).
    pub namespace_label: String,
    pub backfill: Duration,
    /// How long after a PipelineRun finished its TaskRuns may still be unfinished in the cache
    /// before it is exported with those that are (the others counted as missing).
    pub child_grace: Duration,
    pub queue_capacity: usize,
    pub concurrency: usize,
    pub rescan_interval: Duration,
    /// How long after a run finished the exporter's finalizer may hold it unexported; then the
    /// run is given up on and released.
    pub store_deadline: Duration,
    /// Permanent failures (the backend refused the request itself; no client for the policy's
    /// exporter) after which a run is given up on and marked `rejected:<trace id>`.
    pub max_rejections: u32,
    /// A run's request larger than this many encoded bytes is sent in several parts.
    pub max_request_bytes: usize,
    /// The token's file (the mounted Secret key); the header name is the policy's.
    pub token_file: Option<PathBuf>,
    /// CA certificates the OTLP clients trust besides the platform's (`--otlp-ca-file`).
    pub ca_file: Option<PathBuf>,
    /// Print each run's OTLP/JSON request on stdout, one line per run; send and mark nothing.
    pub dry_run: bool,
}

/// See the module documentation.
pub struct Controller {
    settings: Settings,
    runs: Arc<Runs>,
    cluster: Arc<Cluster>,
    policy: Arc<PolicyStore>,
    /// `None` with `--dry-run`.
    marker: Option<Marker>,
    clients: HashMap<ClientKey, Client>,
    backoffs: Backoffs,
    metrics: ExportMetrics,
    window: Window,
    queue: Queue,
    /// Runs printed by a dry run (nothing marks them); forgotten when they are deleted.
    printed: HashSet<RunKey>,
    finalizers: Finalizers,
    heartbeat: Heartbeat,
}

impl Controller {
    pub fn new(
        settings: Settings,
        runs: Arc<Runs>,
        cluster: Arc<Cluster>,
        policy: Arc<PolicyStore>,
        marker: Option<Marker>,
        metrics: ExportMetrics,
    ) -> Controller {
        let settings_rescan = settings.rescan_interval;
        Controller {
            window: Window {
                started: Timestamp::now(),
                backfill: settings.backfill,
            },
            queue: Queue::new(settings.queue_capacity),
            settings,
            runs,
            cluster,
            policy,
            marker,
            clients: HashMap::new(),
            backoffs: Backoffs::default(),
            metrics,
            printed: HashSet::new(),
            heartbeat: Heartbeat::new(settings_rescan),
            finalizers: Finalizers::default(),
        }
    }

    /// The loop's heartbeat (for `/healthz`).
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Both the run caches and the namespace (and policy) caches have been listed.
    pub fn synced(runs: &Runs, cluster: &Cluster) -> bool {
        runs.synced() && cluster.synced()
    }

    /// Runs until `shutdown`; then waits (at most `SHUTDOWN_GRACE`) for exports in flight.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<RunEvent>,
        mut leading: watch::Receiver<bool>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut shutdown = pin!(shutdown);
        let mut in_flight: InFlight = FuturesUnordered::new();
        let mut writes: Writes = FuturesUnordered::new();
        let mut rescan = tokio::time::interval(self.settings.rescan_interval);
        let mut leader = *leading.borrow_and_update();
        let mut election_alive = true;
        let mut synced = false;
        loop {
            self.heartbeat.beat();
            if !synced && Controller::synced(&self.runs, &self.cluster) {
                synced = true;
                let (prs, trs) = self.runs.len();
                tracing::info!(pipeline_runs = prs, task_runs = trs, "caches synced");
                if leader {
                    self.rescan();
                }
            }
            if leader && synced {
                self.start_writes(&mut writes);
                self.start(&mut in_flight);
            }
            self.metrics.queue_depth(self.queue.depth());
            // The timer is armed only when a run whose time has come could start: with every
            // slot busy the next finished export wakes the loop, and a standby has nothing to
            // start. A due time in the past would otherwise fire at once, every turn.
            let can_start = leader && synced && in_flight.len() < self.settings.concurrency;
            let wake = self.queue.next_due().filter(|_| can_start);
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some((key, outcome)) = in_flight.next() => self.finish(key, outcome),
                Some((key, intent, result)) = writes.next() => self.written(key, intent, result),
                event = events.recv() => match event {
                    Some(event) => self.on_event(event, leader && synced),
                    // The watch ended: nothing more will change; keep exporting what is queued.
                    None => std::future::pending::<()>().await,
                },
                changed = leading.changed(), if election_alive => match changed {
                    Ok(()) => {
                        leader = *leading.borrow_and_update();
                        if leader {
                            if synced {
                                self.rescan();
                            }
                        } else {
                            self.queue.clear();
                            self.finalizers.clear();
                        }
                    }
                    Err(_) => {
                        election_alive = false;
                        leader = false;
                        self.queue.clear();
                        self.finalizers.clear();
                    }
                },
                _ = rescan.tick() => if leader && synced { self.rescan() },
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
        }
        let drain = async {
            while let Some((key, outcome)) = in_flight.next().await {
                self.finish(key, outcome);
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!(
                "exports still in flight at shutdown; the next leader may send them again"
            );
        }
    }

    fn on_event(&mut self, event: RunEvent, active: bool) {
        match event {
            RunEvent::Changed(key) => {
                if active {
                    self.upkeep(&key, true);
                    // A run whose finalizer write is pending is queued once it settles (its
                    // next event), so the mark's patch sees the finalizer it removes.
                    if !self.finalizers.busy(&key) && self.due(&key) {
                        self.push(key);
                    }
                }
            }
            RunEvent::Relisted(_) => {
                self.runs.prune();
                if active {
                    self.rescan();
                }
            }
            RunEvent::Deleted(run) => {
                let key = key_of(&run);
                self.printed.remove(&key);
                self.finalizers.forget(&key);
                if let (true, CachedRun::PipelineRun(pr)) = (active, &run) {
                    self.upkeep_orphans(pr);
                }
                // A run that was due and is gone before it was marked: lost, if no finalizer
                // of ours held it (it was deleted before the exporter saw it, or after it was
                // released at its deadline, counted then). One our finalizer held went when a
                // write removed it (the API server deletes the run instead of storing that
                // write, so its last state shows neither the mark nor the removal): the mark
                // and release, or a release, counted where they were written.
                // Counted by the leader only: the standby would count the same run again.
                if active
                    && !self.settings.dry_run
                    && !holds_finalizer(metadata_of(&run))
                    && self.due_run(&key, &run)
                {
                    tracing::warn!(run = %key, "run deleted before it was exported");
                    self.metrics.lost(key.kind, Lost::Deleted);
                    self.queue.done(&key);
                }
            }
        }
    }

    /// Offers every cached run that is due to the queue (those that do not fit wait for the
    /// next rescan).
    fn rescan(&mut self) {
        self.runs.prune();
        let mut room = true;
        for key in self.runs.keys() {
            self.upkeep(&key, false);
            if room && !self.queue.contains(&key) && !self.finalizers.busy(&key) && self.due(&key) {
                room = self.push(key);
            }
        }
    }

    fn push(&mut self, key: RunKey) -> bool {
        if self.settings.dry_run && self.printed.contains(&key) {
            return true;
        }
        self.queue.push(key)
    }

    /// Due by itself and in scope (the PipelineRun's TaskRuns are waited for later).
    fn due(&self, key: &RunKey) -> bool {
        self.runs
            .get(key)
            .is_some_and(|run| self.due_run(key, &run))
    }

    /// Due by itself, in scope, and sampled: a run whose trace is not sampled gets no write.
    fn due_run(&self, key: &RunKey, run: &CachedRun) -> bool {
        let (due, metadata) = match run {
            CachedRun::PipelineRun(r) => (
                decide::pipeline_run_due(r, self.window).is_ok(),
                &r.metadata,
            ),
            CachedRun::TaskRun(r) => (decide::task_run_due(r, self.window).is_ok(), &r.metadata),
        };
        due && self
            .policy_for(&key.namespace)
            .is_some_and(|policy| decide::sampled(metadata, &policy))
    }

    /// The policy the namespace's runs are exported under, if they are. Without a file policy
    /// (invalid since the start), TracingPolicies still apply, and elsewhere nothing is exported:
    /// the exporter never guesses an endpoint, as the webhook never injects one.
    fn policy_for(&self, namespace: &str) -> Option<Policy> {
        let fallback = self.policy.current();
        let snapshot = self.cluster.snapshot();
        let labels = self.cluster.labels(namespace);
        let selected = match fallback.as_deref() {
            Some(fallback) => self.cluster.select(&snapshot, namespace, fallback),
            None => selection::select_tracing_policy(&snapshot, labels.as_ref())?,
        };
        decide::in_scope(labels.as_ref(), &self.settings.namespace_label, selected).cloned()
    }
}

fn metadata_of(run: &CachedRun) -> &crate::spans::objects::Metadata {
    match run {
        CachedRun::PipelineRun(r) => &r.metadata,
        CachedRun::TaskRun(r) => &r.metadata,
    }
}

fn key_of(run: &CachedRun) -> RunKey {
    let (kind, metadata) = match run {
        CachedRun::PipelineRun(r) => (RunKind::PipelineRun, &r.metadata),
        CachedRun::TaskRun(r) => (RunKind::TaskRun, &r.metadata),
    };
    RunKey {
        kind,
        namespace: metadata.namespace.clone().unwrap_or_default(),
        name: metadata.name.clone().unwrap_or_default(),
    }
}
