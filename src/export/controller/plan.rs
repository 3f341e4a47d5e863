//! Planning a queued run: from the caches and its policy, what to do with it now (drop it,
//! wait for its TaskRuns, send its spans, mark it, or print it), and the annotations that
//! record it and what it counts ([`Done`]) once finished with.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::time::Instant;

use super::Controller;
use super::clients::ClientKey;
use crate::cluster::runs::{CachedRun, RunKey, RunKind};
use crate::contract::TraceId;
use crate::export::decide::{self, EXPORTED_ANNOTATION, Finished, TRACE_URL_ANNOTATION};
use crate::export::metrics::Skip;
use crate::otlp::Client;
use crate::policy::Policy;
use crate::spans::objects::{PipelineRun, TaskRun};
use crate::spans::tree::{Run, SpanTree, span_tree};
use crate::spans::{SpanError, otlp::export_request};

/// How often a PipelineRun whose TaskRuns are not all finished in the cache is looked at again:
/// Tekton finishes a PipelineRun in the same reconcile as its last TaskRun, so the cache is
/// usually a watch event behind, a second at most.
const CHILD_RECHECK: Duration = Duration::from_secs(1);

/// How often a run whose finalizer write is pending (or not in the cache yet) is looked at
/// again: a write and its watch event take milliseconds.
const FINALIZER_RECHECK: Duration = Duration::from_millis(500);

/// What the loop should do with a queued run.
pub(super) enum Plan {
    /// No longer due (marked elsewhere, not finished after all, out of scope).
    Drop,
    /// Gone from the cache while due: lost.
    Lost,
    /// Look again at this time (its TaskRuns are not all finished yet).
    Wait(Instant),
    /// Send this request, then write these annotations (and release the finalizer).
    Send {
        request: ExportTraceServiceRequest,
        destination: ClientKey,
        client: Result<Client, ()>,
        annotations: Vec<(String, String)>,
        done: Done,
    },
    /// Write these annotations (and release the finalizer) only.
    Mark(Vec<(String, String)>, Done),
    /// `--dry-run`: print this line.
    Print(String),
}

/// What to count once a run is finished with.
pub(super) struct Done {
    pub(super) kind: RunKind,
    pub(super) sent: Option<(Finished, u64)>,
    pub(super) skipped: Option<Skip>,
    /// Spans the backend dropped from accepted requests (OTLP partial success).
    pub(super) rejected_spans: u64,
    /// Where its spans went (its destination's backoff ends with this success).
    pub(super) destination: Option<ClientKey>,
}

impl Controller {
    /// What to do with a queued run now, from the caches.
    pub(super) fn plan(&mut self, key: &RunKey) -> Plan {
        // Its mark must see the finalizer being added, to remove it in the same patch (a run is
        // queued after that settles; this is for one whose write started since).
        if self.finalizers.busy(key) {
            return Plan::Wait(Instant::now() + FINALIZER_RECHECK);
        }
        let Some(run) = self.runs.get(key) else {
            return Plan::Lost;
        };
        let Some(policy) = self.policy_for(&key.namespace) else {
            return Plan::Drop;
        };
        // Its destination is failing or being probed: wait, before building anything.
        let (destination, client) = self.client(&policy);
        if !self.settings.dry_run
            && let Some(at) = self.backoffs.blocked(&destination, Instant::now())
        {
            return Plan::Wait(at);
        }
        let (finished, task_runs) = match self.finished(key, &run) {
            Ok(finished) => finished,
            Err(Some(at)) => return Plan::Wait(at),
            Err(None) => return Plan::Drop,
        };
        let tree = match &run {
            CachedRun::PipelineRun(pr) => span_tree(
                &Run::Pipeline {
                    pipeline_run: pr,
                    task_runs: task_runs.iter().map(Arc::as_ref).collect(),
                },
                &policy,
            ),
            CachedRun::TaskRun(tr) => span_tree(&Run::Task(tr), &policy),
        };
        let done = |sent, skipped| Done {
            kind: key.kind,
            sent,
            skipped,
            rejected_spans: 0,
            destination: None,
        };
        let tree = match tree {
            Ok(tree) => tree,
            Err(SpanError::Input { field, .. }) => {
                tracing::warn!(run = %key, %field, "cannot build the run's spans; marking it invalid");
                if self.settings.dry_run {
                    return Plan::Drop;
                }
                let annotations = vec![(EXPORTED_ANNOTATION.to_owned(), "invalid".to_owned())];
                return Plan::Mark(annotations, done(None, Some(Skip::Invalid)));
            }
        };
        let Some(trace) = trace_of(&tree) else {
            return Plan::Drop;
        };
        if tree.spans.is_empty() {
            if self.settings.dry_run {
                return Plan::Drop;
            }
            let annotations = vec![(EXPORTED_ANNOTATION.to_owned(), format!("unsampled:{trace}"))];
            return Plan::Mark(annotations, done(None, Some(Skip::Unsampled)));
        }
        let request = export_request([&tree]);
        if self.settings.dry_run {
            // A plain struct of strings, numbers and bytes: it always serializes.
            return Plan::Print(serde_json::to_string(&request).unwrap_or_default());
        }
        let mut annotations = vec![(EXPORTED_ANNOTATION.to_owned(), trace.to_string())];
        if let Some(url) = trace_url(&policy, &run, &trace) {
            annotations.push((TRACE_URL_ANNOTATION.to_owned(), url));
        }
        Plan::Send {
            request,
            destination,
            client,
            annotations,
            done: done(Some((finished, tree.spans.len() as u64)), None),
        }
    }

    /// When the run finished and, for a PipelineRun, its finished TaskRuns (waited for until
    /// `child_grace` has passed); or, while it is not ready to send, when to look again (`None`:
    /// not due after all, drop it).
    fn finished(
        &self,
        key: &RunKey,
        run: &CachedRun,
    ) -> Result<(Finished, Vec<Arc<TaskRun>>), Option<Instant>> {
        match run {
            CachedRun::PipelineRun(pr) => {
                let Ok(finished) = decide::pipeline_run_due(pr, self.window) else {
                    return Err(None);
                };
                let (task_runs, missing) = self.children(pr);
                if missing > 0 {
                    let grace_end = finished.at
                        + k8s_openapi::jiff::SignedDuration::try_from(self.settings.child_grace)
                            .unwrap_or_default();
                    if Timestamp::now() < grace_end {
                        return Err(Some(Instant::now() + CHILD_RECHECK));
                    }
                    tracing::warn!(run = %key, missing, "exporting a PipelineRun without TaskRuns that did not finish in time");
                    self.metrics.missing_task_runs(missing as u64);
                }
                Ok((finished, task_runs))
            }
            CachedRun::TaskRun(tr) => match decide::task_run_due(tr, self.window) {
                Ok(finished) => Ok((finished, Vec::new())),
                Err(_) => Err(None),
            },
        }
    }

    /// The PipelineRun's finished TaskRuns, and how many of its children are not (yet).
    fn children(&self, pr: &PipelineRun) -> (Vec<Arc<TaskRun>>, usize) {
        let namespace = pr.metadata.namespace.as_deref().unwrap_or_default();
        let refs: Vec<&str> = pr
            .status
            .iter()
            .flat_map(|s| &s.child_references)
            .filter(|c| c.kind == "TaskRun")
            .map(|c| c.name.as_str())
            .collect();
        let candidates: Vec<Option<Arc<TaskRun>>> = match refs.is_empty() {
            // No references (an older Tekton): whatever names this PipelineRun as its owner.
            true => match pr.metadata.uid.as_deref() {
                Some(uid) => self
                    .runs
                    .task_runs_of(namespace, uid)
                    .into_iter()
                    .map(Some)
                    .collect(),
                None => Vec::new(),
            },
            false => refs
                .iter()
                .map(|name| self.runs.task_run(namespace, name))
                .collect(),
        };
        let mut missing = 0;
        let mut finished = Vec::new();
        for candidate in candidates {
            match candidate {
                Some(tr) if decide::task_run_finished(&tr).is_ok() => finished.push(tr),
                _ => missing += 1,
            }
        }
        (finished, missing)
    }
}

/// The run's trace: its root span's (the PipelineRun span, or a standalone TaskRun's first
/// attempt), or the unsampled trace.
fn trace_of(tree: &SpanTree) -> Option<TraceId> {
    tree.spans
        .first()
        .map(|s| s.trace_id)
        .or_else(|| tree.unsampled.first().copied())
}

/// The policy's `runSpans.traceUrl`, rendered for the run.
fn trace_url(policy: &Policy, run: &CachedRun, trace: &TraceId) -> Option<String> {
    let template = policy.run_spans.trace_url.as_ref()?;
    let trace = trace.to_string();
    let metadata = match run {
        CachedRun::PipelineRun(r) => &r.metadata,
        CachedRun::TaskRun(r) => &r.metadata,
    };
    let is_pipeline = matches!(run, CachedRun::PipelineRun(_));
    template.render(|field| match field {
        "traceId" => Some(trace.as_str()),
        "namespace" => metadata.namespace.as_deref(),
        "pipelineRun" if is_pipeline => metadata.name.as_deref(),
        "pipelineRunUid" if is_pipeline => metadata.uid.as_deref(),
        "taskRun" if !is_pipeline => metadata.name.as_deref(),
        "taskRunUid" if !is_pipeline => metadata.uid.as_deref(),
        _ => None,
    })
}
