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

/// What the tree and the exporter read of the metadata. A TaskRun that names a PipelineRun as
/// its owner but lacks Tekton's `tekton.dev/pipelineRun`/`pipelineRunUID` labels (an object
/// created by hand or by an older tool) gets them from the ownerReference, so every rule that
/// finds a PipelineRun's TaskRuns (exported with it, its finalizer held with its parent's)
/// reads one place.
pub(super) fn trim(meta: ObjectMeta) -> Metadata {
    let mut annotations = meta.annotations;
    if let Some(a) = annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    let mut labels = meta.labels;
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "PipelineRun" && o.api_version.starts_with("tekton.dev/"));
    if let Some(owner) = owner
        && labels
            .as_ref()
            .is_none_or(|l| !l.contains_key(PIPELINE_RUN_UID))
    {
        let labels = labels.get_or_insert_default();
        labels.insert(PIPELINE_RUN.to_owned(), owner.name.clone());
        labels.insert(PIPELINE_RUN_UID.to_owned(), owner.uid.clone());
    }
    Metadata {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        creation_timestamp: meta.creation_timestamp,
        labels,
        annotations,
        deletion_timestamp: meta.deletion_timestamp,
        finalizers: meta.finalizers.filter(|f| !f.is_empty()),
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
    /// TaskRun whose PipelineRun is marked (the exporter never needs it again, once our
    /// finalizer on it is released).
    fn compact(self, runs: &Runs) -> Option<Self>;
    /// The names of its TaskRuns (a PipelineRun's `status.childReferences`).
    fn children(&self) -> Vec<String>;
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
        // Its TaskRuns went with it: drop them from the cache, but for those our finalizer
        // still holds, kept as stubs until it is released.
        let namespace = self.metadata.namespace.clone().unwrap_or_default();
        let mut task_runs = write(&runs.task_runs);
        for child in self.status.iter().flat_map(|s| &s.child_references) {
            let key = (namespace.clone(), child.name.clone());
            let held = task_runs
                .get(&key)
                .and_then(Stored::load)
                .filter(|tr| holds_finalizer(&tr.metadata));
            match held {
                Some(tr) => {
                    let stub = TaskRun::stub(tr.metadata.clone());
                    task_runs.insert(key, Stored::new(stub));
                }
                None => {
                    task_runs.remove(&key);
                }
            }
        }
        drop(task_runs);
        Some(PipelineRun {
            metadata: stub(self.metadata),
            status: None,
        })
    }
    fn children(&self) -> Vec<String> {
        self.status
            .iter()
            .flat_map(|s| &s.child_references)
            .filter(|c| c.kind == "TaskRun")
            .map(|c| c.name.clone())
            .collect()
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
            true if holds_finalizer(&self.metadata) => Some(TaskRun::stub(self.metadata)),
            true => None,
            false => Some(self),
        }
    }
    fn children(&self) -> Vec<String> {
        Vec::new()
    }
}

impl TaskRun {
    /// A TaskRun of a marked PipelineRun that our finalizer still holds: its stub keeps the
    /// labels that name its PipelineRun, so the exporter sees the parent is marked and releases
    /// it.
    pub(super) fn stub(metadata: Metadata) -> TaskRun {
        let parent = metadata.labels.as_ref().map(|l| {
            l.iter()
                .filter(|(k, _)| *k == PIPELINE_RUN || *k == PIPELINE_RUN_UID)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        let mut metadata = stub(metadata);
        metadata.labels = parent;
        TaskRun {
            metadata,
            status: None,
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

/// Whether the exporter's finalizer is on the run.
pub fn holds_finalizer(metadata: &Metadata) -> bool {
    metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == EXPORT_FINALIZER))
}

/// A marked run as the cache keeps it: its name, uid, the mark and, while our finalizer is
/// among them, its finalizers (a few hundred bytes, where the run was kilobytes): enough to know
/// it is done and to release it.
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
        deletion_timestamp: None,
        finalizers: metadata
            .finalizers
            .filter(|f| f.iter().any(|f| f == EXPORT_FINALIZER)),
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
