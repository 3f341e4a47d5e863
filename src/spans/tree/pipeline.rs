//! The PipelineRun's spans: the run itself and the time it waited to start. The run's trace is
//! always derived from its uid and the PipelineRun span is its root; when Tekton really traced the
//! run, the span links to Tekton's PipelineRun span (see the module documentation of [`super`]).

use super::attributes::{
    Attributes, contract_attributes, pipeline_run_url, set, str_value, task_run_scoped,
};
use super::result::{
    RunResult, UNFINISHED_EXPECTED, UNFINISHED_FIELD, end_of, finished, reason_of, span_status,
};
use super::{
    Identity, Kind, Link, LinkKind, Role, RunSpan, SpanTree, Status, identity, input_error, nanos,
};
use crate::contract::tekton::{Labels, TASK_RUN_SPAN_CONTEXT, TaskRunFacts};
use crate::contract::w3c::{parse_span_context_annotation, parse_traceparent};
use crate::contract::{
    SpanId, TraceId, derive_pipeline_run_span_id, derive_pipeline_run_wait_span_id,
    derive_trace_id, sampled,
};
use crate::policy::Policy;
use crate::spans::SpanError;
use crate::spans::objects::{Condition, PipelineRun, PipelineRunStatus, TaskRun};

/// `cicd.pipeline.action.name` of a PipelineRun: the conventions' `RUN` (`BUILD` and `SYNC` are
/// for systems that tell those apart; Tekton runs a pipeline, whatever its tasks do). The span is
/// named `{action} {pipeline}`, as the conventions say.
pub(super) const ACTION_RUN: &str = "RUN";

/// What the attempts need to know of the PipelineRun span.
pub(super) struct PipelineRunParent {
    pub(super) span_id: SpanId,
    pub(super) sampled: bool,
}

/// A finished PipelineRun, validated: every field its spans need.
struct FinishedPipelineRun<'a> {
    object: String,
    name: &'a str,
    uid: &'a str,
    namespace: &'a str,
    labels: Option<&'a Labels>,
    annotations: Option<&'a Labels>,
    status: &'a PipelineRunStatus,
    condition: &'a Condition,
    ok: bool,
    start: u64,
    end: u64,
}

/// The trace the PipelineRun span is the root of, and its link to Tekton's PipelineRun span.
struct PipelineTrace {
    trace_id: TraceId,
    flags: u8,
    link: Option<Link>,
}

pub(super) fn pipeline_run_spans(
    tree: &mut SpanTree,
    run: &PipelineRun,
    task_runs: &[&TaskRun],
    policy: &Policy,
) -> Result<PipelineRunParent, SpanError> {
    let run = finished_pipeline_run(run)?;
    let trace = pipeline_trace(tree, &run, task_runs, policy);
    let span_id = derive_pipeline_run_span_id(run.uid);
    let is_sampled = trace.flags & 1 == 1;
    let parent = PipelineRunParent {
        span_id,
        sampled: is_sampled,
    };
    if !is_sampled {
        tree.unsampled.push(trace.trace_id);
        return Ok(parent);
    }

    let mut facts = TaskRunFacts::from_task_run(run.name, None, run.labels, run.annotations, 0);
    facts.pipeline_run = Some(run.name);
    facts.pipeline_run_uid = Some(run.uid);
    let (resource, mut attributes) =
        contract_attributes(tree, &facts, run.namespace, None, policy, |k| {
            !task_run_scoped(k)
        });
    attributes.push(("cicd.pipeline.action.name", str_value(ACTION_RUN)));
    let status = pipeline_run_status(&run, trace.trace_id, policy, &mut attributes);
    tree.spans.push(RunSpan {
        role: Role::PipelineRun,
        resource,
        trace_id: trace.trace_id,
        span_id,
        parent_id: None,
        trace_state: None,
        flags: trace.flags,
        name: format!("{ACTION_RUN} {}", facts.pipeline_name()),
        kind: Kind::Server,
        start: run.start,
        end: run.end,
        status,
        attributes,
        links: trace.link.clone().into_iter().collect(),
    });
    if let Some(wait) = wait_span(&run, &trace, span_id, resource) {
        tree.spans.push(wait);
    }
    Ok(parent)
}

/// Reads what the spans need off a PipelineRun, or names the field that is missing.
fn finished_pipeline_run(run: &PipelineRun) -> Result<FinishedPipelineRun<'_>, SpanError> {
    let Identity {
        object,
        name,
        uid,
        created: start,
    } = identity(&run.metadata, "PipelineRun")?;
    let missing = |field: &str, expected: &str| input_error(&object, field, expected);
    let status = run
        .status
        .as_ref()
        .ok_or_else(|| missing("status", "the status of a finished run"))?;
    let (condition, ok) = finished(&status.conditions)
        .ok_or_else(|| missing(UNFINISHED_FIELD, UNFINISHED_EXPECTED))?;
    let end = end_of(status.completion_time.as_ref(), condition)
        .ok_or_else(|| missing("status.completionTime", "a time"))?
        .max(start);
    Ok(FinishedPipelineRun {
        name,
        uid,
        namespace: run.metadata.namespace.as_deref().unwrap_or(""),
        labels: run.metadata.labels.as_ref(),
        annotations: run.metadata.annotations.as_ref(),
        status,
        condition,
        ok,
        start,
        end,
        object,
    })
}

/// The run's derived trace, sampled by the policy's ratio, and the link to Tekton's PipelineRun
/// span when Tekton really traced the run: Tekton records a span context on every run even when
/// its tracing is off (random ids that no exporter sends); only when a TaskRun carries Tekton's
/// context in the same trace did Tekton propagate, and so export, that trace.
fn pipeline_trace(
    tree: &mut SpanTree,
    run: &FinishedPipelineRun<'_>,
    task_runs: &[&TaskRun],
    policy: &Policy,
) -> PipelineTrace {
    let tekton = run
        .status
        .span_context
        .as_ref()
        .and_then(|c| c.get("traceparent"))
        .map(|tp| parse_traceparent(tp));
    let link = match tekton {
        Some(Ok((trace_id, span_id, _))) => task_runs
            .iter()
            .any(|t| tekton_trace(t) == Some(trace_id))
            .then_some(Link {
                trace_id,
                span_id,
                kind: LinkKind::TektonPipelineRun,
            }),
        Some(Err(e)) => {
            tree.notes.push(format!(
                "{}: status.spanContext.traceparent not linked ({})",
                run.object, e.0
            ));
            None
        }
        None => None,
    };
    let trace_id = derive_trace_id(run.uid);
    PipelineTrace {
        trace_id,
        flags: u8::from(sampled(trace_id, policy.sampling_ratio)),
        link,
    }
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

/// Adds the run's result and dashboard URL to its attributes and returns its status.
fn pipeline_run_status(
    run: &FinishedPipelineRun<'_>,
    trace_id: TraceId,
    policy: &Policy,
    attributes: &mut Attributes,
) -> Status {
    let result = RunResult::of(run.ok, reason_of(run.condition));
    attributes.push(("cicd.pipeline.result", str_value(result.as_str())));
    let url = pipeline_run_url(
        &policy.run_spans,
        run.namespace,
        run.name,
        run.uid,
        trace_id,
    );
    if let Some(url) = url {
        set(attributes, "cicd.pipeline.run.url.full", url);
    }
    span_status(run.ok, run.condition, attributes)
}

/// The wait span, creation to `status.startTime`, when the run waited at all.
fn wait_span(
    run: &FinishedPipelineRun<'_>,
    trace: &PipelineTrace,
    parent_id: SpanId,
    resource: usize,
) -> Option<RunSpan> {
    let started = nanos(run.status.start_time.as_ref()?).clamp(run.start, run.end);
    (started > run.start).then(|| RunSpan {
        role: Role::Wait,
        resource,
        trace_id: trace.trace_id,
        span_id: derive_pipeline_run_wait_span_id(run.uid),
        parent_id: Some(parent_id),
        trace_state: None,
        flags: trace.flags,
        name: "wait".to_owned(),
        kind: Kind::Internal,
        start: run.start,
        end: started,
        status: Status::Unset,
        attributes: Vec::new(),
        links: Vec::new(),
    })
}
