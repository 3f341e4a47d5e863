//! Which runs are due for export, and what their marker says: pure, cached facts in, a verdict
//! out, so every rule is tested without a cluster.
//!
//! A run is due when:
//! - it finished: its `Succeeded` condition is `True` or `False` (its time: `completionTime`,
//!   else the condition's `lastTransitionTime`);
//! - it is not marked: no `lightstep-tekton.io/exported` annotation (whatever its value);
//! - it is a PipelineRun or a standalone TaskRun: a TaskRun with a `tekton.dev/pipelineRunUID`
//!   label is exported with its PipelineRun, never on its own;
//! - it was not opted out: no `lightstep-tekton.io/inject: "false"` annotation (the webhook left
//!   its pods alone too);
//! - it finished after the exporter started, or within `--backfill` before, so a first install
//!   on a busy cluster does not send the history of every run the cluster still keeps;
//! - its namespace is served ([`in_scope`]).
//!
//! The exporter's finalizer is held on a PipelineRun or standalone TaskRun ([`hold`]) from first
//! sight, running or not, while it is in scope, unmarked, sampled (on the trace derived from its
//! uid) and within the backfill window, until `--store-deadline` after it finished; a run
//! deleted before it finished is released (it never will).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::admission::decide::OPT_OUT_ANNOTATION;
use crate::contract::tekton::PIPELINE_RUN_UID;
use crate::contract::{derive_trace_id, ids};
use crate::policy::Policy;
use crate::policy::resource::PolicyMode;
use crate::policy::selection::Selected;
use crate::spans::objects::{Condition, Metadata, PipelineRun, TaskRun, succeeded};
use crate::spans::tree::RunResult;

pub use crate::cluster::runs::EXPORTED_ANNOTATION;
/// The link to the run's trace, from the policy's `runSpans.traceUrl`.
pub const TRACE_URL_ANNOTATION: &str = "lightstep-tekton.io/trace-url";
/// The values of the namespace label that opt a namespace in (as the webhook's
/// `namespaceSelector`s read it).
pub const SERVED_VALUES: [&str; 2] = ["enabled", "enforced"];

/// When the exporter started and how far back it looks.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub started: Timestamp,
    pub backfill: Duration,
}

/// Why a run is not due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDue {
    Running,
    Marked,
    /// A TaskRun of a PipelineRun: exported with it.
    InPipeline,
    OptedOut,
    /// Finished longer than `--backfill` before the exporter started.
    BeforeBackfill,
}

/// A finished run's outcome, as the tree and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub at: Timestamp,
    pub result: RunResult,
}

/// Whether a PipelineRun is due (see the module documentation; scope is [`in_scope`]).
pub fn pipeline_run_due(run: &PipelineRun, window: Window) -> Result<Finished, NotDue> {
    let status = run.status.as_ref().ok_or(NotDue::Running)?;
    let finished = finished(&status.conditions, status.completion_time.as_ref())?;
    common(&run.metadata, finished, window)
}

/// Whether a TaskRun is due on its own.
pub fn task_run_due(run: &TaskRun, window: Window) -> Result<Finished, NotDue> {
    if run.metadata.label(PIPELINE_RUN_UID).is_some() {
        return Err(NotDue::InPipeline);
    }
    task_run_finished(run).and_then(|f| common(&run.metadata, f, window))
}

/// Whether a PipelineRun finished (whatever its mark and scope).
pub fn pipeline_run_finished(run: &PipelineRun) -> Result<Finished, NotDue> {
    let status = run.status.as_ref().ok_or(NotDue::Running)?;
    finished(&status.conditions, status.completion_time.as_ref())
}

/// Whether a TaskRun finished (for a PipelineRun's children, which are never due on their own).
pub fn task_run_finished(run: &TaskRun) -> Result<Finished, NotDue> {
    let status = run.status.as_ref().ok_or(NotDue::Running)?;
    finished(&status.conditions, status.completion_time.as_ref())
}

fn finished(
    conditions: &[Condition],
    completion: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
) -> Result<Finished, NotDue> {
    let condition = succeeded(conditions).ok_or(NotDue::Running)?;
    let ok = match condition.status.as_str() {
        "True" => true,
        "False" => false,
        _ => return Err(NotDue::Running),
    };
    let at = completion
        .or(condition.last_transition_time.as_ref())
        .ok_or(NotDue::Running)?;
    Ok(Finished {
        at: at.0,
        result: RunResult::of(ok, condition.reason.as_deref().unwrap_or("")),
    })
}

fn common(metadata: &Metadata, finished: Finished, window: Window) -> Result<Finished, NotDue> {
    let annotations = metadata.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key(EXPORTED_ANNOTATION)) {
        return Err(NotDue::Marked);
    }
    if opted_out(metadata) {
        return Err(NotDue::OptedOut);
    }
    if finished.at < earliest(window) {
        return Err(NotDue::BeforeBackfill);
    }
    Ok(finished)
}

fn opted_out(metadata: &Metadata) -> bool {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OPT_OUT_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

/// The earliest completion the window takes.
fn earliest(window: Window) -> Timestamp {
    let backfill = SignedDuration::try_from(window.backfill).unwrap_or(SignedDuration::MAX);
    window
        .started
        .checked_sub(backfill)
        .unwrap_or(Timestamp::MIN)
}

/// Whether the run's trace is sampled under the policy: the trace derived from its uid (with
/// run spans on, every id of the run is derived), so the decision is known the moment the run
/// is first seen. A run without a uid is not.
pub fn sampled(metadata: &Metadata, policy: &Policy) -> bool {
    metadata
        .uid
        .as_deref()
        .is_some_and(|uid| ids::sampled(derive_trace_id(uid), policy.sampling_ratio))
}

/// Why the exporter does not (or no longer) hold its finalizer on a PipelineRun or standalone
/// TaskRun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Marked: exported, or given up on.
    Marked,
    /// Not the exporter's to export: the namespace is not served, the policy has run spans
    /// off or is in audit, the run opted out, its trace is not sampled, it has no uid, or it
    /// finished before the backfill window.
    OutOfScope,
    /// Finished `--store-deadline` ago and still not exported: given up on.
    Deadline,
    /// Deleted before it finished: it never will (Tekton does not reconcile a deleted run).
    DeletedRunning,
}

/// Whether the exporter should hold its finalizer on the run, from first sight (running or
/// not) until it is marked, leaves scope, or its store deadline passes. `policy` is the one its
/// namespace is exported under ([`in_scope`]); `finished`, the run's `*_finished`.
pub fn hold(
    metadata: &Metadata,
    finished: Result<Finished, NotDue>,
    policy: Option<&Policy>,
    window: Window,
    store_deadline: Duration,
    now: Timestamp,
) -> Result<(), Release> {
    if metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(EXPORTED_ANNOTATION))
    {
        return Err(Release::Marked);
    }
    let policy = policy.ok_or(Release::OutOfScope)?;
    if opted_out(metadata) || !sampled(metadata, policy) {
        return Err(Release::OutOfScope);
    }
    match finished {
        Ok(finished) => {
            if finished.at < earliest(window) {
                return Err(Release::OutOfScope);
            }
            let deadline = SignedDuration::try_from(store_deadline).unwrap_or(SignedDuration::MAX);
            match finished.at.checked_add(deadline) {
                Ok(at) if now >= at => Err(Release::Deadline),
                _ => Ok(()),
            }
        }
        Err(_) if metadata.deletion_timestamp.is_some() => Err(Release::DeletedRunning),
        Err(_) => Ok(()),
    }
}

/// The policy a namespace's runs are exported under, or `None` when they are not exported:
/// the namespace is unknown or not labelled `label` = `enabled`/`enforced`, the selected
/// TracingPolicy is in `audit` mode (audit changes nothing the users see: no pod patches, so no
/// spans either), or the policy leaves `runSpans.enabled` off (run spans are opt-in).
pub fn in_scope<'a>(
    labels: Option<&BTreeMap<String, String>>,
    label: &str,
    selected: Selected<'a>,
) -> Option<&'a Policy> {
    let value = labels?.get(label)?;
    if !SERVED_VALUES.contains(&value.as_str()) {
        return None;
    }
    if selected.mode == PolicyMode::Audit || !selected.policy.run_spans.enabled {
        return None;
    }
    Some(selected.policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selection::{Fallback, Selected};
    use crate::spans::objects::PipelineRunStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn run(
        status: &str,
        reason: &str,
        completed: i64,
        annotations: &[(&str, &str)],
    ) -> PipelineRun {
        PipelineRun {
            metadata: Metadata {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Metadata::default()
            },
            status: Some(PipelineRunStatus {
                conditions: vec![Condition {
                    type_: "Succeeded".into(),
                    status: status.into(),
                    reason: Some(reason.into()),
                    ..Condition::default()
                }],
                completion_time: Some(Time(at(completed))),
                ..PipelineRunStatus::default()
            }),
        }
    }

    const WINDOW: Window = Window {
        started: Timestamp::constant(1_800_000_000, 0),
        backfill: Duration::from_secs(900),
    };

    #[test]
    fn finished_unmarked_runs_within_the_window_are_due() {
        let due = pipeline_run_due(&run("False", "Failed", 5, &[]), WINDOW).unwrap();
        assert_eq!(due.result, RunResult::Failure);
        assert!(pipeline_run_due(&run("True", "Succeeded", -900, &[]), WINDOW).is_ok());
        assert_eq!(
            pipeline_run_due(&run("True", "Succeeded", -901, &[]), WINDOW),
            Err(NotDue::BeforeBackfill)
        );
        assert_eq!(
            pipeline_run_due(&run("Unknown", "Running", 5, &[]), WINDOW),
            Err(NotDue::Running)
        );
        assert_eq!(
            pipeline_run_due(
                &run("True", "Succeeded", 5, &[(EXPORTED_ANNOTATION, "x")]),
                WINDOW
            ),
            Err(NotDue::Marked)
        );
        assert_eq!(
            pipeline_run_due(
                &run("True", "Succeeded", 5, &[(OPT_OUT_ANNOTATION, "false")]),
                WINDOW
            ),
            Err(NotDue::OptedOut)
        );
    }

    #[test]
    fn the_finalizer_is_held_from_first_sight_until_marked_out_of_scope_or_the_deadline() {
        let mut policy = Policy::embedded_default();
        policy.run_spans.enabled = true;
        let deadline = Duration::from_secs(600);
        let now = at(100);
        let with_uid = |mut run: PipelineRun, uid: &str| {
            run.metadata.uid = Some(uid.to_owned());
            run
        };
        let verdict = |run: &PipelineRun, policy: Option<&Policy>| {
            hold(
                &run.metadata,
                pipeline_run_finished(run),
                policy,
                WINDOW,
                deadline,
                now,
            )
        };
        let done = with_uid(run("True", "Succeeded", 5, &[]), "u-1");
        assert_eq!(verdict(&done, Some(&policy)), Ok(()));
        let running = with_uid(run("Unknown", "Running", 5, &[]), "u-1");
        assert_eq!(verdict(&running, Some(&policy)), Ok(()));
        assert_eq!(verdict(&done, None), Err(Release::OutOfScope));
        let marked = with_uid(
            run("True", "Succeeded", 5, &[(EXPORTED_ANNOTATION, "x")]),
            "u-1",
        );
        assert_eq!(verdict(&marked, Some(&policy)), Err(Release::Marked));
        let opted_out = with_uid(
            run("True", "Succeeded", 5, &[(OPT_OUT_ANNOTATION, "false")]),
            "u-1",
        );
        assert_eq!(verdict(&opted_out, Some(&policy)), Err(Release::OutOfScope));
        let old = with_uid(run("True", "Succeeded", -901, &[]), "u-1");
        assert_eq!(verdict(&old, Some(&policy)), Err(Release::OutOfScope));
        // Finished 600 s before now: the deadline; 599 s: still held.
        let late = with_uid(run("True", "Succeeded", -500, &[]), "u-1");
        assert_eq!(verdict(&late, Some(&policy)), Err(Release::Deadline));
        let almost = with_uid(run("True", "Succeeded", -499, &[]), "u-1");
        assert_eq!(verdict(&almost, Some(&policy)), Ok(()));
        let mut deleted = running.clone();
        deleted.metadata.deletion_timestamp = Some(Time(at(50)));
        assert_eq!(
            verdict(&deleted, Some(&policy)),
            Err(Release::DeletedRunning)
        );
        // A deleted run that finished is held until it is exported.
        let mut deleted_done = done.clone();
        deleted_done.metadata.deletion_timestamp = Some(Time(at(50)));
        assert_eq!(verdict(&deleted_done, Some(&policy)), Ok(()));
        // Unsampled (decided on the trace derived from the uid), or no uid: never held.
        policy.sampling_ratio = 0.0;
        assert_eq!(verdict(&done, Some(&policy)), Err(Release::OutOfScope));
        policy.sampling_ratio = 1.0;
        assert_eq!(
            verdict(&run("True", "Succeeded", 5, &[]), Some(&policy)),
            Err(Release::OutOfScope)
        );
    }

    #[test]
    fn only_served_namespaces_with_run_spans_on_are_in_scope() {
        let mut on = Policy::embedded_default();
        on.run_spans.enabled = true;
        let off = Policy::embedded_default();
        let label = "lightstep-tekton.io/inject";
        let labels = |v: &str| BTreeMap::from([(label.to_owned(), v.to_owned())]);
        let pick = |p| Selected::fallback(p, Fallback::NoMatch);
        assert!(in_scope(Some(&labels("enabled")), label, pick(&on)).is_some());
        assert!(in_scope(Some(&labels("enforced")), label, pick(&on)).is_some());
        assert!(in_scope(Some(&labels("disabled")), label, pick(&on)).is_none());
        assert!(in_scope(Some(&BTreeMap::new()), label, pick(&on)).is_none());
        assert!(in_scope(None, label, pick(&on)).is_none());
        assert!(in_scope(Some(&labels("enabled")), label, pick(&off)).is_none());
        let audit = Selected {
            mode: PolicyMode::Audit,
            ..pick(&on)
        };
        assert!(in_scope(Some(&labels("enabled")), label, audit).is_none());
    }
}
