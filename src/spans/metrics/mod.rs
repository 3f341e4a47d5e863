//! Finished Tekton runs → the CICD metrics' data points they add. Pure, like [`super::tree`]:
//! the same run objects and policy in, observations out, so the exporter, the `spans` preview
//! and the tests agree. Every run is observed, sampled or not (sampling thins traces, not
//! counts).
//!
//! | metric | instrument, unit | one observation per | attributes |
//! |---|---|---|---|
//! | `cicd.pipeline.run.duration` | histogram, `s` | state of each finished PipelineRun and standalone TaskRun: `pending` (creation → `startTime`) and `executing` (`startTime` → completion, with the result) | `cicd.pipeline.name`, `cicd.pipeline.run.state`, `k8s.namespace.name`; on the state the run ended in, `cicd.pipeline.result` and, unless it succeeded, `error.type` |
//! | `cicd.pipeline.run.errors` | counter, `{error}` | run that did not succeed (failed, timed out, cancelled, or the CI system failed) | `cicd.pipeline.name`, `error.type` (Tekton's reason), `k8s.namespace.name` |
//! | `lightstep_tekton.task.run.duration` | histogram, `s` | TaskRun attempt, `startTime` → completion | `cicd.pipeline.name`, `cicd.pipeline.task.name`, `cicd.pipeline.task.run.result`, `k8s.namespace.name` |
//!
//! The last is the project's own (the conventions have no task metric yet), hence its
//! `lightstep_tekton.` prefix. A run that never started (no `startTime`) has one `pending`
//! observation that carries the result. No attribute names one run: no uid, pod, commit or run
//! name. The resource is the run's spans' resource less its per-run keys ([`resource_key`]).
//! Names beyond the cap are folded by [`SeriesCap`]; [`otlp::metrics_request`] makes the request.

mod cap;
pub mod otlp;

pub use cap::{OVERFLOW, SeriesCap};

use super::SpanError;
use super::objects::{PipelineRun, TaskRun};
use super::tree::{
    Identity, Run, RunResult, SpanResource, UNFINISHED_EXPECTED, UNFINISHED_FIELD, attempt_times,
    end_of, finished, identity, input_error, nanos, reason_of,
};
use crate::admission::decide::service_name;
use crate::contract::attributes::task_run_attributes;
use crate::contract::tekton::TaskRunFacts;
use crate::policy::Policy;

/// The metrics a run adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    RunDuration,
    RunErrors,
    TaskDuration,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::RunDuration, Metric::RunErrors, Metric::TaskDuration];

    pub fn name(self) -> &'static str {
        match self {
            Metric::RunDuration => "cicd.pipeline.run.duration",
            Metric::RunErrors => "cicd.pipeline.run.errors",
            Metric::TaskDuration => "lightstep_tekton.task.run.duration",
        }
    }

    /// UCUM, as the conventions write it.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::RunErrors => "{error}",
            Metric::RunDuration | Metric::TaskDuration => "s",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Metric::RunDuration => {
                "Duration of a pipeline run grouped by pipeline, state and result."
            }
            Metric::RunErrors => "The number of errors encountered in pipeline runs.",
            Metric::TaskDuration => {
                "Duration of a TaskRun attempt grouped by pipeline, task and result."
            }
        }
    }

    pub fn is_histogram(self) -> bool {
        self != Metric::RunErrors
    }
}

/// `cicd.pipeline.run.state` values the observations use (`finalizing` is Tekton's cleanup after
/// completion, which no run status times).
pub const STATE_PENDING: &str = "pending";
pub const STATE_EXECUTING: &str = "executing";

/// One measurement: a duration in seconds (histograms) or a count (the counter).
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub metric: Metric,
    /// In the order they are exported; every value bounded by the names Tekton allows.
    pub attributes: Vec<(&'static str, String)>,
    /// Unix nanoseconds: what the observation covers (a duration's start and end).
    pub start: u64,
    pub end: u64,
    pub value: f64,
}

impl Observation {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What one run adds: its resource and its observations, run-level first, then per attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    pub resource: SpanResource,
    pub observations: Vec<Observation>,
}

/// The observations of one finished run (see the module documentation), or the field that is
/// missing, named as [`super::span_tree`] names it.
pub fn run_metrics(run: &Run<'_>, policy: &Policy) -> Result<RunMetrics, SpanError> {
    match run {
        Run::Pipeline {
            pipeline_run,
            task_runs,
        } => pipeline_run_metrics(pipeline_run, task_runs, policy),
        Run::Task(task_run) => task_run_metrics(task_run, policy),
    }
}

/// The run-level facts every observation of a run shares.
struct RunFacts<'a> {
    pipeline: &'a str,
    namespace: &'a str,
}

fn pipeline_run_metrics(
    run: &PipelineRun,
    task_runs: &[&TaskRun],
    policy: &Policy,
) -> Result<RunMetrics, SpanError> {
    let Identity {
        object,
        name,
        uid,
        created,
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
        .max(created);
    let labels = run.metadata.labels.as_ref();
    let annotations = run.metadata.annotations.as_ref();
    let mut facts = TaskRunFacts::from_task_run(name, None, labels, annotations, 0);
    facts.pipeline_run = Some(name);
    facts.pipeline_run_uid = Some(uid);
    let namespace = run.metadata.namespace.as_deref().unwrap_or("");
    let run_facts = RunFacts {
        pipeline: facts.pipeline_name(),
        namespace,
    };
    let started = status.start_time.as_ref().map(nanos);
    let result = RunResult::of(ok, reason_of(condition));
    let mut observations = run_observations(
        &run_facts,
        created,
        started,
        end,
        result,
        reason_of(condition),
    );
    for task_run in task_runs {
        observations.extend(attempt_observations(task_run, &run_facts)?);
    }
    Ok(RunMetrics {
        resource: resource(&facts, namespace, policy),
        observations,
    })
}

/// A standalone TaskRun is a run of its own: its pending time is before its first attempt
/// started, its executing time from then to its last attempt's end.
fn task_run_metrics(run: &TaskRun, policy: &Policy) -> Result<RunMetrics, SpanError> {
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
    let attempts = attempt_times(status, created, &object)?;
    let labels = run.metadata.labels.as_ref();
    let annotations = run.metadata.annotations.as_ref();
    let facts = TaskRunFacts::from_task_run(name, Some(uid), labels, annotations, 0);
    let namespace = run.metadata.namespace.as_deref().unwrap_or("");
    let run_facts = RunFacts {
        pipeline: facts.pipeline_name(),
        namespace,
    };
    let last = attempts
        .last()
        .expect("the final status is always an attempt");
    let first_start = attempts
        .first()
        .and_then(|a| a.state.start_time.as_ref())
        .map(nanos);
    let end = last.end.max(created);
    let result = RunResult::of(last.ok, reason_of(last.condition));
    let mut observations = run_observations(
        &run_facts,
        created,
        first_start,
        end,
        result,
        reason_of(last.condition),
    );
    observations.extend(attempt_observations(run, &run_facts)?);
    Ok(RunMetrics {
        resource: resource(&facts, namespace, policy),
        observations,
    })
}

/// The run's duration by state and, unless it succeeded, its error.
fn run_observations(
    run: &RunFacts<'_>,
    created: u64,
    started: Option<u64>,
    end: u64,
    result: RunResult,
    reason: &str,
) -> Vec<Observation> {
    let error_type = (result != RunResult::Success).then(|| error_type(reason));
    let base = |state: &str| {
        vec![
            ("cicd.pipeline.name", run.pipeline.to_owned()),
            ("cicd.pipeline.run.state", state.to_owned()),
            ("k8s.namespace.name", run.namespace.to_owned()),
        ]
    };
    let with_result = |mut attributes: Vec<(&'static str, String)>| {
        attributes.push(("cicd.pipeline.result", result.as_str().to_owned()));
        if let Some(error_type) = &error_type {
            attributes.push(("error.type", error_type.clone()));
        }
        attributes
    };
    let duration = |attributes, start: u64, end: u64| Observation {
        metric: Metric::RunDuration,
        attributes,
        start,
        end,
        value: seconds(start, end),
    };
    let mut observations = Vec::with_capacity(3);
    match started {
        Some(started) => {
            let started = started.clamp(created, end);
            observations.push(duration(base(STATE_PENDING), created, started));
            observations.push(duration(with_result(base(STATE_EXECUTING)), started, end));
        }
        None => observations.push(duration(with_result(base(STATE_PENDING)), created, end)),
    }
    if let Some(error_type) = error_type {
        observations.push(Observation {
            metric: Metric::RunErrors,
            attributes: vec![
                ("cicd.pipeline.name", run.pipeline.to_owned()),
                ("error.type", error_type),
                ("k8s.namespace.name", run.namespace.to_owned()),
            ],
            start: created,
            end,
            value: 1.0,
        });
    }
    observations
}

/// One duration per attempt of the TaskRun.
fn attempt_observations(
    run: &TaskRun,
    pipeline: &RunFacts<'_>,
) -> Result<Vec<Observation>, SpanError> {
    let Identity {
        object,
        name,
        created,
        ..
    } = identity(&run.metadata, "TaskRun")?;
    let status = run
        .status
        .as_ref()
        .ok_or_else(|| input_error(&object, "status", "the status of a finished run"))?;
    let labels = run.metadata.labels.as_ref();
    let facts = TaskRunFacts::from_task_run(name, None, labels, None, 0);
    let task = facts.task_name();
    let observations = attempt_times(status, created, &object)?
        .into_iter()
        .map(|attempt| {
            let result = RunResult::of(attempt.ok, reason_of(attempt.condition));
            let mut attributes = vec![("cicd.pipeline.name", pipeline.pipeline.to_owned())];
            // Never the TaskRun's own name: it is unique per run.
            if let Some(task) = task {
                attributes.push(("cicd.pipeline.task.name", task.to_owned()));
            }
            attributes.push(("cicd.pipeline.task.run.result", result.as_str().to_owned()));
            attributes.push(("k8s.namespace.name", pipeline.namespace.to_owned()));
            Observation {
                metric: Metric::TaskDuration,
                attributes,
                start: attempt.start,
                end: attempt.end,
                value: seconds(attempt.start, attempt.end),
            }
        })
        .collect();
    Ok(observations)
}

fn error_type(reason: &str) -> String {
    if reason.is_empty() { "Failed" } else { reason }.to_owned()
}

fn seconds(start: u64, end: u64) -> f64 {
    end.saturating_sub(start) as f64 / 1e9
}

/// The keys of the run's span resource that metrics keep: those that describe where runs come
/// from, not one run. The conventions make the per-run `cicd.pipeline.run` resource opt-in for
/// metrics (a new series per run); so are commits, branches, pull requests, pods and run names.
pub fn resource_key(key: &str) -> bool {
    matches!(
        key,
        "k8s.namespace.name"
            | "vcs.repository.url.full"
            | "vcs.repository.name"
            | "vcs.owner.name"
            | "vcs.provider.name"
            | "vcs.ref.base.name"
            | "tekton.trigger.eventlistener"
            | "tekton.trigger.name"
            | "tekton.pac.event.type"
    )
}

/// The run's spans' resource (`service.name` from the policy, the run-level attributes, the
/// policy's `resourceAttributes`) less the per-run keys.
fn resource(facts: &TaskRunFacts<'_>, namespace: &str, policy: &Policy) -> SpanResource {
    let mut attributes: Vec<(String, String)> = task_run_attributes(facts, namespace, None)
        .into_iter()
        .filter(|(k, _)| resource_key(k))
        .map(|(k, v)| (k.to_owned(), v.into_owned()))
        .collect();
    policy.add_resource_attributes(&mut attributes, str::to_owned);
    SpanResource {
        service_name: service_name(policy, facts, namespace, str::to_owned),
        attributes,
    }
}

#[cfg(test)]
mod tests;
