//! The decision: a pod and a policy in; a reason to skip, or a JSON Patch, out.
//!
//! Pure and synchronous: no I/O, no logging, no clock. The same pod and policy always give the
//! same answer, which is what makes reinvocation safe (deciding again on the patched pod gives an
//! empty patch) and what lets every branch be tested on captured reviews.
//!
//! Rules, in order of precedence:
//! 1. The user's settings win. A variable a container defines is never overwritten (resource
//!    attributes are merged, the container's keys first). If a step configures any part of its
//!    OTLP exporter itself (the endpoint, headers or protocol of any signal: traces, metrics or
//!    logs), the whole exporter group is left to it, so a Lightstep token is never sent to an
//!    endpoint the policy did not choose.
//! 2. `envFrom` sources lose against `env`, and the webhook cannot read them at admission time:
//!    with `envFrom: preserve` (the default) a setting such a source may define is not injected.
//!    The per-run trace context is always injected: a static value could never be right.
//! 3. In enforce mode the governed exporter variables (every signal's endpoint, protocol and
//!    headers, and the token) take the policy's values even where a step set its own, and a
//!    warning says what was replaced. Wherever the token goes, a signal's own variable that an
//!    `envFrom` source may define is set in `env` to the policy's value, since `env` wins.
//!
//! Patches are built from pointer tokens (so `/` in a key becomes `~1`), create a missing labels
//! map, annotations map or env array before adding to it, and put every index-based operation of
//! a container before any operation that shifts indices.
//!
//! The parts: `env` plans each container's variables (`container_env` reads one container's env,
//! `desired` names what a policy wants in it), `exporter` the exporter group and the
//! token, `resource` the service name and resource attributes, `metadata` the labels and
//! annotations, and `report` the explanation `mutate --explain` prints.

mod container_env;
mod desired;
mod env;
mod exporter;
mod metadata;
mod report;
mod resource;

use std::io;

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use jsonptr::PointerBuf;
use serde_json::{Value, json};

use crate::admission::pod::PodView as Pod;
pub use crate::contract::TraceSource;
use crate::contract::{self, w3c};
use crate::policy::Policy;
pub use report::{
    ContainerReport, MetaOutcome, MetadataReport, Report, Role, VarOutcome, VarReport,
};
pub use resource::{resource_attributes, service_name};

/// Annotation that opts a TaskRun (and so its pod) out: `lightstep-tekton.io/inject: "false"`.
pub const OPT_OUT_ANNOTATION: &str = "lightstep-tekton.io/inject";
/// Marker annotation: which policy (name and fingerprint) produced the patch.
pub const MARKER_ANNOTATION: &str = "lightstep-tekton.io/injected";

/// The largest JSON Patch the webhook sends, in bytes before base64. etcd refuses an object over
/// 1.5 MiB (its default `--max-request-bytes`), so the API server cannot store a pod past that:
/// 256 KiB leaves a pod of up to 1.25 MiB room for the patch, is five times the largest real
/// patch we have (40 steps: 51 KB) and keeps the base64 reply near 342 KiB. Over it, groups are
/// left out ([`bounded`]), never a reply the API server must refuse.
const PATCH_MAX: usize = 256 * 1024;

/// Which webhook entry called: opt-in namespaces (`/mutate`) or enforced ones (`/enforce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Inject,
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inject => "inject",
            Mode::Enforce => "enforce",
        }
    }
}

/// Facts from the admission request that are not on the pod.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request's namespace (a pod being created may not carry one in its metadata).
    pub namespace: &'a str,
    pub mode: Mode,
}

/// What the webhook does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    /// Short messages for the user who created the pod (each under 120 characters).
    pub warnings: Vec<String>,
    /// What was decided for each container and why; `None` for pods that are not TaskRun pods.
    pub report: Option<Report>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Skip(SkipReason),
    Patch(Patch),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// No `tekton.dev/taskRun` label.
    NotTaskRunPod,
    /// The `lightstep-tekton.io/inject: "false"` annotation, in inject mode.
    OptedOut,
    /// Nothing left to change: the pod already carries what this policy injects.
    AlreadyInjected,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotTaskRunPod => "not-taskrun-pod",
            SkipReason::OptedOut => "opted-out",
            SkipReason::AlreadyInjected => "already-injected",
        }
    }
}

/// Decides what to do with a pod. See the module documentation for the rules.
pub fn decide(pod: &Pod, request: Request<'_>, policy: &Policy) -> Decision {
    let skip = |reason, warnings| Decision {
        action: Action::Skip(reason),
        warnings,
        report: None,
    };
    let Some(facts) = pod.facts() else {
        return skip(SkipReason::NotTaskRunPod, Vec::new());
    };
    let mut warnings = Vec::new();
    if pod.annotation(OPT_OUT_ANNOTATION).is_some_and(is_false) {
        match request.mode {
            Mode::Inject => return skip(SkipReason::OptedOut, warnings),
            Mode::Enforce => warnings.push(format!(
                "{OPT_OUT_ANNOTATION}=false ignored: tracing is enforced in this namespace"
            )),
        }
    }

    let rule = policy.context_rule();
    let (context, trace_source) = contract::attempt_context(&facts, policy.sampling_ratio, rule);
    let mut meta_ops = Vec::new();
    let mut meta_warnings = Vec::new();
    let meta = metadata::Plan::new(&facts, &context, policy);
    let metadata = meta.apply(pod, &mut meta_ops, &mut meta_warnings);
    let mut env = env::Plan::new(pod, &facts, request, policy, &context);
    let budget = PATCH_MAX.saturating_sub(patch_size(&meta_ops));
    let (mut ops, containers) = bounded(&mut env, pod, budget, &mut warnings);
    ops.append(&mut meta_ops);
    warnings.append(&mut meta_warnings);
    // Under context rule v2 Tekton's whole tracestate is left out, which the report says.
    let tracestate_dropped = match (&trace_source, facts.span_context) {
        (TraceSource::Tekton, Some(json)) => w3c::annotation_tracestate(json).dropped,
        _ => Vec::new(),
    };
    let action = if ops.is_empty() {
        Action::Skip(SkipReason::AlreadyInjected)
    } else {
        Action::Patch(Patch(ops))
    };

    Decision {
        action,
        warnings,
        report: Some(Report {
            pod: pod.display_name(),
            namespace: request.namespace.to_owned(),
            task_run: facts.task_run.to_owned(),
            mode: request.mode,
            policy: policy.marker().to_owned(),
            context,
            rule,
            trace_source,
            tracestate_dropped,
            step_parents: policy.run_spans.enabled,
            containers,
            metadata,
        }),
    }
}

/// The plan's container operations, within `budget` bytes of JSON: when the full plan would pass
/// it, the resource attributes are left out, then every container, each time with a warning.
fn bounded(
    env: &mut env::Plan<'_>,
    pod: &Pod,
    budget: usize,
    warnings: &mut Vec<String>,
) -> (Vec<PatchOperation>, Vec<ContainerReport>) {
    let before = warnings.len();
    let mut ops = Vec::new();
    let mut reports = env.apply(pod, &mut ops, warnings);
    for (shrunk, warning) in [
        (
            env::Shrunk::Attributes,
            "patch size limit: OTEL_RESOURCE_ATTRIBUTES not injected",
        ),
        (
            env::Shrunk::Containers,
            "patch size limit: tracing not injected into the containers",
        ),
    ] {
        if patch_size(&ops) <= budget {
            break;
        }
        env.shrink(shrunk);
        ops.clear();
        warnings.truncate(before);
        reports = env.apply(pod, &mut ops, warnings);
        warnings.push(warning.to_owned());
    }
    (ops, reports)
}

/// The length of the operations' JSON, counted without building it.
fn patch_size(ops: &[PatchOperation]) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Plain JSON values always serialize; if one did not, the patch counts as too large.
    match serde_json::to_writer(&mut count, ops) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

fn is_false(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "false" | "disabled" | "no" | "off"
    )
}

/// Kubernetes expands `$(VAR)` in env values and reduces `$$` to `$`: values read off the pod
/// are escaped so they reach the step unchanged.
fn escape_dollar(value: &str) -> String {
    value.replace('$', "$$")
}

/// An env entry with a plain value.
fn literal(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn replace(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation { path, value })
}
