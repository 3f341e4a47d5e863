//! The exporter's loop: hears what changed in the run caches, queues the runs that are due
//! ([`super::decide`]), builds their span trees, sends them, and marks each run once the
//! backend accepted its spans.
//!
//! One task owns the queue; exports run concurrently (at most `concurrency` at a time) as
//! futures it polls, each owning what it needs, so a slow backend never blocks hearing the
//! watches. Only the leader queues and sends; a standby keeps its caches current (the watch
//! runs regardless) and rescans when it becomes the leader.
//!
//! Exactly once, in practice: the annotation `lightstep-tekton.io/exported` is written (a merge
//! patch of that annotation, and the trace link, only) after the backend accepted the spans, and
//! a run that has it is never due again, for this replica, a restart or the other replica. If
//! the process dies between the backend's answer and the patch, or the patch keeps failing
//! until the leadership moves, the next leader sends that run again: a backend sees a duplicate
//! (the same span ids), never a gap. A failed patch is retried on its own, never by resending.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use k8s_openapi::jiff::Timestamp;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use super::decide::{self, EXPORTED_ANNOTATION, Finished, TRACE_URL_ANNOTATION, Window};
use super::metrics::{CAUSE_CONFIG, ExportMetrics, Skip};
use super::otlp::{self, Client, ExportError, RetryPolicy, TokenSource};
use super::queue::{Item, Queue, Stage};
use crate::cluster::Cluster;
use crate::cluster::runs::{CachedRun, MarkError, Marker, RunEvent, RunKey, RunKind, Runs};
use crate::contract::TraceId;
use crate::policy::loader::PolicyStore;
use crate::policy::selection;
use crate::policy::{Policy, Protocol};
use crate::spans::objects::{PipelineRun, TaskRun};
use crate::spans::tree::{Run, SpanTree, span_tree};
use crate::spans::{SpanError, otlp::export_request};

/// How often a PipelineRun whose TaskRuns are not all finished in the cache is looked at again:
/// Tekton finishes a PipelineRun in the same reconcile as its last TaskRun, so the cache is
/// usually a watch event behind, a second at most.
const CHILD_RECHECK: Duration = Duration::from_secs(1);

/// How long the loop waits, at shutdown, for exports in flight to get their answer and mark:
/// one OTLP attempt's timeout (10 s) and a patch, so a rolling update sends nothing twice.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Backoff between failed attempts at one run: from a second to five minutes, so an outage of
/// the backend costs a request per run every five minutes, and a recovered backend is seen
/// within that.
const RUN_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(300),
    max_server_delay: Duration::from_secs(300),
};

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
    /// The token's file (the mounted Secret key); the header name is the policy's.
    pub token_file: Option<PathBuf>,
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
    metrics: ExportMetrics,
    window: Window,
    queue: Queue,
    /// Runs printed by a dry run (nothing marks them); forgotten when they are deleted.
    printed: HashSet<RunKey>,
}

/// One OTLP client per distinct destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    endpoint: String,
    protocol: &'static str,
    header: Option<String>,
}

/// How a run's export ended (what an in-flight future returns).
enum Outcome {
    /// Sent (or skipped) and marked.
    Done(Done),
    /// The backend did not take the spans.
    ExportFailed(Item, ExportError),
    /// Accepted (or skipped) but not marked yet; only the mark is retried. What it counts is
    /// counted now (the retried mark counts nothing).
    MarkFailed(Item, Done),
}

/// What to count once a run is finished with.
struct Done {
    kind: RunKind,
    sent: Option<(Finished, u64)>,
    skipped: Option<Skip>,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = (RunKey, Outcome)> + Send>>>;

/// What the loop should do with a queued run.
enum Plan {
    /// No longer due (marked elsewhere, not finished after all, out of scope).
    Drop,
    /// Gone from the cache while due: lost.
    Lost,
    /// Look again at this time (its TaskRuns are not all finished yet).
    Wait(Instant),
    /// Send this request, then write these annotations.
    Send {
        request: ExportTraceServiceRequest,
        client: Result<Client, ()>,
        annotations: Vec<(String, String)>,
        done: Done,
    },
    /// Write these annotations only.
    Mark(Vec<(String, String)>, Done),
    /// `--dry-run`: print this line.
    Print(String),
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
            metrics,
            printed: HashSet::new(),
        }
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
        let mut rescan = tokio::time::interval(self.settings.rescan_interval);
        let mut leader = *leading.borrow_and_update();
        let mut election_alive = true;
        let mut synced = false;
        loop {
            if !synced && Controller::synced(&self.runs, &self.cluster) {
                synced = true;
                let (prs, trs) = self.runs.len();
                tracing::info!(pipeline_runs = prs, task_runs = trs, "caches synced");
                if leader {
                    self.rescan();
                }
            }
            if leader && synced {
                self.start(&mut in_flight);
            }
            self.metrics.queue_depth(self.queue.depth());
            let wake = self.queue.next_due();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some((key, outcome)) = in_flight.next() => self.finish(key, outcome),
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
                        }
                    }
                    Err(_) => {
                        election_alive = false;
                        leader = false;
                        self.queue.clear();
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
                if active && self.due(&key) {
                    self.push(key);
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
                // A run that was due and is gone before it was marked: lost.
                let due = match &run {
                    CachedRun::PipelineRun(r) => decide::pipeline_run_due(r, self.window).is_ok(),
                    CachedRun::TaskRun(r) => decide::task_run_due(r, self.window).is_ok(),
                };
                // Counted by the leader only: the standby would count the same run again.
                if active
                    && due
                    && !self.settings.dry_run
                    && self.policy_for(&key.namespace).is_some()
                {
                    tracing::warn!(run = %key, "run deleted before it was exported");
                    self.metrics.lost(key.kind);
                    self.queue.done(&key);
                }
            }
        }
    }

    /// Offers every cached run that is due to the queue (those that do not fit wait for the
    /// next rescan).
    fn rescan(&mut self) {
        self.runs.prune();
        for key in self.runs.keys() {
            if !self.queue.contains(&key) && self.due(&key) && !self.push(key) {
                break;
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
        let due = match self.runs.get(key) {
            Some(CachedRun::PipelineRun(r)) => decide::pipeline_run_due(&r, self.window).is_ok(),
            Some(CachedRun::TaskRun(r)) => decide::task_run_due(&r, self.window).is_ok(),
            None => false,
        };
        due && self.policy_for(&key.namespace).is_some()
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

    /// Starts queued runs while there is room in flight.
    fn start(&mut self, in_flight: &mut InFlight) {
        let now = Instant::now();
        while in_flight.len() < self.settings.concurrency {
            let Some((key, item)) = self.queue.pop(now) else {
                return;
            };
            let plan = match &item.stage {
                Stage::Export => self.plan(&key),
                Stage::Mark(annotations) => Plan::Mark(
                    annotations.clone(),
                    Done {
                        kind: key.kind,
                        sent: None,
                        skipped: None,
                    },
                ),
            };
            match plan {
                Plan::Drop => self.queue.done(&key),
                Plan::Lost => {
                    tracing::warn!(run = %key, "run deleted before it was exported");
                    self.metrics.lost(key.kind);
                    self.queue.done(&key);
                }
                Plan::Wait(at) => self.queue.retry_at(key, item, at),
                Plan::Print(line) => {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    self.queue.done(&key);
                    self.printed.insert(key);
                }
                Plan::Mark(annotations, done) => {
                    let marker = self.marker.clone();
                    in_flight.push(Box::pin(async move {
                        let outcome = mark(marker, &key, item, annotations, done).await;
                        (key, outcome)
                    }));
                }
                Plan::Send {
                    request,
                    client,
                    annotations,
                    done,
                } => {
                    let Ok(client) = client else {
                        self.metrics.error(CAUSE_CONFIG);
                        self.retry(key, item);
                        continue;
                    };
                    let marker = self.marker.clone();
                    in_flight.push(Box::pin(async move {
                        let outcome = match client.export(request).await {
                            Ok(_) => mark(marker, &key, item, annotations, done).await,
                            Err(e) => Outcome::ExportFailed(item, e),
                        };
                        (key, outcome)
                    }));
                }
            }
        }
    }

    /// What to do with a queued run now, from the caches.
    fn plan(&mut self, key: &RunKey) -> Plan {
        let Some(run) = self.runs.get(key) else {
            return Plan::Lost;
        };
        let Some(policy) = self.policy_for(&key.namespace) else {
            return Plan::Drop;
        };
        let (finished, task_runs) = match &run {
            CachedRun::PipelineRun(pr) => {
                let Ok(finished) = decide::pipeline_run_due(pr, self.window) else {
                    return Plan::Drop;
                };
                let (task_runs, missing) = self.children(pr);
                if missing > 0 {
                    let grace_end = finished.at
                        + k8s_openapi::jiff::SignedDuration::try_from(self.settings.child_grace)
                            .unwrap_or_default();
                    if Timestamp::now() < grace_end {
                        return Plan::Wait(Instant::now() + CHILD_RECHECK);
                    }
                    tracing::warn!(run = %key, missing, "exporting a PipelineRun without TaskRuns that did not finish in time");
                    self.metrics.missing_task_runs(missing as u64);
                }
                (finished, task_runs)
            }
            CachedRun::TaskRun(tr) => match decide::task_run_due(tr, self.window) {
                Ok(finished) => (finished, Vec::new()),
                Err(_) => return Plan::Drop,
            },
        };
        let tree = match &run {
            CachedRun::PipelineRun(pr) => span_tree(
                &Run::Pipeline {
                    pipeline_run: pr,
                    task_runs: task_runs.iter().map(Arc::as_ref).collect(),
                },
                &policy,
            ),
            CachedRun::TaskRun(tr) => span_tree(&Run::Task(tr), &policy),
        };
        let done = |sent, skipped| Done {
            kind: key.kind,
            sent,
            skipped,
        };
        let tree = match tree {
            Ok(tree) => tree,
            Err(SpanError::Input { field, .. }) => {
                tracing::warn!(run = %key, %field, "cannot build the run's spans; marking it invalid");
                if self.settings.dry_run {
                    return Plan::Drop;
                }
                let annotations = vec![(EXPORTED_ANNOTATION.to_owned(), "invalid".to_owned())];
                return Plan::Mark(annotations, done(None, Some(Skip::Invalid)));
            }
        };
        let Some(trace) = trace_of(&tree) else {
            return Plan::Drop;
        };
        if tree.spans.is_empty() {
            if self.settings.dry_run {
                return Plan::Drop;
            }
            let annotations = vec![(EXPORTED_ANNOTATION.to_owned(), format!("unsampled:{trace}"))];
            return Plan::Mark(annotations, done(None, Some(Skip::Unsampled)));
        }
        let request = export_request([&tree]);
        if self.settings.dry_run {
            // A plain struct of strings, numbers and bytes: it always serializes.
            return Plan::Print(serde_json::to_string(&request).unwrap_or_default());
        }
        let mut annotations = vec![(EXPORTED_ANNOTATION.to_owned(), trace.to_string())];
        if let Some(url) = trace_url(&policy, &run, &trace) {
            annotations.push((TRACE_URL_ANNOTATION.to_owned(), url));
        }
        Plan::Send {
            request,
            client: self.client(&policy),
            annotations,
            done: done(Some((finished, tree.spans.len() as u64)), None),
        }
    }

    /// The PipelineRun's finished TaskRuns, and how many of its children are not (yet).
    fn children(&self, pr: &PipelineRun) -> (Vec<Arc<TaskRun>>, usize) {
        let namespace = pr.metadata.namespace.as_deref().unwrap_or_default();
        let refs: Vec<&str> = pr
            .status
            .iter()
            .flat_map(|s| &s.child_references)
            .filter(|c| c.kind == "TaskRun")
            .map(|c| c.name.as_str())
            .collect();
        let candidates: Vec<Option<Arc<TaskRun>>> = match refs.is_empty() {
            // No references (an older Tekton): whatever names this PipelineRun as its owner.
            true => match pr.metadata.uid.as_deref() {
                Some(uid) => self
                    .runs
                    .task_runs_of(namespace, uid)
                    .into_iter()
                    .map(Some)
                    .collect(),
                None => Vec::new(),
            },
            false => refs
                .iter()
                .map(|name| self.runs.task_run(namespace, name))
                .collect(),
        };
        let mut missing = 0;
        let mut finished = Vec::new();
        for candidate in candidates {
            match candidate {
                Some(tr) if decide::task_run_finished(&tr).is_ok() => finished.push(tr),
                _ => missing += 1,
            }
        }
        (finished, missing)
    }

    /// The client for the policy's exporter, built once per destination.
    fn client(&mut self, policy: &Policy) -> Result<Client, ()> {
        let exporter = &policy.exporter;
        // The client speaks gRPC and HTTP/protobuf; an `http/json` receiver (OTLP/HTTP) takes
        // protobuf on the same URL.
        let (protocol, endpoint) = match exporter.protocol {
            Protocol::Grpc => ("grpc", exporter.endpoint.clone()),
            Protocol::HttpProtobuf | Protocol::HttpJson => (
                "http/protobuf",
                exporter
                    .traces_endpoint
                    .clone()
                    .unwrap_or_else(|| otlp::traces_url(&exporter.endpoint)),
            ),
        };
        let header = match (&policy.token, &self.settings.token_file) {
            (Some(token), Some(_)) => Some(token.header.clone()),
            _ => None,
        };
        let key = ClientKey {
            endpoint,
            protocol,
            header,
        };
        if let Some(client) = self.clients.get(&key) {
            return Ok(client.clone());
        }
        let settings = otlp::Settings {
            endpoint: key.endpoint.clone(),
            protocol: protocol.to_owned(),
            token_header: key.header.clone().unwrap_or_default(),
            token: key
                .header
                .as_ref()
                .and(self.settings.token_file.clone())
                .map(TokenSource::File),
            ..otlp::Settings::default()
        };
        let built = otlp::Config::new(&settings)
            .map_err(|e| e.to_string())
            .and_then(|config| Client::new(config).map_err(|e| e.to_string()));
        match built {
            Ok(client) => {
                tracing::info!(endpoint = %key.endpoint, protocol, "OTLP client for a policy's exporter");
                self.clients.insert(key, client.clone());
                Ok(client)
            }
            Err(error) => {
                tracing::warn!(policy = %policy.name, %error, "cannot build the OTLP client for the policy's exporter; retrying later");
                Err(())
            }
        }
    }

    fn finish(&mut self, key: RunKey, outcome: Outcome) {
        match outcome {
            Outcome::Done(done) => {
                self.count(&done);
                self.queue.done(&key);
            }
            Outcome::ExportFailed(item, error) => {
                self.metrics.error(error.cause().as_str());
                tracing::warn!(run = %key, cause = error.cause().as_str(), error = %error, failures = item.failures + 1, "export failed; retrying with backoff");
                self.retry(key, item);
            }
            Outcome::MarkFailed(item, done) => {
                self.count(&done);
                self.metrics.mark_error();
                self.retry(key, item);
            }
        }
    }

    fn count(&self, done: &Done) {
        if let Some((finished, spans)) = done.sent {
            let lag = Timestamp::now().duration_since(finished.at);
            let lag = Duration::try_from(lag).unwrap_or_default();
            self.metrics
                .exported(done.kind, finished.result, spans, lag);
        }
        if let Some(skip) = done.skipped {
            self.metrics.skipped(done.kind, skip);
        }
    }

    fn retry(&mut self, key: RunKey, mut item: Item) {
        item.failures = item.failures.saturating_add(1);
        let delay = RUN_RETRY.delay(item.failures, None, fastrand::f64());
        self.queue.retry_at(key, item, Instant::now() + delay);
    }
}

/// Writes the annotations; the outcome keeps what is left to do if it fails.
async fn mark(
    marker: Option<Marker>,
    key: &RunKey,
    item: Item,
    annotations: Vec<(String, String)>,
    done: Done,
) -> Outcome {
    let Some(marker) = marker else {
        return Outcome::Done(done);
    };
    let pairs: Vec<(&str, &str)> = annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match marker.mark(key, &pairs).await {
        // Gone: nothing left to mark, and the spans (if any) are in.
        Ok(()) | Err(MarkError::Gone(_)) => Outcome::Done(done),
        Err(e) => {
            tracing::warn!(error = %e, "marking an exported run failed; retrying the mark only");
            let item = Item {
                stage: Stage::Mark(annotations),
                failures: item.failures,
            };
            Outcome::MarkFailed(item, done)
        }
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

/// The run's trace: its root span's (the PipelineRun span, or a standalone TaskRun's first
/// attempt), or the unsampled trace.
fn trace_of(tree: &SpanTree) -> Option<TraceId> {
    tree.spans
        .first()
        .map(|s| s.trace_id)
        .or_else(|| tree.unsampled.first().copied())
}

/// The policy's `runSpans.traceUrl`, rendered for the run.
fn trace_url(policy: &Policy, run: &CachedRun, trace: &TraceId) -> Option<String> {
    let template = policy.run_spans.trace_url.as_ref()?;
    let trace = trace.to_string();
    let metadata = match run {
        CachedRun::PipelineRun(r) => &r.metadata,
        CachedRun::TaskRun(r) => &r.metadata,
    };
    let is_pipeline = matches!(run, CachedRun::PipelineRun(_));
    template.render(|field| match field {
        "traceId" => Some(trace.as_str()),
        "namespace" => metadata.namespace.as_deref(),
        "pipelineRun" if is_pipeline => metadata.name.as_deref(),
        "pipelineRunUid" if is_pipeline => metadata.uid.as_deref(),
        "taskRun" if !is_pipeline => metadata.name.as_deref(),
        "taskRunUid" if !is_pipeline => metadata.uid.as_deref(),
        _ => None,
    })
}
