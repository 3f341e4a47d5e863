//! The `spans` command: reads finished runs from a file (what `kubectl get pipelinerun,taskrun -o
//! yaml` prints: YAML or JSON, a `List` or several documents) and prints the span tree each run
//! would be exported as, or the OTLP/JSON request body. Same code as the exporter from the
//! objects on: only the reading and the printing are here.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Deserialize;
use serde_json::Value;

use super::SpanError;
use super::objects::Object;
use super::otlp::export_request;
use super::tree::{AttributeValue, Kind, Role, RunSpan, SpanTree, Status, group, span_tree};
use crate::contract::SpanId;
use crate::policy::run_spans::{RunSpans, UrlTemplate};

#[derive(Debug, Args)]
pub struct SpansArgs {
    /// Policy file (YAML) for the service name, sampling ratio and resource attributes; the
    /// embedded default when omitted.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// `tree` for people, `otlp-json` for the OTLP/JSON request body an exporter would send.
    #[arg(long, value_enum, default_value_t = SpansOutput::Tree)]
    pub output: SpansOutput,
    /// URL template for `cicd.pipeline.run.url.full`, e.g.
    /// `https://tekton.example/#/namespaces/{namespace}/pipelineruns/{pipelineRun}`.
    #[arg(long, value_name = "TEMPLATE")]
    pub pipeline_run_url: Option<String>,
    /// URL template for `cicd.pipeline.task.run.url.full` (fields: namespace, pipelineRun,
    /// pipelineRunUid, taskRun, taskRunUid, pipelineTask, traceId).
    #[arg(long, value_name = "TEMPLATE")]
    pub task_run_url: Option<String>,
    /// A pipeline task that deploys (repeatable).
    #[arg(long = "deploy-task", value_name = "NAME")]
    pub deploy_tasks: Vec<String>,
    /// A TaskRun label that marks a deploy, `key=value` (repeatable); replaces the default
    /// `app.kubernetes.io/component=deploy`.
    #[arg(long = "deploy-label", value_name = "KEY=VALUE")]
    pub deploy_labels: Vec<String>,
    /// `deployment.environment.name` of deploys (default: the policy's resource attribute).
    #[arg(long, value_name = "NAME")]
    pub deploy_environment: Option<String>,
    /// The runs: a file, or `-` for standard input.
    #[arg(value_name = "FILE|-")]
    pub input: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpansOutput {
    Tree,
    OtlpJson,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("{place}: not valid {format} (line {line}, column {column})")]
    Syntax {
        place: String,
        format: &'static str,
        line: usize,
        column: usize,
    },
    #[error("input: expected at least one PipelineRun or TaskRun")]
    Empty,
    #[error("{0}")]
    Spans(#[from] SpanError),
    #[error("{0}")]
    Policy(String),
    #[error("--{flag}: {reason}")]
    Option { flag: &'static str, reason: String },
}

pub fn run(args: SpansArgs) -> ExitCode {
    match preview(&args) {
        Ok(text) => {
            let mut out = io::stdout().lock();
            if out.write_all(text.as_bytes()).is_err() {
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The note of a preview whose policy has run spans off.
pub const RUN_SPANS_OFF: &str = "the policy has runSpans.enabled: false, so no exporter sends these spans and its pods follow Tekton's span context where valid (context rule v1); the tree shows the ids of run spans on (v2)";

/// What `spans` prints for these arguments.
pub fn preview(args: &SpansArgs) -> Result<String, PreviewError> {
    let mut policy = crate::policy::loader::read_policy(args.policy.as_deref())
        .map_err(|e| PreviewError::Policy(e.to_string()))?;
    override_run_spans(args, &mut policy.run_spans)?;
    let (_, text) = crate::admission::preview::read_input(&args.input).map_err(|(path, e)| {
        PreviewError::Read {
            path,
            reason: e.kind().to_string(),
        }
    })?;
    let objects = objects(&text)?;
    if objects.is_empty() {
        return Err(PreviewError::Empty);
    }
    let runs = group(&objects)?;
    let mut trees = runs
        .iter()
        .map(|run| span_tree(run, &policy))
        .collect::<Result<Vec<_>, _>>()?;
    if !policy.run_spans.enabled {
        // The tree is what the exporter sends, and so always follows context rule v2; a policy
        // with run spans off gives its pods Tekton's context where valid (v1) and exports nothing.
        for tree in &mut trees {
            tree.notes.insert(0, RUN_SPANS_OFF.to_owned());
        }
    }
    Ok(match args.output {
        SpansOutput::OtlpJson => {
            let request = export_request(&trees);
            let mut json = serde_json::to_string_pretty(&request)
                .map_err(|e| PreviewError::Policy(format!("encoding OTLP/JSON: {e}")))?;
            json.push('\n');
            json
        }
        SpansOutput::Tree => {
            let mut out = String::new();
            for (run, tree) in runs.iter().zip(&trees) {
                let title = match run {
                    super::Run::Pipeline { pipeline_run, .. } => {
                        pipeline_run.metadata.display_name("PipelineRun")
                    }
                    super::Run::Task(task_run) => task_run.metadata.display_name("TaskRun"),
                };
                render_tree(&mut out, &title, tree);
            }
            out
        }
    })
}

/// The flags that try a `runSpans` setting without writing a policy win over the policy's.
fn override_run_spans(args: &SpansArgs, options: &mut RunSpans) -> Result<(), PreviewError> {
    let template = |flag: &'static str, value: &Option<String>| {
        value
            .as_deref()
            .map(UrlTemplate::parse)
            .transpose()
            .map_err(|reason| PreviewError::Option { flag, reason })
    };
    if let Some(url) = template("pipeline-run-url", &args.pipeline_run_url)? {
        options.pipeline_run_url = Some(url);
    }
    if let Some(url) = template("task-run-url", &args.task_run_url)? {
        options.task_run_url = Some(url);
    }
    if !args.deploy_tasks.is_empty() {
        options.deploy_tasks = args.deploy_tasks.clone();
    }
    if let Some(environment) = &args.deploy_environment {
        options.deploy_environment = Some(environment.clone());
    }
    if !args.deploy_labels.is_empty() {
        options.deploy_labels = args
            .deploy_labels
            .iter()
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(PreviewError::Option {
                    flag: "deploy-label",
                    reason: "expected key=value".to_owned(),
                }),
            })
            .collect::<Result<_, _>>()?;
    }
    Ok(())
}

/// Every PipelineRun and TaskRun in the text: a JSON value, or YAML documents, each a `List` or
/// one object.
pub fn objects(text: &str) -> Result<Vec<Object>, PreviewError> {
    let documents: Vec<Value> = if !crate::admission::preview::is_yaml(text) {
        let value = serde_json::from_str(text).map_err(|e| PreviewError::Syntax {
            place: "input".to_owned(),
            format: "JSON",
            line: e.line(),
            column: e.column(),
        })?;
        vec![value]
    } else {
        let mut documents = Vec::new();
        for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document).map_err(|e| {
                let at = e.location();
                PreviewError::Syntax {
                    place: format!("document {}", i + 1),
                    format: "YAML",
                    line: at.as_ref().map_or(0, |l| l.line()),
                    column: at.as_ref().map_or(0, |l| l.column()),
                }
            })?;
            documents.push(value);
        }
        documents
    };
    let mut objects = Vec::new();
    for (i, document) in documents.into_iter().enumerate() {
        let place = format!("document {}", i + 1);
        match document {
            Value::Null => {}
            Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                let Some(Value::Array(items)) = map.get("items") else {
                    return Err(SpanError::Input {
                        object: place,
                        field: "items".to_owned(),
                        expected: "a list of PipelineRuns and TaskRuns".to_owned(),
                    }
                    .into());
                };
                for (j, item) in items.iter().enumerate() {
                    let position = format!("{place} item {j}");
                    objects.push(Object::from_value(item.clone(), &position)?);
                }
            }
            other => objects.push(Object::from_value(other, &place)?),
        }
    }
    Ok(objects)
}

/// The tree as text: each span under its parent, with its ids, times, status, attributes and
/// links; then the resources the spans name.
fn render_tree(out: &mut String, title: &str, tree: &SpanTree) {
    let _ = writeln!(out, "{title}");
    for trace in &tree.unsampled {
        let _ = writeln!(out, "  trace {trace}: not sampled, nothing exported");
    }
    for note in &tree.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    let ours = |id: SpanId| tree.spans.iter().any(|s| s.span_id == id);
    let roots = tree
        .spans
        .iter()
        .filter(|s| s.parent_id.is_none_or(|p| !ours(p)));
    for root in roots {
        render_span(out, tree, root, 1);
    }
    for (i, resource) in tree.resources.iter().enumerate() {
        let _ = writeln!(
            out,
            "  resource {i}: service.name={}",
            resource.service_name
        );
        for (k, v) in &resource.attributes {
            let _ = writeln!(out, "      {k}={v}");
        }
    }
    out.push('\n');
}

fn render_span(out: &mut String, tree: &SpanTree, span: &RunSpan, depth: usize) {
    let pad = "  ".repeat(depth);
    let role = match span.role {
        Role::PipelineRun => "pipelinerun",
        Role::Wait => "wait",
        Role::Startup => "startup",
        Role::Attempt => "attempt",
        Role::Step => "step",
    };
    let kind = match span.kind {
        Kind::Server => "SERVER",
        Kind::Internal => "INTERNAL",
    };
    let _ = writeln!(out, "{pad}{} ({role}, {kind})", span.name);
    let parent = match span.parent_id {
        None => "none (root)".to_owned(),
        Some(p) if tree.spans.iter().any(|s| s.span_id == p) => p.to_string(),
        Some(p) => format!("{p} (Tekton's span)"),
    };
    let _ = writeln!(
        out,
        "{pad}  trace {} span {} parent {parent}",
        span.trace_id, span.span_id
    );
    let _ = writeln!(
        out,
        "{pad}  {} → {} ({})",
        timestamp(span.start),
        timestamp(span.end),
        duration(span.end.saturating_sub(span.start))
    );
    let status = match &span.status {
        Status::Unset => "UNSET".to_owned(),
        Status::Ok => "OK".to_owned(),
        // One line per field: Tekton's messages carry newlines.
        Status::Error { message } => format!("ERROR {}", message.replace('\n', "\\n")),
    };
    let _ = writeln!(out, "{pad}  status {status}; resource {}", span.resource);
    for (k, v) in &span.attributes {
        let v = match v {
            AttributeValue::Str(s) => s.clone(),
            AttributeValue::Int(i) => i.to_string(),
            AttributeValue::Bool(b) => b.to_string(),
        };
        let _ = writeln!(out, "{pad}    {k}={v}");
    }
    for link in &span.links {
        let _ = writeln!(
            out,
            "{pad}  link {} trace {} span {}",
            link.kind.as_str(),
            link.trace_id,
            link.span_id
        );
    }
    for child in tree
        .spans
        .iter()
        .filter(|s| s.parent_id == Some(span.span_id))
    {
        render_span(out, tree, child, depth + 1);
    }
}

fn timestamp(nanos: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| nanos.to_string())
}

/// Seconds, with milliseconds only when there are any (Kubernetes times are whole seconds).
fn duration(nanos: u64) -> String {
    const NANOS_PER_SECOND: u64 = 1_000_000_000;
    if nanos.is_multiple_of(NANOS_PER_SECOND) {
        format!("{}s", nanos / NANOS_PER_SECOND)
    } else {
        format!("{:.3}s", nanos as f64 / NANOS_PER_SECOND as f64)
    }
}
