//! `serve --watch-tracing-policies` against a stand-in API server: the binary lists and watches
//! TracingPolicies and namespaces through kube's client, turns ready only once both lists are
//! in, decides from what it saw, writes each policy's status, and asks the API server for
//! nothing the install's ClusterRole and Role do not grant.
//!
//! The stand-in speaks just enough of the Kubernetes API over plain HTTP (a kubeconfig points
//! the binary at it): list and watch for the two resources, PUT on the status subresource, and
//! GET, POST and PUT of one Lease (the election of the status writer).
//! Its watches stay open and silent, as a quiet cluster's do.

mod support {
    pub mod http;
    pub mod poll;
    pub mod rbac;
    pub mod review;
    pub mod tmp;
}

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::rbac::{granted, install_rules};

use lightstep_tekton_webhook::cluster::WEBHOOK_LEASE;
use serde_json::{Value, json};
use support::http::{client_config, request};
use support::poll::eventually_blocking as eventually;
use support::review::*;
use support::tmp::{TempDir, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_lightstep-tekton-webhook");
const POLICIES: &str = "/apis/lightstep-tekton.io/v1alpha1/tracingpolicies";
const NAMESPACES: &str = "/api/v1/namespaces";
/// Where the install's namespace keeps its Leases (the webhook's elects its status writer).
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/lightstep-tekton/leases";

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    body: Vec<u8>,
}

/// The stand-in API server: answers lists once `open` is set, keeps watches open.
struct FakeApi {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeApi {
    fn start(policies: Vec<Value>, namespaces: Vec<Value>) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (o, s) = (open.clone(), seen.clone());
        let lists = Arc::new((policies, namespaces));
        let lease = Arc::new(Mutex::new(None));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (o, s, lists, lease) = (o.clone(), s.clone(), lists.clone(), lease.clone());
                std::thread::spawn(move || serve_connection(stream, &o, &s, &lists, &lease));
            }
        });
        FakeApi { addr, open, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_connection(
    stream: TcpStream,
    open: &AtomicBool,
    seen: &Mutex<Vec<Seen>>,
    lists: &(Vec<Value>, Vec<Value>),
    lease: &Mutex<Option<Value>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let request = Seen {
            method: method.clone(),
            path: path.to_string(),
            query: query.to_string(),
            body: body.clone(),
        };
        seen.lock().unwrap().push(request);
        let watching = query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
        if method == "GET" && (path == POLICIES || path == NAMESPACES) {
            while !open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if watching {
                // A quiet cluster: the watch stays open and sends nothing.
                let _ = writer.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                std::thread::sleep(Duration::from_secs(600));
                return;
            }
            let list = if path == POLICIES {
                json!({"apiVersion": "lightstep-tekton.io/v1alpha1", "kind": "TracingPolicyList",
                       "metadata": {"resourceVersion": "10"}, "items": lists.0})
            } else {
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                       "metadata": {"resourceVersion": "10"}, "items": lists.1})
            };
            respond(&mut writer, 200, &serde_json::to_vec(&list).unwrap());
        } else if method == "PUT" && path.starts_with(POLICIES) && path.ends_with("/status") {
            respond(&mut writer, 200, &body);
        } else if path.starts_with(LEASES) {
            let (code, reply) = lease_request(lease, &method, &body);
            respond(&mut writer, code, &serde_json::to_vec(&reply).unwrap());
        } else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "code": 404, "reason": "NotFound", "message": "not here"});
            respond(&mut writer, 404, &serde_json::to_vec(&status).unwrap());
        }
    }
}

/// GET, POST and PUT of the one Lease, its resourceVersion enforced as the API server does.
fn lease_request(lease: &Mutex<Option<Value>>, method: &str, body: &[u8]) -> (u16, Value) {
    let mut lease = lease.lock().unwrap();
    let version = lease
        .as_ref()
        .map(|l| l["metadata"]["resourceVersion"].clone());
    let status = |code: u16, reason: &str| {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "code": code, "reason": reason, "message": reason})
    };
    let mut object: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let conflict = match method {
        "GET" => {
            return lease
                .clone()
                .map_or((404, status(404, "NotFound")), |l| (200, l));
        }
        "POST" => version.is_some(),
        "PUT" => {
            version.is_none() || version.as_ref() != Some(&object["metadata"]["resourceVersion"])
        }
        _ => return (405, status(405, "MethodNotAllowed")),
    };
    if conflict {
        return (409, status(409, "Conflict"));
    }
    let next = version
        .and_then(|v| v.as_str()?.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    object["metadata"]["resourceVersion"] = json!(next.to_string());
    *lease = Some(object.clone());
    (if method == "POST" { 201 } else { 200 }, object)
}

fn respond(writer: &mut TcpStream, code: u16, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = writer.write_all(head.as_bytes());
    let _ = writer.write_all(body);
}

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn policy(name: &str, generation: i64, spec: Value) -> Value {
    json!({"apiVersion": "lightstep-tekton.io/v1alpha1", "kind": "TracingPolicy",
           "metadata": {"name": name, "generation": generation, "resourceVersion": "7",
                        "uid": format!("uid-{name}")},
           "spec": spec})
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut all: BTreeMap<&str, &str> = labels.iter().copied().collect();
    all.insert("kubernetes.io/metadata.name", name);
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": {"name": name, "labels": all}})
}

#[test]
fn serve_watches_decides_from_the_caches_writes_status_and_stays_within_its_rbac() {
    let api = FakeApi::start(
        vec![
            policy(
                "prod",
                3,
                json!({"priority": 10, "namespaceSelector": {"matchLabels": {"env": "prod"}},
                       "profile": "otlp", "exporter": {"endpoint": "http://collector.obs:4317"}}),
            ),
            policy("broken", 2, json!({"sampling": {"ratio": 5}})),
        ],
        vec![
            namespace(
                "ci-prod",
                &[("env", "prod"), ("lightstep-tekton.io/inject", "enabled")],
            ),
            namespace("ci-dev", &[("env", "dev")]),
        ],
    );
    let dir = TempDir::new("watch");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n",
            api.addr
        ),
    )
    .unwrap();
    let (listen, metrics) = (free_port(), free_port());
    let log_path = dir.0.join("serve.log");
    let served = Served(
        Command::new(BIN)
            .args(["serve", "--dev", "--watch-tracing-policies"])
            .arg(format!("--dev-dir={}", dir.0.join("certs").display()))
            .arg(format!("--listen={listen}"))
            .arg(format!("--metrics-listen={metrics}"))
            .env("KUBECONFIG", &kubeconfig)
            // As the Deployment's downward API sets them: the Lease's namespace and holder.
            .env("POD_NAMESPACE", "lightstep-tekton")
            .env("POD_NAME", "webhook-0")
            .env("RUST_LOG", "info")
            .env_remove("LIGHTSTEP_TEKTON_POLICY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ca_path = dir.0.join("certs/ca.crt");
    let ca = eventually("the dev CA", &log, || {
        std::fs::read_to_string(&ca_path).ok()
    });
    let config = client_config(&[&ca], None);
    let https = |method: &str, path: &str, body: &[u8]| {
        request(listen, Some((&config, "127.0.0.1")), method, path, body)
    };

    // Serving, but not ready: the lists have not been answered.
    let (status, body) = eventually("the listener", &log, || https("GET", "/readyz", b"").ok());
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(https("GET", "/readyz", b"").unwrap().0, 503);

    api.open.store(true, Ordering::SeqCst);
    eventually("ready", &log, || {
        (https("GET", "/readyz", b"").ok()?.0 == 200).then_some(())
    });

    // Decisions come from the caches: the TracingPolicy in ci-prod, the default in ci-dev.
    let object = fixture("tekton-taskrun-standalone.json")["request"]["object"].clone();
    let reads = || api.seen().iter().filter(|r| r.method == "GET").count();
    let reads_before = reads();
    for (ns, expected_prefix) in [("ci-prod", "prod@gen3/"), ("ci-dev", "lightstep-default@")] {
        let (status, body) = https("POST", "/mutate", &review_of("uid-w", ns, &object)).unwrap();
        assert_eq!(status, 200);
        let (_, patch) = check_reply(&body, "uid-w");
        let pod = validated_pod(&apply(&object, &patch));
        let marker = &pod.metadata.annotations.as_ref().unwrap()["lightstep-tekton.io/injected"];
        assert!(marker.starts_with(expected_prefix), "{ns}: {marker}");
    }
    assert_eq!(reads(), reads_before, "admission read from the API server");

    // Each policy's status is written: valid with its count, or invalid naming the field.
    let statuses = eventually("both statuses written", &log, || {
        let puts: BTreeMap<String, Value> = api
            .seen()
            .into_iter()
            .filter(|r| r.method == "PUT")
            .map(|r| (r.path.clone(), serde_json::from_slice(&r.body).unwrap()))
            .collect();
        (puts.len() == 2).then_some(puts)
    });
    let prod = &statuses[&format!("{POLICIES}/prod/status")];
    assert_eq!(
        prod["metadata"]["resourceVersion"], "7",
        "a conditional write"
    );
    assert_eq!(prod["kind"], "TracingPolicy");
    assert_eq!(prod["status"]["matchedNamespaces"], 1);
    assert_eq!(prod["status"]["conditions"][0]["status"], "True");
    assert_eq!(prod["status"]["conditions"][0]["observedGeneration"], 3);
    let broken = &statuses[&format!("{POLICIES}/broken/status")];
    assert_eq!(broken["status"]["conditions"][0]["status"], "False");
    assert!(
        broken["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("spec.sampling.ratio")
    );

    // Every call the server made is one the ClusterRole (or, for the Lease, the Role) grants.
    let seen = api.seen();
    let (cluster_role, role) = (
        install_rules("rbac.yaml", "ClusterRole"),
        install_rules("rbac.yaml", "Role"),
    );
    for r in &seen {
        let watch = r
            .query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
        let lease = format!("{LEASES}/{WEBHOOK_LEASE}");
        let (rules, group, resource, verb) = match (r.method.as_str(), r.path.as_str()) {
            ("GET", p) if p == lease => (&role, "coordination.k8s.io", "leases", "get"),
            ("PUT", p) if p == lease => (&role, "coordination.k8s.io", "leases", "update"),
            ("POST", LEASES) => (&role, "coordination.k8s.io", "leases", "create"),
            ("GET", NAMESPACES) => (
                &cluster_role,
                "",
                "namespaces",
                if watch { "watch" } else { "list" },
            ),
            ("GET", POLICIES) => (
                &cluster_role,
                "lightstep-tekton.io",
                "tracingpolicies",
                if watch { "watch" } else { "list" },
            ),
            ("PUT", p) if p.starts_with(POLICIES) && p.ends_with("/status") => (
                &cluster_role,
                "lightstep-tekton.io",
                "tracingpolicies/status",
                "update",
            ),
            other => panic!("unexpected API request {other:?}"),
        };
        assert!(
            granted(rules, group, resource, verb, WEBHOOK_LEASE),
            "{} {}?{} needs {verb} on {group}/{resource}, which rbac.yaml does not grant",
            r.method,
            r.path,
            r.query
        );
    }
    // Both watches were started (not only the lists).
    for path in [POLICIES, NAMESPACES] {
        assert!(
            seen.iter()
                .any(|r| r.path == path && r.query.contains("watch=")),
            "no watch on {path}"
        );
    }
    drop(served);
}
