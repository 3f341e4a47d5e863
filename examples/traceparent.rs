//! A Rust step's spans nest under its TaskRun's step span: read the `TRACEPARENT` (and
//! `TRACESTATE`) the webhook injected and make it the current context. Written against
//! opentelemetry 0.33 and opentelemetry_sdk 0.33; docs/injection.md shows this file and
//! tests/docs.rs runs it.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;

pub fn main() {
    // The environment as a carrier: `TRACEPARENT` is read as the `traceparent` key.
    let env: HashMap<String, String> = std::env::vars()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    let _step = TraceContextPropagator::new().extract(&env).attach();

    // Spans started from here on (through any tracer) are children of the step's span.
    let current = Context::current();
    let parent = current.span().span_context().clone();
    println!("{}-{}", parent.trace_id(), parent.span_id());
}
