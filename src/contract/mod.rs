//! The trace contract: how every id of a Tekton run is chosen, written once for the webhook and
//! the run-span exporter.
//!
//! - [`w3c`]: the id types, `traceparent`/`tracestate`, Tekton's span-context carriers;
//! - [`ids`]: every id derivation (trace, PipelineRun span, TaskRun attempt span, step span) and
//!   the sampling rule: the specification, with pinned values;
//! - [`tekton`]: the facts of a TaskRun attempt, read alike from a pod and from the run objects,
//!   and the rule that names a run;
//! - [`context`]: which context an attempt's steps get (Tekton's or derived, by the versioned
//!   [`ContextRule`] the policy's `runSpans.enabled` chooses), and a step's;
//! - [`attributes`]: the CICD/VCS attribute list both components put on their telemetry.
//!
//! Pure: no I/O, no clock, no async. Anything here that changes an id changes a public contract
//! (`docs/trace-ids.md`).
pub mod attributes;
pub mod context;
pub mod ids;
pub mod tekton;
pub mod url;
pub mod w3c;

pub use context::{ContextRule, TektonContext, TraceSource, attempt_context, step_context};
pub use ids::{
    derive_attempt_startup_span_id, derive_pipeline_run_span_id, derive_pipeline_run_wait_span_id,
    derive_span_id, derive_step_span_id, derive_trace_id, sampled,
};
pub use w3c::{SpanContext, SpanId, TraceId, parse_traceparent};
