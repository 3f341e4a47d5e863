//! `export` against a stand-in API server and an OTLP receiver: the real binary, pointed at the
//! stand-in by a kubeconfig, lists and watches runs and namespaces, exports each finished run in
//! an opted-in namespace once, marks it only after the receiver answered, survives a failing
//! receiver and a restart without losing or repeating a run, hands over between two replicas
//! through its Lease, and asks the API server for nothing the install's exporter RBAC does not
//! grant. Every wait polls against a generous deadline; nothing is timed.

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
const TRACE_URL: &str = "lightstep-tekton.io/trace-url";

/// The stand-in, the receiver, and the files an exporter is started with.
struct World {
    api: FakeCluster,
    receiver: Receiver,
    dir: TempDir,
}

impl World {
    async fn start(tag: &str) -> World {
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
                 runSpans:\n  enabled: true\n  traceUrl: \"https://traces.example/trace?id={{traceId}}\"\n",
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

/// The PATCH that marked a run, if any.
fn mark_of<'a>(patches: &'a [Seen], plural: &str, name: &str) -> Vec<&'a Seen> {
    patches
        .iter()
        .filter(|p| p.path.ends_with(&format!("/{plural}/{name}")))
        .collect()
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
        // A merge patch of the two annotations, nothing else.
        assert_eq!(
            patch.body,
            json!({"metadata": {"annotations": {
                EXPORTED: trace,
                TRACE_URL: format!("https://traces.example/trace?id={trace}"),
            }}}),
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
    assert!(mark_of(&world.patches(), "pipelineruns", "ship-run-fail-x").is_empty());
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
        world.patches().is_empty(),
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
        world.patches().is_empty(),
        "marked while the receiver refused"
    );
    world.receiver.fail(false);
    eventually("all marked", &log, || {
        (world.patches().len() == 3).then_some(())
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
