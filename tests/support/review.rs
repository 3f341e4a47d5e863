//! The captured reviews, and the API server's rules for a reply and a patched pod
//! (docs/apiserver-rules.md, section 3), reproduced because there is no cluster to ask.
//!
//! One piece of `tests/support/`, the harness every suite shares: `review` (this), `install`
//! (the install's checks), `tmp` (scratch dirs, free ports), `http` (the blocking HTTPS client),
//! `poll` (`eventually`) and `fake_api` (the in-process stand-in API server). A suite declares
//! the pieces it uses in `mod support { pub mod …; }`; the benches and fuzz targets include this
//! file by `#[path]`.
#![allow(dead_code)]

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use serde_json::Value;

/// The API server's `TotalAnnotationSizeLimitB`.
pub const ANNOTATIONS_SIZE_LIMIT: usize = 256 * 1024;

/// The Pipelines-as-Code annotations the webhook reads (after `pipelinesascode.tekton.dev/`):
/// the adversarial pod of issue 14's D1 sets them all.
pub const PAC_KEYS: [&str; 11] = [
    "sha",
    "branch",
    "source-branch",
    "url-org",
    "url-repository",
    "sender",
    "event-type",
    "pull-request",
    "git-provider",
    "repo-url",
    "log-url",
];

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn fixture(name: &str) -> Value {
    serde_json::from_slice(&fixture_bytes(name)).unwrap()
}

/// All captured AdmissionReviews.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_path(""))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(".json").then_some(name)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 8, "fixtures missing: {names:?}");
    names
}

/// Decodes a reply body and checks the rules every reply must obey; returns the decoded patch
/// (empty when there is none).
pub fn check_reply(body: &[u8], uid: &str) -> (Value, json_patch::Patch) {
    let v: Value = serde_json::from_slice(body).expect("reply is JSON");
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], uid, "uid echoed");
    let has_patch = v["response"].get("patch").is_some();
    let has_type = v["response"].get("patchType").is_some();
    assert_eq!(has_patch, has_type, "patch and patchType come together");
    let patch = if has_patch {
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        let bytes = BASE64
            .decode(v["response"]["patch"].as_str().expect("patch is a string"))
            .expect("patch is standard base64");
        serde_json::from_slice(&bytes).expect("patch is an RFC 6902 document")
    } else {
        json_patch::Patch(Vec::new())
    };
    if let Some(warnings) = v["response"].get("warnings") {
        for w in warnings.as_array().expect("warnings are a list") {
            assert!(w.as_str().unwrap().len() <= 120, "warning too long: {w}");
        }
    }
    (v, patch)
}

/// Applies a patch the way the API server does (all or nothing) and returns the new object.
pub fn apply(object: &Value, patch: &json_patch::Patch) -> Value {
    let mut doc = object.clone();
    json_patch::patch(&mut doc, patch).unwrap_or_else(|e| panic!("patch does not apply: {e}"));
    doc
}

/// Decodes the object as the API server would and validates what the webhook can break.
pub fn validated_pod(object: &Value) -> Pod {
    let pod: Pod = serde_json::from_value(object.clone()).expect("result decodes as a Pod");
    if let Err(e) = validate(&pod) {
        panic!("the API server would refuse this pod: {e}");
    }
    pod
}

/// The subset of apimachinery / core validation that a mutation can violate.
pub fn validate(pod: &Pod) -> Result<(), String> {
    for (k, v) in pod.metadata.labels.iter().flatten() {
        if !qualified_name(k) {
            return Err(format!("label key {k:?}"));
        }
        if !label_value(v) {
            return Err(format!("label value {k}={v:?}"));
        }
    }
    let mut size = 0;
    for (k, v) in pod.metadata.annotations.iter().flatten() {
        if !qualified_name(&k.to_ascii_lowercase()) {
            return Err(format!("annotation key {k:?}"));
        }
        size += k.len() + v.len();
    }
    if size > ANNOTATIONS_SIZE_LIMIT {
        return Err(format!("annotations total {size} bytes"));
    }
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let mut names = std::collections::BTreeSet::new();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        if !names.insert(c.name.clone()) {
            return Err(format!("duplicate container {}", c.name));
        }
        for e in c.env.iter().flatten() {
            validate_env(c, e)?;
        }
    }
    Ok(())
}

fn validate_env(c: &Container, e: &EnvVar) -> Result<(), String> {
    let ok_name = !e.name.is_empty()
        && !e.name.starts_with(|ch: char| ch.is_ascii_digit())
        && e.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !ok_name {
        return Err(format!("{}: env name {:?}", c.name, e.name));
    }
    if let Some(from) = &e.value_from {
        if e.value.as_deref().is_some_and(|v| !v.is_empty()) {
            return Err(format!("{}: {} has value and valueFrom", c.name, e.name));
        }
        let sources = [
            from.secret_key_ref.is_some(),
            from.config_map_key_ref.is_some(),
            from.field_ref.is_some(),
            from.resource_field_ref.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(format!("{}: {} needs one valueFrom source", c.name, e.name));
        }
        if let Some(s) = &from.secret_key_ref
            && (s.name.is_empty() || s.key.is_empty())
        {
            return Err(format!("{}: {} secretKeyRef incomplete", c.name, e.name));
        }
    }
    Ok(())
}

fn name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

pub fn qualified_name(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix) && name_part(name),
        None => name_part(k),
    }
}

pub fn label_value(v: &str) -> bool {
    v.is_empty() || name_part(v)
}

/// The env of a container by name; the last definition wins, as in the kubelet.
pub fn env_of<'a>(pod: &'a Pod, container: &str) -> Vec<&'a EnvVar> {
    let spec = pod.spec.as_ref().unwrap();
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == container)
        .unwrap_or_else(|| panic!("no container {container}"));
    c.env.iter().flatten().collect()
}

pub fn var<'a>(pod: &'a Pod, container: &str, name: &str) -> Option<&'a EnvVar> {
    env_of(pod, container)
        .into_iter()
        .rev()
        .find(|e| e.name == name)
}

pub fn value<'a>(pod: &'a Pod, container: &str, name: &str) -> Option<&'a str> {
    var(pod, container, name).and_then(|e| e.value.as_deref())
}

/// Position of a variable in the container's env list.
pub fn position(pod: &Pod, container: &str, name: &str) -> Option<usize> {
    env_of(pod, container).iter().rposition(|e| e.name == name)
}

/// Wraps a pod object in a CREATE review.
pub fn review_of(uid: &str, namespace: &str, object: &Value) -> Vec<u8> {
    let review = lightstep_tekton_webhook::admission::pod_create_review(uid, namespace, object);
    serde_json::to_vec(&review).unwrap()
}
