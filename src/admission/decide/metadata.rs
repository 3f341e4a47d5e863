//! The pod's labels and annotations: the trace id, pipeline and commit as labels (for selectors
//! and dashboards), the traceparent and the policy marker as annotations. A label the pod already
//! has is never changed; annotations are skipped, with a warning, when they would push the pod
//! past the API server's size limit.

use json_patch::PatchOperation;
use jsonptr::{PointerBuf, Token};
use serde_json::json;

use super::report::{MetaOutcome, MetadataReport};
use super::{MARKER_ANNOTATION, add, replace};
use crate::admission::pod::PodView as Pod;
use crate::contract::SpanContext;
use crate::contract::tekton::TaskRunFacts;
use crate::policy::Policy;

/// The traceparent handed to the steps, for humans and collectors.
const TRACEPARENT_ANNOTATION: &str = "lightstep-tekton.io/traceparent";
const TRACE_ID_LABEL: &str = "lightstep-tekton.io/trace-id";
const PIPELINE_LABEL: &str = "lightstep-tekton.io/pipeline";
const COMMIT_LABEL: &str = "lightstep-tekton.io/commit";

/// The API server refuses a pod whose annotations add up to more than 256 KiB
/// (`TotalAnnotationSizeLimitB` in apimachinery's validation).
const ANNOTATIONS_SIZE_LIMIT: usize = 256 * 1024;
/// Label values are at most 63 characters (a DNS label's length).
const LABEL_VALUE_MAX: usize = 63;

/// The labels and annotations one pod should carry.
pub(super) struct Plan {
    labels: Vec<(&'static str, String)>,
    annotations: [(&'static str, String); 2],
}

impl Plan {
    pub(super) fn new(facts: &TaskRunFacts<'_>, context: &SpanContext, policy: &Policy) -> Plan {
        let mut labels = vec![(TRACE_ID_LABEL, context.trace_id.to_string())];
        if let Some(pipeline) = label_value(facts.pipeline_name()) {
            labels.push((PIPELINE_LABEL, pipeline));
        }
        if let Some(commit) = facts.pac.sha.and_then(label_value) {
            labels.push((COMMIT_LABEL, commit));
        }
        Plan {
            labels,
            annotations: [
                (TRACEPARENT_ANNOTATION, context.traceparent()),
                (MARKER_ANNOTATION, policy.marker().to_owned()),
            ],
        }
    }

    /// Appends the label then annotation operations; one report line per key.
    pub(super) fn apply(
        &self,
        pod: &Pod,
        ops: &mut Vec<PatchOperation>,
        warnings: &mut Vec<String>,
    ) -> Vec<MetadataReport> {
        let mut reports = self.labels(pod, ops);
        reports.extend(self.annotations(pod, ops, warnings));
        reports
    }

    fn labels(&self, pod: &Pod, ops: &mut Vec<PatchOperation>) -> Vec<MetadataReport> {
        let mut reports = Vec::new();
        let labels = pod.metadata.labels.as_ref();
        let mut label_ops = Vec::new();
        for (key, value) in &self.labels {
            let outcome = match labels.and_then(|l| l.get(*key)) {
                Some(v) if v == value => MetaOutcome::Present,
                Some(_) => MetaOutcome::KeptExisting,
                None => {
                    label_ops.push(add(metadata_ptr("labels", Some(key)), json!(value)));
                    MetaOutcome::Added
                }
            };
            reports.push(MetadataReport {
                key,
                is_label: true,
                value: value.clone(),
                outcome,
            });
        }
        if !label_ops.is_empty() && labels.is_none() {
            ops.push(add(metadata_ptr("labels", None), json!({})));
        }
        ops.extend(label_ops);
        reports
    }

    fn annotations(
        &self,
        pod: &Pod,
        ops: &mut Vec<PatchOperation>,
        warnings: &mut Vec<String>,
    ) -> Vec<MetadataReport> {
        let annotations = pod.metadata.annotations.as_ref();
        let current_size: usize = annotations
            .map(|a| a.iter().map(|(k, v)| k.len() + v.len()).sum())
            .unwrap_or(0);
        let mut growth = 0usize;
        let mut planned = Vec::new();
        for (key, value) in &self.annotations {
            let outcome = match annotations.and_then(|a| a.get(*key)) {
                Some(v) if v == value => MetaOutcome::Present,
                Some(v) => {
                    growth += value.len().saturating_sub(v.len());
                    MetaOutcome::Updated
                }
                None => {
                    growth += key.len() + value.len();
                    MetaOutcome::Added
                }
            };
            planned.push((*key, value, outcome));
        }
        let fits = current_size + growth <= ANNOTATIONS_SIZE_LIMIT;
        if !fits && growth > 0 {
            warnings
                .push("pod annotations are at the size limit: trace annotations not added".into());
        }
        let mut reports = Vec::new();
        let mut annotation_ops = Vec::new();
        for (key, value, outcome) in planned {
            let path = || metadata_ptr("annotations", Some(key));
            let outcome = match outcome {
                MetaOutcome::Added | MetaOutcome::Updated if !fits => MetaOutcome::SkippedSizeLimit,
                MetaOutcome::Added => {
                    annotation_ops.push(add(path(), json!(value)));
                    outcome
                }
                MetaOutcome::Updated => {
                    annotation_ops.push(replace(path(), json!(value)));
                    outcome
                }
                other => other,
            };
            reports.push(MetadataReport {
                key,
                is_label: false,
                value: value.clone(),
                outcome,
            });
        }
        if !annotation_ops.is_empty() && annotations.is_none() {
            ops.push(add(metadata_ptr("annotations", None), json!({})));
        }
        ops.extend(annotation_ops);
        reports
    }
}

fn metadata_ptr(map: &str, key: Option<&str>) -> PointerBuf {
    let mut tokens = vec![Token::new("metadata"), Token::new(map)];
    if let Some(key) = key {
        tokens.push(Token::new(key));
    }
    PointerBuf::from_tokens(tokens)
}

/// Turns a value into a valid label value: characters outside `[A-Za-z0-9-_.]` become `-`, at
/// most 63 characters, starting and ending alphanumeric. `None` if nothing valid is left.
fn label_value(raw: &str) -> Option<String> {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(LABEL_VALUE_MAX)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_sanitised() {
        assert_eq!(
            label_value("build-and-deploy").as_deref(),
            Some("build-and-deploy")
        );
        assert_eq!(label_value("feature/x y").as_deref(), Some("feature-x-y"));
        assert_eq!(label_value("--a--").as_deref(), Some("a"));
        assert_eq!(label_value("///"), None);
        assert_eq!(label_value(&"a".repeat(100)).unwrap().len(), 63);
        assert_eq!(label_value("é"), None);
    }
}
