//! The exporter group: the variables that say where and how a step exports, and the Lightstep
//! token that must only ever travel with the policy's own endpoint.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use serde_json::Value;

use super::desired::{Desired, Group};
use super::literal;
use crate::policy::{Policy, Protocol, Token as TokenRef};

pub(super) const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub(super) const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub(super) const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
pub(super) const LS_ACCESS_TOKEN: &str = "LS_ACCESS_TOKEN";

/// One signal's own exporter variables, which the OTLP exporters prefer over the generic ones.
struct Signal {
    /// The path an HTTP exporter appends to the generic endpoint for this signal.
    path: &'static str,
    endpoint: &'static str,
    protocol: &'static str,
    headers: &'static str,
}

const TRACES: Signal = Signal {
    path: "v1/traces",
    endpoint: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    protocol: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    headers: "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
};

/// Every signal the OTLP exporter specification configures: a step that sends metrics or logs
/// elsewhere would otherwise get the token in the shared headers, which apply to all signals.
const SIGNALS: [Signal; 3] = [
    TRACES,
    Signal {
        path: "v1/metrics",
        endpoint: "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        protocol: "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        headers: "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    },
    Signal {
        path: "v1/logs",
        endpoint: "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
        protocol: "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
        headers: "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
    },
];

/// Variables that configure where and how a step exports, for every signal. A step that sets
/// any of them has configured its exporter itself; enforce mode governs all of them.
pub(super) const EXPORTER_GROUP: &[&str] = &[
    OTEL_EXPORTER_OTLP_ENDPOINT,
    SIGNALS[0].endpoint,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    SIGNALS[0].protocol,
    OTEL_EXPORTER_OTLP_HEADERS,
    SIGNALS[0].headers,
    SIGNALS[1].endpoint,
    SIGNALS[1].protocol,
    SIGNALS[1].headers,
    SIGNALS[2].endpoint,
    SIGNALS[2].protocol,
    SIGNALS[2].headers,
];

/// The header variables that carry `$(LS_ACCESS_TOKEN)` when the policy has a token.
pub(super) const HEADER_VARS: [&str; 4] = [
    OTEL_EXPORTER_OTLP_HEADERS,
    SIGNALS[0].headers,
    SIGNALS[1].headers,
    SIGNALS[2].headers,
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
        desired.push(Desired::literal(TRACES.endpoint, traces, group));
    }
    let protocol = exporter.protocol.as_str();
    desired.push(Desired::literal(
        OTEL_EXPORTER_OTLP_PROTOCOL,
        protocol,
        group,
    ));

    let mut governed_extra = Vec::new();
    for signal in &SIGNALS {
        // A step's own signal endpoint would override the generic one: point it at the
        // policy's endpoint, with the path the OTLP exporters append for HTTP.
        if signal.endpoint != TRACES.endpoint || exporter.traces_endpoint.is_none() {
            let endpoint = match exporter.protocol {
                Protocol::Grpc => exporter.endpoint.clone(),
                Protocol::HttpProtobuf | Protocol::HttpJson => {
                    format!(
                        "{}/{}",
                        exporter.endpoint.trim_end_matches('/'),
                        signal.path
                    )
                }
            };
            governed_extra.push((signal.endpoint, literal(signal.endpoint, &endpoint)));
        }
        governed_extra.push((signal.protocol, literal(signal.protocol, protocol)));
    }
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
        for signal in &SIGNALS {
            governed_extra.push((signal.headers, literal(signal.headers, &headers)));
        }
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
