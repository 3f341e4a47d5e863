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
//! - **PipelineRun**: kind SERVER, named after the pipeline (`tekton.dev/pipeline` label, else the
//!   PipelineRun's name), from `creationTimestamp` to `completionTime`. Span id
//!   [`derive_pipeline_run_span_id`]`(uid)`. Its trace is Tekton's when Tekton traced the run
//!   (`status.spanContext.traceparent`, valid, and at least one of its TaskRuns carries Tekton's
//!   context, `tekton.dev/taskrunSpanContext`, in that same trace), and then its parent is
//!   Tekton's PipelineRun span; otherwise the trace is [`derive_trace_id`]`(uid)` and the span is
//!   the root. The TaskRun condition matters: Tekton writes `status.spanContext` on every run even
//!   with its tracing off (every captured run has one, each TaskRun in a random trace of its
//!   own), and those spans are never exported; only the annotation, which Tekton adds when its
//!   tracing is on and which the webhook reads off the pods, shows that Tekton's trace is real.
//! - **wait**: a child of the PipelineRun span from `creationTimestamp` to `status.startTime`,
//!   only when that is not zero (span id [`derive_pipeline_run_wait_span_id`]).
//! - **One span per TaskRun attempt**: each `status.retriesStatus[i]` is attempt `i`, the final
//!   status is attempt `len(retriesStatus)`, from that attempt's `startTime` to its
//!   `completionTime`, named after the pipeline task (else the Task, else the TaskRun). Its facts
//!   are [`TaskRunFacts::from_task_run`] and its context is [`attempt_context`]: exactly what the
//!   webhook injected into that attempt's pod. Span id [`derive_span_id`]`(taskRunUID, attempt)`,
//!   never Tekton's span id (Tekton exports its own spans under those). Its trace is the attempt
//!   context's trace:
//!   - when that is the PipelineRun span's trace (the usual case, traced or not), the parent is
//!     the PipelineRun span; when the context was Tekton's, the span also links to Tekton's
//!     TaskRun span;
//!   - when it is not (the captured `ship-run-traced`: Tekton's tracing was switched on as the run
//!     started and `checkout` got a trace of its own, which the webhook, seeing only the pod, gave
//!     checkout's steps), the attempt and its steps stay in the attempt's trace, under Tekton's
//!     TaskRun span (or as the root, for a derived context), the attempt links to the PipelineRun
//!     span and the PipelineRun span links back to the attempt.
//!
//!   So the steps' own telemetry always nests where the webhook pointed it, and a PipelineRun is
//!   one trace except in that documented case, where the links join the two.
//!   A standalone TaskRun's attempts are roots of its derived trace, or children of Tekton's
//!   TaskRun span when Tekton traced it.
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
//! for the PipelineRun's trace, Tekton's flag or [`sampled`]`(trace, policy.samplingRatio)`; for
//! an attempt in a trace of its own, its context's flag, which is the flag its pod got.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::SpanError;
use super::objects::{
    Condition, Object, PipelineRun, StepState, TaskRun, TaskRunStatus, succeeded,
};
use crate::admission::decide::service_name;
use crate::contract::attributes::task_run_attributes;
use crate::contract::tekton::{PIPELINE_RUN_UID, TASK_RUN_SPAN_CONTEXT, TaskRunFacts};
use crate::contract::w3c::{parse_span_context_annotation, parse_traceparent, parse_tracestate};
use crate::contract::{
    SpanId, TraceId, TraceSource, attempt_context, derive_pipeline_run_span_id,
    derive_pipeline_run_wait_span_id, derive_span_id, derive_step_span_id, derive_trace_id,
    sampled,
};
use crate::policy::Policy;
use crate::policy::run_spans::RunSpans;

/// Bound on a span's status message, in bytes. Tekton's messages for step failures are short
/// (`"step-compile" exited with code 2: Error`), but validation and resolution failures quote
/// whole specs and run to kilobytes; 256 bytes keeps the first sentence, which is what a reader of
/// a trace needs, and keeps each span small.
pub const STATUS_MESSAGE_MAX: usize = 256;

/// Which part of a run a span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    PipelineRun,
    Wait,
    Attempt,
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
    /// Tekton's own span for the TaskRun (its id is in Tekton's context, not ours).
    TektonTaskRun,
    /// Our PipelineRun span, in another trace.
    PipelineRun,
    /// One of our attempt spans, in another trace.
    Attempt,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::TektonTaskRun => "tekton.taskrun",
            LinkKind::PipelineRun => "pipelinerun",
            LinkKind::Attempt => "taskrun.attempt",
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

/// The result of a run or attempt, as OpenTelemetry's CICD conventions name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Success,
    Failure,
    Timeout,
    Cancellation,
    /// The CI system failed, not the work: the pod could not be made, the Task not fetched, the
    /// spec was invalid.
    Error,
}

impl RunResult {
    /// Maps a finished `Succeeded` condition: `True` is success whatever the reason (`Completed`
    /// means some tasks were skipped by `when`); on `False`, the reason decides, and a reason not
    /// known to be the system's fault, a timeout or a cancellation is a failure of the work.
    pub fn of(status_true: bool, reason: &str) -> RunResult {
        if status_true {
            return RunResult::Success;
        }
        const CANCELLED: &[&str] = &[
            "Cancelled",
            "TaskRunCancelled",
            "CancelledRunFinally",
            "StoppedRunFinally",
            "PipelineRunCancelled",
            "PipelineRunStopping",
        ];
        const SYSTEM: &[&str] = &[
            "PodCreationFailed",
            "CreateRunFailed",
            "CreateContainerConfigError",
            "ExceededResourceQuota",
            "ExceededNodeResources",
            "TaskRunImagePullFailed",
            "ResourceVerificationFailed",
            "ParameterMissing",
            "ParameterTypeMismatch",
            "ObjectParameterMissKeys",
            "RequiredWorkspaceMarkedOptional",
            "PipelineInvalidGraph",
            "TaskRunResolutionFailed",
            "PipelineRunResolutionFailed",
        ];
        if reason.ends_with("Timeout") || reason.ends_with("TimedOut") {
            RunResult::Timeout
        } else if CANCELLED.contains(&reason) {
            RunResult::Cancellation
        } else if SYSTEM.contains(&reason)
            || reason.starts_with("Couldnt")
            || reason.starts_with("Invalid")
            || reason.ends_with("ValidationFailed")
        {
            RunResult::Error
        } else {
            RunResult::Failure
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Timeout => "timeout",
            RunResult::Cancellation => "cancellation",
            RunResult::Error => "error",
        }
    }
}

/// The span tree of one finished run (see the module documentation for the rules).
/// The run-span settings are the policy's `runSpans` section.
pub fn span_tree(run: &Run<'_>, policy: &Policy) -> Result<SpanTree, SpanError> {
    let options = &policy.run_spans;
    let mut tree = SpanTree::default();
    match run {
        Run::Pipeline {
            pipeline_run,
            task_runs,
        } => {
            let parent = pipeline_run_spans(&mut tree, pipeline_run, task_runs, policy, options)?;
            for task_run in task_runs {
                task_run_spans(&mut tree, task_run, Some(&parent), policy, options)?;
            }
        }
        Run::Task(task_run) => task_run_spans(&mut tree, task_run, None, policy, options)?,
    }
    Ok(tree)
}

/// What the attempts need to know of the PipelineRun span.
struct PipelineRunParent {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    /// Index of the PipelineRun span in the tree, when it was exported.
    index: Option<usize>,
}

/// The keys of [`task_run_attributes`] that span attributes repeat: the CICD, VCS and
/// Kubernetes conventions. The `tekton.*` ones stay on the resource only.
fn convention_key(key: &str) -> bool {
    key.starts_with("cicd.") || key.starts_with("vcs.") || key.starts_with("k8s.")
}

/// Keys of [`task_run_attributes`] that describe one TaskRun, not the PipelineRun as a whole
/// (the PipelineRun's facts stand its own name in for the TaskRun's).
fn task_run_scoped(key: &str) -> bool {
    key.starts_with("tekton.taskrun.")
        || key.starts_with("cicd.pipeline.task.")
        || key == "k8s.pod.name"
}

fn pipeline_run_spans(
    tree: &mut SpanTree,
    run: &PipelineRun,
    task_runs: &[&TaskRun],
    policy: &Policy,
    options: &RunSpans,
) -> Result<PipelineRunParent, SpanError> {
    let object = run.metadata.display_name("PipelineRun");
    let missing = |field: &str, expected: &str| SpanError::Input {
        object: object.clone(),
        field: field.to_owned(),
        expected: expected.to_owned(),
    };
    let name = required(run.metadata.name.as_deref(), || {
        missing("metadata.name", "a name")
    })?;
    let uid = required(run.metadata.uid.as_deref(), || {
        missing("metadata.uid", "the run's uid")
    })?;
    let created = run
        .metadata
        .creation_timestamp
        .as_ref()
        .ok_or_else(|| missing("metadata.creationTimestamp", "a time"))?;
    let status = run
        .status
        .as_ref()
        .ok_or_else(|| missing("status", "the status of a finished run"))?;
    let (condition, ok) = finished(&status.conditions)
        .ok_or_else(|| missing(UNFINISHED_FIELD, UNFINISHED_EXPECTED))?;
    let start = nanos(created);
    let end = end_of(status.completion_time.as_ref(), condition)
        .ok_or_else(|| missing("status.completionTime", "a time"))?
        .max(start);
    let started = status.start_time.as_ref().map(nanos);
    let namespace = run.metadata.namespace.as_deref().unwrap_or("");

    let mut facts = TaskRunFacts::from_task_run(
        name,
        None,
        run.metadata.labels.as_ref(),
        run.metadata.annotations.as_ref(),
        0,
    );
    facts.pipeline_run = Some(name);
    facts.pipeline_run_uid = Some(uid);

    let tekton = status
        .span_context
        .as_ref()
        .and_then(|c| c.get("traceparent"))
        .map(|tp| parse_traceparent(tp));
    // Tekton records a span context on every run even when its tracing is off (random ids that
    // no exporter sends); only when a TaskRun carries Tekton's context in the same trace did
    // Tekton propagate, and so export, that trace.
    let tekton = tekton.filter(|parsed| match parsed {
        Ok((trace, _, _)) => task_runs.iter().any(|t| tekton_trace(t) == Some(*trace)),
        Err(_) => true,
    });
    let (trace_id, parent_id, flags, trace_state) = match tekton {
        Some(Ok((trace, span, flags))) => {
            let state = status
                .span_context
                .as_ref()
                .and_then(|c| c.get("tracestate"))
                .and_then(|s| parse_tracestate(s.trim()).value);
            (trace, Some(span), flags, state)
        }
        other => {
            if let Some(Err(e)) = other {
                tree.notes.push(format!(
                    "{object}: status.spanContext.traceparent not used ({}); the trace is derived from the uid",
                    e.0
                ));
            }
            let trace = derive_trace_id(uid);
            (
                trace,
                None,
                u8::from(sampled(trace, policy.sampling_ratio)),
                None,
            )
        }
    };
    let span_id = derive_pipeline_run_span_id(uid);
    let is_sampled = flags & 1 == 1;
    let mut parent = PipelineRunParent {
        trace_id,
        span_id,
        sampled: is_sampled,
        index: None,
    };
    if !is_sampled {
        tree.unsampled.push(trace_id);
        return Ok(parent);
    }

    let contract = task_run_attributes(&facts, namespace, None);
    let resource = tree.resource(
        service_name(policy, &facts, namespace, str::to_owned),
        contract
            .iter()
            .filter(|(k, _)| !task_run_scoped(k))
            .map(|(k, v)| (*k, v.as_ref())),
        policy,
    );
    let result = RunResult::of(ok, reason_of(condition));
    let mut attributes: Vec<(&'static str, AttributeValue)> = contract
        .into_iter()
        .filter(|(k, _)| convention_key(k) && !task_run_scoped(k))
        .map(|(k, v)| (k, AttributeValue::Str(v.into_owned())))
        .collect();
    attributes.push(("cicd.pipeline.result", str_value(result.as_str())));
    if let Some(template) = &options.pipeline_run_url {
        let trace = trace_id.to_string();
        let url = template.render(|field| match field {
            "namespace" => Some(namespace),
            "pipelineRun" => Some(name),
            "pipelineRunUid" => Some(uid),
            "traceId" => Some(trace.as_str()),
            _ => None,
        });
        if let Some(url) = url {
            set(&mut attributes, "cicd.pipeline.run.url.full", url);
        }
    }
    let span_status = span_status(ok, condition, &mut attributes);
    parent.index = Some(tree.spans.len());
    tree.spans.push(RunSpan {
        role: Role::PipelineRun,
        resource,
        trace_id,
        span_id,
        parent_id,
        trace_state: trace_state.clone(),
        flags,
        name: facts.pipeline_name().to_owned(),
        kind: Kind::Server,
        start,
        end,
        status: span_status,
        attributes,
        links: Vec::new(),
    });
    if let Some(started) = started {
        let started = started.clamp(start, end);
        if started > start {
            tree.spans.push(RunSpan {
                role: Role::Wait,
                resource,
                trace_id,
                span_id: derive_pipeline_run_wait_span_id(uid),
                parent_id: Some(span_id),
                trace_state,
                flags,
                name: "wait".to_owned(),
                kind: Kind::Internal,
                start,
                end: started,
                status: Status::Unset,
                attributes: Vec::new(),
                links: Vec::new(),
            });
        }
    }
    Ok(parent)
}

/// The trace of Tekton's context on a TaskRun (`tekton.dev/taskrunSpanContext`), which Tekton
/// writes only when its tracing is on.
fn tekton_trace(run: &TaskRun) -> Option<TraceId> {
    let annotation = run
        .metadata
        .annotations
        .as_ref()?
        .get(TASK_RUN_SPAN_CONTEXT)?;
    parse_span_context_annotation(annotation)
        .ok()
        .map(|c| c.trace_id)
}

fn task_run_spans(
    tree: &mut SpanTree,
    run: &TaskRun,
    pipeline: Option<&PipelineRunParent>,
    policy: &Policy,
    options: &RunSpans,
) -> Result<(), SpanError> {
    let object = run.metadata.display_name("TaskRun");
    let missing = |field: &str, expected: &str| SpanError::Input {
        object: object.clone(),
        field: field.to_owned(),
        expected: expected.to_owned(),
    };
    let name = required(run.metadata.name.as_deref(), || {
        missing("metadata.name", "a name")
    })?;
    let uid = required(run.metadata.uid.as_deref(), || {
        missing("metadata.uid", "the run's uid")
    })?;
    let created = nanos(
        run.metadata
            .creation_timestamp
            .as_ref()
            .ok_or_else(|| missing("metadata.creationTimestamp", "a time"))?,
    );
    let status = run
        .status
        .as_ref()
        .ok_or_else(|| missing("status", "the status of a finished run"))?;
    let namespace = run.metadata.namespace.as_deref().unwrap_or("");
    let retries = status.retries_status.len();
    let attempts = status
        .retries_status
        .iter()
        .enumerate()
        .map(|(i, a)| (i, a, format!("status.retriesStatus[{i}].")))
        .chain(std::iter::once((retries, status, "status.".to_owned())));
    for (attempt, state, prefix) in attempts {
        // A TaskRun has at most a handful of retries (`retries` in the Pipeline); an attempt
        // number past u32 is not a TaskRun Tekton wrote.
        let attempt = u32::try_from(attempt)
            .map_err(|_| missing("status.retriesStatus", "fewer attempts"))?;
        let (condition, ok) = finished(&state.conditions).ok_or_else(|| {
            missing(
                &format!("{prefix}{}", &UNFINISHED_FIELD["status.".len()..]),
                UNFINISHED_EXPECTED,
            )
        })?;
        let end = end_of(state.completion_time.as_ref(), condition)
            .ok_or_else(|| missing(&format!("{prefix}completionTime"), "a time"))?;
        // The final attempt of a TaskRun that never started (its pod could not be created) has
        // no startTime: it took from creation to its end.
        let start = match &state.start_time {
            Some(t) => nanos(t),
            None if attempt as usize == retries => created,
            None => end,
        }
        .min(end);
        let facts = TaskRunFacts::from_task_run(
            name,
            Some(uid),
            run.metadata.labels.as_ref(),
            run.metadata.annotations.as_ref(),
            attempt,
        );
        let attempt_run = AttemptRun {
            facts: &facts,
            uid,
            namespace,
            state,
            prefix: &prefix,
            condition,
            ok,
            start,
            end,
            labels: run.metadata.labels.as_ref(),
            object: &object,
        };
        attempt_spans(tree, &attempt_run, pipeline, policy, options)?;
    }
    Ok(())
}

/// One attempt of a TaskRun, validated.
struct AttemptRun<'a> {
    facts: &'a TaskRunFacts<'a>,
    uid: &'a str,
    namespace: &'a str,
    state: &'a TaskRunStatus,
    prefix: &'a str,
    condition: &'a Condition,
    ok: bool,
    start: u64,
    end: u64,
    labels: Option<&'a crate::contract::tekton::Labels>,
    object: &'a str,
}

fn attempt_spans(
    tree: &mut SpanTree,
    run: &AttemptRun<'_>,
    pipeline: Option<&PipelineRunParent>,
    policy: &Policy,
    options: &RunSpans,
) -> Result<(), SpanError> {
    let facts = run.facts;
    let attempt = facts.retry;
    let (context, source) = attempt_context(facts, policy.sampling_ratio);
    if let TraceSource::Derived {
        malformed: Some(why),
        ..
    } = &source
    {
        tree.notes.push(format!(
            "{} attempt {attempt}: tekton.dev/taskrunSpanContext not used ({why}); the webhook derived the context too",
            run.object
        ));
    }
    let tekton = source == TraceSource::Tekton;
    let span_id = derive_span_id(run.uid, attempt);
    let joined = pipeline.filter(|p| p.trace_id == context.trace_id);
    let is_sampled = match joined {
        Some(p) => p.sampled,
        None => context.sampled(),
    };
    if !is_sampled {
        if !tree.unsampled.contains(&context.trace_id) {
            tree.unsampled.push(context.trace_id);
        }
        return Ok(());
    }
    let mut links = Vec::new();
    let parent_id = match (joined, pipeline) {
        (Some(p), _) => {
            if tekton {
                links.push(Link {
                    trace_id: context.trace_id,
                    span_id: context.parent_id,
                    kind: LinkKind::TektonTaskRun,
                });
            }
            Some(p.span_id)
        }
        (None, Some(p)) => {
            links.push(Link {
                trace_id: p.trace_id,
                span_id: p.span_id,
                kind: LinkKind::PipelineRun,
            });
            if let Some(index) = p.index {
                tree.spans[index].links.push(Link {
                    trace_id: context.trace_id,
                    span_id,
                    kind: LinkKind::Attempt,
                });
            }
            tekton.then_some(context.parent_id)
        }
        (None, None) => tekton.then_some(context.parent_id),
    };

    let pod = run
        .state
        .pod_name
        .as_deref()
        .filter(|p| !p.trim().is_empty());
    let contract = task_run_attributes(facts, run.namespace, pod);
    let resource = tree.resource(
        service_name(policy, facts, run.namespace, str::to_owned),
        contract.iter().map(|(k, v)| (*k, v.as_ref())),
        policy,
    );
    let result = RunResult::of(run.ok, reason_of(run.condition));
    let mut attributes: Vec<(&'static str, AttributeValue)> = contract
        .into_iter()
        .filter(|(k, _)| convention_key(k))
        .map(|(k, v)| (k, AttributeValue::Str(v.into_owned())))
        .collect();
    attributes.push(("cicd.pipeline.task.run.result", str_value(result.as_str())));
    if let Some(template) = &options.task_run_url {
        let trace = context.trace_id.to_string();
        let url = template.render(|field| match field {
            "namespace" => Some(run.namespace),
            "pipelineRun" => facts.pipeline_run,
            "pipelineRunUid" => facts.pipeline_run_uid,
            "taskRun" => Some(facts.task_run),
            "taskRunUid" => Some(run.uid),
            "pipelineTask" => facts.pipeline_task,
            "traceId" => Some(trace.as_str()),
            _ => None,
        });
        if let Some(url) = url {
            attributes.push(("cicd.pipeline.task.run.url.full", AttributeValue::Str(url)));
        }
    }
    if is_deploy(facts, run.labels, options) {
        attributes.push(("cicd.pipeline.task.type", str_value("deploy")));
        if let Some(task) = facts.task_name() {
            attributes.push(("deployment.name", str_value(task)));
        }
        attributes.push(("deployment.id", str_value(run.uid)));
        let outcome = if run.ok { "succeeded" } else { "failed" };
        attributes.push(("deployment.status", str_value(outcome)));
        let environment = options.deploy_environment.as_deref().or_else(|| {
            policy
                .resource_attributes
                .get("deployment.environment.name")
                .map(String::as_str)
        });
        if let Some(environment) = environment {
            attributes.push(("deployment.environment.name", str_value(environment)));
        }
    }
    let status = span_status(run.ok, run.condition, &mut attributes);
    tree.spans.push(RunSpan {
        role: Role::Attempt,
        resource,
        trace_id: context.trace_id,
        span_id,
        parent_id,
        trace_state: context.tracestate.clone(),
        flags: context.flags,
        name: facts.task_name().unwrap_or(facts.task_run).to_owned(),
        kind: Kind::Internal,
        start: run.start,
        end: run.end,
        status,
        attributes,
        links,
    });

    for (i, step) in run.state.steps.iter().enumerate() {
        let Some(terminated) = &step.terminated else {
            continue;
        };
        let step_name = step_name(step).ok_or_else(|| SpanError::Input {
            object: run.object.to_owned(),
            field: format!("{}steps[{i}].name", run.prefix),
            expected: "the step's name".to_owned(),
        })?;
        let start = terminated.started_at.as_ref().map_or(run.start, nanos);
        let end = terminated
            .finished_at
            .as_ref()
            .map_or(start, nanos)
            .max(start);
        let reason = terminated.reason.as_deref().unwrap_or("");
        let skipped = step.termination_reason.as_deref() == Some(SKIPPED) || reason == SKIPPED;
        let mut attributes = vec![
            ("tekton.step.name", str_value(step_name)),
            (
                "k8s.container.name",
                AttributeValue::Str(
                    step.container
                        .clone()
                        .unwrap_or_else(|| format!("step-{step_name}")),
                ),
            ),
            (
                "process.exit.code",
                AttributeValue::Int(i64::from(terminated.exit_code)),
            ),
        ];
        if let Some(why) = step
            .termination_reason
            .as_deref()
            .or(terminated.reason.as_deref())
        {
            attributes.push(("tekton.step.termination_reason", str_value(why)));
        }
        let status = if skipped {
            attributes.push(("tekton.step.skipped", AttributeValue::Bool(true)));
            Status::Unset
        } else if terminated.exit_code != 0 {
            let error_type = if reason.is_empty() || reason == "Error" {
                terminated.exit_code.to_string()
            } else {
                reason.to_owned()
            };
            attributes.push(("error.type", AttributeValue::Str(error_type)));
            let mut message = format!("exited with code {}", terminated.exit_code);
            if !reason.is_empty() {
                message.push_str(": ");
                message.push_str(reason);
            }
            Status::Error {
                message: clip(&message, STATUS_MESSAGE_MAX),
            }
        } else {
            Status::Ok
        };
        tree.spans.push(RunSpan {
            role: Role::Step,
            resource,
            trace_id: context.trace_id,
            span_id: derive_step_span_id(run.uid, attempt, step_name),
            parent_id: Some(span_id),
            trace_state: context.tracestate.clone(),
            flags: context.flags,
            name: step_name.to_owned(),
            kind: Kind::Internal,
            start,
            end,
            status,
            attributes,
            links: Vec::new(),
        });
    }
    Ok(())
}

/// Tekton's reason for a step it did not run because an earlier one failed.
const SKIPPED: &str = "Skipped";

/// The field named when a run has not finished, and what it should have held.
const UNFINISHED_FIELD: &str = "status.conditions[type=Succeeded].status";
const UNFINISHED_EXPECTED: &str = "True or False (a finished run)";

/// A step's name as the webhook derives its span id: `name`, else its container's name without
/// Tekton's `step-` prefix.
fn step_name(step: &StepState) -> Option<&str> {
    Some(step.name.as_str())
        .filter(|n| !n.is_empty())
        .or_else(|| {
            step.container
                .as_deref()
                .map(|c| c.strip_prefix("step-").unwrap_or(c))
        })
        .filter(|n| !n.is_empty())
}

fn is_deploy(
    facts: &TaskRunFacts<'_>,
    labels: Option<&crate::contract::tekton::Labels>,
    options: &RunSpans,
) -> bool {
    let by_task = facts
        .pipeline_task
        .is_some_and(|t| options.deploy_tasks.iter().any(|d| d == t));
    let by_label = labels.is_some_and(|labels| {
        options
            .deploy_labels
            .iter()
            .any(|(k, v)| labels.get(k) == Some(v))
    });
    by_task || by_label
}

/// The `Succeeded` condition of a finished run and whether it succeeded; `None` when the run
/// has not finished.
fn finished(conditions: &[Condition]) -> Option<(&Condition, bool)> {
    let condition = succeeded(conditions)?;
    match condition.status.as_str() {
        "True" => Some((condition, true)),
        "False" => Some((condition, false)),
        _ => None,
    }
}

fn reason_of(condition: &Condition) -> &str {
    condition.reason.as_deref().unwrap_or("")
}

/// A run ends at `completionTime`, or (older controllers) when its condition last changed.
fn end_of(completion: Option<&Time>, condition: &Condition) -> Option<u64> {
    completion
        .or(condition.last_transition_time.as_ref())
        .map(nanos)
}

/// Error with `<reason>: <message>` for a failed run, adding `error.type`; OK otherwise.
fn span_status(
    ok: bool,
    condition: &Condition,
    attributes: &mut Vec<(&'static str, AttributeValue)>,
) -> Status {
    if ok {
        return Status::Ok;
    }
    let reason = reason_of(condition);
    let message = match (reason, condition.message.as_deref()) {
        ("", Some(m)) => m.to_owned(),
        (r, Some(m)) if !m.is_empty() => format!("{r}: {m}"),
        (r, _) => r.to_owned(),
    };
    attributes.push((
        "error.type",
        str_value(if reason.is_empty() { "Failed" } else { reason }),
    ));
    Status::Error {
        message: clip(&message, STATUS_MESSAGE_MAX),
    }
}

fn set(attributes: &mut Vec<(&'static str, AttributeValue)>, key: &'static str, value: String) {
    match attributes.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = AttributeValue::Str(value),
        None => attributes.push((key, AttributeValue::Str(value))),
    }
}

fn str_value(value: &str) -> AttributeValue {
    AttributeValue::Str(value.to_owned())
}

fn required(value: Option<&str>, error: impl FnOnce() -> SpanError) -> Result<&str, SpanError> {
    value.filter(|v| !v.trim().is_empty()).ok_or_else(error)
}

/// Unix nanoseconds; times before 1970 (no Tekton run) become 0 rather than an error.
fn nanos(time: &Time) -> u64 {
    u64::try_from(time.0.as_nanosecond()).unwrap_or(0)
}

/// The first `max` bytes of `text` on a character boundary, with `…` when something was cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
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
        for (key, value) in &policy.resource_attributes {
            if !attributes.iter().any(|(k, _)| k == key) {
                attributes.push((key.clone(), value.clone()));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tekton_reasons_map_to_the_convention_results() {
        let cases = [
            (true, "Succeeded", RunResult::Success),
            (true, "Completed", RunResult::Success),
            (false, "Failed", RunResult::Failure),
            (false, "StepFailed", RunResult::Failure),
            (false, "SomethingNew", RunResult::Failure),
            (false, "", RunResult::Failure),
            (false, "PipelineRunTimeout", RunResult::Timeout),
            (false, "TaskRunTimeout", RunResult::Timeout),
            (false, "Cancelled", RunResult::Cancellation),
            (false, "TaskRunCancelled", RunResult::Cancellation),
            (false, "CancelledRunFinally", RunResult::Cancellation),
            (false, "StoppedRunFinally", RunResult::Cancellation),
            (false, "PodCreationFailed", RunResult::Error),
            (false, "CouldntGetTask", RunResult::Error),
            (false, "CouldntGetPipeline", RunResult::Error),
            (false, "InvalidWorkspaceBindings", RunResult::Error),
            (false, "PipelineValidationFailed", RunResult::Error),
            (false, "TaskRunImagePullFailed", RunResult::Error),
        ];
        for (ok, reason, expected) in cases {
            assert_eq!(RunResult::of(ok, reason), expected, "{ok} {reason}");
        }
        assert_eq!(RunResult::Cancellation.as_str(), "cancellation");
    }

    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…");
        assert_eq!(clip("aé", 2), "a…");
        let long = "x".repeat(10_000);
        assert!(clip(&long, STATUS_MESSAGE_MAX).len() <= STATUS_MESSAGE_MAX + "…".len());
    }
}
