//! A span tree as the OTLP trace request an exporter sends (`ExportTraceServiceRequest`): one
//! `ResourceSpans` per distinct resource, one scope naming this program, the spans in tree order.
//! Encoding to protobuf or OTLP/JSON (ids in hex) is the caller's: `prost::Message::encode` or
//! `serde_json` on the same value.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};

use super::tree::{
    AttributeValue, Kind, Link, RunSpan, SpanResource, SpanTree, Status as RunStatus,
};

/// The instrumentation scope of run spans: what made them, for a backend that groups by it.
pub const SCOPE_NAME: &str = "lightstep-tekton-webhook/run-spans";

/// The request that exports these trees' spans (any number of runs in one request).
pub fn export_request<'a>(
    trees: impl IntoIterator<Item = &'a SpanTree>,
) -> ExportTraceServiceRequest {
    let mut resource_spans = Vec::new();
    for tree in trees {
        for (index, resource) in tree.resources.iter().enumerate() {
            let spans: Vec<Span> = tree
                .spans
                .iter()
                .filter(|s| s.resource == index)
                .map(span)
                .collect();
            if spans.is_empty() {
                continue;
            }
            resource_spans.push(ResourceSpans {
                resource: Some(otlp_resource(resource)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            });
        }
    }
    ExportTraceServiceRequest { resource_spans }
}

fn otlp_resource(resource: &SpanResource) -> Resource {
    let mut attributes = Vec::with_capacity(resource.attributes.len() + 1);
    attributes.push(string("service.name", &resource.service_name));
    attributes.extend(resource.attributes.iter().map(|(k, v)| string(k, v)));
    Resource {
        attributes,
        ..Default::default()
    }
}

fn span(s: &RunSpan) -> Span {
    let (code, message) = match &s.status {
        RunStatus::Unset => (status::StatusCode::Unset, String::new()),
        RunStatus::Ok => (status::StatusCode::Ok, String::new()),
        RunStatus::Error { message } => (status::StatusCode::Error, message.clone()),
    };
    Span {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        trace_state: s.trace_state.clone().unwrap_or_default(),
        parent_span_id: s.parent_id.map(|p| p.0.to_vec()).unwrap_or_default(),
        flags: u32::from(s.flags),
        name: s.name.clone(),
        kind: match s.kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Internal => span::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: s.start,
        end_time_unix_nano: s.end,
        attributes: s.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
        links: s.links.iter().map(link).collect(),
        status: Some(Status {
            message,
            code: code as i32,
        }),
        ..Default::default()
    }
}

fn link(l: &Link) -> span::Link {
    span::Link {
        trace_id: l.trace_id.0.to_vec(),
        span_id: l.span_id.0.to_vec(),
        attributes: vec![string(LINK_KIND, l.kind.as_str())],
        ..Default::default()
    }
}

/// The link attribute that says why a run span links to another.
pub const LINK_KIND: &str = "tekton.link.kind";

fn key_value(key: &str, value: &AttributeValue) -> KeyValue {
    let value = match value {
        AttributeValue::Str(s) => any_value::Value::StringValue(s.clone()),
        AttributeValue::Int(i) => any_value::Value::IntValue(*i),
        AttributeValue::Bool(b) => any_value::Value::BoolValue(*b),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    key_value(key, &AttributeValue::Str(value.to_owned()))
}
