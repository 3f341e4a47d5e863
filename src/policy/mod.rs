//! What to inject: the tracing policy, its YAML schema, the embedded default and validation.
//!
//! A policy is written as a [`PolicySpec`] (every field optional, camelCase YAML; `spec`) and
//! resolved against a *profile* into a [`Policy`] (`resolve`), a plain value with every field
//! decided. The split keeps the document short for the common cases (`profile: lightstep` with
//! nothing else, or `profile: otlp` with an endpoint) and lets the same spec arrive as a custom
//! resource ([`resource`]); [`selection`] chooses among those for a namespace.
//!
//! Validation happens once, at load; errors name the field (`exporter.protocol: ...`), so a
//! platform team can fix a policy without reading this code. Everything here is pure but
//! [`loader`], the one place that reads policy files (for `serve` and the `mutate` preview).

mod invalid;
mod namespace_selector;
mod resolve;
mod spec;
mod template;

pub mod args;
pub mod loader;
pub mod resource;
pub mod run_spans;
pub mod selection;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::contract::ContextRule;
use run_spans::RunSpans;

pub use resolve::PolicyError;
pub(crate) use spec::explicit_null;
pub use spec::{
    ContainersSpec, DeploySpec, EnvFromPolicy, ExporterSpec, PolicySpec, Profile, Protocol,
    RunMetricsSpec, RunSpansSpec, SamplingSpec, TokenSpec,
};
pub use template::{ServiceNameTemplate, TEMPLATE_FIELDS, TemplatePart};

/// The policy used when no `--policy` file is given: the Lightstep profile, all defaults.
pub const DEFAULT_POLICY_YAML: &str = include_str!("default-policy.yaml");

/// A resolved policy: every decision made, validated, ready to apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub exporter: Exporter,
    pub token: Option<Token>,
    pub sampling_ratio: f64,
    pub sidecars: bool,
    pub exclude: Vec<String>,
    pub service_name: ServiceNameTemplate,
    pub propagators: String,
    pub resource_attributes: BTreeMap<String, String>,
    pub env_from: EnvFromPolicy,
    /// Left out of the fingerprint while it holds the defaults, so policies written before run
    /// spans existed keep their markers (and pods their patches) byte for byte.
    #[serde(skip_serializing_if = "RunSpans::is_default")]
    pub run_spans: RunSpans,
    /// Whether the exporter sends the runs' CICD metrics with their spans (`runMetrics.enabled`).
    /// Out of the fingerprint while off, as `run_spans`: it changes no pod.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub run_metrics: bool,
    /// `<name>@<fingerprint>` (`<name>@gen<generation>/<fingerprint>` for a TracingPolicy),
    /// computed once at resolve time: it is read on every admission.
    #[serde(skip)]
    marker: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Exporter {
    pub endpoint: String,
    pub protocol: Protocol,
    pub traces_endpoint: Option<String>,
}

/// A reference to the Secret key that holds the access token. Never the token itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub secret_name: String,
    pub secret_key: String,
    pub header: String,
}

impl Policy {
    /// Appends the policy's `resourceAttributes` whose keys `attributes` does not set yet, each
    /// value through `value` (the webhook percent-encodes; the run spans keep it raw): the one
    /// rule both the steps' `OTEL_RESOURCE_ATTRIBUTES` and the run spans' resource follow.
    pub fn add_resource_attributes(
        &self,
        attributes: &mut Vec<(String, String)>,
        value: impl Fn(&str) -> String,
    ) {
        for (key, v) in &self.resource_attributes {
            if !attributes.iter().any(|(k, _)| k == key) {
                attributes.push((key.clone(), value(v)));
            }
        }
    }

    /// Which version of the trace-context rule pods and runs under this policy follow: with run
    /// spans on every id is derived (context rule v2, one trace per PipelineRun, which the
    /// exporter's spans share); with them off, Tekton's span context wins when valid (v1).
    pub fn context_rule(&self) -> ContextRule {
        if self.run_spans.enabled {
            ContextRule::Derived
        } else {
            ContextRule::FollowTekton
        }
    }

    /// The embedded default policy (the Lightstep profile).
    pub fn embedded_default() -> Policy {
        // The embedded document is part of the binary and covered by tests; it cannot fail.
        Policy::from_yaml(DEFAULT_POLICY_YAML).expect("embedded default policy is valid")
    }

    /// Parses and validates a policy document (YAML or JSON).
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        resolve::from_yaml(text)
    }

    /// Fills a spec's gaps from its profile and validates every field.
    pub fn resolve(spec: PolicySpec) -> Result<Policy, PolicyError> {
        resolve::resolve(spec)
    }

    /// A short, stable digest of the resolved policy: two policies with the same fingerprint
    /// inject the same thing. Recorded on the pod so a reinvocation can tell its own work.
    pub fn fingerprint(&self) -> String {
        // Serializing a plain struct of strings, numbers and maps cannot fail.
        let canonical = serde_json::to_vec(self).expect("policy serializes");
        let digest = Sha256::digest(&canonical);
        // 8 bytes (16 hex digits): enough to tell policies apart, short enough for an annotation.
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The value of the `lightstep-tekton.io/injected` marker annotation.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Marks the policy as generation `generation` of the TracingPolicy of its name: the marker
    /// becomes `<name>@gen<generation>/<fingerprint>`, so a pod tells which version of which
    /// resource injected it (a file policy has no generation and keeps `<name>@<fingerprint>`).
    pub fn with_generation(mut self, generation: i64) -> Policy {
        self.marker = format!("{}@gen{generation}/{}", self.name, self.fingerprint());
        self
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} {}",
            self.name,
            self.exporter.protocol.as_str(),
            self.exporter.endpoint
        )?;
        match &self.token {
            Some(t) => write!(f, ", token from secret {}/{}", t.secret_name, t.secret_key)?,
            None => write!(f, ", no token")?,
        }
        write!(f, ", sampling {})", self.sampling_ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_the_lightstep_profile() {
        let p = Policy::embedded_default();
        assert_eq!(p.exporter.endpoint, "https://ingest.lightstep.com:443");
        assert_eq!(p.exporter.protocol, Protocol::Grpc);
        let t = p.token.as_ref().expect("token");
        assert_eq!(t.secret_name, "lightstep-access-token");
        assert_eq!(t.secret_key, "access-token");
        assert_eq!(p.sampling_ratio, 1.0);
        assert!(!p.sidecars);
        assert_eq!(p.propagators, "tracecontext,baggage");
        assert_eq!(p.service_name.as_str(), "{pipeline|task|taskRun}");
    }

    #[test]
    fn fingerprint_changes_with_the_policy() {
        let a = Policy::embedded_default();
        let b = Policy::from_yaml("sampling: {ratio: 0.5}").unwrap();
        assert_eq!(a.fingerprint(), Policy::embedded_default().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        assert!(a.marker().starts_with("lightstep-default@"));
    }
}
