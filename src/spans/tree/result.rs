//! How a finished run's `Succeeded` condition reads: whether and when it finished, the CICD
//! convention's result, and the span status with its clipped message.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::attributes::str_value;
use super::{AttributeValue, Status, nanos};
use crate::spans::objects::{Condition, succeeded};

/// Bound on a span's status message, in bytes. Tekton's messages for step failures are short
/// (`"step-compile" exited with code 2: Error`), but validation and resolution failures quote
/// whole specs and run to kilobytes; 256 bytes keeps the first sentence, which is what a reader of
/// a trace needs, and keeps each span small.
pub const STATUS_MESSAGE_MAX: usize = 256;

/// The field named when a run has not finished, and what it should have held.
pub(crate) const UNFINISHED_FIELD: &str = "status.conditions[type=Succeeded].status";
pub(crate) const UNFINISHED_EXPECTED: &str = "True or False (a finished run)";

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

/// The `Succeeded` condition of a finished run and whether it succeeded; `None` when the run
/// has not finished.
pub(crate) fn finished(conditions: &[Condition]) -> Option<(&Condition, bool)> {
    let condition = succeeded(conditions)?;
    match condition.status.as_str() {
        "True" => Some((condition, true)),
        "False" => Some((condition, false)),
        _ => None,
    }
}

pub(crate) fn reason_of(condition: &Condition) -> &str {
    condition.reason.as_deref().unwrap_or("")
}

/// A run ends at `completionTime`, or (older controllers) when its condition last changed.
pub(crate) fn end_of(completion: Option<&Time>, condition: &Condition) -> Option<u64> {
    completion
        .or(condition.last_transition_time.as_ref())
        .map(nanos)
}

/// Error with `<reason>: <message>` for a failed run, adding `error.type`; OK otherwise.
pub(super) fn span_status(
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
