//! The `mutate` preview command, run as a user runs it.

mod support {
    pub mod review;
}

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::review::*;

fn mutate(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lightstep-tekton-webhook"))
        .arg("mutate")
        .args(args)
        .env_remove("LIGHTSTEP_TEKTON_POLICY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn path(name: &str) -> String {
    fixture_path(name).display().to_string()
}

#[test]
fn patch_output_applies_to_the_reviewed_pod() {
    let out = mutate(&[&path("tekton-pipeline-task-traced.json")], None);
    let patch: json_patch::Patch = serde_json::from_value(stdout_json(&out)).unwrap();
    let object = fixture("tekton-pipeline-task-traced.json")["request"]["object"].clone();
    let pod = validated_pod(&apply(&object, &patch));
    assert!(value(&pod, "step-kubectl-apply", "TRACEPARENT").is_some());
}

#[test]
fn review_output_is_the_servers_reply() {
    let out = mutate(
        &["--output", "review", &path("tekton-matrix-triggers.json")],
        None,
    );
    let body = serde_json::to_vec(&stdout_json(&out)).unwrap();
    let uid = fixture("tekton-matrix-triggers.json")["request"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, patch) = check_reply(&body, &uid);
    assert!(!patch.0.is_empty());
}

#[test]
fn a_bare_pod_in_yaml_on_stdin_gives_the_patched_pod() {
    let object = fixture("tekton-pipeline-sidecar-traced.json")["request"]["object"].clone();
    let yaml = serde_norway::to_string(&object).unwrap();
    let out = mutate(&["--output", "pod", "-"], Some(yaml.as_bytes()));
    // YAML in, YAML out.
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.trim_start().starts_with('{'), "{text}");
    let pod: Value = serde_norway::from_str(&text).unwrap();
    let pod = validated_pod(&pod);
    assert!(value(&pod, "step-build", "TRACEPARENT").is_some());
    assert_eq!(value(&pod, "step-build", "GOFLAGS"), Some("-mod=vendor"));
}

#[test]
fn explain_says_what_was_kept_and_where_the_trace_came_from() {
    let out = mutate(
        &["--explain", &path("tekton-taskrun-standalone.json")],
        None,
    );
    assert!(out.status.success());
    let explain = String::from_utf8(out.stderr).unwrap();
    assert!(
        explain.contains("derived from tekton.dev/taskRunUID"),
        "{explain}"
    );
    assert!(explain.contains("kept: the container sets it"), "{explain}");
    assert!(
        explain.contains("kept: the container configures its exporter"),
        "{explain}"
    );
    assert!(
        explain.contains("init container prepare: untouched"),
        "{explain}"
    );

    let out = mutate(
        &["--explain", &path("tekton-pipeline-task-traced.json")],
        None,
    );
    let explain = String::from_utf8(out.stderr).unwrap();
    assert!(explain.contains("Tekton's TaskRun span"), "{explain}");
}

/// D8: a `tracestate` is held to the W3C grammar: the invalid members (`ABC=d=e`,
/// `"x"=<script>`) are left out of `TRACESTATE`, the valid ones kept, and `--explain` names the
/// dropped ones by position, without echoing them.
#[test]
fn invalid_tracestate_members_are_dropped_and_explained() {
    let mut review = fixture("tekton-pipeline-task-traced.json");
    let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
    let key = "tekton.dev/taskrunSpanContext";
    let mut carrier: Value = serde_json::from_str(annotations[key].as_str().unwrap()).unwrap();
    carrier["tracestate"] = r#"ls=1,ABC=d=e,"x"=<script>,congo=t61"#.into();
    annotations[key] = carrier.to_string().into();
    let input = serde_json::to_vec(&review).unwrap();

    let out = mutate(&["--output", "pod", "--explain", "-"], Some(&input));
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(stdout_json(&out)).unwrap();
    let step = "step-kubectl-apply";
    assert_eq!(value(&pod, step, "TRACESTATE"), Some("ls=1,congo=t61"));
    let explain = String::from_utf8(out.stderr).unwrap();
    assert!(explain.contains("tracestate: ls=1,congo=t61"), "{explain}");
    for position in ["member 2: key", "member 3: key"] {
        assert!(
            explain.contains(&format!("tracestate dropped, {position}")),
            "{explain}"
        );
    }
    assert!(
        !explain.contains("script") && !explain.contains("ABC"),
        "{explain}"
    );
}

#[test]
fn plain_pods_print_an_empty_patch_and_say_why() {
    let out = mutate(&[&path("plain-pod.json")], None);
    assert_eq!(stdout_json(&out), Value::Array(Vec::new()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped: not-taskrun-pod"));
}

#[test]
fn enforce_mode_and_a_policy_file() {
    let dir = std::env::temp_dir().join(format!("ltw-preview-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "profile: otlp\nexporter:\n  endpoint: http://collector.obs:4317\n",
    )
    .unwrap();
    let out = mutate(
        &[
            "--mode",
            "enforce",
            "--policy",
            policy.to_str().unwrap(),
            "--output",
            "pod",
            &path("tekton-taskrun-standalone.json"),
        ],
        None,
    );
    let pod = validated_pod(&stdout_json(&out));
    assert_eq!(
        value(&pod, "step-lint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://collector.obs:4317")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: lightstep-tekton: enforced"));

    std::fs::write(&policy, "sampling:\n  ratio: 2\n").unwrap();
    let out = mutate(
        &[
            "--policy",
            policy.to_str().unwrap(),
            &path("plain-pod.json"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sampling.ratio"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "empty"),
        (b"{\"kind\": ", "not JSON or YAML"),
        (
            b"kind: Deployment\napiVersion: apps/v1\n",
            "expected an AdmissionReview or a Pod",
        ),
        (b"[1, 2]", "not an object"),
        (
            b"{\"apiVersion\":\"admission.k8s.io/v1beta1\",\"kind\":\"AdmissionReview\"}",
            "admission.k8s.io/v1",
        ),
        (b"- a\n- b\n", "not an object"),
    ];
    for (input, expected) in cases {
        let out = mutate(&["-"], Some(input));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(input)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = mutate(&["/nonexistent/file.json"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/file.json"));
}

/// A directory of TracingPolicy files for `--policy-dir`, removed on drop.
struct PolicyDir(std::path::PathBuf);

impl PolicyDir {
    fn new(tag: &str, files: &[(&str, &str)]) -> PolicyDir {
        let dir = std::env::temp_dir().join(format!("ltw-policy-dir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        PolicyDir(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TEAM_POLICIES: &str = r#"
apiVersion: lightstep-tekton.io/v1alpha1
kind: TracingPolicy
metadata: {name: prod-b}
spec:
  priority: 10
  namespaceSelector: {matchLabels: {env: prod}}
  profile: otlp
  exporter: {endpoint: "http://b.obs:4317"}
---
apiVersion: lightstep-tekton.io/v1alpha1
kind: TracingPolicy
metadata: {name: prod-a, generation: 3}
spec:
  priority: 10
  namespaceSelector:
    matchExpressions: [{key: env, operator: In, values: [prod, staging]}]
  profile: otlp
  exporter: {endpoint: "http://a.obs:4317"}
"#;

const BROKEN_POLICY: &str = r#"
apiVersion: lightstep-tekton.io/v1alpha1
kind: TracingPolicy
metadata: {name: zz-broken}
spec: {priority: 50, sampling: {ratio: 9}}
"#;

#[test]
fn policy_dir_chooses_by_priority_then_name_and_explains_why() {
    let dir = PolicyDir::new(
        "choose",
        &[("team.yaml", TEAM_POLICIES), ("broken.yml", BROKEN_POLICY)],
    );
    let out = mutate(
        &[
            "--policy-dir",
            dir.arg(),
            "--namespace-labels",
            "env=prod,team=x",
            "--output",
            "pod",
            "--explain",
            &path("tekton-taskrun-standalone.json"),
        ],
        None,
    );
    let pod = validated_pod(&stdout_json(&out));
    // Same priority: prod-a sorts first. The step's own endpoint is kept (inject mode).
    let marker = &pod.metadata.annotations.as_ref().unwrap()["lightstep-tekton.io/injected"];
    assert!(marker.starts_with("prod-a@gen3/"), "{marker}");
    let explain = String::from_utf8(out.stderr).unwrap();
    assert!(
        explain
            .contains("policy: TracingPolicy prod-a (generation 3, priority 10, spec.mode inject)"),
        "{explain}"
    );
    assert!(
        explain.contains("also matches: prod-b: not chosen, same priority 10"),
        "{explain}"
    );
    assert!(
        explain.contains(
            "ignored: TracingPolicy zz-broken (generation 1) is invalid: spec.sampling.ratio"
        ),
        "{explain}"
    );

    // Another namespace: nothing matches, the embedded default applies, and says so.
    let out = mutate(
        &[
            "--policy-dir",
            dir.arg(),
            "--namespace-labels",
            "env=dev",
            "--explain",
            &path("tekton-taskrun-standalone.json"),
        ],
        None,
    );
    stdout_json(&out);
    let explain = String::from_utf8(out.stderr).unwrap();
    assert!(
        explain.contains("policy: lightstep-default from the embedded default: no valid TracingPolicy selects namespace team-b"),
        "{explain}"
    );

    // kubernetes.io/metadata.name is there, as on a cluster.
    let by_name = PolicyDir::new(
        "by-name",
        &[(
            "p.json",
            r#"{"apiVersion": "lightstep-tekton.io/v1alpha1", "kind": "TracingPolicy",
                "metadata": {"name": "team-b-only"},
                "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-b"}}}}"#,
        )],
    );
    let out = mutate(
        &[
            "--policy-dir",
            by_name.arg(),
            "--output",
            "pod",
            &path("tekton-taskrun-standalone.json"),
        ],
        None,
    );
    let pod = validated_pod(&stdout_json(&out));
    let marker = &pod.metadata.annotations.as_ref().unwrap()["lightstep-tekton.io/injected"];
    assert!(marker.starts_with("team-b-only@gen1/"), "{marker}");
}

#[test]
fn policy_dir_in_audit_mode_shows_the_servers_empty_reply() {
    let dir = PolicyDir::new(
        "audit",
        &[(
            "audit.yaml",
            "apiVersion: lightstep-tekton.io/v1alpha1\nkind: TracingPolicy\nmetadata: {name: trial}\nspec: {mode: audit}\n",
        )],
    );
    let out = mutate(
        &[
            "--policy-dir",
            dir.arg(),
            "--output",
            "review",
            &path("tekton-pipeline-task-traced.json"),
        ],
        None,
    );
    let reply = stdout_json(&out);
    assert_eq!(reply["response"]["allowed"], true);
    assert!(reply["response"].get("patch").is_none(), "{reply}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(
            "warning: lightstep-tekton: audit: policy trial would inject tracing into 1 container"
        ),
        "{err}"
    );
    let out = mutate(
        &[
            "--policy-dir",
            dir.arg(),
            &path("tekton-pipeline-task-traced.json"),
        ],
        None,
    );
    assert_eq!(stdout_json(&out), Value::Array(Vec::new()));
}

#[test]
fn policy_dir_refuses_what_would_not_decode_in_one_line() {
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: lightstep-tekton.io/v1alpha1\nkind: TracingPolicy\nmetadata: {name: t}\nspec: {exporter: {endpont: 'http://x:4317'}}\n",
            "spec.exporter",
        ),
        (
            "apiVersion: lightstep-tekton.io/v1alpha1\nkind: TracingPolicy\nmetadata: {name: t}\nspec: {mode: shadow}\n",
            "spec.mode",
        ),
        (
            "apiVersion: lightstep-tekton.io/v1\nkind: TracingPolicy\nmetadata: {name: t}\nspec: {}\n",
            "expected apiVersion lightstep-tekton.io/v1alpha1",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: t}\n",
            "kind TracingPolicy",
        ),
        (
            "apiVersion: lightstep-tekton.io/v1alpha1\nkind: TracingPolicy\nmetadata: {name: t}\nspec: {}\n---\napiVersion: lightstep-tekton.io/v1alpha1\nkind: TracingPolicy\nmetadata: {name: t}\nspec: {}\n",
            "document 2: a second TracingPolicy named \"t\"",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let dir = PolicyDir::new(&format!("bad{i}"), &[("p.yaml", text)]);
        let out = mutate(
            &[
                "--policy-dir",
                dir.arg(),
                &path("tekton-taskrun-standalone.json"),
            ],
            None,
        );
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--policy-dir"), "{err}");
        assert!(err.contains(expected), "{text}: {err}");
    }
    // --namespace-labels needs --policy-dir, and pairs.
    let out = mutate(
        &["--namespace-labels", "a=b", &path("plain-pod.json")],
        None,
    );
    assert_ne!(out.status.code(), Some(0));
    let dir = PolicyDir::new("labels", &[]);
    let out = mutate(
        &[
            "--policy-dir",
            dir.arg(),
            "--namespace-labels",
            "novalue",
            &path("plain-pod.json"),
        ],
        None,
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

/// `--explain` gives the mode once, the one the pod was decided in, with the reason: the path
/// (`--mode`), a TracingPolicy that enforces, or one that only audits; and no line contradicts it.
#[test]
fn explain_names_one_mode_for_every_path_and_policy_mode() {
    let fixture = path("tekton-pipeline-task-traced.json");
    let policy_dir = |mode: &str| {
        PolicyDir::new(
            &format!("mode-{mode}"),
            &[(
                "p.yaml",
                &format!(
                    "apiVersion: lightstep-tekton.io/v1alpha1\nkind: TracingPolicy\nmetadata: {{name: p}}\nspec: {{mode: {mode}}}\n"
                ),
            )],
        )
    };
    let cases = [
        ("inject", None, "mode: inject (--mode inject)"),
        ("enforce", None, "mode: enforce (--mode enforce)"),
        (
            "inject",
            Some("enforce"),
            "mode: enforce (the TracingPolicy's mode is enforce)",
        ),
        ("enforce", Some("inject"), "mode: enforce (--mode enforce)"),
        (
            "inject",
            Some("audit"),
            "mode: audit (decided in inject mode, --mode inject;",
        ),
        (
            "enforce",
            Some("audit"),
            "mode: audit (decided in enforce mode, --mode enforce;",
        ),
    ];
    for (path_mode, policy_mode, expected) in cases {
        let dir = policy_mode.map(policy_dir);
        let mut args = vec!["--explain", "--mode", path_mode];
        if let Some(dir) = &dir {
            args.extend(["--policy-dir", dir.arg()]);
        }
        args.push(&fixture);
        let out = mutate(&args, None);
        let explain = String::from_utf8(out.stderr).unwrap();
        let modes: Vec<&str> = explain.lines().filter(|l| l.contains("mode")).collect();
        assert!(
            modes.iter().any(|l| l.starts_with(expected)),
            "{path_mode}/{policy_mode:?}: {explain}"
        );
        // The mode is said once; the TracingPolicy's own line names its field, nothing else.
        let said: Vec<&&str> = modes.iter().filter(|l| l.starts_with("mode:")).collect();
        assert_eq!(said.len(), 1, "{explain}");
        assert!(
            !explain.contains(", mode inject") && !explain.contains(", mode enforce,"),
            "{explain}"
        );
    }
}

/// An opted-out pod is skipped, and says only that.
#[test]
fn explain_on_an_opted_out_pod_says_only_that_it_opted_out() {
    let mut object = fixture("tekton-pipeline-task-traced.json")["request"]["object"].clone();
    object["metadata"]["annotations"]["lightstep-tekton.io/inject"] = Value::from("false");
    let json = serde_json::to_vec(&object).unwrap();
    let out = mutate(&["--explain", "-"], Some(&json));
    let explain = String::from_utf8(out.stderr).unwrap();
    assert!(explain.contains("skipped: opted-out"), "{explain}");
    assert!(!explain.contains("not a Tekton TaskRun pod"), "{explain}");
}
