//! Finished Tekton runs → the span tree they are exported as. Pure: objects, the policy and the
//! [`RunSpans`] in; spans, their resources and the trace they belong to out. No clock, no
//! I/O, so the exporter, the `spans` preview and the tests get the same tree from the same run.
//!
//! # Input
//!
//! A `tekton.dev/v1` PipelineRun and its TaskRuns (those whose `tekton.dev/pipelineRunUID` label
//! is the PipelineRun's uid), or one standalone TaskRun ([`group`] sorts a bag of objects into
//! runs). Only finished runs: the `Succeeded` condition of the run, of each TaskRun and of each
//! earlier attempt must be `True` or `False`; anything else is an error naming the object. Every
//! object needs `metadata.uid` and `metadata.creationTimestamp`, since the ids and times come
//! from them.
//!
//! # The spans
//!
//! - **PipelineRun**: kind SERVER, named `RUN <pipeline>` (the conventions' `{action} {pipeline}`
//!   with `cicd.pipeline.action.name: RUN`; the pipeline is the `tekton.dev/pipeline` label, else
//!   the PipelineRun's name), from `creationTimestamp` to `completionTime`. Span id
//!   [`derive_pipeline_run_span_id`]`(uid)`, in the trace [`derive_trace_id`]`(uid)`, always
//!   the root of that trace (never a child of Tekton's span: Tekton exports its spans to its own
//!   endpoint, often one our backend never sees). When Tekton traced the run
//!   (`status.spanContext.traceparent`, valid, and at least one of its TaskRuns carries Tekton's
//!   context, `tekton.dev/taskrunSpanContext`, in that same trace), the span links to Tekton's
//!   PipelineRun span ([`LinkKind::TektonPipelineRun`]). The TaskRun condition matters: Tekton
//!   writes `status.spanContext` on every run even with its tracing off (every captured run has
//!   one, each TaskRun in a random trace of its own), and those spans are never exported; only
//!   the annotation, which Tekton adds when its tracing is on, shows that Tekton's trace is real.
//! - **wait**: a child of the PipelineRun span from `creationTimestamp` to `status.startTime`,
//!   only when that is not zero (span id [`derive_pipeline_run_wait_span_id`]).
//! - **One span per TaskRun attempt**: each `status.retriesStatus[i]` is attempt `i`, the final
//!   status is attempt `len(retriesStatus)`, from that attempt's `startTime` to its
//!   `completionTime`, named after the pipeline task (else the Task, else the TaskRun). Its facts
//!   are [`TaskRunFacts::from_task_run`] and its context is [`attempt_context`] under
//!   [`ContextRule::Derived`] (context rule v2): exactly what the webhook injected into that
//!   attempt's pod under a policy with run spans on, the only policy whose runs are exported.
//!   Span id [`derive_span_id`]`(taskRunUID, attempt)`, never Tekton's span id (Tekton exports
//!   its own spans under those), in the PipelineRun's trace with the PipelineRun span as parent;
//!   when Tekton gave the TaskRun a valid context, the span links to Tekton's TaskRun span
//!   ([`LinkKind::TektonTaskRun`]), whatever trace Tekton put it in (the captured
//!   `ship-run-traced`: Tekton gave `checkout` a trace of its own). So a PipelineRun is one
//!   trace, rooted at its span, and the steps' own telemetry nests where the webhook pointed it.
//!   A standalone TaskRun's attempts are roots of its derived trace, with the same link.
//! - **startup**: a child of each attempt from the attempt's `startTime` to the earliest
//!   `startedAt` of its steps (`terminated`, else `running`): the pod's scheduling, image pulls
//!   and init containers. Only when a step started and the gap is not zero (span id
//!   [`derive_attempt_startup_span_id`]`(taskRunUID, attempt)`); attribute
//!   `tekton.span.phase: startup`, so a backend can chart it beside the steps.
//! - **One span per step** of each attempt that has `terminated` (`startedAt` → `finishedAt`),
//!   span id [`derive_step_span_id`]`(taskRunUID, attempt, step)`, child of the attempt. A step
//!   without `terminated` never ran and is not a span. A step Tekton skipped after an earlier
//!   failure (`terminationReason: Skipped`) is a span with status unset and
//!   `tekton.step.skipped: true`, not an error of its own.
//!
//! # Status and attributes
//!
//! A run or attempt whose `Succeeded` condition is `False` has status Error, with message
//! `<reason>: <message>` clipped to [`STATUS_MESSAGE_MAX`] bytes, and `error.type` = the reason;
//! a step with a non-zero exit code has status Error and `error.type` = its termination reason
//! (the exit code when the reason is the generic `Error`). Everything else is OK (skipped steps:
//! unset). `cicd.pipeline.result` / `cicd.pipeline.task.run.result` map Tekton's reasons with
//! [`RunResult::of`]. Spans carry the CICD, VCS and `k8s.*` attributes of
//! [`task_run_attributes`] (the PipelineRun span: its run-level ones), the result, the URLs of
//! the options, and on deploys (by pipeline task name or TaskRun label, see [`RunSpans`])
//! `cicd.pipeline.task.type: deploy`, `deployment.name`, `deployment.id` (the TaskRun uid),
//! `deployment.status` and `deployment.environment.name`.
//!
//! # Resources and sampling
//!
//! Each attempt and its steps share the resource the webhook gave that attempt's pod:
//! `service.name` from the policy's `serviceName` ([`service_name`]) and the contract's attribute
//! list followed by the policy's `resourceAttributes`, raw (the pods get them percent-encoded,
//! which SDKs decode). The PipelineRun and wait spans get the same from the PipelineRun's labels
//! and annotations, without the per-TaskRun keys. A trace is exported only when it is sampled:
//! [`sampled`]`(trace, policy.samplingRatio)`, the flag every pod of the run got.
//!
//! [`derive_trace_id`]: crate::contract::derive_trace_id
//! [`derive_pipeline_run_span_id`]: crate::contract::derive_pipeline_run_span_id
//! [`derive_pipeline_run_wait_span_id`]: crate::contract::derive_pipeline_run_wait_span_id
//! [`derive_span_id`]: crate::contract::derive_span_id
//! [`derive_step_span_id`]: crate::contract::derive_step_span_id
//! [`derive_attempt_startup_span_id`]: crate::contract::derive_attempt_startup_span_id
//! [`sampled`]: crate::contract::sampled
//! [`attempt_context`]: crate::contract::attempt_context
//! [`ContextRule::Derived`]: crate::contract::ContextRule::Derived
//! [`TaskRunFacts::from_task_run`]: crate::contract::tekton::TaskRunFacts::from_task_run
//! [`task_run_attributes`]: crate::contract::attributes::task_run_attributes
//! [`service_name`]: crate::admission::decide::service_name
//! [`RunSpans`]: crate::policy::run_spans::RunSpans

mod attempt;
mod attributes;
mod pipeline;
mod result;

use super::SpanError;
use super::objects::{Metadata, Object, PipelineRun, TaskRun};
use crate::contract::tekton::PIPELINE_RUN_UID;
use crate::contract::{SpanId, TraceId};
use crate::policy::Policy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

pub use result::{RunResult, STATUS_MESSAGE_MAX, clip};

// What the metrics builder reads the same way as the spans (`crate::spans::metrics`).
pub(crate) use attempt::attempt_times;
pub(crate) use result::{UNFINISHED_EXPECTED, UNFINISHED_FIELD, end_of, finished, reason_of};

/// Which part of a run a span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    PipelineRun,
    Wait,
    Attempt,
    /// An attempt's start to its first step's start: scheduling, image pulls, init containers.
    Startup,
    Step,
}

/// OTLP's span kinds that run spans use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Unset,
    Ok,
    Error { message: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// Why a span links to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Tekton's own span for the TaskRun (`tekton.dev/taskrunSpanContext`), from an attempt.
    TektonTaskRun,
    /// Tekton's own span for the PipelineRun (`status.spanContext`), from the PipelineRun span.
    TektonPipelineRun,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::TektonTaskRun => "tekton.taskrun",
            LinkKind::TektonPipelineRun => "tekton.pipelinerun",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub kind: LinkKind,
}

/// One span, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpan {
    pub role: Role,
    /// Index into [`SpanTree::resources`].
    pub resource: usize,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub trace_state: Option<String>,
    /// W3C trace flags of the span's trace.
    pub flags: u8,
    pub name: String,
    pub kind: Kind,
    /// Unix time in nanoseconds.
    pub start: u64,
    pub end: u64,
    pub status: Status,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    pub links: Vec<Link>,
}

/// A resource: `service.name` and the other attributes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanResource {
    pub service_name: String,
    pub attributes: Vec<(String, String)>,
}

/// The spans of one run, PipelineRun span first, each attempt followed by its steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanTree {
    pub resources: Vec<SpanResource>,
    pub spans: Vec<RunSpan>,
    /// Traces of the run that were not sampled: their spans are not in `spans`.
    pub unsampled: Vec<TraceId>,
    /// What a reader of the preview should know (a Tekton context that could not be used).
    pub notes: Vec<String>,
}

/// A run: the unit a span tree is built from.
#[derive(Debug, Clone, PartialEq)]
pub enum Run<'a> {
    Pipeline {
        pipeline_run: &'a PipelineRun,
        task_runs: Vec<&'a TaskRun>,
    },
    Task(&'a TaskRun),
}

/// Sorts objects into runs: each PipelineRun with the TaskRuns that name its uid, then the
/// standalone TaskRuns, in input order. A TaskRun that names a PipelineRun absent from the input
/// is an error: its spans would have no parent.
pub fn group(objects: &[Object]) -> Result<Vec<Run<'_>>, SpanError> {
    let mut runs = Vec::new();
    let mut standalone = Vec::new();
    for object in objects {
        if let Object::PipelineRun(pipeline_run) = object {
            runs.push(Run::Pipeline {
                pipeline_run,
                task_runs: Vec::new(),
            });
        }
    }
    for object in objects {
        let Object::TaskRun(task_run) = object else {
            continue;
        };
        let Some(owner) = task_run.metadata.label(PIPELINE_RUN_UID) else {
            standalone.push(Run::Task(task_run));
            continue;
        };
        let parent = runs.iter_mut().find_map(|run| match run {
            Run::Pipeline {
                pipeline_run,
                task_runs,
            } if pipeline_run.metadata.uid.as_deref() == Some(owner) => Some(task_runs),
            _ => None,
        });
        match parent {
            Some(task_runs) => task_runs.push(task_run),
            None => {
                return Err(SpanError::Input {
                    object: task_run.metadata.display_name("TaskRun"),
                    field: format!("metadata.labels[{PIPELINE_RUN_UID}]"),
                    expected: "the uid of a PipelineRun in the input".to_owned(),
                });
            }
        }
    }
    // Attempts in the order they ran, whatever order the input listed them in.
    for run in &mut runs {
        if let Run::Pipeline { task_runs, .. } = run {
            task_runs.sort_by(|a, b| {
                let (a, b) = (&a.metadata, &b.metadata);
                (&a.creation_timestamp, &a.name).cmp(&(&b.creation_timestamp, &b.name))
            });
        }
    }
    runs.extend(standalone);
    Ok(runs)
}

/// The span tree of one finished run (see the module documentation for the rules).
/// The run-span settings are the policy's `runSpans` section.
pub fn span_tree(run: &Run<'_>, policy: &Policy) -> Result<SpanTree, SpanError> {
    let mut tree = SpanTree::default();
    match run {
        Run::Pipeline {
            pipeline_run,
            task_runs,
        } => {
            let parent = pipeline::pipeline_run_spans(&mut tree, pipeline_run, task_runs, policy)?;
            for task_run in task_runs {
                attempt::task_run_spans(&mut tree, task_run, Some(&parent), policy)?;
            }
        }
        Run::Task(task_run) => attempt::task_run_spans(&mut tree, task_run, None, policy)?,
    }
    Ok(tree)
}

fn required(value: Option<&str>, error: impl FnOnce() -> SpanError) -> Result<&str, SpanError> {
    value.filter(|v| !v.trim().is_empty()).ok_or_else(error)
}

/// An input error: `object`'s `field` is missing or not what was `expected`.
pub(crate) fn input_error(object: &str, field: &str, expected: &str) -> SpanError {
    SpanError::Input {
        object: object.to_owned(),
        field: field.to_owned(),
        expected: expected.to_owned(),
    }
}

/// What every run carries: how errors name it, its name, its uid, and when it was created (Unix
/// nanoseconds), or the first of those that is missing, named.
pub(crate) struct Identity<'a> {
    pub(crate) object: String,
    pub(crate) name: &'a str,
    pub(crate) uid: &'a str,
    pub(crate) created: u64,
}

pub(crate) fn identity<'a>(metadata: &'a Metadata, kind: &str) -> Result<Identity<'a>, SpanError> {
    let object = metadata.display_name(kind);
    let missing = |field: &str, expected: &str| input_error(&object, field, expected);
    let name = required(metadata.name.as_deref(), || {
        missing("metadata.name", "a name")
    })?;
    let uid = required(metadata.uid.as_deref(), || {
        missing("metadata.uid", "the run's uid")
    })?;
    let created = metadata
        .creation_timestamp
        .as_ref()
        .ok_or_else(|| missing("metadata.creationTimestamp", "a time"))?;
    Ok(Identity {
        created: nanos(created),
        object,
        name,
        uid,
    })
}

/// Unix nanoseconds; times before 1970 (no Tekton run) become 0 rather than an error.
pub(crate) fn nanos(time: &Time) -> u64 {
    u64::try_from(time.0.as_nanosecond()).unwrap_or(0)
}

impl SpanTree {
    /// The index of the resource with these attributes, added when new: the contract's list, then
    /// the policy's `resourceAttributes` whose keys it does not set (as the pods get them).
    fn resource<'v>(
        &mut self,
        service_name: String,
        contract: impl Iterator<Item = (&'static str, &'v str)>,
        policy: &Policy,
    ) -> usize {
        let mut attributes: Vec<(String, String)> = contract
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        policy.add_resource_attributes(&mut attributes, str::to_owned);
        let resource = SpanResource {
            service_name,
            attributes,
        };
        match self.resources.iter().position(|r| *r == resource) {
            Some(i) => i,
            None => {
                self.resources.push(resource);
                self.resources.len() - 1
            }
        }
    }
}
