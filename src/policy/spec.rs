//! The policy document as written: every field optional, camelCase, unknown fields refused.
//!
//! These types are the file policy's schema and, through `JsonSchema`, the `spec` of the
//! `TracingPolicy` custom resource ([`crate::policy::resource`]), so the two cannot drift apart.
//! Nothing here decides anything: [`crate::policy::resolve`] fills the gaps and validates.
//!
//! The `schemars` attributes put into the CRD's schema what the API server can check by itself
//! (ranges, enums, simple patterns, lengths), so a cluster whose webhook is down still refuses
//! the obvious mistakes. They are a subset of what `resolve` checks, with the same constants:
//! a value the schema accepts may still be refused by the webhook (a template field name, a
//! label key), never the other way round. No CEL (`x-kubernetes-validations`): the API
//! servers supported (1.22 on) do not all have it (beta and on by default from 1.25), a 1.22
//! kubectl refuses the unknown field, and every rule here is plain OpenAPI anyway.

/// Longest endpoint URL accepted: far beyond any collector address, within what HTTP stacks and
/// proxies accept in a request line (8 KiB is the common limit; the path is a fraction of it).
pub(crate) const URL_MAX: usize = 2048;
/// An absolute http(s) URL with a host, no whitespace: what `resolve` checks, but for control
/// characters and Unicode spaces (the API server's regular expressions are RE2).
pub(crate) const URL_PATTERN: &str = r"^https?://[^/\s]\S*$";
/// Kubernetes' longest object name and ConfigMap/Secret key (a DNS subdomain's length).
pub(crate) const NAME_MAX: usize = 253;
/// A Secret's name: a lowercase DNS subdomain.
pub(crate) const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Secret's key: letters, digits, `-`, `_`, `.`.
pub(crate) const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// An HTTP header name: RFC 9110's token characters.
pub(crate) const HEADER_PATTERN: &str = r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$";

/// Propagator names the OpenTelemetry SDKs understand in `OTEL_PROPAGATORS`.
pub(crate) const KNOWN_PROPAGATORS: &[&str] = &[
    "tracecontext",
    "baggage",
    "b3",
    "b3multi",
    "jaeger",
    "xray",
    "ottrace",
    "none",
];

/// The schema of `propagators`: at least one, each a known name.
pub(crate) fn propagators_schema(schema: &mut schemars::Schema) {
    schema.insert("minItems".into(), 1.into());
    if let Some(items) = schema.get_mut("items").and_then(|i| i.as_object_mut()) {
        items.insert("enum".into(), KNOWN_PROPAGATORS.into());
    }
}

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The policy document as written: every field optional, unknown fields refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Recorded in the pod's `lightstep-tekton.io/injected` annotation.
    pub name: Option<String>,
    /// Where the defaults come from: `lightstep` (the default) or `otlp`.
    pub profile: Option<Profile>,
    pub exporter: Option<ExporterSpec>,
    /// The access-token Secret reference. `null` turns the token off (any profile).
    #[serde(default, deserialize_with = "explicit_null")]
    pub token: Option<Option<TokenSpec>>,
    pub sampling: Option<SamplingSpec>,
    pub containers: Option<ContainersSpec>,
    /// Template for `OTEL_SERVICE_NAME`, e.g. `"{pipeline|task|taskRun}"`.
    pub service_name: Option<String>,
    /// Values of `OTEL_PROPAGATORS`, in order.
    pub propagators: Option<Vec<String>>,
    /// Extra static resource attributes, e.g. `deployment.environment.name: prod`.
    pub resource_attributes: Option<BTreeMap<String, String>>,
    /// What to do with names that a container's `envFrom` source may define.
    pub env_from: Option<EnvFromPolicy>,
    /// Spans for the runs themselves, exported by `lightstep-tekton-webhook export`.
    pub run_spans: Option<RunSpansSpec>,
    /// The CICD metrics of the runs, sent with their spans by `lightstep-tekton-webhook export`.
    pub run_metrics: Option<RunMetricsSpec>,
}

/// Keeps `token: null` apart from a missing `token` key.
pub(crate) fn explicit_null<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExporterSpec {
    /// The OTLP endpoint: an absolute http(s) URL; `$(VAR)` references are expanded by
    /// Kubernetes from the container's env (say `http://$(HOST_IP):4317`).
    #[schemars(length(max = URL_MAX), pattern(URL_PATTERN))]
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    /// A full URL for traces (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), for backends whose trace
    /// path is not `/v1/traces`.
    #[schemars(length(max = URL_MAX), pattern(URL_PATTERN))]
    pub traces_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSpec {
    /// The Secret, in the pod's namespace, that holds the token.
    #[schemars(length(max = NAME_MAX), pattern(SECRET_NAME_PATTERN))]
    pub secret_name: Option<String>,
    /// The key of that Secret.
    #[schemars(length(max = NAME_MAX), pattern(SECRET_KEY_PATTERN))]
    pub secret_key: Option<String>,
    /// The OTLP header that carries the token.
    #[schemars(pattern(HEADER_PATTERN))]
    pub header: Option<String>,
}

/// The `runSpans` section: see `docs/run-spans.md`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunSpansSpec {
    /// Export this namespace's PipelineRuns and TaskRuns as spans, and give each step its own
    /// span as parent. Default false: turn it on where the run-span exporter runs.
    pub enabled: Option<bool>,
    /// Link to a run's trace, annotated on the run once exported; fields `{traceId}`,
    /// `{namespace}`, `{pipelineRun}`, `{taskRun}`, ...
    pub trace_url: Option<String>,
    /// `cicd.pipeline.run.url.full` of a PipelineRun's span, e.g. a Tekton Dashboard page.
    pub pipeline_run_url: Option<String>,
    /// `cicd.pipeline.task.run.url.full` of each TaskRun attempt's span.
    pub task_run_url: Option<String>,
    /// Which tasks deploy: they carry `cicd.pipeline.task.type: deploy` and `deployment.*`.
    pub deploy: Option<DeploySpec>,
}

/// The `runMetrics` section: see `docs/policy.md`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunMetricsSpec {
    /// Send this namespace's finished runs' CICD metrics (`cicd.pipeline.run.duration`,
    /// `cicd.pipeline.run.errors`, the task duration) with their spans. Default false; the runs
    /// are exported only where `runSpans.enabled` is true too.
    pub enabled: Option<bool>,
}

/// Which tasks are deploys, and to where.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploySpec {
    /// Pipeline task names (`tekton.dev/pipelineTask`) that deploy.
    pub tasks: Option<Vec<String>>,
    /// TaskRun labels that mark a deploy; default `app.kubernetes.io/component: deploy`.
    pub labels: Option<BTreeMap<String, String>>,
    /// `deployment.environment.name`; default the policy's resource attribute of that name.
    pub environment: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SamplingSpec {
    /// The share of runs sampled, from 0 to 1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainersSpec {
    /// Inject into `sidecar-*` containers too.
    pub sidecars: Option<bool>,
    /// Container names (`step-…`, `sidecar-…`) never to touch.
    #[schemars(inner(length(min = 1)))]
    pub exclude: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Lightstep ingest over gRPC with the `lightstep-access-token` Secret.
    #[default]
    Lightstep,
    /// Any OTLP endpoint (say, an in-cluster collector); no token unless one is given.
    Otlp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    // The variants carry doc comments so the CRD schema gets a plain enum of strings (kube's
    // schema rewriter hoists documented variants; undocumented ones leave a `null` in `enum`).
    /// OTLP over gRPC.
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP over HTTP with JSON bodies.
    #[serde(rename = "http/json")]
    HttpJson,
}

impl Protocol {
    /// The value of `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::HttpJson => "http/json",
        }
    }
}

/// How to treat a name that an `envFrom` source (ConfigMap or Secret) of the container may define.
/// Kubernetes lets `env` win over `envFrom`, so injecting such a name would silently override the
/// user's value; the webhook cannot read the source at admission time to find out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EnvFromPolicy {
    /// Leave every setting an `envFrom` source could define to that source; only the per-run
    /// trace context (`TRACEPARENT`, `TRACESTATE`) is still injected.
    #[default]
    Preserve,
    /// Inject anyway: the policy's values win over `envFrom` sources.
    Override,
}
