//! What to inject: the tracing policy, its YAML schema, the embedded default and validation.
//!
//! A policy is written as a [`PolicySpec`] (every field optional, camelCase YAML) and resolved
//! against a *profile* into a [`Policy`], a plain value with every field decided. The split keeps
//! the document short for the common cases (`profile: lightstep` with nothing else, or
//! `profile: otlp` with an endpoint) and lets the same spec later arrive as a custom resource.
//!
//! Validation happens once, at load; errors name the field (`exporter.protocol: ...`), so a
//! platform team can fix a policy without reading this code. Everything here is pure.
//!
//! The parts of the spec also derive `JsonSchema`: the `TracingPolicy` custom resource
//! ([`crate::policy::resource`]) embeds them, so the file and the resource cannot drift apart.

pub mod resource;
pub mod selection;

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The policy used when no `--policy` file is given: the Lightstep profile, all defaults.
pub const DEFAULT_POLICY_YAML: &str = include_str!("default-policy.yaml");

/// Placeholders a `serviceName` template may use, each naming a fact read off the pod.
pub const TEMPLATE_FIELDS: &[&str] = &[
    "pipeline",
    "pipelineRun",
    "pipelineTask",
    "task",
    "taskRun",
    "namespace",
];

/// Propagator names the OpenTelemetry SDKs understand in `OTEL_PROPAGATORS`.
const KNOWN_PROPAGATORS: &[&str] = &[
    "tracecontext",
    "baggage",
    "b3",
    "b3multi",
    "jaeger",
    "xray",
    "ottrace",
    "none",
];

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

/// A parsed `serviceName` template: literal text and `{a|b|c}` placeholders, where the first
/// field that is known on the pod is used.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceNameTemplate {
    source: String,
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TemplatePart {
    Literal(String),
    /// Alternatives, each one of [`TEMPLATE_FIELDS`].
    Field(Vec<&'static str>),
}

impl ServiceNameTemplate {
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {source:?}"))?;
            let inner = &after[..close];
            let mut fields = Vec::new();
            for name in inner.split('|') {
                let name = name.trim();
                let known = TEMPLATE_FIELDS
                    .iter()
                    .find(|f| **f == name)
                    .ok_or_else(|| {
                        format!(
                            "unknown placeholder {{{name}}}; use one of {}",
                            TEMPLATE_FIELDS.join(", ")
                        )
                    })?;
                fields.push(*known);
            }
            parts.push(TemplatePart::Field(fields));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in {source:?}"));
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("must not be empty".to_owned());
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Serialize for ServiceNameTemplate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

/// Why a policy was refused. The message names the field to fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("{0}")]
    Syntax(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Policy {
    /// The embedded default policy (the Lightstep profile).
    pub fn embedded_default() -> Policy {
        // The embedded document is part of the binary and covered by tests; it cannot fail.
        Policy::from_yaml(DEFAULT_POLICY_YAML).expect("embedded default policy is valid")
    }

    /// Parses and validates a policy document (YAML or JSON).
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        let deserializer = serde_norway::Deserializer::from_str(text);
        let spec: Option<PolicySpec> =
            serde_path_to_error::deserialize(deserializer).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                // serde_norway names the path itself in most messages; add it where it does not.
                if path == "." || path.is_empty() || inner.starts_with(&path) {
                    PolicyError::Syntax(inner)
                } else {
                    PolicyError::Syntax(format!("{path}: {inner}"))
                }
            })?;
        Policy::resolve(spec.unwrap_or_default())
    }

    /// Fills a spec's gaps from its profile and validates every field.
    pub fn resolve(spec: PolicySpec) -> Result<Policy, PolicyError> {
        let profile = spec.profile.unwrap_or_default();
        let exporter_spec = spec.exporter.unwrap_or_default();

        let (default_endpoint, default_token) = match profile {
            Profile::Lightstep => (
                Some("https://ingest.lightstep.com:443"),
                Some(TokenSpec::default()),
            ),
            Profile::Otlp => (None, None),
        };
        let endpoint = match (exporter_spec.endpoint, default_endpoint) {
            (Some(e), _) => e,
            (None, Some(d)) => d.to_owned(),
            (None, None) => {
                return Err(invalid(
                    "exporter.endpoint",
                    "required with profile otlp (e.g. http://otel-collector.observability:4317)",
                ));
            }
        };
        validate_url("exporter.endpoint", &endpoint)?;
        if let Some(traces) = &exporter_spec.traces_endpoint {
            validate_url("exporter.tracesEndpoint", traces)?;
        }
        let exporter = Exporter {
            endpoint,
            protocol: exporter_spec.protocol.unwrap_or(Protocol::Grpc),
            traces_endpoint: exporter_spec.traces_endpoint,
        };

        let token_spec = match spec.token {
            Some(explicit) => explicit,
            None => default_token,
        };
        let token = token_spec
            .map(|t| -> Result<Token, PolicyError> {
                let token = Token {
                    secret_name: t
                        .secret_name
                        .unwrap_or_else(|| "lightstep-access-token".to_owned()),
                    secret_key: t.secret_key.unwrap_or_else(|| "access-token".to_owned()),
                    header: t
                        .header
                        .unwrap_or_else(|| "lightstep-access-token".to_owned()),
                };
                if !is_dns_subdomain(&token.secret_name) {
                    return Err(invalid(
                        "token.secretName",
                        format!(
                            "{:?} is not a valid Secret name (lowercase DNS subdomain)",
                            token.secret_name
                        ),
                    ));
                }
                if !is_config_map_key(&token.secret_key) {
                    return Err(invalid(
                        "token.secretKey",
                        format!(
                            "{:?} is not a valid Secret key (letters, digits, '-', '_', '.')",
                            token.secret_key
                        ),
                    ));
                }
                if !is_http_token(&token.header) {
                    return Err(invalid(
                        "token.header",
                        format!("{:?} is not a valid HTTP header name", token.header),
                    ));
                }
                Ok(token)
            })
            .transpose()?;

        let sampling_ratio = spec.sampling.and_then(|s| s.ratio).unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sampling_ratio) {
            return Err(invalid(
                "sampling.ratio",
                format!("must be between 0 and 1, got {sampling_ratio}"),
            ));
        }

        let containers = spec.containers.unwrap_or_default();
        let exclude = containers.exclude.unwrap_or_default();
        if let Some(bad) = exclude.iter().find(|n| n.is_empty()) {
            return Err(invalid("containers.exclude", format!("empty name {bad:?}")));
        }

        let service_name = ServiceNameTemplate::parse(
            spec.service_name
                .as_deref()
                .unwrap_or("{pipeline|task|taskRun}"),
        )
        .map_err(|reason| invalid("serviceName", reason))?;

        let propagators = spec
            .propagators
            .unwrap_or_else(|| vec!["tracecontext".to_owned(), "baggage".to_owned()]);
        if propagators.is_empty() {
            return Err(invalid("propagators", "must list at least one propagator"));
        }
        if let Some(bad) = propagators
            .iter()
            .find(|p| !KNOWN_PROPAGATORS.contains(&p.as_str()))
        {
            return Err(invalid(
                "propagators",
                format!(
                    "unknown propagator {bad:?}; use {}",
                    KNOWN_PROPAGATORS.join(", ")
                ),
            ));
        }

        let resource_attributes = spec.resource_attributes.unwrap_or_default();
        if let Some(bad) = resource_attributes.keys().find(|k| !is_attribute_key(k)) {
            return Err(invalid(
                "resourceAttributes",
                format!(
                    "{bad:?} is not a usable attribute key (printable ASCII without ',', '=', '%' or spaces)"
                ),
            ));
        }

        let name = spec.name.unwrap_or_else(|| match profile {
            Profile::Lightstep => "lightstep-default".to_owned(),
            Profile::Otlp => "otlp-default".to_owned(),
        });
        if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
            return Err(invalid("name", "must be 1 to 253 printable characters"));
        }

        let mut policy = Policy {
            name,
            exporter,
            token,
            sampling_ratio,
            sidecars: containers.sidecars.unwrap_or(false),
            exclude,
            service_name,
            propagators: propagators.join(","),
            resource_attributes,
            env_from: spec.env_from.unwrap_or_default(),
            marker: String::new(),
        };
        policy.marker = format!("{}@{}", policy.name, policy.fingerprint());
        Ok(policy)
    }

    /// A short, stable digest of the resolved policy: two policies with the same fingerprint
    /// inject the same thing. Recorded on the pod so a reinvocation can tell its own work.
    pub fn fingerprint(&self) -> String {
        // Serializing a plain struct of strings, numbers and maps cannot fail.
        let canonical = serde_json::to_vec(self).expect("policy serializes");
        let digest = Sha256::digest(&canonical);
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

/// An endpoint must be an absolute http(s) URL. `$(VAR)` references are allowed (Kubernetes
/// expands them from the container's env, e.g. a node-local collector at `$(HOST_IP)`).
fn validate_url(field: &'static str, url: &str) -> Result<(), PolicyError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            invalid(
                field,
                format!("{url:?} must start with http:// or https://"),
            )
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid(field, format!("{url:?} has no host")));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(field, format!("{url:?} contains whitespace")));
    }
    Ok(())
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_config_map_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn is_attribute_key(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'=' | b'%'))
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
    fn empty_document_is_the_default() {
        assert_eq!(
            Policy::from_yaml("").unwrap(),
            Policy::from_yaml("profile: lightstep").unwrap()
        );
    }

    #[test]
    fn otlp_profile_needs_only_an_endpoint_and_has_no_token() {
        let p = Policy::from_yaml(
            "profile: otlp\nexporter:\n  endpoint: http://otel-collector.observability:4317\n",
        )
        .unwrap();
        assert!(p.token.is_none());
        assert_eq!(
            p.exporter.endpoint,
            "http://otel-collector.observability:4317"
        );
        assert_eq!(p.name, "otlp-default");

        let err = Policy::from_yaml("profile: otlp").unwrap_err();
        assert!(err.to_string().contains("exporter.endpoint"), "{err}");
    }

    #[test]
    fn token_null_turns_the_token_off() {
        let p = Policy::from_yaml("token: null").unwrap();
        assert!(p.token.is_none());
        let p = Policy::from_yaml("token: {secretName: ls}").unwrap();
        assert_eq!(p.token.unwrap().secret_name, "ls");
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            ("exporter:\n  protocol: grpcc\n", "exporter.protocol"),
            ("sampling:\n  ratio: 1.5\n", "sampling.ratio"),
            ("sampling:\n  ratio: -0.1\n", "sampling.ratio"),
            (
                "exporter:\n  endpoint: ingest.lightstep.com\n",
                "exporter.endpoint",
            ),
            ("token:\n  secretName: Not_Valid\n", "token.secretName"),
            ("token:\n  secretKey: 'a b'\n", "token.secretKey"),
            ("token:\n  header: 'x y'\n", "token.header"),
            ("serviceName: '{pipelin}'\n", "serviceName"),
            ("serviceName: '{pipeline'\n", "serviceName"),
            ("propagators: [tracecontext, b4]\n", "propagators"),
            ("propagators: []\n", "propagators"),
            ("resourceAttributes:\n  'a,b': x\n", "resourceAttributes"),
            ("containers:\n  sidecar: true\n", "containers"),
            ("envFrom: ignore\n", "envFrom"),
            ("bogus: 1\n", "bogus"),
        ];
        for (doc, field) in cases {
            let err = Policy::from_yaml(doc).expect_err(doc).to_string();
            assert!(
                err.contains(field),
                "{doc:?} gave {err:?}, expected {field}"
            );
        }
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

    #[test]
    fn template_parses_alternatives_and_literals() {
        let t = ServiceNameTemplate::parse("ci-{pipeline|task}").unwrap();
        assert_eq!(
            t.parts(),
            &[
                TemplatePart::Literal("ci-".into()),
                TemplatePart::Field(vec!["pipeline", "task"])
            ]
        );
        assert!(ServiceNameTemplate::parse("").is_err());
        assert!(ServiceNameTemplate::parse("a}").is_err());
    }
}
