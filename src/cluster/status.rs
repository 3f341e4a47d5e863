//! Writing each TracingPolicy's `status`: by the leader only, after changes (debounced), and
//! again on a timer while writes fail.
//!
//! A write is a PUT of the object as last seen, so it is conditional on its `resourceVersion`.
//! A conflict (409: the object changed since) is not an error: the object is re-read, its
//! status compared again, and written once more if it still differs. Anything else (the API
//! server unreachable, a 5xx, a 403) marks the pass failed, and the whole pass is retried after
//! a backoff (1 s doubling to 60 s) even if no other event ever arrives; a pass that succeeds
//! resets the backoff. Each pass recomputes every status from the caches, so a retry writes
//! what is right now, not what was right when the first write failed.

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use tokio::sync::watch;

use crate::cluster::caches::{Cluster, StatusUpdate, api_resource};
use crate::cluster::metrics::{ClusterMetrics, WriteResult};

/// After a change, wait this long for more before computing statuses: a rollout that relabels
/// many namespaces then costs one pass, and a status shows up within a couple of seconds.
pub const STATUS_DEBOUNCE: Duration = Duration::from_secs(2);
/// The first retry after a failed pass: soon enough that a blip costs a second.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between retries: an API server down for long is asked once a minute, not
/// hammered, and a status is at most a minute late once it is back.
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// The writer's timings (the constants above; shorter in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusTiming {
    pub debounce: Duration,
    pub first_retry: Duration,
    pub max_retry: Duration,
}

impl Default for StatusTiming {
    fn default() -> Self {
        StatusTiming {
            debounce: STATUS_DEBOUNCE,
            first_retry: FIRST_RETRY,
            max_retry: MAX_RETRY,
        }
    }
}

/// Why one write did not land.
enum Failure {
    Conflict,
    Error,
}

/// Writes the statuses the caches imply, while this replica leads.
pub struct StatusWriter {
    api: Api<DynamicObject>,
    cluster: Arc<Cluster>,
    leading: watch::Receiver<bool>,
    metrics: ClusterMetrics,
    timing: StatusTiming,
}

impl StatusWriter {
    pub fn new(
        client: Client,
        cluster: Arc<Cluster>,
        leading: watch::Receiver<bool>,
        metrics: ClusterMetrics,
    ) -> StatusWriter {
        StatusWriter {
            api: Api::all_with(client, &api_resource()),
            cluster,
            leading,
            metrics,
            timing: StatusTiming::default(),
        }
    }

    pub fn with_timing(self, timing: StatusTiming) -> StatusWriter {
        StatusWriter { timing, ..self }
    }

    /// Writes after every change, on becoming leader, and on the retry timer, until the task is
    /// aborted or leadership can no longer be known (the election ended).
    pub async fn run(mut self) {
        // The backoff in force after a failed pass; `None` when nothing waits for a retry.
        let mut retry: Option<Duration> = None;
        loop {
            let timer = async move {
                match retry {
                    Some(after) => tokio::time::sleep(after).await,
                    None => pending().await,
                }
            };
            tokio::select! {
                () = self.cluster.changed.notified() => {}
                () = timer => {}
                changed = self.leading.changed() => if changed.is_err() {
                    return;
                },
            }
            tokio::time::sleep(self.timing.debounce).await;
            if !*self.leading.borrow() {
                // The leader writes; this replica does a full pass when it becomes leader.
                retry = None;
                continue;
            }
            if !self.cluster.synced() {
                continue;
            }
            retry = match self.pass().await {
                true => None,
                false => Some(match retry {
                    None => self.timing.first_retry,
                    Some(last) => (last * 2).min(self.timing.max_retry),
                }),
            };
            if let Some(after) = retry {
                tracing::warn!(
                    retry_in_s = after.as_secs_f64(),
                    "some TracingPolicy statuses were not written; retrying"
                );
            }
        }
    }

    /// Writes every status that differs; `false` when some write failed.
    async fn pass(&self) -> bool {
        let now = Time(Timestamp::now());
        let mut all_written = true;
        for update in self.cluster.status_updates(&now) {
            if !*self.leading.borrow() {
                // Lost the Lease mid-pass: the new leader writes the rest.
                return true;
            }
            all_written &= self.write(&update, &now).await;
        }
        all_written
    }

    /// One status; a conflict is re-read and compared once more.
    async fn write(&self, update: &StatusUpdate, now: &Time) -> bool {
        match self.replace(update).await {
            Ok(()) => true,
            Err(Failure::Error) => false,
            Err(Failure::Conflict) => match self.api.get_opt(&update.name).await {
                // Deleted meanwhile: nothing to report on.
                Ok(None) => true,
                Ok(Some(fresh)) => match self.cluster.status_update_for(&fresh, now) {
                    None => true,
                    Some(again) => self.replace(&again).await.is_ok(),
                },
                Err(e) => {
                    tracing::warn!(policy = %update.name, error = %e, "re-reading a TracingPolicy after a conflict failed");
                    self.metrics.status_write(WriteResult::Error);
                    false
                }
            },
        }
    }

    async fn replace(&self, update: &StatusUpdate) -> Result<(), Failure> {
        let result = self
            .api
            .replace_status(&update.name, &PostParams::default(), &update.object)
            .await;
        match result {
            Ok(_) => {
                self.metrics.status_write(WriteResult::Written);
                tracing::info!(policy = %update.name, "TracingPolicy status written");
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.metrics.status_write(WriteResult::Conflict);
                tracing::debug!(policy = %update.name, "TracingPolicy status conflict; re-reading it");
                Err(Failure::Conflict)
            }
            Err(e) => {
                self.metrics.status_write(WriteResult::Error);
                tracing::warn!(policy = %update.name, error = %e, "writing TracingPolicy status failed");
                Err(Failure::Error)
            }
        }
    }
}
