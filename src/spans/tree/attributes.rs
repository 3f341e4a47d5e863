//! The attributes of run spans: the contract's CICD, VCS and `k8s.*` list (the same the pods'
//! resource gets), the dashboard URLs of the policy's `runSpans` section, and the deployment
//! conventions on deploys.

use super::{AttributeValue, SpanTree};
use crate::admission::decide::service_name;
use crate::contract::TraceId;
use crate::contract::attributes::task_run_attributes;
use crate::contract::tekton::{Labels, TaskRunFacts};
use crate::policy::Policy;
use crate::policy::run_spans::RunSpans;

/// A span's attributes, in the order they are exported.
pub(super) type Attributes = Vec<(&'static str, AttributeValue)>;

/// The resource of a span (added to the tree when new) and the attributes the span repeats: the
/// contract's list for these facts, less the keys `keep` refuses (the PipelineRun span drops the
/// per-TaskRun ones from both), and of those only the conventions' keys on the span.
pub(super) fn contract_attributes(
    tree: &mut SpanTree,
    facts: &TaskRunFacts<'_>,
    namespace: &str,
    pod: Option<&str>,
    policy: &Policy,
    keep: fn(&str) -> bool,
) -> (usize, Attributes) {
    let contract = task_run_attributes(facts, namespace, pod);
    let resource = tree.resource(
        service_name(policy, facts, namespace, str::to_owned),
        contract
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (*k, v.as_ref())),
        policy,
    );
    let attributes = contract
        .into_iter()
        .filter(|(k, _)| convention_key(k) && keep(k))
        .map(|(k, v)| (k, AttributeValue::Str(v.into_owned())))
        .collect();
    (resource, attributes)
}

/// The keys of [`task_run_attributes`] that span attributes repeat: the CICD, VCS and
/// Kubernetes conventions. The `tekton.*` ones stay on the resource only.
fn convention_key(key: &str) -> bool {
    key.starts_with("cicd.") || key.starts_with("vcs.") || key.starts_with("k8s.")
}

/// Keys of [`task_run_attributes`] that describe one TaskRun, not the PipelineRun as a whole
/// (the PipelineRun's facts stand its own name in for the TaskRun's).
pub(super) fn task_run_scoped(key: &str) -> bool {
    key.starts_with("tekton.taskrun.")
        || key.starts_with("cicd.pipeline.task.")
        || key == "k8s.pod.name"
}

/// `cicd.pipeline.run.url.full` from the policy's template, when it has one and every field it
/// uses is known.
pub(super) fn pipeline_run_url(
    options: &RunSpans,
    namespace: &str,
    name: &str,
    uid: &str,
    trace_id: TraceId,
) -> Option<String> {
    let template = options.pipeline_run_url.as_ref()?;
    let trace = trace_id.to_string();
    template.render(|field| match field {
        "namespace" => Some(namespace),
        "pipelineRun" => Some(name),
        "pipelineRunUid" => Some(uid),
        "traceId" => Some(trace.as_str()),
        _ => None,
    })
}

/// `cicd.pipeline.task.run.url.full` from the policy's template, as [`pipeline_run_url`].
pub(super) fn task_run_url(
    options: &RunSpans,
    facts: &TaskRunFacts<'_>,
    namespace: &str,
    uid: &str,
    trace_id: TraceId,
) -> Option<String> {
    let template = options.task_run_url.as_ref()?;
    let trace = trace_id.to_string();
    template.render(|field| match field {
        "namespace" => Some(namespace),
        "pipelineRun" => facts.pipeline_run,
        "pipelineRunUid" => facts.pipeline_run_uid,
        "taskRun" => Some(facts.task_run),
        "taskRunUid" => Some(uid),
        "pipelineTask" => facts.pipeline_task,
        "traceId" => Some(trace.as_str()),
        _ => None,
    })
}

/// The deployment conventions of an attempt that the policy names a deploy (by pipeline task or
/// TaskRun label); nothing for other attempts. `uid` is the TaskRun's, the deploy's id.
pub(super) fn deploy_attributes(
    facts: &TaskRunFacts<'_>,
    labels: Option<&Labels>,
    uid: &str,
    ok: bool,
    policy: &Policy,
) -> Attributes {
    let options = &policy.run_spans;
    if !is_deploy(facts, labels, options) {
        return Vec::new();
    }
    let mut attributes = vec![("cicd.pipeline.task.type", str_value("deploy"))];
    if let Some(task) = facts.task_name() {
        attributes.push(("deployment.name", str_value(task)));
    }
    attributes.push(("deployment.id", str_value(uid)));
    let outcome = if ok { "succeeded" } else { "failed" };
    attributes.push(("deployment.status", str_value(outcome)));
    let environment = options.deploy_environment.as_deref().or_else(|| {
        policy
            .resource_attributes
            .get("deployment.environment.name")
            .map(String::as_str)
    });
    if let Some(environment) = environment {
        attributes.push(("deployment.environment.name", str_value(environment)));
    }
    attributes
}

fn is_deploy(facts: &TaskRunFacts<'_>, labels: Option<&Labels>, options: &RunSpans) -> bool {
    let by_task = facts
        .pipeline_task
        .is_some_and(|t| options.deploy_tasks.iter().any(|d| d == t));
    let by_label = labels.is_some_and(|labels| {
        options
            .deploy_labels
            .iter()
            .any(|(k, v)| labels.get(k) == Some(v))
    });
    by_task || by_label
}

/// Sets `key`, replacing a value the contract's list gave it.
pub(super) fn set(attributes: &mut Attributes, key: &'static str, value: String) {
    match attributes.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = AttributeValue::Str(value),
        None => attributes.push((key, AttributeValue::Str(value))),
    }
}

pub(super) fn str_value(value: &str) -> AttributeValue {
    AttributeValue::Str(value.to_owned())
}
