//! The parts of a Pod the webhook reads, as a lean serde view.
//!
//! The API server sends the whole pod: `managedFields`, volumes, resources, security contexts,
//! often hundreds of kilobytes for a Tekton pod with many steps. Decoding all of it into
//! k8s-openapi's `Pod` allocated a typed value for every field only to read labels, annotations
//! and env; this view lets serde skip the rest unallocated (measured in `benches/decide.rs`).
//! Env entries stay k8s-openapi types, so what the webhook compares and writes is the real schema.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar};
use serde::Deserialize;

use crate::contract::tekton::TaskRunFacts;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Option<Spec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: Option<String>,
    pub generate_name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub containers: Vec<Container>,
    pub init_containers: Option<Vec<Container>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    pub env: Option<Vec<EnvVar>>,
    pub env_from: Option<Vec<EnvFromSource>>,
}

impl PodView {
    /// The pod's name, or `<generateName>*` when the API server has not named it yet.
    pub fn display_name(&self) -> String {
        match (&self.metadata.name, &self.metadata.generate_name) {
            (Some(name), _) => name.clone(),
            (None, Some(prefix)) => format!("{prefix}*"),
            (None, None) => "<unnamed>".to_owned(),
        }
    }

    /// Tekton's facts about the TaskRun attempt this pod runs, or `None` for other pods.
    pub fn facts(&self) -> Option<TaskRunFacts<'_>> {
        TaskRunFacts::from_pod(
            self.metadata.name.as_deref(),
            self.metadata.labels.as_ref(),
            self.metadata.annotations.as_ref(),
        )
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
}
