//! `export` against a stand-in API server and an OTLP receiver: the real binary, pointed at the
//! stand-in by a kubeconfig, lists and watches runs and namespaces, exports each finished run in
//! an opted-in namespace once, marks it only after the receiver answered, survives a failing
//! receiver and a restart without losing or repeating a run, hands over between two replicas
//! through its Lease, holds its finalizer on the runs it will export until their mark (or their
//! leaving scope, or `--store-deadline`), and asks the API server for nothing the install's
//! exporter RBAC does not grant. Every wait polls against a generous deadline; nothing is timed
//! but the store deadline itself, set well above the moment it takes the exporter to see a run.

mod support {
    pub mod fake_api;
    pub mod http;
    pub mod poll;
    pub mod rbac;
    pub mod tmp;
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use support::rbac::{granted, install_rules};

use lightstep_tekton_webhook::cluster::EXPORTER_LEASE;
use lightstep_tekton_webhook::contract::derive_trace_id;
use serde_json::{Value, json};
use support::fake_api::cluster::{FakeCluster, Seen};
use support::fake_api::receiver::Receiver;
use support::http::request;
use support::poll::{Outcome, eventually_logged};
use support::tmp::{TempDir, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_lightstep-tekton-webhook");
const INSTALL_NAMESPACE: &str = "lightstep-tekton";
const TOKEN: &str = "test-token-value";
const EXPORTED: &str = "lightstep-tekton.io/exported";
const FINALIZER: &str = "lightstep-tekton.io/export";

/// The stand-in, the receiver, and the files an exporter is started with.
struct World {
    api: FakeCluster,
    receiver: Receiver,
    dir: TempDir,
}

impl World {
    async fn start(tag: &str) -> World {
        World::start_with(tag, "").await
    }

    /// With `policy` appended to the test policy (more top-level fields).
    async fn start_with(tag: &str, policy: &str) -> World {
        let api = FakeCluster::start().await;
        let receiver = Receiver::start().await;
        let dir = TempDir::new(&format!("export-{tag}"));
        api.kubeconfig(&dir.0.join("kubeconfig"));
        std::fs::write(dir.0.join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(
            dir.0.join("policy.yaml"),
            format!(
                "name: test\nprofile: otlp\nexporter: {{endpoint: \"{}\", protocol: http/protobuf}}\n\
                 token: {{secretName: lightstep-access-token, secretKey: access-token, header: lightstep-access-token}}\n\
                 runSpans:\n  enabled: true\n  traceUrl: \"https://traces.example/trace?id={{traceId}}\"\n{policy}",
                receiver.endpoint()
            ),
        )
        .unwrap();
        api.put("namespaces", namespace("team-r", Some("enabled")));
        api.put("namespaces", namespace("outside", None));
        World { api, receiver, dir }
    }

    fn exporter(&self, identity: &str, extra: &[&str]) -> Exporter {
        let namespace = format!("--lease-namespace={INSTALL_NAMESPACE}");
        self.exporter_with(identity, &[&[namespace.as_str()], extra].concat())
    }

    /// An exporter given only `extra` of the Lease's settings (none from the environment).
    fn exporter_with(&self, identity: &str, extra: &[&str]) -> Exporter {
        let metrics = free_port();
        let log = self.dir.0.join(format!("{identity}.log"));
        let stdout = self.dir.0.join(format!("{identity}.out"));
        let child = Command::new(BIN)
            .arg("export")
            .arg(format!(
                "--policy={}",
                self.dir.0.join("policy.yaml").display()
            ))
            .arg(format!(
                "--token-file={}",
                self.dir.0.join("token").display()
            ))
            // The fixtures finished hours ago; the window is tested in the decision's unit tests.
            .arg("--backfill=100000h")
            .arg("--rescan-interval=2s")
            .arg("--child-grace=5s")
            .arg(format!("--metrics-listen={metrics}"))
            .arg(format!("--lease-identity={identity}"))
            .args(extra)
            .env("KUBECONFIG", self.dir.0.join("kubeconfig"))
            .env_remove("POD_NAMESPACE")
            .env("RUST_LOG", "info")
            .env_remove("LIGHTSTEP_TEKTON_POLICY")
            .env_remove("LIGHTSTEP_TEKTON_TOKEN_FILE")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Exporter {
            child,
            metrics,
            log,
            stdout,
        }
    }

    /// Every run's trace id the receiver got, with how many requests carried it.
    fn traces(&self) -> BTreeMap<String, usize> {
        let mut traces = BTreeMap::new();
        for received in self.receiver.received() {
            for id in received.trace_ids() {
                *traces.entry(id).or_insert(0) += 1;
            }
        }
        traces
    }

    fn patches(&self) -> Vec<Seen> {
        self.api
            .seen()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }

    /// Adds a copy of a fixture's runs (renamed with `suffix`, new uids) in `namespace`;
    /// returns the root run's trace id.
    fn add_run(&self, fixture: &str, namespace: &str, suffix: &str) -> String {
        let (objects, root_uid) = copy_run(fixture, namespace, suffix);
        // TaskRuns first, as Tekton finishes them before their PipelineRun.
        for object in objects.iter().filter(|o| o["kind"] == "TaskRun") {
            self.api.put("taskruns", object.clone());
        }
        for object in objects.iter().filter(|o| o["kind"] == "PipelineRun") {
            self.api.put("pipelineruns", object.clone());
        }
        derive_trace_id(&root_uid).to_string()
    }

    /// Adds a fixture's runs as `add_run` does, finished now (so within --store-deadline);
    /// returns the root run's uid.
    fn add_fresh_run(&self, fixture: &str, namespace: &str, suffix: &str) -> String {
        let (objects, root_uid) = copy_run(fixture, namespace, suffix);
        for object in objects.iter().filter(|o| o["kind"] == "TaskRun") {
            self.api.put("taskruns", fresh(object.clone()));
        }
        for object in objects.iter().filter(|o| o["kind"] == "PipelineRun") {
            self.api.put("pipelineruns", fresh(object.clone()));
        }
        root_uid
    }

    /// The run's finalizers as the stand-in holds it; `None` once it is gone.
    fn finalizers(&self, plural: &str, name: &str) -> Option<Vec<String>> {
        let object = self.api.get(plural, "team-r", name)?;
        Some(
            object["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect(),
        )
    }

    fn holds(&self, plural: &str, name: &str) -> bool {
        self.finalizers(plural, name)
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
    }
}

/// The run finished now: its completion and its condition's transition time.
fn fresh(mut object: Value) -> Value {
    let now = json!(k8s_openapi::jiff::Timestamp::now().to_string());
    object["status"]["completionTime"] = now.clone();
    for condition in object["status"]["conditions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        condition["lastTransitionTime"] = now.clone();
    }
    object
}

/// The names of a fixture's TaskRuns, as `copy_run` renames them.
fn task_run_names(fixture: &str, suffix: &str) -> Vec<String> {
    copy_run(fixture, "team-r", suffix)
        .0
        .iter()
        .filter(|o| o["kind"] == "TaskRun")
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

struct Exporter {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    stdout: PathBuf,
}

impl Exporter {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.metrics, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    fn ready(&self) -> bool {
        http_get(self.metrics, "/readyz").is_some_and(|(code, _)| code == 200)
    }

    fn leading(&self) -> bool {
        self.metric("lightstep_tekton_exporter_leader") == Some(1.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One plain HTTP GET; the status and body.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let (code, body) = request(addr, None, "GET", path, b"").ok()?;
    Some((code, String::from_utf8_lossy(&body).into_owned()))
}

async fn eventually<R: Outcome>(
    what: &str,
    log: &dyn Fn() -> String,
    check: impl FnMut() -> R,
) -> R::Value {
    eventually_logged(what, log, check).await
}

fn namespace(name: &str, inject: Option<&str>) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if let Some(v) = inject {
        labels["lightstep-tekton.io/inject"] = json!(v);
    }
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": {"name": name, "labels": labels}})
}

/// A fixture's objects renamed `<name>-<suffix>` in `namespace`, with fresh uids and the
/// references between them rewritten; and the root run's uid.
fn copy_run(fixture: &str, namespace: &str, suffix: &str) -> (Vec<Value>, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/runs")
        .join(fixture);
    let list: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut items = list["items"].as_array().unwrap().clone();
    let rename = |name: &str| format!("{name}-{suffix}");
    let new_uid = |uid: &str| format!("{}-{suffix}", &uid[..uid.len().min(20)]);
    let mut root = String::new();
    for item in &mut items {
        let meta = &mut item["metadata"];
        let name = meta["name"].as_str().unwrap().to_owned();
        let uid = meta["uid"].as_str().unwrap().to_owned();
        meta["name"] = json!(rename(&name));
        meta["uid"] = json!(new_uid(&uid));
        meta["namespace"] = json!(namespace);
        if let Some(labels) = meta["labels"].as_object_mut() {
            for key in ["tekton.dev/pipelineRun", "tekton.dev/taskRun"] {
                if let Some(v) = labels.get(key).and_then(Value::as_str).map(str::to_owned) {
                    labels.insert(key.into(), json!(rename(&v)));
                }
            }
            for key in ["tekton.dev/pipelineRunUID", "tekton.dev/taskRunUID"] {
                if let Some(v) = labels.get(key).and_then(Value::as_str).map(str::to_owned) {
                    labels.insert(key.into(), json!(new_uid(&v)));
                }
            }
        }
        if let Some(children) = item["status"]["childReferences"].as_array_mut() {
            for child in children {
                let name = child["name"].as_str().unwrap().to_owned();
                child["name"] = json!(rename(&name));
            }
        }
        let is_root = item["kind"] == "PipelineRun"
            || item["metadata"]["labels"]["tekton.dev/pipelineRunUID"].is_null();
        if is_root && root.is_empty() {
            root = item["metadata"]["uid"].as_str().unwrap().to_owned();
        }
    }
    (items, root)
}

/// Every PATCH of a run.
fn writes_to<'a>(patches: &'a [Seen], plural: &str, name: &str) -> Vec<&'a Seen> {
    patches
        .iter()
        .filter(|p| p.path.ends_with(&format!("/{plural}/{name}")))
        .collect()
}

/// The PATCHes that marked a run (those that write the `exported` annotation).
fn mark_of<'a>(patches: &'a [Seen], plural: &str, name: &str) -> Vec<&'a Seen> {
    writes_to(patches, plural, name)
        .into_iter()
        .filter(|p| is_mark(p))
        .collect()
}

fn is_mark(patch: &Seen) -> bool {
    patch.body.as_array().into_iter().flatten().any(|op| {
        op["op"] == "add"
            && (op["path"] == "/metadata/annotations/lightstep-tekton.io~1exported"
                || (op["path"] == "/metadata/annotations" && !op["value"][EXPORTED].is_null()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_exported_once_and_marked_after_the_receiver_answered() {
    let world = World::start("once").await;
    // A run outside the opted-in namespaces, there from the start.
    let outside = world.add_run("ship-run-fail.json", "outside", "x");
    let exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("ready", &log, || exporter.ready().then_some(())).await;
    eventually("leading", &log, || exporter.leading().then_some(())).await;

    // A PipelineRun still running is not exported; once it finishes, it is.
    let (objects, uid) = copy_run("ship-run-ok.json", "team-r", "a");
    let ok = derive_trace_id(&uid).to_string();
    let mut running = objects
        .iter()
        .find(|o| o["kind"] == "PipelineRun")
        .unwrap()
        .clone();
    running["status"]["conditions"] =
        json!([{"type": "Succeeded", "status": "Unknown", "reason": "Running"}]);
    running["status"]["completionTime"] = Value::Null;
    world.api.put("pipelineruns", running);
    for tr in objects.iter().filter(|o| o["kind"] == "TaskRun") {
        world.api.put("taskruns", tr.clone());
    }
    // A standalone TaskRun after it: once that is in, the running PipelineRun was looked at.
    let lint = world.add_run("lint-run.json", "team-r", "a");
    eventually("the standalone TaskRun", &log, || {
        world.traces().contains_key(&lint).then_some(())
    })
    .await;
    assert!(
        !world.traces().contains_key(&ok),
        "a running PipelineRun was exported"
    );
    let finished = objects
        .iter()
        .find(|o| o["kind"] == "PipelineRun")
        .unwrap()
        .clone();
    world.api.put("pipelineruns", finished);
    eventually("the finished PipelineRun", &log, || {
        world.traces().contains_key(&ok).then_some(())
    })
    .await;

    // Both marked, each after the receiver's answer for its trace.
    let patches = eventually("both marked", &log, || {
        let patches = world.patches();
        (mark_of(&patches, "pipelineruns", "ship-run-ok-a").len() == 1
            && mark_of(&patches, "taskruns", "lint-run-a").len() == 1)
            .then_some(patches)
    })
    .await;
    // The fixtures finished days ago, past --store-deadline: no finalizer was added, and the
    // mark is the only write.
    assert_eq!(writes_to(&patches, "taskruns", "lint-run-a").len(), 1);
    for (plural, name, trace) in [
        ("pipelineruns", "ship-run-ok-a", &ok),
        ("taskruns", "lint-run-a", &lint),
    ] {
        let patch = mark_of(&patches, plural, name)[0];
        let answered = world
            .receiver
            .received()
            .into_iter()
            .find(|r| r.trace_ids().contains(trace))
            .unwrap()
            .answered;
        assert!(
            patch.at > answered,
            "{name} was marked before the receiver answered"
        );
        // A JSON Patch of the two annotations, conditional on the uid, nothing else.
        let uid = world.api.get(plural, "team-r", name).unwrap()["metadata"]["uid"].clone();
        assert_eq!(
            patch.body,
            json!([
                {"op": "test", "path": "/metadata/uid", "value": uid},
                {"op": "add", "path": "/metadata/annotations/lightstep-tekton.io~1exported", "value": trace},
                {"op": "add", "path": "/metadata/annotations/lightstep-tekton.io~1trace-url",
                 "value": format!("https://traces.example/trace?id={trace}")},
            ]),
            "{name}"
        );
        let ns = "team-r";
        let object = world.api.get(plural, ns, name).unwrap();
        assert_eq!(object["metadata"]["annotations"][EXPORTED], json!(trace));
    }
    // The PipelineRun went as one request with all its TaskRuns' spans, with the token.
    let request = world
        .receiver
        .received()
        .into_iter()
        .find(|r| r.trace_ids() == vec![ok.clone()])
        .unwrap();
    assert!(request.span_count() > 6, "{}", request.span_count());
    assert_eq!(request.token.as_deref(), Some(TOKEN));

    // Once each, the outside run never; counted in the metrics.
    let traces = world.traces();
    assert_eq!(traces.get(&ok), Some(&1));
    assert_eq!(traces.get(&lint), Some(&1));
    assert!(
        !traces.contains_key(&outside),
        "a run outside opted-in namespaces was exported"
    );
    assert!(writes_to(&world.patches(), "pipelineruns", "ship-run-fail-x").is_empty());
    let exported = exporter
        .metric(
            r#"lightstep_tekton_exporter_runs_exported_total{kind="pipelinerun",result="success"}"#,
        )
        .unwrap();
    assert_eq!(exported, 1.0);
    assert!(
        exporter
            .metric("lightstep_tekton_exporter_spans_exported_total")
            .unwrap()
            > 6.0
    );
    assert!(http_get(exporter.metrics, "/healthz").is_some_and(|(c, _)| c == 200));

    within_rbac(&world.api.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_everything_once_it_recovers_and_a_restart_repeats_nothing() {
    let world = World::start("recover").await;
    world.receiver.fail(true);
    let mut exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;
    let traces: Vec<String> = (0..3)
        .map(|i| world.add_run("ship-run-retry.json", "team-r", &format!("r{i}")))
        .collect();
    eventually("refusals", &log, || {
        (world.receiver.refused() >= 3).then_some(())
    })
    .await;
    assert!(
        !world.patches().iter().any(is_mark),
        "marked while the receiver refused"
    );
    // The client's own retries gave up and the controller counted it (and will try again).
    eventually("an export error counted", &log, || {
        let errors = exporter
            .metric(r#"lightstep_tekton_exporter_export_errors_total{cause="unavailable"}"#)?;
        (errors >= 1.0).then_some(())
    })
    .await;
    assert!(
        !world.patches().iter().any(is_mark),
        "marked while the receiver refused"
    );
    world.receiver.fail(false);
    eventually("all marked", &log, || {
        (world.patches().iter().filter(|p| is_mark(p)).count() == 3).then_some(())
    })
    .await;
    let received = world.traces();
    for trace in &traces {
        assert_eq!(received.get(trace), Some(&1), "{trace}");
    }

    // A restart: the marked runs are not sent again. A run added after the restart is, and
    // once it is in, the restarted exporter has looked at everything it cached before it.
    exporter.kill();
    let exporter = world.exporter("exporter-1", &[]);
    let log = || exporter.log();
    let after = world.add_run("lint-run.json", "team-r", "after");
    eventually("the new run", &log, || {
        world.traces().contains_key(&after).then_some(())
    })
    .await;
    let received = world.traces();
    for trace in &traces {
        assert_eq!(
            received.get(trace),
            Some(&1),
            "{trace} sent again after a restart"
        );
    }
    assert_eq!(world.receiver.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_exporters_one_exports_and_the_other_takes_over_when_it_dies() {
    let world = World::start("lease").await;
    let mut a = world.exporter("exporter-a", &[]);
    let mut b = world.exporter("exporter-b", &[]);
    let (log_a, log_b) = (a.log.clone(), b.log.clone());
    let logs = move || {
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        format!("{}\n---\n{}", read(&log_a), read(&log_b))
    };
    eventually("both ready", &logs, || {
        (a.ready() && b.ready()).then_some(())
    })
    .await;
    let first = eventually("a leader", &logs, || match (a.leading(), b.leading()) {
        (true, false) => Some('a'),
        (false, true) => Some('b'),
        _ => None,
    })
    .await;
    let before = world.add_run("ship-run-ok.json", "team-r", "l1");
    eventually("the first run", &logs, || {
        world.traces().contains_key(&before).then_some(())
    })
    .await;
    let (leader, standby) = match first {
        'a' => (&mut a, &mut b),
        _ => (&mut b, &mut a),
    };
    assert!(standby.ready(), "a standby is ready");
    assert_eq!(
        standby.metric(
            r#"lightstep_tekton_exporter_runs_exported_total{kind="pipelinerun",result="success"}"#
        ),
        Some(0.0),
        "the standby exported"
    );
    leader.kill();
    let after = world.add_run("ship-run-fail.json", "team-r", "l2");
    eventually("the standby takes over", &logs, || {
        world.traces().contains_key(&after).then_some(())
    })
    .await;
    assert!(standby.leading());
    let traces = world.traces();
    assert_eq!(traces.get(&before), Some(&1));
    assert_eq!(traces.get(&after), Some(&1));
    let lease = world
        .api
        .get("leases", INSTALL_NAMESPACE, EXPORTER_LEASE)
        .expect("the exporter's Lease");
    assert_ne!(lease["spec"]["leaseTransitions"], json!(0));
    within_rbac(&world.api.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lease_namespace_the_lease_lands_in_the_kubeconfig_context_namespace() {
    let world = World::start("context").await;
    world
        .api
        .kubeconfig_in(&world.dir.0.join("kubeconfig"), Some("team-ops"));
    if std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/namespace").exists() {
        return; // Running in a pod: its service account's namespace comes first.
    }
    let exporter = world.exporter_with("exporter-c", &[]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;
    let lease = world.api.get("leases", "team-ops", EXPORTER_LEASE);
    assert_eq!(lease.unwrap()["spec"]["holderIdentity"], "exporter-c");
    assert_eq!(
        world.api.get("leases", INSTALL_NAMESPACE, EXPORTER_LEASE),
        None
    );
    let said = exporter.log();
    assert!(
        said.contains("team-ops") && said.contains("the kubeconfig's current context"),
        "{said}"
    );
    let run = world.add_run("ship-run-ok.json", "team-r", "k");
    eventually("the run", &log, || {
        world.traces().contains_key(&run).then_some(())
    })
    .await;
    // No RBAC check: the install's Role grants Leases in its own namespace, not in team-ops.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_each_run_once_and_writes_nothing() {
    let world = World::start("dry").await;
    let ok = world.add_run("ship-run-ok.json", "team-r", "d");
    let outside = world.add_run("ship-run-ok.json", "outside", "o");
    let exporter = world.exporter("exporter-dry", &["--dry-run"]);
    let log = || exporter.log();
    let lint = world.add_run("lint-run.json", "team-r", "d");
    let out = || std::fs::read_to_string(&exporter.stdout).unwrap_or_default();
    let lines = eventually("two lines", &log, || {
        let text = out();
        (text.lines().count() >= 2 && text.contains(&lint)).then_some(text)
    })
    .await;
    let traces: Vec<String> = lines
        .lines()
        .map(|line| {
            let request: Value = serde_json::from_str(line).unwrap();
            request["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]
                .as_str()
                .unwrap()
                .to_lowercase()
        })
        .collect();
    assert!(traces.contains(&ok) && traces.contains(&lint), "{traces:?}");
    assert!(!traces.contains(&outside));
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert_eq!(world.receiver.count(), 0, "a dry run sent spans");
    let writes: Vec<Seen> = world
        .api
        .seen()
        .into_iter()
        .filter(|r| r.method != "GET" || r.path.contains("/leases"))
        .collect();
    assert!(
        writes.is_empty(),
        "a dry run wrote or took a Lease: {writes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finalizer_holds_a_run_from_first_sight_and_goes_with_its_mark() {
    let world = World::start("finalizer").await;
    let exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;

    // A PipelineRun seen running, and its TaskRuns: each gets the finalizer.
    let (objects, uid) = copy_run("ship-run-ok.json", "team-r", "f");
    let trace = derive_trace_id(&uid).to_string();
    let pipeline_run = fresh(
        objects
            .iter()
            .find(|o| o["kind"] == "PipelineRun")
            .unwrap()
            .clone(),
    );
    let mut running = pipeline_run.clone();
    running["status"]["conditions"] =
        json!([{"type": "Succeeded", "status": "Unknown", "reason": "Running"}]);
    running["status"]["completionTime"] = Value::Null;
    world.api.put("pipelineruns", running);
    let children = task_run_names("ship-run-ok.json", "f");
    for tr in objects.iter().filter(|o| o["kind"] == "TaskRun") {
        world.api.put("taskruns", fresh(tr.clone()));
    }
    eventually(
        "the finalizer on the PipelineRun and its TaskRuns",
        &log,
        || {
            (world.holds("pipelineruns", "ship-run-ok-f")
                && children.iter().all(|c| world.holds("taskruns", c)))
            .then_some(())
        },
    )
    .await;
    // Added next to what other controllers hold, never over it.
    let mut other = world.api.get("taskruns", "team-r", &children[0]).unwrap();
    assert_eq!(other["metadata"]["finalizers"], json!([FINALIZER]));
    other["metadata"]["finalizers"] = json!([FINALIZER, "chains.tekton.dev"]);
    world.api.put("taskruns", other);

    // A user deletes a TaskRun (a foreground cascade would too): it waits.
    assert!(world.api.delete("taskruns", "team-r", &children[1]));
    let deleting = world.api.get("taskruns", "team-r", &children[1]).unwrap();
    assert!(!deleting["metadata"]["deletionTimestamp"].is_null());
    assert!(
        world.traces().is_empty(),
        "a running PipelineRun was exported"
    );

    // It finishes (Tekton writes the status, the metadata stays): exported whole, and marked
    // and released in one patch.
    let mut finished = world
        .api
        .get("pipelineruns", "team-r", "ship-run-ok-f")
        .unwrap();
    finished["status"] = pipeline_run["status"].clone();
    world.api.put("pipelineruns", finished);
    eventually("the PipelineRun marked", &log, || {
        (!mark_of(&world.patches(), "pipelineruns", "ship-run-ok-f").is_empty()).then_some(())
    })
    .await;
    assert_eq!(world.traces().get(&trace), Some(&1));
    let patches = world.patches();
    let mark = mark_of(&patches, "pipelineruns", "ship-run-ok-f")[0];
    assert!(
        mark.body
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
        "{}",
        mark.body
    );
    assert_eq!(
        world.finalizers("pipelineruns", "ship-run-ok-f"),
        Some(vec![])
    );
    // Its TaskRuns are released once it is marked; the deleted one is then really gone, and
    // the other controller's finalizer stays.
    eventually("the TaskRuns released", &log, || {
        children
            .iter()
            .all(|c| !world.holds("taskruns", c))
            .then_some(())
    })
    .await;
    assert!(world.api.get("taskruns", "team-r", &children[1]).is_none());
    assert_eq!(
        world.finalizers("taskruns", &children[0]),
        Some(vec!["chains.tekton.dev".to_owned()])
    );
    // Two writes per run at most: hold, then mark (or, for a TaskRun, release).
    let patches = world.patches();
    assert_eq!(
        writes_to(&patches, "pipelineruns", "ship-run-ok-f").len(),
        2
    );
    for child in &children {
        let writes = writes_to(&patches, "taskruns", child);
        let bodies: Vec<&Value> = writes.iter().map(|w| &w.body).collect();
        assert_eq!(writes.len(), 2, "{child}: {bodies:?}");
    }
    // Each was conditional on the run's uid.
    for patch in &patches {
        assert_eq!(patch.body[0]["op"], "test", "{}", patch.body);
        assert_eq!(patch.body[0]["path"], "/metadata/uid", "{}", patch.body);
    }
    within_rbac(&world.api.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_deleted_while_the_receiver_refuses_is_exported_once_it_recovers_then_goes() {
    let world = World::start("deleted").await;
    world.receiver.fail(true);
    let exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;
    let uid = world.add_fresh_run("lint-run.json", "team-r", "gone");
    let trace = derive_trace_id(&uid).to_string();
    eventually("held", &log, || {
        world.holds("taskruns", "lint-run-gone").then_some(())
    })
    .await;
    eventually("a refusal", &log, || {
        (world.receiver.refused() >= 1).then_some(())
    })
    .await;
    // Deleted (by a pruner, say) while the backend refuses: it stays.
    assert!(world.api.delete("taskruns", "team-r", "lint-run-gone"));
    assert!(
        world
            .api
            .get("taskruns", "team-r", "lint-run-gone")
            .is_some()
    );
    world.receiver.fail(false);
    eventually("exported, then gone", &log, || {
        (world.traces().contains_key(&trace)
            && world
                .api
                .get("taskruns", "team-r", "lint-run-gone")
                .is_none())
        .then_some(())
    })
    .await;
    assert_eq!(world.traces().get(&trace), Some(&1));
    let lost = r#"lightstep_tekton_exporter_runs_lost_total{kind="taskrun",reason="deleted"}"#;
    assert_eq!(exporter.metric(lost), Some(0.0));
    assert_eq!(
        writes_to(&world.patches(), "taskruns", "lint-run-gone").len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_leaves_scope_is_released_and_not_exported() {
    let world = World::start("scope").await;
    world.receiver.fail(true);
    let exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;
    world.add_fresh_run("ship-run-ok.json", "team-r", "s");
    let children = task_run_names("ship-run-ok.json", "s");
    eventually("held", &log, || {
        (world.holds("pipelineruns", "ship-run-ok-s")
            && children.iter().all(|c| world.holds("taskruns", c)))
        .then_some(())
    })
    .await;
    // The namespace's label is removed: everything is released (at the next rescan), unmarked.
    world.api.put("namespaces", namespace("team-r", None));
    eventually("released", &log, || {
        (!world.holds("pipelineruns", "ship-run-ok-s")
            && children.iter().all(|c| !world.holds("taskruns", c)))
        .then_some(())
    })
    .await;
    world.receiver.fail(false);
    let patches = world.patches();
    assert!(
        !patches.iter().any(is_mark),
        "a run out of scope was marked"
    );
    assert_eq!(
        writes_to(&patches, "pipelineruns", "ship-run-ok-s").len(),
        2
    );
    let lost = r#"lightstep_tekton_exporter_runs_lost_total{kind="pipelinerun",reason="deadline"}"#;
    assert_eq!(exporter.metric(lost), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_store_deadline_a_run_is_given_up_released_and_counted_lost() {
    let world = World::start("deadline").await;
    world.receiver.fail(true);
    let exporter = world.exporter("exporter-0", &["--store-deadline=6s"]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;
    let uid = world.add_fresh_run("ship-run-ok.json", "team-r", "late");
    let trace = derive_trace_id(&uid).to_string();
    let children = task_run_names("ship-run-ok.json", "late");
    eventually("held", &log, || {
        world
            .holds("pipelineruns", "ship-run-ok-late")
            .then_some(())
    })
    .await;
    assert!(
        world
            .api
            .delete("pipelineruns", "team-r", "ship-run-ok-late")
    );
    let lost = r#"lightstep_tekton_exporter_runs_lost_total{kind="pipelinerun",reason="deadline"}"#;
    eventually("given up", &log, || {
        (exporter.metric(lost) == Some(1.0)).then_some(())
    })
    .await;
    // Marked `deadline` and released in one patch: the pending delete went through.
    let patches = world.patches();
    let marks = mark_of(&patches, "pipelineruns", "ship-run-ok-late");
    assert_eq!(marks.len(), 1);
    assert!(
        marks[0].body.to_string().contains(r#""value":"deadline""#),
        "{}",
        marks[0].body
    );
    assert!(
        marks[0]
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "remove")
    );
    assert!(
        world
            .api
            .get("pipelineruns", "team-r", "ship-run-ok-late")
            .is_none()
    );
    assert!(
        exporter.log().contains("ship-run-ok-late"),
        "the log names the run"
    );
    eventually("its TaskRuns released", &log, || {
        children
            .iter()
            .all(|c| !world.holds("taskruns", c))
            .then_some(())
    })
    .await;
    // Once, not again when it was deleted; and never sent once the receiver is back.
    let deleted =
        r#"lightstep_tekton_exporter_runs_lost_total{kind="pipelinerun",reason="deleted"}"#;
    assert_eq!(exporter.metric(deleted), Some(0.0));
    world.receiver.fail(false);
    let lint = world.add_run("lint-run.json", "team-r", "after");
    eventually("a later run", &log, || {
        world.traces().contains_key(&lint).then_some(())
    })
    .await;
    assert!(!world.traces().contains_key(&trace));
    assert_eq!(exporter.metric(lost), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_outside_scope_and_unsampled_runs_get_no_write() {
    let world = World::start_with("noscope", "sampling: {ratio: 0.5}\n").await;
    let exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("leading", &log, || exporter.leading().then_some(())).await;
    // A suffix whose PipelineRun's derived trace is sampled at 0.5, and one whose is not.
    let sampled = |suffix: &str| {
        let (_, uid) = copy_run("ship-run-ok.json", "team-r", suffix);
        lightstep_tekton_webhook::contract::sampled(derive_trace_id(&uid), 0.5)
    };
    let suffixes: Vec<String> = (0..64).map(|i| format!("u{i}")).collect();
    let out = suffixes.iter().find(|s| !sampled(s)).unwrap();
    let kept = suffixes.iter().find(|s| sampled(s)).unwrap();
    world.add_fresh_run("ship-run-ok.json", "outside", "x");
    world.add_fresh_run("ship-run-ok.json", "team-r", out);
    let uid = world.add_fresh_run("ship-run-ok.json", "team-r", kept);
    let trace = derive_trace_id(&uid).to_string();
    eventually("the sampled run exported", &log, || {
        world.traces().contains_key(&trace).then_some(())
    })
    .await;
    let patches = world.patches();
    assert!(!writes_to(&patches, "pipelineruns", &format!("ship-run-ok-{kept}")).is_empty());
    for (suffix, what) in [
        ("x", "outside the opted-in namespaces"),
        (out.as_str(), "unsampled"),
    ] {
        let name = format!("ship-run-ok-{suffix}");
        assert!(
            writes_to(&patches, "pipelineruns", &name).is_empty(),
            "{what}: a write"
        );
        for child in task_run_names("ship-run-ok.json", suffix) {
            assert!(
                writes_to(&patches, "taskruns", &child).is_empty(),
                "{what}: a write"
            );
        }
    }
    assert_eq!(world.traces().len(), 1);
}

/// Every request is one the exporter's ClusterRole (or, for its Lease, its Role) grants.
fn within_rbac(seen: &[Seen]) {
    let (cluster_role, role) = (
        install_rules("exporter.yaml", "ClusterRole"),
        install_rules("exporter.yaml", "Role"),
    );
    let leases = format!("/apis/coordination.k8s.io/v1/namespaces/{INSTALL_NAMESPACE}/leases");
    let lease = format!("{leases}/{EXPORTER_LEASE}");
    for r in seen {
        let list = if r.is_watch() { "watch" } else { "list" };
        let tekton = |p: &str, plural: &str| {
            p.starts_with("/apis/tekton.dev/v1/namespaces/") && p.contains(&format!("/{plural}/"))
        };
        let (rules, group, resource, verb) = match (r.method.as_str(), r.path.as_str()) {
            ("GET", p) if p == lease => (&role, "coordination.k8s.io", "leases", "get"),
            ("PUT", p) if p == lease => (&role, "coordination.k8s.io", "leases", "update"),
            ("POST", p) if p == leases => (&role, "coordination.k8s.io", "leases", "create"),
            ("GET", "/api/v1/namespaces") => (&cluster_role, "", "namespaces", list),
            ("GET", "/apis/tekton.dev/v1/pipelineruns") => {
                (&cluster_role, "tekton.dev", "pipelineruns", list)
            }
            ("GET", "/apis/tekton.dev/v1/taskruns") => {
                (&cluster_role, "tekton.dev", "taskruns", list)
            }
            ("GET", "/apis/lightstep-tekton.io/v1alpha1/tracingpolicies") => (
                &cluster_role,
                "lightstep-tekton.io",
                "tracingpolicies",
                list,
            ),
            ("PATCH", p) if tekton(p, "pipelineruns") => {
                (&cluster_role, "tekton.dev", "pipelineruns", "patch")
            }
            ("PATCH", p) if tekton(p, "taskruns") => {
                (&cluster_role, "tekton.dev", "taskruns", "patch")
            }
            other => panic!("unexpected API request {other:?}"),
        };
        assert!(
            granted(rules, group, resource, verb, EXPORTER_LEASE),
            "{} {}?{} needs {verb} on {group}/{resource}, which the exporter's RBAC does not grant",
            r.method,
            r.path,
            r.query
        );
    }
}

/// The process's user and system CPU time so far, in clock ticks (`/proc/<pid>/stat` fields
/// 14 and 15, counted after the parenthesised command name, which may hold spaces).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // Fields 14 and 15 of the line; the first after the name is field 3.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_with_every_slot_busy_costs_no_cpu() {
    let world = World::start("spin").await;
    world.receiver.fail(true);
    world.add_run("lint-run.json", "team-r", "a");
    world.add_run("lint-run.json", "team-r", "b");
    let exporter = world.exporter("exporter-0", &["--concurrency=1"]);
    let log = || exporter.log();
    // Refused first, so runs back off in the queue; then the receiver hangs: the next run to
    // go takes the only slot and hangs there, while the other's retry time comes.
    eventually("an export failed", &log, || {
        let errors = exporter
            .metric(r#"lightstep_tekton_exporter_export_errors_total{cause="unavailable"}"#)?;
        (errors >= 1.0).then_some(())
    })
    .await;
    world.receiver.stall(true);
    world.receiver.fail(false);
    eventually("a request held", &log, || {
        (world.receiver.stalled() >= 1).then_some(())
    })
    .await;
    // Past both runs' retry times (the first retries wait at most 2 s), well inside the held
    // attempt's timeout (10 s).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let pid = exporter.child.id();
    let before = cpu_ticks(pid);
    let window = std::time::Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let spent = cpu_ticks(pid) - before;
    assert_eq!(
        world.receiver.stalled(),
        1,
        "the second run waited for the slot"
    );
    // Clock ticks are 100 a second on Linux: a loop spinning on a due timer burns most of the
    // window's 300; an idle one a few.
    assert!(
        spent < 30,
        "{spent} CPU ticks in a {window:?} window with nothing to do"
    );
    world.receiver.stall(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_the_backend_refuses_for_good_is_marked_rejected_and_released() {
    let world = World::start("rejected").await;
    world.receiver.answer(400);
    let uid = world.add_fresh_run("lint-run.json", "team-r", "a");
    let trace = derive_trace_id(&uid).to_string();
    let exporter = world.exporter("exporter-0", &["--max-rejections=2"]);
    let log = || exporter.log();
    let rejected = json!(format!("rejected:{trace}"));
    eventually("marked rejected", &log, || {
        let run = world.api.get("taskruns", "team-r", "lint-run-a")?;
        (run["metadata"]["annotations"][EXPORTED] == rejected).then_some(())
    })
    .await;
    assert!(
        !world.holds("taskruns", "lint-run-a"),
        "released with the mark"
    );
    // One attempt per try (the client does not retry a 400 in the slot), two tries.
    assert_eq!(world.receiver.refused(), 2);
    assert_eq!(
        mark_of(&world.patches(), "taskruns", "lint-run-a").len(),
        1,
        "one mark-and-release patch"
    );
    let skipped =
        r#"lightstep_tekton_exporter_runs_skipped_total{kind="taskrun",reason="rejected"}"#;
    eventually("counted", &log, || {
        (exporter.metric(skipped) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(
        exporter.metric(r#"lightstep_tekton_exporter_export_errors_total{cause="rejected"}"#),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_destination_does_not_starve_another_namespace() {
    let world = World::start("isolation").await;
    // A TracingPolicy's endpoint that hangs (a black-holed address), for namespace team-x.
    let broken = Receiver::start().await;
    broken.stall(true);
    world.api.put(
        "namespaces",
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": "team-x", "labels": {
                   "kubernetes.io/metadata.name": "team-x",
                   "lightstep-tekton.io/inject": "enabled", "team": "broken"}}}),
    );
    world.api.put(
        "tracingpolicies",
        json!({"apiVersion": "lightstep-tekton.io/v1alpha1", "kind": "TracingPolicy",
               "metadata": {"name": "broken", "generation": 1, "uid": "tp-broken"},
               "spec": {"namespaceSelector": {"matchLabels": {"team": "broken"}},
                        "priority": 10, "profile": "otlp", "token": null,
                        "exporter": {"endpoint": broken.endpoint(), "protocol": "http/protobuf"},
                        "runSpans": {"enabled": true}}}),
    );
    for i in 0..3 {
        world.add_run("lint-run.json", "team-x", &format!("x{i}"));
    }
    let exporter = world.exporter(
        "exporter-0",
        &["--concurrency=2", "--watch-tracing-policies"],
    );
    let log = || exporter.log();
    eventually("the broken destination probed", &log, || {
        (broken.stalled() >= 1).then_some(())
    })
    .await;
    let good: Vec<String> = (0..3)
        .map(|i| world.add_run("lint-run.json", "team-r", &format!("r{i}")))
        .collect();
    eventually("the good namespace's runs exported", &log, || {
        let traces = world.traces();
        good.iter().all(|t| traces.contains_key(t)).then_some(())
    })
    .await;
    assert_eq!(
        broken.stalled(),
        1,
        "one probe of the broken destination at a time"
    );
    assert!(broken.received().is_empty());
    broken.stall(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_backend_drops_from_an_accepted_request_are_counted() {
    let world = World::start("partial").await;
    world.receiver.drop_spans(2);
    let trace = world.add_run("lint-run.json", "team-r", "a");
    let exporter = world.exporter("exporter-0", &[]);
    let log = || exporter.log();
    eventually("exported", &log, || {
        world.traces().contains_key(&trace).then_some(())
    })
    .await;
    eventually("counted", &log, || {
        (exporter.metric("lightstep_tekton_exporter_spans_rejected_total") == Some(2.0))
            .then_some(())
    })
    .await;
    assert!(exporter.log().contains("partial success"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_otlp_ca_file_stops_the_start_naming_the_flag() {
    let world = World::start("ca").await;
    let missing = world.dir.0.join("no-such-ca.pem");
    let mut exporter = world.exporter(
        "exporter-0",
        &[&format!("--otlp-ca-file={}", missing.display())],
    );
    let path = exporter.log.clone();
    let log = move || std::fs::read_to_string(&path).unwrap_or_default();
    let status = eventually("exited", &log, || exporter.child.try_wait().unwrap()).await;
    assert!(!status.success());
    assert!(
        exporter.log().contains("--otlp-ca-file"),
        "{}",
        exporter.log()
    );
}
