//! Reading Tekton's facts off a TaskRun pod: the labels and annotations Tekton (and
//! Pipelines-as-Code, and Triggers) copy from the TaskRun, and the retry number in the pod name.
//! Pure; borrows from the pod, allocates nothing.

use std::collections::BTreeMap;

use crate::admission::pod::PodView;

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
    /// The `N` of a `-pod-retryN` pod name; 0 for the first attempt.
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
    /// The facts of a TaskRun pod, or `None` when the pod has no `tekton.dev/taskRun` label.
    pub fn from_pod(pod: &'a PodView) -> Option<TaskRunFacts<'a>> {
        let labels = pod.metadata.labels.as_ref()?;
        let annotations = pod.metadata.annotations.as_ref();
        let label = |k: &str| non_empty(labels.get(k));
        let annotation = |k: &str| non_empty(annotations.and_then(|a| a.get(k)));
        // PaC sets most of its keys as labels but some as annotations, and has moved keys
        // between the two over releases: read either.
        let pac = |k: &str| {
            let key = format!("{PAC}{k}");
            label(&key).or_else(|| annotation(&key))
        };
        let task_run = label(TASK_RUN)?;
        Some(TaskRunFacts {
            task_run,
            task_run_uid: label(TASK_RUN_UID),
            task: label(TASK),
            pipeline: label(PIPELINE),
            pipeline_run: label(PIPELINE_RUN),
            pipeline_run_uid: label(PIPELINE_RUN_UID),
            pipeline_task: label(PIPELINE_TASK),
            member_of: label(MEMBER_OF),
            retry: pod.metadata.name.as_deref().map(retry_of).unwrap_or(0),
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
        })
    }

    /// The uid that names the run's trace: the PipelineRun's, else the TaskRun's, else (a pod
    /// created without Tekton's uid label) the TaskRun name.
    pub fn run_uid(&self) -> &'a str {
        self.pipeline_run_uid
            .or(self.task_run_uid)
            .unwrap_or(self.task_run)
    }

    /// The uid that names this TaskRun's span: its uid, else its name.
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

/// Label maps as read by [`TaskRunFacts::from_pod`]; exposed for tests that build pods.
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
        let pod = PodView::default();
        assert!(TaskRunFacts::from_pod(&pod).is_none());
        let mut pod = PodView::default();
        pod.metadata.labels = Some(Labels::from([(TASK_RUN.into(), " ".into())]));
        assert!(TaskRunFacts::from_pod(&pod).is_none());
    }

    #[test]
    fn fallbacks() {
        let mut pod = PodView::default();
        pod.metadata.labels = Some(Labels::from([
            (TASK_RUN.into(), "tr".into()),
            (TASK_RUN_UID.into(), "u1".into()),
        ]));
        let f = TaskRunFacts::from_pod(&pod).unwrap();
        assert_eq!(f.run_uid(), "u1");
        assert_eq!(f.pipeline_name(), "tr");
        assert_eq!(f.task_name(), None);
    }
}
