//! The `mutate` preview command, run as a user runs it.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::Value;

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
    let pod = validated_pod(&stdout_json(&out));
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
