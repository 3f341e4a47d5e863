//! The run-span settings the policy document does not hold yet: links to a dashboard and which
//! tasks are deploys. Defaults need no configuration: no URLs beyond what Pipelines-as-Code
//! records, and a task is a deploy when its TaskRun carries `app.kubernetes.io/component: deploy`.

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// Label that marks a deploy Task by default (the captured `deploy` Task carries it, and it is the
/// recommended Kubernetes label for a component's role).
pub const DEPLOY_LABEL: (&str, &str) = ("app.kubernetes.io/component", "deploy");

/// Options for [`super::tree::span_tree`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpanOptions {
    /// `cicd.pipeline.run.url.full` of a PipelineRun's span, e.g. a Tekton Dashboard page:
    /// `https://tekton.example/#/namespaces/{namespace}/pipelineruns/{pipelineRun}`. Wins over
    /// Pipelines-as-Code's `log-url` when set.
    pub pipeline_run_url: Option<UrlTemplate>,
    /// `cicd.pipeline.task.run.url.full` of each attempt's span.
    pub task_run_url: Option<UrlTemplate>,
    /// Pipeline task names (`tekton.dev/pipelineTask`) that deploy.
    pub deploy_tasks: Vec<String>,
    /// Labels (key, value) on a TaskRun that make it a deploy; Tekton copies a Task's labels onto
    /// its TaskRuns.
    pub deploy_labels: Vec<(String, String)>,
    /// `deployment.environment.name` of deploys; when unset, the policy's
    /// `resourceAttributes["deployment.environment.name"]`, if any.
    pub deploy_environment: Option<String>,
}

impl Default for RunSpanOptions {
    fn default() -> Self {
        RunSpanOptions {
            pipeline_run_url: None,
            task_run_url: None,
            deploy_tasks: Vec::new(),
            deploy_labels: vec![(DEPLOY_LABEL.0.to_owned(), DEPLOY_LABEL.1.to_owned())],
            deploy_environment: None,
        }
    }
}

/// The fields a URL template may use.
pub const URL_FIELDS: &[&str] = &[
    "namespace",
    "pipelineRun",
    "pipelineRunUid",
    "taskRun",
    "taskRunUid",
    "pipelineTask",
    "traceId",
];

/// Characters escaped in a field's value: anything that would end a path segment or start a
/// query or fragment. Kubernetes names never contain them, but the values come from objects.
const URL_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// A URL with `{field}` placeholders ([`URL_FIELDS`]), checked when it is parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlTemplate {
    parts: Vec<UrlPart>,
}

#[derive(Debug, Clone, PartialEq)]
enum UrlPart {
    Literal(String),
    Field(&'static str),
}

impl UrlTemplate {
    /// Parses a template; the error says what is wrong without repeating the template.
    pub fn parse(template: &str) -> Result<UrlTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(UrlPart::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| "a '{' without its '}'".to_owned())?;
            let name = &after[..close];
            let field = URL_FIELDS.iter().find(|f| **f == name).ok_or_else(|| {
                format!("unknown field; expected one of {}", URL_FIELDS.join(", "))
            })?;
            parts.push(UrlPart::Field(field));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err("a '}' without its '{'".to_owned());
        }
        if !rest.is_empty() {
            parts.push(UrlPart::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("empty; expected a URL".to_owned());
        }
        Ok(UrlTemplate { parts })
    }

    /// The URL for one span, or `None` when a field it uses is unknown for that span (a
    /// standalone TaskRun has no `{pipelineRun}`).
    pub fn render<'a>(&self, field: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                UrlPart::Literal(text) => out.push_str(text),
                UrlPart::Field(name) => {
                    let value = field(name).filter(|v| !v.is_empty())?;
                    let _ = write!(out, "{}", utf8_percent_encode(value, URL_VALUE));
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_known_fields_and_refuse_unknown_ones() {
        let t =
            UrlTemplate::parse("https://d/#/namespaces/{namespace}/taskruns/{taskRun}").unwrap();
        let url = t.render(|f| match f {
            "namespace" => Some("team-r"),
            "taskRun" => Some("a/b c"),
            _ => None,
        });
        assert_eq!(
            url.as_deref(),
            Some("https://d/#/namespaces/team-r/taskruns/a%2Fb%20c")
        );
        assert_eq!(t.render(|f| (f == "namespace").then_some("x")), None);
        assert!(UrlTemplate::parse("https://d/{nope}").is_err());
        assert!(UrlTemplate::parse("https://d/{namespace").is_err());
        assert!(UrlTemplate::parse("https://d/}").is_err());
        assert!(UrlTemplate::parse("").is_err());
    }
}
