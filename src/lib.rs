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
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod cluster;
pub mod mutate;
pub mod pod;
pub mod policy;
pub mod preview;
pub mod reload;
pub mod selection;
pub mod server;
pub mod tekton;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
pub mod tracing_policy;
