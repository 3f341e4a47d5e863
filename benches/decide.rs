//! The decision's cost on the captured reviews, the 40-step pod included.
//!
//! `decide/<fixture>` is the pure decision on an already-decoded pod; `review/<fixture>` is the
//! whole request path the server runs per admission: decode the review, decide, encode the reply.
//! Run with `cargo bench --bench decide` (or `make bench`).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lightstep_tekton_webhook::admission;
use lightstep_tekton_webhook::admission::decide::{self, Mode};
use lightstep_tekton_webhook::admission::pod::PodView;
use lightstep_tekton_webhook::policy::Policy;

const FIXTURES: &[&str] = &[
    "tekton-pipeline-task-traced.json",
    "tekton-pipeline-sidecar-traced.json",
    "tekton-taskrun-standalone.json",
    "tekton-matrix-triggers.json",
    "tekton-40-steps.json",
    "plain-pod.json",
];

fn load(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn benches(c: &mut Criterion) {
    let policy = Policy::embedded_default();

    let mut decide = c.benchmark_group("decide");
    for name in FIXTURES {
        let body = load(name);
        let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let pod: PodView = serde_json::from_value(review["request"]["object"].clone()).unwrap();
        let request = decide::Request {
            namespace: "team-a",
            mode: Mode::Inject,
        };
        decide.bench_function(name.trim_end_matches(".json"), |b| {
            b.iter(|| decide::decide(black_box(&pod), request, &policy))
        });
    }
    decide.finish();

    let mut review = c.benchmark_group("review");
    for name in FIXTURES {
        let body = load(name);
        review.throughput(Throughput::Bytes(body.len() as u64));
        review.bench_function(name.trim_end_matches(".json"), |b| {
            b.iter(|| admission::review(black_box(&body), &policy, Mode::Inject).unwrap())
        });
    }
    review.finish();
}

criterion_group!(decide_benches, benches);
criterion_main!(decide_benches);
