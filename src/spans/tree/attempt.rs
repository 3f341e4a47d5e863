//! A TaskRun's spans: one per attempt (each `status.retriesStatus[i]`, then the final status),
//! with the context the webhook injected into that attempt's pod, and one per step that ran.

use super::attributes::{
    Attributes, contract_attributes, deploy_attributes, str_value, task_run_url,
};
use super::pipeline::PipelineRunParent;
use super::result::{
    RunResult, STATUS_MESSAGE_MAX, UNFINISHED_EXPECTED, UNFINISHED_FIELD, clip, end_of, finished,
    reason_of, span_status,
};
use super::{
    AttributeValue, Identity, Kind, Link, LinkKind, Role, RunSpan, SpanTree, Status, identity,
    input_error, nanos,
};
use crate::contract::tekton::{Labels, TaskRunFacts};
use crate::contract::w3c::SpanContext;
use crate::contract::{
    ContextRule, SpanId, TektonContext, TraceSource, attempt_context,
    derive_attempt_startup_span_id, derive_span_id, derive_step_span_id,
};
use crate::policy::Policy;
use crate::spans::SpanError;
use crate::spans::objects::{Condition, StepState, TaskRun, TaskRunStatus, Terminated};

/// Tekton's reason for a step it did not run because an earlier one failed.
const SKIPPED: &str = "Skipped";

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
    labels: Option<&'a Labels>,
    object: &'a str,
}

/// Where an attempt's step spans go: the attempt's resource and trace, under the attempt span.
struct StepPlace<'a> {
    resource: usize,
    context: &'a SpanContext,
    parent_id: SpanId,
}

/// Where an exported attempt span goes: its id, its parent and its links.
struct Placement {
    span_id: SpanId,
    parent_id: Option<SpanId>,
    links: Vec<Link>,
}

/// When and how one attempt of a TaskRun ran: what spans and metrics both read.
pub(crate) struct AttemptTimes<'a> {
    pub(crate) attempt: u32,
    pub(crate) state: &'a TaskRunStatus,
    /// Where the attempt's fields are, for errors: `status.` or `status.retriesStatus[i].`.
    pub(crate) prefix: String,
    pub(crate) condition: &'a Condition,
    pub(crate) ok: bool,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// Each attempt of a finished TaskRun, in the order they ran: `status.retriesStatus[i]` is
/// attempt `i`, the final status attempt `len(retriesStatus)`. `created` is the TaskRun's
/// creation (the start of a final attempt that never started); `object` names it in errors.
pub(crate) fn attempt_times<'a>(
    status: &'a TaskRunStatus,
    created: u64,
    object: &str,
) -> Result<Vec<AttemptTimes<'a>>, SpanError> {
    let missing = |field: &str, expected: &str| input_error(object, field, expected);
    let retries = status.retries_status.len();
    let attempts = status
        .retries_status
        .iter()
        .enumerate()
        .map(|(i, a)| (i, a, format!("status.retriesStatus[{i}].")))
        .chain(std::iter::once((retries, status, "status.".to_owned())));
    let mut times = Vec::with_capacity(retries + 1);
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
        times.push(AttemptTimes {
            attempt,
            state,
            prefix,
            condition,
            ok,
            start,
            end,
        });
    }
    Ok(times)
}

pub(super) fn task_run_spans(
    tree: &mut SpanTree,
    run: &TaskRun,
    pipeline: Option<&PipelineRunParent>,
    policy: &Policy,
) -> Result<(), SpanError> {
    let Identity {
        object,
        name,
        uid,
        created,
    } = identity(&run.metadata, "TaskRun")?;
    let status = run
        .status
        .as_ref()
        .ok_or_else(|| input_error(&object, "status", "the status of a finished run"))?;
    for times in attempt_times(status, created, &object)? {
        let labels = run.metadata.labels.as_ref();
        let annotations = run.metadata.annotations.as_ref();
        let facts =
            TaskRunFacts::from_task_run(name, Some(uid), labels, annotations, times.attempt);
        let attempt_run = AttemptRun {
            facts: &facts,
            uid,
            namespace: run.metadata.namespace.as_deref().unwrap_or(""),
            state: times.state,
            prefix: &times.prefix,
            condition: times.condition,
            ok: times.ok,
            start: times.start,
            end: times.end,
            labels,
            object: &object,
        };
        attempt_spans(tree, &attempt_run, pipeline, policy)?;
    }
    Ok(())
}

/// The attempt's span and its steps' spans, unless the attempt's trace is not sampled.
fn attempt_spans(
    tree: &mut SpanTree,
    run: &AttemptRun<'_>,
    pipeline: Option<&PipelineRunParent>,
    policy: &Policy,
) -> Result<(), SpanError> {
    let facts = run.facts;
    // The spans are what the exporter sends, which it does only with run spans on: context rule
    // v2, the ids the webhook gave the pods under such a policy.
    let (context, source) = attempt_context(facts, policy.sampling_ratio, ContextRule::Derived);
    let tekton = match &source {
        TraceSource::Derived {
            tekton: Some(TektonContext::NotFollowed(theirs)),
            ..
        } => Some(theirs),
        TraceSource::Derived {
            tekton: Some(TektonContext::Malformed(why)),
            ..
        } => {
            tree.notes.push(format!(
                "{} attempt {}: tekton.dev/taskrunSpanContext not linked ({why})",
                run.object, facts.retry
            ));
            None
        }
        _ => None,
    };
    let Some(placement) = place(tree, run, &context, tekton, pipeline) else {
        return Ok(());
    };

    let pod = run
        .state
        .pod_name
        .as_deref()
        .filter(|p| !p.trim().is_empty());
    let (resource, mut attributes) =
        contract_attributes(tree, facts, run.namespace, pod, policy, |_| true);
    let status = attempt_status(run, &context, policy, &mut attributes);
    tree.spans.push(RunSpan {
        role: Role::Attempt,
        resource,
        trace_id: context.trace_id,
        span_id: placement.span_id,
        parent_id: placement.parent_id,
        trace_state: context.tracestate.clone(),
        flags: context.flags,
        name: facts.task_name().unwrap_or(facts.task_run).to_owned(),
        kind: Kind::Internal,
        start: run.start,
        end: run.end,
        status,
        attributes,
        links: placement.links,
    });

    let steps = StepPlace {
        resource,
        context: &context,
        parent_id: placement.span_id,
    };
    if let Some(startup) = startup_span(run, &steps) {
        tree.spans.push(startup);
    }
    step_spans(tree, run, &steps)
}

/// What a startup span says it is, so a backend can chart startups apart from steps.
pub(super) const PHASE_KEY: &str = "tekton.span.phase";
pub(super) const PHASE_STARTUP: &str = "startup";

/// When the attempt's first step started: the earliest `startedAt` of its steps, `terminated`
/// else `running`; `None` when no step started.
pub(super) fn first_step_start(state: &TaskRunStatus) -> Option<u64> {
    state
        .steps
        .iter()
        .filter_map(|step| {
            step.terminated
                .as_ref()
                .and_then(|t| t.started_at.as_ref())
                .or_else(|| step.running.as_ref().and_then(|r| r.started_at.as_ref()))
        })
        .map(nanos)
        .min()
}

/// The attempt's startup, from its start to its first step's start, when a step started and
/// that took any time at all.
fn startup_span(run: &AttemptRun<'_>, place: &StepPlace<'_>) -> Option<RunSpan> {
    let first = first_step_start(run.state)?.min(run.end);
    let mut attributes = vec![(PHASE_KEY, str_value(PHASE_STARTUP))];
    if let Some(task) = run.facts.task_name() {
        attributes.push(("cicd.pipeline.task.name", str_value(task)));
    }
    (first > run.start).then(|| RunSpan {
        role: Role::Startup,
        resource: place.resource,
        trace_id: place.context.trace_id,
        span_id: derive_attempt_startup_span_id(run.uid, run.facts.retry),
        parent_id: Some(place.parent_id),
        trace_state: place.context.tracestate.clone(),
        flags: place.context.flags,
        name: PHASE_STARTUP.to_owned(),
        kind: Kind::Internal,
        start: run.start,
        end: first,
        status: Status::Unset,
        attributes,
        links: Vec::new(),
    })
}

/// The attempt span's id, parent and links, or `None` (the trace noted as unsampled) when its
/// trace is not sampled. The parent is the PipelineRun span (a standalone TaskRun's attempt is the
/// root); the link, when Tekton gave the TaskRun a valid context, is to Tekton's TaskRun span.
fn place(
    tree: &mut SpanTree,
    run: &AttemptRun<'_>,
    context: &SpanContext,
    tekton: Option<&SpanContext>,
    pipeline: Option<&PipelineRunParent>,
) -> Option<Placement> {
    // Under context rule v2 an attempt of a PipelineRun is in the run's trace (both derive it
    // from the PipelineRun's uid), so the run's sampling decision is the attempt's.
    let is_sampled = pipeline.map_or(context.sampled(), |p| p.sampled);
    if !is_sampled {
        if !tree.unsampled.contains(&context.trace_id) {
            tree.unsampled.push(context.trace_id);
        }
        return None;
    }
    let links = tekton
        .map(|theirs| Link {
            trace_id: theirs.trace_id,
            span_id: theirs.parent_id,
            kind: LinkKind::TektonTaskRun,
        })
        .into_iter()
        .collect();
    Some(Placement {
        span_id: derive_span_id(run.uid, run.facts.retry),
        parent_id: pipeline.map(|p| p.span_id),
        links,
    })
}

/// Adds the attempt's result, dashboard URL and deploy conventions to its attributes and
/// returns its status.
fn attempt_status(
    run: &AttemptRun<'_>,
    context: &SpanContext,
    policy: &Policy,
    attributes: &mut Attributes,
) -> Status {
    let facts = run.facts;
    let result = RunResult::of(run.ok, reason_of(run.condition));
    attributes.push(("cicd.pipeline.task.run.result", str_value(result.as_str())));
    let url = task_run_url(
        &policy.run_spans,
        facts,
        run.namespace,
        run.uid,
        context.trace_id,
    );
    if let Some(url) = url {
        attributes.push(("cicd.pipeline.task.run.url.full", AttributeValue::Str(url)));
    }
    attributes.extend(deploy_attributes(
        facts, run.labels, run.uid, run.ok, policy,
    ));
    span_status(run.ok, run.condition, attributes)
}

/// One span per step that ran (has `terminated`); a step without a name is an error.
fn step_spans(
    tree: &mut SpanTree,
    run: &AttemptRun<'_>,
    place: &StepPlace<'_>,
) -> Result<(), SpanError> {
    for (i, step) in run.state.steps.iter().enumerate() {
        let Some(terminated) = &step.terminated else {
            continue;
        };
        let step_name = step_name(step).ok_or_else(|| SpanError::Input {
            object: run.object.to_owned(),
            field: format!("{}steps[{i}].name", run.prefix),
            expected: "the step's name".to_owned(),
        })?;
        tree.spans
            .push(step_span(run, place, step, terminated, step_name));
    }
    Ok(())
}

/// The span of a step that ran.
fn step_span(
    run: &AttemptRun<'_>,
    place: &StepPlace<'_>,
    step: &StepState,
    terminated: &Terminated,
    step_name: &str,
) -> RunSpan {
    let start = terminated.started_at.as_ref().map_or(run.start, nanos);
    let end = terminated
        .finished_at
        .as_ref()
        .map_or(start, nanos)
        .max(start);
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
    let status = step_status(step, terminated, &mut attributes);
    RunSpan {
        role: Role::Step,
        resource: place.resource,
        trace_id: place.context.trace_id,
        span_id: derive_step_span_id(run.uid, run.facts.retry, step_name),
        parent_id: Some(place.parent_id),
        trace_state: place.context.tracestate.clone(),
        flags: place.context.flags,
        name: step_name.to_owned(),
        kind: Kind::Internal,
        start,
        end,
        status,
        attributes,
        links: Vec::new(),
    }
}

/// Unset for a step Tekton skipped after an earlier failure (marked `tekton.step.skipped`),
/// Error with `error.type` for a non-zero exit code, OK otherwise.
fn step_status(step: &StepState, terminated: &Terminated, attributes: &mut Attributes) -> Status {
    let reason = terminated.reason.as_deref().unwrap_or("");
    let skipped = step.termination_reason.as_deref() == Some(SKIPPED) || reason == SKIPPED;
    if skipped {
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
    }
}

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
