//! The decision on the captured AdmissionReviews: every assertion is on the pod that results
//! from applying the reply's patch, as the API server would.

// The path is spelled out because rustfmt, seeing the folder tests/fixtures/ next to this file,
// would look for the module there.
#[path = "support"]
mod support {
    pub mod review;
}

use lightstep_tekton_webhook::admission::decide::{Mode, SkipReason};
use lightstep_tekton_webhook::admission::{self, Outcome};
use lightstep_tekton_webhook::contract::{derive_span_id, derive_trace_id};
use lightstep_tekton_webhook::policy::Policy;
use serde_json::{Value, json};
use support::review::*;

const TRACE_ID_LABEL: &str = "lightstep-tekton.io/trace-id";

struct Run {
    reply: admission::Reply,
    before: Value,
    after: Value,
    pod: k8s_openapi::api::core::v1::Pod,
}

/// Runs a review through the server's path and returns the validated, patched pod.
fn run_review(body: &[u8], policy: &Policy, mode: Mode) -> Run {
    let review: Value = serde_json::from_slice(body).unwrap();
    let uid = review["request"]["uid"].as_str().unwrap().to_owned();
    let reply = admission::review(body, policy, mode).expect("a valid review");
    let (_, patch) = check_reply(&reply.body, &uid);
    let before = review["request"]["object"].clone();
    let after = apply(&before, &patch);
    let pod = validated_pod(&after);
    // Reinvocation: deciding again on the patched pod gives no patch.
    let again = admission::review(&review_of(&uid, "ns", &after), policy, mode).unwrap();
    let (v, second) = check_reply(&again.body, &uid);
    assert!(
        second.0.is_empty(),
        "second patch not empty: {}",
        serde_json::to_string(&second).unwrap()
    );
    assert!(v["response"].get("patch").is_none());
    Run {
        reply,
        before,
        after,
        pod,
    }
}

fn run(name: &str) -> Run {
    run_review(
        &fixture_bytes(name),
        &Policy::embedded_default(),
        Mode::Inject,
    )
}

fn run_object(object: &Value, policy: &Policy, mode: Mode) -> Run {
    run_review(&review_of("uid-x", "team-a", object), policy, mode)
}

fn object_of(name: &str) -> Value {
    fixture(name)["request"]["object"].clone()
}

fn label<'a>(run: &'a Run, key: &str) -> Option<&'a str> {
    run.pod
        .metadata
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn traceparent(run: &Run, container: &str) -> String {
    value(&run.pod, container, "TRACEPARENT")
        .unwrap_or_else(|| panic!("{container} has no TRACEPARENT"))
        .to_owned()
}

/// Every original env entry is still there, in place (resource attributes may only grow).
fn assert_env_preserved(run: &Run) {
    let before: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(run.before.clone()).unwrap();
    let spec_before = before.spec.unwrap();
    let spec_after = run.pod.spec.as_ref().unwrap();
    for (b, a) in spec_before.containers.iter().zip(&spec_after.containers) {
        let after_env = a.env.as_deref().unwrap_or_default();
        for (i, e) in b.env.iter().flatten().enumerate() {
            let now = &after_env[i];
            assert_eq!(now.name, e.name, "{}: env[{i}] moved", b.name);
            if e.name == "OTEL_RESOURCE_ATTRIBUTES" {
                assert!(
                    now.value
                        .as_deref()
                        .unwrap()
                        .starts_with(e.value.as_deref().unwrap())
                );
            } else {
                assert_eq!(now, e, "{}: {} changed", b.name, e.name);
            }
        }
        assert_eq!(b.env_from, a.env_from);
    }
    assert_eq!(
        spec_before.init_containers, spec_after.init_containers,
        "init containers touched"
    );
    for (k, v) in before.metadata.labels.iter().flatten() {
        assert_eq!(label(run, k), Some(v.as_str()), "label {k} lost");
    }
    for (k, v) in before.metadata.annotations.iter().flatten() {
        assert_eq!(
            run.pod.metadata.annotations.as_ref().unwrap().get(k),
            Some(v),
            "annotation {k} lost"
        );
    }
}

fn assert_token_is_a_reference(run: &Run, container: &str) {
    let token = var(&run.pod, container, "LS_ACCESS_TOKEN").expect("token variable");
    assert!(token.value.is_none(), "the token must never be a value");
    let secret = token
        .value_from
        .as_ref()
        .and_then(|f| f.secret_key_ref.as_ref())
        .expect("secretKeyRef");
    assert_eq!(secret.name, "lightstep-access-token");
    assert_eq!(secret.key, "access-token");
    assert_eq!(secret.optional, Some(true));
    let headers = position(&run.pod, container, "OTEL_EXPORTER_OTLP_HEADERS").unwrap();
    let at = position(&run.pod, container, "LS_ACCESS_TOKEN").unwrap();
    assert!(
        at < headers,
        "headers must come after the token for $(LS_ACCESS_TOKEN)"
    );
    assert_eq!(
        value(&run.pod, container, "OTEL_EXPORTER_OTLP_HEADERS"),
        Some("lightstep-access-token=$(LS_ACCESS_TOKEN)")
    );
}

#[test]
fn every_fixture_gives_a_patch_that_applies_and_a_valid_pod() {
    for name in fixture_names() {
        let r = run(&name);
        assert_env_preserved(&r);
        let tekton = r.before["metadata"]["labels"]["tekton.dev/taskRun"].is_string();
        if tekton {
            assert_eq!(r.reply.outcome, Outcome::Patched, "{name}");
            assert!(label(&r, TRACE_ID_LABEL).is_some(), "{name}");
            for c in &r.pod.spec.as_ref().unwrap().containers {
                if c.name.starts_with("step-") {
                    let tp = traceparent(&r, &c.name);
                    assert!(
                        tp.contains(label(&r, TRACE_ID_LABEL).unwrap())
                            || name.contains("standalone")
                    );
                }
            }
        } else {
            assert_eq!(
                r.reply.outcome,
                Outcome::Skipped(SkipReason::NotTaskRunPod),
                "{name}"
            );
            assert_eq!(r.before, r.after, "{name}: plain pods are not touched");
        }
    }
}

#[test]
fn tekton_span_context_is_used_when_present() {
    let r = run("tekton-pipeline-task-traced.json");
    let step = "step-kubectl-apply";
    assert_eq!(
        traceparent(&r, step),
        "00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01"
    );
    assert_eq!(
        label(&r, TRACE_ID_LABEL),
        Some("d22941a3ef1cc2446bcdf5850960f941")
    );
    assert_eq!(
        label(&r, "lightstep-tekton.io/pipeline"),
        Some("build-and-deploy")
    );
    assert_eq!(
        label(&r, "lightstep-tekton.io/commit"),
        Some("4f3c2a1b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a")
    );
    // The step's own service name wins.
    assert_eq!(
        value(&r.pod, step, "OTEL_SERVICE_NAME"),
        Some("my-deployer")
    );
    let attrs = value(&r.pod, step, "OTEL_RESOURCE_ATTRIBUTES").unwrap();
    for expected in [
        "cicd.pipeline.name=build-and-deploy",
        "cicd.pipeline.run.id=59eb5727-df8e-49fc-a564-75a1aef1d8df",
        "cicd.pipeline.task.name=deploy",
        "cicd.pipeline.task.run.id=f51a1622-7726-451e-82d4-1422e51dfa8e",
        "vcs.ref.head.revision=4f3c2a1b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a",
        "vcs.repository.url.full=https://github.com/acme/shop",
        "vcs.ref.base.name=main",
        "vcs.owner.name=acme",
        "vcs.repository.name=shop",
        "k8s.namespace.name=team-a",
        "k8s.pod.name=build-and-deploy-run-1-deploy-pod",
    ] {
        assert!(
            attrs.split(',').any(|a| a == expected),
            "{expected} missing in {attrs}"
        );
    }
    assert_eq!(
        value(&r.pod, step, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("https://ingest.lightstep.com:443")
    );
    assert_eq!(
        value(&r.pod, step, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        Some("grpc")
    );
    assert_eq!(
        value(&r.pod, step, "OTEL_PROPAGATORS"),
        Some("tracecontext,baggage")
    );
    assert_token_is_a_reference(&r, step);
    let annotations = r.pod.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations["lightstep-tekton.io/traceparent"],
        traceparent(&r, step)
    );
    assert_eq!(
        annotations["lightstep-tekton.io/injected"],
        Policy::embedded_default().marker()
    );
}

#[test]
fn tasks_of_one_pipeline_run_share_a_trace() {
    let task = run("tekton-pipeline-task-traced.json");
    let finally = run("tekton-pipeline-finally-traced.json");
    assert_eq!(
        label(&task, TRACE_ID_LABEL),
        label(&finally, TRACE_ID_LABEL)
    );
    assert_ne!(
        traceparent(&task, "step-kubectl-apply"),
        traceparent(&finally, "step-send")
    );

    // Without Tekton's annotation the ids are derived, and still shared.
    let derived = |name: &str| {
        let mut object = object_of(name);
        object["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("tekton.dev/taskrunSpanContext");
        run_object(&object, &Policy::embedded_default(), Mode::Inject)
    };
    let a = derived("tekton-pipeline-task-traced.json");
    let b = derived("tekton-pipeline-finally-traced.json");
    let expected = derive_trace_id("59eb5727-df8e-49fc-a564-75a1aef1d8df").to_string();
    assert_eq!(label(&a, TRACE_ID_LABEL), Some(expected.as_str()));
    assert_eq!(label(&b, TRACE_ID_LABEL), Some(expected.as_str()));
    let parent_a = derive_span_id("f51a1622-7726-451e-82d4-1422e51dfa8e", 0);
    assert_eq!(
        traceparent(&a, "step-kubectl-apply"),
        format!("00-{expected}-{parent_a}-01")
    );
    assert_ne!(
        traceparent(&a, "step-kubectl-apply"),
        traceparent(&b, "step-send")
    );
}

#[test]
fn malformed_span_context_falls_back_to_derivation() {
    for bad in [
        "not json",
        "{}",
        r#"{"traceparent":"00-00000000000000000000000000000000-c99c7108eeb58e76-01"}"#,
        r#"{"traceparent":"00-D22941A3EF1CC2446BCDF5850960F941-c99c7108eeb58e76-01"}"#,
    ] {
        let mut object = object_of("tekton-pipeline-task-traced.json");
        object["metadata"]["annotations"]["tekton.dev/taskrunSpanContext"] = json!(bad);
        let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
        let expected = derive_trace_id("59eb5727-df8e-49fc-a564-75a1aef1d8df").to_string();
        assert_eq!(label(&r, TRACE_ID_LABEL), Some(expected.as_str()), "{bad}");
        assert_eq!(r.reply.outcome, Outcome::Patched);
    }
}

#[test]
fn tracestate_is_passed_on_and_escaped() {
    let mut object = object_of("tekton-pipeline-task-traced.json");
    object["metadata"]["annotations"]["tekton.dev/taskrunSpanContext"] = json!(
        r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01","tracestate":"ls=a$(HOME)b"}"#
    );
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    // `$$` reaches the process as `$`: the kubelet does not expand the reference.
    assert_eq!(
        value(&r.pod, "step-kubectl-apply", "TRACESTATE"),
        Some("ls=a$$(HOME)b")
    );
}

#[test]
fn retries_get_their_own_parent_span() {
    let mut object = object_of("tekton-matrix-triggers.json");
    let first = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    object["metadata"]["name"] = json!("release-matrix-build-image-0-pod-retry1");
    let retry = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert_eq!(label(&first, TRACE_ID_LABEL), label(&retry, TRACE_ID_LABEL));
    let uid = "094234b1-9583-41d1-ad78-88d41dbd99bc";
    assert!(traceparent(&first, "step-kaniko").contains(&derive_span_id(uid, 0).to_string()));
    assert!(traceparent(&retry, "step-kaniko").contains(&derive_span_id(uid, 1).to_string()));
}

#[test]
fn matrix_run_without_tracing_is_derived_from_the_pipeline_run() {
    let r = run("tekton-matrix-triggers.json");
    let expected = derive_trace_id("04f7d14a-a3a7-44c8-b597-c5f3c5e97357").to_string();
    assert_eq!(label(&r, TRACE_ID_LABEL), Some(expected.as_str()));
    let attrs = value(&r.pod, "step-kaniko", "OTEL_RESOURCE_ATTRIBUTES").unwrap();
    assert!(
        attrs.contains("tekton.trigger.eventlistener=github-listener"),
        "{attrs}"
    );
    assert!(attrs.contains("tekton.trigger.name=github-push"), "{attrs}");
    assert_eq!(
        value(&r.pod, "step-kaniko", "OTEL_SERVICE_NAME"),
        Some("release-matrix")
    );
}

#[test]
fn standalone_task_run_keeps_the_steps_own_settings() {
    let r = run("tekton-taskrun-standalone.json");
    for step in ["step-lint", "step-report"] {
        // stepTemplate's TRACEPARENT and exporter endpoint are the user's: kept.
        assert_eq!(
            traceparent(&r, step),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(
            value(&r.pod, step, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("http://otel-collector.observability:4317")
        );
        // The step configures its own exporter: no token goes to an endpoint the policy did
        // not choose.
        assert!(var(&r.pod, step, "LS_ACCESS_TOKEN").is_none());
        assert!(var(&r.pod, step, "OTEL_EXPORTER_OTLP_HEADERS").is_none());
        assert!(var(&r.pod, step, "OTEL_EXPORTER_OTLP_PROTOCOL").is_none());
        assert_eq!(
            value(&r.pod, step, "OTEL_SERVICE_NAME"),
            Some("lint-standalone")
        );
        assert_eq!(
            value(&r.pod, step, "HTTP_PROXY"),
            Some("http://proxy.internal:3128")
        );
    }
    let gh = var(&r.pod, "step-report", "GITHUB_TOKEN").unwrap();
    assert_eq!(
        gh.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "gh"
    );
    let expected = derive_trace_id("43cd2522-9d77-43e3-9bcf-f8aaf1946752").to_string();
    assert_eq!(label(&r, TRACE_ID_LABEL), Some(expected.as_str()));
    assert_eq!(
        label(&r, "app.kubernetes.io/part-of"),
        Some("checkout-service")
    );
}

#[test]
fn enforce_replaces_the_governed_exporter_and_warns() {
    let r = run_review(
        &fixture_bytes("tekton-taskrun-standalone.json"),
        &Policy::embedded_default(),
        Mode::Enforce,
    );
    for step in ["step-lint", "step-report"] {
        assert_eq!(
            value(&r.pod, step, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("https://ingest.lightstep.com:443")
        );
        assert_token_is_a_reference(&r, step);
        // Not governed: the step's trace context and proxy stay.
        assert_eq!(
            traceparent(&r, step),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(
            value(&r.pod, step, "HTTP_PROXY"),
            Some("http://proxy.internal:3128")
        );
    }
    assert!(
        r.reply
            .warnings
            .iter()
            .any(|w| w.contains("replaced OTEL_EXPORTER_OTLP_ENDPOINT")),
        "{:?}",
        r.reply.warnings
    );
}

#[test]
fn enforce_moves_headers_defined_before_the_token() {
    let mut object = object_of("tekton-matrix-triggers.json");
    object["spec"]["containers"][0]["env"] = json!([
        {"name": "OTEL_EXPORTER_OTLP_HEADERS", "value": "x-team=a"},
        {"name": "KEEP", "value": "1"},
    ]);
    let r = run_object(&object, &Policy::embedded_default(), Mode::Enforce);
    assert_token_is_a_reference(&r, "step-kaniko");
    assert_eq!(value(&r.pod, "step-kaniko", "KEEP"), Some("1"));
    let names: Vec<&str> = env_of(&r.pod, "step-kaniko")
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "OTEL_EXPORTER_OTLP_HEADERS")
            .count(),
        1
    );
}

#[test]
fn opt_out_is_honoured_in_inject_mode_and_overridden_when_enforced() {
    let mut object = object_of("tekton-pipeline-task-traced.json");
    object["metadata"]["annotations"]["lightstep-tekton.io/inject"] = json!("false");
    let skipped = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert_eq!(
        skipped.reply.outcome,
        Outcome::Skipped(SkipReason::OptedOut)
    );
    assert_eq!(skipped.before, skipped.after);

    let enforced = run_object(&object, &Policy::embedded_default(), Mode::Enforce);
    assert_eq!(enforced.reply.outcome, Outcome::Patched);
    assert!(var(&enforced.pod, "step-kubectl-apply", "TRACEPARENT").is_some());
    assert!(
        enforced
            .reply
            .warnings
            .iter()
            .any(|w| w.contains("ignored"))
    );
}

#[test]
fn sidecars_only_when_the_policy_says_so() {
    let r = run("tekton-pipeline-sidecar-traced.json");
    assert!(var(&r.pod, "sidecar-docker-daemon", "TRACEPARENT").is_none());
    assert_eq!(value(&r.pod, "step-build", "GOFLAGS"), Some("-mod=vendor"));
    assert_eq!(
        traceparent(&r, "step-build"),
        traceparent(&r, "step-unit-test")
    );

    let policy =
        Policy::from_yaml("containers: {sidecars: true, exclude: [step-unit-test]}").unwrap();
    let r = run_review(
        &fixture_bytes("tekton-pipeline-sidecar-traced.json"),
        &policy,
        Mode::Inject,
    );
    assert!(var(&r.pod, "sidecar-docker-daemon", "TRACEPARENT").is_some());
    assert!(var(&r.pod, "step-unit-test", "TRACEPARENT").is_none());
    assert!(var(&r.pod, "step-build", "TRACEPARENT").is_some());
}

#[test]
fn forty_steps_all_join_one_trace() {
    let r = run("tekton-40-steps.json");
    let containers = &r.pod.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 40);
    let first = traceparent(&r, &containers[0].name);
    for (i, c) in containers.iter().enumerate() {
        assert_eq!(traceparent(&r, &c.name), first);
        assert_eq!(
            value(&r.pod, &c.name, "STEP_INDEX"),
            Some(i.to_string().as_str())
        );
        assert_token_is_a_reference(&r, &c.name);
    }
    assert_eq!(
        value(&r.pod, "step-step-00", "OTEL_SERVICE_NAME"),
        Some("many-steps")
    );
}

#[test]
fn env_from_sources_are_respected_by_default() {
    let mut object = object_of("tekton-matrix-triggers.json");
    object["spec"]["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "otel"}}]);
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    let step = "step-kaniko";
    // Per-run trace context is injected; settings a ConfigMap may define are not.
    assert!(var(&r.pod, step, "TRACEPARENT").is_some());
    for name in [
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "LS_ACCESS_TOKEN",
    ] {
        assert!(
            var(&r.pod, step, name).is_none(),
            "{name} injected over envFrom"
        );
    }

    // A prefix that cannot produce our names does not get in the way.
    object["spec"]["containers"][0]["envFrom"] =
        json!([{"prefix": "APP_", "secretRef": {"name": "app"}}]);
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert!(var(&r.pod, step, "OTEL_EXPORTER_OTLP_ENDPOINT").is_some());
    assert_token_is_a_reference(&r, step);

    // `envFrom: override` injects anyway.
    object["spec"]["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "otel"}}]);
    let policy = Policy::from_yaml("envFrom: override").unwrap();
    let r = run_object(&object, &policy, Mode::Inject);
    assert!(var(&r.pod, step, "OTEL_SERVICE_NAME").is_some());
    assert_token_is_a_reference(&r, step);
}

#[test]
fn resource_attributes_merge_with_the_steps_own() {
    let mut object = object_of("tekton-matrix-triggers.json");
    object["spec"]["containers"][0]["env"] = json!([
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "team=payments,cicd.pipeline.name=mine"},
    ]);
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    let attrs = value(&r.pod, "step-kaniko", "OTEL_RESOURCE_ATTRIBUTES").unwrap();
    assert!(
        attrs.starts_with("team=payments,cicd.pipeline.name=mine,"),
        "{attrs}"
    );
    assert_eq!(attrs.matches("cicd.pipeline.name=").count(), 1, "{attrs}");
    assert!(attrs.contains("cicd.pipeline.run.id=04f7d14a-a3a7-44c8-b597-c5f3c5e97357"));
}

#[test]
fn generic_otlp_profile_injects_no_token() {
    let policy = Policy::from_yaml(
        "profile: otlp\nexporter: {endpoint: 'http://otel-collector.observability:4318', protocol: http/protobuf}\n",
    )
    .unwrap();
    let r = run_review(
        &fixture_bytes("tekton-matrix-triggers.json"),
        &policy,
        Mode::Inject,
    );
    assert_eq!(
        value(&r.pod, "step-kaniko", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://otel-collector.observability:4318")
    );
    assert_eq!(
        value(&r.pod, "step-kaniko", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        Some("http/protobuf")
    );
    assert!(var(&r.pod, "step-kaniko", "LS_ACCESS_TOKEN").is_none());
    assert!(var(&r.pod, "step-kaniko", "OTEL_EXPORTER_OTLP_HEADERS").is_none());
}

#[test]
fn sampling_ratio_zero_clears_the_sampled_flag_of_derived_contexts() {
    let policy = Policy::from_yaml("sampling: {ratio: 0}").unwrap();
    let r = run_review(
        &fixture_bytes("tekton-matrix-triggers.json"),
        &policy,
        Mode::Inject,
    );
    assert!(traceparent(&r, "step-kaniko").ends_with("-00"));
    // Tekton's own decision is kept when its context is used.
    let r = run_review(
        &fixture_bytes("tekton-pipeline-task-traced.json"),
        &policy,
        Mode::Inject,
    );
    assert!(traceparent(&r, "step-kubectl-apply").ends_with("-01"));
}

#[test]
fn existing_labels_are_never_overwritten() {
    let mut object = object_of("tekton-matrix-triggers.json");
    object["metadata"]["labels"][TRACE_ID_LABEL] = json!("mine");
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert_eq!(label(&r, TRACE_ID_LABEL), Some("mine"));
}

#[test]
fn odd_label_values_are_sanitised() {
    let mut object = object_of("tekton-pipeline-task-traced.json");
    object["metadata"]["annotations"]["pipelinesascode.tekton.dev/sha"] = json!("x");
    object["metadata"]["labels"]["tekton.dev/pipeline"] = json!("a.b_c-d");
    object["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("pipelinesascode.tekton.dev/sha");
    object["metadata"]["annotations"]["pipelinesascode.tekton.dev/sha"] =
        json!(format!("--{}//", "f".repeat(80)));
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert_eq!(label(&r, "lightstep-tekton.io/pipeline"), Some("a.b_c-d"));
    assert_eq!(label(&r, "lightstep-tekton.io/commit").unwrap().len(), 61);
}

#[test]
fn annotations_at_the_size_limit_are_not_pushed_over_it() {
    let mut object = object_of("tekton-matrix-triggers.json");
    let filler = "x".repeat(ANNOTATIONS_SIZE_LIMIT - 120);
    object["metadata"]["annotations"]["example.com/big"] = json!(filler);
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert!(r.reply.warnings.iter().any(|w| w.contains("size limit")));
    assert!(var(&r.pod, "step-kaniko", "TRACEPARENT").is_some());
    assert!(
        !r.pod
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("lightstep-tekton.io/injected")
    );
}

#[test]
fn pods_without_labels_maps_or_env_get_parents_created() {
    let object = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "t-pod", "labels": {"tekton.dev/taskRun": "t"}},
        "spec": {"containers": [{"name": "step-a", "image": "busybox"}]}
    });
    let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
    assert!(var(&r.pod, "step-a", "TRACEPARENT").is_some());
    assert!(r.pod.metadata.annotations.is_some());
}

#[test]
fn a_changed_policy_updates_the_marker() {
    let r = run("tekton-matrix-triggers.json");
    let policy = Policy::from_yaml("name: team-policy").unwrap();
    let again =
        admission::review(&review_of("u", "team-a", &r.after), &policy, Mode::Inject).unwrap();
    let (_, patch) = check_reply(&again.body, "u");
    let after = apply(&r.after, &patch);
    let pod = validated_pod(&after);
    assert_eq!(
        pod.metadata.annotations.unwrap()["lightstep-tekton.io/injected"],
        policy.marker()
    );
}

/// D4: a step's own endpoint for any signal keeps the token out (inject) or is governed
/// (enforce); the token never shares a container with an endpoint the policy did not choose.
#[test]
fn every_signals_endpoint_belongs_to_the_exporter_group() {
    let foreign = "http://collector.other-team:4318";
    for own in [
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
    ] {
        let mut object = object_of("tekton-matrix-triggers.json");
        object["spec"]["containers"][0]["env"] = json!([{"name": own, "value": foreign}]);
        let r = run_object(&object, &Policy::embedded_default(), Mode::Inject);
        let step = "step-kaniko";
        assert!(var(&r.pod, step, "TRACEPARENT").is_some(), "{own}");
        for name in [
            "LS_ACCESS_TOKEN",
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            assert!(var(&r.pod, step, name).is_none(), "{name} next to {own}");
        }
        assert_eq!(value(&r.pod, step, own), Some(foreign));

        let r = run_object(&object, &Policy::embedded_default(), Mode::Enforce);
        assert_token_is_a_reference(&r, step);
        assert_ne!(value(&r.pod, step, own), Some(foreign), "{own} kept");
        assert!(
            r.reply.warnings.iter().any(|w| w.contains(own)),
            "{own}: {:?}",
            r.reply.warnings
        );
    }

    // Enforce mode, HTTP policy: each signal's endpoint is the policy's, with its own path.
    let policy = Policy::from_yaml(
        "exporter: {endpoint: 'https://ingest.example.com/', protocol: http/protobuf}",
    )
    .unwrap();
    let mut object = object_of("tekton-matrix-triggers.json");
    object["spec"]["containers"][0]["env"] = json!([
        {"name": "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "value": foreign},
        {"name": "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "value": foreign},
    ]);
    let r = run_object(&object, &policy, Mode::Enforce);
    assert_eq!(
        value(&r.pod, "step-kaniko", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        Some("https://ingest.example.com/v1/metrics")
    );
    assert_eq!(
        value(&r.pod, "step-kaniko", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"),
        Some("https://ingest.example.com/v1/logs")
    );

    // An envFrom source may define any of them: enforce mode pins each signal's variables.
    let mut object = object_of("tekton-matrix-triggers.json");
    object["spec"]["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "otel"}}]);
    let r = run_object(&object, &Policy::embedded_default(), Mode::Enforce);
    assert_token_is_a_reference(&r, "step-kaniko");
    for name in [
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        assert_eq!(
            value(&r.pod, "step-kaniko", name),
            Some("https://ingest.lightstep.com:443"),
            "{name}"
        );
    }
}

/// The eleven Pipelines-as-Code annotations, each set to `value`, on a copy of the 40-step pod
/// grown (or cut) to `steps` steps: the adversarial pod of D1.
fn pac_bomb(value: &str, steps: usize) -> Value {
    let mut object = object_of("tekton-40-steps.json");
    for key in PAC_KEYS {
        object["metadata"]["annotations"][format!("pipelinesascode.tekton.dev/{key}")] =
            json!(value);
    }
    let containers = object["spec"]["containers"].as_array_mut().unwrap();
    let template = containers[0].clone();
    containers.resize(steps, template);
    for (i, c) in containers.iter_mut().enumerate() {
        c["name"] = json!(format!("step-s{i}"));
    }
    object
}

/// D1: one small review must not force a huge reply. 40 steps and eleven annotations of 22 KB
/// of commas (each percent-encoded to 66 KB and copied into every step) gave a 40 MB reply.
#[test]
fn an_adversarial_pod_gets_a_small_reply_that_applies() {
    let commas = ",".repeat(22 * 1024);
    let body = review_of("uid-x", "team-a", &pac_bomb(&commas, 40));
    for mode in [Mode::Inject, Mode::Enforce] {
        let r = run_review(&body, &Policy::embedded_default(), mode);
        // The reply is smaller than the review, and the patch within its bound.
        assert!(
            r.reply.body.len() < body.len(),
            "{} bytes",
            r.reply.body.len()
        );
        assert!(r.reply.patch_bytes <= 256 * 1024, "{}", r.reply.patch_bytes);
        for step in ["step-s0", "step-s39"] {
            let attrs = value(&r.pod, step, "OTEL_RESOURCE_ATTRIBUTES").unwrap();
            for pair in attrs.split(',') {
                let (_, v) = pair.split_once('=').unwrap();
                assert!(v.len() <= 255, "{} bytes", v.len());
            }
            assert!(attrs.contains("vcs.ref.head.revision=%2C%2C"), "{attrs}");
        }
    }

    // 150 steps: even bounded, the attributes would pass the patch limit; they are skipped
    // with a warning and the rest is injected.
    let body = review_of("uid-x", "team-a", &pac_bomb(&commas, 150));
    let r = run_review(&body, &Policy::embedded_default(), Mode::Inject);
    assert!(r.reply.patch_bytes <= 256 * 1024, "{}", r.reply.patch_bytes);
    assert!(value(&r.pod, "step-s149", "TRACEPARENT").is_some());
    assert!(var(&r.pod, "step-s149", "OTEL_RESOURCE_ATTRIBUTES").is_none());
    assert!(
        r.reply
            .warnings
            .iter()
            .any(|w| w.contains("OTEL_RESOURCE_ATTRIBUTES not injected")),
        "{:?}",
        r.reply.warnings
    );

    // 400 steps: even the smallest plan would pass it. The containers are left alone, with a
    // warning; the labels and annotations still say which trace the run is in.
    let body = review_of("uid-x", "team-a", &pac_bomb("main", 400));
    let r = run_review(&body, &Policy::embedded_default(), Mode::Enforce);
    assert!(r.reply.patch_bytes <= 256 * 1024, "{}", r.reply.patch_bytes);
    assert!(var(&r.pod, "step-s0", "TRACEPARENT").is_none());
    assert!(label(&r, TRACE_ID_LABEL).is_some());
    assert!(
        r.reply
            .warnings
            .iter()
            .any(|w| w.contains("tracing not injected into the containers")),
        "{:?}",
        r.reply.warnings
    );
}
