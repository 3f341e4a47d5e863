//! TracingPolicy: selection as a pure function, validation, the status the webhook reports, and
//! the policy modes (audit, enforce) through the admission path on the captured reviews.

mod support {
    pub mod review;
}

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use lightstep_tekton_webhook::admission::decide::{MARKER_ANNOTATION, Mode};
use lightstep_tekton_webhook::admission::{self, Outcome};
use lightstep_tekton_webhook::policy::Policy;
use lightstep_tekton_webhook::policy::resource::{
    self, InvalidKind, PolicyMode, Resolved, TracingPolicy, TracingPolicyStatus, desired_status,
    status_differs,
};
use lightstep_tekton_webhook::policy::selection::{self, Choice, Fallback, Snapshot};
use lightstep_tekton_webhook::runtime::metrics::Registry;
use lightstep_tekton_webhook::serve::metrics::{WebhookMetrics, record_admission};
use serde_json::{Value, json};
use support::review::*;

/// A TracingPolicy from its name, generation and spec (JSON, as written in YAML).
fn tp(name: &str, generation: i64, spec: Value) -> TracingPolicy {
    resource::decode(json!({
        "apiVersion": "lightstep-tekton.io/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": name, "generation": generation},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn resolved(name: &str, priority: i32, selector: Value) -> Resolved {
    resource::resolve(&tp(
        name,
        1,
        json!({"priority": priority, "namespaceSelector": selector}),
    ))
    .unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn chosen<'a>(
    snapshot: &'a Snapshot,
    l: &BTreeMap<String, String>,
    fallback: &'a Policy,
) -> Option<&'a str> {
    selection::select(snapshot, Some(l), fallback).tracing_policy()
}

#[test]
fn highest_priority_wins_and_ties_go_to_the_smallest_name_in_any_order() {
    let fallback = Policy::embedded_default();
    let pool = [
        resolved("b-team", 10, json!({})),
        resolved("a-team", 10, json!({})),
        resolved("z-low", 0, json!({})),
        resolved("c-high", 20, json!({"matchLabels": {"env": "prod"}})),
    ];
    // Every order of input gives the same snapshot, hence the same choice.
    let orders: [[usize; 4]; 4] = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]];
    let snapshots: Vec<Snapshot> = orders
        .iter()
        .map(|o| Snapshot::build(o.iter().map(|&i| Ok(pool[i].clone()))))
        .collect();
    for s in &snapshots {
        assert_eq!(s, &snapshots[0]);
        assert_eq!(
            chosen(s, &labels(&[("env", "prod")]), &fallback),
            Some("c-high")
        );
        assert_eq!(
            chosen(s, &labels(&[("env", "dev")]), &fallback),
            Some("a-team")
        );
    }
    let names: Vec<&str> = snapshots[0]
        .valid()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["c-high", "a-team", "b-team", "z-low"]);
}

/// The rule written the other way round: the maximum by (priority, reversed name) among the
/// matching valid policies.
fn oracle<'a>(pool: &'a [(Resolved, bool)], l: &BTreeMap<String, String>) -> Option<&'a str> {
    pool.iter()
        .filter(|(_, included)| *included)
        .map(|(p, _)| p)
        .filter(|p| p.selector.matches(l))
        .max_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| b.name.cmp(&a.name))
        })
        .map(|p| p.name.as_str())
}

#[test]
fn selection_agrees_with_the_rule_over_every_subset_of_policies_and_many_namespaces() {
    let fallback = Policy::embedded_default();
    let mut pool: Vec<(Resolved, bool)> = [
        resolved("all", 0, json!(null)),
        resolved("prod", 10, json!({"matchLabels": {"env": "prod"}})),
        resolved("prod-eu", 10, json!({"matchLabels": {"env": "prod", "region": "eu"}})),
        resolved(
            "not-sandbox",
            5,
            json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["sandbox"]}]}),
        ),
        resolved(
            "team-any",
            10,
            json!({"matchExpressions": [{"key": "team", "operator": "Exists"}]}),
        ),
        resolved(
            "untagged",
            -5,
            json!({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}),
        ),
        resolved(
            "ab",
            10,
            json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}),
        ),
    ]
    .into_iter()
    .map(|p| (p, false))
    .collect();
    let namespaces = [
        labels(&[]),
        labels(&[("env", "prod")]),
        labels(&[("env", "prod"), ("region", "eu")]),
        labels(&[("env", "prod"), ("tier", "sandbox")]),
        labels(&[("team", "a"), ("tier", "sandbox")]),
        labels(&[("team", "c")]),
        labels(&[("team", "b"), ("env", "prod"), ("region", "eu")]),
        labels(&[("tier", "gold"), ("env", "dev")]),
    ];
    let mut fallbacks = 0;
    for subset in 0u32..(1 << pool.len()) {
        for (i, entry) in pool.iter_mut().enumerate() {
            entry.1 = subset & (1 << i) != 0;
        }
        let snapshot = Snapshot::build(
            pool.iter()
                .filter(|(_, included)| *included)
                .map(|(p, _)| Ok(p.clone())),
        );
        for l in &namespaces {
            let expected = oracle(&pool, l);
            let selected = selection::select(&snapshot, Some(l), &fallback);
            assert_eq!(
                selected.tracing_policy(),
                expected,
                "subset {subset:b}, labels {l:?}"
            );
            if expected.is_none() {
                fallbacks += 1;
                assert_eq!(selected.choice, Choice::Fallback(Fallback::NoMatch));
                assert_eq!(selected.policy, &fallback);
                assert_eq!(selected.mode, PolicyMode::Inject);
            }
        }
    }
    // The combinations exercised both outcomes.
    assert!(fallbacks > 0 && fallbacks < (1 << pool.len()) * namespaces.len());
}

/// Label pairs as written in a table.
type Labels = &'static [(&'static str, &'static str)];

#[test]
fn each_selector_operator_matches_as_in_kubernetes() {
    let cases: &[(Value, Labels, bool)] = &[
        (json!(null), &[], true),
        (json!({}), &[("a", "1")], true),
        (json!({"matchLabels": {"a": "1"}}), &[("a", "1")], true),
        (json!({"matchLabels": {"a": "1"}}), &[("a", "2")], false),
        (json!({"matchLabels": {"a": "1"}}), &[], false),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}),
            &[("a", "2")],
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}),
            &[],
            false,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}),
            &[("a", "2")],
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}),
            &[("a", "1")],
            false,
        ),
        // NotIn holds for a namespace without the key.
        (
            json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}),
            &[],
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "Exists"}]}),
            &[("a", "")],
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "Exists"}]}),
            &[("b", "1")],
            false,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}),
            &[("b", "1")],
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}),
            &[("a", "1")],
            false,
        ),
        // matchLabels and matchExpressions are ANDed.
        (
            json!({"matchLabels": {"env": "prod"}, "matchExpressions": [{"key": "team", "operator": "Exists"}]}),
            &[("env", "prod")],
            false,
        ),
        (
            json!({"matchLabels": {"env": "prod"}, "matchExpressions": [{"key": "team", "operator": "Exists"}]}),
            &[("env", "prod"), ("team", "x")],
            true,
        ),
    ];
    for (selector, l, expected) in cases {
        let p = resolved("p", 0, selector.clone());
        assert_eq!(
            p.selector.matches(&labels(l)),
            *expected,
            "{selector} on {l:?}"
        );
    }
}

#[test]
fn invalid_policies_never_apply_and_say_which_field_is_wrong() {
    let fallback = Policy::embedded_default();
    let cases: &[(Value, &str)] = &[
        (json!({"sampling": {"ratio": 1.5}}), "spec.sampling.ratio"),
        (json!({"profile": "otlp"}), "spec.exporter.endpoint"),
        (
            json!({"token": {"secretName": "Bad_Name"}}),
            "spec.token.secretName",
        ),
        (
            json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["1"]}]}}),
            "spec.namespaceSelector.matchExpressions[0].operator",
        ),
        (
            json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "spec.namespaceSelector.matchExpressions[0].values",
        ),
        (
            json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["1"]}]}}),
            "spec.namespaceSelector.matchExpressions[0].values",
        ),
        (
            json!({"namespaceSelector": {"matchLabels": {"bad key": "1"}}}),
            "spec.namespaceSelector.matchLabels.bad key",
        ),
    ];
    for (spec, field) in cases {
        let mut spec = spec.clone();
        spec["priority"] = json!(1000);
        let rejected = resource::resolve(&tp("broken", 4, spec.clone())).unwrap_err();
        assert_eq!(rejected.error.field, *field, "{spec}");
        assert_eq!(rejected.error.kind, InvalidKind::InvalidSpec);
        assert_eq!((rejected.name.as_str(), rejected.generation), ("broken", 4));

        let good = resolved("good", 0, json!({}));
        let snapshot = Snapshot::build([Err(rejected), Ok(good)]);
        assert_eq!(snapshot.invalid().len(), 1);
        assert_eq!(
            chosen(&snapshot, &labels(&[("a", "1")]), &fallback),
            Some("good")
        );
        let alone = Snapshot::build([resource::resolve(&tp("broken", 4, spec.clone()))]);
        let selected = selection::select(&alone, Some(&labels(&[])), &fallback);
        assert_eq!(selected.choice, Choice::Fallback(Fallback::NoMatch));
    }
}

#[test]
fn undecodable_documents_name_the_path() {
    let err = resource::decode(json!({
        "apiVersion": "lightstep-tekton.io/v1alpha1", "kind": "TracingPolicy",
        "metadata": {"name": "typo"},
        "spec": {"exporter": {"endpont": "http://x:4317"}}
    }))
    .unwrap_err();
    assert_eq!(err.kind, InvalidKind::Undecodable);
    assert!(err.field.starts_with("spec.exporter"), "{err}");
    assert!(err.reason.contains("endpont"), "{err}");

    let err = resource::decode(json!({
        "apiVersion": "lightstep-tekton.io/v1alpha1", "kind": "TracingPolicy",
        "metadata": {"name": "m"}, "spec": {"mode": "shadow"}
    }))
    .unwrap_err();
    assert_eq!(err.field, "spec.mode", "{err}");
}

#[test]
fn the_marker_names_the_policy_and_its_generation() {
    let r = resource::resolve(&tp("team-a", 7, json!({}))).unwrap();
    let fingerprint = r.policy.fingerprint();
    assert_eq!(r.policy.marker(), format!("team-a@gen7/{fingerprint}"));
    // The same spec at another generation is another marker; the fingerprint stays.
    let r8 = resource::resolve(&tp("team-a", 8, json!({}))).unwrap();
    assert_eq!(r8.policy.fingerprint(), fingerprint);
    assert_ne!(r8.policy.marker(), r.policy.marker());
    // A file policy keeps <name>@<fingerprint>.
    let file = Policy::embedded_default();
    assert_eq!(
        file.marker(),
        format!("lightstep-default@{}", file.fingerprint())
    );
}

#[test]
fn token_null_in_a_tracing_policy_turns_the_token_off() {
    let off = resource::resolve(&tp("t", 1, json!({"token": null}))).unwrap();
    assert!(off.policy.token.is_none());
    let default = resource::resolve(&tp("t", 1, json!({}))).unwrap();
    assert!(default.policy.token.is_some());
}

fn time(s: &str) -> Time {
    Time(s.parse::<Timestamp>().unwrap())
}

#[test]
fn status_says_valid_or_which_field_and_counts_matched_namespaces() {
    let namespaces = [
        labels(&[("env", "prod")]),
        labels(&[("env", "prod"), ("team", "a")]),
        labels(&[("env", "dev")]),
    ];
    let t0 = time("2026-11-25T10:00:00Z");
    let t1 = time("2026-11-25T11:00:00Z");

    let valid = resource::resolve(&tp(
        "prod",
        3,
        json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}}),
    ));
    let status = desired_status(valid.as_ref(), &namespaces, None, &t0);
    assert_eq!(status.matched_namespaces, Some(2));
    let c = &status.conditions[0];
    assert_eq!(
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
        ("Valid", "True", "Resolved")
    );
    assert_eq!(c.observed_generation, Some(3));
    assert_eq!(c.last_transition_time, t0);

    // Recomputed later with nothing changed: same status, the transition time kept.
    let again = desired_status(valid.as_ref(), &namespaces, Some(&status), &t1);
    assert_eq!(again, status);
    assert!(!status_differs(Some(&status), &again));
    // One namespace fewer: the count changes, the condition (and its time) does not.
    let fewer = desired_status(valid.as_ref(), &namespaces[1..], Some(&status), &t1);
    assert_eq!(fewer.matched_namespaces, Some(1));
    assert_eq!(fewer.conditions[0].last_transition_time, t0);
    assert!(status_differs(Some(&status), &fewer));

    // The policy turns invalid: False, the field named, no namespaces, a new transition time.
    let invalid = resource::resolve(&tp(
        "prod",
        4,
        json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}, "sampling": {"ratio": 7}}),
    ));
    let broken = desired_status(invalid.as_ref(), &namespaces, Some(&status), &t1);
    let c = &broken.conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(c.message.contains("spec.sampling.ratio"), "{}", c.message);
    assert_eq!(c.observed_generation, Some(4));
    assert_eq!(c.last_transition_time, t1);
    assert_eq!(broken.matched_namespaces, Some(0));
    assert!(status_differs(Some(&status), &broken));
    assert!(status_differs(None, &broken));

    // Only the transition time differs: not a change worth writing (two replicas, two clocks).
    let mut other_clock = broken.clone();
    other_clock.conditions[0].last_transition_time = t0;
    assert!(!status_differs(Some(&broken), &other_clock));
}

#[test]
fn status_round_trips_through_its_schema() {
    let status = desired_status(
        resource::resolve(&tp("p", 1, json!({}))).as_ref(),
        &[labels(&[])],
        None,
        &time("2026-11-25T10:00:00Z"),
    );
    let value = serde_json::to_value(&status).unwrap();
    assert_eq!(value["conditions"][0]["type"], "Valid");
    assert_eq!(
        value["conditions"][0]["lastTransitionTime"],
        "2026-11-25T10:00:00Z"
    );
    assert_eq!(value["matchedNamespaces"], 1);
    let back: TracingPolicyStatus = serde_json::from_value(value).unwrap();
    assert_eq!(back, status);
}

/// Runs a review of a fixture's pod with the given policy selection and path mode; returns the
/// reply and the pod after applying its patch (if any).
fn admit(
    fixture_name: &str,
    snapshot: &Snapshot,
    namespace_labels: &BTreeMap<String, String>,
    path: Mode,
) -> (admission::Reply, Value, k8s_openapi::api::core::v1::Pod) {
    let review = fixture(fixture_name);
    let uid = review["request"]["uid"].as_str().unwrap().to_owned();
    let fallback = Policy::embedded_default();
    let body = fixture_bytes(fixture_name);
    let reply = admission::review_with(&body, path, |_| {
        selection::select(snapshot, Some(namespace_labels), &fallback)
    })
    .unwrap();
    let (v, patch) = check_reply(&reply.body, &uid);
    let after = apply(&review["request"]["object"], &patch);
    let pod = validated_pod(&after);
    (reply, v, pod)
}

fn otlp_policy(name: &str, mode: &str) -> Snapshot {
    Snapshot::build([resource::resolve(&tp(
        name,
        5,
        json!({
            "mode": mode,
            "namespaceSelector": {"matchLabels": {"env": "prod"}},
            "profile": "otlp",
            "exporter": {"endpoint": "http://collector.obs:4317"},
        }),
    ))])
}

#[test]
fn enforce_by_policy_governs_the_exporter_on_the_opt_in_path() {
    // step-lint sets its own OTEL_EXPORTER_OTLP_ENDPOINT.
    let prod = labels(&[("env", "prod")]);
    let (reply, _, pod) = admit(
        "tekton-taskrun-standalone.json",
        &otlp_policy("prod-enforced", "enforce"),
        &prod,
        Mode::Inject,
    );
    assert_eq!(reply.outcome, Outcome::Patched);
    assert_eq!(reply.mode, Mode::Enforce);
    assert_eq!(
        value(&pod, "step-lint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://collector.obs:4317")
    );
    assert!(
        reply
            .warnings
            .iter()
            .any(|w| w.contains("enforced tracing policy replaced")),
        "{:?}",
        reply.warnings
    );
    let marker = &pod.metadata.annotations.as_ref().unwrap()[MARKER_ANNOTATION];
    assert!(marker.starts_with("prod-enforced@gen5/"), "{marker}");

    // The same policy in inject mode on the same path leaves the step's exporter alone.
    let (reply, _, pod) = admit(
        "tekton-taskrun-standalone.json",
        &otlp_policy("prod-inject", "inject"),
        &prod,
        Mode::Inject,
    );
    assert_eq!(reply.mode, Mode::Inject);
    assert_ne!(
        value(&pod, "step-lint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://collector.obs:4317")
    );

    // A namespace the policy does not select gets the file policy, as the path says.
    let (reply, _, pod) = admit(
        "tekton-taskrun-standalone.json",
        &otlp_policy("prod-enforced", "enforce"),
        &labels(&[("env", "dev")]),
        Mode::Inject,
    );
    assert_eq!(reply.mode, Mode::Inject);
    assert_eq!(reply.fallback, Some(Fallback::NoMatch));
    let marker = &pod.metadata.annotations.as_ref().unwrap()[MARKER_ANNOTATION];
    assert_eq!(marker, Policy::embedded_default().marker());
}

#[test]
fn audit_patches_nothing_warns_and_counts_on_every_fixture_and_both_paths() {
    let prod = labels(&[("env", "prod")]);
    let audit = otlp_policy("prod-trial", "audit");
    let mut audited = 0;
    for name in fixture_names() {
        for path in [Mode::Inject, Mode::Enforce] {
            let review = fixture(&name);
            let (reply, v, pod) = admit(&name, &audit, &prod, path);
            assert_eq!(v["response"]["allowed"], true, "{name}");
            assert!(
                v["response"].get("patch").is_none(),
                "{name}: audit sent a patch"
            );
            // The pod is exactly what was sent.
            assert_eq!(
                serde_json::to_value(&pod).unwrap(),
                serde_json::to_value(validated_pod(&review["request"]["object"])).unwrap()
            );
            match reply.outcome {
                Outcome::Audited => {
                    audited += 1;
                    assert_eq!(reply.outcome.as_str(), "audited");
                    assert_eq!(reply.warnings.len(), 1, "{name}: {:?}", reply.warnings);
                    let w = &reply.warnings[0];
                    assert!(
                        w.starts_with(
                            "lightstep-tekton: audit: policy prod-trial would inject tracing into "
                        ),
                        "{w}"
                    );
                    assert!(w.len() <= 120, "{w}");
                    // The count is that of the step containers the decision touches.
                    let report = reply.decision.as_ref().unwrap().report.as_ref().unwrap();
                    let steps = report
                        .containers
                        .iter()
                        .filter(|c| c.name.starts_with("step-"))
                        .count();
                    assert!(
                        w.contains(&format!(" {steps} container")),
                        "{w} ({steps} steps)"
                    );
                }
                Outcome::Skipped(_) => assert!(name.starts_with("plain-pod"), "{name}"),
                ref other => panic!("{name}: {other:?}"),
            }
        }
    }
    assert!(audited >= 12, "only {audited} audited");

    // Counted apart from patched pods in the metrics.
    let (reply, _, _) = admit(
        "tekton-taskrun-standalone.json",
        &audit,
        &prod,
        Mode::Inject,
    );
    let mut registry = Registry::new();
    let metrics = WebhookMetrics::register(&mut registry);
    record_admission(&metrics, &reply, std::time::Duration::from_micros(80));
    let text = registry.encode();
    assert!(
        text.contains("admissions_total{mode=\"inject\",outcome=\"audited\"} 1"),
        "{text}"
    );
    // Every series exists from the start (issue 15); the patched one stays at 0.
    assert!(
        text.contains("admissions_total{mode=\"inject\",outcome=\"patched\"} 0"),
        "{text}"
    );
}

#[test]
fn audit_never_denies_even_on_the_enforcing_path() {
    let body = review_of(
        "u-audit",
        "prod-ns",
        &json!({"metadata": {"labels": "not a map"}}),
    );
    let fallback = Policy::embedded_default();
    let audit = otlp_policy("prod-trial", "audit");
    let prod = labels(&[("env", "prod")]);
    let reply = admission::review_with(&body, Mode::Enforce, |_| {
        selection::select(&audit, Some(&prod), &fallback)
    })
    .unwrap();
    let (v, _) = check_reply(&reply.body, "u-audit");
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(reply.outcome, Outcome::Failed { denied: false });

    // Control: the same pod under an enforcing policy is denied on the opt-in path too.
    let enforce = otlp_policy("prod-enforced", "enforce");
    let reply = admission::review_with(&body, Mode::Inject, |_| {
        selection::select(&enforce, Some(&prod), &fallback)
    })
    .unwrap();
    let (v, _) = check_reply(&reply.body, "u-audit");
    assert_eq!(v["response"]["allowed"], false);
}

#[test]
fn an_unknown_namespace_gets_the_fallback_policy() {
    let fallback = Policy::embedded_default();
    let snapshot = otlp_policy("prod", "enforce");
    let body = fixture_bytes("tekton-pipeline-task-traced.json");
    let reply = admission::review_with(&body, Mode::Inject, |_| {
        selection::select(&snapshot, None, &fallback)
    })
    .unwrap();
    assert_eq!(reply.fallback, Some(Fallback::NamespaceUnknown));
    assert_eq!(reply.policy, fallback.marker());
    assert_eq!(reply.mode, Mode::Inject);
    assert_eq!(reply.outcome, Outcome::Patched);
}

/// With the policy file invalid (no fallback), a TracingPolicy that selects the namespace still
/// applies, enforce mode included; where none does, or the namespace is unknown, the pod passes
/// untouched on either path.
#[test]
fn without_a_file_policy_tracing_policies_still_apply() {
    let snapshot = otlp_policy("prod", "enforce");
    let body = fixture_bytes("tekton-pipeline-task-traced.json");
    let uid = fixture("tekton-pipeline-task-traced.json")["request"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let prod = labels(&[("env", "prod")]);
    let reply = admission::review_or_pass(&body, Mode::Inject, |_| {
        selection::select_tracing_policy(&snapshot, Some(&prod))
    })
    .unwrap();
    assert_eq!(reply.outcome, Outcome::Patched);
    assert!(reply.policy.starts_with("prod@gen5/"), "{}", reply.policy);
    assert_eq!(reply.mode, Mode::Enforce);
    let (_, patch) = check_reply(&reply.body, &uid);
    assert!(!patch.0.is_empty());

    let dev = labels(&[("env", "dev")]);
    for (namespace_labels, path) in [
        (Some(&dev), Mode::Inject),
        (Some(&dev), Mode::Enforce),
        (None, Mode::Enforce),
    ] {
        let reply = admission::review_or_pass(&body, path, |_| {
            selection::select_tracing_policy(&snapshot, namespace_labels)
        })
        .unwrap();
        assert_eq!(reply.outcome, Outcome::NoPolicy, "{path:?}");
        let (v, patch) = check_reply(&reply.body, &uid);
        assert!(patch.0.is_empty());
        assert_eq!(v["response"]["allowed"], true);
    }
}

#[test]
fn the_spec_holds_every_field_of_the_file_policy_and_three_more() {
    use lightstep_tekton_webhook::policy::{
        ContainersSpec, EnvFromPolicy, ExporterSpec, PolicySpec, Profile, RunMetricsSpec,
        RunSpansSpec, SamplingSpec, TokenSpec,
    };
    // Written out field by field (no `..Default`): a field added to the file policy fails to
    // compile here until it is added to this list, and then fails below until the CRD has it.
    let file = PolicySpec {
        name: Some("n".into()),
        profile: Some(Profile::Otlp),
        exporter: Some(ExporterSpec::default()),
        token: Some(Some(TokenSpec::default())),
        sampling: Some(SamplingSpec::default()),
        containers: Some(ContainersSpec::default()),
        service_name: Some("s".into()),
        propagators: Some(Vec::new()),
        resource_attributes: Some(BTreeMap::new()),
        env_from: Some(EnvFromPolicy::Preserve),
        run_spans: Some(RunSpansSpec::default()),
        run_metrics: Some(RunMetricsSpec::default()),
    };
    let mut file_fields: Vec<String> = serde_json::to_value(&file)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "name")
        .cloned()
        .collect();
    file_fields.extend(["mode", "namespaceSelector", "priority"].map(String::from));
    file_fields.sort();

    let crd = serde_json::to_value(resource::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let crd_fields: Vec<String> = spec["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(crd_fields, file_fields);
    // `token: null` must survive the API server: the schema says it may be null.
    assert_eq!(spec["properties"]["token"]["nullable"], true);
}

/// The installed CRD's `openAPIV3Schema`.
fn crd_schema() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("manifests/base/crd-tracingpolicy.yaml"),
    )
    .unwrap();
    let crd: Value = serde_norway::from_str(&text).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// What the API server checks of an object against a structural schema, for the keywords the
/// generated CRD uses: type, nullable, properties, required, additionalProperties, items, enum,
/// minimum, maximum, minLength, maxLength, minItems, pattern. Unknown fields are not errors
/// (the API server prunes them). The error names the path, as the API server's does.
fn check_schema(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let fail = |what: String| Err(format!("{at}: {what}"));
    if value.is_null() {
        return match schema["nullable"].as_bool() {
            Some(true) => Ok(()),
            _ => fail("must not be null".into()),
        };
    }
    let type_ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        None => true,
        Some(other) => panic!("{at}: type {other}"),
    };
    if !type_ok {
        return fail(format!("must be of type {}", schema["type"]));
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(value)
    {
        return fail(format!("must be one of {}", schema["enum"]));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|min| n < min) {
            return fail(format!("must be at least {}", schema["minimum"]));
        }
        if schema["maximum"].as_f64().is_some_and(|max| n > max) {
            return fail(format!("must be at most {}", schema["maximum"]));
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| chars < min) {
            return fail(format!("shorter than {}", schema["minLength"]));
        }
        if schema["maxLength"].as_u64().is_some_and(|max| chars > max) {
            return fail(format!("longer than {}", schema["maxLength"]));
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && !regex::Regex::new(pattern).unwrap().is_match(s)
        {
            return fail(format!("must match {pattern}"));
        }
    }
    if let Some(items) = value.as_array() {
        if schema["minItems"]
            .as_u64()
            .is_some_and(|min| (items.len() as u64) < min)
        {
            return fail(format!("fewer than {} items", schema["minItems"]));
        }
        for (i, item) in items.iter().enumerate() {
            check_schema(&schema["items"], item, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                return fail(format!("{required} is required"));
            }
        }
        for (key, child) in object {
            if let Some(property) = schema["properties"].get(key) {
                check_schema(property, child, &format!("{at}.{key}"))?;
            } else if schema["additionalProperties"].is_object() {
                check_schema(
                    &schema["additionalProperties"],
                    child,
                    &format!("{at}.{key}"),
                )?;
            }
        }
    }
    Ok(())
}

fn tracing_policy_object(spec: Value) -> Value {
    json!({
        "apiVersion": "lightstep-tekton.io/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": "team-a"},
        "spec": spec,
    })
}

/// The CRD's schema refuses the obvious mistakes by itself, so a cluster whose validating
/// webhook is down still does; and everything it refuses, the webhook refuses too (the schema
/// is a subset of the rules, never stricter).
#[test]
fn the_crd_schema_refuses_out_of_range_values_by_itself() {
    let schema = crd_schema();
    let example: Value = serde_norway::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("manifests/tracingpolicy.example.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    check_schema(&schema, &example, "").unwrap();
    let full = json!({
        "profile": "lightstep", "mode": "enforce", "priority": -3, "envFrom": "override",
        "exporter": {"endpoint": "http://$(HOST_IP):4317", "protocol": "http/protobuf",
                     "tracesEndpoint": "https://collector.example.com/otlp/v1/traces"},
        "token": {"secretName": "ls-token.v2", "secretKey": "access_token.1",
                  "header": "x-honeycomb-team"},
        "sampling": {"ratio": 0}, "containers": {"sidecars": true, "exclude": ["step-lint"]},
        "propagators": ["tracecontext", "baggage", "b3multi"], "serviceName": "{task}",
    });
    check_schema(&schema, &tracing_policy_object(full.clone()), "").unwrap();
    assert!(resource::resolve(&tp("team-a", 1, full)).is_ok());
    check_schema(
        &schema,
        &tracing_policy_object(json!({"sampling": {"ratio": 1}})),
        "",
    )
    .unwrap();

    let long_url = format!("https://{}.example.com", "a".repeat(2100));
    let cases = [
        (json!({"sampling": {"ratio": 2}}), ".spec.sampling.ratio"),
        (json!({"sampling": {"ratio": -0.1}}), ".spec.sampling.ratio"),
        (
            json!({"sampling": {"ratio": 1.0001}}),
            ".spec.sampling.ratio",
        ),
        (json!({"profile": "datadog"}), ".spec.profile"),
        (json!({"mode": "block"}), ".spec.mode"),
        (json!({"envFrom": "ignore"}), ".spec.envFrom"),
        (
            json!({"exporter": {"protocol": "grpcc"}}),
            ".spec.exporter.protocol",
        ),
        (
            json!({"exporter": {"endpoint": "ingest.lightstep.com:443"}}),
            ".spec.exporter.endpoint",
        ),
        (
            json!({"exporter": {"endpoint": "http://"}}),
            ".spec.exporter.endpoint",
        ),
        (
            json!({"exporter": {"endpoint": "https:///v1/traces"}}),
            ".spec.exporter.endpoint",
        ),
        (
            json!({"exporter": {"endpoint": "http://collector :4317"}}),
            ".spec.exporter.endpoint",
        ),
        (
            json!({"exporter": {"tracesEndpoint": "collector/v1/traces"}}),
            ".spec.exporter.tracesEndpoint",
        ),
        (
            json!({"exporter": {"endpoint": long_url}}),
            ".spec.exporter.endpoint",
        ),
        (
            json!({"token": {"secretName": "Not_Valid"}}),
            ".spec.token.secretName",
        ),
        (
            json!({"token": {"secretName": "-lead"}}),
            ".spec.token.secretName",
        ),
        (
            json!({"token": {"secretKey": "a b"}}),
            ".spec.token.secretKey",
        ),
        (json!({"token": {"header": "x y"}}), ".spec.token.header"),
        (
            json!({"propagators": ["tracecontext", "b4"]}),
            ".spec.propagators[1]",
        ),
        (json!({"propagators": []}), ".spec.propagators"),
        (
            json!({"containers": {"exclude": [""]}}),
            ".spec.containers.exclude[0]",
        ),
        (json!({"priority": "high"}), ".spec.priority"),
    ];
    for (spec, path) in cases {
        let error = check_schema(&schema, &tracing_policy_object(spec.clone()), "")
            .expect_err(&spec.to_string());
        assert!(error.starts_with(&format!("{path}:")), "{spec}: {error}");
        // Never stricter than the webhook: whatever the schema refuses, resolving refuses.
        let object = tracing_policy_object(spec.clone());
        let refused = match resource::decode(object) {
            Err(_) => true,
            Ok(tp) => resource::resolve(&tp).is_err(),
        };
        assert!(
            refused,
            "{spec}: the schema refuses what the webhook accepts"
        );
    }
}
