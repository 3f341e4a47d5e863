//! `export --release-finalizers`: the one-shot that removes the exporter's finalizer from every
//! run that still has it ([`crate::cluster::release`]), for an uninstall, for `exporter.enabled:
//! false`, or by hand. It takes no Lease and reads no policy or token: it lists runs and patches
//! their finalizers, and with `--wait-for-exporter` first reads the exporter's Lease until no
//! exporter holds it. Each released run is printed on stdout (`released <Kind>
//! <namespace>/<name>`), then a summary; the exit code is 0 only when none is left holding it.

use std::process::ExitCode;
use std::time::Duration;

use crate::cluster::{self, ClusterArgs, EXPORTER_LEASE, release};
use crate::runtime::args::TelemetryArgs;
use crate::runtime::bootstrap;

/// Why the release did not finish; each message says what is left and what to do.
#[derive(Debug, thiserror::Error)]
enum ReleaseError {
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("{0}; nothing was released")]
    ExporterRunning(#[from] release::ExporterRunning),
    #[error(transparent)]
    List(#[from] release::ListError),
    #[error(
        "{} run(s) still hold lightstep-tekton.io/export: {}; run `export --release-finalizers` again",
        .0.len(),
        .0.join("; ")
    )]
    Left(Vec<String>),
}

/// Releases every finalizer in `namespace` (all namespaces when `None`); with `wait`, first
/// waits (at most that long) for the exporter's Lease to be free.
pub(crate) fn run(
    namespace: Option<String>,
    wait: Option<(ClusterArgs, Duration)>,
    telemetry: &TelemetryArgs,
) -> ExitCode {
    bootstrap::run("release finalizers", telemetry, |_shutdown| async move {
        let client = release::connect().await?;
        if let Some((cluster, limit)) = wait {
            let lease = cluster.lease(EXPORTER_LEASE)?;
            release::wait_for_exporter(&client, &lease, limit).await?;
        }
        let outcome = release::release_finalizers(&client, namespace.as_deref()).await?;
        for run in &outcome.released {
            println!("released {run}");
        }
        println!(
            "released lightstep-tekton.io/export from {} of {} runs listed{}",
            outcome.released.len(),
            outcome.listed,
            namespace
                .as_deref()
                .map(|ns| format!(" in namespace {ns}"))
                .unwrap_or_default()
        );
        tracing::info!(
            released = outcome.released.len(),
            failed = outcome.failed.len(),
            listed = outcome.listed,
            "finalizers released"
        );
        match outcome.failed.is_empty() {
            true => Ok(()),
            false => Err(ReleaseError::Left(outcome.failed)),
        }
    })
}
