//! Run spans built per second: a synthetic finished PipelineRun of 10 TaskRuns with 5 steps
//! each (62 spans: the run, its wait, 10 attempts, 50 steps), turned into the span tree, then
//! into the OTLP request, then into protobuf bytes, as the exporter does for every finished run.
//! Throughput is in spans. Run with `cargo bench --bench spans`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lightstep_tekton_webhook::policy::Policy;
use lightstep_tekton_webhook::spans::objects::Object;
use lightstep_tekton_webhook::spans::otlp::export_request;
use lightstep_tekton_webhook::spans::{group, span_tree};
use prost::Message;
use serde_json::{Value, json};

/// The shape the issue names: ten tasks, five steps each.
const TASKS: usize = 10;
const STEPS: usize = 5;

fn at(second: usize) -> String {
    format!("2026-11-30T11:{:02}:{:02}Z", second / 60, second % 60)
}

fn steps(start: usize) -> Value {
    (0..STEPS)
        .map(|s| {
            json!({"name": format!("step{s}"), "container": format!("step-step{s}"),
                "terminated": {"exitCode": 0, "reason": "Completed",
                    "startedAt": at(start + s), "finishedAt": at(start + s + 1)},
                "terminationReason": "Completed"})
        })
        .collect()
}

fn objects() -> Vec<Object> {
    let pr_uid = "6d388c87-827e-46ec-9c5d-e8dbbc5f1220";
    let labels = json!({"tekton.dev/pipeline": "ship",
        "pipelinesascode.tekton.dev/sha": "7d1e0c5b2a9f8e7d6c5b4a39281706f5e4d3c2b1",
        "pipelinesascode.tekton.dev/url-org": "acme",
        "pipelinesascode.tekton.dev/url-repository": "shop"});
    let mut objects = vec![
        Object::from_value(
            json!({"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
                "metadata": {"name": "ship-run", "namespace": "team-r", "uid": pr_uid,
                    "creationTimestamp": at(0), "labels": labels},
                "status": {"startTime": at(1), "completionTime": at(TASKS * 10 + 5),
                    "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}}),
            "bench",
        )
        .unwrap(),
    ];
    for t in 0..TASKS {
        let mut labels = labels.clone();
        let map = labels.as_object_mut().unwrap();
        map.insert("tekton.dev/pipelineRun".into(), "ship-run".into());
        map.insert("tekton.dev/pipelineRunUID".into(), pr_uid.into());
        map.insert("tekton.dev/pipelineTask".into(), format!("task{t}").into());
        map.insert("tekton.dev/task".into(), format!("task{t}").into());
        let start = t * 10 + 1;
        let done = json!([{"type": "Succeeded", "status": "True", "reason": "Succeeded"}]);
        objects.push(
            Object::from_value(
                json!({"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
                    "metadata": {"name": format!("ship-run-task{t}"), "namespace": "team-r",
                        "uid": format!("0000000{t}-533f-48c7-a947-b7bfd557e2e3"),
                        "creationTimestamp": at(start), "labels": labels},
                    "status": {"podName": format!("ship-run-task{t}-pod"), "startTime": at(start),
                        "completionTime": at(start + STEPS + 1), "conditions": done,
                        "steps": steps(start)}}),
                "bench",
            )
            .unwrap(),
        );
    }
    objects
}

fn benches(c: &mut Criterion) {
    let policy = Policy::from_yaml(
        "runSpans:\n  enabled: true\n  taskRunUrl: \"https://tekton.example/#/namespaces/{namespace}/taskruns/{taskRun}\"\n",
    )
    .unwrap();
    let objects = objects();
    let runs = group(&objects).unwrap();
    let spans = span_tree(&runs[0], &policy).unwrap().spans.len();

    let mut group = c.benchmark_group("spans");
    group.throughput(Throughput::Elements(spans as u64));
    group.bench_function("tree", |b| {
        b.iter(|| span_tree(black_box(&runs[0]), &policy).unwrap())
    });
    group.bench_function("tree+otlp", |b| {
        b.iter(|| {
            let tree = span_tree(black_box(&runs[0]), &policy).unwrap();
            export_request([&tree])
        })
    });
    group.bench_function("tree+otlp+protobuf", |b| {
        b.iter(|| {
            let tree = span_tree(black_box(&runs[0]), &policy).unwrap();
            export_request([&tree]).encode_to_vec()
        })
    });
    group.finish();
}

criterion_group!(spans, benches);
criterion_main!(spans);
