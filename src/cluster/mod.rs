//! The one room that talks to the Kubernetes API: watch caches of TracingPolicies and
//! Namespaces (`caches`), the TracingPolicies' `status` (`status`), leader election on a
//! Lease ([`lease`]), their metrics (`metrics`), the exporter's run caches ([`runs`]) and the
//! release of its finalizer from every run ([`release`]).
//!
//! Admission never waits on the API: it reads the caches ([`Cluster::select`]). When the API
//! server is unreachable the watchers back off and retry (kube-runtime's default backoff), each
//! failure counted in `watch_errors_total`, and admission keeps deciding from the last state it
//! saw. `/readyz` stays false until both caches have completed their first list
//! ([`Cluster::synced`]).
//!
//! Trade-offs:
//! - Namespaces are watched as metadata only (`Api<PartialObjectMeta<Namespace>>`), annotations and
//!   managed fields dropped before they are stored: the labels are all selection needs, and a
//!   cluster with thousands of namespaces then costs a few hundred bytes each.
//! - TracingPolicies are watched as `DynamicObject`s and decoded here, one by one, so an object
//!   that does not decode (a CRD newer than this binary) is reported in its own status instead
//!   of failing the list for every policy.
//! - Every replica watches (each answers admissions), but only the holder of the Lease writes
//!   statuses: two writers would race each other into conflicts on every change.

mod args;
mod caches;
pub mod lease;
mod metrics;
pub mod release;
pub mod runs;
mod status;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::Api;
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};

pub use args::ClusterArgs;
pub use caches::{Caches, Cluster, StatusUpdate};
pub use lease::{LeaderElection, LeaseConfig};
pub use metrics::{ClusterMetrics, WatchedResource, WriteResult};
pub use status::{STATUS_DEBOUNCE, StatusTiming, StatusWriter};

/// The webhook's Lease, in the install's namespace. The exporter campaigns under its own name.
pub const WEBHOOK_LEASE: &str = "lightstep-tekton-webhook";
/// The exporter's Lease: only its holder exports.
pub const EXPORTER_LEASE: &str = "lightstep-tekton-exporter";

/// Why the cluster room could not start; each message names what to set.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "--watch-tracing-policies: no Kubernetes API access ({0}); run in a pod with a service account token, or set KUBECONFIG"
    )]
    Connect(kube::Error),
    #[error(
        "export: no Kubernetes API access ({0}); run in a pod with a service account token, or set KUBECONFIG"
    )]
    ConnectRuns(kube::Error),
    #[error(
        "--lease-identity: no host name to use; set it or POD_NAME (the downward API's metadata.name)"
    )]
    LeaseIdentity,
}

/// The API connection, the caches it fills, and the election of the status writer: what
/// `serve --watch-tracing-policies` starts.
pub struct Watch {
    client: Client,
    caches: Caches,
    metrics: ClusterMetrics,
    election: LeaderElection,
}

impl Watch {
    /// Configures the client from the in-cluster service account, or KUBECONFIG outside a
    /// cluster, the Lease from `args`, and registers the cluster metrics (and `leader`) in
    /// `registry`. Nothing is requested yet: an unreachable API server is retried by
    /// [`Watch::run_until`].
    pub async fn configure(
        args: &ClusterArgs,
        registry: &mut Registry,
    ) -> Result<Watch, ClusterError> {
        let lease = args.lease(WEBHOOK_LEASE)?;
        let client = Client::try_default().await.map_err(ClusterError::Connect)?;
        let metrics = ClusterMetrics::register(registry);
        let election = LeaderElection::new(client.clone(), lease, registry);
        Ok(Watch {
            client,
            caches: Caches::new(),
            metrics,
            election,
        })
    }

    /// The read side, for the server's admission path and readiness.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.caches.cluster()
    }

    /// Whether this replica writes statuses (holds the Lease), as it changes.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.election.subscribe()
    }

    /// Watches, campaigns and writes statuses until `shutdown` completes; then stops writing
    /// and releases the Lease before returning.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let leading = self.leading();
        let Watch {
            client,
            caches,
            metrics,
            election,
        } = self;
        let status = StatusWriter::new(client.clone(), caches.cluster(), leading, metrics.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        // All in this task, none spawned: aborting the task stops every part of it.
        let work = async move {
            tokio::select! {
                () = watch_caches(client, caches, metrics, true) => {}
                // Returns only once leadership can no longer be known (the election ended).
                () = status.run() => {}
                () = shutdown => {}
            }
            // Writing has stopped (its future is dropped); now the Lease may go.
            let _ = stop.send(());
        };
        let campaign = election.run(async move {
            // A dropped sender stops the election as well.
            let _ = stopped.await;
        });
        tokio::join!(work, campaign);
    }
}

/// Watches namespaces, and TracingPolicies when `policies`, into `caches`; never returns (the
/// streams retry forever). Without `policies` the caller has marked the policies listed.
pub(super) async fn watch_caches(
    client: Client,
    mut caches: Caches,
    metrics: ClusterMetrics,
    policies: bool,
) {
    let policies = match policies {
        true => watcher::watcher(
            Api::<DynamicObject>::all_with(client.clone(), &caches::api_resource()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed(),
        false => futures::stream::empty().boxed(),
    };
    // `Api<PartialObjectMeta<_>>` asks for metadata only: the same as `metadata_watcher`.
    let namespaces = watcher::watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client),
        watcher::Config::default(),
    )
    .default_backoff();
    let mut policies = pin!(policies);
    let mut namespaces = pin!(namespaces);
    loop {
        tokio::select! {
            Some(event) = policies.next() => match event {
                Ok(event) => caches.apply_policy_event(event),
                Err(e) => {
                    metrics.watch_error(WatchedResource::TracingPolicies);
                    tracing::warn!(error = %e, "watching TracingPolicies failed; retrying with backoff, deciding from the last known state");
                }
            },
            Some(event) = namespaces.next() => match event {
                Ok(event) => caches.apply_namespace_event(event),
                Err(e) => {
                    metrics.watch_error(WatchedResource::Namespaces);
                    tracing::warn!(error = %e, "watching Namespaces failed; retrying with backoff, deciding from the last known state");
                }
            },
            else => break,
        }
    }
}
