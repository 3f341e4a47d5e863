//! The decision: a pod and a policy in; a reason to skip, or a JSON Patch, out.
//!
//! Pure and synchronous: no I/O, no logging, no clock. The same pod and policy always give the
//! same answer, which is what makes reinvocation safe (deciding again on the patched pod gives an
//! empty patch) and what lets every branch be tested on captured reviews.
//!
//! Rules, in order of precedence:
//! 1. The user's settings win. A variable a container defines is never overwritten (resource
//!    attributes are merged, the container's keys first). If a step configures any part of its
//!    OTLP exporter itself, the whole exporter group is left to it, so a Lightstep token is never
//!    sent to an endpoint the policy did not choose.
//! 2. `envFrom` sources lose against `env`, and the webhook cannot read them at admission time:
//!    with `envFrom: preserve` (the default) a setting such a source may define is not injected.
//!    The per-run trace context is always injected: a static value could never be right.
//! 3. In enforce mode the governed exporter variables (endpoint, protocol, headers, token) take
//!    the policy's values even where a step set its own, and a warning says what was replaced.
//!
//! Patches are built from pointer tokens (so `/` in a key becomes `~1`), create a missing labels
//! map, annotations map or env array before adding to it, and put every index-based operation of
//! a container before any operation that shifts indices.

use std::fmt::{self, Write as _};

use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use jsonptr::{PointerBuf, Token};
use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, EnvVarSource, SecretKeySelector};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::admission::pod::{Container, PodView as Pod};
pub use crate::contract::TraceSource;
use crate::contract::tekton::{TASK_RUN_SPAN_CONTEXT, TaskRunFacts};
use crate::contract::{self, SpanContext};
use crate::policy::{EnvFromPolicy, Policy, Protocol, TemplatePart};

/// Annotation that opts a TaskRun (and so its pod) out: `lightstep-tekton.io/inject: "false"`.
pub const OPT_OUT_ANNOTATION: &str = "lightstep-tekton.io/inject";
/// Marker annotation: which policy (name and fingerprint) produced the patch.
pub const MARKER_ANNOTATION: &str = "lightstep-tekton.io/injected";
/// The traceparent handed to the steps, for humans and collectors.
pub const TRACEPARENT_ANNOTATION: &str = "lightstep-tekton.io/traceparent";
pub const TRACE_ID_LABEL: &str = "lightstep-tekton.io/trace-id";
pub const PIPELINE_LABEL: &str = "lightstep-tekton.io/pipeline";
pub const COMMIT_LABEL: &str = "lightstep-tekton.io/commit";

pub const TRACEPARENT: &str = "TRACEPARENT";
pub const TRACESTATE: &str = "TRACESTATE";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
pub const OTEL_PROPAGATORS: &str = "OTEL_PROPAGATORS";
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
pub const OTEL_EXPORTER_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
pub const LS_ACCESS_TOKEN: &str = "LS_ACCESS_TOKEN";

/// Variables that configure where and how a step exports. A step that sets any of them has
/// configured its exporter itself.
const EXPORTER_GROUP: &[&str] = &[
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_OTLP_HEADERS,
    OTEL_EXPORTER_OTLP_TRACES_HEADERS,
];

/// The API server refuses a pod whose annotations add up to more than 256 KiB
/// (`TotalAnnotationSizeLimitB` in apimachinery's validation).
const ANNOTATIONS_SIZE_LIMIT: usize = 256 * 1024;
/// Label values are at most 63 characters (a DNS label's length).
const LABEL_VALUE_MAX: usize = 63;

/// Characters left readable in `OTEL_RESOURCE_ATTRIBUTES` values; everything else (including
/// `,`, `=`, `%`, `+`, `$` and spaces) is percent-encoded as the OpenTelemetry spec requires.
const ATTRIBUTE_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/')
    .remove(b':');

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

/// The explanation behind a decision, printed by `mutate --explain`.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub pod: String,
    pub namespace: String,
    pub task_run: String,
    pub mode: Mode,
    pub policy: String,
    pub context: SpanContext,
    pub trace_source: TraceSource,
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

/// Decides what to do with a pod. See the module documentation for the rules.
pub fn decide(pod: &Pod, request: Request<'_>, policy: &Policy) -> Decision {
    let Some(facts) = pod.facts() else {
        return Decision {
            action: Action::Skip(SkipReason::NotTaskRunPod),
            warnings: Vec::new(),
            report: None,
        };
    };
    let mut warnings = Vec::new();
    let opted_out = pod.annotation(OPT_OUT_ANNOTATION).is_some_and(is_false);
    if opted_out {
        match request.mode {
            Mode::Inject => {
                return Decision {
                    action: Action::Skip(SkipReason::OptedOut),
                    warnings,
                    report: None,
                };
            }
            Mode::Enforce => warnings.push(format!(
                "{OPT_OUT_ANNOTATION}=false ignored: tracing is enforced in this namespace"
            )),
        }
    }

    let (context, trace_source) = contract::attempt_context(&facts, policy.sampling_ratio);
    let plan = Plan::new(pod, &facts, request, policy, &context);

    let mut ops = Vec::new();
    let mut containers = Vec::new();
    let mut replaced: Vec<&'static str> = Vec::new();
    let pod_containers = pod.spec.as_ref().map(|s| s.containers.as_slice());
    for (index, container) in pod_containers.unwrap_or_default().iter().enumerate() {
        containers.push(plan.container(index, container, &mut ops, &mut replaced));
    }
    let init = pod.spec.as_ref().and_then(|s| s.init_containers.as_deref());
    for container in init.unwrap_or_default() {
        containers.push(ContainerReport {
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

    let metadata = plan.metadata(pod, &mut ops, &mut warnings);
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
            policy: plan.marker,
            context,
            trace_source,
            containers,
            metadata,
        }),
    }
}

/// What one kind of variable is, for the precedence rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// Per-run trace context: injected unless the container defines it.
    TraceContext,
    /// A setting: yields to the container and (with `envFrom: preserve`) to `envFrom`.
    Setting,
    /// `OTEL_RESOURCE_ATTRIBUTES`: merged with the container's value.
    Attributes,
    /// The exporter: yields as a group; governed in enforce mode.
    Exporter,
}

struct Desired {
    name: &'static str,
    value: Value,
    group: Group,
}

/// Everything computed once per pod and applied to each container.
struct Plan<'p> {
    policy: &'p Policy,
    mode: Mode,
    desired: Vec<Desired>,
    /// `key=value` pairs for `OTEL_RESOURCE_ATTRIBUTES`, values already encoded.
    attributes: Vec<(String, String)>,
    /// Enforce mode: values that overwrite signal-specific variables a step may set.
    governed_extra: Vec<(&'static str, Value)>,
    marker: String,
    traceparent: String,
    labels: Vec<(&'static str, String)>,
}

impl<'p> Plan<'p> {
    fn new(
        pod: &Pod,
        facts: &TaskRunFacts<'_>,
        request: Request<'_>,
        policy: &'p Policy,
        context: &SpanContext,
    ) -> Plan<'p> {
        let traceparent = context.traceparent();
        let mut desired = vec![Desired {
            name: TRACEPARENT,
            value: literal(TRACEPARENT, &traceparent),
            group: Group::TraceContext,
        }];
        if let Some(state) = &context.tracestate {
            desired.push(Desired {
                name: TRACESTATE,
                value: literal(TRACESTATE, &escape_dollar(state)),
                group: Group::TraceContext,
            });
        }
        desired.push(Desired {
            name: OTEL_SERVICE_NAME,
            value: literal(
                OTEL_SERVICE_NAME,
                &service_name(policy, facts, request.namespace, escape_dollar),
            ),
            group: Group::Setting,
        });
        let attributes = resource_attributes(pod, facts, request.namespace, policy);
        desired.push(Desired {
            name: OTEL_RESOURCE_ATTRIBUTES,
            value: literal(OTEL_RESOURCE_ATTRIBUTES, &join_attributes(&attributes)),
            group: Group::Attributes,
        });
        desired.push(Desired {
            name: OTEL_PROPAGATORS,
            value: literal(OTEL_PROPAGATORS, &policy.propagators),
            group: Group::Setting,
        });
        let exporter = &policy.exporter;
        desired.push(Desired {
            name: OTEL_EXPORTER_OTLP_ENDPOINT,
            value: literal(OTEL_EXPORTER_OTLP_ENDPOINT, &exporter.endpoint),
            group: Group::Exporter,
        });
        if let Some(traces) = &exporter.traces_endpoint {
            desired.push(Desired {
                name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                value: literal(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, traces),
                group: Group::Exporter,
            });
        }
        desired.push(Desired {
            name: OTEL_EXPORTER_OTLP_PROTOCOL,
            value: literal(OTEL_EXPORTER_OTLP_PROTOCOL, exporter.protocol.as_str()),
            group: Group::Exporter,
        });

        let mut governed_extra = Vec::new();
        if exporter.traces_endpoint.is_none() {
            // A step's own traces endpoint would override the generic one: point it at the
            // policy's endpoint, with the path the OTLP exporters append for HTTP.
            let traces = match exporter.protocol {
                Protocol::Grpc => exporter.endpoint.clone(),
                Protocol::HttpProtobuf | Protocol::HttpJson => {
                    format!("{}/v1/traces", exporter.endpoint.trim_end_matches('/'))
                }
            };
            governed_extra.push((
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                literal(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, &traces),
            ));
        }
        governed_extra.push((
            OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
            literal(
                OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
                exporter.protocol.as_str(),
            ),
        ));
        if let Some(token) = &policy.token {
            desired.push(Desired {
                name: LS_ACCESS_TOKEN,
                value: serde_json::to_value(EnvVar {
                    name: LS_ACCESS_TOKEN.to_owned(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: token.secret_name.clone(),
                            key: token.secret_key.clone(),
                            optional: Some(true),
                        }),
                        ..EnvVarSource::default()
                    }),
                })
                .expect("EnvVar serializes"),
                group: Group::Exporter,
            });
            let headers = format!("{}=$({LS_ACCESS_TOKEN})", token.header);
            desired.push(Desired {
                name: OTEL_EXPORTER_OTLP_HEADERS,
                value: literal(OTEL_EXPORTER_OTLP_HEADERS, &headers),
                group: Group::Exporter,
            });
            governed_extra.push((
                OTEL_EXPORTER_OTLP_TRACES_HEADERS,
                literal(OTEL_EXPORTER_OTLP_TRACES_HEADERS, &headers),
            ));
        }

        let mut labels = vec![(TRACE_ID_LABEL, context.trace_id.to_string())];
        if let Some(pipeline) = label_value(facts.pipeline_name()) {
            labels.push((PIPELINE_LABEL, pipeline));
        }
        if let Some(commit) = facts.pac.sha.and_then(label_value) {
            labels.push((COMMIT_LABEL, commit));
        }

        Plan {
            policy,
            mode: request.mode,
            desired,
            attributes,
            governed_extra,
            marker: policy.marker().to_owned(),
            traceparent,
            labels,
        }
    }

    fn container(
        &self,
        index: usize,
        container: &Container,
        ops: &mut Vec<PatchOperation>,
        replaced: &mut Vec<&'static str>,
    ) -> ContainerReport {
        let role = if container.name.starts_with("step-") {
            Role::Step
        } else if container.name.starts_with("sidecar-") {
            Role::Sidecar
        } else {
            Role::Other
        };
        let untouched = match role {
            Role::Step | Role::Sidecar if self.policy.exclude.contains(&container.name) => {
                Some("excluded by the policy (containers.exclude)")
            }
            Role::Sidecar if !self.policy.sidecars => {
                Some("sidecars are not injected (containers.sidecars: false)")
            }
            Role::Other | Role::Init => Some("not a Tekton step or sidecar"),
            Role::Step | Role::Sidecar => None,
        };
        let mut report = ContainerReport {
            name: container.name.clone(),
            role,
            untouched,
            vars: Vec::new(),
        };
        if untouched.is_some() {
            return report;
        }

        let env: &[EnvVar] = container.env.as_deref().unwrap_or_default();
        let env_from: &[EnvFromSource] = container.env_from.as_deref().unwrap_or_default();
        let env_ptr = |tail: Option<usize>| {
            let mut tokens = vec![
                Token::new("spec"),
                Token::new("containers"),
                Token::from(index),
                Token::new("env"),
            ];
            tokens.push(match tail {
                Some(i) => Token::from(i),
                None => Token::new("-"),
            });
            PointerBuf::from_tokens(tokens)
        };
        let defined = |name: &str| env.iter().rposition(|e| e.name == name);
        let may_come_from_env_from = |name: &str| {
            self.policy.env_from == EnvFromPolicy::Preserve
                && env_from
                    .iter()
                    .any(|s| name.starts_with(s.prefix.as_deref().unwrap_or("")))
        };
        let own_exporter = EXPORTER_GROUP
            .iter()
            .copied()
            .find(|n| defined(n).is_some());
        let exporter_from_env_from = EXPORTER_GROUP
            .iter()
            .any(|name| may_come_from_env_from(name));

        // Index-based operations first, then removals (highest index first), then appends.
        let mut in_place = Vec::new();
        let mut removals: Vec<usize> = Vec::new();
        let mut appends: Vec<Value> = Vec::new();
        let mut outcome_of = |name: &'static str, outcome: VarOutcome| {
            report.vars.push(VarReport { name, outcome });
        };

        for d in &self.desired {
            let existing = defined(d.name);
            let outcome = match (d.group, existing) {
                (Group::Exporter, _) if self.mode == Mode::Enforce => {
                    let positions: Vec<usize> = positions(env, d.name);
                    if positions.is_empty() {
                        appends.push(d.value.clone());
                        VarOutcome::Injected
                    } else {
                        let mut changed = false;
                        for &at in &positions {
                            if !same_var(&env[at], &d.value) {
                                in_place.push(replace(env_ptr(Some(at)), d.value.clone()));
                                changed = true;
                            }
                        }
                        if changed {
                            replaced.push(d.name);
                            VarOutcome::Replaced
                        } else {
                            VarOutcome::Present
                        }
                    }
                }
                (_, Some(at)) if same_var(&env[at], &d.value) => VarOutcome::Present,
                (Group::Attributes, Some(at)) => match (&env[at].value, &env[at].value_from) {
                    (_, Some(_)) => VarOutcome::KeptValueFrom,
                    (Some(own), None) if !own.trim().is_empty() => {
                        match merge_attributes(own, &self.attributes) {
                            Some((merged, added)) => {
                                in_place.push(replace(
                                    env_ptr(Some(at)),
                                    literal(OTEL_RESOURCE_ATTRIBUTES, &merged),
                                ));
                                VarOutcome::Merged(added)
                            }
                            None => VarOutcome::KeptContainer,
                        }
                    }
                    _ => {
                        in_place.push(replace(env_ptr(Some(at)), d.value.clone()));
                        VarOutcome::Injected
                    }
                },
                (_, Some(_)) => VarOutcome::KeptContainer,
                (Group::Exporter, None) => match own_exporter {
                    Some(own) => VarOutcome::KeptExporter(own),
                    None if exporter_from_env_from => VarOutcome::KeptEnvFrom,
                    None => {
                        appends.push(d.value.clone());
                        VarOutcome::Injected
                    }
                },
                (Group::Setting | Group::Attributes, None) if may_come_from_env_from(d.name) => {
                    VarOutcome::KeptEnvFrom
                }
                (_, None) => {
                    appends.push(d.value.clone());
                    VarOutcome::Injected
                }
            };
            outcome_of(d.name, outcome);
        }

        if self.mode == Mode::Enforce {
            for (name, value) in &self.governed_extra {
                let mut changed = false;
                for at in positions(env, name) {
                    if !same_var(&env[at], value) {
                        in_place.push(replace(env_ptr(Some(at)), value.clone()));
                        changed = true;
                    }
                }
                if changed {
                    replaced.push(name);
                    outcome_of(name, VarOutcome::Replaced);
                }
            }
            // `$(LS_ACCESS_TOKEN)` only expands if the token is defined earlier in the list.
            if self.policy.token.is_some() {
                let token_at = defined(LS_ACCESS_TOKEN).unwrap_or(usize::MAX);
                for name in [
                    OTEL_EXPORTER_OTLP_HEADERS,
                    OTEL_EXPORTER_OTLP_TRACES_HEADERS,
                ] {
                    let early: Vec<usize> = positions(env, name)
                        .into_iter()
                        .filter(|&at| at < token_at)
                        .collect();
                    if let Some(value) = early.first().map(|_| self.value_for(name)) {
                        removals.extend(&early);
                        appends.push(value);
                        outcome_of(name, VarOutcome::Moved);
                    }
                }
            }
        }

        if appends.is_empty() && in_place.is_empty() && removals.is_empty() {
            return report;
        }
        ops.extend(in_place);
        removals.sort_unstable_by(|a, b| b.cmp(a));
        ops.extend(removals.into_iter().map(|at| {
            PatchOperation::Remove(RemoveOperation {
                path: env_ptr(Some(at)),
            })
        }));
        if container.env.is_none() {
            ops.push(add(
                PointerBuf::from_tokens([
                    Token::new("spec"),
                    Token::new("containers"),
                    Token::from(index),
                    Token::new("env"),
                ]),
                Value::Array(Vec::new()),
            ));
        }
        ops.extend(appends.into_iter().map(|v| add(env_ptr(None), v)));
        report
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

    fn metadata(
        &self,
        pod: &Pod,
        ops: &mut Vec<PatchOperation>,
        warnings: &mut Vec<String>,
    ) -> Vec<MetadataReport> {
        let mut reports = Vec::new();
        let labels = pod.metadata.labels.as_ref();
        let mut label_ops = Vec::new();
        for (key, value) in &self.labels {
            let outcome = match labels.and_then(|l| l.get(*key)) {
                Some(v) if v == value => MetaOutcome::Present,
                Some(_) => MetaOutcome::KeptExisting,
                None => {
                    label_ops.push(add(metadata_ptr("labels", Some(key)), json!(value)));
                    MetaOutcome::Added
                }
            };
            reports.push(MetadataReport {
                key,
                is_label: true,
                value: value.clone(),
                outcome,
            });
        }
        if !label_ops.is_empty() && labels.is_none() {
            ops.push(add(metadata_ptr("labels", None), json!({})));
        }
        ops.extend(label_ops);

        let annotations = pod.metadata.annotations.as_ref();
        let wanted = [
            (TRACEPARENT_ANNOTATION, self.traceparent.as_str()),
            (MARKER_ANNOTATION, self.marker.as_str()),
        ];
        let current_size: usize = annotations
            .map(|a| a.iter().map(|(k, v)| k.len() + v.len()).sum())
            .unwrap_or(0);
        let mut growth = 0usize;
        let mut planned = Vec::new();
        for (key, value) in wanted {
            let outcome = match annotations.and_then(|a| a.get(key)) {
                Some(v) if v == value => MetaOutcome::Present,
                Some(v) => {
                    growth += value.len().saturating_sub(v.len());
                    MetaOutcome::Updated
                }
                None => {
                    growth += key.len() + value.len();
                    MetaOutcome::Added
                }
            };
            planned.push((key, value, outcome));
        }
        let fits = current_size + growth <= ANNOTATIONS_SIZE_LIMIT;
        if !fits && growth > 0 {
            warnings
                .push("pod annotations are at the size limit: trace annotations not added".into());
        }
        let mut annotation_ops = Vec::new();
        for (key, value, outcome) in planned {
            let outcome = match outcome {
                MetaOutcome::Added | MetaOutcome::Updated if !fits => MetaOutcome::SkippedSizeLimit,
                MetaOutcome::Added => {
                    annotation_ops.push(add(metadata_ptr("annotations", Some(key)), json!(value)));
                    outcome
                }
                MetaOutcome::Updated => {
                    annotation_ops.push(replace(
                        metadata_ptr("annotations", Some(key)),
                        json!(value),
                    ));
                    outcome
                }
                other => other,
            };
            reports.push(MetadataReport {
                key,
                is_label: false,
                value: value.to_owned(),
                outcome,
            });
        }
        if !annotation_ops.is_empty() && annotations.is_none() {
            ops.push(add(metadata_ptr("annotations", None), json!({})));
        }
        ops.extend(annotation_ops);
        reports
    }
}

fn positions(env: &[EnvVar], name: &str) -> Vec<usize> {
    env.iter()
        .enumerate()
        .filter(|(_, e)| e.name == name)
        .map(|(i, _)| i)
        .collect()
}

/// Whether an env entry already is exactly the variable this policy would write.
fn same_var(existing: &EnvVar, desired: &Value) -> bool {
    match serde_json::to_value(existing) {
        Ok(v) => &v == desired,
        Err(_) => false,
    }
}

fn literal(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn replace(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation { path, value })
}

fn metadata_ptr(map: &str, key: Option<&str>) -> PointerBuf {
    let mut tokens = vec![Token::new("metadata"), Token::new(map)];
    if let Some(key) = key {
        tokens.push(Token::new(key));
    }
    PointerBuf::from_tokens(tokens)
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

/// `service.name` of a TaskRun attempt: the policy's template filled from the facts, else the
/// TaskRun's name. `escape` is applied to every value read off the run (the webhook escapes `$`
/// for the env list; the run-span exporter passes values through), so the steps' telemetry and
/// the run spans land in one service.
pub fn service_name(
    policy: &Policy,
    facts: &TaskRunFacts<'_>,
    namespace: &str,
    escape: fn(&str) -> String,
) -> String {
    let mut out = String::new();
    for part in policy.service_name.parts() {
        match part {
            TemplatePart::Literal(text) => out.push_str(text),
            TemplatePart::Field(alternatives) => {
                if let Some(value) = alternatives
                    .iter()
                    .find_map(|f| facts.template_field(f, namespace))
                {
                    out.push_str(&escape(value));
                }
            }
        }
    }
    if out.trim().is_empty() {
        escape(facts.task_run)
    } else {
        out
    }
}

/// The run's attributes ([`contract::attributes`]) then the policy's own, values encoded.
pub fn resource_attributes(
    pod: &Pod,
    facts: &TaskRunFacts<'_>,
    namespace: &str,
    policy: &Policy,
) -> Vec<(String, String)> {
    let pod_name = pod.metadata.name.as_deref();
    let mut out: Vec<(String, String)> =
        contract::attributes::task_run_attributes(facts, namespace, pod_name)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), encode_attribute(&v)))
            .collect();
    for (key, value) in &policy.resource_attributes {
        if !out.iter().any(|(k, _)| k == key) {
            out.push((key.clone(), encode_attribute(value)));
        }
    }
    out
}

fn encode_attribute(value: &str) -> String {
    utf8_percent_encode(value, ATTRIBUTE_VALUE).to_string()
}

fn join_attributes(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}={v}");
    }
    out
}

/// Appends the attributes whose keys the container's own value does not set. `None` when
/// there is nothing to add.
fn merge_attributes(own: &str, ours: &[(String, String)]) -> Option<(String, usize)> {
    let own_keys: Vec<&str> = own
        .split(',')
        .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    let missing: Vec<(String, String)> = ours
        .iter()
        .filter(|(k, _)| !own_keys.contains(&k.as_str()))
        .cloned()
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut merged = own.trim_end_matches([',', ' ']).to_owned();
    merged.push(',');
    merged.push_str(&join_attributes(&missing));
    Some((merged, missing.len()))
}

/// Turns a value into a valid label value: characters outside `[A-Za-z0-9-_.]` become `-`, at
/// most 63 characters, starting and ending alphanumeric. `None` if nothing valid is left.
pub fn label_value(raw: &str) -> Option<String> {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(LABEL_VALUE_MAX)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pod {}/{} (TaskRun {}), mode {}, policy {}",
            self.namespace,
            self.pod,
            self.task_run,
            self.mode.as_str(),
            self.policy
        )?;
        writeln!(f, "trace context: {}", self.context.traceparent())?;
        match &self.trace_source {
            TraceSource::Tekton => {
                writeln!(
                    f,
                    "  trace id {} and parent {}: Tekton's TaskRun span ({TASK_RUN_SPAN_CONTEXT})",
                    self.context.trace_id, self.context.parent_id
                )?;
                writeln!(
                    f,
                    "  sampled: {} (flags from Tekton)",
                    yes_no(self.context.sampled())
                )?;
            }
            TraceSource::Derived {
                trace_from,
                trace_uid,
                span_uid,
                retry,
                malformed,
            } => {
                if let Some(why) = malformed {
                    writeln!(
                        f,
                        "  {TASK_RUN_SPAN_CONTEXT} not used: {why}; ids derived instead"
                    )?;
                }
                writeln!(
                    f,
                    "  trace id {}: derived from {trace_from} {trace_uid}",
                    self.context.trace_id
                )?;
                writeln!(
                    f,
                    "  parent {}: derived from TaskRun {span_uid}, attempt {retry}",
                    self.context.parent_id
                )?;
                writeln!(
                    f,
                    "  sampled: {} (policy sampling ratio)",
                    yes_no(self.context.sampled())
                )?;
            }
        }
        if let Some(state) = &self.context.tracestate {
            writeln!(f, "  tracestate: {state}")?;
        }
        for c in &self.containers {
            let role = match c.role {
                Role::Step => "step",
                Role::Sidecar => "sidecar",
                Role::Other => "container",
                Role::Init => "init container",
            };
            match c.untouched {
                Some(why) => writeln!(f, "{role} {}: untouched, {why}", c.name)?,
                None => {
                    writeln!(f, "{role} {}:", c.name)?;
                    for v in &c.vars {
                        writeln!(f, "  {:<36} {}", v.name, v.outcome)?;
                    }
                }
            }
        }
        for m in &self.metadata {
            let kind = if m.is_label { "label" } else { "annotation" };
            let outcome = match m.outcome {
                MetaOutcome::Added => "added",
                MetaOutcome::Updated => "updated",
                MetaOutcome::Present => "already present",
                MetaOutcome::KeptExisting => "kept the pod's own value",
                MetaOutcome::SkippedSizeLimit => "not added: annotations at the size limit",
            };
            writeln!(f, "{kind} {}={}: {outcome}", m.key, m.value)?;
        }
        Ok(())
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
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_sanitised() {
        assert_eq!(
            label_value("build-and-deploy").as_deref(),
            Some("build-and-deploy")
        );
        assert_eq!(label_value("feature/x y").as_deref(), Some("feature-x-y"));
        assert_eq!(label_value("--a--").as_deref(), Some("a"));
        assert_eq!(label_value("///"), None);
        assert_eq!(label_value(&"a".repeat(100)).unwrap().len(), 63);
        assert_eq!(label_value("é"), None);
    }

    #[test]
    fn attributes_are_percent_encoded() {
        assert_eq!(encode_attribute("a,b=c %$+"), "a%2Cb%3Dc%20%25%24%2B");
        assert_eq!(
            encode_attribute("https://github.com/acme/shop"),
            "https://github.com/acme/shop"
        );
    }

    #[test]
    fn merge_keeps_the_containers_keys() {
        let ours = vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ];
        assert_eq!(
            merge_attributes("b=mine", &ours),
            Some(("b=mine,a=1".to_owned(), 1))
        );
        assert_eq!(merge_attributes("a=x, b=y", &ours), None);
    }
}
