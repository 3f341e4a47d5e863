//! Watch caches of `tekton.dev/v1` PipelineRuns and TaskRuns for the exporter, and the one write
//! it makes on them: the merge patch of its annotations.
//!
//! Runs are decoded by the watcher into a wrapper of the span tree's lean status types
//! ([`crate::spans::objects`]), so a run's spec, the resolved pipeline and task specs Tekton
//! copies into `status`, results and provenance are skipped while decoding; the metadata is then
//! cut down to what the tree reads (name, namespace, uid, creation time, labels, annotations
//! without `kubectl`'s last-applied copy) before the run enters the cache. The caches are plain
//! maps keyed by namespace and name, not reflector stores: a reflector keeps the whole
//! `ObjectMeta` of every object, which on a cluster with 50,000 TaskRuns is most of the memory.
//!
//! A run that carries the exporter's mark is kept as a stub (name, uid, the mark), and the
//! TaskRuns of a marked PipelineRun are not kept at all: on a cluster that keeps weeks of runs,
//! nearly all of them are done with, and the cache holds kilobytes only for runs still to send.
//!
//! The watch loop ([`RunWatch::run`]) also keeps the namespace and TracingPolicy caches of
//! [`super::Caches`] current, and tells the exporter what changed through a bounded channel
//! ([`RunEvent`]); the exporter keeps no copy of its own.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt as _;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Caches, Cluster, ClusterError, ClusterMetrics, WatchedResource};
use crate::contract::tekton::{PIPELINE_RUN, PIPELINE_RUN_UID};
use crate::spans::objects::{Metadata, PipelineRun, PipelineRunStatus, TaskRun, TaskRunStatus};

/// Set on a run once the backend accepted its spans: the trace id (or `unsampled:<trace id>`,
/// or `invalid`). A run that has it is never exported again, and the cache keeps only a stub.
pub const EXPORTED_ANNOTATION: &str = "lightstep-tekton.io/exported";

/// The annotation `kubectl apply` keeps a whole copy of the object in; the tree never reads it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Which kind of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunKind {
    PipelineRun,
    TaskRun,
}

impl RunKind {
    /// The `kind` metric label: the resource's plural name, as in RBAC rules.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::PipelineRun => "pipelinerun",
            RunKind::TaskRun => "taskrun",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            RunKind::PipelineRun => "pipelineruns",
            RunKind::TaskRun => "taskruns",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            RunKind::PipelineRun => "PipelineRun",
            RunKind::TaskRun => "TaskRun",
        }
    }
}

/// A run's address: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    pub kind: RunKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.kind(), self.namespace, self.name)
    }
}

/// What the watch loop tells the exporter.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// A run was added or changed; the cache holds its new state.
    Changed(RunKey),
    /// A run was deleted; its last state as the cache held it.
    Deleted(CachedRun),
    /// A kind was (re)listed: the cache was replaced, and runs deleted while the watch was down
    /// vanished without an event.
    Relisted(RunKind),
}

/// A cached run.
#[derive(Debug, Clone)]
pub enum CachedRun {
    PipelineRun(Arc<PipelineRun>),
    TaskRun(Arc<TaskRun>),
}

/// The read side of the run caches, shared with the exporter.
#[derive(Debug, Default)]
pub struct Runs {
    pipeline_runs: RwLock<HashMap<(String, String), Stored<PipelineRun>>>,
    task_runs: RwLock<HashMap<(String, String), Stored<TaskRun>>>,
    pipeline_runs_synced: AtomicBool,
    task_runs_synced: AtomicBool,
}

impl Runs {
    /// Both kinds have been listed once (stays true across relists).
    pub fn synced(&self) -> bool {
        self.pipeline_runs_synced.load(Ordering::SeqCst)
            && self.task_runs_synced.load(Ordering::SeqCst)
    }

    pub fn pipeline_run(&self, namespace: &str, name: &str) -> Option<Arc<PipelineRun>> {
        read(&self.pipeline_runs)
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(Stored::load)
    }

    pub fn task_run(&self, namespace: &str, name: &str) -> Option<Arc<TaskRun>> {
        read(&self.task_runs)
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(Stored::load)
    }

    /// Every cached run's key, for a rescan.
    pub fn keys(&self) -> Vec<RunKey> {
        let key = |kind, (namespace, name): &(String, String)| RunKey {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        };
        let mut keys: Vec<RunKey> = read(&self.pipeline_runs)
            .keys()
            .map(|k| key(RunKind::PipelineRun, k))
            .collect();
        keys.extend(
            read(&self.task_runs)
                .keys()
                .map(|k| key(RunKind::TaskRun, k)),
        );
        keys
    }

    /// The TaskRuns whose `tekton.dev/pipelineRunUID` label is `uid`, for a PipelineRun whose
    /// status lists no children (a scan: only for that rare case).
    pub fn task_runs_of(&self, namespace: &str, uid: &str) -> Vec<Arc<TaskRun>> {
        read(&self.task_runs)
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .filter_map(|(_, stored)| stored.load())
            .filter(|run| run.metadata.label(PIPELINE_RUN_UID) == Some(uid))
            .collect()
    }

    /// Runs cached, by kind (for the benchmark and the log).
    pub fn len(&self) -> (usize, usize) {
        (read(&self.pipeline_runs).len(), read(&self.task_runs).len())
    }

    /// Whether the TaskRun's PipelineRun (by its `tekton.dev/pipelineRun` and `pipelineRunUID`
    /// labels) is in the cache and marked.
    fn parent_marked(&self, task_run: &TaskRun) -> bool {
        let (Some(name), Some(uid)) = (
            task_run.metadata.label(PIPELINE_RUN),
            task_run.metadata.label(PIPELINE_RUN_UID),
        ) else {
            return false;
        };
        let namespace = task_run.metadata.namespace.clone().unwrap_or_default();
        read(&self.pipeline_runs)
            .get(&(namespace, name.to_owned()))
            .and_then(Stored::load)
            .is_some_and(|pr| pr.metadata.uid.as_deref() == Some(uid) && marked(&pr.metadata))
    }

    /// Drops the TaskRuns whose PipelineRun is marked (those that arrived before it did, say in
    /// a relist); what is left in the cache is what may still be exported.
    pub fn prune(&self) {
        let stale: Vec<(String, String)> = read(&self.task_runs)
            .iter()
            .filter(|(_, stored)| stored.load().is_some_and(|run| self.parent_marked(&run)))
            .map(|(key, _)| key.clone())
            .collect();
        if stale.is_empty() {
            return;
        }
        let mut task_runs = write(&self.task_runs);
        for key in stale {
            task_runs.remove(&key);
        }
    }

    /// A lookup of `key` in the cache.
    pub fn get(&self, key: &RunKey) -> Option<CachedRun> {
        match key.kind {
            RunKind::PipelineRun => self
                .pipeline_run(&key.namespace, &key.name)
                .map(CachedRun::PipelineRun),
            RunKind::TaskRun => self
                .task_run(&key.namespace, &key.name)
                .map(CachedRun::TaskRun),
        }
    }
}

/// What LZ4 may refer back to before the first byte of each run: the keys and common values of
/// a Tekton run as the lean types serialize it. A run alone is too short to repeat much of
/// itself; with this, most of its keys cost a few bytes each.
const DICTIONARY: &[u8] = br#"{"metadata":{"name":"-run-","namespace":"","uid":"-4-4-8-","creationTimestamp":"2026-01-01T00:00:00Z","labels":{"app.kubernetes.io/component":"deploy","app.kubernetes.io/managed-by":"tekton-pipelines","pipelinesascode.tekton.dev/branch":"main","pipelinesascode.tekton.dev/event-type":"push","pipelinesascode.tekton.dev/sender":"","pipelinesascode.tekton.dev/sha":"","pipelinesascode.tekton.dev/url-org":"","pipelinesascode.tekton.dev/url-repository":"","tekton.dev/memberOf":"tasks","tekton.dev/pipeline":"","tekton.dev/pipelineRun":"","tekton.dev/pipelineRunUID":"","tekton.dev/pipelineTask":"","tekton.dev/task":"","triggers.tekton.dev/eventlistener":"","triggers.tekton.dev/trigger":"","triggers.tekton.dev/triggers-eventid":""},"annotations":{"pipeline.tekton.dev/release":"","pipelinesascode.tekton.dev/log-url":"https://","pipelinesascode.tekton.dev/repo-url":"https://github.com/","pipelinesascode.tekton.dev/sha-title":"","tekton.dev/taskrunSpanContext":"{\"traceparent\":\"00-"}},"status":{"conditions":[{"type":"Succeeded","status":"True","reason":"Succeeded","message":"All Steps have completed executing","lastTransitionTime":"2026-"}],"podName":"-pod","startTime":"2026-","completionTime":"2026-","steps":[{"name":"","container":"step-","terminated":{"exitCode":0,"reason":"Completed","startedAt":"2026-","finishedAt":"2026-"},"terminationReason":"Completed"}],"retriesStatus":[],"spanContext":null,"childReferences":[{"kind":"TaskRun","name":""}]}}"#;

/// A cached run: a stub as it is (small), anything else as LZ4-compressed JSON, decoded when
/// read. A TaskRun waiting to be exported is about 4.5 KB as structs (its label and annotation
/// maps above all) and under 600 bytes stored so: with a burst of 50,000 TaskRuns waiting, the
/// exporter's peak RSS went from 283 MB to 63 MB (`cargo bench --bench export`).
struct Stored<T> {
    inner: StoredForm<T>,
}

enum StoredForm<T> {
    Plain(Arc<T>),
    Packed(Box<[u8]>),
}

impl<T: Lean + Serialize + DeserializeOwned> Stored<T> {
    fn new(run: T) -> Stored<T> {
        let inner = match run.metadata().labels.is_none() {
            // A stub: nothing to gain.
            true => StoredForm::Plain(Arc::new(run)),
            false => match serde_json::to_vec(&run) {
                Ok(json) => StoredForm::Packed(
                    lz4_flex::block::compress_prepend_size_with_dict(&json, DICTIONARY).into(),
                ),
                Err(_) => StoredForm::Plain(Arc::new(run)),
            },
        };
        Stored { inner }
    }

    /// The run; `None` only if its bytes no longer decode, which our own writing never causes.
    fn load(&self) -> Option<Arc<T>> {
        match &self.inner {
            StoredForm::Plain(run) => Some(run.clone()),
            StoredForm::Packed(bytes) => {
                let json =
                    lz4_flex::block::decompress_size_prepended_with_dict(bytes, DICTIONARY).ok()?;
                serde_json::from_slice(&json).ok().map(Arc::new)
            }
        }
    }
}

impl<T> std::fmt::Debug for Stored<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stored")
    }
}

/// A poisoned lock still holds a complete map: writers only insert, remove or swap.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// A run as the watcher decodes it: the full `ObjectMeta` (kube's watcher tracks resource
/// versions through it) and the lean status. Lives only until it is trimmed into the cache.
#[derive(Debug, Clone, Deserialize)]
pub struct Watched<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    status: Option<S>,
}

/// Which kind a status type belongs to, for the watcher's URL.
pub trait RunStatus {
    const KIND: RunKind;
}

impl RunStatus for PipelineRunStatus {
    const KIND: RunKind = RunKind::PipelineRun;
}

impl RunStatus for TaskRunStatus {
    const KIND: RunKind = RunKind::TaskRun;
}

impl<S: RunStatus> kube::Resource for Watched<S> {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        S::KIND.kind().into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "tekton.dev".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        S::KIND.plural().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the tree reads of the metadata.
fn trim(meta: ObjectMeta) -> Metadata {
    let mut annotations = meta.annotations;
    if let Some(a) = annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    Metadata {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        creation_timestamp: meta.creation_timestamp,
        labels: meta.labels,
        annotations,
    }
}

/// The lean run a watched object becomes.
trait Lean: Sized {
    type Status: RunStatus;
    fn from_watched(watched: Watched<Self::Status>) -> Self;
    fn metadata(&self) -> &Metadata;
    fn map(runs: &Runs) -> &RwLock<HashMap<(String, String), Stored<Self>>>;
    fn synced(runs: &Runs) -> &AtomicBool;
    fn cached(run: Arc<Self>) -> CachedRun;
    /// What the cache keeps of a run: the run, a stub once it is marked, or nothing for a
    /// TaskRun whose PipelineRun is marked (the exporter never needs it again).
    fn compact(self, runs: &Runs) -> Option<Self>;
}

impl Lean for PipelineRun {
    type Status = PipelineRunStatus;
    fn from_watched(w: Watched<PipelineRunStatus>) -> Self {
        PipelineRun {
            metadata: trim(w.metadata),
            status: w.status,
        }
    }
    fn metadata(&self) -> &Metadata {
        &self.metadata
    }
    fn map(runs: &Runs) -> &RwLock<HashMap<(String, String), Stored<Self>>> {
        &runs.pipeline_runs
    }
    fn synced(runs: &Runs) -> &AtomicBool {
        &runs.pipeline_runs_synced
    }
    fn cached(run: Arc<Self>) -> CachedRun {
        CachedRun::PipelineRun(run)
    }
    fn compact(self, runs: &Runs) -> Option<Self> {
        if !marked(&self.metadata) {
            return Some(self);
        }
        // Its TaskRuns went with it: drop them from the cache.
        let namespace = self.metadata.namespace.clone().unwrap_or_default();
        let mut task_runs = write(&runs.task_runs);
        for child in self.status.iter().flat_map(|s| &s.child_references) {
            task_runs.remove(&(namespace.clone(), child.name.clone()));
        }
        drop(task_runs);
        Some(PipelineRun {
            metadata: stub(self.metadata),
            status: None,
        })
    }
}

impl Lean for TaskRun {
    type Status = TaskRunStatus;
    fn from_watched(w: Watched<TaskRunStatus>) -> Self {
        TaskRun {
            metadata: trim(w.metadata),
            status: w.status,
        }
    }
    fn metadata(&self) -> &Metadata {
        &self.metadata
    }
    fn map(runs: &Runs) -> &RwLock<HashMap<(String, String), Stored<Self>>> {
        &runs.task_runs
    }
    fn synced(runs: &Runs) -> &AtomicBool {
        &runs.task_runs_synced
    }
    fn cached(run: Arc<Self>) -> CachedRun {
        CachedRun::TaskRun(run)
    }
    fn compact(self, runs: &Runs) -> Option<Self> {
        if marked(&self.metadata) {
            return Some(TaskRun {
                metadata: stub(self.metadata),
                status: None,
            });
        }
        match runs.parent_marked(&self) {
            true => None,
            false => Some(self),
        }
    }
}

/// Whether the run carries the exporter's mark.
fn marked(metadata: &Metadata) -> bool {
    metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(EXPORTED_ANNOTATION))
}

/// A marked run as the cache keeps it: its name, uid and the mark (a few hundred bytes, where
/// the run was kilobytes), enough to know it is done.
fn stub(metadata: Metadata) -> Metadata {
    let annotations = metadata.annotations.and_then(|mut a| {
        let mark = a.remove(EXPORTED_ANNOTATION)?;
        Some(std::collections::BTreeMap::from([(
            EXPORTED_ANNOTATION.to_owned(),
            mark,
        )]))
    });
    Metadata {
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        creation_timestamp: None,
        labels: None,
        annotations,
    }
}

fn map_key(metadata: &Metadata) -> (String, String) {
    (
        metadata.namespace.clone().unwrap_or_default(),
        metadata.name.clone().unwrap_or_default(),
    )
}

fn run_key(kind: RunKind, (namespace, name): (String, String)) -> RunKey {
    RunKey {
        kind,
        namespace,
        name,
    }
}

/// The write side of one kind's cache: a relist is buffered until it is complete, as a
/// reflector does, so the cache never shows half a list.
struct Writer<L> {
    buffer: Option<HashMap<(String, String), Stored<L>>>,
}

impl<L: Lean + Serialize + DeserializeOwned> Writer<L> {
    fn new() -> Self {
        Writer { buffer: None }
    }

    /// Applies one event; what the exporter should hear of it.
    fn apply(&mut self, runs: &Runs, event: Event<Watched<L::Status>>) -> Option<RunEvent> {
        let kind = L::Status::KIND;
        match event {
            Event::Init => {
                self.buffer = Some(HashMap::new());
                None
            }
            Event::InitApply(w) => {
                if let Some(run) = L::from_watched(w).compact(runs) {
                    self.buffer
                        .get_or_insert_with(HashMap::new)
                        .insert(map_key(run.metadata()), Stored::new(run));
                }
                None
            }
            Event::InitDone => {
                let listed = self.buffer.take().unwrap_or_default();
                *write(L::map(runs)) = listed;
                L::synced(runs).store(true, Ordering::SeqCst);
                Some(RunEvent::Relisted(kind))
            }
            Event::Apply(w) => {
                let run = L::from_watched(w);
                let key = map_key(run.metadata());
                let Some(run) = run.compact(runs) else {
                    write(L::map(runs)).remove(&key);
                    return None;
                };
                write(L::map(runs)).insert(key.clone(), Stored::new(run));
                Some(RunEvent::Changed(run_key(kind, key)))
            }
            Event::Delete(w) => {
                let run = L::from_watched(w);
                let key = map_key(run.metadata());
                let last = write(L::map(runs)).remove(&key).and_then(|s| s.load());
                let last = last.unwrap_or_else(|| Arc::new(run));
                Some(RunEvent::Deleted(L::cached(last)))
            }
        }
    }
}

/// The exporter's API connection: its caches (runs, namespaces, and TracingPolicies when asked
/// for) and its one write.
pub struct RunWatch {
    client: Client,
    caches: Caches,
    runs: Arc<Runs>,
    metrics: ClusterMetrics,
    watch_policies: bool,
}

impl RunWatch {
    /// Configures the client from the in-cluster service account, or KUBECONFIG outside a
    /// cluster, and registers `watch_errors_total` in `registry`. Nothing is requested yet.
    pub async fn connect(
        watch_policies: bool,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<RunWatch, ClusterError> {
        let client = Client::try_default()
            .await
            .map_err(ClusterError::ConnectRuns)?;
        let mut resources = vec![
            WatchedResource::PipelineRuns,
            WatchedResource::TaskRuns,
            WatchedResource::Namespaces,
        ];
        if watch_policies {
            resources.push(WatchedResource::TracingPolicies);
        }
        Ok(RunWatch {
            client,
            caches: Caches::new(),
            runs: Arc::new(Runs::default()),
            metrics: ClusterMetrics::register_watches(registry, &resources),
            watch_policies,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Namespaces and TracingPolicies, for selection.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.caches.cluster()
    }

    pub fn runs(&self) -> Arc<Runs> {
        self.runs.clone()
    }

    /// The annotation writer.
    pub fn marker(&self) -> Marker {
        Marker {
            client: self.client.clone(),
        }
    }

    /// Watches until the task is dropped (every stream retries forever with backoff), sending
    /// what changed to `events`; waits for the exporter when it is behind (the channel is
    /// bounded), which slows the watch rather than growing memory.
    pub async fn run(self, events: mpsc::Sender<RunEvent>) {
        let RunWatch {
            client,
            mut caches,
            runs,
            metrics,
            watch_policies,
        } = self;
        let config = watcher::Config::default();
        let pipeline_runs = watcher::watcher(
            Api::<Watched<PipelineRunStatus>>::all(client.clone()),
            config.clone(),
        )
        .default_backoff();
        let task_runs = watcher::watcher(
            Api::<Watched<TaskRunStatus>>::all(client.clone()),
            config.clone(),
        )
        .default_backoff();
        let mut pipeline_runs = pin!(pipeline_runs);
        let mut task_runs = pin!(task_runs);
        if !watch_policies {
            // Nothing to list: the file policy applies everywhere, from the start.
            caches.apply_policy_event(Event::Init);
            caches.apply_policy_event(Event::InitDone);
        }
        let others = super::watch_caches(client, caches, metrics.clone(), watch_policies);
        let mut others = pin!(others);
        let (mut prs, mut trs) = (Writer::<PipelineRun>::new(), Writer::<TaskRun>::new());
        loop {
            let event = tokio::select! {
                () = &mut others => break,
                Some(event) = pipeline_runs.next() => match event {
                    Ok(event) => prs.apply(&runs, event),
                    Err(e) => {
                        metrics.watch_error(WatchedResource::PipelineRuns);
                        tracing::warn!(error = %e, "watching PipelineRuns failed; retrying with backoff");
                        None
                    }
                },
                Some(event) = task_runs.next() => match event {
                    Ok(event) => trs.apply(&runs, event),
                    Err(e) => {
                        metrics.watch_error(WatchedResource::TaskRuns);
                        tracing::warn!(error = %e, "watching TaskRuns failed; retrying with backoff");
                        None
                    }
                },
                else => break,
            };
            if let Some(event) = event
                && events.send(event).await.is_err()
            {
                break;
            }
        }
    }
}

/// Why an annotation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The run is gone.
    #[error("{0}: not found")]
    Gone(RunKey),
    #[error("{key}: patching its annotations failed: {source}")]
    Api { key: RunKey, source: kube::Error },
}

/// Writes annotations on runs: a JSON merge patch of `metadata.annotations`, nothing else.
#[derive(Clone)]
pub struct Marker {
    client: Client,
}

impl Marker {
    /// Sets `annotations` on the run (other annotations untouched).
    pub async fn mark(&self, key: &RunKey, annotations: &[(&str, &str)]) -> Result<(), MarkError> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("tekton.dev", "v1", key.kind.kind()),
            key.kind.plural(),
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &resource);
        let values: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let patch = serde_json::json!({"metadata": {"annotations": values}});
        match api
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(MarkError::Gone(key.clone())),
            Err(source) => Err(MarkError::Api {
                key: key.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::objects::Object;

    /// The captured ship-run-ok objects, lean.
    fn fixture() -> (PipelineRun, Vec<TaskRun>) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/runs/ship-run-ok.json"
        );
        let list: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (mut pipeline_run, mut task_runs) = (None, Vec::new());
        for (i, item) in list["items"].as_array().unwrap().iter().enumerate() {
            match Object::from_value(item.clone(), &i.to_string()).unwrap() {
                Object::PipelineRun(r) => pipeline_run = Some(r),
                Object::TaskRun(r) => task_runs.push(r),
            }
        }
        (pipeline_run.unwrap(), task_runs)
    }

    #[test]
    fn a_stored_run_reads_back_unchanged_and_smaller() {
        let (pipeline_run, task_runs) = fixture();
        let stored = Stored::new(task_runs[0].clone());
        assert_eq!(*stored.load().unwrap(), task_runs[0]);
        let StoredForm::Packed(bytes) = &stored.inner else {
            panic!("a run with labels is packed");
        };
        let json = serde_json::to_vec(&task_runs[0]).unwrap();
        assert!(
            bytes.len() < json.len(),
            "{} >= {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(
            *Stored::new(pipeline_run.clone()).load().unwrap(),
            pipeline_run
        );
    }

    #[test]
    fn a_marked_pipeline_run_is_a_stub_and_takes_its_task_runs_out_of_the_cache() {
        let (mut pipeline_run, task_runs) = fixture();
        let runs = Runs::default();
        for task_run in task_runs {
            let task_run = task_run
                .compact(&runs)
                .expect("kept while the run is unmarked");
            write(&runs.task_runs).insert(map_key(&task_run.metadata), Stored::new(task_run));
        }
        let (_, before) = runs.len();
        assert_eq!(before, 6);
        pipeline_run
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(EXPORTED_ANNOTATION.into(), "abc".into());
        let stub = pipeline_run.clone().compact(&runs).unwrap();
        assert_eq!(runs.len().1, 0, "its TaskRuns left the cache");
        assert!(stub.status.is_none() && stub.metadata.labels.is_none());
        assert_eq!(stub.metadata.uid, pipeline_run.metadata.uid);
        assert!(marked(&stub.metadata));
        // A TaskRun of it that arrives afterwards is not kept.
        write(&runs.pipeline_runs).insert(map_key(&stub.metadata), Stored::new(stub));
        let (_, task_runs) = fixture();
        assert!(task_runs[0].clone().compact(&runs).is_none());
    }
}
