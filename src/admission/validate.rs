//! The validating webhook's decision: a review of the policy ConfigMap or of a TracingPolicy
//! in, `allowed` or denied with the one-line, field-naming error out.
//!
//! A policy is refused when it is applied, not when a replica restarts on it: the ConfigMap's
//! `policy.yaml` goes through [`Policy::from_yaml`] (the check `serve` and `mutate --policy`
//! make), a TracingPolicy through [`resource::decode`] and [`resource::resolve`] (the check
//! behind its `Valid` condition and `mutate --policy-dir`), so the error a platform team reads
//! from `kubectl apply` is the one they would read in the log or the status:
//!
//! ```text
//! admission webhook "policy.validate.lightstep-tekton.io" denied the request:
//!   data[policy.yaml]: sampling.ratio: must be between 0 and 1, got 2
//! ```
//!
//! Scope: the webhook configuration sends only CREATE and UPDATE of ConfigMaps labelled
//! [`POLICY_LABEL`] in the install's namespace, and of TracingPolicies. Anything else that
//! arrives anyway (a ConfigMap without the label, a DELETE, a status update, another kind) is
//! allowed untouched: this webhook judges policies, nothing else. Pure: no I/O, no logging.

use serde_json::value::RawValue;

use crate::admission::envelope::{
    API_VERSION, BadRequest, KIND, RequestIn, ResponseOut, ReviewIn, ReviewOut, StatusOut, open,
    without_values,
};
use crate::policy::Policy;
use crate::policy::resource;

/// The label that marks the ConfigMap holding the webhook's policy file; the webhook
/// configuration's `objectSelector` sends only ConfigMaps that carry it.
pub const POLICY_LABEL: &str = "lightstep-tekton.io/policy";
/// The key of that ConfigMap the Deployment's `--policy` file is.
pub const POLICY_KEY: &str = "policy.yaml";

/// Longest message sent back: an error names a field and may quote the value it refused (a
/// policy holds no secret values, only references); a terminal shows a few lines of it, and a
/// quoted megabyte helps nobody.
const MESSAGE_MAX: usize = 512;

/// What the review was about, for the log line and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// The policy ConfigMap (it carries [`POLICY_LABEL`]).
    PolicyConfigMap,
    TracingPolicy,
    /// Anything the webhook does not judge (see the module docs); allowed untouched.
    Other,
}

impl Subject {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Subject::PolicyConfigMap => "policy-configmap",
            Subject::TracingPolicy => "tracingpolicy",
            Subject::Other => "other",
        }
    }
}

/// The decision on one review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A policy that validates; its marker (`<name>@<fingerprint>`) for the log.
    Valid(String),
    /// Refused; the message names the field (`spec.sampling.ratio: ...`).
    Invalid(String),
    /// Not something this webhook judges: allowed untouched.
    Ignored,
}

impl Verdict {
    /// The label used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Valid(_) => "valid",
            Verdict::Invalid(_) => "invalid",
            Verdict::Ignored => "ignored",
        }
    }
}

/// The reply to one validating review, and what the server logs and counts about it.
#[derive(Debug, Clone)]
pub struct Validation {
    /// The AdmissionReview JSON to send with HTTP 200.
    pub body: Vec<u8>,
    pub uid: String,
    pub subject: Subject,
    /// `<namespace>/<name>` for the ConfigMap, the name for a TracingPolicy; empty if unknown.
    pub object: String,
    pub verdict: Verdict,
}

/// The part of a ConfigMap this webhook reads.
#[derive(serde::Deserialize)]
struct ConfigMapView {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    data: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Default, serde::Deserialize)]
struct Metadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// Answers one validating AdmissionReview. Never panics on input; every `Ok` is a reply the
/// API server accepts (v1, uid echoed, a status with every denial).
pub fn validate(body: &[u8]) -> Result<Validation, BadRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BadRequest::Empty);
    }
    let review: ReviewIn<&RawValue> =
        serde_json::from_slice(body).map_err(|e| BadRequest::Json(without_values(&e)))?;
    let request = open(review)?;
    let uid = request.uid.clone();
    let (subject, object, verdict) = judge(&request);
    Ok(respond(uid, subject, object, verdict))
}

/// The decision, from the request alone.
fn judge(request: &RequestIn<&RawValue>) -> (Subject, String, Verdict) {
    let ignored = (Subject::Other, String::new(), Verdict::Ignored);
    let is_write = matches!(request.operation.as_deref(), Some("CREATE" | "UPDATE"));
    let is_subresource = request
        .sub_resource
        .as_deref()
        .is_some_and(|s| !s.is_empty());
    let (Some(kind), Some(object), true, false) =
        (&request.kind, request.object, is_write, is_subresource)
    else {
        return ignored;
    };
    match (kind.group.as_str(), kind.kind.as_str()) {
        ("", "ConfigMap") => judge_config_map(object),
        (resource::GROUP, resource::KIND) => judge_tracing_policy(object),
        _ => ignored,
    }
}

fn judge_config_map(object: &RawValue) -> (Subject, String, Verdict) {
    let Ok(map) = serde_json::from_str::<ConfigMapView>(object.get()) else {
        // Not even a ConfigMap's shape: the API server never sends one; nothing to judge.
        return (Subject::Other, String::new(), Verdict::Ignored);
    };
    let labelled = map
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(POLICY_LABEL));
    let name = format!(
        "{}/{}",
        map.metadata.namespace.unwrap_or_default(),
        map.metadata.name.unwrap_or_default()
    );
    if !labelled {
        return (Subject::Other, name, Verdict::Ignored);
    }
    let verdict = match map.data.as_ref().and_then(|d| d.get(POLICY_KEY)) {
        None => Verdict::Invalid(format!(
            "data[{POLICY_KEY}]: missing; the webhook reads its policy file from this key"
        )),
        Some(text) => match Policy::from_yaml(text) {
            Ok(policy) => Verdict::Valid(policy.marker().to_owned()),
            Err(e) => Verdict::Invalid(format!("data[{POLICY_KEY}]: {e}")),
        },
    };
    (Subject::PolicyConfigMap, name, verdict)
}

fn judge_tracing_policy(object: &RawValue) -> (Subject, String, Verdict) {
    let value: serde_json::Value = match serde_json::from_str(object.get()) {
        Ok(v) => v,
        Err(_) => {
            let verdict = Verdict::Invalid("object: not a JSON object".to_owned());
            return (Subject::TracingPolicy, String::new(), verdict);
        }
    };
    let name = value
        .pointer("/metadata/name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let verdict = match resource::decode(value) {
        Err(invalid) => Verdict::Invalid(invalid.to_string()),
        Ok(tp) => match resource::resolve(&tp) {
            Ok(resolved) => Verdict::Valid(resolved.policy.marker().to_owned()),
            Err(rejected) => Verdict::Invalid(rejected.error.to_string()),
        },
    };
    (Subject::TracingPolicy, name, verdict)
}

/// The one place a verdict becomes a response.
fn respond(uid: String, subject: Subject, object: String, verdict: Verdict) -> Validation {
    let status = match &verdict {
        Verdict::Invalid(message) => Some(StatusOut {
            status: "Failure",
            // What the API server's own validation answers for an invalid object.
            code: 422,
            reason: "Invalid",
            message: one_line(message),
        }),
        Verdict::Valid(_) | Verdict::Ignored => None,
    };
    let out = ReviewOut {
        api_version: API_VERSION,
        kind: KIND,
        response: ResponseOut {
            uid: &uid,
            allowed: status.is_none(),
            status,
            patch_type: None,
            patch: None,
            warnings: &[],
        },
    };
    // Strings and booleans only: serialization cannot fail.
    let body = serde_json::to_vec(&out).expect("AdmissionReview serializes");
    Validation {
        body,
        uid,
        subject,
        object: one_line(&object),
        verdict,
    }
}

/// One line, at most [`MESSAGE_MAX`] bytes.
fn one_line(message: &str) -> String {
    let mut line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MESSAGE_MAX {
        let mut cut = MESSAGE_MAX - 3;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review(operation: &str, kind: Value, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "request": {"uid": "v-1", "kind": kind, "operation": operation,
                        "namespace": "lightstep-tekton", "object": object}
        }))
        .unwrap()
    }

    fn config_map_kind() -> Value {
        json!({"group": "", "version": "v1", "kind": "ConfigMap"})
    }

    fn tracing_policy_kind() -> Value {
        json!({"group": resource::GROUP, "version": resource::VERSION, "kind": resource::KIND})
    }

    fn policy_map(policy: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "lightstep-tekton-webhook-policy",
                         "namespace": "lightstep-tekton",
                         "labels": {POLICY_LABEL: "true"}},
            "data": {POLICY_KEY: policy}
        })
    }

    fn tracing_policy(spec: Value) -> Value {
        json!({
            "apiVersion": format!("{}/{}", resource::GROUP, resource::VERSION),
            "kind": resource::KIND,
            "metadata": {"name": "team-a", "generation": 1},
            "spec": spec
        })
    }

    /// `allowed`, and the message when denied.
    fn answer(v: &Validation) -> (bool, Option<String>) {
        let reply: Value = serde_json::from_slice(&v.body).unwrap();
        assert_eq!(reply["apiVersion"], API_VERSION);
        assert_eq!(reply["kind"], KIND);
        assert_eq!(reply["response"]["uid"], "v-1");
        assert!(reply["response"].get("patch").is_none());
        let allowed = reply["response"]["allowed"].as_bool().unwrap();
        let message = reply["response"]["status"]["message"]
            .as_str()
            .map(str::to_owned);
        assert_eq!(allowed, message.is_none(), "{reply}");
        if !allowed {
            assert_eq!(reply["response"]["status"]["code"], 422);
        }
        (allowed, message)
    }

    #[test]
    fn a_valid_policy_config_map_is_allowed_and_an_invalid_one_denied_naming_the_field() {
        for operation in ["CREATE", "UPDATE"] {
            let body = review(
                operation,
                config_map_kind(),
                policy_map(crate::policy::DEFAULT_POLICY_YAML),
            );
            let v = validate(&body).unwrap();
            assert_eq!(v.subject, Subject::PolicyConfigMap);
            assert_eq!(v.object, "lightstep-tekton/lightstep-tekton-webhook-policy");
            assert!(matches!(v.verdict, Verdict::Valid(_)), "{:?}", v.verdict);
            assert_eq!(answer(&v), (true, None));

            let v = validate(&review(
                operation,
                config_map_kind(),
                policy_map("sampling:\n  ratio: 2\n"),
            ))
            .unwrap();
            // The line `mutate --policy` prints after the path, under the ConfigMap's key.
            let expected = format!(
                "data[policy.yaml]: {}",
                Policy::from_yaml("sampling:\n  ratio: 2\n").unwrap_err()
            );
            assert_eq!(
                expected,
                "data[policy.yaml]: sampling.ratio: must be between 0 and 1, got 2"
            );
            assert_eq!(answer(&v), (false, Some(expected)));
        }

        let v = validate(&review(
            "CREATE",
            config_map_kind(),
            policy_map("exporter:\n  protocol: carrier-pigeon\n"),
        ))
        .unwrap();
        let (_, message) = answer(&v);
        assert!(
            message
                .unwrap()
                .starts_with("data[policy.yaml]: exporter.protocol"),
            "{:?}",
            v.verdict
        );

        let mut missing = policy_map("");
        missing["data"] = json!({"other.yaml": "x"});
        let v = validate(&review("CREATE", config_map_kind(), missing)).unwrap();
        let (allowed, message) = answer(&v);
        assert!(!allowed);
        assert!(message.unwrap().starts_with("data[policy.yaml]: missing"));
    }

    #[test]
    fn a_tracing_policy_is_judged_as_its_status_would_be() {
        let good = tracing_policy(json!({"profile": "otlp",
            "exporter": {"endpoint": "http://collector.observability:4317"}}));
        let v = validate(&review("CREATE", tracing_policy_kind(), good)).unwrap();
        assert_eq!(v.subject, Subject::TracingPolicy);
        assert_eq!(v.object, "team-a");
        assert_eq!(answer(&v), (true, None));

        for (spec, field) in [
            (json!({"sampling": {"ratio": 2}}), "spec.sampling.ratio"),
            (
                json!({"token": {"secretName": "Not_Valid"}}),
                "spec.token.secretName",
            ),
            (
                json!({"namespaceSelector": {"matchExpressions": [
                    {"key": "team", "operator": "Near"}]}}),
                "spec.namespaceSelector.matchExpressions[0].operator",
            ),
            (json!({"exporter": {"endpont": "x"}}), "spec.exporter"),
        ] {
            let tp = tracing_policy(spec.clone());
            let v = validate(&review("UPDATE", tracing_policy_kind(), tp.clone())).unwrap();
            let (allowed, message) = answer(&v);
            assert!(!allowed, "{spec}");
            let message = message.unwrap();
            assert!(message.starts_with(field), "{spec}: {message}");
            // The same words as the TracingPolicy's Valid condition.
            let status = match resource::decode(tp) {
                Err(e) => e.to_string(),
                Ok(tp) => resource::resolve(&tp).unwrap_err().error.to_string(),
            };
            assert_eq!(message, status);
        }
    }

    #[test]
    fn what_it_does_not_judge_passes_untouched() {
        let bad = "sampling:\n  ratio: 2\n";
        let mut other_map = policy_map(bad);
        other_map["metadata"]["labels"] = json!({"app": "something-else"});
        let cases = [
            // Another ConfigMap, even with a key of the same name.
            review("CREATE", config_map_kind(), other_map),
            // Deleting the policy ConfigMap or a TracingPolicy is not validating them.
            review("DELETE", config_map_kind(), policy_map(bad)),
            review(
                "DELETE",
                tracing_policy_kind(),
                tracing_policy(json!({"sampling": {"ratio": 2}})),
            ),
            // Another kind altogether.
            review(
                "CREATE",
                json!({"group": "", "version": "v1", "kind": "Secret"}),
                json!({"metadata": {"labels": {POLICY_LABEL: "true"}}, "data": {POLICY_KEY: "eA=="}}),
            ),
        ];
        for body in cases {
            let v = validate(&body).unwrap();
            assert_eq!(v.verdict, Verdict::Ignored);
            assert_eq!(answer(&v), (true, None));
        }
        // The status subresource (the webhook's own status writes) is never judged.
        let mut status: Value = serde_json::from_slice(&review(
            "UPDATE",
            tracing_policy_kind(),
            tracing_policy(json!({"sampling": {"ratio": 2}})),
        ))
        .unwrap();
        status["request"]["subResource"] = json!("status");
        let v = validate(&serde_json::to_vec(&status).unwrap()).unwrap();
        assert_eq!(v.verdict, Verdict::Ignored);
    }

    #[test]
    fn bad_bodies_are_bad_requests_and_long_messages_are_clipped() {
        assert_eq!(validate(b" ").unwrap_err(), BadRequest::Empty);
        assert!(matches!(validate(b"{"), Err(BadRequest::Json(_))));
        assert_eq!(
            validate(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#)
                .unwrap_err(),
            BadRequest::NoRequest
        );
        let long = format!("exporter:\n  endpoint: \"{}\"\n", "x\n".repeat(10_000));
        let v = validate(&review("CREATE", config_map_kind(), policy_map(&long))).unwrap();
        let (_, message) = answer(&v);
        let message = message.unwrap();
        assert!(message.len() <= MESSAGE_MAX, "{}", message.len());
        assert!(!message.contains('\n'));
        assert!(
            message.starts_with("data[policy.yaml]: exporter.endpoint"),
            "{message}"
        );
    }
}
