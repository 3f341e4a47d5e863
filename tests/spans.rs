//! Run spans on the captured runs: the tree of every fixture (parents, ids, times, statuses,
//! attributes, links), the ids against what the webhook injected into the same runs' pods, a
//! property over synthetic runs, and the `spans` command on every fixture and on bad input.

mod support {
    pub mod review;
}

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lightstep_tekton_webhook::admission;
use lightstep_tekton_webhook::admission::decide::Mode;
use lightstep_tekton_webhook::contract::{
    SpanId, TraceId, derive_attempt_startup_span_id, derive_pipeline_run_span_id,
    derive_pipeline_run_wait_span_id, derive_span_id, derive_step_span_id, derive_trace_id,
    parse_traceparent,
};
use lightstep_tekton_webhook::policy::Policy;
use lightstep_tekton_webhook::spans::objects::Object;
use lightstep_tekton_webhook::spans::otlp::export_request;
use lightstep_tekton_webhook::spans::preview::objects;
use lightstep_tekton_webhook::spans::tree::{
    AttributeValue, Kind, LinkKind, Role, RunSpan, Status,
};
use lightstep_tekton_webhook::spans::{SpanTree, group, span_tree};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use percent_encoding::percent_decode_str;
use proptest::prelude::*;
use serde_json::{Value, json};
use support::review::{apply, check_reply, validated_pod, value};

const BIN: &str = env!("CARGO_BIN_EXE_lightstep-tekton-webhook");
const FIXTURES: &[&str] = &[
    "ship-run-ok",
    "ship-run-fail",
    "ship-run-retry",
    "ship-run-cancel",
    "ship-run-traced",
    "lint-run",
];

fn runs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runs")
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(runs_dir().join(format!("{name}.json"))).unwrap()
}

fn fixture_value(name: &str) -> Value {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

fn tree_of(list: &Value, policy: &Policy) -> SpanTree {
    let objects = objects(&list.to_string()).unwrap();
    let runs = group(&objects).unwrap();
    assert_eq!(runs.len(), 1);
    span_tree(&runs[0], policy).unwrap()
}

fn tree(name: &str) -> SpanTree {
    tree_of(&fixture_value(name), &Policy::embedded_default())
}

fn uid_of(list: &Value, name: &str) -> String {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {name}"))["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn attr<'a>(span: &'a RunSpan, key: &str) -> Option<&'a AttributeValue> {
    span.attributes
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn text<'a>(span: &'a RunSpan, key: &str) -> Option<&'a str> {
    match attr(span, key) {
        Some(AttributeValue::Str(s)) => Some(s),
        _ => None,
    }
}

fn attempts<'a>(tree: &'a SpanTree, task: &str) -> Vec<&'a RunSpan> {
    tree.spans
        .iter()
        .filter(|s| s.role == Role::Attempt && s.name == task)
        .collect()
}

/// The step spans under an attempt (its startup span aside).
fn steps_of<'a>(tree: &'a SpanTree, parent: &RunSpan) -> Vec<&'a RunSpan> {
    tree.spans
        .iter()
        .filter(|s| s.parent_id == Some(parent.span_id) && s.role == Role::Step)
        .collect()
}

fn pipeline_span(tree: &SpanTree) -> &RunSpan {
    let spans: Vec<_> = tree
        .spans
        .iter()
        .filter(|s| s.role == Role::PipelineRun)
        .collect();
    assert_eq!(spans.len(), 1);
    spans[0]
}

fn time(s: &str) -> u64 {
    let t: k8s_openapi::jiff::Timestamp = s.parse().unwrap();
    t.as_nanosecond() as u64
}

fn is_error(span: &RunSpan) -> bool {
    matches!(span.status, Status::Error { .. })
}

/// Every pod of every captured run, through the real admission path: the trace and parent of
/// the TRACEPARENT its steps got, and the service name and resource attributes of a step that
/// set neither itself.
struct Injected {
    trace: TraceId,
    parent: SpanId,
    service: Option<String>,
    resource: Option<BTreeMap<String, String>>,
}

fn injected(policy: &Policy) -> BTreeMap<String, Injected> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(runs_dir().join("reviews")).unwrap() {
        let body = std::fs::read(entry.unwrap().path()).unwrap();
        let review: Value = serde_json::from_slice(&body).unwrap();
        let before = review["request"]["object"].clone();
        let reply = admission::review(&body, policy, Mode::Inject).unwrap();
        let uid = review["request"]["uid"].as_str().unwrap();
        let (_, patch) = check_reply(&reply.body, uid);
        let pod = validated_pod(&apply(&before, &patch));
        let name = pod.metadata.name.clone().unwrap();
        let mut found: Option<Injected> = None;
        for (i, container) in pod.spec.as_ref().unwrap().containers.iter().enumerate() {
            if !container.name.starts_with("step-") {
                continue;
            }
            let (trace, parent, _) =
                parse_traceparent(value(&pod, &container.name, "TRACEPARENT").unwrap()).unwrap();
            let own = |var: &str| {
                before["spec"]["containers"][i]["env"]
                    .as_array()
                    .is_some_and(|env| env.iter().any(|e| e["name"] == var))
            };
            let service = (!own("OTEL_SERVICE_NAME"))
                .then(|| value(&pod, &container.name, "OTEL_SERVICE_NAME").map(str::to_owned))
                .flatten();
            let resource = (!own("OTEL_RESOURCE_ATTRIBUTES"))
                .then(|| value(&pod, &container.name, "OTEL_RESOURCE_ATTRIBUTES"))
                .flatten()
                .map(|attrs| {
                    attrs
                        .split(',')
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').unwrap();
                            (
                                k.to_owned(),
                                percent_decode_str(v).decode_utf8().unwrap().into_owned(),
                            )
                        })
                        .collect()
                });
            if let Some(seen) = &found {
                // Every step of one pod shares the attempt's trace, and with run spans off its
                // parent too (with them on each step has its own, checked below).
                assert_eq!(seen.trace, trace, "{name}");
                if !policy.run_spans.enabled {
                    assert_eq!(seen.parent, parent, "{name}");
                }
            }
            if found.is_none() || found.as_ref().is_some_and(|f| f.service.is_none()) {
                found = Some(Injected {
                    trace,
                    parent,
                    service,
                    resource,
                });
            }
        }
        out.insert(name, found.expect("a step container"));
    }
    assert_eq!(out.len(), 24, "every captured pod");
    out
}

/// The exporter sends spans only for a policy with run spans on, so that is the policy the pods
/// got their context from.
fn run_spans_on(extra: &str) -> Policy {
    Policy::from_yaml(&format!("runSpans:\n  enabled: true\n{extra}")).unwrap()
}

#[test]
fn every_attempt_span_has_the_trace_and_resource_the_webhook_gave_its_pod() {
    let policy = run_spans_on("resourceAttributes:\n  team: checkout\n");
    let injected = injected(&policy);
    let mut matched = BTreeSet::new();
    for name in FIXTURES {
        let tree = tree_of(&fixture_value(name), &policy);
        for span in tree.spans.iter().filter(|s| s.role == Role::Attempt) {
            let pod = text(span, "k8s.pod.name").expect("attempts name their pod");
            let pod_context = injected
                .get(pod)
                .unwrap_or_else(|| panic!("no review for {pod}"));
            // The steps' parents are this attempt's step spans (see the last test).
            assert_eq!(span.trace_id, pod_context.trace, "{pod}: trace");
            let resource = &tree.resources[span.resource];
            if let Some(service) = &pod_context.service {
                assert_eq!(&resource.service_name, service, "{pod}: service.name");
            }
            if let Some(attrs) = &pod_context.resource {
                let ours: BTreeMap<String, String> = resource.attributes.iter().cloned().collect();
                assert_eq!(&ours, attrs, "{pod}: resource attributes");
                assert_eq!(ours.get("team").map(String::as_str), Some("checkout"));
            }
            matched.insert(pod.to_owned());
        }
    }
    assert_eq!(
        matched.len(),
        injected.len(),
        "an attempt span for every pod"
    );
}

/// With run spans off the webhook keeps context rule v1: a pod Tekton traced gets Tekton's
/// TaskRun span as its steps' parent, whatever the exporter would have derived.
#[test]
fn with_run_spans_off_the_webhook_still_follows_tekton() {
    let injected = injected(&Policy::embedded_default());
    let checkout = &injected["ship-run-traced-checkout-pod"];
    assert_eq!(
        checkout.trace.to_string(),
        "63ae3099baa46e6d188e5fd1f6860698"
    );
    assert_eq!(checkout.parent.to_string(), "1c8591f1b99128b9");
    assert_eq!(
        injected["ship-run-traced-build-pod"].parent.to_string(),
        "1f1d6dbb68886951"
    );
}

#[test]
fn a_succeeded_run_is_one_trace_with_deploy_and_vcs_attributes() {
    let list = fixture_value("ship-run-ok");
    let tree = tree("ship-run-ok");
    let pr_uid = uid_of(&list, "ship-run-ok");
    let run = pipeline_span(&tree);
    assert_eq!(run.trace_id, derive_trace_id(&pr_uid));
    assert_eq!(run.span_id, derive_pipeline_run_span_id(&pr_uid));
    assert_eq!(
        run.parent_id, None,
        "Tekton's unexported context is not joined"
    );
    assert_eq!(run.kind, Kind::Server);
    assert_eq!(run.name, "RUN ship");
    assert_eq!(text(run, "cicd.pipeline.action.name"), Some("RUN"));
    assert_eq!(
        (run.start, run.end),
        (time("2026-11-30T11:21:28Z"), time("2026-11-30T11:22:05Z"))
    );
    assert_eq!(run.status, Status::Ok);
    assert_eq!(text(run, "cicd.pipeline.result"), Some("success"));
    assert_eq!(text(run, "cicd.pipeline.run.id"), Some(pr_uid.as_str()));
    assert_eq!(
        text(run, "vcs.ref.head.revision"),
        Some("7d1e0c5b2a9f8e7d6c5b4a39281706f5e4d3c2b1")
    );
    assert_eq!(
        text(run, "cicd.pipeline.run.url.full"),
        Some("https://dashboard.example.invalid/#/namespaces/team-r/pipelineruns/ship-run-ok")
    );
    assert!(attr(run, "cicd.pipeline.task.name").is_none());
    // Started when it was created: no wait span.
    assert!(tree.spans.iter().all(|s| s.role != Role::Wait));
    // One trace, every attempt under the run, every step under its attempt.
    assert!(tree.spans.iter().all(|s| s.trace_id == run.trace_id));
    let startups = tree.spans.iter().filter(|s| s.role == Role::Startup);
    assert_eq!(tree.spans.len(), 1 + 6 + 8 + startups.count());
    for attempt in tree.spans.iter().filter(|s| s.role == Role::Attempt) {
        assert_eq!(attempt.parent_id, Some(run.span_id));
        assert!(attempt.links.is_empty());
        assert_eq!(
            text(attempt, "cicd.pipeline.task.run.result"),
            Some("success")
        );
    }

    let deploy = attempts(&tree, "deploy");
    assert_eq!(deploy.len(), 1);
    let deploy = deploy[0];
    let deploy_uid = uid_of(&list, "ship-run-ok-deploy");
    assert_eq!(deploy.span_id, derive_span_id(&deploy_uid, 0));
    assert_eq!(text(deploy, "cicd.pipeline.task.type"), Some("deploy"));
    assert_eq!(text(deploy, "deployment.status"), Some("succeeded"));
    assert_eq!(text(deploy, "deployment.id"), Some(deploy_uid.as_str()));
    assert_eq!(text(deploy, "k8s.pod.name"), Some("ship-run-ok-deploy-pod"));
    assert_eq!(text(deploy, "k8s.namespace.name"), Some("team-r"));
    assert_eq!(
        (deploy.start, deploy.end),
        (time("2026-11-30T11:21:51Z"), time("2026-11-30T11:21:58Z"))
    );
    let build = attempts(&tree, "build")[0];
    assert!(attr(build, "cicd.pipeline.task.type").is_none());
    let steps = steps_of(&tree, build);
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["compile", "package"]);
    let build_uid = uid_of(&list, "ship-run-ok-build");
    assert_eq!(
        steps[0].span_id,
        derive_step_span_id(&build_uid, 0, "compile")
    );
    assert_eq!(
        (steps[0].start, steps[0].end),
        (time("2026-11-30T11:21:38Z"), time("2026-11-30T11:21:40Z"))
    );
    assert_eq!(
        attr(steps[0], "process.exit.code"),
        Some(&AttributeValue::Int(0))
    );
}

#[test]
fn a_failed_step_fails_its_attempt_and_the_skipped_one_is_not_an_error() {
    let tree = tree("ship-run-fail");
    let run = pipeline_span(&tree);
    assert_eq!(text(run, "cicd.pipeline.result"), Some("failure"));
    assert_eq!(text(run, "error.type"), Some("Failed"));
    assert!(is_error(run));
    let build = attempts(&tree, "build")[0];
    assert_eq!(
        text(build, "cicd.pipeline.task.run.result"),
        Some("failure")
    );
    let Status::Error { message } = &build.status else {
        panic!("build is an error")
    };
    assert!(message.starts_with("StepFailed: "), "{message}");
    let steps = steps_of(&tree, build);
    let compile = steps.iter().find(|s| s.name == "compile").unwrap();
    assert!(is_error(compile));
    assert_eq!(
        attr(compile, "process.exit.code"),
        Some(&AttributeValue::Int(2))
    );
    assert!(attr(compile, "error.type").is_some());
    let package = steps.iter().find(|s| s.name == "package").unwrap();
    assert_eq!(package.status, Status::Unset);
    assert_eq!(
        attr(package, "tekton.step.skipped"),
        Some(&AttributeValue::Bool(true))
    );
    assert!(attr(package, "error.type").is_none());
    // Skipped tasks never ran: no spans; the finally task did.
    assert!(attempts(&tree, "test").is_empty());
    assert_eq!(attempts(&tree, "notify")[0].status, Status::Ok);
}

/// Every attempt of every captured run: a startup span from the attempt's start to exactly where
/// its first step started (read off the JSON here), or none when no step started or none waited.
#[test]
fn startup_spans_end_where_the_first_step_starts() {
    let (mut with, mut without) = (0, 0);
    for name in FIXTURES {
        let list = fixture_value(name);
        let tree = tree(name);
        let task_runs = list["items"].as_array().unwrap().iter();
        for item in task_runs.filter(|i| i["kind"] == "TaskRun") {
            let uid = item["metadata"]["uid"].as_str().unwrap();
            let status = &item["status"];
            let mut states: Vec<&Value> = status["retriesStatus"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            states.push(status);
            for (attempt, state) in states.into_iter().enumerate() {
                let attempt_id = derive_span_id(uid, attempt as u32);
                let span = tree.spans.iter().find(|s| s.span_id == attempt_id).unwrap();
                let first_step = state["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|step| {
                        step.pointer("/terminated/startedAt")
                            .or_else(|| step.pointer("/running/startedAt"))
                            .and_then(Value::as_str)
                    })
                    .map(time)
                    .min();
                let startup: Vec<_> = tree
                    .spans
                    .iter()
                    .filter(|s| s.role == Role::Startup && s.parent_id == Some(attempt_id))
                    .collect();
                match first_step.filter(|first| *first > span.start) {
                    Some(first) => {
                        with += 1;
                        assert_eq!(startup.len(), 1, "{name} {uid}/{attempt}");
                        let startup = startup[0];
                        assert_eq!((startup.start, startup.end), (span.start, first));
                        assert_eq!(startup.name, "startup");
                        assert_eq!(text(startup, "tekton.span.phase"), Some("startup"));
                        assert_eq!(
                            startup.span_id,
                            derive_attempt_startup_span_id(uid, attempt as u32)
                        );
                        assert_eq!(startup.resource, span.resource);
                        assert_eq!(startup.trace_id, span.trace_id);
                    }
                    None => {
                        without += 1;
                        assert!(startup.is_empty(), "{name} {uid}/{attempt}");
                    }
                }
            }
        }
    }
    assert!(
        with > 0 && without > 0,
        "{with} with a startup, {without} without"
    );
}

#[test]
fn a_cancelled_run_and_its_pending_task_are_cancellations_without_steps() {
    let tree = tree("ship-run-cancel");
    let run = pipeline_span(&tree);
    assert_eq!(text(run, "cicd.pipeline.result"), Some("cancellation"));
    assert!(is_error(run));
    let build = attempts(&tree, "build")[0];
    assert_eq!(
        text(build, "cicd.pipeline.task.run.result"),
        Some("cancellation")
    );
    assert_eq!(text(build, "error.type"), Some("TaskRunCancelled"));
    assert!(steps_of(&tree, build).is_empty(), "build's steps never ran");
    assert_eq!(steps_of(&tree, attempts(&tree, "checkout")[0]).len(), 1);
}

#[test]
fn a_retried_task_is_two_attempts_with_their_own_pods_and_steps() {
    let list = fixture_value("ship-run-retry");
    let tree = tree("ship-run-retry");
    let uid = uid_of(&list, "ship-run-retry-test");
    let test = attempts(&tree, "test");
    assert_eq!(test.len(), 2);
    let (first, second) = (test[0], test[1]);
    assert_eq!(first.span_id, derive_span_id(&uid, 0));
    assert_eq!(second.span_id, derive_span_id(&uid, 1));
    assert_eq!(text(first, "k8s.pod.name"), Some("ship-run-retry-test-pod"));
    assert_eq!(
        text(second, "k8s.pod.name"),
        Some("ship-run-retry-test-pod-retry1")
    );
    assert_eq!(
        text(first, "cicd.pipeline.task.run.result"),
        Some("failure")
    );
    assert!(is_error(first));
    assert_eq!(second.status, Status::Ok);
    assert_eq!(
        (first.start, first.end, second.start, second.end),
        (
            time("2026-11-30T11:21:43Z"),
            time("2026-11-30T11:21:50Z"),
            time("2026-11-30T11:21:50Z"),
            time("2026-11-30T11:21:58Z")
        )
    );
    let failed = steps_of(&tree, first);
    let integration = failed.iter().find(|s| s.name == "integration").unwrap();
    assert_eq!(
        integration.span_id,
        derive_step_span_id(&uid, 0, "integration")
    );
    assert!(is_error(integration));
    let retried = steps_of(&tree, second);
    assert!(retried.iter().all(|s| s.status == Status::Ok));
    assert!(
        retried
            .iter()
            .any(|s| s.span_id == derive_step_span_id(&uid, 1, "integration"))
    );
    assert_eq!(
        text(pipeline_span(&tree), "cicd.pipeline.result"),
        Some("success")
    );
}

/// The captured `ship-run-traced`: Tekton's tracing was on, and Tekton gave `checkout` a
/// `taskrunSpanContext` in a trace other than the PipelineRun's. With run spans on, the run is
/// one trace all the same, rooted at our PipelineRun span: every pod of the run, the PipelineRun
/// span and every attempt share the trace derived from the PipelineRun's uid, and Tekton's spans
/// are links.
#[test]
fn the_traced_run_is_one_trace_rooted_at_our_pipeline_run_span_with_tekton_as_links() {
    let list = fixture_value("ship-run-traced");
    let policy = run_spans_on("");
    let tree = tree_of(&list, &policy);
    let run = pipeline_span(&tree);
    let uid = uid_of(&list, "ship-run-traced");
    assert_eq!(run.trace_id, derive_trace_id(&uid));
    assert_eq!(run.parent_id, None, "our PipelineRun span is the root");
    assert_eq!(run.trace_state, None);
    assert_eq!(run.span_id, derive_pipeline_run_span_id(&uid));
    assert_eq!(run.links.len(), 1);
    assert_eq!(run.links[0].kind, LinkKind::TektonPipelineRun);
    assert_eq!(run.links[0].kind.as_str(), "tekton.pipelinerun");
    assert_eq!(
        (
            run.links[0].trace_id.to_string(),
            run.links[0].span_id.to_string()
        ),
        (
            "a10dfd5fb17a3e6b72c0a2cde091368f".to_owned(),
            "f050add21070d710".to_owned()
        )
    );
    assert_eq!(text(run, "cicd.pipeline.result"), Some("cancellation"));
    assert!(
        tree.spans.iter().all(|s| s.trace_id == run.trace_id),
        "one trace"
    );
    assert_eq!(
        tree.spans.iter().filter(|s| s.parent_id.is_none()).count(),
        1,
        "one root"
    );
    for (task, tekton_trace, tekton_span) in [
        (
            "checkout",
            "63ae3099baa46e6d188e5fd1f6860698",
            "1c8591f1b99128b9",
        ),
        (
            "build",
            "a10dfd5fb17a3e6b72c0a2cde091368f",
            "1f1d6dbb68886951",
        ),
        (
            "test",
            "a10dfd5fb17a3e6b72c0a2cde091368f",
            "51f72dfec1b4cd3b",
        ),
        (
            "scan",
            "a10dfd5fb17a3e6b72c0a2cde091368f",
            "dddf24d82297338a",
        ),
        (
            "notify",
            "a10dfd5fb17a3e6b72c0a2cde091368f",
            "02dab91a7e7b6af5",
        ),
    ] {
        let attempt = attempts(&tree, task)[0];
        assert_eq!(attempt.parent_id, Some(run.span_id), "{task}");
        assert_eq!(attempt.links.len(), 1, "{task}");
        let link = &attempt.links[0];
        assert_eq!(link.kind, LinkKind::TektonTaskRun, "{task}");
        assert_eq!(link.trace_id.to_string(), tekton_trace, "{task}");
        assert_eq!(link.span_id.to_string(), tekton_span, "{task}");
        // Never Tekton's own span id: Tekton exports that span itself.
        assert_ne!(attempt.span_id.to_string(), tekton_span);
    }

    // Every pod of the run, admitted under the same policy, got the exported trace, and each
    // step's TRACEPARENT names exactly its exported step span.
    let injected = injected(&policy);
    let pods: Vec<_> = injected
        .iter()
        .filter(|(pod, _)| pod.starts_with("ship-run-traced-"))
        .collect();
    assert_eq!(pods.len(), 5);
    for (pod, context) in pods {
        assert_eq!(context.trace, run.trace_id, "{pod}");
    }
    let (mut reviewed, mut parented) = (0, 0);
    for entry in std::fs::read_dir(runs_dir().join("reviews")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !file.starts_with("ship-run-traced-") {
            continue;
        }
        let body = std::fs::read(&path).unwrap();
        let review: Value = serde_json::from_slice(&body).unwrap();
        let reply = admission::review(&body, &policy, Mode::Inject).unwrap();
        let (_, patch) = check_reply(&reply.body, review["request"]["uid"].as_str().unwrap());
        let pod = validated_pod(&apply(&review["request"]["object"], &patch));
        let pod_name = pod.metadata.name.clone().unwrap();
        reviewed += 1;
        let attempt = tree
            .spans
            .iter()
            .find(|s| s.role == Role::Attempt && text(s, "k8s.pod.name") == Some(&pod_name))
            .unwrap_or_else(|| panic!("no attempt for {pod_name}"));
        for container in &pod.spec.as_ref().unwrap().containers {
            let Some(step) = container.name.strip_prefix("step-") else {
                continue;
            };
            let (trace, parent, _) =
                parse_traceparent(value(&pod, &container.name, "TRACEPARENT").unwrap()).unwrap();
            assert_eq!(trace, run.trace_id, "{pod_name}/{step}");
            match steps_of(&tree, attempt)
                .into_iter()
                .find(|s| s.name == step)
            {
                Some(exported) => {
                    assert_eq!(parent, exported.span_id, "{pod_name}/{step}");
                    parented += 1;
                }
                // A step of the cancelled run that never ran: no span, its derived id all the same.
                None => {
                    let task_run_uid =
                        &pod.metadata.labels.as_ref().unwrap()["tekton.dev/taskRunUID"];
                    assert_eq!(
                        parent,
                        derive_step_span_id(task_run_uid, 0, step),
                        "{pod_name}/{step}"
                    );
                }
            }
        }
    }
    assert_eq!(reviewed, 5);
    let exported_steps = tree.spans.iter().filter(|s| s.role == Role::Step).count();
    assert_eq!(
        parented, exported_steps,
        "every exported step span names its step"
    );
}

#[test]
fn a_standalone_task_run_is_the_root_of_its_own_trace() {
    let list = fixture_value("lint-run");
    let tree = tree("lint-run");
    let uid = uid_of(&list, "lint-run");
    assert!(tree.spans.iter().all(|s| s.role != Role::PipelineRun));
    let lint = attempts(&tree, "lint")[0];
    assert_eq!(lint.trace_id, derive_trace_id(&uid));
    assert_eq!(lint.parent_id, None);
    assert_eq!(lint.span_id, derive_span_id(&uid, 0));
    assert_eq!(steps_of(&tree, lint).len(), 2);
    assert_eq!(tree.resources[lint.resource].service_name, "lint");
}

/// Tekton's tracing on a standalone TaskRun: the attempt is still the root of the derived trace,
/// with a link to Tekton's TaskRun span.
#[test]
fn a_standalone_task_run_tekton_traced_stays_the_root_and_links_to_tekton() {
    let mut list = fixture_value("lint-run");
    let uid = uid_of(&list, "lint-run");
    list["items"][0]["metadata"]["annotations"]["tekton.dev/taskrunSpanContext"] =
        json!(r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#);
    let tree = tree_of(&list, &run_spans_on(""));
    let lint = attempts(&tree, "lint")[0];
    assert_eq!(lint.trace_id, derive_trace_id(&uid));
    assert_eq!(lint.parent_id, None);
    assert_eq!(lint.links.len(), 1);
    assert_eq!(lint.links[0].kind, LinkKind::TektonTaskRun);
    assert_eq!(lint.links[0].span_id.to_string(), "b7ad6b7169203331");
    assert_eq!(
        lint.links[0].trace_id.to_string(),
        "0af7651916cd43dd8448eb211c80319c"
    );
}

#[test]
fn a_run_that_waited_gets_a_wait_span() {
    let mut list = fixture_value("ship-run-ok");
    let pr_uid = uid_of(&list, "ship-run-ok");
    list["items"][0]["status"]["startTime"] = json!("2026-11-30T11:21:31Z");
    let tree = tree_of(&list, &Policy::embedded_default());
    let run = pipeline_span(&tree);
    let wait: Vec<_> = tree.spans.iter().filter(|s| s.role == Role::Wait).collect();
    assert_eq!(wait.len(), 1);
    assert_eq!(wait[0].span_id, derive_pipeline_run_wait_span_id(&pr_uid));
    assert_eq!(wait[0].parent_id, Some(run.span_id));
    assert_eq!(
        (wait[0].start, wait[0].end),
        (time("2026-11-30T11:21:28Z"), time("2026-11-30T11:21:31Z"))
    );
}

#[test]
fn options_name_deploys_and_urls_and_an_unsampled_run_exports_nothing() {
    let run_spans = r#"
runSpans:
  pipelineRunUrl: "https://d/#/namespaces/{namespace}/pipelineruns/{pipelineRun}"
  taskRunUrl: "https://d/t/{taskRun}?trace={traceId}"
  deploy: {tasks: [scan]}
"#;
    let policy = Policy::from_yaml(&format!(
        "resourceAttributes:\n  deployment.environment.name: prod\n{run_spans}"
    ))
    .unwrap();
    let tree = tree_of(&fixture_value("ship-run-ok"), &policy);
    let run = pipeline_span(&tree);
    assert_eq!(
        text(run, "cicd.pipeline.run.url.full"),
        Some("https://d/#/namespaces/team-r/pipelineruns/ship-run-ok")
    );
    let scan = attempts(&tree, "scan")[0];
    assert_eq!(text(scan, "cicd.pipeline.task.type"), Some("deploy"));
    assert_eq!(text(scan, "deployment.environment.name"), Some("prod"));
    let url = format!("https://d/t/ship-run-ok-scan?trace={}", scan.trace_id);
    assert_eq!(
        text(scan, "cicd.pipeline.task.run.url.full"),
        Some(url.as_str())
    );
    // The label still marks the captured deploy task.
    assert_eq!(
        text(attempts(&tree, "deploy")[0], "cicd.pipeline.task.type"),
        Some("deploy")
    );

    let none = Policy::from_yaml(&format!("sampling:\n  ratio: 0\n{run_spans}")).unwrap();
    let tree = tree_of(&fixture_value("ship-run-ok"), &none);
    assert!(tree.spans.is_empty());
    assert_eq!(tree.unsampled.len(), 1);
    assert!(export_request([&tree]).resource_spans.is_empty());
}

#[test]
fn unfinished_runs_and_missing_uids_are_errors_naming_the_object_and_field() {
    let mut list = fixture_value("ship-run-ok");
    list["items"][0]["status"]["conditions"][0]["status"] = json!("Unknown");
    let parsed = objects_of(&list);
    let runs = group(&parsed).unwrap();
    let e = span_tree(&runs[0], &Policy::embedded_default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("PipelineRun team-r/ship-run-ok: status.conditions"),
        "{e}"
    );

    let mut list = fixture_value("ship-run-retry");
    let test = list["items"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|i| i["metadata"]["name"] == "ship-run-retry-test")
        .unwrap();
    test["status"]["retriesStatus"][0]["conditions"][0]["status"] = json!("Unknown");
    let parsed = objects_of(&list);
    let e = span_tree(&group(&parsed).unwrap()[0], &Policy::embedded_default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("TaskRun team-r/ship-run-retry-test: status.retriesStatus[0].conditions"),
        "{e}"
    );

    // A TaskRun whose PipelineRun is not in the input.
    let mut list = fixture_value("ship-run-ok");
    list["items"].as_array_mut().unwrap().remove(0);
    let e = group(&objects_of(&list)).unwrap_err().to_string();
    assert!(e.contains("tekton.dev/pipelineRunUID"), "{e}");

    // The wrong shape is named by its path, without the value.
    let mut list = fixture_value("lint-run");
    list["items"][0]["status"]["steps"][0]["terminated"]["exitCode"] = json!("secret-ish");
    let e = objects(&list.to_string()).unwrap_err().to_string();
    assert!(e.contains("TaskRun team-r/lint-run"), "{e}");
    assert!(e.contains("status.steps[0].terminated.exitCode"), "{e}");
    assert!(!e.contains("secret-ish"), "{e}");
}

fn objects_of(list: &Value) -> Vec<Object> {
    objects(&list.to_string()).unwrap()
}

#[test]
fn the_otlp_request_carries_every_span_once_with_its_resource() {
    for name in FIXTURES {
        let tree = tree(name);
        let request = export_request([&tree]);
        let spans: Vec<_> = request
            .resource_spans
            .iter()
            .flat_map(|r| r.scope_spans.iter().flat_map(|s| s.spans.iter()))
            .collect();
        assert_eq!(spans.len(), tree.spans.len(), "{name}");
        let ids: BTreeSet<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
        assert_eq!(ids.len(), spans.len(), "{name}: span ids are unique");
        for resource in &request.resource_spans {
            let attrs = &resource.resource.as_ref().unwrap().attributes;
            assert_eq!(attrs[0].key, "service.name");
        }
    }
}

// ---- the property: every parent is in the tree or is Tekton's ----

/// One synthetic TaskRun: attempts (each a list of steps, `Some(exit)` when it ran), and whether
/// Tekton's context is on it, in the PipelineRun's trace or one of its own.
#[derive(Debug, Clone)]
struct SyntheticTask {
    attempts: Vec<Vec<Option<i32>>>,
    tekton: Option<bool>,
    ok: bool,
}

fn synthetic_task() -> impl Strategy<Value = SyntheticTask> {
    (
        prop::collection::vec(prop::collection::vec(prop::option::of(0i32..3), 0..4), 1..4),
        prop::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(|(attempts, tekton, ok)| SyntheticTask {
            attempts,
            tekton,
            ok,
        })
}

const PR_TRACE: &str = "a10dfd5fb17a3e6b72c0a2cde091368f";

fn condition(ok: bool) -> Value {
    json!([{"type": "Succeeded", "status": if ok { "True" } else { "False" },
        "reason": if ok { "Succeeded" } else { "Failed" }}])
}

fn attempt_status(steps: &[Option<i32>], ok: bool, pod: String) -> Value {
    let steps: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, exit)| match exit {
            Some(code) => json!({"name": format!("s{i}"), "terminated": {"exitCode": code,
                "startedAt": "2026-11-30T11:00:01Z", "finishedAt": "2026-11-30T11:00:02Z"}}),
            None => json!({"name": format!("s{i}")}),
        })
        .collect();
    json!({"podName": pod, "startTime": "2026-11-30T11:00:01Z",
        "completionTime": "2026-11-30T11:00:03Z", "conditions": condition(ok), "steps": steps})
}

fn synthetic_run(pr_tekton: bool, tasks: &[SyntheticTask]) -> (Value, BTreeSet<String>) {
    let mut tekton_spans = BTreeSet::new();
    let mut status = json!({"startTime": "2026-11-30T11:00:01Z",
        "completionTime": "2026-11-30T11:00:09Z", "conditions": condition(true)});
    if pr_tekton {
        status["spanContext"] =
            json!({"traceparent": format!("00-{PR_TRACE}-f050add21070d710-01")});
        tekton_spans.insert("f050add21070d710".to_owned());
    }
    let mut items = vec![json!({"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
        "metadata": {"name": "p", "namespace": "ns", "uid": "pr-uid",
            "creationTimestamp": "2026-11-30T11:00:00Z", "labels": {"tekton.dev/pipeline": "ship"}},
        "status": status})];
    for (t, task) in tasks.iter().enumerate() {
        let name = format!("p-t{t}");
        let mut annotations = json!({});
        if let Some(same) = task.tekton {
            let trace = if same {
                PR_TRACE.to_owned()
            } else {
                // Never all zeros (t + 1): an all-zero trace id is not a valid context.
                format!("{:032x}", t + 1)
            };
            let span = format!("{:016x}", t + 1);
            annotations["tekton.dev/taskrunSpanContext"] =
                json!(json!({"traceparent": format!("00-{trace}-{span}-01")}).to_string());
            tekton_spans.insert(span);
        }
        let (last, earlier) = task.attempts.split_last().unwrap();
        let mut status = attempt_status(last, task.ok, format!("{name}-pod"));
        status["retriesStatus"] = earlier
            .iter()
            .enumerate()
            .map(|(i, steps)| attempt_status(steps, false, format!("{name}-pod-retry{i}")))
            .collect();
        items.push(json!({"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("tr-uid-{t}"),
                "creationTimestamp": "2026-11-30T11:00:01Z",
                "labels": {"tekton.dev/pipelineRunUID": "pr-uid", "tekton.dev/pipelineRun": "p",
                    "tekton.dev/pipelineTask": format!("t{t}")},
                "annotations": annotations},
            "status": status}));
    }
    (
        json!({"apiVersion": "v1", "kind": "List", "items": items}),
        tekton_spans,
    )
}

proptest! {
    #[test]
    fn a_pipeline_run_is_one_trace_under_its_span_with_tekton_as_links(
        pr_tekton in any::<bool>(),
        tasks in prop::collection::vec(synthetic_task(), 0..5),
    ) {
        let (list, tekton_spans) = synthetic_run(pr_tekton, &tasks);
        let tree = tree_of(&list, &Policy::embedded_default());
        let ids: std::collections::HashMap<SpanId, TraceId> =
            tree.spans.iter().map(|s| (s.span_id, s.trace_id)).collect();
        prop_assert_eq!(ids.len(), tree.spans.len(), "span ids are unique");
        let attempts: usize = tasks.iter().map(|t| t.attempts.len()).sum();
        let steps: usize = tasks
            .iter()
            .flat_map(|t| t.attempts.iter().flatten())
            .filter(|s| s.is_some())
            .count();
        // The run, its wait (it started a second after creation), attempts and steps that ran.
        prop_assert_eq!(tree.spans.len(), 2 + attempts + steps);
        let run = pipeline_span(&tree);
        prop_assert_eq!(run.parent_id, None);
        prop_assert_eq!(run.trace_id, derive_trace_id("pr-uid"));
        for span in &tree.spans {
            prop_assert_eq!(span.trace_id, run.trace_id, "{} in another trace", &span.name);
            if span.role != Role::PipelineRun {
                prop_assert!(span.parent_id.is_some_and(|p| ids.contains_key(&p)), "{} not under ours", &span.name);
            }
            for link in &span.links {
                prop_assert!(tekton_spans.contains(&link.span_id.to_string()), "{} links to a span not Tekton's", &span.name);
            }
        }
        // Tekton's PipelineRun span is linked only when Tekton's tracing was really on: a TaskRun
        // carries Tekton's context in the same trace.
        let really_on = pr_tekton && tasks.iter().any(|t| t.tekton == Some(true));
        prop_assert_eq!(run.links.len(), usize::from(really_on));
        for (t, task) in tasks.iter().enumerate() {
            for attempt in tree.spans.iter().filter(|s| s.role == Role::Attempt && s.name == format!("t{t}")) {
                prop_assert_eq!(attempt.links.len(), usize::from(task.tekton.is_some()));
                prop_assert!(attempt.links.iter().all(|l| l.kind == LinkKind::TektonTaskRun));
            }
        }
    }
}

// ---- the command ----

fn spans_cli(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .arg("spans")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The fixture as `kubectl get pipelinerun,taskrun -o yaml` prints it, and as separate YAML
/// documents.
fn yaml_forms(list: &Value) -> [String; 2] {
    let as_list = serde_norway::to_string(list).unwrap();
    let documents = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| serde_norway::to_string(item).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    [as_list, documents]
}

#[test]
fn the_command_prints_the_same_tree_for_json_and_yaml_and_valid_otlp_json() {
    for name in FIXTURES {
        let path = runs_dir().join(format!("{name}.json"));
        let path = path.to_str().unwrap();
        let (ok, tree_text, err) = spans_cli(&[path], None);
        assert!(ok, "{name}: {err}");
        let tree = tree(name);
        for span in &tree.spans {
            assert!(
                tree_text.contains(&format!("span {}", span.span_id)),
                "{name}: {} missing from the printed tree",
                span.name
            );
        }
        for yaml in yaml_forms(&fixture_value(name)) {
            let (ok, from_yaml, err) = spans_cli(&["-"], Some(&yaml));
            assert!(ok, "{name}: {err}");
            assert_eq!(from_yaml, tree_text, "{name}: YAML and JSON agree");
        }

        let (ok, json_text, err) = spans_cli(&["--output", "otlp-json", path], None);
        assert!(ok, "{name}: {err}");
        let request: ExportTraceServiceRequest = serde_json::from_str(&json_text).unwrap();
        assert_eq!(request, export_request([&tree]), "{name}");
        let raw: Value = serde_json::from_str(&json_text).unwrap();
        let first = &raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(first["traceId"].as_str().unwrap().len(), 32, "hex trace id");
        assert_eq!(first["spanId"].as_str().unwrap().len(), 16, "hex span id");
    }
}

#[test]
fn the_command_refuses_bad_input_in_one_line() {
    let mut unfinished = fixture_value("ship-run-ok");
    unfinished["items"][0]["status"]["conditions"][0]["status"] = json!("Unknown");
    let mut no_uid = fixture_value("lint-run");
    no_uid["items"][0]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("uid");
    let cases = [
        (
            unfinished.to_string(),
            "PipelineRun team-r/ship-run-ok: status.conditions",
        ),
        (no_uid.to_string(), "TaskRun team-r/lint-run: metadata.uid"),
        ("{not json".to_owned(), "not valid JSON"),
        ("a: [b\n".to_owned(), "not valid YAML"),
        ("kind: Pod\napiVersion: v1\n".to_owned(), "document 1: kind"),
        (
            "kind: TaskRun\napiVersion: tekton.dev/v1beta1\nmetadata: {name: x}\n".to_owned(),
            "TaskRun x: apiVersion: expected tekton.dev/v1",
        ),
        (
            String::new(),
            "expected at least one PipelineRun or TaskRun",
        ),
    ];
    for (input, expected) in cases {
        let (ok, out, err) = spans_cli(&["-"], Some(&input));
        assert!(!ok, "{expected}: accepted");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(expected), "{expected}: {err}");
    }
    let (ok, _, err) = spans_cli(&["--task-run-url", "https://d/{nope}", "-"], Some(""));
    assert!(!ok);
    assert!(err.contains("--task-run-url"), "{err}");
}

/// With `runSpans.enabled`, the webhook gives each step its own span as parent, and that span is
/// the step span the exporter builds for the same attempt: the steps' own telemetry nests under
/// their step. A step that never ran has no span (and its program sent nothing).
#[test]
fn with_run_spans_each_step_is_parented_under_its_own_step_span() {
    let policy = Policy::from_yaml("runSpans:\n  enabled: true\n").unwrap();
    let mut step_spans: BTreeMap<(String, String), (TraceId, SpanId)> = BTreeMap::new();
    for name in FIXTURES {
        let tree = tree_of(&fixture_value(name), &policy);
        for step in tree.spans.iter().filter(|s| s.role == Role::Step) {
            let attempt = tree
                .spans
                .iter()
                .find(|a| Some(a.span_id) == step.parent_id)
                .expect("a step's parent is its attempt");
            let pod = text(attempt, "k8s.pod.name").unwrap().to_owned();
            let container = text(step, "k8s.container.name").unwrap().to_owned();
            step_spans.insert((pod, container), (step.trace_id, step.span_id));
        }
    }
    let (mut parented, mut never_ran) = (0, 0);
    for entry in std::fs::read_dir(runs_dir().join("reviews")).unwrap() {
        let body = std::fs::read(entry.unwrap().path()).unwrap();
        let review: Value = serde_json::from_slice(&body).unwrap();
        let reply = admission::review(&body, &policy, Mode::Inject).unwrap();
        let (_, patch) = check_reply(&reply.body, review["request"]["uid"].as_str().unwrap());
        let pod = validated_pod(&apply(&review["request"]["object"], &patch));
        let pod_name = pod.metadata.name.clone().unwrap();
        let containers = &pod.spec.as_ref().unwrap().containers;
        let mut parents = BTreeSet::new();
        for container in containers.iter().filter(|c| c.name.starts_with("step-")) {
            let traceparent = value(&pod, &container.name, "TRACEPARENT").unwrap();
            let (trace, parent, _) = parse_traceparent(traceparent).unwrap();
            assert!(
                parents.insert(parent.0),
                "{pod_name}: two steps share a parent"
            );
            match step_spans.get(&(pod_name.clone(), container.name.clone())) {
                Some(&span) => {
                    assert_eq!(span, (trace, parent), "{pod_name}/{}", container.name);
                    parented += 1;
                }
                None => never_ran += 1,
            }
        }
    }
    // Every step span of every run is the parent of exactly its container's steps.
    assert_eq!(parented, step_spans.len(), "every step span has its step");
    assert!(never_ran > 0, "the cancelled run's pending steps never ran");
}

/// The printed tree is what the exporter sends, which only a policy with run spans on does: a
/// preview under a policy with them off says so, in a note, instead of silently differing from
/// what that policy's pods got.
#[test]
fn the_preview_notes_a_policy_with_run_spans_off() {
    let path = runs_dir().join("ship-run-traced.json");
    let path = path.to_str().unwrap();
    let (ok, off, err) = spans_cli(&[path], None);
    assert!(ok, "{err}");
    assert!(
        off.contains("note: the policy has runSpans.enabled: false"),
        "{off}"
    );
    let dir = std::env::temp_dir().join(format!("spans-preview-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, "runSpans:\n  enabled: true\n").unwrap();
    let (ok, on, err) = spans_cli(&["--policy", policy.to_str().unwrap(), path], None);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ok, "{err}");
    assert!(!on.contains("runSpans.enabled: false"), "{on}");
    // The same spans either way: the note is the only difference.
    let without_note: Vec<&str> = off
        .lines()
        .filter(|l| !l.contains("runSpans.enabled: false"))
        .collect();
    assert_eq!(without_note, on.lines().collect::<Vec<_>>());
}
