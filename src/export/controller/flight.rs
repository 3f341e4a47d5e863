//! Runs in flight: starting planned exports and marks as futures the loop polls, and
//! settling what they return (counting, or retrying with backoff).

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::Controller;
use super::plan::{Done, Plan};
use crate::cluster::runs::{CachedRun, MarkError, Marker, RunKey, RunWrite, run_patch};
use crate::export::metrics::{CAUSE_CONFIG, Lost};
use crate::export::queue::{Item, Stage};
use crate::otlp::{ExportError, RetryPolicy};

/// Backoff between failed attempts at one run: from a second to five minutes, so an outage of
/// the backend costs a request per run every five minutes, and a recovered backend is seen
/// within that.
const RUN_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(300),
    max_server_delay: Duration::from_secs(300),
};

/// How a run's export ended (what an in-flight future returns).
pub(super) enum Outcome {
    /// Sent (or skipped) and marked.
    Done(Done),
    /// The backend did not take the spans.
    ExportFailed(Item, ExportError),
    /// Accepted (or skipped) but not marked yet; only the mark is retried. What it counts is
    /// counted now (the retried mark counts nothing).
    MarkFailed(Item, Done),
}

pub(super) type InFlight =
    FuturesUnordered<Pin<Box<dyn Future<Output = (RunKey, Outcome)> + Send>>>;

impl Controller {
    /// Starts queued runs while there is room in flight.
    pub(super) fn start(&mut self, in_flight: &mut InFlight) {
        let now = Instant::now();
        while in_flight.len() < self.settings.concurrency {
            let Some((key, item)) = self.queue.pop(now) else {
                return;
            };
            let plan = match &item.stage {
                Stage::Export => self.plan(&key),
                Stage::Mark(annotations) => Plan::Mark(
                    annotations.clone(),
                    Done {
                        kind: key.kind,
                        sent: None,
                        skipped: None,
                    },
                ),
            };
            match plan {
                Plan::Drop => self.queue.done(&key),
                Plan::Lost => {
                    tracing::warn!(run = %key, "run deleted before it was exported");
                    self.metrics.lost(key.kind, Lost::Deleted);
                    self.queue.done(&key);
                }
                Plan::Wait(at) => self.queue.retry_at(key, item, at),
                Plan::Print(line) => {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    self.queue.done(&key);
                    self.printed.insert(key);
                }
                Plan::Mark(annotations, done) => {
                    let marker = self.marker.clone();
                    let patch = self.mark_patch(&key, &annotations);
                    in_flight.push(Box::pin(async move {
                        let outcome = mark(marker, &key, item, annotations, patch, done).await;
                        (key, outcome)
                    }));
                }
                Plan::Send {
                    request,
                    client,
                    annotations,
                    done,
                } => {
                    let Ok(client) = client else {
                        self.metrics.error(CAUSE_CONFIG);
                        self.retry(key, item);
                        continue;
                    };
                    let marker = self.marker.clone();
                    let patch = self.mark_patch(&key, &annotations);
                    in_flight.push(Box::pin(async move {
                        let outcome = match client.export(request).await {
                            Ok(_) => mark(marker, &key, item, annotations, patch, done).await,
                            Err(e) => Outcome::ExportFailed(item, e),
                        };
                        (key, outcome)
                    }));
                }
            }
        }
    }

    pub(super) fn finish(&mut self, key: RunKey, outcome: Outcome) {
        match outcome {
            Outcome::Done(done) => {
                self.count(&done);
                self.queue.done(&key);
            }
            Outcome::ExportFailed(item, error) => {
                self.metrics.error(error.cause().as_str());
                tracing::warn!(run = %key, cause = error.cause().as_str(), error = %error, failures = item.failures + 1, "export failed; retrying with backoff");
                self.retry(key, item);
            }
            Outcome::MarkFailed(item, done) => {
                self.count(&done);
                self.metrics.mark_error();
                self.retry(key, item);
            }
        }
    }

    fn count(&self, done: &Done) {
        if let Some((finished, spans)) = done.sent {
            let lag = Timestamp::now().duration_since(finished.at);
            let lag = Duration::try_from(lag).unwrap_or_default();
            self.metrics
                .exported(done.kind, finished.result, spans, lag);
        }
        if let Some(skip) = done.skipped {
            self.metrics.skipped(done.kind, skip);
        }
    }

    /// The patch that marks the run as the cache holds it now, removing our finalizer if it
    /// is on it; `None` once the run is gone (nothing to mark).
    fn mark_patch(
        &self,
        key: &RunKey,
        annotations: &[(String, String)],
    ) -> Option<Vec<json_patch::PatchOperation>> {
        let metadata = match self.runs.get(key)? {
            CachedRun::PipelineRun(r) => r.metadata.clone(),
            CachedRun::TaskRun(r) => r.metadata.clone(),
        };
        run_patch(&metadata, &RunWrite::Mark(annotations.to_vec()))
    }

    pub(super) fn retry(&mut self, key: RunKey, mut item: Item) {
        item.failures = item.failures.saturating_add(1);
        let delay = RUN_RETRY.delay(item.failures, None, fastrand::f64());
        self.queue.retry_at(key, item, Instant::now() + delay);
    }
}

/// Writes the mark (`patch`, built from the cache when the run was started); the outcome keeps
/// what is left to do if it fails (the retry builds the patch again, from the cache then).
async fn mark(
    marker: Option<Marker>,
    key: &RunKey,
    item: Item,
    annotations: Vec<(String, String)>,
    patch: Option<Vec<json_patch::PatchOperation>>,
    done: Done,
) -> Outcome {
    let (Some(marker), Some(patch)) = (marker, patch) else {
        return Outcome::Done(done);
    };
    match marker.write(key, patch).await {
        // Gone: nothing left to mark, and the spans (if any) are in.
        Ok(()) | Err(MarkError::Gone(_)) => Outcome::Done(done),
        Err(e) => {
            tracing::warn!(error = %e, "marking an exported run failed; retrying the mark only");
            let item = Item {
                stage: Stage::Mark(annotations),
                failures: item.failures,
            };
            Outcome::MarkFailed(item, done)
        }
    }
}
