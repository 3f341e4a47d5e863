//! `lightstep-tekton-webhook mutate`: the server's decision, on a file, without a cluster.
//!
//! Reads an AdmissionReview or a bare Pod (JSON or YAML, file or stdin), runs it through exactly
//! the path the server uses ([`admission::review_with`]), and prints the JSON Patch, the patched
//! pod, or the reply. A bare Pod is wrapped in a synthetic CREATE review first, so there is one
//! path.
//!
//! With `--policy-dir`, TracingPolicy files stand in for the cluster's objects and
//! `--namespace-labels` for the namespace's labels; the choice among them is the server's own
//! ([`selection::select`]). Files are read by the server's own loader ([`loader`]): a document
//! that does not decode is an error here, and a policy that decodes but does not validate is
//! reported and ignored, as the server ignores it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::admission;
use crate::admission::decide::Mode;
use crate::policy::Policy;
use crate::policy::loader::{self, LoadError};
use crate::policy::resource::PolicyMode;
use crate::policy::selection::{self, Fallback, Selected, Snapshot};

/// The label the API server puts on every namespace (Kubernetes 1.21 and later).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The uid given to the synthetic review that wraps a bare Pod.
const PREVIEW_UID: &str = "00000000-0000-0000-0000-000000000000";

#[derive(Debug, Args)]
pub struct MutateArgs {
    /// AdmissionReview or Pod to read, JSON or YAML; `-` for standard input.
    #[arg(value_name = "FILE|-", default_value = "-")]
    pub input: String,

    /// Policy file (YAML); the embedded default (Lightstep profile) when omitted.
    #[arg(long, value_name = "FILE", env = "LIGHTSTEP_TEKTON_POLICY")]
    pub policy: Option<PathBuf>,

    /// What to print: the JSON Patch, the patched pod, or the AdmissionReview reply.
    #[arg(long, short, value_enum, default_value_t = Output::Patch)]
    pub output: Output,

    /// Also explain, on standard error, what was injected or kept in each container and why,
    /// and where the trace id and parent came from.
    #[arg(long)]
    pub explain: bool,

    /// Decide as the opt-in webhook (`inject`, path /mutate) or the enforcing one (`enforce`).
    #[arg(long, value_enum, default_value_t = ModeArg::Inject)]
    pub mode: ModeArg,

    /// Namespace of a bare Pod that does not name one.
    #[arg(long, short, default_value = "default")]
    pub namespace: String,

    /// TracingPolicy files (*.yaml, *.yml, *.json; several documents per file) to choose from as
    /// the server would; the --policy file or embedded default applies where none matches.
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,

    /// Labels of the pod's namespace, for choosing among the --policy-dir policies
    /// (kubernetes.io/metadata.name is added, as the API server does).
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels, requires = "policy_dir")]
    pub namespace_labels: Option<BTreeMap<String, String>>,
}

/// Parses `k=v,k2=v2` (an empty value is allowed: `k=`).
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: expected KEY=VALUE"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("{pair:?}: empty key"));
        }
        labels.insert(k.to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The RFC 6902 JSON Patch (`[]` when the pod is skipped).
    Patch,
    /// The pod with the patch applied, in the input's format (YAML in, YAML out).
    Pod,
    /// The AdmissionReview reply the server sends.
    Review,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Inject,
    Enforce,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Inject => Mode::Inject,
            ModeArg::Enforce => Mode::Enforce,
        }
    }
}

/// Why a preview could not be made; each message is one line naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("{path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: not JSON or YAML: {reason}")]
    Syntax { path: String, reason: String },
    #[error("{path}: expected an AdmissionReview or a Pod, got {found}")]
    WrongKind { path: String, found: String },
    #[error("{path}: {source}")]
    Review {
        path: String,
        source: admission::BadRequest,
    },
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error("the patch does not apply to the pod: {0}")]
    Apply(String),
}

/// What the preview prints.
#[derive(Debug)]
pub struct Preview {
    /// For standard output.
    pub output: String,
    /// For standard error: warnings, the skip reason, the explanation.
    pub notes: String,
}

pub fn run(args: MutateArgs) -> ExitCode {
    match preview(&args) {
        Ok(p) => {
            let _ = io::stderr().write_all(p.notes.as_bytes());
            let mut out = io::stdout().lock();
            if writeln!(out, "{}", p.output).is_err() {
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

/// Runs the preview and returns what to print.
pub fn preview(args: &MutateArgs) -> Result<Preview, PreviewError> {
    let policy = loader::read_policy(args.policy.as_deref())?;
    let policies = match &args.policy_dir {
        Some(dir) => Some(loader::read_policy_dir(dir)?),
        None => None,
    };
    let (path, text) =
        read_input(&args.input).map_err(|(path, source)| PreviewError::Read { path, source })?;
    preview_text(&path, &text, &policy, policies.as_ref(), args)
}

/// The namespace's labels as the preview assumes them.
fn namespace_labels(args: &MutateArgs, namespace: &str) -> BTreeMap<String, String> {
    let mut labels = args.namespace_labels.clone().unwrap_or_default();
    labels
        .entry(NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| namespace.to_owned());
    labels
}

/// A preview command's input, `FILE` or `-` for standard input: its name for messages, and its
/// text (or the name and why it could not be read). Shared by `mutate` and `spans`.
pub(crate) fn read_input(input: &str) -> Result<(String, String), (String, io::Error)> {
    if input == "-" {
        let name = "<stdin>".to_owned();
        let mut text = String::new();
        match io::stdin().read_to_string(&mut text) {
            Ok(_) => Ok((name, text)),
            Err(e) => Err((name, e)),
        }
    } else {
        fs::read_to_string(input)
            .map(|text| (input.to_owned(), text))
            .map_err(|e| (input.to_owned(), e))
    }
}

/// The preview of a document already read: the testable core of the command.
pub fn preview_text(
    path: &str,
    text: &str,
    policy: &Policy,
    policies: Option<&Snapshot>,
    args: &MutateArgs,
) -> Result<Preview, PreviewError> {
    let document = parse_document(path, text)?;
    let (review_doc, object) = review_document(path, document, args)?;
    // Serializing a parsed JSON value cannot fail.
    let body = serde_json::to_vec(&review_doc).expect("JSON value serializes");
    let reply = admission::review_with(&body, args.mode.into(), |namespace| match policies {
        Some(snapshot) => {
            selection::select(snapshot, Some(&namespace_labels(args, namespace)), policy)
        }
        None => Selected::fallback(policy, Fallback::NotWatching),
    })
    .map_err(|source| PreviewError::Review {
        path: path.into(),
        source,
    })?;
    let notes = notes(&reply, policy, policies, args);
    let output = output(&reply, object, args, is_yaml(text))?;
    Ok(Preview { output, notes })
}

/// The review to send and the pod in it: an AdmissionReview as it is, a Pod wrapped in a
/// create review (in its own namespace, else `--namespace`).
fn review_document(
    path: &str,
    document: Value,
    args: &MutateArgs,
) -> Result<(Value, Value), PreviewError> {
    let kind = document.get("kind").and_then(Value::as_str).unwrap_or("");
    match kind {
        admission::KIND => {
            let object = document
                .pointer("/request/object")
                .cloned()
                .unwrap_or(Value::Null);
            Ok((document, object))
        }
        "Pod" => {
            let namespace = document
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(&args.namespace)
                .to_owned();
            let review = admission::pod_create_review(PREVIEW_UID, &namespace, &document);
            Ok((review, document))
        }
        "" => Err(PreviewError::WrongKind {
            path: path.into(),
            found: "a document without kind".into(),
        }),
        other => Err(PreviewError::WrongKind {
            path: path.into(),
            found: format!("kind {other}"),
        }),
    }
}

/// What goes to standard error: warnings, why the pod was skipped or failed, and with
/// `--explain` which policy applied and the report of every variable.
fn notes(
    reply: &admission::Reply,
    policy: &Policy,
    policies: Option<&Snapshot>,
    args: &MutateArgs,
) -> String {
    let mut notes = String::new();
    for w in &reply.warnings {
        notes.push_str(&format!("warning: {w}\n"));
    }
    if let Some(reason) = reply.outcome.skip_reason() {
        notes.push_str(&format!("skipped: {reason}\n"));
    }
    if let Some(error) = &reply.error {
        notes.push_str(&format!("{}: {error}\n", reply.outcome.as_str()));
    }
    if args.explain {
        if reply.decision.is_some() {
            let source = match &args.policy {
                Some(p) => format!("--policy {}", p.display()),
                None => "the embedded default".to_owned(),
            };
            let labels = namespace_labels(args, &reply.namespace);
            notes.push_str(&selection::explain(
                policies,
                &reply.namespace,
                Some(&labels),
                policy,
                &source,
            ));
            notes.push_str(&mode_line(reply, args));
        }
        match reply.decision.as_ref().and_then(|d| d.report.as_ref()) {
            Some(report) => notes.push_str(&report.to_string()),
            // A skip reason already printed above says why there is no report.
            None if reply.outcome.skip_reason().is_some() => {}
            None => notes.push_str("not a Tekton TaskRun pod (no tekton.dev/taskRun label)\n"),
        }
    }
    notes
}

/// What goes to standard output: the patch, the review reply or the patched pod.
fn output(
    reply: &admission::Reply,
    object: Value,
    args: &MutateArgs,
    yaml_input: bool,
) -> Result<String, PreviewError> {
    // What the server sends: no patch in audit mode, although the decision has one.
    let patch = match reply.decision.as_ref().map(|d| &d.action) {
        Some(crate::admission::decide::Action::Patch(p))
            if reply.outcome == admission::Outcome::Patched =>
        {
            p.clone()
        }
        _ => json_patch::Patch(Vec::new()),
    };
    Ok(match args.output {
        Output::Patch => pretty(&patch),
        Output::Review => {
            let v: Value = serde_json::from_slice(&reply.body).expect("reply is JSON");
            pretty(&v)
        }
        Output::Pod => {
            let mut pod = object;
            json_patch::patch(&mut pod, &patch).map_err(|e| PreviewError::Apply(e.to_string()))?;
            match yaml_input {
                // A JSON value always has a YAML form.
                true => serde_norway::to_string(&pod).expect("JSON value as YAML"),
                false => pretty(&pod),
            }
        }
    })
}

/// The mode the pod was decided in, and why: the one place `--explain` says it.
fn mode_line(reply: &admission::Reply, args: &MutateArgs) -> String {
    let mode = reply.mode.as_str();
    let why = if reply.policy_mode == PolicyMode::Enforce && args.mode == ModeArg::Inject {
        "the TracingPolicy's mode is enforce".to_owned()
    } else {
        format!("--mode {}", Mode::from(args.mode).as_str())
    };
    match reply.policy_mode {
        PolicyMode::Audit => format!(
            "mode: audit (decided in {mode} mode, {why}; the server patches nothing and warns)\n"
        ),
        _ => format!("mode: {mode} ({why})\n"),
    }
}

/// JSON documents start with `{`; anything else was read as YAML.
pub(crate) fn is_yaml(text: &str) -> bool {
    !text.trim_start().starts_with('{')
}

fn parse_document(path: &str, text: &str) -> Result<Value, PreviewError> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(PreviewError::Syntax {
            path: path.into(),
            reason: "the input is empty".into(),
        });
    }
    let parsed = if !is_yaml(text) {
        serde_json::from_str::<Value>(text).map_err(|e| e.to_string())
    } else {
        serde_norway::from_str::<Value>(text).map_err(|e| e.to_string())
    };
    let value = parsed.map_err(|reason| PreviewError::Syntax {
        path: path.into(),
        reason,
    })?;
    if !value.is_object() {
        return Err(PreviewError::WrongKind {
            path: path.into(),
            found: "a document that is not an object".into(),
        });
    }
    Ok(value)
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("JSON value serializes")
}
