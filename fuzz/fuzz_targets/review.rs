//! The whole request path minus HTTP: bytes → [`admission::review`] → the reply the server sends.
//!
//! For any input, in both modes: no panic, no hang, and an `Ok` reply obeys the API server's
//! rules (docs/apiserver-rules.md, section 3), checked by the same code the test suite uses
//! (`tests/support/review.rs`, included by path so the rules exist once). When the review carries a
//! pod the API server could have sent (it decodes as a `Pod` and passes the validation the API
//! server applies), the patch must apply to it, the result must still pass that validation, and
//! a second review of the patched pod (`reinvocationPolicy: IfNeeded`) must give no patch; and
//! that pod, re-encoded as the API server would send it, must be decided on (never "could not
//! be decoded") with a patch that applies. Inject mode never denies.
#![no_main]

#[path = "../../tests/support/review.rs"]
mod support;

use std::sync::LazyLock;

use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use lightstep_tekton_webhook::admission::decide::Mode;
use lightstep_tekton_webhook::admission::{self, Outcome};
use lightstep_tekton_webhook::policy::Policy;
use serde_json::Value;

static POLICY: LazyLock<Policy> = LazyLock::new(Policy::embedded_default);

fuzz_target!(|data: &[u8]| {
    // The input as the API server would have written it. A body the typed decoder accepts but
    // `Value` refuses (a lone UTF-16 surrogate in an ignored field) is not something the API
    // server sends: the reply's envelope is still checked, against the uid the webhook read.
    let input: Option<Value> = serde_json::from_slice(data).ok();
    for mode in [Mode::Inject, Mode::Enforce] {
        let Ok(reply) = admission::review(data, &POLICY, mode) else {
            continue;
        };
        let uid = input.as_ref().map_or(reply.uid.as_str(), |v| {
            v["request"]["uid"].as_str().unwrap_or_default()
        });
        let (v, patch) = support::check_reply(&reply.body, uid);
        if mode == Mode::Inject {
            assert_eq!(v["response"]["allowed"], true, "inject mode never denies");
        }
        let Some(object) = input.as_ref().map(|v| &v["request"]["object"]) else {
            continue;
        };
        // Only a pod the API server could have sent: one that decodes and is valid already.
        let Ok(pod) = serde_json::from_value::<Pod>(object.clone()) else {
            continue;
        };
        if support::validate(&pod).is_err() {
            continue;
        }
        canonical_review(&pod, mode);
        if patch.0.is_empty() {
            continue;
        }
        let patched = support::apply(object, &patch);
        support::validated_pod(&patched);
        let namespace = input.as_ref().unwrap()["request"]["namespace"]
            .as_str()
            .unwrap_or_default();
        let again = admission::review(
            &support::review_of("uid-again", namespace, &patched),
            &POLICY,
            mode,
        )
        .expect("the patched pod is a review");
        let (_, second) = support::check_reply(&again.body, "uid-again");
        assert!(
            second.0.is_empty(),
            "second review patched again: {}",
            serde_json::to_string(&second).unwrap()
        );
    }
});

/// The pod as the API server sends it (decoded, then encoded again: no nulls, no unknown fields,
/// no duplicate keys): the webhook must decide on it (never "could not be decoded", which
/// enforce mode turns into a refused pod), and its patch must apply and keep it valid.
fn canonical_review(pod: &Pod, mode: Mode) {
    let object = serde_json::to_value(pod).expect("a Pod serializes");
    let body = support::review_of("uid-canonical", "ns", &object);
    let reply = admission::review(&body, &POLICY, mode).expect("a canonical review is a review");
    assert!(
        !matches!(reply.outcome, Outcome::Failed { .. }),
        "a valid pod could not be decided on: {:?}",
        reply.error
    );
    let (_, patch) = support::check_reply(&reply.body, "uid-canonical");
    if !patch.0.is_empty() {
        support::validated_pod(&support::apply(&object, &patch));
    }
}
