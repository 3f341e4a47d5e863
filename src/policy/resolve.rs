//! Validation: a [`PolicySpec`] with its gaps filled from its profile, every field checked, into
//! a [`Policy`].
//!
//! One resolver per section of the document, called in document order, so the first error a
//! platform team sees is the first bad field they wrote. Every error names the field
//! (`exporter.protocol: ...`) and what was expected.

use std::collections::BTreeMap;

use crate::policy::run_spans::{RunSpans, UrlTemplate};
use crate::policy::spec::{
    ContainersSpec, ExporterSpec, KNOWN_PROPAGATORS, NAME_MAX, PolicySpec, Profile, Protocol,
    RunSpansSpec, SamplingSpec, TokenSpec, URL_MAX,
};
use crate::policy::template::ServiceNameTemplate;
use crate::policy::{Exporter, Policy, Token};

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

/// Parses and validates a policy document (YAML or JSON).
pub(super) fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    let spec: Option<PolicySpec> = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_norway names the path itself in most messages; add it where it does not.
        if path == "." || path.is_empty() || inner.starts_with(&path) {
            PolicyError::Syntax(inner)
        } else {
            PolicyError::Syntax(format!("{path}: {inner}"))
        }
    })?;
    resolve(spec.unwrap_or_default())
}

/// Fills a spec's gaps from its profile and validates every field.
pub(super) fn resolve(spec: PolicySpec) -> Result<Policy, PolicyError> {
    let profile = spec.profile.unwrap_or_default();
    let exporter = exporter(profile, spec.exporter.unwrap_or_default())?;
    let token = token(profile, spec.token)?;
    let sampling_ratio = sampling_ratio(spec.sampling)?;
    let containers = spec.containers.unwrap_or_default();
    let exclude = exclude(&containers)?;
    let service_name = service_name(spec.service_name.as_deref())?;
    let propagators = propagators(spec.propagators)?;
    let resource_attributes = resource_attributes(spec.resource_attributes)?;
    let run_spans = run_spans(spec.run_spans.unwrap_or_default())?;
    let name = name(profile, spec.name)?;
    let mut policy = Policy {
        name,
        exporter,
        token,
        sampling_ratio,
        sidecars: containers.sidecars.unwrap_or(false),
        exclude,
        service_name,
        propagators,
        resource_attributes,
        env_from: spec.env_from.unwrap_or_default(),
        run_spans,
        run_metrics: spec.run_metrics.and_then(|m| m.enabled).unwrap_or(false),
        marker: String::new(),
    };
    policy.marker = format!("{}@{}", policy.name, policy.fingerprint());
    Ok(policy)
}

fn run_spans(spec: RunSpansSpec) -> Result<RunSpans, PolicyError> {
    let url = |field: &'static str, template: Option<String>| {
        template
            .map(|t| UrlTemplate::parse(&t).map_err(|reason| invalid(field, reason)))
            .transpose()
    };
    let defaults = RunSpans::default();
    let deploy = spec.deploy.unwrap_or_default();
    let deploy_labels = match deploy.labels {
        Some(labels) => labels.into_iter().collect(),
        None => defaults.deploy_labels,
    };
    Ok(RunSpans {
        enabled: spec.enabled.unwrap_or(defaults.enabled),
        trace_url: url("runSpans.traceUrl", spec.trace_url)?,
        pipeline_run_url: url("runSpans.pipelineRunUrl", spec.pipeline_run_url)?,
        task_run_url: url("runSpans.taskRunUrl", spec.task_run_url)?,
        deploy_tasks: deploy.tasks.unwrap_or_default(),
        deploy_labels,
        deploy_environment: deploy.environment,
    })
}

fn exporter(profile: Profile, spec: ExporterSpec) -> Result<Exporter, PolicyError> {
    let endpoint = match (spec.endpoint, profile) {
        (Some(e), _) => e,
        (None, Profile::Lightstep) => "https://ingest.lightstep.com:443".to_owned(),
        (None, Profile::Otlp) => {
            return Err(invalid(
                "exporter.endpoint",
                "required with profile otlp (e.g. http://otel-collector.observability:4317)",
            ));
        }
    };
    validate_url("exporter.endpoint", &endpoint)?;
    if let Some(traces) = &spec.traces_endpoint {
        validate_url("exporter.tracesEndpoint", traces)?;
    }
    Ok(Exporter {
        endpoint,
        protocol: spec.protocol.unwrap_or(Protocol::Grpc),
        traces_endpoint: spec.traces_endpoint,
    })
}

/// `token: null` turns the token off; a missing `token` takes the profile's default (a
/// reference to the `lightstep-access-token` Secret for Lightstep, none for OTLP).
fn token(profile: Profile, spec: Option<Option<TokenSpec>>) -> Result<Option<Token>, PolicyError> {
    let spec = spec.unwrap_or_else(|| match profile {
        Profile::Lightstep => Some(TokenSpec::default()),
        Profile::Otlp => None,
    });
    let Some(spec) = spec else {
        return Ok(None);
    };
    let token = Token {
        secret_name: spec
            .secret_name
            .unwrap_or_else(|| "lightstep-access-token".to_owned()),
        secret_key: spec.secret_key.unwrap_or_else(|| "access-token".to_owned()),
        header: spec
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
    Ok(Some(token))
}

fn sampling_ratio(spec: Option<SamplingSpec>) -> Result<f64, PolicyError> {
    let ratio = spec.and_then(|s| s.ratio).unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(invalid(
            "sampling.ratio",
            format!("must be between 0 and 1, got {ratio}"),
        ));
    }
    Ok(ratio)
}

fn exclude(spec: &ContainersSpec) -> Result<Vec<String>, PolicyError> {
    let exclude = spec.exclude.clone().unwrap_or_default();
    if let Some(bad) = exclude.iter().find(|n| n.is_empty()) {
        return Err(invalid("containers.exclude", format!("empty name {bad:?}")));
    }
    Ok(exclude)
}

fn service_name(spec: Option<&str>) -> Result<ServiceNameTemplate, PolicyError> {
    ServiceNameTemplate::parse(spec.unwrap_or("{pipeline|task|taskRun}"))
        .map_err(|reason| invalid("serviceName", reason))
}

/// The value of `OTEL_PROPAGATORS`: the names, in order, comma-separated.
fn propagators(spec: Option<Vec<String>>) -> Result<String, PolicyError> {
    let propagators = spec.unwrap_or_else(|| vec!["tracecontext".to_owned(), "baggage".to_owned()]);
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
    Ok(propagators.join(","))
}

fn resource_attributes(
    spec: Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, PolicyError> {
    let attributes = spec.unwrap_or_default();
    if let Some(bad) = attributes.keys().find(|k| !is_attribute_key(k)) {
        return Err(invalid(
            "resourceAttributes",
            format!(
                "{bad:?} is not a usable attribute key (printable ASCII without ',', '=', '%' or spaces)"
            ),
        ));
    }
    Ok(attributes)
}

fn name(profile: Profile, spec: Option<String>) -> Result<String, PolicyError> {
    let name = spec.unwrap_or_else(|| match profile {
        Profile::Lightstep => "lightstep-default".to_owned(),
        Profile::Otlp => "otlp-default".to_owned(),
    });
    // 253: the longest Kubernetes object name, so a policy name always fits where names go.
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return Err(invalid("name", "must be 1 to 253 printable characters"));
    }
    Ok(name)
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
    if url.len() > URL_MAX {
        return Err(invalid(
            field,
            format!("longer than {URL_MAX} bytes ({})", url.len()),
        ));
    }
    Ok(())
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= NAME_MAX
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
        && s.len() <= NAME_MAX
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
    use crate::policy::Policy;

    #[test]
    fn run_metrics_are_off_by_default_and_out_of_the_fingerprint_while_off() {
        let default = Policy::from_yaml("").unwrap();
        assert!(!default.run_metrics);
        let off = Policy::from_yaml("runMetrics: {enabled: false}").unwrap();
        assert_eq!(off.marker(), default.marker());
        let on = Policy::from_yaml("runMetrics: {enabled: true}").unwrap();
        assert!(on.run_metrics);
        assert!(Policy::from_yaml("runMetrics: {enabld: true}").is_err());
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
}
