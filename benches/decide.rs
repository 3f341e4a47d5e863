//! The decision's cost on the captured reviews, the 40-step pod included.
//!
//! `decide/<fixture>` is the pure decision on an already-decoded pod; `review/<fixture>` is the
//! whole request path the server runs per admission: decode the review, decide, encode the reply.
//! `*/pac-bomb-40` is the worst case of issue 14's D1: the 40-step pod with the eleven
//! Pipelines-as-Code annotations set to 22 KB of commas each, which once forced a 40 MB reply.
//! Run with `cargo bench --bench decide` (or `make bench`).

#[path = "../tests/support/review.rs"]
mod support;

use std::hint::black_box;

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

/// D1's adversarial review: every PaC annotation the attributes read, at 22 KB of commas (each
/// percent-encodes to three times its size), on the 40-step pod.
fn pac_bomb() -> Vec<u8> {
    let mut review: serde_json::Value =
        serde_json::from_slice(&support::fixture_bytes("tekton-40-steps.json")).unwrap();
    let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
    let commas = ",".repeat(22 * 1024);
    for key in support::PAC_KEYS {
        annotations[format!("pipelinesascode.tekton.dev/{key}")] = commas.clone().into();
    }
    serde_json::to_vec(&review).unwrap()
}

fn benches(c: &mut Criterion) {
    let policy = Policy::embedded_default();

    let mut decide = c.benchmark_group("decide");
    for name in FIXTURES {
        let body = support::fixture_bytes(name);
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
        let body = support::fixture_bytes(name);
        review.throughput(Throughput::Bytes(body.len() as u64));
        review.bench_function(name.trim_end_matches(".json"), |b| {
            b.iter(|| admission::review(black_box(&body), &policy, Mode::Inject).unwrap())
        });
    }
    review.finish();

    // Few samples: before the bound, one iteration built a 40 MB reply.
    let bomb = pac_bomb();
    let mut worst = c.benchmark_group("worst");
    worst.sample_size(10);
    worst.throughput(Throughput::Bytes(bomb.len() as u64));
    worst.bench_function("review/pac-bomb-40", |b| {
        b.iter(|| admission::review(black_box(&bomb), &policy, Mode::Inject).unwrap())
    });
    worst.finish();
}

criterion_group!(decide_benches, benches);
criterion_main!(decide_benches);
