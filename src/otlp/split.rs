//! Cutting one export request into several below a byte limit, span by span.
//!
//! A receiver refuses a request over its limit (the Collector's gRPC server takes 4 MiB) and
//! would refuse it again on every retry. Each part keeps the resource and scope of the spans
//! it carries, so a receiver sees the same spans with the same context, in the same order,
//! across several requests. The exporter's span ids are derived from the run, so resending
//! every part after one failed is harmless (a duplicate, never a different span).
//!
//! A single span larger than the limit is sent alone in its part: it cannot be cut, and the
//! receiver's answer (a permanent rejection) is then about that span only.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message as _;

/// Each part's protobuf framing per resource and scope (tags, lengths): a generous bound, so
/// a part's estimate never falls below its encoded size.
const FRAMING: usize = 32;

/// `request` as parts whose encoded size is at most `max_bytes` each (one part, unchanged,
/// when it fits), every span in exactly one part, in order.
pub fn split(
    request: ExportTraceServiceRequest,
    max_bytes: usize,
) -> Vec<ExportTraceServiceRequest> {
    if request.encoded_len() <= max_bytes {
        return vec![request];
    }
    let mut parts = Vec::new();
    let mut part = ExportTraceServiceRequest::default();
    let mut size = 0;
    for resource_spans in request.resource_spans {
        let resource = ResourceSpans {
            resource: resource_spans.resource,
            scope_spans: Vec::new(),
            schema_url: resource_spans.schema_url,
        };
        let resource_size = resource.encoded_len() + FRAMING;
        for scope_spans in resource_spans.scope_spans {
            let scope = ScopeSpans {
                scope: scope_spans.scope,
                spans: Vec::new(),
                schema_url: scope_spans.schema_url,
            };
            let scope_size = scope.encoded_len() + FRAMING;
            for span in scope_spans.spans {
                let span_size = span.encoded_len() + FRAMING;
                let context = resource_size + scope_size;
                if size > 0 && size + span_size + context > max_bytes {
                    parts.push(std::mem::take(&mut part));
                    size = 0;
                }
                // The span goes into this part's copy of its resource and scope, opened anew
                // when the part does not end with them.
                let same_resource = part.resource_spans.last().is_some_and(|r| {
                    r.resource == resource.resource && r.schema_url == resource.schema_url
                });
                if !same_resource {
                    part.resource_spans.push(resource.clone());
                    size += resource_size;
                }
                let open = part.resource_spans.last_mut().expect("pushed above");
                let same_scope = open
                    .scope_spans
                    .last()
                    .is_some_and(|s| s.scope == scope.scope && s.schema_url == scope.schema_url);
                if !same_scope {
                    open.scope_spans.push(scope.clone());
                    size += scope_size;
                }
                let open = open.scope_spans.last_mut().expect("pushed above");
                open.spans.push(span);
                size += span_size;
            }
        }
    }
    if !part.resource_spans.is_empty() {
        parts.push(part);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn span(i: u8, padding: usize) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![i; 8],
            name: "x".repeat(padding),
            ..Span::default()
        }
    }

    fn resource(name: &str) -> Option<Resource> {
        Some(Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(name.into())),
                }),
                ..KeyValue::default()
            }],
            ..Resource::default()
        })
    }

    fn request(resources: &[(&str, Vec<Span>)]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: resources
                .iter()
                .map(|(name, spans)| ResourceSpans {
                    resource: resource(name),
                    scope_spans: vec![ScopeSpans {
                        spans: spans.clone(),
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                })
                .collect(),
        }
    }

    /// (resource name, span id) of every span, in order.
    fn spans_of(parts: &[ExportTraceServiceRequest]) -> Vec<(String, u8)> {
        parts
            .iter()
            .flat_map(|p| &p.resource_spans)
            .flat_map(|r| {
                let name = match &r.resource.as_ref().unwrap().attributes[0].value {
                    Some(AnyValue {
                        value: Some(any_value::Value::StringValue(s)),
                    }) => s.clone(),
                    _ => String::new(),
                };
                r.scope_spans
                    .iter()
                    .flat_map(|s| &s.spans)
                    .map(move |s| (name.clone(), s.span_id[0]))
            })
            .collect()
    }

    #[test]
    fn a_request_that_fits_is_one_part_unchanged() {
        let r = request(&[("a", vec![span(1, 10), span(2, 10)])]);
        assert_eq!(split(r.clone(), 10_000), vec![r]);
    }

    #[test]
    fn a_large_request_becomes_parts_under_the_limit_with_every_span_once_in_order() {
        let spans_a: Vec<Span> = (0..20).map(|i| span(i, 1000)).collect();
        let spans_b: Vec<Span> = (20..30).map(|i| span(i, 1000)).collect();
        let r = request(&[("a", spans_a), ("b", spans_b)]);
        let before = spans_of(std::slice::from_ref(&r));
        let limit = 4_500;
        let parts = split(r, limit);
        assert!(parts.len() >= 7, "{} parts", parts.len());
        for part in &parts {
            assert!(
                part.encoded_len() <= limit,
                "{} > {limit}",
                part.encoded_len()
            );
            // Each part's spans keep their resource.
            assert!(part.resource_spans.iter().all(|r| r.resource.is_some()));
        }
        assert_eq!(spans_of(&parts), before);
    }

    #[test]
    fn a_span_over_the_limit_goes_alone() {
        let r = request(&[("a", vec![span(1, 10), span(2, 5000), span(3, 10)])]);
        let parts = split(r, 1000);
        let counts: Vec<usize> = parts
            .iter()
            .map(|p| spans_of(std::slice::from_ref(p)).len())
            .collect();
        assert_eq!(counts, [1, 1, 1]);
    }
}
