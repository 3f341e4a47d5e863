//! `export --release-finalizers` against the stand-in API server: the real binary, run with the
//! arguments of the chart's hook Job (manifests/uninstall holds its rendering) and a kubeconfig
//! pointing at the stand-in, removes the exporter's finalizer from every run that has it and
//! nothing else: another controller's finalizer stays, a run being deleted goes, a run without
//! ours gets no write, and every request is one the hook's ClusterRole grants. A run whose
//! finalizers change under the patch is read again and patched right; a run that cannot be
//! released makes the command fail, naming it.

mod support {
    pub mod fake_api;
    pub mod rbac;
    pub mod tmp;
}

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::rbac::v1::PolicyRule;
use lightstep_tekton_webhook::cluster::EXPORTER_LEASE;
use lightstep_tekton_webhook::cluster::runs::EXPORT_FINALIZER;
use serde::Deserialize as _;
use serde_json::{Value, json};
use support::fake_api::cluster::{FakeCluster, Seen};
use support::fake_api::{self, Request};
use support::rbac::granted;
use support::tmp::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_lightstep-tekton-webhook");
const OTHER: &str = "example.com/keep-me";
/// The namespace the chart's hook runs in (manifests/uninstall's).
const NAMESPACE: &str = "lightstep-tekton";

/// The hook Job's rendering: its objects.
fn hook_objects() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/uninstall/release-finalizers.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The rules of the hook's ClusterRole (on runs) and Role (on the exporter's Lease).
struct Rules {
    runs: Vec<PolicyRule>,
    lease: Vec<PolicyRule>,
}

/// The hook Job's container arguments, and its RBAC.
fn hook() -> (Vec<String>, Rules) {
    let objects = hook_objects();
    let job = objects.iter().find(|o| o["kind"] == "Job").unwrap();
    let args =
        serde_json::from_value(job["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap();
    let rules = |kind: &str| {
        let role = objects.iter().find(|o| o["kind"] == kind).unwrap();
        serde_json::from_value(role["rules"].clone()).unwrap()
    };
    let rules = Rules {
        runs: rules("ClusterRole"),
        lease: rules("Role"),
    };
    (args, rules)
}

fn run(kind: &str, namespace: &str, name: &str, finalizers: &[&str]) -> Value {
    json!({"apiVersion": "tekton.dev/v1", "kind": kind,
           "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                        "labels": {"tekton.dev/pipeline": "ship"},
                        "annotations": {"lightstep-tekton.io/exported": "abc"},
                        "finalizers": finalizers},
           "spec": {"timeouts": {"pipeline": "1h"}},
           "status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{server}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    path
}

/// Runs the binary with `args` against the API server `kubeconfig` names: (success, stdout,
/// stderr).
async fn release(kubeconfig: &Path, args: &[String]) -> (bool, String, String) {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("LIGHTSTEP_TEKTON_POLICY")
        .env_remove("LIGHTSTEP_TEKTON_TOKEN_FILE")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn finalizers(object: &Value) -> Vec<&str> {
    object["metadata"]["finalizers"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `object` without what the release may change (its finalizers, and the resource version the
/// API server bumps).
fn untouched(mut object: Value) -> Value {
    let meta = object["metadata"].as_object_mut().unwrap();
    meta.remove("finalizers");
    meta.remove("resourceVersion");
    object
}

/// Every request is one the hook's ClusterRole or Role grants.
fn within_rbac(seen: &[Seen], rules: &Rules) {
    let lease =
        format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{EXPORTER_LEASE}");
    for r in seen {
        if r.path == lease {
            assert_eq!(r.method, "GET", "{} {}", r.method, r.path);
            assert!(granted(
                &rules.lease,
                "coordination.k8s.io",
                "leases",
                "get",
                EXPORTER_LEASE
            ));
            continue;
        }
        let resource = if r.path.contains("/pipelineruns") {
            "pipelineruns"
        } else if r.path.contains("/taskruns") {
            "taskruns"
        } else {
            panic!("{} {}: not a run", r.method, r.path)
        };
        assert!(r.path.starts_with("/apis/tekton.dev/v1/"), "{}", r.path);
        let named = !r.path.ends_with(resource);
        let verb = match (r.method.as_str(), named) {
            ("GET", false) if r.is_watch() => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("PATCH", true) => "patch",
            _ => panic!("{} {}: not a request the release makes", r.method, r.path),
        };
        assert!(
            granted(&rules.runs, "tekton.dev", resource, verb, ""),
            "{} {}?{} needs {verb} on tekton.dev/{resource}, which the hook's RBAC does not grant",
            r.method,
            r.path,
            r.query
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_finalizer_of_ours_is_released_and_nothing_else_is_written() {
    let api = FakeCluster::start().await;
    let dir = TempDir::new("release");
    let config = dir.0.join("kubeconfig");
    api.kubeconfig(&config);
    let ours = EXPORT_FINALIZER;
    api.put(
        "pipelineruns",
        run("PipelineRun", "team-a", "held", &[ours]),
    );
    api.put(
        "pipelineruns",
        run("PipelineRun", "team-a", "shared", &[OTHER, ours]),
    );
    api.put(
        "pipelineruns",
        run("PipelineRun", "team-c", "not-ours", &[OTHER]),
    );
    api.put("taskruns", run("TaskRun", "team-b", "deleting", &[ours]));
    api.put(
        "taskruns",
        run("TaskRun", "team-b", "deleting-shared", &[ours, OTHER]),
    );
    api.put("taskruns", run("TaskRun", "team-b", "free", &[]));
    // A pruner deleted these two: they wait on their finalizers.
    assert!(api.delete("taskruns", "team-b", "deleting"));
    assert!(api.delete("taskruns", "team-b", "deleting-shared"));
    let before = |c: &str, ns: &str, n: &str| untouched(api.get(c, ns, n).unwrap());
    let kept = [
        ("pipelineruns", "team-a", "held"),
        ("pipelineruns", "team-a", "shared"),
        ("pipelineruns", "team-c", "not-ours"),
        ("taskruns", "team-b", "deleting-shared"),
        ("taskruns", "team-b", "free"),
    ]
    .map(|(c, ns, n)| ((c, ns, n), before(c, ns, n)));

    let (args, rules) = hook();
    let (ok, stdout, stderr) = release(&config, &args).await;
    assert!(ok, "{stdout}{stderr}");

    // Ours is gone everywhere; the other controller's finalizer stays, in its place.
    for ((collection, namespace, name), was) in &kept {
        let now = api.get(collection, namespace, name).unwrap();
        assert!(!finalizers(&now).contains(&ours), "{name}: {now}");
        assert_eq!(
            untouched(now.clone()),
            *was,
            "{name}: only the finalizer may change"
        );
    }
    let shared = api.get("pipelineruns", "team-a", "shared").unwrap();
    assert_eq!(finalizers(&shared), [OTHER]);
    let deleting_shared = api.get("taskruns", "team-b", "deleting-shared").unwrap();
    assert_eq!(finalizers(&deleting_shared), [OTHER]);
    assert!(!deleting_shared["metadata"]["deletionTimestamp"].is_null());
    // The one that waited on ours alone is really gone.
    assert!(api.get("taskruns", "team-b", "deleting").is_none());

    // One write per run that had ours, none on the others, and each a guarded JSON Patch.
    let seen = api.seen();
    let mut patched: Vec<&str> = seen
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.rsplit('/').next().unwrap())
        .collect();
    patched.sort();
    assert_eq!(patched, ["deleting", "deleting-shared", "held", "shared"]);
    for patch in seen.iter().filter(|r| r.method == "PATCH") {
        let ops = patch.body.as_array().expect("a JSON Patch");
        let name = patch.path.rsplit('/').next().unwrap();
        assert_eq!(
            ops[0],
            json!({"op": "test", "path": "/metadata/uid", "value": format!("uid-{name}")})
        );
        assert_eq!(ops[1]["op"], "test");
        assert_eq!(ops[1]["value"], ours);
        assert_eq!(ops[2], json!({"op": "remove", "path": ops[1]["path"]}));
        assert_eq!(ops.len(), 3);
    }
    within_rbac(&seen, &rules);

    assert!(
        seen.iter()
            .any(|r| r.path.ends_with(&format!("/leases/{EXPORTER_LEASE}"))),
        "the hook looks at the exporter's Lease first"
    );

    // It says what it did.
    for name in [
        "PipelineRun team-a/held",
        "PipelineRun team-a/shared",
        "TaskRun team-b/deleting",
        "TaskRun team-b/deleting-shared",
    ] {
        assert!(stdout.contains(&format!("released {name}\n")), "{stdout}");
    }
    assert!(stdout.contains("from 4 of 6 runs listed"), "{stdout}");

    // A second run finds nothing to do and writes nothing.
    let writes = api.seen().iter().filter(|r| r.method == "PATCH").count();
    let (ok, stdout, _) = release(&config, &args).await;
    assert!(ok && stdout.contains("from 0 of 5 runs listed"), "{stdout}");
    assert_eq!(
        api.seen().iter().filter(|r| r.method == "PATCH").count(),
        writes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_limits_the_release_to_one_namespace() {
    let api = FakeCluster::start().await;
    let dir = TempDir::new("release-ns");
    let config = dir.0.join("kubeconfig");
    api.kubeconfig(&config);
    api.put(
        "pipelineruns",
        run("PipelineRun", "team-a", "a", &[EXPORT_FINALIZER]),
    );
    api.put(
        "taskruns",
        run("TaskRun", "team-a", "a-1", &[EXPORT_FINALIZER]),
    );
    api.put(
        "pipelineruns",
        run("PipelineRun", "team-b", "b", &[EXPORT_FINALIZER]),
    );
    let args: Vec<String> = ["export", "--release-finalizers", "--namespace", "team-a"]
        .map(String::from)
        .to_vec();
    let (ok, stdout, stderr) = release(&config, &args).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(finalizers(&api.get("pipelineruns", "team-a", "a").unwrap()).is_empty());
    assert!(finalizers(&api.get("taskruns", "team-a", "a-1").unwrap()).is_empty());
    assert_eq!(
        finalizers(&api.get("pipelineruns", "team-b", "b").unwrap()),
        [EXPORT_FINALIZER]
    );
    assert!(
        api.seen()
            .iter()
            .all(|r| r.path.starts_with("/apis/tekton.dev/v1/namespaces/team-a/")),
        "{:?}",
        api.seen().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    assert!(
        stdout.contains("from 2 of 2 runs listed in namespace team-a"),
        "{stdout}"
    );
}

/// A stand-in whose one TaskRun has ours at index 0 when listed, then another controller's
/// finalizer lands in front of it: the first patch's `test` fails (422), the run is read
/// again, and the second patch removes index 1. `refuse` answers every patch with 403.
async fn contended(refuse: bool) -> (Arc<Mutex<Vec<Request>>>, String) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let listed = run("TaskRun", "ci", "build", &[EXPORT_FINALIZER]);
    let moved = run("TaskRun", "ci", "build", &[OTHER, EXPORT_FINALIZER]);
    let handler: fake_api::Handler = Arc::new(move |r: &Request| {
        log.lock().unwrap().push(r.clone());
        let list = |items: Vec<Value>| {
            (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}),
            )
        };
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/apis/tekton.dev/v1/pipelineruns") => list(vec![]),
            ("GET", "/apis/tekton.dev/v1/taskruns") => list(vec![listed.clone()]),
            ("GET", "/apis/tekton.dev/v1/namespaces/ci/taskruns/build") => (200, moved.clone()),
            ("PATCH", "/apis/tekton.dev/v1/namespaces/ci/taskruns/build") if refuse => {
                fake_api::status(403, "Forbidden")
            }
            ("PATCH", "/apis/tekton.dev/v1/namespaces/ci/taskruns/build") => {
                let mut object = moved.clone();
                let ops: json_patch::Patch = serde_json::from_value(r.body.clone()).unwrap();
                match json_patch::patch(&mut object, &ops) {
                    Ok(()) => (200, object),
                    Err(_) => fake_api::status(422, "Invalid"),
                }
            }
            _ => fake_api::status(404, "NotFound"),
        }
    });
    let (addr, _) = fake_api::start(handler).await;
    (seen, format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_finalizers_moved_is_read_again_and_released_at_its_new_place() {
    let (seen, server) = contended(false).await;
    let dir = TempDir::new("release-moved");
    let config = kubeconfig(&dir.0, &server);
    let (args, rules) = hook();
    let (ok, stdout, stderr) = release(&config, &args).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("released TaskRun ci/build"), "{stdout}");
    let seen = seen.lock().unwrap().clone();
    let patches: Vec<&Request> = seen.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 2, "{patches:?}");
    assert_eq!(patches[0].body[1]["path"], "/metadata/finalizers/0");
    assert_eq!(patches[1].body[1]["path"], "/metadata/finalizers/1");
    let as_seen: Vec<Seen> = seen
        .iter()
        .map(|r| Seen {
            method: r.method.to_string(),
            path: r.path.clone(),
            query: String::new(),
            body: r.body.clone(),
            at: std::time::Instant::now(),
        })
        .collect();
    within_rbac(&as_seen, &rules);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_be_released_fails_the_command_and_is_named() {
    let (_, server) = contended(true).await;
    let dir = TempDir::new("release-refused");
    let config = kubeconfig(&dir.0, &server);
    let (args, _) = hook();
    let (ok, stdout, stderr) = release(&config, &args).await;
    assert!(!ok, "{stdout}{stderr}");
    assert!(stdout.contains("from 0 of 1 runs listed"), "{stdout}");
    assert!(
        stderr.contains("still hold lightstep-tekton.io/export")
            && stderr.contains("TaskRun ci/build"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_fails_with_what_it_needs() {
    let dir = TempDir::new("release-down");
    let port = support::tmp::free_port();
    let config = kubeconfig(&dir.0, &format!("http://{port}"));
    let (args, _) = hook();
    let (ok, _, stderr) = release(&config, &args).await;
    assert!(!ok);
    assert!(
        stderr.contains("reading the exporter's Lease") && stderr.contains("nothing was released"),
        "{stderr}"
    );
    let by_hand: Vec<String> = ["export", "--release-finalizers"]
        .map(String::from)
        .to_vec();
    let (ok, _, stderr) = release(&config, &by_hand).await;
    assert!(!ok);
    assert!(
        stderr.contains("listing PipelineRuns and TaskRuns failed"),
        "{stderr}"
    );
}

/// A Lease renewed just now, as a running exporter holds it.
fn lease(holder: &str) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": EXPORTER_LEASE, "namespace": NAMESPACE},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                    "acquireTime": now, "renewTime": now}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_exporter_is_waited_for_and_nothing_is_released_while_it_holds_its_lease() {
    let api = FakeCluster::start().await;
    let dir = TempDir::new("release-lease");
    let config = dir.0.join("kubeconfig");
    api.kubeconfig(&config);
    api.put(
        "pipelineruns",
        run("PipelineRun", "team-a", "held", &[EXPORT_FINALIZER]),
    );
    api.put("leases", lease("exporter-7d9f"));
    let (args, _) = hook();
    let short: Vec<String> = args
        .iter()
        .map(|a| match a.starts_with("--wait-for-exporter=") {
            true => "--wait-for-exporter=3s".to_owned(),
            false => a.clone(),
        })
        .collect();
    let (ok, stdout, stderr) = release(&config, &short).await;
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("exporter-7d9f") && stderr.contains("stop it first"),
        "{stderr}"
    );
    assert!(
        api.seen()
            .iter()
            .all(|r| r.method == "GET" && r.path.contains("/leases/"))
    );
    assert_eq!(
        finalizers(&api.get("pipelineruns", "team-a", "held").unwrap()),
        [EXPORT_FINALIZER]
    );

    // The exporter stops: it releases its Lease (no holder), and the release goes ahead.
    api.put("leases", lease(""));
    let (ok, stdout, stderr) = release(&config, &args).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(finalizers(&api.get("pipelineruns", "team-a", "held").unwrap()).is_empty());
}
