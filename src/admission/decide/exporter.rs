//! The exporter group: the variables that say where and how a step exports, and the Lightstep
//! token that must only ever travel with the policy's own endpoint.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use serde_json::Value;

use super::env::{Desired, Group};
use super::literal;
use crate::policy::{Policy, Protocol, Token as TokenRef};

pub(super) const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub(super) const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub(super) const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub(super) const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub(super) const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
pub(super) const OTEL_EXPORTER_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
pub(super) const LS_ACCESS_TOKEN: &str = "LS_ACCESS_TOKEN";

/// Variables that configure where and how a step exports. A step that sets any of them has
/// configured its exporter itself.
pub(super) const EXPORTER_GROUP: &[&str] = &[
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_OTLP_HEADERS,
    OTEL_EXPORTER_OTLP_TRACES_HEADERS,
];

/// The exporter group's desired variables (appended to `desired`), and the signal-specific
/// values enforce mode writes over a step's own.
pub(super) fn exporter(policy: &Policy, desired: &mut Vec<Desired>) -> Vec<(&'static str, Value)> {
    let exporter = &policy.exporter;
    let group = Group::Exporter;
    desired.push(Desired::literal(
        OTEL_EXPORTER_OTLP_ENDPOINT,
        &exporter.endpoint,
        group,
    ));
    if let Some(traces) = &exporter.traces_endpoint {
        desired.push(Desired::literal(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
            traces,
            group,
        ));
    }
    let protocol = exporter.protocol.as_str();
    desired.push(Desired::literal(
        OTEL_EXPORTER_OTLP_PROTOCOL,
        protocol,
        group,
    ));

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
        let name = OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
        governed_extra.push((name, literal(name, &traces)));
    }
    let name = OTEL_EXPORTER_OTLP_TRACES_PROTOCOL;
    governed_extra.push((name, literal(name, protocol)));
    if let Some(token) = &policy.token {
        desired.push(Desired {
            name: LS_ACCESS_TOKEN,
            value: token_var(token),
            group,
        });
        let headers = format!("{}=$({LS_ACCESS_TOKEN})", token.header);
        desired.push(Desired::literal(
            OTEL_EXPORTER_OTLP_HEADERS,
            &headers,
            group,
        ));
        let name = OTEL_EXPORTER_OTLP_TRACES_HEADERS;
        governed_extra.push((name, literal(name, &headers)));
    }
    governed_extra
}

/// `LS_ACCESS_TOKEN` from the policy's Secret reference (optional: a missing Secret must not
/// stop the step).
fn token_var(token: &TokenRef) -> Value {
    serde_json::to_value(EnvVar {
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
    .expect("EnvVar serializes")
}
