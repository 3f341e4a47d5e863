//! The AdmissionReview boundary: bytes in, the one reply the API server accepts out.
//!
//! This is the only module that knows the `admission.k8s.io/v1` shapes. It decodes the request
//! (borrowing the pod's JSON until it is known to be a pod create), asks the caller which policy
//! applies to the request's namespace (a [`Selected`], from cached state: no I/O here), calls
//! [`decide::decide`], and maps every outcome, errors included, to a response in one place
//! (`respond`):
//!
//! | outcome | inject mode | enforce mode | audit (policy mode) |
//! |---|---|---|---|
//! | patch | allowed, base64 JSONPatch | same | allowed, no patch, one warning: `audited` |
//! | skip (not a TaskRun pod, opted out, already injected) | allowed, no patch | same | same |
//! | not a pod create (misrouted review) | allowed, no patch | same | same |
//! | pod cannot be decoded | allowed, no patch, a warning | denied (403) with a message | allowed, a warning |
//!
//! The mode a pod is decided in is the path's (`/mutate` inject, `/enforce` enforce), except that
//! a TracingPolicy in mode `enforce` enforces on either path, and one in mode `audit` decides as
//! the path says but never patches and never denies. Audit lives here rather than in
//! [`decide::decide`] because it changes only the response, not the decision: the decision stays
//! pure and identical, which is what makes an audit run a faithful trial of the policy.
//!
//! When the server has no file policy (its file was invalid at start, see
//! [`crate::policy::loader`]), [`review_or_pass`] answers a pod that no TracingPolicy selects with
//! `allowed: true`, no patch and one warning, on either path: nothing is injected that the
//! platform team did not choose, and an enforced namespace can still create pods.
//!
//! A body that is not a v1 AdmissionReview at all has no uid to answer to: [`BadRequest`], which
//! the server turns into HTTP 400. The envelope types are shared with the validating webhook
//! ([`crate::admission::validate`]).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::value::RawValue;

use super::envelope::{
    API_VERSION, BadRequest, KIND, RequestIn, ResponseOut, ReviewIn, ReviewOut, StatusOut, open,
    warning, without_values,
};
use crate::admission::decide::{self, Action, Decision, Mode, SkipReason, VarOutcome};
use crate::admission::pod::PodView;
use crate::policy::Policy;
use crate::policy::resource::PolicyMode;
use crate::policy::selection::{Fallback, Selected};

/// What happened to one review, for the log line and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Patched,
    Skipped(SkipReason),
    /// Not a pod CREATE (the webhook configuration sent something else): allowed untouched.
    NotPodCreate,
    /// Deciding failed; `denied` in enforce mode, allowed untouched in inject and audit mode.
    Failed {
        denied: bool,
    },
    /// A policy in audit mode would have patched the pod: allowed untouched, with a warning.
    Audited,
    /// No policy to decide with (the policy file is invalid and no TracingPolicy selects the
    /// namespace): allowed untouched on either path, with a warning.
    NoPolicy,
}

impl Outcome {
    /// The decision label used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Skipped(_) => "skipped",
            Outcome::NotPodCreate => "skipped",
            Outcome::Failed { denied: true } => "denied",
            Outcome::Failed { denied: false } => "allowed-on-error",
            Outcome::Audited => "audited",
            Outcome::NoPolicy => "no-policy",
        }
    }

    /// The skip reason label, when the pod was skipped.
    pub fn skip_reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Skipped(r) => Some(r.as_str()),
            Outcome::NotPodCreate => Some("not-pod-create"),
            _ => None,
        }
    }
}

/// The reply to one review, and what the server logs and counts about it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The AdmissionReview JSON to send with HTTP 200.
    pub body: Vec<u8>,
    pub uid: String,
    pub namespace: String,
    /// The pod's name, or `<generateName>*` when the API server has not named it yet.
    pub pod: String,
    /// The mode the pod was decided in: the path's, or enforce for a policy in enforce mode.
    pub mode: Mode,
    /// The applied policy's marker (`<name>@<fingerprint>`, `<name>@gen<n>/<fingerprint>` for a
    /// TracingPolicy); empty when no pod was decided on.
    pub policy: String,
    /// The policy's own mode (`audit` turns a patch into a warning).
    pub policy_mode: PolicyMode,
    /// Why the file or embedded policy applies, when no TracingPolicy was chosen.
    pub fallback: Option<Fallback>,
    pub outcome: Outcome,
    pub warnings: Vec<String>,
    /// Length of the JSON Patch in bytes (before base64), 0 without one.
    pub patch_bytes: usize,
    /// The internal error behind [`Outcome::Failed`], for the log line only (never sent).
    pub error: Option<String>,
    /// The decision, with its explanation; `None` when no pod was decided on.
    pub decision: Option<Decision>,
}

/// A CREATE review of a pod, shaped as the API server sends it: what `mutate` wraps a bare Pod
/// in, and what the tests and the fuzzer build their reviews with.
pub fn pod_create_review(
    uid: &str,
    namespace: &str,
    object: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": object,
        }
    })
}

/// Answers one AdmissionReview. Never panics on input; every `Ok` is a reply the API server
/// accepts (v1, uid echoed, a patch only with its type).
///
/// The common case is decoded in one pass, pod included. Only when that fails is the body read
/// again with the object kept raw, to tell a malformed review (400) from a well-formed review of
/// a pod the webhook cannot read (a reply, allowed or denied by mode); the pod's JSON, most of
/// the body, is then not scanned twice on every request.
pub fn review(body: &[u8], policy: &Policy, mode: Mode) -> Result<Reply, BadRequest> {
    review_with(body, mode, |_| {
        Selected::fallback(policy, Fallback::NotWatching)
    })
}

/// [`review`] with the policy chosen per namespace: `select` gets the request's namespace and
/// answers from cached state (see [`crate::policy::selection`]). It is called once, and only for a
/// pod CREATE.
pub fn review_with<'p>(
    body: &[u8],
    mode: Mode,
    select: impl FnOnce(&str) -> Selected<'p>,
) -> Result<Reply, BadRequest> {
    review_or_pass(body, mode, |namespace| Some(select(namespace)))
}

/// [`review_with`] for a server that may have no fallback policy: `select` answers `None` when
/// nothing applies to the namespace, and the pod is then allowed untouched with a warning
/// ([`Outcome::NoPolicy`]) whatever the path, an undecodable pod included.
pub fn review_or_pass<'p>(
    body: &[u8],
    mode: Mode,
    select: impl FnOnce(&str) -> Option<Selected<'p>>,
) -> Result<Reply, BadRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BadRequest::Empty);
    }
    if let Ok(review) = serde_json::from_slice::<ReviewIn<PodView>>(body) {
        let (reply, request) = accept(review, mode)?;
        return Ok(match request {
            Some(RequestIn {
                object: Some(pod), ..
            }) => {
                let (reply, selected) = choose(reply, Some(&pod), select);
                decide(reply, &pod, selected)
            }
            Some(_) => fail(
                choose(reply, None, select).0,
                "request has no object".to_owned(),
            ),
            None => respond(reply, None),
        });
    }
    let review: ReviewIn<&RawValue> =
        serde_json::from_slice(body).map_err(|e| BadRequest::Json(without_values(&e)))?;
    let (reply, request) = accept(review, mode)?;
    let Some(request) = request else {
        return Ok(respond(reply, None));
    };
    Ok(
        match request
            .object
            .map(|raw| serde_json::from_str::<PodView>(raw.get()))
        {
            Some(Ok(pod)) => {
                let (reply, selected) = choose(reply, Some(&pod), select);
                decide(reply, &pod, selected)
            }
            Some(Err(e)) => fail(
                choose(reply, None, select).0,
                format!("pod could not be decoded: {}", without_values(&e)),
            ),
            None => fail(
                choose(reply, None, select).0,
                "request has no object".to_owned(),
            ),
        },
    )
}

/// Asks for the namespace's policy and sets the mode the pod is decided in.
fn choose<'p>(
    mut reply: Reply,
    pod: Option<&PodView>,
    select: impl FnOnce(&str) -> Option<Selected<'p>>,
) -> (Reply, Option<Selected<'p>>) {
    if reply.namespace.is_empty() {
        let from_pod = pod.and_then(|p| p.metadata.namespace.clone());
        reply.namespace = from_pod.unwrap_or_default();
    }
    let Some(selected) = select(&reply.namespace) else {
        reply.outcome = Outcome::NoPolicy;
        return (reply, None);
    };
    reply.policy = selected.policy.marker().to_owned();
    reply.policy_mode = selected.mode;
    reply.fallback = match selected.choice {
        crate::policy::selection::Choice::Fallback(why) => Some(why),
        crate::policy::selection::Choice::TracingPolicy(_) => None,
    };
    if selected.mode == PolicyMode::Enforce {
        reply.mode = Mode::Enforce;
    }
    (reply, Some(selected))
}

/// Checks the envelope and starts the reply. The request comes back only when it is a pod
/// CREATE, the one thing this webhook decides on.
fn accept<O>(review: ReviewIn<O>, mode: Mode) -> Result<(Reply, Option<RequestIn<O>>), BadRequest> {
    let request = open(review)?;
    let reply = Reply {
        body: Vec::new(),
        uid: request.uid.clone(),
        namespace: request.namespace.clone().unwrap_or_default(),
        pod: String::new(),
        mode,
        policy: String::new(),
        policy_mode: PolicyMode::Inject,
        fallback: None,
        outcome: Outcome::NotPodCreate,
        warnings: Vec::new(),
        patch_bytes: 0,
        error: None,
        decision: None,
    };
    let is_pod = request
        .kind
        .as_ref()
        .is_none_or(|k| k.group.is_empty() && k.kind == "Pod");
    let is_create = request.operation.as_deref().is_none_or(|op| op == "CREATE");
    let is_subresource = request
        .sub_resource
        .as_deref()
        .is_some_and(|s| !s.is_empty());
    if !is_pod || !is_create || is_subresource {
        return Ok((reply, None));
    }
    Ok((reply, Some(request)))
}

fn decide(mut reply: Reply, pod: &PodView, selected: Option<Selected<'_>>) -> Reply {
    reply.pod = pod.display_name();
    let Some(selected) = selected else {
        return respond(reply, None);
    };
    let decision = decide::decide(
        pod,
        decide::Request {
            namespace: &reply.namespace,
            mode: reply.mode,
        },
        selected.policy,
    );
    respond(reply, Some(decision))
}

fn fail(mut reply: Reply, error: String) -> Reply {
    if reply.outcome == Outcome::NoPolicy {
        // Without a policy there is nothing to enforce: the pod goes through, said once.
        reply.error = Some(error);
        return respond(reply, None);
    }
    reply.outcome = Outcome::Failed {
        // Audit is a trial: it must never stop a pod, not even one it cannot read.
        denied: reply.mode == Mode::Enforce && reply.policy_mode != PolicyMode::Audit,
    };
    reply.error = Some(error);
    respond(reply, None)
}

/// The one place an outcome becomes a response.
fn respond(mut reply: Reply, decision: Option<Decision>) -> Reply {
    let mut patch = None;
    let mut status = None;
    let mut allowed = true;
    if let Some(decision) = &decision {
        reply.warnings = decision.warnings.iter().map(|w| warning(w)).collect();
        match &decision.action {
            Action::Skip(reason) => reply.outcome = Outcome::Skipped(*reason),
            Action::Patch(_) if reply.policy_mode == PolicyMode::Audit => {
                // The decision's own warnings describe changes that are not made: replaced by
                // the one that says what would have been.
                reply.warnings = vec![warning(&audit_message(&reply.policy, decision))];
                reply.outcome = Outcome::Audited;
            }
            Action::Patch(p) => {
                // A patch of plain JSON values always serializes.
                let json = serde_json::to_vec(p).expect("JSON patch serializes");
                reply.patch_bytes = json.len();
                patch = Some(BASE64.encode(json));
                reply.outcome = Outcome::Patched;
            }
        }
    }
    if reply.outcome == Outcome::NoPolicy {
        reply.warnings.push(warning(
            "tracing not injected: the webhook's policy file is invalid (see its logs)",
        ));
    }
    if let Outcome::Failed { denied } = reply.outcome {
        if denied {
            allowed = false;
            status = Some(StatusOut {
                status: "Failure",
                code: 403,
                reason: "Forbidden",
                message: "lightstep-tekton-webhook: tracing is enforced in this namespace and \
                          the pod could not be checked; see the webhook's logs"
                    .to_owned(),
            });
        } else {
            reply.warnings.push(warning(
                "tracing not injected: internal error (see webhook logs)",
            ));
        }
    }
    let out = ReviewOut {
        api_version: API_VERSION,
        kind: KIND,
        response: ResponseOut {
            uid: &reply.uid,
            allowed,
            status,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings: &reply.warnings,
        },
    };
    // Strings and booleans only: serialization cannot fail.
    reply.body = serde_json::to_vec(&out).expect("AdmissionReview serializes");
    reply.decision = decision;
    reply
}

/// The audit warning: which policy, and how many containers it would change.
fn audit_message(marker: &str, decision: &Decision) -> String {
    let name = marker.rsplit_once('@').map_or(marker, |(name, _)| name);
    let changed = decision.report.as_ref().map_or(0, |r| {
        r.containers
            .iter()
            .filter(|c| {
                c.vars.iter().any(|v| {
                    matches!(
                        v.outcome,
                        VarOutcome::Injected
                            | VarOutcome::Merged(_)
                            | VarOutcome::Replaced
                            | VarOutcome::Moved
                    )
                })
            })
            .count()
    });
    let containers = if changed == 1 {
        "container"
    } else {
        "containers"
    };
    format!(
        "audit: policy {name} would inject tracing into {changed} {containers}; pod not changed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn policy() -> Policy {
        Policy::embedded_default()
    }

    fn parse(reply: &Reply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    fn review_of(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "namespace": "ns", "operation": "CREATE", "object": object}
        }))
        .unwrap()
    }

    #[test]
    fn bad_bodies_are_bad_requests() {
        let p = policy();
        assert_eq!(
            review(b"", &p, Mode::Inject).unwrap_err(),
            BadRequest::Empty
        );
        assert!(matches!(
            review(b"{\"apiVersion\":", &p, Mode::Inject),
            Err(BadRequest::Json(_))
        ));
        assert!(matches!(
            review(
                br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
                &p,
                Mode::Inject
            ),
            Err(BadRequest::NotAdmissionReview { .. })
        ));
        assert_eq!(
            review(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
                &p,
                Mode::Inject
            )
            .unwrap_err(),
            BadRequest::NoRequest
        );
        assert_eq!(
            review(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
                &p,
                Mode::Inject
            )
            .unwrap_err(),
            BadRequest::NoUid
        );
        assert!(matches!(
            review(b"[1,2]", &p, Mode::Inject),
            Err(BadRequest::Json(_))
        ));
    }

    #[test]
    fn undecodable_pod_is_allowed_in_inject_and_denied_in_enforce() {
        let body = review_of(json!({"metadata": {"labels": "not a map"}}));
        let inject = review(&body, &policy(), Mode::Inject).unwrap();
        let v = parse(&inject);
        assert_eq!(v["response"]["uid"], "u-1");
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none());
        assert_eq!(v["response"]["warnings"].as_array().unwrap().len(), 1);
        assert_eq!(inject.outcome, Outcome::Failed { denied: false });
        assert!(inject.error.is_some());

        let enforce = review(&body, &policy(), Mode::Enforce).unwrap();
        let v = parse(&enforce);
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(v["response"]["status"]["code"], 403);
        // The internal error is logged, not sent.
        assert!(!String::from_utf8_lossy(&enforce.body).contains("not a map"));
    }

    #[test]
    fn other_kinds_and_operations_pass_untouched() {
        let mut v: Value = serde_json::from_slice(&review_of(json!({}))).unwrap();
        v["request"]["operation"] = json!("UPDATE");
        let reply = review(&serde_json::to_vec(&v).unwrap(), &policy(), Mode::Enforce).unwrap();
        assert_eq!(reply.outcome, Outcome::NotPodCreate);
        assert_eq!(parse(&reply)["response"]["allowed"], true);
    }

    #[test]
    fn a_patch_carries_its_type_and_is_base64() {
        let body = review_of(json!({
            "metadata": {"name": "tr-pod", "labels": {"tekton.dev/taskRun": "tr"}},
            "spec": {"containers": [{"name": "step-a"}]}
        }));
        let reply = review(&body, &policy(), Mode::Inject).unwrap();
        assert_eq!(reply.outcome, Outcome::Patched);
        let v = parse(&reply);
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], KIND);
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        let patch = BASE64
            .decode(v["response"]["patch"].as_str().unwrap())
            .unwrap();
        assert_eq!(patch.len(), reply.patch_bytes);
        let _: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    }

    #[test]
    fn decoding_errors_do_not_quote_the_input() {
        let secret = "lsat_7Hq2v9XkR4mN8pW3zL6yT1cB5dJ0fG2s";
        let body = review_of(json!({"metadata": {"name": "p"}, "spec": {"containers": secret}}));
        let reply = review(&body, &policy(), Mode::Enforce).unwrap();
        let error = reply.error.unwrap();
        assert!(error.contains("expected a sequence"), "{error}");
        assert!(!error.contains(secret), "{error}");
        let bad = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":"{secret}"}}"#
        );
        let err = review(bad.as_bytes(), &policy(), Mode::Inject).unwrap_err();
        assert!(matches!(err, BadRequest::Json(_)), "{err}");
        assert!(!err.to_string().contains(secret), "{err}");
    }

    /// D7: a wrong apiVersion or kind is named with the value expected, never quoted.
    #[test]
    fn a_wrong_envelope_is_named_not_echoed() {
        let secret = "lsat_7Hq2v9XkR4mN8pW3zL6yT1cB5dJ0fG2s";
        for (api_version, kind, field, expected) in [
            (secret, KIND, "apiVersion", API_VERSION),
            (API_VERSION, secret, "kind", KIND),
            (secret, secret, "apiVersion", API_VERSION),
        ] {
            let bad = format!(r#"{{"apiVersion":"{api_version}","kind":"{kind}"}}"#);
            let err = review(bad.as_bytes(), &policy(), Mode::Inject).unwrap_err();
            let message = err.to_string();
            assert!(!message.contains(&secret[..8]), "{message}");
            assert!(
                message.contains(field) && message.contains(expected),
                "{message}"
            );
        }
    }

    /// A nesting bomb neither overflows the stack nor stops the reply: in a field the webhook
    /// ignores it is skipped, in one it reads it hits serde_json's recursion limit.
    #[test]
    fn deeply_nested_json_gets_an_answer() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let ignored = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","junk":{deep},"request":{{"uid":"u","object":{{"metadata":{{"name":"p","junk":{deep}}}}}}}}}"#
        );
        let reply = review(ignored.as_bytes(), &policy(), Mode::Enforce).unwrap();
        assert_eq!(reply.outcome, Outcome::Skipped(SkipReason::NotTaskRunPod));
        let read = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","object":{{"metadata":{{"labels":{deep}}}}}}}}}"#
        );
        let reply = review(read.as_bytes(), &policy(), Mode::Enforce);
        assert!(
            matches!(&reply, Err(BadRequest::Json(_)))
                || matches!(&reply, Ok(r) if r.outcome == Outcome::Failed { denied: true }),
            "{:?}",
            reply.map(|r| r.outcome)
        );
    }

    #[test]
    fn without_a_policy_every_pod_is_allowed_untouched_with_a_warning() {
        let taskrun = review_of(json!({
            "metadata": {"name": "tr-pod", "labels": {"tekton.dev/taskRun": "tr"}},
            "spec": {"containers": [{"name": "step-a"}]}
        }));
        let undecodable = review_of(json!({"metadata": {"labels": "not a map"}}));
        for body in [&taskrun, &undecodable] {
            for mode in [Mode::Inject, Mode::Enforce] {
                let reply = review_or_pass(body, mode, |_| None).unwrap();
                assert_eq!(reply.outcome, Outcome::NoPolicy, "{mode:?}");
                let v = parse(&reply);
                assert_eq!(v["response"]["allowed"], true, "{mode:?}: {v}");
                assert!(v["response"].get("patch").is_none());
                assert!(v["response"].get("status").is_none());
                let warnings = v["response"]["warnings"].as_array().unwrap();
                assert_eq!(warnings.len(), 1, "{v}");
                assert!(
                    warnings[0]
                        .as_str()
                        .unwrap()
                        .contains("policy file is invalid")
                );
                assert!(reply.policy.is_empty());
            }
        }
        // The same body with a policy is patched: the pass-through is the missing policy's doing.
        let p = policy();
        let reply = review_or_pass(&taskrun, Mode::Inject, |_| {
            Some(Selected::fallback(&p, Fallback::NotWatching))
        })
        .unwrap();
        assert_eq!(reply.outcome, Outcome::Patched);
    }
}
