//! The watch caches: kube-runtime reflector stores of TracingPolicies and namespaces, the
//! resolved [`Snapshot`] admission reads, and the statuses those imply.
//!
//! [`Caches`] is the write side, owned by the watch loop (or a test feeding it events);
//! [`Cluster`] is the read side, shared with the server. Admission never waits on the API: it
//! reads the stores and the snapshot, which is rebuilt (policies resolved, validated, sorted)
//! only when a policy changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource as _;
use kube::core::{ApiResource, DynamicObject, PartialObjectMeta, TypeMeta};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::watcher::Event;
use tokio::sync::Notify;

use crate::policy::Policy;
use crate::policy::resource::{self, TracingPolicy, TracingPolicyStatus};
use crate::policy::selection::{self, Selected, Snapshot};

/// What admission reads: the reflector stores and the resolved snapshot. Shared by reference.
pub struct Cluster {
    namespaces: Store<PartialObjectMeta<Namespace>>,
    policies: Store<DynamicObject>,
    snapshot: RwLock<Arc<Snapshot>>,
    policies_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    /// Woken on every change that may change a status.
    pub(super) changed: Notify,
}

impl Cluster {
    /// Both stores have been listed once. Stays true afterwards: a watch that restarts keeps
    /// the previous contents until its new list is complete.
    pub fn synced(&self) -> bool {
        self.policies_synced.load(Ordering::SeqCst) && self.namespaces_synced.load(Ordering::SeqCst)
    }

    /// The resolved TracingPolicies, as of the last change.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock still holds a complete snapshot: writers only assign.
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The namespace's labels, or `None` when the namespace is not in the cache.
    pub fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
    }

    /// The policy for a namespace (see [`selection::select`]), from cached state only.
    pub fn select<'a>(
        &self,
        snapshot: &'a Snapshot,
        namespace: &str,
        fallback: &'a Policy,
    ) -> Selected<'a> {
        let labels = self.labels(namespace);
        selection::select(snapshot, labels.as_ref(), fallback)
    }

    /// The TracingPolicies whose status must be written, with the status they should get.
    pub fn status_updates(&self, now: &Time) -> Vec<StatusUpdate> {
        let namespaces = self.namespace_labels();
        let mut updates: Vec<StatusUpdate> = self
            .policies
            .state()
            .iter()
            .filter_map(|object| status_update(object, &namespaces, now))
            .collect();
        updates.sort_by(|a, b| a.name.cmp(&b.name));
        updates
    }

    /// The status update for one TracingPolicy as the API server holds it now (say, re-read
    /// after a conflict), or `None` when its status is already right.
    pub(super) fn status_update_for(
        &self,
        object: &DynamicObject,
        now: &Time,
    ) -> Option<StatusUpdate> {
        status_update(object, &self.namespace_labels(), now)
    }

    fn namespace_labels(&self) -> Vec<BTreeMap<String, String>> {
        self.namespaces
            .state()
            .iter()
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
            .collect()
    }
}

/// The status `object` should have, when it differs from the one it has.
fn status_update(
    object: &DynamicObject,
    namespaces: &[BTreeMap<String, String>],
    now: &Time,
) -> Option<StatusUpdate> {
    let current = object
        .data
        .get("status")
        .and_then(|s| serde_json::from_value::<TracingPolicyStatus>(s.clone()).ok());
    let resolution = resource::resolve_object(object);
    let desired = resource::desired_status(resolution.as_ref(), namespaces, current.as_ref(), now);
    if !resource::status_differs(current.as_ref(), &desired) {
        return None;
    }
    let mut object = object.clone();
    object.metadata.managed_fields = None;
    // Items of a list carry no apiVersion and kind; the status update needs them.
    object.types = Some(TypeMeta {
        api_version: TracingPolicy::api_version(&()).into_owned(),
        kind: TracingPolicy::kind(&()).into_owned(),
    });
    // A plain struct of strings and numbers: it always serializes.
    object.data["status"] = serde_json::to_value(&desired).expect("status serializes");
    Some(StatusUpdate {
        name: object.metadata.name.clone().unwrap_or_default(),
        object,
    })
}

/// A status to write: the object as last seen (its `resourceVersion` makes the write
/// conditional), with the new status.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub name: String,
    pub object: DynamicObject,
}

/// The write side of the stores: owned by the watch loop (or by a test feeding it events).
pub struct Caches {
    policy_writer: Writer<DynamicObject>,
    namespace_writer: Writer<PartialObjectMeta<Namespace>>,
    shared: Arc<Cluster>,
}

impl Default for Caches {
    fn default() -> Self {
        Caches::new()
    }
}

impl Caches {
    pub fn new() -> Caches {
        let policy_writer = Writer::new(api_resource());
        let namespace_writer = Writer::default();
        let shared = Arc::new(Cluster {
            namespaces: namespace_writer.as_reader(),
            policies: policy_writer.as_reader(),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            policies_synced: AtomicBool::new(false),
            namespaces_synced: AtomicBool::new(false),
            changed: Notify::new(),
        });
        Caches {
            policy_writer,
            namespace_writer,
            shared,
        }
    }

    /// The read side, for the server.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.shared.clone()
    }

    /// Applies one TracingPolicy watch event; rebuilds the snapshot when the store changed.
    pub fn apply_policy_event(&mut self, event: Event<DynamicObject>) {
        let event = event.modify(|o| o.metadata.managed_fields = None);
        self.policy_writer.apply_watcher_event(&event);
        match event {
            // Buffered by the writer until InitDone: the store has not changed yet.
            Event::Init | Event::InitApply(_) => return,
            Event::InitDone => self.shared.policies_synced.store(true, Ordering::SeqCst),
            Event::Apply(_) | Event::Delete(_) => {}
        }
        let snapshot = Snapshot::build(
            self.shared
                .policies
                .state()
                .iter()
                .map(|o| resource::resolve_object(o)),
        );
        let mut current = self
            .shared
            .snapshot
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if **current != snapshot {
            tracing::info!(
                valid = snapshot.valid().len(),
                invalid = snapshot.invalid().len(),
                order = %snapshot.valid().iter().map(|p| format!("{}({})", p.name, p.priority)).collect::<Vec<_>>().join(" "),
                "TracingPolicies changed"
            );
            *current = Arc::new(snapshot);
        }
        drop(current);
        self.shared.changed.notify_one();
    }

    /// Applies one Namespace watch event (labels only are kept).
    pub fn apply_namespace_event(&mut self, event: Event<PartialObjectMeta<Namespace>>) {
        let event = event.modify(|ns| {
            ns.metadata.managed_fields = None;
            ns.metadata.annotations = None;
        });
        self.namespace_writer.apply_watcher_event(&event);
        match event {
            Event::Init | Event::InitApply(_) => return,
            Event::InitDone => self.shared.namespaces_synced.store(true, Ordering::SeqCst),
            Event::Apply(_) | Event::Delete(_) => {}
        }
        self.shared.changed.notify_one();
    }
}

/// Where TracingPolicies live in the API, for the dynamic watch.
pub(super) fn api_resource() -> ApiResource {
    ApiResource::erase::<TracingPolicy>(&())
}
