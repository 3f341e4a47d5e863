//! The policy parser: bytes → [`Policy::from_yaml`].
//!
//! For any input: no panic, no hang. A policy that parses must resolve to a value that, written
//! back as a policy document with every field explicit, parses to the same policy (so the
//! fingerprint recorded on pods is stable), must display, and must produce a patch for a real
//! Tekton pod that applies and leaves a pod the API server accepts.
#![no_main]

#[path = "../../tests/support/review.rs"]
mod support;

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use lightstep_tekton_webhook::admission;
use lightstep_tekton_webhook::admission::decide::Mode;
use lightstep_tekton_webhook::policy::{
    ContainersSpec, DeploySpec, ExporterSpec, Policy, PolicySpec, Profile, RunSpansSpec,
    SamplingSpec, TokenSpec,
};
use serde_json::Value;

/// A real Tekton pod with Tekton's span context, PaC labels and a sidecar (the fixture with the
/// most the policy can act on), embedded so the target needs no file at run time.
const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/tekton-pipeline-sidecar-traced.json");

static FIXTURE_OBJECT: LazyLock<Value> = LazyLock::new(|| {
    let v: Value = serde_json::from_slice(FIXTURE).expect("fixture is JSON");
    v["request"]["object"].clone()
});

/// The policy as a document with every field explicit.
fn spec_of(p: &Policy) -> PolicySpec {
    PolicySpec {
        name: Some(p.name.clone()),
        profile: Some(Profile::Otlp),
        exporter: Some(ExporterSpec {
            endpoint: Some(p.exporter.endpoint.clone()),
            protocol: Some(p.exporter.protocol),
            traces_endpoint: p.exporter.traces_endpoint.clone(),
        }),
        token: Some(p.token.as_ref().map(|t| TokenSpec {
            secret_name: Some(t.secret_name.clone()),
            secret_key: Some(t.secret_key.clone()),
            header: Some(t.header.clone()),
        })),
        sampling: Some(SamplingSpec {
            ratio: Some(p.sampling_ratio),
        }),
        containers: Some(ContainersSpec {
            sidecars: Some(p.sidecars),
            exclude: Some(p.exclude.clone()),
        }),
        service_name: Some(p.service_name.as_str().to_owned()),
        propagators: Some(p.propagators.split(',').map(str::to_owned).collect()),
        resource_attributes: Some(p.resource_attributes.clone()),
        env_from: Some(p.env_from),
        run_spans: Some(run_spans_of(p)),
    }
}

fn run_spans_of(p: &Policy) -> RunSpansSpec {
    let r = &p.run_spans;
    let url = |t: &Option<_>| {
        t.as_ref().map(
            |t: &lightstep_tekton_webhook::policy::run_spans::UrlTemplate| t.as_str().to_owned(),
        )
    };
    RunSpansSpec {
        enabled: Some(r.enabled),
        trace_url: url(&r.trace_url),
        pipeline_run_url: url(&r.pipeline_run_url),
        task_run_url: url(&r.task_run_url),
        deploy: Some(DeploySpec {
            tasks: Some(r.deploy_tasks.clone()),
            labels: Some(r.deploy_labels.iter().cloned().collect()),
            environment: r.deploy_environment.clone(),
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::from_yaml(text) else {
        return;
    };
    let _ = policy.to_string();

    let yaml = serde_norway::to_string(&spec_of(&policy)).expect("a spec serializes");
    let again = Policy::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("re-serialized policy refused: {e}\n{yaml}"));
    assert_eq!(again, policy, "round trip changed the policy:\n{yaml}");
    assert_eq!(again.fingerprint(), policy.fingerprint());

    for mode in [Mode::Inject, Mode::Enforce] {
        let reply = admission::review(FIXTURE, &policy, mode).expect("the fixture is a review");
        let uid = reply.uid.clone();
        let (_, patch) = support::check_reply(&reply.body, &uid);
        let patched = support::apply(&FIXTURE_OBJECT, &patch);
        support::validated_pod(&patched);
        let second = admission::review(&support::review_of("again", "ns", &patched), &policy, mode)
            .expect("the patched pod is a review");
        let (_, second) = support::check_reply(&second.body, "again");
        assert!(second.0.is_empty(), "second review patched again");
    }
});
