//! The `TracingPolicy` custom resource: a policy as a cluster object, per team and environment.
//!
//! `TracingPolicy` (group `lightstep-tekton.io`, version `v1alpha1`, cluster-scoped) holds what
//! the file policy holds (the same field names, through the same [`crate::policy`] types), plus
//! `namespaceSelector`, `priority` and `mode`. The CRD is generated from these types
//! ([`crd`], printed by `lightstep-tekton-webhook crd`), so the schema the API server enforces
//! and the decoder here cannot disagree; the chart's `crds/crd-tracingpolicy.yaml` (rendered into
//! `manifests/base`) is that output and a test fails when the two drift.
//!
//! Everything here is pure: decoding an object ([`decode`]), resolving it into a validated
//! [`Resolved`] policy ([`resolve`]), matching namespace labels ([`NamespaceSelector`]) and
//! computing the `status` the webhook reports ([`desired_status`]). Choosing among policies is
//! [`crate::policy::selection`]'s job; watching them is [`crate::cluster`]'s.
//!
//! Trade-offs:
//! - The spec keeps `deny_unknown_fields`, like the file policy, so a typo in a file previewed
//!   with `mutate --policy-dir` is an error. On a cluster the API server prunes unknown fields
//!   first; an object that still does not decode (a CRD newer than the webhook) is kept apart as
//!   invalid, with the decoder's message in its status, instead of failing the whole watch.
//! - The schema carries the rules the API server can check by itself (the sampling ratio's
//!   range, the enums, the URL and Secret patterns; see `crate::policy::spec`), and the
//!   validating webhook (`/validate`, [`crate::admission::validate`]) refuses the rest at apply
//!   time. A policy that gets past both (applied while the webhook was down, say a template
//!   with an unknown field) is kept and never applied; its status says which field is wrong.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::core::DynamicObject;

use super::invalid::invalid;
pub use super::invalid::{Invalid, InvalidKind};
pub use super::namespace_selector::NamespaceSelector;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{
    ContainersSpec, EnvFromPolicy, ExporterSpec, Policy, PolicyError, PolicySpec, Profile,
    RunMetricsSpec, RunSpansSpec, SamplingSpec, TokenSpec, explicit_null,
};

pub const GROUP: &str = "lightstep-tekton.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "TracingPolicy";
/// The resource name in URLs and RBAC rules (`tracingpolicies`, `tracingpolicies/status`).
pub const PLURAL: &str = "tracingpolicies";
/// The condition type the webhook maintains on every TracingPolicy.
pub const CONDITION_VALID: &str = "Valid";
/// The generation the API server gives a new object; used for files that name none.
pub const FIRST_GENERATION: i64 = 1;

/// A tracing policy for the namespaces its selector matches. Where several match, the highest
/// `priority` wins, then the smallest name; where none matches, the webhook's file or embedded
/// policy applies.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lightstep-tekton.io",
    version = "v1alpha1",
    kind = "TracingPolicy",
    plural = "tracingpolicies",
    status = "TracingPolicyStatus",
    doc = "Tracing settings for the Tekton TaskRun pods of the namespaces it selects.",
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.matchedNamespaces"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingPolicySpec {
    /// The namespaces this policy is for, by their labels (matchLabels, and matchExpressions
    /// with In, NotIn, Exists, DoesNotExist). Absent or empty: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Where several policies match a namespace, the highest priority applies; on a tie, the
    /// policy whose name sorts first.
    #[serde(default)]
    pub priority: i32,
    /// `inject` (as the namespace's webhook path says), `enforce` (always enforce) or `audit`
    /// (decide, warn and count, but change nothing).
    #[serde(default)]
    pub mode: PolicyMode,
    /// Where the defaults come from: `lightstep` (the default) or `otlp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exporter: Option<ExporterSpec>,
    /// The access-token Secret reference. `null` turns the token off (any profile).
    #[serde(
        default,
        deserialize_with = "explicit_null",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<TokenSpec>")]
    pub token: Option<Option<TokenSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<ContainersSpec>,
    /// Template for `OTEL_SERVICE_NAME`, e.g. `"{pipeline|task|taskRun}"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Values of `OTEL_PROPAGATORS`, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::policy::spec::propagators_schema)]
    pub propagators: Option<Vec<String>>,
    /// Extra static resource attributes, e.g. `deployment.environment.name: prod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_attributes: Option<BTreeMap<String, String>>,
    /// What to do with names that a container's `envFrom` source may define.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_from: Option<EnvFromPolicy>,
    /// Spans for the runs themselves (see the file policy's `runSpans`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_spans: Option<RunSpansSpec>,
    /// The runs' CICD metrics (see the file policy's `runMetrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_metrics: Option<RunMetricsSpec>,
}

/// How a TracingPolicy is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Inject, or enforce where the namespace uses the enforcing webhook (`/enforce`).
    #[default]
    Inject,
    /// Enforce the policy's exporter and token whichever webhook path is called.
    Enforce,
    /// Decide as `inject` would, but never patch nor deny: a warning and a metric only.
    Audit,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Inject => "inject",
            PolicyMode::Enforce => "enforce",
            PolicyMode::Audit => "audit",
        }
    }
}

/// What the webhook reports on each TracingPolicy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TracingPolicyStatus {
    /// `Valid`: whether the webhook can apply the policy, and if not, which field is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many namespaces the selector matches now (0 for an invalid policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_namespaces: Option<i64>,
}

/// A TracingPolicy that validated: everything admission needs, decided once.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub name: String,
    pub generation: i64,
    pub priority: i32,
    pub mode: PolicyMode,
    pub selector: NamespaceSelector,
    /// The resolved policy; its marker is `<name>@gen<generation>/<fingerprint>`.
    pub policy: Policy,
}

/// A TracingPolicy that did not validate, kept to report it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub name: String,
    pub generation: i64,
    pub error: Invalid,
}

/// Decodes a TracingPolicy from JSON, naming the path of the first problem
/// (`spec.exporter.endpont: unknown field ...`).
pub fn decode(value: serde_json::Value) -> Result<TracingPolicy, Invalid> {
    serde_path_to_error::deserialize::<_, TracingPolicy>(value).map_err(|e| {
        let path = e.path().to_string();
        Invalid {
            field: if path == "." { "object".into() } else { path },
            reason: e.into_inner().to_string(),
            kind: InvalidKind::Undecodable,
        }
    })
}

/// Validates a TracingPolicy and resolves its spec (see [`Policy::resolve`]).
pub fn resolve(tp: &TracingPolicy) -> Result<Resolved, Rejected> {
    let name = tp.metadata.name.clone().unwrap_or_default();
    let generation = tp.metadata.generation.unwrap_or(FIRST_GENERATION);
    let reject = |error: Invalid| Rejected {
        name: name.clone(),
        generation,
        error,
    };
    if name.is_empty() {
        return Err(reject(invalid("metadata.name", "must be set")));
    }
    let selector = NamespaceSelector::compile(tp.spec.namespace_selector.as_ref())
        .map_err(|e| reject(e.within("spec.namespaceSelector")))?;
    let spec = &tp.spec;
    let policy_spec = PolicySpec {
        name: Some(name.clone()),
        profile: spec.profile,
        exporter: spec.exporter.clone(),
        token: spec.token.clone(),
        sampling: spec.sampling.clone(),
        containers: spec.containers.clone(),
        service_name: spec.service_name.clone(),
        propagators: spec.propagators.clone(),
        resource_attributes: spec.resource_attributes.clone(),
        env_from: spec.env_from,
        run_spans: spec.run_spans.clone(),
        run_metrics: spec.run_metrics.clone(),
    };
    let policy = Policy::resolve(policy_spec).map_err(|e| {
        reject(match e {
            PolicyError::Invalid { field, reason } => invalid(format!("spec.{field}"), reason),
            PolicyError::Syntax(reason) => invalid("spec", reason),
        })
    })?;
    Ok(Resolved {
        name: name.clone(),
        generation,
        priority: spec.priority,
        mode: spec.mode,
        selector,
        policy: policy.with_generation(generation),
    })
}

/// Decodes and resolves an object as the watch delivers it. An object that does not decode is
/// rejected with the decoder's message rather than dropped, so its status can say why.
pub fn resolve_object(object: &DynamicObject) -> Result<Resolved, Rejected> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let generation = object.metadata.generation.unwrap_or(FIRST_GENERATION);
    // A DynamicObject is plain JSON: it always serializes.
    let value = serde_json::to_value(object).expect("object serializes");
    let tp = decode(value).map_err(|error| Rejected {
        name,
        generation,
        error,
    })?;
    resolve(&tp)
}

/// The status the webhook wants on a TracingPolicy, given its resolution and the labels of
/// every namespace. `previous` keeps `lastTransitionTime` while the condition's status stays the
/// same; `now` is used only when it changes, so the result is a pure function of its inputs.
pub fn desired_status<'a>(
    resolution: Result<&Resolved, &Rejected>,
    namespaces: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
    previous: Option<&TracingPolicyStatus>,
    now: &Time,
) -> TracingPolicyStatus {
    let (status, reason, message, generation, matched) = match resolution {
        Ok(r) => {
            let matched = namespaces
                .into_iter()
                .filter(|labels| r.selector.matches(labels))
                .count();
            (
                "True",
                "Resolved",
                format!("valid; selects {}", r.selector),
                r.generation,
                matched,
            )
        }
        Err(rejected) => (
            "False",
            rejected.error.kind.reason(),
            format!("never applied: {}", rejected.error),
            rejected.generation,
            0,
        ),
    };
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == CONDITION_VALID))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    TracingPolicyStatus {
        conditions: vec![Condition {
            type_: CONDITION_VALID.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: Some(generation),
            last_transition_time,
        }],
        matched_namespaces: Some(matched as i64),
    }
}

/// Whether a status must be written: anything but the transition times differs. Two replicas
/// compute the same status at different times; comparing times would make them overwrite each
/// other forever.
pub fn status_differs(
    current: Option<&TracingPolicyStatus>,
    desired: &TracingPolicyStatus,
) -> bool {
    let Some(current) = current else {
        return true;
    };
    let key = |s: &TracingPolicyStatus| {
        (
            s.matched_namespaces,
            s.conditions
                .iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        c.status.clone(),
                        c.reason.clone(),
                        c.message.clone(),
                        c.observed_generation,
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    key(current) != key(desired)
}

/// The CustomResourceDefinition, generated from the types above.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    TracingPolicy::crd()
}

/// The header of the generated YAML: says where it comes from, so nobody edits it by hand.
pub const CRD_HEADER: &str = "# Generated by `lightstep-tekton-webhook crd` from src/policy/resource.rs; do not edit.\n\
# Regenerate: make crd (writes charts/lightstep-tekton-webhook/crds/ and renders manifests/base)\n";

/// The CRD as the chart's `crds/crd-tracingpolicy.yaml` holds it.
pub fn crd_yaml() -> String {
    // The CRD is plain data: it always serializes.
    let body = serde_norway::to_string(&crd()).expect("CRD serializes");
    format!("{CRD_HEADER}{body}")
}
