//! lightstep-tekton-webhook: Tekton runs in your traces. Two components share one contract, the
//! trace ids: the admission webhook (`serve`) gives each TaskRun pod's steps their trace context
//! and OpenTelemetry settings; the run-span exporter (`export`) turns finished PipelineRuns and
//! TaskRuns into spans with the same ids, so the steps' own telemetry nests inside them.
//!
//! The rooms, from the inside out (each depends only on the ones above it):
//!
//! | room | holds | a newcomer adds here |
//! |---|---|---|
//! | [`contract`] | pure: W3C parsing, every id derivation, sampling, Tekton facts from a pod or a run, the CICD/VCS attribute list | a new id (new versioned domain, pinned test, docs/trace-ids.md) |
//! | `reload` | noticing that mounted files changed: paths polled, contents compared (the policy file, the serving certificate) | |
//! | [`policy`] | the policy document, its validation, the `TracingPolicy` resource, selection, the one loader | a new policy field (`spec.rs`, `resolve.rs`; the CRD follows with `make crd`) |
//! | [`admission`] | the pod view, the decision (env, metadata, report), the review boundary, `/validate`, the `mutate` preview | a new injected variable (`decide/env.rs`) |
//! | [`spans`] | pure: finished runs → span tree → OTLP request, the `spans` preview | a new span attribute |
//! | [`cluster`] | the only Kubernetes client: watch caches, status writes, leader election | a new watched resource |
//! | [`otlp`] | the OTLP trace client: config, TLS, token, retries, errors, the SDK span exporter; shared by the exporter and the webhook's own telemetry | a new transport setting |
//! | [`runtime`] | what every long-running command shares: argument groups, bootstrap and signals, TLS (swapped when its files change), HTTP/1 limits, the admin port and metrics registry, telemetry | a shared flag or limit |
//! | [`export`] | the run-span exporter: which runs are due, the queue, the controller that sends span trees and marks runs | the exporter's code |
//! | [`certs`] | a CA and serving certificate for installs | |
//! | [`serve`] | the webhook command: router, body limits, graceful shutdown | a new route |
//!
//! A review flows `serve` → [`admission::review`] (decode, [`policy::selection`] from the
//! cluster caches) → [`admission::decide`] (facts and ids from [`contract`]) → one reply. A run
//! flows `cluster` watches → [`spans::span_tree`] (the same facts and ids from [`contract`]) →
//! [`export::controller`] → [`otlp`]. The webhook's own spans go [`runtime`] → [`otlp`] too.
//!
//! The whole decision, as the server runs it for one review:
//!
//! ```
//! use lightstep_tekton_webhook::admission::{self, Outcome};
//! use lightstep_tekton_webhook::admission::decide::Mode;
//! use lightstep_tekton_webhook::policy::Policy;
//!
//! let review = br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
//!   "request": {"uid": "7f0c", "namespace": "ci", "operation": "CREATE",
//!     "kind": {"group": "", "version": "v1", "kind": "Pod"},
//!     "object": {"metadata": {"name": "build-pod", "labels": {
//!         "tekton.dev/taskRun": "build", "tekton.dev/taskRunUID": "0b5c1e9a"}},
//!       "spec": {"containers": [{"name": "step-compile", "image": "golang"}]}}}}"#;
//! let reply = admission::review(review, &Policy::embedded_default(), Mode::Inject).unwrap();
//! assert_eq!(reply.outcome, Outcome::Patched);
//! assert_eq!(reply.uid, "7f0c");
//! let body = String::from_utf8(reply.body).unwrap();
//! assert!(body.contains(r#""patchType":"JSONPatch""#));
//! ```
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod cluster;
pub mod contract;
pub mod export;
pub mod otlp;
pub mod policy;
pub(crate) mod reload;
pub mod runtime;
pub mod serve;
pub mod spans;
