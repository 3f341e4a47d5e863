//! The watch caches without a cluster: watch events fed to the reflector writers as kube-runtime's
//! watcher would deliver them, then admission decided from what the caches hold; and the status
//! writer against a stand-in API server: retried on a timer after a failure, a conflict re-read,
//! the leader alone writing.

mod support {
    pub mod fake_api;
    pub mod poll;
    pub mod review;
}

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::watcher::Event;
use lightstep_tekton_webhook::admission::decide::Mode;
use lightstep_tekton_webhook::admission::{self, Outcome};
use lightstep_tekton_webhook::cluster::{
    Caches, Cluster, ClusterMetrics, StatusTiming, StatusWriter,
};
use lightstep_tekton_webhook::policy::Policy;
use lightstep_tekton_webhook::policy::resource::TracingPolicyStatus;
use lightstep_tekton_webhook::policy::selection::Fallback;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use support::fake_api;
use support::poll::eventually;
use support::review::*;
use tokio::sync::watch;

fn policy_object(name: &str, generation: i64, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "lightstep-tekton.io/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": name, "generation": generation, "resourceVersion": format!("{generation}00"),
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": spec,
    }))
    .unwrap()
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Namespace> {
    let mut all: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert("kubernetes.io/metadata.name".into(), name.into());
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "labels": all, "annotations": {"big": "x".repeat(1000)}},
    }))
    .unwrap()
}

/// The policy marker admission uses for a pod created in `ns`, and why.
fn decide_in(cluster: &Cluster, ns: &str) -> admission::Reply {
    let fallback = Policy::embedded_default();
    let object = fixture("tekton-pipeline-task-traced.json")["request"]["object"].clone();
    let body = review_of("uid-c", ns, &object);
    let snapshot = cluster.snapshot();
    let reply = admission::review_with(&body, Mode::Inject, |namespace| {
        cluster.select(&snapshot, namespace, &fallback)
    })
    .unwrap();
    check_reply(&reply.body, "uid-c");
    reply
}

fn name_of(reply: &admission::Reply) -> &str {
    reply.policy.split('@').next().unwrap()
}

fn prod_policy(generation: i64, mode: &str) -> DynamicObject {
    policy_object(
        "prod",
        generation,
        json!({"priority": 10, "mode": mode, "namespaceSelector": {"matchLabels": {"env": "prod"}}}),
    )
}

#[test]
fn readiness_waits_for_both_initial_lists_and_admission_follows_the_events() {
    let mut caches = Caches::new();
    let cluster = caches.cluster();
    assert!(!cluster.synced());

    // The policies' initial list: nothing is visible until InitDone.
    caches.apply_policy_event(Event::Init);
    caches.apply_policy_event(Event::InitApply(prod_policy(1, "inject")));
    caches.apply_policy_event(Event::InitApply(policy_object(
        "everyone",
        2,
        json!({"priority": 0}),
    )));
    assert!(cluster.snapshot().valid().is_empty());
    assert!(!cluster.synced());
    caches.apply_policy_event(Event::InitDone);
    assert_eq!(cluster.snapshot().valid().len(), 2);
    assert!(!cluster.synced(), "namespaces not listed yet");

    caches.apply_namespace_event(Event::Init);
    caches.apply_namespace_event(Event::InitApply(namespace("ci-prod", &[("env", "prod")])));
    caches.apply_namespace_event(Event::InitApply(namespace("ci-dev", &[("env", "dev")])));
    assert!(!cluster.synced());
    assert_eq!(cluster.labels("ci-prod"), None, "buffered until InitDone");
    caches.apply_namespace_event(Event::InitDone);
    assert!(cluster.synced());
    // Only the labels are kept.
    assert_eq!(cluster.labels("ci-prod").unwrap()["env"], "prod");

    let reply = decide_in(&cluster, "ci-prod");
    assert_eq!(reply.outcome, Outcome::Patched);
    assert!(reply.policy.starts_with("prod@gen1/"), "{}", reply.policy);
    assert!(
        decide_in(&cluster, "ci-dev")
            .policy
            .starts_with("everyone@gen2/")
    );
    let unknown = decide_in(&cluster, "created-just-now");
    assert_eq!(unknown.fallback, Some(Fallback::NamespaceUnknown));
    assert_eq!(unknown.policy, Policy::embedded_default().marker());

    // A new generation of the policy, now in audit mode.
    caches.apply_policy_event(Event::Apply(prod_policy(2, "audit")));
    let reply = decide_in(&cluster, "ci-prod");
    assert!(reply.policy.starts_with("prod@gen2/"), "{}", reply.policy);
    assert_eq!(reply.outcome, Outcome::Audited);

    // A namespace relabelled, one created.
    caches.apply_namespace_event(Event::Apply(namespace("ci-dev", &[("env", "prod")])));
    caches.apply_namespace_event(Event::Apply(namespace("new", &[])));
    assert_eq!(name_of(&decide_in(&cluster, "ci-dev")), "prod");
    assert_eq!(name_of(&decide_in(&cluster, "new")), "everyone");

    // Policies deleted: the remaining one, then the fallback.
    caches.apply_policy_event(Event::Delete(prod_policy(2, "audit")));
    assert_eq!(name_of(&decide_in(&cluster, "ci-prod")), "everyone");
    caches.apply_policy_event(Event::Delete(policy_object("everyone", 2, json!({}))));
    let reply = decide_in(&cluster, "ci-prod");
    assert_eq!(reply.fallback, Some(Fallback::NoMatch));
    assert_eq!(reply.policy, Policy::embedded_default().marker());

    // A namespace deleted: unknown again.
    caches.apply_namespace_event(Event::Delete(namespace("new", &[])));
    assert_eq!(
        decide_in(&cluster, "new").fallback,
        Some(Fallback::NamespaceUnknown)
    );
}

#[test]
fn a_restarted_watch_keeps_the_last_state_until_its_list_completes() {
    let mut caches = Caches::new();
    let cluster = caches.cluster();
    for event in [
        Event::Init,
        Event::InitApply(prod_policy(1, "inject")),
        Event::InitDone,
    ] {
        caches.apply_policy_event(event);
    }
    for event in [
        Event::Init,
        Event::InitApply(namespace("ci-prod", &[("env", "prod")])),
        Event::InitDone,
    ] {
        caches.apply_namespace_event(event);
    }
    assert!(cluster.synced());

    // The API server goes away; the watcher re-lists when it is back. Until the new list is
    // complete, admission decides from the previous state and readiness stays.
    caches.apply_policy_event(Event::Init);
    caches.apply_namespace_event(Event::Init);
    caches.apply_policy_event(Event::InitApply(prod_policy(3, "enforce")));
    assert!(cluster.synced());
    let reply = decide_in(&cluster, "ci-prod");
    assert!(reply.policy.starts_with("prod@gen1/"), "{}", reply.policy);
    assert_eq!(reply.mode, Mode::Inject);

    caches.apply_policy_event(Event::InitDone);
    let reply = decide_in(&cluster, "ci-prod");
    assert!(reply.policy.starts_with("prod@gen3/"), "{}", reply.policy);
    assert_eq!(reply.mode, Mode::Enforce);
}

#[test]
fn invalid_and_undecodable_policies_are_kept_apart_without_hiding_the_others() {
    let mut caches = Caches::new();
    let cluster = caches.cluster();
    caches.apply_policy_event(Event::Init);
    caches.apply_policy_event(Event::InitApply(prod_policy(1, "inject")));
    caches.apply_policy_event(Event::InitApply(policy_object(
        "broken",
        1,
        json!({"priority": 99, "sampling": {"ratio": 3}}),
    )));
    caches.apply_policy_event(Event::InitApply(policy_object(
        "from-the-future",
        1,
        json!({"priority": 99, "exporter": {"compression": "gzip"}}),
    )));
    caches.apply_policy_event(Event::InitDone);
    let snapshot = cluster.snapshot();
    let names: Vec<&str> = snapshot.valid().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["prod"]);
    let invalid: Vec<&str> = snapshot.invalid().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(invalid, ["broken", "from-the-future"]);
}

fn status_of(object: &DynamicObject) -> TracingPolicyStatus {
    serde_json::from_value(object.data["status"].clone()).unwrap()
}

#[test]
fn statuses_are_computed_from_the_caches_and_written_only_when_they_change() {
    let mut caches = Caches::new();
    let cluster = caches.cluster();
    caches.apply_policy_event(Event::Init);
    caches.apply_policy_event(Event::InitApply(prod_policy(4, "inject")));
    caches.apply_policy_event(Event::InitApply(policy_object(
        "broken",
        2,
        json!({"exporter": {"endpoint": "collector:4317"}}),
    )));
    caches.apply_policy_event(Event::InitDone);
    caches.apply_namespace_event(Event::Init);
    for (name, env) in [("a", "prod"), ("b", "prod"), ("c", "dev")] {
        caches.apply_namespace_event(Event::InitApply(namespace(name, &[("env", env)])));
    }
    caches.apply_namespace_event(Event::InitDone);

    let now = Time(Timestamp::from_second(1_800_000_000).unwrap());
    let updates = cluster.status_updates(&now);
    let names: Vec<&str> = updates.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["broken", "prod"]);

    let broken = &updates[0].object;
    let status = status_of(broken);
    assert_eq!(status.conditions[0].status, "False");
    assert!(
        status.conditions[0]
            .message
            .contains("spec.exporter.endpoint")
    );
    assert_eq!(status.matched_namespaces, Some(0));

    let prod = &updates[1].object;
    let status = status_of(prod);
    assert_eq!(status.conditions[0].status, "True");
    assert_eq!(status.conditions[0].observed_generation, Some(4));
    assert_eq!(status.matched_namespaces, Some(2));
    // A conditional update of the object as last seen, with what the API server needs.
    let body = serde_json::to_value(prod).unwrap();
    assert_eq!(body["apiVersion"], "lightstep-tekton.io/v1alpha1");
    assert_eq!(body["kind"], "TracingPolicy");
    assert_eq!(body["metadata"]["resourceVersion"], "400");
    assert!(body["metadata"].get("managedFields").is_none());
    assert_eq!(body["spec"]["priority"], 10);

    // The writes come back as watch events: nothing is left to write, even at a later time
    // (and even though the other replica's clock wrote the transition times).
    for update in &updates {
        caches.apply_policy_event(Event::Apply(update.object.clone()));
    }
    let later = Time(Timestamp::from_second(1_800_000_600).unwrap());
    assert!(cluster.status_updates(&later).is_empty());

    // A namespace joins: only the policy whose count changed is written again.
    caches.apply_namespace_event(Event::Apply(namespace("d", &[("env", "prod")])));
    let updates = cluster.status_updates(&later);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].name, "prod");
    assert_eq!(status_of(&updates[0].object).matched_namespaces, Some(3));
    // The condition did not change, so neither did its transition time.
    assert_eq!(
        status_of(&updates[0].object).conditions[0].last_transition_time,
        now
    );
}

/// Caches holding one valid policy, generation 4 at resourceVersion 400, and two namespaces it
/// selects: its status must be written.
fn caches_with_one_policy() -> Caches {
    let mut caches = Caches::new();
    for event in [
        Event::Init,
        Event::InitApply(prod_policy(4, "inject")),
        Event::InitDone,
    ] {
        caches.apply_policy_event(event);
    }
    caches.apply_namespace_event(Event::Init);
    for name in ["a", "b"] {
        caches.apply_namespace_event(Event::InitApply(namespace(name, &[("env", "prod")])));
    }
    caches.apply_namespace_event(Event::InitDone);
    caches
}

const PROD_STATUS: &str = "/apis/lightstep-tekton.io/v1alpha1/tracingpolicies/prod/status";

/// Short timings: the retry is what is tested, not its length.
const TIMING: StatusTiming = StatusTiming {
    debounce: Duration::from_millis(10),
    first_retry: Duration::from_millis(50),
    max_retry: Duration::from_millis(200),
};

/// Starts a status writer against `handler`; the requests it made, and its metrics.
async fn status_writer(
    caches: &Caches,
    leading: watch::Receiver<bool>,
    handler: impl Fn(&fake_api::Request, usize) -> (u16, Value) + Send + Sync + 'static,
) -> (Arc<Mutex<Vec<fake_api::Request>>>, Registry) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (_, client) = fake_api::start(Arc::new(move |r: &fake_api::Request| {
        let mut log = log.lock().unwrap();
        log.push(r.clone());
        handler(r, log.len())
    }))
    .await;
    let mut registry = Registry::default();
    let metrics = ClusterMetrics::register(&mut registry);
    let writer = StatusWriter::new(client, caches.cluster(), leading, metrics).with_timing(TIMING);
    tokio::spawn(writer.run());
    (seen, registry)
}

fn encoded(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_status_write_is_retried_on_a_timer_without_another_event() {
    let caches = caches_with_one_policy();
    let (_leader, leading) = watch::channel(true);
    // The API server fails the first two writes, then takes them.
    let (seen, registry) = status_writer(&caches, leading, |r, n| match n {
        1 | 2 => fake_api::status(500, "InternalError"),
        _ => (200, r.body.clone()),
    })
    .await;
    let puts = eventually("three writes", async || {
        let seen = seen.lock().unwrap();
        (seen.len() >= 3).then(|| seen.clone())
    })
    .await;
    for put in &puts {
        assert_eq!(
            (put.method.as_str(), put.path.as_str()),
            ("PUT", PROD_STATUS)
        );
        assert_eq!(put.body["metadata"]["resourceVersion"], "400");
        assert_eq!(put.body["status"]["matchedNamespaces"], 2);
    }
    // The third write's answer is counted after the stand-in saw it: wait for the count.
    eventually("the written write counted", async || {
        encoded(&registry)
            .contains("status_writes_total{result=\"written\"} 1")
            .then_some(())
    })
    .await;
    let text = encoded(&registry);
    assert!(
        text.contains("status_writes_total{result=\"error\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_re_read_and_compared_not_lost() {
    let caches = caches_with_one_policy();
    let (_leader, leading) = watch::channel(true);
    // Someone changed the object (now at 401) before the first write; it still has no status.
    let (seen, registry) = status_writer(&caches, leading, |r, _| {
        match (
            r.method.as_str(),
            r.body["metadata"]["resourceVersion"].as_str(),
        ) {
            ("PUT", Some("400")) => fake_api::status(409, "Conflict"),
            ("PUT", _) => (200, r.body.clone()),
            _ => {
                let mut fresh = serde_json::to_value(prod_policy(4, "inject")).unwrap();
                fresh["metadata"]["resourceVersion"] = json!("401");
                (200, fresh)
            }
        }
    })
    .await;
    let requests = eventually("the second write", async || {
        let seen = seen.lock().unwrap();
        (seen.len() >= 3).then(|| seen.clone())
    })
    .await;
    let calls: Vec<(&str, &str)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let prod = &PROD_STATUS[..PROD_STATUS.len() - "/status".len()];
    assert_eq!(
        calls[..3],
        [("PUT", PROD_STATUS), ("GET", prod), ("PUT", PROD_STATUS)]
    );
    assert_eq!(requests[2].body["metadata"]["resourceVersion"], "401");
    assert_eq!(requests[2].body["status"]["matchedNamespaces"], 2);
    let text = encoded(&registry);
    assert!(
        text.contains("status_writes_total{result=\"conflict\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("status_writes_total{result=\"written\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("status_writes_total{result=\"error\"} 0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_new_leader_writes_at_once() {
    let caches = caches_with_one_policy();
    let (leader, leading) = watch::channel(false);
    let (seen, _registry) = status_writer(&caches, leading, |r, _| (200, r.body.clone())).await;
    // Standing by: several debounce periods pass without a write.
    tokio::time::sleep(TIMING.debounce * 20).await;
    assert!(seen.lock().unwrap().is_empty(), "a standby wrote");
    leader.send(true).unwrap();
    eventually("the new leader's write", async || {
        let seen = seen.lock().unwrap();
        (seen.len() == 1 && seen[0].path == PROD_STATUS).then_some(())
    })
    .await;
}
