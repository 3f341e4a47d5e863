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
use super::clients::ClientKey;
use super::plan::{Done, Plan};
use crate::cluster::runs::{CachedRun, MarkError, Marker, RunKey, RunWrite, run_patch};
use crate::export::decide::EXPORTED_ANNOTATION;
use crate::export::metrics::{CAUSE_CONFIG, Lost, Skip};
use crate::export::queue::{Item, Stage};
use crate::otlp::{self, Cause, Client, ExportError, RetryPolicy};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

/// Backoff between failed attempts at one run: from a second to five minutes, so an outage of
/// the backend costs a request per run every five minutes, and a recovered backend is seen
/// within that.
pub(super) const RUN_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(300),
    max_server_delay: Duration::from_secs(300),
};

/// How a run's export ended (what an in-flight future returns).
pub(super) enum Outcome {
    /// Sent (or skipped) and marked.
    Done(Done),
    /// The backend did not take the spans (all of them: a run sent in parts is sent again
    /// whole); `annotations` are the mark the export would have written.
    ExportFailed {
        item: Item,
        error: Failed,
        destination: ClientKey,
        annotations: Vec<(String, String)>,
    },
    /// Accepted (or skipped) but not marked yet; only the mark is retried. What it counts is
    /// counted now (the retried mark counts nothing).
    MarkFailed(Item, Done),
}

/// Why an export failed.
pub(super) enum Failed {
    /// The policy's exporter has no client (a bad endpoint, say).
    Config,
    Export(ExportError),
}

impl Failed {
    /// Whether the failure is about this run's request, and permanent: the backend refused
    /// the request itself (400, 413, INVALID_ARGUMENT, RESOURCE_EXHAUSTED without RetryInfo),
    /// or there is no client for the policy's exporter. Another destination's failures (down,
    /// a wrong token or certificate, a server error) are the destination's, retried.
    fn permanent(&self) -> bool {
        match self {
            Failed::Config => true,
            Failed::Export(e) => {
                !e.is_retryable() && matches!(e.cause(), Cause::Rejected | Cause::Throttled)
            }
        }
    }

    fn cause(&self) -> &'static str {
        match self {
            Failed::Config => CAUSE_CONFIG,
            Failed::Export(e) => e.cause().as_str(),
        }
    }
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
                        rejected_spans: 0,
                        destination: None,
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
                    destination,
                    client,
                    annotations,
                    mut done,
                } => {
                    self.backoffs.sending(&destination, now);
                    let Ok(client) = client else {
                        let outcome = Outcome::ExportFailed {
                            item,
                            error: Failed::Config,
                            destination,
                            annotations,
                        };
                        self.finish(key, outcome);
                        continue;
                    };
                    let marker = self.marker.clone();
                    let patch = self.mark_patch(&key, &annotations);
                    let parts = otlp::split(request, self.settings.max_request_bytes);
                    in_flight.push(Box::pin(async move {
                        let outcome = match send(&client, parts).await {
                            Ok(rejected_spans) => {
                                done.rejected_spans = rejected_spans;
                                done.destination = Some(destination);
                                mark(marker, &key, item, annotations, patch, done).await
                            }
                            Err(e) => Outcome::ExportFailed {
                                item,
                                error: Failed::Export(e),
                                destination,
                                annotations,
                            },
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
            Outcome::ExportFailed {
                mut item,
                error,
                destination,
                annotations,
            } => {
                self.metrics.error(error.cause());
                if let Failed::Export(_) = &error
                    && error.permanent()
                {
                    // It answered, about this request only.
                    self.backoffs.answered(&destination);
                }
                if !error.permanent() || matches!(error, Failed::Config) {
                    let at = self.backoffs.failed(&destination, Instant::now());
                    if let Failed::Export(e) = &error {
                        tracing::warn!(run = %key, cause = e.cause().as_str(), error = %e, failures = item.failures + 1, "export failed; the destination is backed off");
                    }
                    item.failures = item.failures.saturating_add(1);
                    if !error.permanent() {
                        self.queue.retry_at(key, item, at);
                        return;
                    }
                }
                item.rejections = item.rejections.saturating_add(1);
                if let Failed::Export(e) = &error {
                    tracing::warn!(run = %key, cause = e.cause().as_str(), error = %e, rejections = item.rejections, "the backend refused the run's request");
                }
                if item.rejections < self.settings.max_rejections {
                    self.retry(key, item);
                    return;
                }
                // Given up on: marked (and released) like a run that was sent, so it is not
                // due again; what the backend said is in the log lines above.
                let trace = annotations
                    .iter()
                    .find(|(name, _)| name == EXPORTED_ANNOTATION)
                    .map(|(_, trace)| trace.clone())
                    .unwrap_or_default();
                tracing::warn!(run = %key, rejections = item.rejections, "giving up on the run; marking it rejected");
                self.metrics.skipped(key.kind, Skip::Rejected);
                let item = Item {
                    stage: Stage::Mark(vec![(
                        EXPORTED_ANNOTATION.to_owned(),
                        format!("rejected:{trace}"),
                    )]),
                    ..item
                };
                self.queue.retry_at(key, item, Instant::now());
            }
            Outcome::MarkFailed(item, done) => {
                self.count(&done);
                self.metrics.mark_error();
                self.retry(key, item);
            }
        }
    }

    fn count(&mut self, done: &Done) {
        if let Some(destination) = &done.destination {
            self.backoffs.answered(destination);
        }
        if done.rejected_spans > 0 {
            tracing::warn!(
                kind = done.kind.as_str(),
                rejected_spans = done.rejected_spans,
                "the backend accepted the run's spans but dropped some (partial success)"
            );
            self.metrics.rejected_spans(done.rejected_spans);
        }
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

/// Sends a run's request parts in order, each once; the spans the backend dropped from them.
/// The first part that fails fails the run (its parts are all sent again later).
async fn send(client: &Client, parts: Vec<ExportTraceServiceRequest>) -> Result<u64, ExportError> {
    let mut rejected = 0;
    for part in parts {
        let delivery = client.export(part).await?;
        rejected += u64::try_from(delivery.rejected_spans).unwrap_or(0);
    }
    Ok(rejected)
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
                rejections: item.rejections,
            };
            Outcome::MarkFailed(item, done)
        }
    }
}
