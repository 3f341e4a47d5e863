//! lightstep-tekton-webhook: a Kubernetes mutating admission webhook that joins Tekton TaskRun
//! steps to OpenTelemetry traces.
//!
//! The flow is gather → decide → respond:
//! 1. [`admission`] decodes an `admission.k8s.io/v1` AdmissionReview and finds the pod;
//! 2. [`tekton`] reads the TaskRun facts off the pod, [`trace_context`] chooses the trace ids,
//!    and [`mutate`] decides, purely, whether to skip the pod or which JSON Patch to apply;
//! 3. [`admission`] turns that decision into the one reply the API server accepts.
//!
//! [`policy`] holds what to inject. [`tracing_policy`] is the same policy as a cluster resource,
//! [`selection`] chooses among those for a namespace (purely), and [`cluster`], the only module
//! with a Kubernetes client, keeps them and the namespaces' labels in watch caches. The preview
//! command ([`preview`]) runs the same path on a file so platform teams can see a patch before
//! they install anything.
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
pub mod policy;
pub mod runtime;
pub mod serve;
pub mod spans;
