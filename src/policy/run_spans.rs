//! The policy's `runSpans` section, resolved: whether an exporter exports this namespace's runs
//! (and so whether the webhook parents each step's telemetry under the step's span), links to a
//! dashboard and to the trace, and which tasks are deploys. Defaults need no configuration:
//! run spans off (the webhook's patches as they always were), no URLs beyond what
//! Pipelines-as-Code records, and a task is a deploy when its TaskRun carries
//! `app.kubernetes.io/component: deploy`.

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::Serialize;

/// Label that marks a deploy Task by default (the captured `deploy` Task carries it, and it is the
/// recommended Kubernetes label for a component's role).
pub const DEPLOY_LABEL: (&str, &str) = ("app.kubernetes.io/component", "deploy");

/// The resolved `runSpans` section (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSpans {
    /// Runs in namespaces under this policy are exported as spans, and the webhook gives each
    /// step the step's own span as parent (`contract::step_context`) instead of the attempt's,
    /// with every id derived from the run's uids (`ContextRule::Derived`, context rule v2).
    pub enabled: bool,
    /// A link to the run's trace in the tracing backend, written on the run as the annotation
    /// `lightstep-tekton.io/trace-url` once exported, e.g.
    /// `https://app.lightstep.com/my-project/trace?trace_handle={traceId}`.
    pub trace_url: Option<UrlTemplate>,
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

impl Default for RunSpans {
    fn default() -> Self {
        RunSpans {
            enabled: false,
            trace_url: None,
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

impl RunSpans {
    /// True for the defaults: the section then stays out of the policy's fingerprint, so a
    /// policy without it marks pods exactly as before run spans existed.
    pub fn is_default(&self) -> bool {
        *self == RunSpans::default()
    }
}

/// A URL with `{field}` placeholders ([`URL_FIELDS`]), checked when it is parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlTemplate {
    source: String,
    parts: Vec<UrlPart>,
}

impl Serialize for UrlTemplate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
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
        Ok(UrlTemplate {
            source: template.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
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
