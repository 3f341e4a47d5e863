//! The few fields of `tekton.dev/v1` PipelineRuns and TaskRuns that the span tree reads, as lean
//! serde types: everything else a run carries (its spec, the resolved pipeline and task specs,
//! provenance, results) is skipped while decoding, which keeps a watch cache of finished runs
//! small. Every field is optional here; [`super::tree`] says which ones a finished run must have,
//! naming the object and the field when one is missing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SpanError;
use crate::contract::tekton::Labels;

/// The API version whose status shape these types follow (`v1beta1` kept child TaskRuns in a
/// map and is not read).
pub const API_VERSION: &str = "tekton.dev/v1";

/// A finished run as it comes from the API server or a file.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    PipelineRun(PipelineRun),
    TaskRun(TaskRun),
}

impl Object {
    /// `Kind namespace/name`, for errors and the preview.
    pub fn display_name(&self) -> String {
        match self {
            Object::PipelineRun(run) => run.metadata.display_name("PipelineRun"),
            Object::TaskRun(run) => run.metadata.display_name("TaskRun"),
        }
    }

    /// Decodes one item of a `List` (or one document) that must be a `tekton.dev/v1` PipelineRun
    /// or TaskRun. `position` names the item when it has no name of its own.
    pub fn from_value(value: Value, position: &str) -> Result<Object, SpanError> {
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str);
        let object = match (kind, name) {
            ("PipelineRun" | "TaskRun", Some(name)) => {
                format!("{kind} {}", qualified(namespace, name))
            }
            _ => position.to_owned(),
        };
        let field = |field: &str, expected: &str| SpanError::Input {
            object: object.clone(),
            field: field.to_owned(),
            expected: expected.to_owned(),
        };
        if !matches!(kind, "PipelineRun" | "TaskRun") {
            return Err(field("kind", "PipelineRun or TaskRun"));
        }
        if value.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION) {
            return Err(field("apiVersion", API_VERSION));
        }
        let decoded = if kind == "PipelineRun" {
            serde_path_to_error::deserialize(&value).map(Object::PipelineRun)
        } else {
            serde_path_to_error::deserialize(&value).map(Object::TaskRun)
        };
        decoded.map_err(|e| {
            let path = e.path().to_string();
            field(&path, &expected_of(&e.into_inner().to_string()))
        })
    }
}

/// What serde expected, without the value it received: serde's messages quote the value
/// (`invalid type: string "…", expected …`), and errors never echo input.
fn expected_of(message: &str) -> String {
    if let Some((_, expected)) = message.rsplit_once(", expected ") {
        return expected.to_owned();
    }
    if message.starts_with("missing field") {
        return message.to_owned();
    }
    "a valid value (an RFC 3339 time for timestamps)".to_owned()
}

/// `namespace/name`, or `name` when the namespace is unknown.
fn qualified(namespace: Option<&str>, name: &str) -> String {
    match namespace.filter(|n| !n.is_empty()) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    pub creation_timestamp: Option<Time>,
    pub labels: Option<Labels>,
    pub annotations: Option<Labels>,
    /// Set once a delete was asked for and finalizers hold the object (the exporter's cache
    /// reads it; the tree does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
    /// What holds the object's deletion (the exporter's cache reads it; the tree does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<Vec<String>>,
}

impl Metadata {
    pub fn display_name(&self, kind: &str) -> String {
        let name = self.name.as_deref().unwrap_or("(no name)");
        format!("{kind} {}", qualified(self.namespace.as_deref(), name))
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRun {
    #[serde(default)]
    pub metadata: Metadata,
    pub status: Option<PipelineRunStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRunStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
    /// Tekton's own span context for the PipelineRun when its tracing is on: propagation
    /// headers, `{"traceparent": "…"}`.
    pub span_context: Option<Labels>,
    /// The runs Tekton created for the pipeline's tasks: the exporter waits for these TaskRuns
    /// to finish before it exports the PipelineRun with them (the tree itself does not read it).
    #[serde(default)]
    pub child_references: Vec<ChildReference>,
}

/// One entry of a PipelineRun's `status.childReferences`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChildReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRun {
    #[serde(default)]
    pub metadata: Metadata,
    pub status: Option<TaskRunStatus>,
}

/// A TaskRun's status, which is also the shape of each earlier attempt in `retriesStatus`
/// (Tekton's `RetriesStatus []TaskRunStatus`; an attempt's own `retriesStatus` is empty).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRunStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    pub pod_name: Option<String>,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
    #[serde(default)]
    pub steps: Vec<StepState>,
    #[serde(default)]
    pub retries_status: Vec<TaskRunStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub last_transition_time: Option<Time>,
}

/// The condition every Tekton run reports its outcome in.
pub const SUCCEEDED: &str = "Succeeded";

/// The `Succeeded` condition, if any.
pub fn succeeded(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == SUCCEEDED)
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepState {
    #[serde(default)]
    pub name: String,
    pub container: Option<String>,
    pub terminated: Option<Terminated>,
    /// Set while the step runs; a finished run's steps normally have `terminated` instead, but an
    /// attempt cut short (a timeout, a cancellation) can keep a step's last `running` state.
    pub running: Option<Running>,
    /// Tekton's own reading of the termination: `Completed`, `Error`, or `Skipped` for a step it
    /// did not run after an earlier one failed.
    pub termination_reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    pub started_at: Option<Time>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Terminated {
    #[serde(default)]
    pub exit_code: i32,
    pub reason: Option<String>,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
}
