//! Which trace context a TaskRun attempt's steps are given: Tekton's own, or one derived from the
//! run's uids. The webhook applies this to a pod at admission; the exporter applies it to the
//! TaskRun object after the run, and both get the same answer from the same
//! [`TaskRunFacts`] under the same [`ContextRule`].
//!
//! Two versions of the rule exist, and the policy's `runSpans.enabled` chooses between them
//! (`Policy::context_rule`): with run spans off, Tekton's span context wins when it is valid
//! ([`ContextRule::FollowTekton`], context rule v1, the rule since the first release); with run
//! spans on, every id is derived ([`ContextRule::Derived`], context rule v2), so a PipelineRun is
//! one trace whatever contexts Tekton handed out, and the exporter, which derives the same ids,
//! keeps Tekton's spans as links.

use super::ids::{derive_span_id, derive_step_span_id, derive_trace_id, sampled};
use super::tekton::TaskRunFacts;
use super::w3c::{SpanContext, parse_span_context_annotation};

/// Which version of the context rule applies to an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextRule {
    /// Context rule v1 (run spans off): Tekton's `tekton.dev/taskrunSpanContext` when valid,
    /// else derived. Nothing else sees the pod's ids, so the steps join Tekton's trace.
    FollowTekton,
    /// Context rule v2 (run spans on): always derived from the run's uids, whatever Tekton's
    /// annotation says, so the webhook and the exporter agree by construction and a PipelineRun
    /// is one trace; Tekton's valid context becomes a link on the exported attempt span.
    Derived,
}

impl ContextRule {
    /// The version's name, as `docs/trace-ids.md` and `mutate --explain` write it.
    pub fn version(self) -> &'static str {
        match self {
            ContextRule::FollowTekton => "context rule v1",
            ContextRule::Derived => "context rule v2",
        }
    }
}

/// Where an attempt's trace id and parent came from.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceSource {
    /// Tekton's own span for the TaskRun (`tekton.dev/taskrunSpanContext`), context rule v1.
    Tekton,
    /// Derived from uids; `tekton` says what became of Tekton's annotation, if present.
    Derived {
        /// The key the run's uid was read from.
        trace_from: &'static str,
        trace_uid: String,
        span_uid: String,
        retry: u32,
        tekton: Option<TektonContext>,
    },
}

/// Tekton's annotation on an attempt whose ids were derived anyway.
#[derive(Debug, Clone, PartialEq)]
pub enum TektonContext {
    /// Not a valid span context: why (any rule).
    Malformed(String),
    /// Valid, but not followed because run spans are on (context rule v2): the exporter links
    /// the attempt span to this span of Tekton's. Its `tracestate` is not passed on, since the
    /// trace is not Tekton's.
    NotFollowed(SpanContext),
}

/// The context of one TaskRun attempt under `rule`. Context rule v1: Tekton's span context when
/// Tekton's tracing gave the TaskRun a valid one (its trace, its span as parent, its flags and
/// tracestate). Otherwise, and always under context rule v2: the run's derived trace id, the
/// attempt's derived span id as parent, the sampled flag from `sampling_ratio` (see
/// [`sampled`]) and no tracestate.
pub fn attempt_context(
    facts: &TaskRunFacts<'_>,
    sampling_ratio: f64,
    rule: ContextRule,
) -> (SpanContext, TraceSource) {
    let tekton = match facts.span_context.map(parse_span_context_annotation) {
        Some(Ok(context)) => match rule {
            ContextRule::FollowTekton => return (context, TraceSource::Tekton),
            ContextRule::Derived => Some(TektonContext::NotFollowed(context)),
        },
        Some(Err(e)) => Some(TektonContext::Malformed(e.0)),
        None => None,
    };
    let run = facts.run_id();
    let trace_id = derive_trace_id(run.value);
    let parent_id = derive_span_id(facts.task_run_key(), facts.retry);
    let flags = u8::from(sampled(trace_id, sampling_ratio));
    (
        SpanContext {
            trace_id,
            parent_id,
            flags,
            tracestate: None,
        },
        TraceSource::Derived {
            trace_from: run.source,
            trace_uid: run.value.to_owned(),
            span_uid: facts.task_run_key().to_owned(),
            retry: facts.retry,
            tekton,
        },
    )
}

/// The context one step of an attempt is given when run spans are on: the attempt's trace,
/// flags and tracestate, with the step's own span (see
/// [`derive_step_span_id`]) as parent, so what the step's program traces nests under the step.
pub fn step_context(attempt: &SpanContext, facts: &TaskRunFacts<'_>, step: &str) -> SpanContext {
    SpanContext {
        parent_id: derive_step_span_id(facts.task_run_key(), facts.retry, step),
        ..attempt.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::tekton::{
        Labels, PIPELINE_RUN_UID, TASK_RUN, TASK_RUN_SPAN_CONTEXT, TASK_RUN_UID,
    };

    fn labels() -> Labels {
        Labels::from([
            (TASK_RUN.into(), "tr".into()),
            (TASK_RUN_UID.into(), "u1".into()),
            (PIPELINE_RUN_UID.into(), "p1".into()),
        ])
    }

    #[test]
    fn derived_contexts_share_the_run_trace_and_differ_by_attempt() {
        let labels = labels();
        let first = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), None).unwrap();
        let retry = TaskRunFacts::from_pod(Some("tr-pod-retry1"), Some(&labels), None).unwrap();
        let (a, source) = attempt_context(&first, 1.0, ContextRule::FollowTekton);
        let (b, _) = attempt_context(&retry, 1.0, ContextRule::FollowTekton);
        assert_eq!(a.trace_id, derive_trace_id("p1"));
        assert_eq!(a.trace_id, b.trace_id);
        assert_eq!(a.parent_id, derive_span_id("u1", 0));
        assert_eq!(b.parent_id, derive_span_id("u1", 1));
        assert!(a.sampled());
        assert!(matches!(
            source,
            TraceSource::Derived {
                trace_from: PIPELINE_RUN_UID,
                ..
            }
        ));
        assert!(
            !attempt_context(&first, 0.0, ContextRule::FollowTekton)
                .0
                .sampled()
        );
    }

    #[test]
    fn tekton_context_wins_when_valid_and_is_explained_when_not() {
        let labels = labels();
        let tekton = Labels::from([(
            TASK_RUN_SPAN_CONTEXT.into(),
            r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01"}"#.into(),
        )]);
        let facts = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), Some(&tekton)).unwrap();
        let (context, source) = attempt_context(&facts, 0.0, ContextRule::FollowTekton);
        assert_eq!(source, TraceSource::Tekton);
        assert_eq!(context.parent_id.to_string(), "c99c7108eeb58e76");
        let step = step_context(&context, &facts, "build");
        assert_eq!(step.trace_id, context.trace_id);
        assert_eq!(step.parent_id, derive_step_span_id("u1", 0, "build"));

        let broken = Labels::from([(TASK_RUN_SPAN_CONTEXT.into(), "{}".into())]);
        let facts = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), Some(&broken)).unwrap();
        for rule in [ContextRule::FollowTekton, ContextRule::Derived] {
            let (context, source) = attempt_context(&facts, 1.0, rule);
            assert_eq!(context.trace_id, derive_trace_id("p1"));
            assert!(matches!(
                source,
                TraceSource::Derived {
                    tekton: Some(TektonContext::Malformed(_)),
                    ..
                }
            ));
        }
    }

    #[test]
    fn with_run_spans_on_the_ids_are_derived_and_tekton_context_is_kept_for_the_link() {
        let labels = labels();
        let tekton = Labels::from([(
            TASK_RUN_SPAN_CONTEXT.into(),
            r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01","tracestate":"ot=p:8"}"#.into(),
        )]);
        let facts = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), Some(&tekton)).unwrap();
        let (context, source) = attempt_context(&facts, 0.0, ContextRule::Derived);
        assert_eq!(context.trace_id, derive_trace_id("p1"));
        assert_eq!(context.parent_id, derive_span_id("u1", 0));
        // The policy's ratio decides, not Tekton's flags; Tekton's tracestate is not passed on.
        assert!(!context.sampled());
        assert_eq!(context.tracestate, None);
        let TraceSource::Derived {
            tekton: Some(TektonContext::NotFollowed(kept)),
            ..
        } = source
        else {
            panic!("Tekton's context not kept: {source:?}");
        };
        assert_eq!(
            kept.trace_id.to_string(),
            "d22941a3ef1cc2446bcdf5850960f941"
        );
        assert_eq!(kept.parent_id.to_string(), "c99c7108eeb58e76");
        let step = step_context(&context, &facts, "build");
        assert_eq!(step.trace_id, derive_trace_id("p1"));
        assert_eq!(step.parent_id, derive_step_span_id("u1", 0, "build"));
    }
}
