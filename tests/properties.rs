//! Property tests: for any pod a Tekton controller (or a user) could create, the patch applies,
//! the result is a pod the API server accepts, nothing the pod had is lost, and deciding again
//! gives an empty patch.

mod support {
    pub mod review;
}

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar};
use lightstep_tekton_webhook::admission;
use lightstep_tekton_webhook::admission::decide::Mode;
use lightstep_tekton_webhook::policy::Policy;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use support::review::*;

const ENV_NAMES: &[&str] = &[
    "TRACEPARENT",
    "TRACESTATE",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_PROPAGATORS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
    "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
    "LS_ACCESS_TOKEN",
    "HOME",
    "GOFLAGS",
    "my.var-1",
];

/// An endpoint no policy here chooses: a team's own plain-HTTP collector.
const FOREIGN_ENDPOINT: &str = "http://collector.other-team:4318";

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,20}[a-zA-Z0-9])?",
        Just("f".repeat(63)),
    ]
}

fn label_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("tekton.dev/pipeline".to_owned()),
        Just("tekton.dev/task".to_owned()),
        Just("tekton.dev/pipelineRun".to_owned()),
        Just("tekton.dev/pipelineRunUID".to_owned()),
        Just("tekton.dev/taskRunUID".to_owned()),
        Just("pipelinesascode.tekton.dev/sha".to_owned()),
        Just("lightstep-tekton.io/pipeline".to_owned()),
        "[a-z]([-a-z0-9.]{0,10}[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,10}[a-zA-Z0-9])?",
        "[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,10}[a-zA-Z0-9])?",
    ]
}

fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just(r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01","tracestate":"a=$(X),b=2"}"#.to_owned()),
        Just(r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-00"}"#.to_owned()),
        Just("false".to_owned()),
        "[ -~]{0,40}",
    ]
}

fn annotation_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("tekton.dev/taskrunSpanContext".to_owned()),
        Just("lightstep-tekton.io/inject".to_owned()),
        Just("pipelinesascode.tekton.dev/repo-url".to_owned()),
        Just("pipelinesascode.tekton.dev/log-url".to_owned()),
        Just("pipelinesascode.tekton.dev/source-branch".to_owned()),
        "[a-z]([-a-z0-9.]{0,10}[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,10}[a-zA-Z0-9])?",
    ]
}

fn env_var() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        proptest::sample::select(ENV_NAMES).prop_map(str::to_owned),
        "[A-Z_][A-Z0-9_]{0,8}",
    ];
    let source = prop_oneof![
        any::<String>().prop_map(|v| json!({"value": v})),
        "[ -~]{0,30}".prop_map(|v| json!({"value": v})),
        Just(json!({"value": FOREIGN_ENDPOINT})),
        Just(json!({})),
        Just(json!({"valueFrom": {"secretKeyRef": {"name": "mine", "key": "k"}}})),
        Just(json!({"valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})),
    ];
    (name, source).prop_map(|(name, source)| {
        let mut v = source;
        v["name"] = json!(name);
        v
    })
}

fn env_from() -> impl Strategy<Value = Value> {
    let prefix = prop_oneof![
        Just(None),
        Just(Some("")),
        Just(Some("OTEL_")),
        Just(Some("APP_")),
        Just(Some("LS_")),
    ];
    prefix.prop_map(|p| {
        let mut v = json!({"configMapRef": {"name": "cfg"}});
        if let Some(p) = p {
            v["prefix"] = json!(p);
        }
        v
    })
}

fn container(name: String) -> impl Strategy<Value = Value> {
    (
        proptest::option::of(proptest::collection::vec(env_var(), 0..6)),
        proptest::option::of(proptest::collection::vec(env_from(), 0..2)),
    )
        .prop_map(move |(env, env_from)| {
            let mut c = json!({"name": name.clone(), "image": "busybox"});
            if let Some(env) = env {
                c["env"] = Value::Array(env);
            }
            if let Some(env_from) = env_from {
                c["envFrom"] = Value::Array(env_from);
            }
            c
        })
}

fn containers() -> impl Strategy<Value = Vec<Value>> {
    proptest::collection::vec(0..3u8, 1..12).prop_flat_map(|kinds| {
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let name = match k {
                    0 => format!("step-s{i}"),
                    1 => format!("sidecar-s{i}"),
                    _ => format!("other-{i}"),
                };
                container(name).boxed()
            })
            .collect::<Vec<_>>()
    })
}

fn pod() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        proptest::option::of(proptest::collection::btree_map(label_key(), label_value(), 0..6)),
        proptest::option::of(proptest::collection::btree_map(
            annotation_key(),
            annotation_value(),
            0..5,
        )),
        containers(),
        0..3usize,
        prop_oneof![
            Just(None),
            Just(Some("run-pod".to_owned())),
            Just(Some("run-pod-retry2".to_owned()))
        ],
    )
        .prop_map(|(tekton, labels, annotations, containers, inits, name)| {
            let mut metadata = Map::new();
            if let Some(name) = name {
                metadata.insert("name".into(), json!(name));
            } else {
                metadata.insert("generateName".into(), json!("run-"));
            }
            let mut labels: Option<BTreeMap<String, String>> = labels;
            if tekton {
                labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert("tekton.dev/taskRun".into(), "run".into());
            }
            if let Some(labels) = labels {
                metadata.insert("labels".into(), json!(labels));
            }
            if let Some(annotations) = annotations {
                metadata.insert("annotations".into(), json!(annotations));
            }
            let init: Vec<Value> = (0..inits)
                .map(|i| json!({"name": format!("prepare-{i}"), "image": "tekton", "env": [{"name": "X", "value": "1"}]}))
                .collect();
            let mut spec = json!({"containers": containers});
            if !init.is_empty() {
                spec["initContainers"] = Value::Array(init);
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
        })
}

fn policies() -> Vec<Policy> {
    vec![
        Policy::embedded_default(),
        Policy::from_yaml(
            "profile: otlp\nexporter: {endpoint: 'http://c:4318', protocol: http/json}",
        )
        .unwrap(),
        Policy::from_yaml(
            "containers: {sidecars: true}\nenvFrom: override\nsampling: {ratio: 0.3}\n\
             resourceAttributes: {deployment.environment.name: 'prod,eu=1'}",
        )
        .unwrap(),
    ]
}

fn check(object: &Value, policy: &Policy, mode: Mode) -> Result<(), TestCaseError> {
    let before: k8s_openapi::api::core::v1::Pod = serde_json::from_value(object.clone())
        .map_err(|e| TestCaseError::reject(format!("generator made an undecodable pod: {e}")))?;
    prop_assume!(validate(&before).is_ok());

    let body = review_of("uid-p", "ns-p", object);
    let reply = admission::review(&body, policy, mode).expect("review");
    let (_, patch) = check_reply(&reply.body, "uid-p");
    let after = apply(object, &patch);
    let pod = validated_pod(&after);

    // Nothing that was there is lost.
    for (k, v) in before.metadata.labels.iter().flatten() {
        prop_assert_eq!(pod.metadata.labels.as_ref().unwrap().get(k), Some(v));
    }
    for (k, v) in before.metadata.annotations.iter().flatten() {
        if k.starts_with("lightstep-tekton.io/trace") || k == "lightstep-tekton.io/injected" {
            continue; // the webhook's own annotations are its to update
        }
        prop_assert_eq!(pod.metadata.annotations.as_ref().unwrap().get(k), Some(v));
    }
    let spec_before = before.spec.as_ref().unwrap();
    let spec_after = pod.spec.as_ref().unwrap();
    prop_assert_eq!(&spec_before.init_containers, &spec_after.init_containers);
    prop_assert_eq!(spec_before.containers.len(), spec_after.containers.len());
    for (b, a) in spec_before.containers.iter().zip(&spec_after.containers) {
        prop_assert_eq!(&b.env_from, &a.env_from);
        let after_env = a.env.as_deref().unwrap_or_default();
        match mode {
            Mode::Inject => {
                for (i, e) in b.env.iter().flatten().enumerate() {
                    let now = &after_env[i];
                    prop_assert_eq!(&now.name, &e.name);
                    if e.name == "OTEL_RESOURCE_ATTRIBUTES" && e.value_from.is_none() {
                        let old = e.value.as_deref().unwrap_or("");
                        prop_assert!(
                            now.value
                                .as_deref()
                                .unwrap_or("")
                                .starts_with(old.trim_end_matches([',', ' ']))
                        );
                    } else {
                        prop_assert_eq!(now, e);
                    }
                }
            }
            Mode::Enforce => {
                for e in b.env.iter().flatten() {
                    prop_assert!(
                        after_env.iter().any(|n| n.name == e.name),
                        "{} lost",
                        e.name
                    );
                }
            }
        }
        token_only_with_the_policys_endpoints(b, a, policy, mode)?;
        if !b.name.starts_with("step-") && !b.name.starts_with("sidecar-") {
            prop_assert_eq!(&b.env, &a.env);
        }
        // $(LS_ACCESS_TOKEN) must be defined before the headers that use it.
        let token_at = after_env.iter().rposition(|e| e.name == "LS_ACCESS_TOKEN");
        let injected_token = token_at.is_some_and(|at| {
            after_env[at]
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
                .is_some_and(|s| s.name == "lightstep-access-token")
        });
        if injected_token {
            for (i, e) in after_env.iter().enumerate() {
                if e.value
                    .as_deref()
                    .is_some_and(|v| v.contains("$(LS_ACCESS_TOKEN)"))
                    && b.env.iter().flatten().all(|o| o != e)
                {
                    prop_assert!(i > token_at.unwrap(), "headers before the token");
                }
            }
        }
    }

    // Reinvocation gives an empty patch.
    let again = admission::review(&review_of("uid-p", "ns-p", &after), policy, mode).unwrap();
    let (_, second) = check_reply(&again.body, "uid-p");
    prop_assert!(
        second.0.is_empty(),
        "second patch: {}",
        serde_json::to_string(&second).unwrap()
    );
    Ok(())
}

/// Whether a container carries the policy's token: the variable from its Secret, or a header
/// variable that expands it.
fn carries_token(c: &Container, policy: &Policy) -> bool {
    let secret = policy.token.as_ref().map(|t| t.secret_name.as_str());
    c.env.iter().flatten().any(|e| {
        let from_secret = e
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .is_some_and(|s| Some(s.name.as_str()) == secret);
        let expands = e.name.ends_with("_HEADERS")
            && e.value
                .as_deref()
                .is_some_and(|v| v.contains("$(LS_ACCESS_TOKEN)"));
        (e.name == "LS_ACCESS_TOKEN" && from_secret) || expands
    })
}

/// D4: where the webhook put the token (or, enforced, governs it), every endpoint the step can
/// export to is one the policy chose: none is set to another value, none left to `envFrom`.
fn token_only_with_the_policys_endpoints(
    before: &Container,
    after: &Container,
    policy: &Policy,
    mode: Mode,
) -> Result<(), TestCaseError> {
    let ours =
        carries_token(after, policy) && (mode == Mode::Enforce || !carries_token(before, policy));
    if !ours {
        return Ok(());
    }
    let base = policy.exporter.endpoint.trim_end_matches('/');
    let mut allowed = vec![policy.exporter.endpoint.clone()];
    allowed.extend(["traces", "metrics", "logs"].map(|s| format!("{base}/v1/{s}")));
    allowed.extend(policy.exporter.traces_endpoint.clone());
    let env = after.env.as_deref().unwrap_or_default();
    for name in
        ["", "TRACES_", "METRICS_", "LOGS_"].map(|s| format!("OTEL_EXPORTER_OTLP_{s}ENDPOINT"))
    {
        let set: Vec<&EnvVar> = env.iter().filter(|e| e.name == name).collect();
        for e in &set {
            let value = e.value.as_deref().unwrap_or_default();
            prop_assert!(
                e.value_from.is_none() && allowed.iter().any(|a| a == value),
                "{}: token next to {name}={value:?}",
                after.name
            );
        }
        let from_env_from = after
            .env_from
            .iter()
            .flatten()
            .any(|s| name.starts_with(s.prefix.as_deref().unwrap_or("")));
        prop_assert!(
            !set.is_empty() || !from_env_from,
            "{}: token next to {name} from envFrom",
            after.name
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn any_pod_inject(object in pod(), which in 0..3usize) {
        check(&object, &policies()[which], Mode::Inject)?;
    }

    #[test]
    fn any_pod_enforce(object in pod(), which in 0..3usize) {
        check(&object, &policies()[which], Mode::Enforce)?;
    }
}
