//! The per-container env plan: the variables a policy wants (computed once per pod, each a
//! [`Desired`] of its [`Group`]), and the precedence rules of the
//! [module documentation](super) applied to each step and sidecar, enforce mode included.

use json_patch::PatchOperation;
use serde_json::Value;

use super::container_env::{Edits, EnvView, same_var};
use super::desired::{Desired, Group};
use super::exporter::{HEADER_VARS, LS_ACCESS_TOKEN, exporter};
use super::report::{ContainerReport, Role, VarOutcome, VarReport};
use super::resource::{join_attributes, merge_attributes, resource_attributes, service_name};
use super::{Mode, Request, escape_dollar, literal, replace};
use crate::admission::pod::{Container, PodView as Pod};
use crate::contract::tekton::TaskRunFacts;
use crate::contract::{SpanContext, step_context};
use crate::policy::Policy;

const TRACEPARENT: &str = "TRACEPARENT";
const TRACESTATE: &str = "TRACESTATE";
const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
const OTEL_PROPAGATORS: &str = "OTEL_PROPAGATORS";

/// Everything computed once per pod and applied to each container.
pub(super) struct Plan<'p> {
    policy: &'p Policy,
    mode: Mode,
    desired: Vec<Desired>,
    /// `key=value` pairs for `OTEL_RESOURCE_ATTRIBUTES`, values already encoded.
    attributes: Vec<(String, String)>,
    /// Enforce mode: values that overwrite signal-specific variables a step may set.
    governed_extra: Vec<(&'static str, Value)>,
    /// What the patch size limit took out: the resource attributes, or every container.
    shrunk: Shrunk,
    /// With `runSpans.enabled`: each step container's own `TRACEPARENT`, whose parent is the
    /// step's span (`contract::step_context`), by container name.
    step_parents: Vec<(String, Desired)>,
}

/// How much of the plan the patch size limit took out, least first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Shrunk {
    Nothing,
    /// `OTEL_RESOURCE_ATTRIBUTES`: the largest variable, and the same in every step.
    Attributes,
    /// Every container is left as it is.
    Containers,
}

impl<'p> Plan<'p> {
    pub(super) fn new(
        pod: &Pod,
        facts: &TaskRunFacts<'_>,
        request: Request<'_>,
        policy: &'p Policy,
        context: &SpanContext,
    ) -> Plan<'p> {
        let mut desired = vec![Desired::literal(
            TRACEPARENT,
            &context.traceparent(),
            Group::TraceContext,
        )];
        if let Some(state) = &context.tracestate {
            let state = escape_dollar(state);
            desired.push(Desired::literal(TRACESTATE, &state, Group::TraceContext));
        }
        let service = service_name(policy, facts, request.namespace, escape_dollar);
        desired.push(Desired::literal(
            OTEL_SERVICE_NAME,
            &service,
            Group::Setting,
        ));
        let attributes = resource_attributes(pod, facts, request.namespace, policy);
        let joined = join_attributes(&attributes);
        desired.push(Desired::literal(
            OTEL_RESOURCE_ATTRIBUTES,
            &joined,
            Group::Attributes,
        ));
        let propagators = &policy.propagators;
        desired.push(Desired::literal(
            OTEL_PROPAGATORS,
            propagators,
            Group::Setting,
        ));
        let governed_extra = exporter(policy, &mut desired);
        let step_parents = match policy.run_spans.enabled {
            true => step_parents(pod, facts, context),
            false => Vec::new(),
        };
        Plan {
            policy,
            mode: request.mode,
            desired,
            attributes,
            governed_extra,
            shrunk: Shrunk::Nothing,
            step_parents,
        }
    }

    /// What `container` is given of `d`: the step's own `TRACEPARENT` where run spans give it
    /// one, else the pod's.
    fn desired_for<'d>(&'d self, d: &'d Desired, container: &str) -> &'d Desired {
        if d.name != TRACEPARENT {
            return d;
        }
        self.step_parents
            .iter()
            .find(|(name, _)| name == container)
            .map_or(d, |(_, own)| own)
    }

    /// Plans less from now on: see [`Shrunk`].
    pub(super) fn shrink(&mut self, to: Shrunk) {
        self.shrunk = self.shrunk.max(to);
    }

    /// Plans every container of the pod (init containers are reported, never touched) and
    /// warns once about what enforce mode replaced.
    pub(super) fn apply(
        &self,
        pod: &Pod,
        ops: &mut Vec<PatchOperation>,
        warnings: &mut Vec<String>,
    ) -> Vec<ContainerReport> {
        let mut reports = Vec::new();
        let mut replaced: Vec<&'static str> = Vec::new();
        let spec = pod.spec.as_ref();
        let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        for (index, container) in containers.iter().enumerate() {
            reports.push(self.container(index, container, ops, &mut replaced));
        }
        let init = spec.and_then(|s| s.init_containers.as_deref());
        for container in init.unwrap_or_default() {
            reports.push(ContainerReport {
                name: container.name.clone(),
                role: Role::Init,
                untouched: Some("init containers are Tekton's own plumbing"),
                vars: Vec::new(),
            });
        }
        if !replaced.is_empty() {
            replaced.sort_unstable();
            replaced.dedup();
            warnings.push(format!(
                "enforced tracing policy replaced {}",
                replaced.join(", ")
            ));
        }
        reports
    }

    fn container(
        &self,
        index: usize,
        container: &Container,
        ops: &mut Vec<PatchOperation>,
        replaced: &mut Vec<&'static str>,
    ) -> ContainerReport {
        let role = role_of(&container.name);
        let untouched = self.untouched(role, &container.name);
        let mut report = ContainerReport {
            name: container.name.clone(),
            role,
            untouched,
            vars: Vec::new(),
        };
        if untouched.is_some() {
            return report;
        }
        let view = EnvView::new(container, self.policy.env_from);
        let mut edits = Edits::new(index);
        for d in &self.desired {
            let d = self.desired_for(d, &container.name);
            let outcome = self.outcome(d, &view, &mut edits, replaced);
            report.vars.push(VarReport {
                name: d.name,
                outcome,
            });
        }
        if self.mode == Mode::Enforce {
            self.govern(&view, &mut edits, replaced, &mut report.vars);
            self.move_headers(&view, &mut edits, &mut report.vars);
        } else if self.policy.token.is_some()
            && view.own_exporter.is_none()
            && !view.exporter_from_env_from
        {
            self.pin_env_from(&view, &mut edits, &mut report.vars);
        }
        edits.finish(container.env.is_none(), ops);
        report
    }

    fn untouched(&self, role: Role, name: &str) -> Option<&'static str> {
        match role {
            Role::Step | Role::Sidecar if self.policy.exclude.iter().any(|e| e == name) => {
                Some("excluded by the policy (containers.exclude)")
            }
            Role::Sidecar if !self.policy.sidecars => {
                Some("sidecars are not injected (containers.sidecars: false)")
            }
            Role::Other | Role::Init => Some("not a Tekton step or sidecar"),
            Role::Step | Role::Sidecar if self.shrunk == Shrunk::Containers => {
                Some("not injected: the patch would pass its size limit")
            }
            Role::Step | Role::Sidecar => None,
        }
    }

    /// The precedence rules for one desired variable in one container.
    fn outcome(
        &self,
        d: &Desired,
        view: &EnvView<'_>,
        edits: &mut Edits,
        replaced: &mut Vec<&'static str>,
    ) -> VarOutcome {
        if d.group == Group::Attributes && self.shrunk >= Shrunk::Attributes {
            return VarOutcome::SkippedPatchLimit;
        }
        if d.group == Group::Exporter && self.mode == Mode::Enforce {
            return if view.positions(d.name).is_empty() {
                edits.appends.push(d.value.clone());
                VarOutcome::Injected
            } else if edits.replace_differing(view, d.name, &d.value) {
                replaced.push(d.name);
                VarOutcome::Replaced
            } else {
                VarOutcome::Present
            };
        }
        match (d.group, view.defined(d.name)) {
            (_, Some(at)) if same_var(&view.env[at], &d.value) => VarOutcome::Present,
            (Group::Attributes, Some(at)) => self.merge(at, d, view, edits),
            (_, Some(_)) => VarOutcome::KeptContainer,
            (Group::Exporter, None) => match view.own_exporter {
                Some(own) => VarOutcome::KeptExporter(own),
                None if view.exporter_from_env_from => VarOutcome::KeptEnvFrom,
                None => {
                    edits.appends.push(d.value.clone());
                    VarOutcome::Injected
                }
            },
            (Group::Setting | Group::Attributes, None) if view.may_come_from_env_from(d.name) => {
                VarOutcome::KeptEnvFrom
            }
            (_, None) => {
                edits.appends.push(d.value.clone());
                VarOutcome::Injected
            }
        }
    }

    /// The container sets `OTEL_RESOURCE_ATTRIBUTES` (at `at`): add the keys it lacks.
    fn merge(&self, at: usize, d: &Desired, view: &EnvView<'_>, edits: &mut Edits) -> VarOutcome {
        let own = &view.env[at];
        match (&own.value, &own.value_from) {
            (_, Some(_)) => VarOutcome::KeptValueFrom,
            (Some(own), None) if !own.trim().is_empty() => {
                match merge_attributes(own, &self.attributes) {
                    Some((merged, added)) => {
                        let value = literal(OTEL_RESOURCE_ATTRIBUTES, &merged);
                        edits.in_place.push(replace(edits.ptr(Some(at)), value));
                        VarOutcome::Merged(added)
                    }
                    None => VarOutcome::KeptContainer,
                }
            }
            _ => {
                edits
                    .in_place
                    .push(replace(edits.ptr(Some(at)), d.value.clone()));
                VarOutcome::Injected
            }
        }
    }

    /// Enforce mode: every signal's own exporter variable the container sets takes the policy's
    /// value, so the token never travels with an endpoint the policy did not choose.
    fn govern(
        &self,
        view: &EnvView<'_>,
        edits: &mut Edits,
        replaced: &mut Vec<&'static str>,
        vars: &mut Vec<VarReport>,
    ) {
        for (name, value) in &self.governed_extra {
            if edits.replace_differing(view, name, value) {
                replaced.push(name);
                vars.push(VarReport {
                    name,
                    outcome: VarOutcome::Replaced,
                });
            }
        }
        self.pin_env_from(view, edits, vars);
    }

    /// The token goes into this container: a signal's own variable that an `envFrom` source
    /// may define would beat the generic endpoint the token goes with, so it is set in `env`
    /// (which wins over `envFrom`) to the policy's value.
    fn pin_env_from(&self, view: &EnvView<'_>, edits: &mut Edits, vars: &mut Vec<VarReport>) {
        for (name, value) in &self.governed_extra {
            if view.defined(name).is_none() && view.env_from_may_define(name) {
                edits.appends.push(value.clone());
                vars.push(VarReport {
                    name,
                    outcome: VarOutcome::Injected,
                });
            }
        }
    }

    /// Enforce mode: `$(LS_ACCESS_TOKEN)` only expands if the token is defined earlier in the
    /// list, so header variables before it are moved to the end.
    fn move_headers(&self, view: &EnvView<'_>, edits: &mut Edits, vars: &mut Vec<VarReport>) {
        if self.policy.token.is_none() {
            return;
        }
        let token_at = view.defined(LS_ACCESS_TOKEN).unwrap_or(usize::MAX);
        for name in HEADER_VARS {
            let early: Vec<usize> = view
                .positions(name)
                .into_iter()
                .filter(|&at| at < token_at)
                .collect();
            if let Some(value) = early.first().map(|_| self.value_for(name)) {
                edits.removals.extend(&early);
                edits.appends.push(value);
                vars.push(VarReport {
                    name,
                    outcome: VarOutcome::Moved,
                });
            }
        }
    }

    /// The governed value of a header variable (enforce mode).
    fn value_for(&self, name: &str) -> Value {
        self.desired
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.value.clone())
            .or_else(|| {
                self.governed_extra
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.clone())
            })
            .expect("header variables are governed whenever a token is configured")
    }
}

/// Each step container's `TRACEPARENT` under run spans: the attempt's trace and flags, the
/// step's span as parent. The step's name is its container's without `step-`, as Tekton names
/// it in the TaskRun's `status.steps`, which is what the exporter derives the same id from.
fn step_parents(
    pod: &Pod,
    facts: &TaskRunFacts<'_>,
    attempt: &SpanContext,
) -> Vec<(String, Desired)> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice());
    containers
        .unwrap_or_default()
        .iter()
        .filter_map(|c| {
            let step = c.name.strip_prefix(STEP_PREFIX)?;
            let context = step_context(attempt, facts, step);
            let desired =
                Desired::literal(TRACEPARENT, &context.traceparent(), Group::TraceContext);
            Some((c.name.clone(), desired))
        })
        .collect()
}

/// Tekton names a step's container `step-<step name>`.
const STEP_PREFIX: &str = "step-";

fn role_of(name: &str) -> Role {
    if name.starts_with(STEP_PREFIX) {
        Role::Step
    } else if name.starts_with("sidecar-") {
        Role::Sidecar
    } else {
        Role::Other
    }
}
