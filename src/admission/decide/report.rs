//! The explanation behind a decision: per container and per variable what was done and why, per
//! label and annotation the same. `mutate --explain` prints it ([`Report`]'s `Display`); the
//! review boundary counts the containers it changed for the audit warning.

use std::fmt;

use super::{Mode, TraceSource};
use crate::contract::tekton::TASK_RUN_SPAN_CONTEXT;
use crate::contract::w3c::DroppedMember;
use crate::contract::{ContextRule, SpanContext, TektonContext};

/// The explanation behind a decision, printed by `mutate --explain`.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub pod: String,
    pub namespace: String,
    pub task_run: String,
    pub mode: Mode,
    pub policy: String,
    pub context: SpanContext,
    /// The version of the context rule the policy chose (`Policy::context_rule`).
    pub rule: ContextRule,
    pub trace_source: TraceSource,
    /// The members of Tekton's `tracestate` that the W3C grammar refused, left out of `TRACESTATE`.
    pub tracestate_dropped: Vec<DroppedMember>,
    /// `runSpans.enabled`: each step got its own span as parent, not the context above.
    pub step_parents: bool,
    pub containers: Vec<ContainerReport>,
    pub metadata: Vec<MetadataReport>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerReport {
    pub name: String,
    pub role: Role,
    /// Why the container is not touched at all, if it is not.
    pub untouched: Option<&'static str>,
    pub vars: Vec<VarReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Step,
    Sidecar,
    Other,
    Init,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VarReport {
    pub name: &'static str,
    pub outcome: VarOutcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VarOutcome {
    Injected,
    /// Already has exactly the value this policy would inject.
    Present,
    /// The container defines it: its value is kept.
    KeptContainer,
    /// An `envFrom` source of the container may define it (`envFrom: preserve`).
    KeptEnvFrom,
    /// The container configures its own exporter (it sets the named variable).
    KeptExporter(&'static str),
    /// The container's own `OTEL_RESOURCE_ATTRIBUTES` comes from `valueFrom` and cannot be merged.
    KeptValueFrom,
    /// Merged into the container's value; the number of attributes added.
    Merged(usize),
    /// Enforce mode: the container's value was replaced with the policy's.
    Replaced,
    /// Enforce mode: moved after `LS_ACCESS_TOKEN` so `$(LS_ACCESS_TOKEN)` expands.
    Moved,
    /// Left out so that the patch stays within its size limit.
    SkippedPatchLimit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetadataReport {
    pub key: &'static str,
    pub is_label: bool,
    pub value: String,
    pub outcome: MetaOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaOutcome {
    Added,
    Updated,
    Present,
    /// A label of this key already exists with another value: the pod's value is kept.
    KeptExisting,
    /// The annotations would exceed the API server's size limit.
    SkippedSizeLimit,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pod {}/{} (TaskRun {}), policy {}",
            self.namespace, self.pod, self.task_run, self.policy
        )?;
        self.fmt_context(f)?;
        for c in &self.containers {
            write!(f, "{c}")?;
        }
        for m in &self.metadata {
            writeln!(f, "{m}")?;
        }
        Ok(())
    }
}

impl Report {
    /// Where the trace context came from, and why.
    fn fmt_context(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let context = &self.context;
        writeln!(f, "trace context: {}", context.traceparent())?;
        if self.step_parents {
            writeln!(
                f,
                "  steps: each step's parent is its own step span (runSpans.enabled; docs/trace-ids.md)"
            )?;
        }
        match &self.trace_source {
            TraceSource::Tekton => {
                writeln!(
                    f,
                    "  trace id {} and parent {}: Tekton's TaskRun span ({TASK_RUN_SPAN_CONTEXT})",
                    context.trace_id, context.parent_id
                )?;
                writeln!(
                    f,
                    "  sampled: {} (flags from Tekton)",
                    yes_no(context.sampled())
                )?;
            }
            TraceSource::Derived {
                trace_from,
                trace_uid,
                span_uid,
                retry,
                tekton,
            } => {
                if self.rule == ContextRule::Derived {
                    writeln!(
                        f,
                        "  {}: runSpans.enabled, every id derived from the run's uids (docs/trace-ids.md)",
                        self.rule.version()
                    )?;
                }
                match tekton {
                    Some(TektonContext::Malformed(why)) => writeln!(
                        f,
                        "  {TASK_RUN_SPAN_CONTEXT} not used: {why}; ids derived instead"
                    )?,
                    Some(TektonContext::NotFollowed(theirs)) => {
                        writeln!(
                            f,
                            "  Tekton's span context ({TASK_RUN_SPAN_CONTEXT}) {} not followed, kept as a link by the exporter: run spans are on",
                            theirs.traceparent()
                        )?;
                        if let Some(state) = &theirs.tracestate {
                            writeln!(
                                f,
                                "  Tekton's tracestate {state} not passed on: the trace is the run's, not Tekton's"
                            )?;
                        }
                    }
                    None => {}
                }
                writeln!(
                    f,
                    "  trace id {}: derived from {trace_from} {trace_uid}",
                    context.trace_id
                )?;
                writeln!(
                    f,
                    "  parent {}: derived from TaskRun {span_uid}, attempt {retry}",
                    context.parent_id
                )?;
                writeln!(
                    f,
                    "  sampled: {} (policy sampling ratio)",
                    yes_no(context.sampled())
                )?;
            }
        }
        if let Some(state) = &context.tracestate {
            writeln!(f, "  tracestate: {state}")?;
        }
        for dropped in &self.tracestate_dropped {
            writeln!(f, "  tracestate dropped, {dropped}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ContainerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Step => "step",
            Role::Sidecar => "sidecar",
            Role::Other => "container",
            Role::Init => "init container",
        };
        match self.untouched {
            Some(why) => writeln!(f, "{role} {}: untouched, {why}", self.name),
            None => {
                writeln!(f, "{role} {}:", self.name)?;
                for v in &self.vars {
                    writeln!(f, "  {:<36} {}", v.name, v.outcome)?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for MetadataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_label { "label" } else { "annotation" };
        let outcome = match self.outcome {
            MetaOutcome::Added => "added",
            MetaOutcome::Updated => "updated",
            MetaOutcome::Present => "already present",
            MetaOutcome::KeptExisting => "kept the pod's own value",
            MetaOutcome::SkippedSizeLimit => "not added: annotations at the size limit",
        };
        write!(f, "{kind} {}={}: {outcome}", self.key, self.value)
    }
}

impl fmt::Display for VarOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VarOutcome::Injected => write!(f, "injected"),
            VarOutcome::Present => write!(f, "already set to the policy's value"),
            VarOutcome::KeptContainer => write!(f, "kept: the container sets it"),
            VarOutcome::KeptEnvFrom => write!(
                f,
                "kept: an envFrom source may define it (policy envFrom: preserve)"
            ),
            VarOutcome::KeptExporter(own) => {
                write!(f, "kept: the container configures its exporter ({own})")
            }
            VarOutcome::KeptValueFrom => {
                write!(f, "kept: the container's value comes from valueFrom")
            }
            VarOutcome::Merged(n) => write!(f, "merged: {n} attributes added to the container's"),
            VarOutcome::Replaced => write!(f, "replaced with the policy's value (enforced)"),
            VarOutcome::Moved => write!(f, "moved after LS_ACCESS_TOKEN (enforced)"),
            VarOutcome::SkippedPatchLimit => {
                write!(f, "not injected: the patch would pass its size limit")
            }
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
