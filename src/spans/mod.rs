//! Run spans: finished Tekton runs become spans with the ids the webhook already gave their pods.
//!
//! - [`objects`]: the lean `tekton.dev/v1` PipelineRun and TaskRun types the tree reads;
//! - [`tree`]: the pure rule, finished objects in, a [`tree::SpanTree`] out (its documentation is
//!   the specification of run spans);
//! - [`otlp`]: a tree as an OTLP `ExportTraceServiceRequest`;
//! - [`metrics`]: the CICD metrics' data points a finished run adds, and their OTLP request;
//! - [`preview`]: the `spans` command, which prints the tree or the OTLP/JSON body for a file.
//!
//! An exporter feeds [`tree::span_tree`] a [`tree::Run`] (a PipelineRun and its TaskRuns, or a
//! standalone TaskRun; [`tree::group`] sorts a bag of objects into runs) with the namespace's
//! [`crate::policy::Policy`] (whose `runSpans` section holds the links and the deploy rules), and
//! sends [`otlp::export_request`] of the trees it got.

pub mod metrics;
pub mod objects;
pub mod otlp;
pub mod preview;
pub mod tree;

pub use tree::{Run, SpanTree, group, span_tree};

/// Why a run cannot be turned into spans. The message names the object and the field, and says
/// what was expected; it never repeats the value found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("{object}: {field}: expected {expected}")]
    Input {
        object: String,
        field: String,
        expected: String,
    },
}
