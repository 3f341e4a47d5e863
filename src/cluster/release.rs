//! Releasing the exporter's finalizer from every run that still carries it: what
//! `export --release-finalizers` does when the exporter is uninstalled or turned off, so no run
//! (and no namespace) waits forever for a controller that is gone.
//!
//! Each run is listed, and a run that has [`EXPORT_FINALIZER`] gets one JSON Patch: `test` that
//! its uid is the listed one and that the element at the finalizer's index is ours, then `remove`
//! that element. Nothing else on the object is written, and another controller's finalizer
//! (added or reordered meanwhile) can never be removed by mistake: a failed `test` is refused by
//! the API server, the run is read again and the patch rebuilt, a few times. A run that is being
//! deleted goes once its last finalizer is gone; the API server does that, not this code.
//!
//! Trade-off: releasing while an exporter still runs is pointless (it adds the finalizer back to
//! runs it will export), so the callers stop the exporter first (the chart's hook runs after the
//! release's resources are deleted; `make undeploy` deletes the exporter's Deployment first), and
//! [`wait_for_exporter`] waits, bounded, until no exporter holds its Lease: a stopping exporter
//! releases it once it has stopped writing, a killed one lets it expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};

use super::ClusterError;
use super::lease::{LeaseConfig, is_held};
use super::runs::{EXPORT_FINALIZER, RunKind};

/// How often the exporter's Lease is read while waiting for it to be free: a Lease lasts 15 s,
/// so a few reads per lapse.
const LEASE_POLL: Duration = Duration::from_secs(2);

/// Runs per list page: a cluster keeping weeks of runs is listed in pages of this size, so the
/// command's memory stays a few megabytes whatever the cluster holds.
const PAGE: u32 = 500;

/// Tries per run: a run whose finalizers change between our read and our patch is read again;
/// three changes in a row on one run are another controller's loop, reported, not chased.
const ATTEMPTS: usize = 4;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Released {
    /// Runs whose finalizer this pass removed (kind, namespace/name), in the order released.
    pub released: Vec<String>,
    /// Runs that still carry it, with why.
    pub failed: Vec<String>,
    /// Runs looked at.
    pub listed: usize,
}

/// Why the finalizer could not be released from one run.
#[derive(Debug, thiserror::Error)]
enum ReleaseError {
    #[error("its finalizers kept changing ({ATTEMPTS} tries)")]
    Contended,
    #[error("{0}")]
    Api(kube::Error),
}

/// Why the exporter's Lease could not be seen free.
#[derive(Debug, thiserror::Error)]
pub enum ExporterRunning {
    #[error(
        "an exporter ({holder}) still holds the Lease {namespace}/{name} after {waited_s} s: stop it first (its Deployment deleted or scaled to 0), or it puts the finalizer back"
    )]
    Held {
        holder: String,
        namespace: String,
        name: String,
        waited_s: u64,
    },
    #[error("reading the exporter's Lease {namespace}/{name} failed: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// Waits until no exporter holds `lease` (it is missing, names no holder, or has lapsed), for
/// at most `limit`.
pub async fn wait_for_exporter(
    client: &Client,
    lease: &LeaseConfig,
    limit: Duration,
) -> Result<(), ExporterRunning> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let found = api
            .get_opt(&lease.name)
            .await
            .map_err(|source| ExporterRunning::Api {
                namespace: lease.namespace.clone(),
                name: lease.name.clone(),
                source,
            })?;
        let holder = found
            .and_then(|l| l.spec)
            .filter(|spec| is_held(spec, Timestamp::now()))
            .and_then(|spec| spec.holder_identity);
        let Some(holder) = holder else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ExporterRunning::Held {
                holder,
                namespace: lease.namespace.clone(),
                name: lease.name.clone(),
                waited_s: limit.as_secs(),
            });
        }
        tracing::info!(%holder, "the exporter still holds its Lease; waiting for it to stop");
        tokio::time::sleep(LEASE_POLL).await;
    }
}

/// Listing the runs failed: nothing more was released.
#[derive(Debug, thiserror::Error)]
#[error(
    "listing PipelineRuns and TaskRuns failed ({0}); nothing more was released. It needs list, get and patch on tekton.dev pipelineruns and taskruns"
)]
pub struct ListError(kube::Error);

/// Connects (in-cluster service account, or KUBECONFIG outside a cluster).
pub async fn connect() -> Result<Client, ClusterError> {
    Client::try_default()
        .await
        .map_err(ClusterError::ConnectRuns)
}

/// Removes [`EXPORT_FINALIZER`] from every PipelineRun and TaskRun that has it, in `namespace`
/// or in all namespaces. A failed list is an error; a run that could not be released is
/// reported in [`Released::failed`] and the pass goes on.
pub async fn release_finalizers(
    client: &Client,
    namespace: Option<&str>,
) -> Result<Released, ListError> {
    let mut outcome = Released::default();
    for kind in [RunKind::PipelineRun, RunKind::TaskRun] {
        let api = api(client, kind, namespace);
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let page = api.list(&params).await.map_err(ListError)?;
            for run in &page.items {
                outcome.listed += 1;
                if finalizer_index(run).is_none() {
                    continue;
                }
                let name = describe(kind, run);
                match release_one(client, kind, run.clone()).await {
                    Ok(true) => {
                        tracing::info!(run = %name, "finalizer released");
                        outcome.released.push(name);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(run = %name, error = %e, "releasing the finalizer failed");
                        outcome.failed.push(format!("{name}: {e}"));
                    }
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(outcome)
}

/// Removes ours from `run`: `true` when this call removed it, `false` when it was already
/// gone (the run deleted, or the finalizer removed by someone else).
async fn release_one(
    client: &Client,
    kind: RunKind,
    mut run: DynamicObject,
) -> Result<bool, ReleaseError> {
    let namespace = run.metadata.namespace.clone().unwrap_or_default();
    let name = run.metadata.name.clone().unwrap_or_default();
    let api = api(client, kind, Some(&namespace));
    for _ in 0..ATTEMPTS {
        let Some(patch) = removal(&run) else {
            return Ok(false);
        };
        match api
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => return Ok(true),
            // Deleted meanwhile: nothing waits on it any more.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            // A failed `test` (422) or a precondition (409): read it again and rebuild.
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => {
                match api.get_opt(&name).await {
                    Ok(Some(fresh)) if fresh.metadata.uid == run.metadata.uid => run = fresh,
                    // Gone, or a new run under the same name: not the one we held.
                    Ok(_) => return Ok(false),
                    Err(e) => return Err(ReleaseError::Api(e)),
                }
            }
            Err(e) => return Err(ReleaseError::Api(e)),
        }
    }
    Err(ReleaseError::Contended)
}

/// The JSON Patch that removes our finalizer from `run` as read, and only if it is still where
/// it was read: `None` when the run does not have it.
fn removal(run: &DynamicObject) -> Option<json_patch::Patch> {
    let index = finalizer_index(run)?;
    let uid = run.metadata.uid.clone().unwrap_or_default();
    let operations = serde_json::json!([
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": EXPORT_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]);
    serde_json::from_value(operations).ok()
}

fn finalizer_index(run: &DynamicObject) -> Option<usize> {
    run.metadata
        .finalizers
        .as_ref()?
        .iter()
        .position(|f| f == EXPORT_FINALIZER)
}

fn describe(kind: RunKind, run: &DynamicObject) -> String {
    let name = |v: &Option<String>| v.clone().unwrap_or_default();
    let kind = match kind {
        RunKind::PipelineRun => "PipelineRun",
        RunKind::TaskRun => "TaskRun",
    };
    format!(
        "{kind} {}/{}",
        name(&run.metadata.namespace),
        name(&run.metadata.name)
    )
}

fn api(client: &Client, kind: RunKind, namespace: Option<&str>) -> Api<DynamicObject> {
    let (kind, plural) = match kind {
        RunKind::PipelineRun => ("PipelineRun", "pipelineruns"),
        RunKind::TaskRun => ("TaskRun", "taskruns"),
    };
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("tekton.dev", "v1", kind), plural);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(finalizers: &[&str]) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": "build", "namespace": "ci", "uid": "u-1",
                         "finalizers": finalizers}
        }))
        .unwrap()
    }

    #[test]
    fn the_removal_tests_the_uid_and_the_element_before_removing_only_ours() {
        let object = run(&["example.com/keep", EXPORT_FINALIZER, "other/one"]);
        let patch = removal(&object).unwrap();
        let mut value = serde_json::to_value(&object).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        assert_eq!(
            value["metadata"]["finalizers"],
            serde_json::json!(["example.com/keep", "other/one"])
        );
        // Read when ours was at 1; another controller's since moved it: the test refuses.
        let mut moved = serde_json::to_value(run(&[EXPORT_FINALIZER, "example.com/keep"])).unwrap();
        assert!(json_patch::patch(&mut moved, &patch).is_err());
        // The same name, another run.
        let mut other = value.clone();
        other["metadata"]["uid"] = "u-2".into();
        other["metadata"]["finalizers"] = serde_json::json!(["x", EXPORT_FINALIZER]);
        assert!(json_patch::patch(&mut other, &patch).is_err());
        assert!(removal(&run(&["example.com/keep"])).is_none());
    }
}
