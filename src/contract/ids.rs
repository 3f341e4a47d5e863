//! Every id the components agree on, derived from the uids Kubernetes gives a run.
//!
//! Each derivation is `SHA-256(domain || input)` truncated to the id's length, where `domain` is
//! a versioned tag ending in a newline. The webhook computes these ids from a pod's labels at
//! admission; the run-span exporter computes them from the finished PipelineRun and TaskRun
//! objects. Both must agree byte for byte, so the domains and inputs below are a published
//! contract (`docs/trace-ids.md`): changing one means a new version tag, a new pinned test and a
//! line in the docs, never an edit in place.
//!
//! | id | input | domain |
//! |---|---|---|
//! | trace id of a run | the run uid ([`super::tekton::TaskRunFacts::run_uid`]) | `lightstep-tekton-webhook/trace-id/v1` |
//! | span id of a TaskRun attempt | TaskRun uid, `/`, attempt in decimal | `lightstep-tekton-webhook/span-id/v1` |
//! | span id of a PipelineRun | PipelineRun uid | `lightstep-tekton-webhook/pipelinerun-span-id/v1` |
//! | span id of a step | TaskRun uid, `/`, attempt, `/`, step name | `lightstep-tekton-webhook/step-span-id/v1` |
//! | span id of a PipelineRun's wait (creation to start) | PipelineRun uid | `lightstep-tekton-webhook/pipelinerun-wait-span-id/v1` |
//! | span id of an attempt's startup (start to first step) | TaskRun uid, `/`, attempt in decimal | `lightstep-tekton-webhook/attempt-startup-span-id/v1` |
//!
//! The attempt is 0 for a TaskRun's first pod and N for its `-pod-retryN` pod, which is the index
//! of that attempt in `status.retriesStatus` (the final attempt's is the list's length). A step's
//! name is the one in the Task (`status.steps[].name`), which is its container's name without
//! the `step-` prefix.

use sha2::{Digest, Sha256};

use super::w3c::{SpanId, TraceId};

/// Hashed before a run uid to derive a trace id.
const TRACE_ID_DOMAIN: &[u8] = b"lightstep-tekton-webhook/trace-id/v1\n";
/// Hashed before a TaskRun uid and attempt to derive that attempt's span id. (Named before
/// there were other span ids; the name is part of the contract and stays.)
const ATTEMPT_SPAN_ID_DOMAIN: &[u8] = b"lightstep-tekton-webhook/span-id/v1\n";
/// Hashed before a PipelineRun uid to derive the PipelineRun's own span id.
const PIPELINE_RUN_SPAN_ID_DOMAIN: &[u8] = b"lightstep-tekton-webhook/pipelinerun-span-id/v1\n";
/// Hashed before a PipelineRun uid to derive the span id of the time it waited to start.
const PIPELINE_RUN_WAIT_SPAN_ID_DOMAIN: &[u8] =
    b"lightstep-tekton-webhook/pipelinerun-wait-span-id/v1\n";
/// Hashed before a TaskRun uid and attempt to derive the span id of the attempt's startup.
const ATTEMPT_STARTUP_SPAN_ID_DOMAIN: &[u8] =
    b"lightstep-tekton-webhook/attempt-startup-span-id/v1\n";
/// Hashed before a TaskRun uid, attempt and step name to derive the step's span id.
const STEP_SPAN_ID_DOMAIN: &[u8] = b"lightstep-tekton-webhook/step-span-id/v1\n";

/// `SHA-256(domain || parts joined by "/")`.
fn digest(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new().chain_update(domain);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash.update(b"/");
        }
        hash.update(part);
    }
    hash.finalize().into()
}

fn span_id(domain: &[u8], parts: &[&[u8]]) -> SpanId {
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest(domain, parts)[..8]);
    if id == [0; 8] {
        // W3C forbids the all-zero id; the odds are 2^-64, but the contract must be total.
        id[7] = 1;
    }
    SpanId(id)
}

/// The trace id of a run: every TaskRun of one PipelineRun passes the PipelineRun's uid and so
/// shares one trace. First 16 bytes of `SHA-256(trace-id/v1 || run uid)`.
pub fn derive_trace_id(run_uid: &str) -> TraceId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest(TRACE_ID_DOMAIN, &[run_uid.as_bytes()])[..16]);
    if id == [0; 16] {
        // W3C forbids the all-zero id; the odds are 2^-128, but the contract must be total.
        id[15] = 1;
    }
    TraceId(id)
}

/// The span id of one attempt of a TaskRun (each retry is its own span): first 8 bytes of
/// `SHA-256(span-id/v1 || taskRunUID || "/" || attempt)`, the attempt in decimal. This is the
/// parent the webhook gives a pod's steps when run spans are off.
pub fn derive_span_id(task_run_uid: &str, attempt: u32) -> SpanId {
    let attempt = attempt.to_string();
    span_id(
        ATTEMPT_SPAN_ID_DOMAIN,
        &[task_run_uid.as_bytes(), attempt.as_bytes()],
    )
}

/// The span id of a PipelineRun's own span: first 8 bytes of
/// `SHA-256(pipelinerun-span-id/v1 || pipelineRunUID)`.
pub fn derive_pipeline_run_span_id(pipeline_run_uid: &str) -> SpanId {
    span_id(PIPELINE_RUN_SPAN_ID_DOMAIN, &[pipeline_run_uid.as_bytes()])
}

/// The span id of the child of a PipelineRun's span that covers its wait, from creation to
/// start: first 8 bytes of `SHA-256(pipelinerun-wait-span-id/v1 || pipelineRunUID)`. Only the
/// exporter uses it (nothing runs under the wait), but a re-export must give the same id.
pub fn derive_pipeline_run_wait_span_id(pipeline_run_uid: &str) -> SpanId {
    span_id(
        PIPELINE_RUN_WAIT_SPAN_ID_DOMAIN,
        &[pipeline_run_uid.as_bytes()],
    )
}

/// The span id of the child of an attempt's span that covers its startup, from the attempt's
/// start to its first step's start: first 8 bytes of
/// `SHA-256(attempt-startup-span-id/v1 || taskRunUID || "/" || attempt)`. Only the exporter uses
/// it (nothing runs under it), but a re-export must give the same id.
pub fn derive_attempt_startup_span_id(task_run_uid: &str, attempt: u32) -> SpanId {
    let attempt = attempt.to_string();
    span_id(
        ATTEMPT_STARTUP_SPAN_ID_DOMAIN,
        &[task_run_uid.as_bytes(), attempt.as_bytes()],
    )
}

/// The span id of one step of one attempt: first 8 bytes of
/// `SHA-256(step-span-id/v1 || taskRunUID || "/" || attempt || "/" || step name)`. This is the
/// parent the webhook gives that step's container when run spans are on.
pub fn derive_step_span_id(task_run_uid: &str, attempt: u32, step: &str) -> SpanId {
    let attempt = attempt.to_string();
    span_id(
        STEP_SPAN_ID_DOMAIN,
        &[task_run_uid.as_bytes(), attempt.as_bytes(), step.as_bytes()],
    )
}

/// The sampling decision for a trace, the same one OpenTelemetry's `TraceIdRatioBased` sampler
/// makes (Go and Rust SDKs): the low 8 bytes of the trace id, big-endian, shifted right by one,
/// compared with `ratio * 2^63`. Every pod of a run therefore agrees, so does the exporter, and
/// so does an SDK configured with the same ratio.
pub fn sampled(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id.0[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE_RUN_UID: &str = "59eb5727-df8e-49fc-a564-75a1aef1d8df";
    const TASK_RUN_UID: &str = "f51a1622-7726-451e-82d4-1422e51dfa8e";

    /// The derivations are a contract with other components: these values never change. Each
    /// can be recomputed by hand, e.g.
    /// `printf 'lightstep-tekton-webhook/trace-id/v1\n%s' "$UID" | sha256sum | cut -c1-32`.
    #[test]
    fn derivations_are_pinned() {
        assert_eq!(
            derive_trace_id(PIPELINE_RUN_UID).to_string(),
            "f3739f264459e0240e4b8665a676ca9d"
        );
        assert_eq!(
            derive_span_id(TASK_RUN_UID, 0).to_string(),
            "67ed4606d2753ce7"
        );
        assert_eq!(
            derive_pipeline_run_span_id(PIPELINE_RUN_UID).to_string(),
            PINNED_PIPELINE_RUN_SPAN_ID
        );
        assert_eq!(
            derive_step_span_id(TASK_RUN_UID, 0, "build").to_string(),
            PINNED_STEP_SPAN_ID
        );
        assert_eq!(
            derive_pipeline_run_wait_span_id(PIPELINE_RUN_UID).to_string(),
            PINNED_WAIT_SPAN_ID
        );
        // printf 'lightstep-tekton-webhook/attempt-startup-span-id/v1\n%s/%s' "$UID" 1 \
        //   | sha256sum | cut -c1-16
        assert_eq!(
            derive_attempt_startup_span_id(TASK_RUN_UID, 1).to_string(),
            PINNED_STARTUP_SPAN_ID
        );
    }

    const PINNED_PIPELINE_RUN_SPAN_ID: &str = "7fa96fa9d3c2e267";
    const PINNED_STEP_SPAN_ID: &str = "cf1facdaad998189";
    const PINNED_WAIT_SPAN_ID: &str = "366fa1b11184fa22";
    const PINNED_STARTUP_SPAN_ID: &str = "b8483a6a9387231f";

    #[test]
    fn every_input_changes_the_id() {
        let attempt0 = derive_span_id(TASK_RUN_UID, 0);
        assert_ne!(attempt0, derive_span_id(TASK_RUN_UID, 1));
        assert_ne!(
            derive_trace_id(PIPELINE_RUN_UID),
            derive_trace_id(TASK_RUN_UID)
        );
        let step = derive_step_span_id(TASK_RUN_UID, 0, "build");
        assert_ne!(step, derive_step_span_id(TASK_RUN_UID, 1, "build"));
        assert_ne!(step, derive_step_span_id(TASK_RUN_UID, 0, "test"));
        assert_ne!(step, derive_step_span_id(PIPELINE_RUN_UID, 0, "build"));
        // The domains keep the kinds of id apart even on the same uid.
        assert_ne!(attempt0, derive_pipeline_run_span_id(TASK_RUN_UID));
        assert_ne!(
            derive_pipeline_run_span_id(PIPELINE_RUN_UID),
            derive_pipeline_run_wait_span_id(PIPELINE_RUN_UID)
        );
        assert_ne!(attempt0, derive_attempt_startup_span_id(TASK_RUN_UID, 0));
        assert_ne!(
            derive_attempt_startup_span_id(TASK_RUN_UID, 0),
            derive_attempt_startup_span_id(TASK_RUN_UID, 1)
        );
        assert_ne!(
            derive_pipeline_run_span_id(PIPELINE_RUN_UID).0[..],
            derive_trace_id(PIPELINE_RUN_UID).0[..8]
        );
    }

    #[test]
    fn sampling_matches_the_ratio_sampler() {
        let low = TraceId([0xff; 16]);
        let high_bits_zero = TraceId([0; 16]);
        assert!(sampled(low, 1.0));
        assert!(!sampled(low, 0.0));
        assert!(!sampled(high_bits_zero, 0.0));
        assert!(sampled(high_bits_zero, 0.01));
        assert!(!sampled(low, 0.99));
        // Roughly the ratio over many derived ids.
        let n = 4000;
        let hits = (0..n)
            .filter(|i| sampled(derive_trace_id(&format!("uid-{i}")), 0.25))
            .count();
        assert!((800..1200).contains(&hits), "{hits} of {n} sampled at 0.25");
    }
}
