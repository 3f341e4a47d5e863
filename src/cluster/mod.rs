//! The one module that talks to the Kubernetes API: it watches TracingPolicies and Namespaces
//! into kube-runtime reflector stores, keeps a resolved [`Snapshot`] of the policies, and writes
//! each TracingPolicy's `status`.
//!
//! Admission never waits on the API: it reads the stores ([`Cluster::select`]) and the snapshot,
//! which is rebuilt (policies resolved, validated, sorted) only when a policy changes. When the
//! API server is unreachable the watchers back off and retry (kube-runtime's default backoff),
//! and admission keeps deciding from the last state it saw. `/readyz` stays false until both
//! stores have completed their first list ([`Cluster::synced`]).
//!
//! Trade-offs:
//! - Namespaces are watched as metadata only (`Api<PartialObjectMeta<Namespace>>`), annotations and
//!   managed fields dropped before they are stored: the labels are all selection needs, and a
//!   cluster with thousands of namespaces then costs a few hundred bytes each.
//! - TracingPolicies are watched as `DynamicObject`s and decoded here, one by one, so an object
//!   that does not decode (a CRD newer than this binary) is reported in its own status instead
//!   of failing the list for every policy.
//! - Status is written by every replica: they compute the same thing from the same objects, a
//!   write happens only when the status differs (transition times aside), and a replica that
//!   loses the race (HTTP 409) finds the winner's status equal on the next event. Writes are
//!   debounced ([`STATUS_DEBOUNCE`]) so a burst of namespace changes costs one pass.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use kube::core::{ApiResource, DynamicObject, PartialObjectMeta, TypeMeta};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource as _};
use tokio::sync::Notify;

use crate::policy::Policy;
use crate::policy::resource::{self, TracingPolicy, TracingPolicyStatus};
use crate::policy::selection::{self, Selected, Snapshot};

/// After a change, wait this long for more before computing statuses: a rollout that relabels
/// many namespaces then costs one pass, and a status shows up within a couple of seconds.
pub const STATUS_DEBOUNCE: Duration = Duration::from_secs(2);

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "--watch-tracing-policies: no Kubernetes API access ({0}); run in a pod with a service account token, or set KUBECONFIG"
    )]
    Connect(kube::Error),
}

/// What admission reads: the reflector stores and the resolved snapshot. Shared by reference.
pub struct Cluster {
    namespaces: Store<PartialObjectMeta<Namespace>>,
    policies: Store<DynamicObject>,
    snapshot: RwLock<Arc<Snapshot>>,
    policies_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    /// Woken on every change that may change a status.
    changed: Notify,
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
        let namespaces: Vec<BTreeMap<String, String>> = self
            .namespaces
            .state()
            .iter()
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
            .collect();
        let mut updates = Vec::new();
        for object in self.policies.state() {
            let current = object
                .data
                .get("status")
                .and_then(|s| serde_json::from_value::<TracingPolicyStatus>(s.clone()).ok());
            let resolution = resource::resolve_object(&object);
            let desired =
                resource::desired_status(resolution.as_ref(), &namespaces, current.as_ref(), now);
            if resource::status_differs(current.as_ref(), &desired) {
                let mut object = (*object).clone();
                // Items of a list carry no apiVersion and kind; the status update needs them.
                object.types = Some(TypeMeta {
                    api_version: TracingPolicy::api_version(&()).into_owned(),
                    kind: TracingPolicy::kind(&()).into_owned(),
                });
                // A plain struct of strings and numbers: it always serializes.
                object.data["status"] = serde_json::to_value(&desired).expect("status serializes");
                updates.push(StatusUpdate {
                    name: object.metadata.name.clone().unwrap_or_default(),
                    object,
                });
            }
        }
        updates.sort_by(|a, b| a.name.cmp(&b.name));
        updates
    }
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
pub fn api_resource() -> ApiResource {
    ApiResource::erase::<TracingPolicy>(&())
}

/// The API connection and the caches it fills: what `serve --watch-tracing-policies` starts.
pub struct Watch {
    client: Client,
    caches: Caches,
}

impl Watch {
    /// Configures the client from the in-cluster service account, or KUBECONFIG outside a
    /// cluster. Nothing is requested yet: an unreachable API server is retried by [`Watch::run`].
    pub async fn connect() -> Result<Watch, ClusterError> {
        let client = Client::try_default().await.map_err(ClusterError::Connect)?;
        Ok(Watch {
            client,
            caches: Caches::new(),
        })
    }

    /// The read side, for the server's admission path and readiness.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.caches.cluster()
    }

    /// Watches and writes statuses until the task is aborted.
    pub async fn run(self) {
        run(self.client, self.caches).await
    }
}

/// Watches both resources into `caches` and writes statuses, until the task is aborted.
async fn run(client: Client, mut caches: Caches) {
    let status_writer = tokio::spawn(write_statuses(client.clone(), caches.cluster()));
    let policies = watcher::watcher(
        Api::<DynamicObject>::all_with(client.clone(), &api_resource()),
        watcher::Config::default(),
    )
    .default_backoff();
    // `Api<PartialObjectMeta<_>>` asks for metadata only: the same as `metadata_watcher`.
    let namespaces = watcher::watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client),
        watcher::Config::default(),
    )
    .default_backoff();
    let mut policies = pin!(policies);
    let mut namespaces = pin!(namespaces);
    // Both streams retry forever with backoff: neither ends.
    loop {
        tokio::select! {
            Some(event) = policies.next() => match event {
                Ok(event) => caches.apply_policy_event(event),
                Err(e) => tracing::warn!(error = %e, "watching TracingPolicies failed; retrying with backoff, deciding from the last known state"),
            },
            Some(event) = namespaces.next() => match event {
                Ok(event) => caches.apply_namespace_event(event),
                Err(e) => tracing::warn!(error = %e, "watching Namespaces failed; retrying with backoff, deciding from the last known state"),
            },
            else => break,
        }
    }
    status_writer.abort();
}

/// Writes the statuses that differ, after each change (debounced).
async fn write_statuses(client: Client, cluster: Arc<Cluster>) {
    let api = Api::<DynamicObject>::all_with(client, &api_resource());
    loop {
        cluster.changed.notified().await;
        tokio::time::sleep(STATUS_DEBOUNCE).await;
        if !cluster.synced() {
            continue;
        }
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for update in cluster.status_updates(&now) {
            match api
                .replace_status(&update.name, &PostParams::default(), &update.object)
                .await
            {
                Ok(_) => tracing::info!(policy = %update.name, "TracingPolicy status written"),
                // Another replica wrote first; its write comes back as an event and is compared
                // again then.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(policy = %update.name, "TracingPolicy status conflict; the next change retries")
                }
                Err(e) => {
                    tracing::warn!(policy = %update.name, error = %e, "writing TracingPolicy status failed; the next change retries")
                }
            }
        }
    }
}
