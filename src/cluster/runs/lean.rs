//! From what the watcher decodes to the lean run the cache keeps: the trimmed metadata, the
//! mark, and the stub a marked run becomes.

use super::*;

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
pub(super) fn trim(meta: ObjectMeta) -> Metadata {
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
pub(super) trait Lean: Sized {
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
pub(super) fn marked(metadata: &Metadata) -> bool {
    metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(EXPORTED_ANNOTATION))
}

/// A marked run as the cache keeps it: its name, uid and the mark (a few hundred bytes, where
/// the run was kilobytes), enough to know it is done.
pub(super) fn stub(metadata: Metadata) -> Metadata {
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

pub(super) fn map_key(metadata: &Metadata) -> (String, String) {
    (
        metadata.namespace.clone().unwrap_or_default(),
        metadata.name.clone().unwrap_or_default(),
    )
}

pub(super) fn run_key(kind: RunKind, (namespace, name): (String, String)) -> RunKey {
    RunKey {
        kind,
        namespace,
        name,
    }
}
