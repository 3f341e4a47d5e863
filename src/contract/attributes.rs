//! The CICD and VCS attributes that describe a TaskRun attempt (OpenTelemetry's semantic
//! conventions, plus a few `tekton.*` keys of our own), as one ordered list. The webhook puts
//! them into the steps' `OTEL_RESOURCE_ATTRIBUTES`; the exporter puts the same list on the run
//! spans' resource, so the steps' telemetry and the run spans describe the run alike.

use std::borrow::Cow;

use super::tekton::TaskRunFacts;
use super::url::without_userinfo;

/// The attributes of one attempt, in a fixed order, values raw (not yet encoded): those whose
/// value is known. `namespace` is the run's namespace and `pod` the attempt's pod name.
pub fn task_run_attributes<'a>(
    facts: &TaskRunFacts<'a>,
    namespace: &'a str,
    pod: Option<&'a str>,
) -> Vec<(&'static str, Cow<'a, str>)> {
    let pac = &facts.pac;
    let triggers = &facts.triggers;
    let run = facts.run_id();
    let known = |v: Option<&'a str>| v.map(Cow::Borrowed);
    // URLs lose any credentials written into them.
    let url = |v: Option<&'a str>| v.map(|v| without_userinfo(Cow::Borrowed(v)));
    let candidates: [(&'static str, Option<Cow<'a, str>>); 24] = [
        ("cicd.pipeline.name", known(Some(facts.pipeline_name()))),
        (
            "cicd.pipeline.run.id",
            known(run.is_uid.then_some(run.value)),
        ),
        ("cicd.pipeline.task.name", known(facts.task_name())),
        ("cicd.pipeline.task.run.id", known(facts.task_run_uid)),
        ("cicd.pipeline.run.url.full", url(pac.log_url)),
        ("vcs.ref.head.revision", known(pac.sha)),
        ("vcs.repository.url.full", url(pac.repo_url)),
        ("vcs.ref.head.name", known(pac.source_branch)),
        ("vcs.ref.base.name", known(pac.branch)),
        ("vcs.change.id", known(pac.pull_request)),
        ("vcs.owner.name", known(pac.url_org)),
        ("vcs.repository.name", known(pac.url_repository)),
        ("vcs.provider.name", known(pac.git_provider)),
        (
            "k8s.namespace.name",
            known(Some(namespace).filter(|n| !n.is_empty())),
        ),
        ("k8s.pod.name", known(pod)),
        ("tekton.pipelinerun.name", known(facts.pipeline_run)),
        ("tekton.taskrun.name", known(Some(facts.task_run))),
        (
            "tekton.taskrun.retry",
            (facts.retry > 0).then(|| Cow::Owned(facts.retry.to_string())),
        ),
        ("tekton.pipeline.member_of", known(facts.member_of)),
        (
            "tekton.trigger.eventlistener",
            known(triggers.eventlistener),
        ),
        ("tekton.trigger.name", known(triggers.trigger)),
        ("tekton.trigger.event.id", known(triggers.event_id)),
        ("tekton.pac.event.type", known(pac.event_type)),
        ("tekton.pac.sender", known(pac.sender)),
    ];
    candidates
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}
