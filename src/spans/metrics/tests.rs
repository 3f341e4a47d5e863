//! The builder on the captured runs (`tests/fixtures/runs/`).

use super::otlp::{BUCKETS, metrics_request};
use super::*;
use crate::spans::group;
use crate::spans::preview::objects;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric};

fn metrics_of(json: &str) -> RunMetrics {
    let objects = objects(json).unwrap();
    let runs = group(&objects).unwrap();
    assert_eq!(runs.len(), 1);
    run_metrics(&runs[0], &Policy::embedded_default()).unwrap()
}

fn fixture(name: &str) -> &'static str {
    match name {
        "ship-run-ok" => include_str!("../../../tests/fixtures/runs/ship-run-ok.json"),
        "ship-run-fail" => include_str!("../../../tests/fixtures/runs/ship-run-fail.json"),
        "ship-run-retry" => include_str!("../../../tests/fixtures/runs/ship-run-retry.json"),
        "ship-run-cancel" => include_str!("../../../tests/fixtures/runs/ship-run-cancel.json"),
        "ship-run-traced" => include_str!("../../../tests/fixtures/runs/ship-run-traced.json"),
        "lint-run" => include_str!("../../../tests/fixtures/runs/lint-run.json"),
        _ => unreachable!(),
    }
}

const FIXTURES: [&str; 6] = [
    "ship-run-ok",
    "ship-run-fail",
    "ship-run-retry",
    "ship-run-cancel",
    "ship-run-traced",
    "lint-run",
];

fn of(metrics: &RunMetrics, metric: Metric) -> Vec<&Observation> {
    metrics
        .observations
        .iter()
        .filter(|o| o.metric == metric)
        .collect()
}

fn time(s: &str) -> u64 {
    let t: k8s_openapi::jiff::Timestamp = s.parse().unwrap();
    t.as_nanosecond() as u64
}

#[test]
fn a_succeeded_run_is_pending_then_executing_with_its_result_and_one_duration_per_task() {
    let metrics = metrics_of(fixture("ship-run-ok"));
    let runs = of(&metrics, Metric::RunDuration);
    assert_eq!(runs.len(), 2);
    let (pending, executing) = (runs[0], runs[1]);
    assert_eq!(
        pending.attribute("cicd.pipeline.run.state"),
        Some("pending")
    );
    assert_eq!(pending.attribute("cicd.pipeline.result"), None);
    assert_eq!(pending.value, 0.0, "started when created");
    assert_eq!(
        executing.attribute("cicd.pipeline.run.state"),
        Some("executing")
    );
    assert_eq!(executing.attribute("cicd.pipeline.result"), Some("success"));
    assert_eq!(executing.attribute("cicd.pipeline.name"), Some("ship"));
    assert_eq!(executing.attribute("k8s.namespace.name"), Some("team-r"));
    assert_eq!(executing.attribute("error.type"), None);
    assert_eq!(executing.value, 37.0);
    assert_eq!(
        (executing.start, executing.end),
        (time("2026-11-30T11:21:28Z"), time("2026-11-30T11:22:05Z"))
    );
    assert!(of(&metrics, Metric::RunErrors).is_empty());
    let tasks = of(&metrics, Metric::TaskDuration);
    let mut names: Vec<_> = tasks
        .iter()
        .map(|o| o.attribute("cicd.pipeline.task.name").unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["build", "checkout", "deploy", "notify", "scan", "test"]
    );
    let build = tasks
        .iter()
        .find(|o| o.attribute("cicd.pipeline.task.name") == Some("build"))
        .unwrap();
    assert_eq!(build.value, 6.0);
    assert_eq!(
        build.attribute("cicd.pipeline.task.run.result"),
        Some("success")
    );
    assert_eq!(build.attribute("cicd.pipeline.name"), Some("ship"));
    assert_eq!(metrics.resource.service_name, "ship");
}

#[test]
fn failed_and_cancelled_runs_count_one_error_with_their_reason() {
    for (name, result, reason) in [
        ("ship-run-fail", "failure", "Failed"),
        ("ship-run-cancel", "cancellation", "Cancelled"),
        ("ship-run-traced", "cancellation", "Cancelled"),
    ] {
        let metrics = metrics_of(fixture(name));
        let errors = of(&metrics, Metric::RunErrors);
        assert_eq!(errors.len(), 1, "{name}");
        assert_eq!(errors[0].value, 1.0);
        assert_eq!(errors[0].attribute("error.type"), Some(reason));
        assert_eq!(errors[0].attribute("cicd.pipeline.name"), Some("ship"));
        let executing = of(&metrics, Metric::RunDuration)[1];
        assert_eq!(executing.attribute("cicd.pipeline.result"), Some(result));
        assert_eq!(executing.attribute("error.type"), Some(reason));
    }
    let fail = metrics_of(fixture("ship-run-fail"));
    let build = of(&fail, Metric::TaskDuration)
        .into_iter()
        .find(|o| o.attribute("cicd.pipeline.task.name") == Some("build"))
        .unwrap();
    assert_eq!(
        build.attribute("cicd.pipeline.task.run.result"),
        Some("failure")
    );
}

#[test]
fn each_attempt_of_a_retried_task_is_an_observation() {
    let metrics = metrics_of(fixture("ship-run-retry"));
    let test: Vec<_> = of(&metrics, Metric::TaskDuration)
        .into_iter()
        .filter(|o| o.attribute("cicd.pipeline.task.name") == Some("test"))
        .collect();
    let results: Vec<_> = test
        .iter()
        .map(|o| o.attribute("cicd.pipeline.task.run.result").unwrap())
        .collect();
    assert_eq!(results, ["failure", "success"]);
    assert_eq!((test[0].value, test[1].value), (7.0, 8.0));
}

#[test]
fn a_standalone_task_run_is_a_run_named_after_its_task() {
    let metrics = metrics_of(fixture("lint-run"));
    let runs = of(&metrics, Metric::RunDuration);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].value, 1.0, "created 11:21:30, started 11:21:31");
    assert_eq!(runs[1].value, 5.0);
    assert_eq!(runs[1].attribute("cicd.pipeline.name"), Some("lint"));
    assert_eq!(of(&metrics, Metric::TaskDuration).len(), 1);
}

/// No attribute, on a point or the resource, names one run: no uid, pod, run name or commit.
#[test]
fn nothing_that_names_one_run_is_an_attribute() {
    for name in FIXTURES {
        let json: serde_json::Value = serde_json::from_str(fixture(name)).unwrap();
        let mut per_run: Vec<String> = Vec::new();
        for item in json["items"].as_array().unwrap() {
            let metadata = &item["metadata"];
            per_run.push(metadata["uid"].as_str().unwrap().to_owned());
            per_run.push(metadata["name"].as_str().unwrap().to_owned());
            if let Some(pod) = item["status"]["podName"].as_str() {
                per_run.push(pod.to_owned());
            }
            for value in metadata["labels"].as_object().into_iter().flatten() {
                if value.0.contains("sha") || value.0.ends_with("pipelineRunUID") {
                    per_run.push(value.1.as_str().unwrap().to_owned());
                }
            }
        }
        let metrics = metrics_of(fixture(name));
        let values = metrics
            .observations
            .iter()
            .flat_map(|o| o.attributes.iter().map(|(_, v)| v.clone()))
            .chain(metrics.resource.attributes.iter().map(|(_, v)| v.clone()));
        for value in values {
            assert!(!per_run.contains(&value), "{name}: {value} names one run");
        }
    }
}

#[test]
fn the_request_has_the_names_units_delta_points_and_bucket_counts() {
    let metrics = metrics_of(fixture("ship-run-retry"));
    let request = metrics_request([&metrics]);
    assert_eq!(request.resource_metrics.len(), 1);
    let scope = &request.resource_metrics[0].scope_metrics[0];
    let names: Vec<_> = scope
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), m.unit.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("cicd.pipeline.run.duration", "s"),
            ("lightstep_tekton.task.run.duration", "s")
        ]
    );
    let Some(metric::Data::Histogram(tasks)) = &scope.metrics[1].data else {
        panic!("the task metric is a histogram");
    };
    assert_eq!(
        tasks.aggregation_temporality,
        AggregationTemporality::Delta as i32
    );
    // Six tasks, the retried one in two results: seven series, seven attempts.
    assert_eq!(tasks.data_points.len(), 7);
    for point in &tasks.data_points {
        assert_eq!(point.bucket_counts.len(), BUCKETS.len() + 1);
        assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
        assert_eq!(point.explicit_bounds, BUCKETS);
    }
    // test's failed attempt took 7 s: the (5, 10] bucket.
    let failed = tasks
        .data_points
        .iter()
        .find(|p| {
            p.attributes.iter().any(|kv| {
                kv.key == "cicd.pipeline.task.run.result"
                    && kv.value.as_ref().and_then(|v| v.value.as_ref())
                        == Some(&any_value::Value::StringValue("failure".into()))
            })
        })
        .unwrap();
    assert_eq!(failed.count, 1);
    assert_eq!(failed.bucket_counts[3], 1);
    assert_eq!(failed.sum, Some(7.0));
}

#[test]
fn observations_with_the_same_attributes_are_one_point() {
    let mut metrics = metrics_of(fixture("ship-run-ok"));
    let build = of(&metrics, Metric::TaskDuration)
        .into_iter()
        .find(|o| o.attribute("cicd.pipeline.task.name") == Some("build"))
        .unwrap()
        .clone();
    let mut again = build.clone();
    again.value = 3600.0;
    metrics.observations.push(again);
    let request = metrics_request([&metrics]);
    let Some(metric::Data::Histogram(tasks)) =
        &request.resource_metrics[0].scope_metrics[0].metrics[1].data
    else {
        panic!("histogram");
    };
    assert_eq!(tasks.data_points.len(), 6);
    let point = tasks.data_points.iter().find(|p| p.count == 2).unwrap();
    assert_eq!(
        (point.min, point.max, point.sum),
        (Some(6.0), Some(3600.0), Some(3606.0))
    );
    assert_eq!(point.bucket_counts[12], 1, "3600 s is in (1800, 3600]");
}

#[test]
fn the_cap_folds_new_names_past_it_and_counts_them() {
    let mut cap = SeriesCap::new(1);
    let mut first = metrics_of(fixture("ship-run-ok"));
    let folded = cap.fold(&mut first);
    // One pipeline name fits; of six task names, five are folded.
    assert_eq!(folded, [(Metric::TaskDuration, 5)]);
    let mut lint = metrics_of(fixture("lint-run"));
    let folded = cap.fold(&mut lint);
    assert_eq!(
        folded,
        [(Metric::RunDuration, 2), (Metric::TaskDuration, 1)]
    );
    let run = of(&lint, Metric::RunDuration)[1];
    assert_eq!(run.attribute("cicd.pipeline.name"), Some(OVERFLOW));
    assert_eq!(
        run.attribute("cicd.pipeline.result"),
        Some("success"),
        "the result stays"
    );
    // A name already kept is never folded.
    let mut again = metrics_of(fixture("ship-run-fail"));
    let folded = cap.fold(&mut again);
    assert!(
        folded.iter().all(|(m, _)| *m == Metric::TaskDuration),
        "{folded:?}"
    );
    assert_eq!(
        of(&again, Metric::RunDuration)[1].attribute("cicd.pipeline.name"),
        Some("ship")
    );
}
