//! Watch caches of `tekton.dev/v1` PipelineRuns and TaskRuns for the exporter, and the writes it
//! makes on them: JSON Patches of its finalizer and its mark, each conditional on the run's uid
//! and on the part of the object it changes ([`patch`]).
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
//! TaskRuns of a marked PipelineRun are not kept at all once the exporter's finalizer is off
//! them (until then, as stubs that name their PipelineRun): on a cluster that keeps weeks of
//! runs, nearly all of them are done with, and the cache holds kilobytes only for runs still to
//! send.
//!
//! Files: this one holds the cache and its queries; `lean` turns a watched object into the
//! lean run (and a marked one into a stub), `stored` keeps it compressed, `watch` is the watch
//! loop and the writer, `patch` builds the writes.
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

/// The finalizer the exporter holds on a run it will export, so that a delete (a pruner, Tekton
/// Results, a user) waits until the run's spans are sent or its store deadline lapsed.
pub const EXPORT_FINALIZER: &str = "lightstep-tekton.io/export";

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

    /// The TaskRun's PipelineRun, by its `tekton.dev/pipelineRun` label, if the cache holds it
    /// with the uid its `tekton.dev/pipelineRunUID` label names.
    pub fn parent(&self, task_run: &TaskRun) -> Option<Arc<PipelineRun>> {
        let name = task_run.metadata.label(PIPELINE_RUN)?;
        let uid = task_run.metadata.label(PIPELINE_RUN_UID)?;
        let namespace = task_run.metadata.namespace.as_deref().unwrap_or_default();
        self.pipeline_run(namespace, name)
            .filter(|pr| pr.metadata.uid.as_deref() == Some(uid))
    }

    /// Drops the TaskRuns whose PipelineRun is marked (those that arrived before it did, say in
    /// a relist), or makes stubs of them while our finalizer holds them; what is left in the
    /// cache is what may still be exported or released.
    pub fn prune(&self) {
        let stale: Vec<((String, String), Option<TaskRun>)> = read(&self.task_runs)
            .iter()
            .filter_map(|(key, stored)| {
                let run = stored.load()?;
                if run.status.is_none() || !self.parent_marked(&run) {
                    return None;
                }
                let stub =
                    holds_finalizer(&run.metadata).then(|| TaskRun::stub(run.metadata.clone()));
                Some((key.clone(), stub))
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        let mut task_runs = write(&self.task_runs);
        for (key, stub) in stale {
            match stub {
                Some(stub) => task_runs.insert(key, Stored::new(stub)),
                None => task_runs.remove(&key),
            };
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

/// A poisoned lock still holds a complete map: writers only insert, remove or swap.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

mod lean;
mod pace;
mod patch;
mod stored;
mod watch;

use lean::*;
pub use lean::{RunStatus, Watched, holds_finalizer};
pub use patch::{RunWrite, run_patch};
use stored::*;
pub use watch::{MarkError, Marker, RunWatch};

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

    #[test]
    fn task_runs_our_finalizer_holds_stay_as_stubs_naming_their_pipeline_run_until_released() {
        let (mut pipeline_run, task_runs) = fixture();
        let runs = Runs::default();
        for (i, mut task_run) in task_runs.into_iter().enumerate() {
            if i < 2 {
                task_run.metadata.finalizers = Some(vec!["other".into(), EXPORT_FINALIZER.into()]);
            }
            write(&runs.task_runs).insert(map_key(&task_run.metadata), Stored::new(task_run));
        }
        pipeline_run
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(EXPORTED_ANNOTATION.into(), "abc".into());
        let stub = pipeline_run.clone().compact(&runs).unwrap();
        assert_eq!(runs.len().1, 2, "the two held TaskRuns stay");
        write(&runs.pipeline_runs).insert(map_key(&stub.metadata), Stored::new(stub));
        for key in runs
            .keys()
            .into_iter()
            .filter(|k| k.kind == RunKind::TaskRun)
        {
            let Some(CachedRun::TaskRun(held)) = runs.get(&key) else {
                panic!("{key}");
            };
            assert!(held.status.is_none());
            assert!(holds_finalizer(&held.metadata));
            // The parent is found, marked: the exporter releases it.
            let parent = runs.parent(&held).expect("names its PipelineRun");
            assert!(marked(&parent.metadata));
            // Released: its next event takes it out of the cache.
            let mut released = (*held).clone();
            released.metadata.finalizers = Some(vec!["other".into()]);
            assert!(released.compact(&runs).is_none());
        }
    }

    #[test]
    fn a_task_run_owned_by_a_pipeline_run_without_its_labels_gets_them() {
        let meta: ObjectMeta = serde_json::from_value(serde_json::json!({
            "name": "t", "namespace": "ns", "uid": "t-1",
            "ownerReferences": [{"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
                                 "name": "p", "uid": "p-1"}],
            "finalizers": [EXPORT_FINALIZER],
            "deletionTimestamp": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let trimmed = trim(meta);
        assert_eq!(trimmed.label(PIPELINE_RUN), Some("p"));
        assert_eq!(trimmed.label(PIPELINE_RUN_UID), Some("p-1"));
        assert!(holds_finalizer(&trimmed) && trimmed.deletion_timestamp.is_some());
    }
}
