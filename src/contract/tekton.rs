//! Tekton's facts about one TaskRun attempt, read the same way from a pod and from the run
//! objects, and the rules that name a run.
//!
//! Tekton copies a TaskRun's labels and annotations (and through them the PipelineRun's, and
//! Pipelines-as-Code's and Triggers') onto its pod, and adds `tekton.dev/taskRun` and
//! `tekton.dev/taskRunUID`; a retry's pod is named `<name>-pod-retryN`. So a pod at admission
//! and a TaskRun object after it finished give the same [`TaskRunFacts`]: that is what lets the
//! webhook and the exporter derive the same ids. Pure; borrows, allocates only the PaC keys.

use std::collections::BTreeMap;

pub const TASK_RUN: &str = "tekton.dev/taskRun";
pub const TASK_RUN_UID: &str = "tekton.dev/taskRunUID";
pub const TASK: &str = "tekton.dev/task";
pub const PIPELINE: &str = "tekton.dev/pipeline";
pub const PIPELINE_RUN: &str = "tekton.dev/pipelineRun";
pub const PIPELINE_RUN_UID: &str = "tekton.dev/pipelineRunUID";
pub const PIPELINE_TASK: &str = "tekton.dev/pipelineTask";
pub const MEMBER_OF: &str = "tekton.dev/memberOf";
pub const TASK_RUN_SPAN_CONTEXT: &str = "tekton.dev/taskrunSpanContext";

const PAC: &str = "pipelinesascode.tekton.dev/";
const TRIGGERS: &str = "triggers.tekton.dev/";

/// Everything the webhook reads off a TaskRun pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskRunFacts<'a> {
    pub task_run: &'a str,
    pub task_run_uid: Option<&'a str>,
    pub task: Option<&'a str>,
    pub pipeline: Option<&'a str>,
    pub pipeline_run: Option<&'a str>,
    pub pipeline_run_uid: Option<&'a str>,
    pub pipeline_task: Option<&'a str>,
    pub member_of: Option<&'a str>,
    /// The attempt: the `N` of a `-pod-retryN` pod name, 0 for the first attempt.
    pub retry: u32,
    pub span_context: Option<&'a str>,
    pub pac: PipelinesAsCode<'a>,
    pub triggers: Triggers<'a>,
}

/// Pipelines-as-Code's labels and annotations: where the commit came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelinesAsCode<'a> {
    pub sha: Option<&'a str>,
    pub branch: Option<&'a str>,
    pub source_branch: Option<&'a str>,
    pub url_org: Option<&'a str>,
    pub url_repository: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub pull_request: Option<&'a str>,
    pub git_provider: Option<&'a str>,
    pub repo_url: Option<&'a str>,
    pub log_url: Option<&'a str>,
}

/// Tekton Triggers' labels: which EventListener and Trigger created the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Triggers<'a> {
    pub eventlistener: Option<&'a str>,
    pub trigger: Option<&'a str>,
    pub event_id: Option<&'a str>,
}

impl<'a> TaskRunFacts<'a> {
    /// The facts of a TaskRun pod, from its name and metadata, or `None` when the pod has no
    /// `tekton.dev/taskRun` label.
    pub fn from_pod(
        pod_name: Option<&str>,
        labels: Option<&'a Labels>,
        annotations: Option<&'a Labels>,
    ) -> Option<TaskRunFacts<'a>> {
        let labels = labels?;
        let task_run = non_empty(labels.get(TASK_RUN))?;
        let task_run_uid = non_empty(labels.get(TASK_RUN_UID));
        let attempt = pod_name.map(retry_of).unwrap_or(0);
        Some(read(labels, annotations, task_run, task_run_uid, attempt))
    }

    /// The facts of one attempt of a TaskRun object: its `metadata.name` and `metadata.uid`,
    /// its labels and annotations, and the attempt (the index of the attempt in
    /// `status.retriesStatus`, or the list's length for the final attempt). Equal to
    /// [`TaskRunFacts::from_pod`] on that attempt's pod.
    pub fn from_task_run(
        name: &'a str,
        uid: Option<&'a str>,
        labels: Option<&'a Labels>,
        annotations: Option<&'a Labels>,
        attempt: u32,
    ) -> TaskRunFacts<'a> {
        static EMPTY: Labels = Labels::new();
        let uid = uid.filter(|u| !u.trim().is_empty());
        read(labels.unwrap_or(&EMPTY), annotations, name, uid, attempt)
    }

    /// Which value names the run, and so its trace: the PipelineRun's uid, else the TaskRun's
    /// uid, else (a pod created without Tekton's uid label) the TaskRun's name. This is the one
    /// place the rule is written.
    pub fn run_id(&self) -> RunId<'a> {
        match (self.pipeline_run_uid, self.task_run_uid) {
            (Some(uid), _) => RunId {
                source: PIPELINE_RUN_UID,
                value: uid,
                is_uid: true,
            },
            (None, Some(uid)) => RunId {
                source: TASK_RUN_UID,
                value: uid,
                is_uid: true,
            },
            (None, None) => RunId {
                source: "tekton.dev/taskRun (no uid label)",
                value: self.task_run,
                is_uid: false,
            },
        }
    }

    /// The value the run's trace id is derived from (see [`TaskRunFacts::run_id`]).
    pub fn run_uid(&self) -> &'a str {
        self.run_id().value
    }

    /// The value this TaskRun's span ids are derived from: its uid, else its name.
    pub fn task_run_key(&self) -> &'a str {
        self.task_run_uid.unwrap_or(self.task_run)
    }

    /// `cicd.pipeline.name`: the Pipeline, else the Task, else the TaskRun.
    pub fn pipeline_name(&self) -> &'a str {
        self.pipeline.or(self.task).unwrap_or(self.task_run)
    }

    /// `cicd.pipeline.task.name`: the task's name inside the pipeline, else the Task.
    pub fn task_name(&self) -> Option<&'a str> {
        self.pipeline_task.or(self.task)
    }

    /// A `serviceName` template field, by its name in [`crate::policy::TEMPLATE_FIELDS`].
    pub fn template_field(&self, name: &str, namespace: &'a str) -> Option<&'a str> {
        match name {
            "pipeline" => self.pipeline,
            "pipelineRun" => self.pipeline_run,
            "pipelineTask" => self.pipeline_task,
            "task" => self.task,
            "taskRun" => Some(self.task_run),
            "namespace" => Some(namespace).filter(|s| !s.is_empty()),
            _ => None,
        }
    }
}

/// Which value names a run (see [`TaskRunFacts::run_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunId<'a> {
    /// The key it was read from, for explanations.
    pub source: &'static str,
    pub value: &'a str,
    /// False when no uid was known and the TaskRun's name stands in.
    pub is_uid: bool,
}

fn read<'a>(
    labels: &'a Labels,
    annotations: Option<&'a Labels>,
    task_run: &'a str,
    task_run_uid: Option<&'a str>,
    retry: u32,
) -> TaskRunFacts<'a> {
    let label = |k: &str| non_empty(labels.get(k));
    let annotation = |k: &str| non_empty(annotations.and_then(|a| a.get(k)));
    // PaC sets most of its keys as labels but some as annotations, and has moved keys between
    // the two over releases: read either.
    let pac = |k: &str| {
        let key = format!("{PAC}{k}");
        label(&key).or_else(|| annotation(&key))
    };
    TaskRunFacts {
        task_run,
        task_run_uid,
        task: label(TASK),
        pipeline: label(PIPELINE),
        pipeline_run: label(PIPELINE_RUN),
        pipeline_run_uid: label(PIPELINE_RUN_UID),
        pipeline_task: label(PIPELINE_TASK),
        member_of: label(MEMBER_OF),
        retry,
        span_context: annotation(TASK_RUN_SPAN_CONTEXT),
        pac: PipelinesAsCode {
            sha: pac("sha"),
            branch: pac("branch"),
            source_branch: pac("source-branch"),
            url_org: pac("url-org"),
            url_repository: pac("url-repository"),
            sender: pac("sender"),
            event_type: pac("event-type"),
            pull_request: pac("pull-request"),
            git_provider: pac("git-provider"),
            repo_url: pac("repo-url"),
            log_url: pac("log-url"),
        },
        triggers: Triggers {
            eventlistener: label(&format!("{TRIGGERS}eventlistener")),
            trigger: label(&format!("{TRIGGERS}trigger")),
            event_id: label(&format!("{TRIGGERS}triggers-eventid")),
        },
    }
}

fn non_empty(v: Option<&String>) -> Option<&str> {
    v.map(String::as_str).filter(|s| !s.trim().is_empty())
}

/// Tekton names the N-th retry of a TaskRun's pod `<name>-pod-retryN`.
pub fn retry_of(pod_name: &str) -> u32 {
    let Some(at) = pod_name.rfind("-pod-retry") else {
        return 0;
    };
    let digits = &pod_name[at + "-pod-retry".len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    digits.parse().unwrap_or(0)
}

/// Label and annotation maps, as Kubernetes objects carry them.
pub type Labels = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_suffix() {
        assert_eq!(retry_of("build-pod"), 0);
        assert_eq!(retry_of("build-pod-retry1"), 1);
        assert_eq!(retry_of("build-pod-retry12"), 12);
        assert_eq!(retry_of("build-pod-retry"), 0);
        assert_eq!(retry_of("build-pod-retryx"), 0);
        assert_eq!(retry_of("build-pod-retry99999999999999"), 0);
    }

    #[test]
    fn not_a_task_run_pod_without_the_label() {
        assert!(TaskRunFacts::from_pod(Some("p"), None, None).is_none());
        let blank = Labels::from([(TASK_RUN.into(), " ".into())]);
        assert!(TaskRunFacts::from_pod(Some("p"), Some(&blank), None).is_none());
    }

    #[test]
    fn the_run_is_named_by_the_pipeline_run_then_the_task_run() {
        let mut labels = Labels::from([(TASK_RUN.into(), "tr".into())]);
        let f = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), None).unwrap();
        assert_eq!((f.run_uid(), f.run_id().is_uid), ("tr", false));
        assert_eq!(f.pipeline_name(), "tr");
        assert_eq!(f.task_name(), None);
        labels.insert(TASK_RUN_UID.into(), "u1".into());
        let f = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), None).unwrap();
        assert_eq!((f.run_id().source, f.run_uid()), (TASK_RUN_UID, "u1"));
        labels.insert(PIPELINE_RUN_UID.into(), "p1".into());
        let f = TaskRunFacts::from_pod(Some("tr-pod"), Some(&labels), None).unwrap();
        assert_eq!((f.run_id().source, f.run_uid()), (PIPELINE_RUN_UID, "p1"));
        assert_eq!(f.task_run_key(), "u1");
    }

    #[test]
    fn a_pod_and_its_task_run_give_the_same_facts() {
        let run_labels = Labels::from([
            (PIPELINE_RUN_UID.into(), "p1".into()),
            (PIPELINE_TASK.into(), "build".into()),
            (format!("{PAC}sha"), "abc".into()),
        ]);
        let annotations = Labels::from([(format!("{PAC}repo-url"), "https://x/y".into())]);
        let object =
            TaskRunFacts::from_task_run("tr", Some("u1"), Some(&run_labels), Some(&annotations), 2);
        let mut pod_labels = run_labels.clone();
        pod_labels.insert(TASK_RUN.into(), "tr".into());
        pod_labels.insert(TASK_RUN_UID.into(), "u1".into());
        let pod =
            TaskRunFacts::from_pod(Some("tr-pod-retry2"), Some(&pod_labels), Some(&annotations))
                .unwrap();
        assert_eq!(object, pod);
        assert_eq!(pod.pac.repo_url, Some("https://x/y"));
    }
}
