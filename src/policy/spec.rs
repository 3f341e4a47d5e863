//! The policy document as written: every field optional, camelCase, unknown fields refused.
//!
//! These types are the file policy's schema and, through `JsonSchema`, the `spec` of the
//! `TracingPolicy` custom resource ([`crate::policy::resource`]), so the two cannot drift apart.
//! Nothing here decides anything: [`crate::policy::resolve`] fills the gaps and validates.

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
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    /// A full URL for traces (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), for backends whose trace
    /// path is not `/v1/traces`.
    pub traces_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSpec {
    pub secret_name: Option<String>,
    pub secret_key: Option<String>,
    /// The OTLP header that carries the token.
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
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainersSpec {
    /// Inject into `sidecar-*` containers too.
    pub sidecars: Option<bool>,
    /// Container names (`step-…`, `sidecar-…`) never to touch.
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
