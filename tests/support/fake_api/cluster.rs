//! A stateful stand-in API server: objects in memory with resource versions, lists, watches
//! that stream every later change, merge patches, and conditional create and replace (what
//! leader election needs), over plain HTTP on 127.0.0.1. A process pointed at it with a
//! kubeconfig ([`FakeCluster::kubeconfig`]) lists, watches and writes as against a real one;
//! the test changes the cluster with [`FakeCluster::put`] and reads every request it got.
//!
//! Deletion follows the API server's finalizer rules: deleting an object that has
//! `metadata.finalizers` only sets `metadata.deletionTimestamp` (a MODIFIED event); the object
//! goes (a DELETED event) once a write leaves it with no finalizer; a write that adds a finalizer
//! to an object being deleted is refused (422). Patches are JSON merge patches, or JSON Patches
//! (`application/json-patch+json`, `test` operations included: a failed one is a 422, and a
//! `test` of `null` passes on a missing member, as the API server's does); a
//! `metadata.uid` or `metadata.resourceVersion` in a patch or replace that differs from the
//! stored one is a 409 Conflict, as the API server treats them as preconditions.
//!
//! Collections are named by their plural (`pipelineruns`, `namespaces`, `leases`); paths are
//! Kubernetes' (`/api/v1/namespaces`, `/apis/<group>/<version>[/namespaces/<ns>]/<plural>[/<name>]`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One request as the stand-in saw it, and when.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub at: Instant,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    }
}

/// (collection, namespace, name): namespace empty for cluster-scoped objects.
type Key = (String, String, String);

struct State {
    version: u64,
    objects: BTreeMap<Key, Value>,
    seen: Vec<Seen>,
}

/// The stand-in; cheap to clone.
#[derive(Clone)]
pub struct FakeCluster {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// (collection, watch event) for every change.
    changes: broadcast::Sender<(String, Value)>,
}

/// Watch events buffered per watcher: a burst of a benchmark's 60,000 objects fits.
const WATCH_BUFFER: usize = 1 << 17;

impl FakeCluster {
    /// Serves on 127.0.0.1 until the runtime ends.
    pub async fn start() -> FakeCluster {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        let cluster = FakeCluster {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(State {
                version: 100,
                objects: BTreeMap::new(),
                seen: Vec::new(),
            })),
            changes,
        };
        let handler = cluster.clone();
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let cluster = handler.clone();
                async move { cluster.handle(method, uri, &headers, body) }
            },
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        cluster
    }

    /// Writes a kubeconfig for the stand-in at `path`.
    pub fn kubeconfig(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
                 current-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Creates or replaces `object` in `collection` (its namespace and name from its
    /// metadata), as a controller's write would; watchers hear of it.
    pub fn put(&self, collection: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        let key = key_of(collection, &object);
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        let kind = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        let _ = self.changes.send((
            collection.to_owned(),
            json!({"type": kind, "object": object}),
        ));
    }

    /// Many objects at once (one lock), for a burst.
    pub fn put_all(&self, collection: &str, objects: impl IntoIterator<Item = Value>) {
        for object in objects {
            self.put(collection, object);
        }
    }

    /// Deletes an object as the API server does: one with finalizers is only marked with a
    /// `deletionTimestamp` (and goes once a write removes the last finalizer); one without is
    /// removed. Watchers hear of either. Whether the object existed.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) -> bool {
        let Some(mut object) = self.get(collection, namespace, name) else {
            return false;
        };
        if has_finalizers(&object) {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                self.put(collection, object);
            }
        } else {
            self.remove(collection, namespace, name);
        }
        true
    }

    /// Removes an object whatever its finalizers say; watchers hear of it.
    fn remove(&self, collection: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        if let Some(mut object) = state.objects.remove(&key) {
            state.version += 1;
            object["metadata"]["resourceVersion"] = json!(state.version.to_string());
            let _ = self.changes.send((
                collection.to_owned(),
                json!({"type": "DELETED", "object": object}),
            ));
        }
    }

    /// Stores a client's write of `object` over `current`, with the API server's rules for
    /// preconditions and finalizers: a response for the client.
    fn write(&self, collection: &str, current: &Value, mut object: Value) -> Response {
        for field in ["uid", "resourceVersion"] {
            let asked = &object["metadata"][field];
            if !asked.is_null() && *asked != current["metadata"][field] {
                return reply(409, status(409, "Conflict"));
            }
        }
        // Server-set fields a client cannot change.
        for field in ["uid", "creationTimestamp", "deletionTimestamp"] {
            let stored = current["metadata"][field].clone();
            match stored {
                Value::Null => {
                    if let Some(m) = object["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
                stored => object["metadata"][field] = stored,
            }
        }
        let deleting = !current["metadata"]["deletionTimestamp"].is_null();
        if deleting {
            let before = finalizers(current);
            if finalizers(&object).iter().any(|f| !before.contains(f)) {
                return reply(422, status(422, "Invalid"));
            }
        }
        let key = key_of(collection, &object);
        if deleting && !has_finalizers(&object) {
            self.remove(collection, &key.1, &key.2);
            let mut gone = object;
            gone["metadata"]["resourceVersion"] =
                json!(self.state.lock().unwrap().version.to_string());
            return reply(200, gone);
        }
        self.put(collection, object);
        reply(200, self.get(&key.0, &key.1, &key.2).unwrap())
    }

    fn handle(&self, method: Method, uri: Uri, headers: &HeaderMap, body: Bytes) -> Response {
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or_default().to_owned();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let seen = Seen {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
            at: Instant::now(),
        };
        let watching = seen.is_watch();
        self.state.lock().unwrap().seen.push(seen);
        let Some(target) = Target::parse(&path) else {
            return reply(404, status(404, "NotFound"));
        };
        match (method.as_str(), &target.name) {
            ("GET", None) if watching => self.watch(&target, &query),
            ("GET", None) => self.list(&target),
            ("GET", Some(name)) => match self.get(&target.collection, &target.namespace, name) {
                Some(object) => reply(200, object),
                None => reply(404, status(404, "NotFound")),
            },
            ("POST", None) => self.create(&target, body),
            ("PUT", Some(_)) => self.replace(&target, body),
            ("PATCH", Some(name)) => {
                let json_patch = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json-patch+json"));
                self.patch(&target, name, &body, json_patch)
            }
            ("DELETE", Some(name)) => {
                match self.delete(&target.collection, &target.namespace, name) {
                    true => reply(200, status(200, "Success")),
                    false => reply(404, status(404, "NotFound")),
                }
            }
            _ => reply(405, status(405, "MethodNotAllowed")),
        }
    }

    fn list(&self, target: &Target) -> Response {
        let state = self.state.lock().unwrap();
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((c, ns, _), _)| {
                *c == target.collection && (target.namespace.is_empty() || *ns == target.namespace)
            })
            .map(|(_, o)| o.clone())
            .collect();
        reply(
            200,
            json!({"kind": "List", "apiVersion": "v1",
                   "metadata": {"resourceVersion": state.version.to_string()}, "items": items}),
        )
    }

    /// Every change after the asked resource version, then every later one, as JSON lines.
    fn watch(&self, target: &Target, query: &str) -> Response {
        let since: u64 = query
            .split('&')
            .find_map(|p| p.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut changes = self.changes.subscribe();
        let collection = target.collection.clone();
        let namespace = target.namespace.clone();
        let matches = move |c: &str, event: &Value| {
            c == collection
                && (namespace.is_empty() || event["object"]["metadata"]["namespace"] == namespace)
        };
        let backlog: Vec<Value> = {
            let state = self.state.lock().unwrap();
            state
                .objects
                .iter()
                .filter(|((c, ..), o)| version(o) > since && matches(c, &json!({"object": o})))
                .map(|(_, o)| json!({"type": "MODIFIED", "object": o}))
                .collect()
        };
        let mut last = since;
        let stream = async_stream(move |send| async move {
            for event in backlog {
                last = last.max(version(&event["object"]));
                if !send(event) {
                    return;
                }
            }
            loop {
                match changes.recv().await {
                    Ok((c, event)) => {
                        if version(&event["object"]) <= last || !matches(&c, &event) {
                            continue;
                        }
                        last = version(&event["object"]);
                        if !send(event) {
                            return;
                        }
                    }
                    // Fell behind: end the watch, as an API server does; the client relists.
                    Err(_) => return,
                }
            }
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap()
    }

    fn create(&self, target: &Target, mut object: Value) -> Response {
        object["metadata"]["namespace"] = json!(target.namespace);
        let key = key_of(&target.collection, &object);
        if self.state.lock().unwrap().objects.contains_key(&key) {
            return reply(409, status(409, "AlreadyExists"));
        }
        self.put(&target.collection, object);
        reply(201, self.get(&key.0, &key.1, &key.2).unwrap())
    }

    /// A replace is conditional on the resource version it carries.
    fn replace(&self, target: &Target, object: Value) -> Response {
        let name = target.name.clone().unwrap_or_default();
        let Some(current) = self.get(&target.collection, &target.namespace, &name) else {
            return reply(404, status(404, "NotFound"));
        };
        if current["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
            return reply(409, status(409, "Conflict"));
        }
        self.write(&target.collection, &current, object)
    }

    fn patch(&self, target: &Target, name: &str, patch: &Value, json_patch: bool) -> Response {
        let Some(current) = self.get(&target.collection, &target.namespace, name) else {
            return reply(404, status(404, "NotFound"));
        };
        let mut object = current.clone();
        if json_patch {
            let Ok(mut operations) = serde_json::from_value::<json_patch::Patch>(patch.clone())
            else {
                return reply(400, status(400, "BadRequest"));
            };
            // The API server's JSON Patch passes a `test` of `null` on a missing member (how a
            // client says "none yet"); the crate's wants the member present.
            operations.0.retain(|op| match op {
                json_patch::PatchOperation::Test(t) if t.value.is_null() => {
                    !object.pointer(t.path.as_str()).is_none_or(Value::is_null)
                }
                _ => true,
            });
            if json_patch::patch(&mut object, &operations).is_err() {
                return reply(422, status(422, "Invalid"));
            }
            // A JSON Patch's preconditions are its `test` operations, not the fields it writes.
            for field in ["uid", "resourceVersion"] {
                object["metadata"][field] = current["metadata"][field].clone();
            }
        } else {
            json_patch::merge(&mut object, patch);
        }
        self.write(&target.collection, &current, object)
    }
}

fn finalizers(object: &Value) -> Vec<String> {
    object["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn has_finalizers(object: &Value) -> bool {
    !finalizers(object).is_empty()
}

/// Now, as the API server writes timestamps (RFC 3339, seconds, UTC).
fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    k8s_openapi::jiff::Timestamp::from_second(now as i64)
        .unwrap()
        .to_string()
}

/// Where a request points.
struct Target {
    collection: String,
    namespace: String,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let rest = match parts.as_slice() {
            ["api", "v1", rest @ ..] => rest,
            ["apis", _group, _version, rest @ ..] => rest,
            _ => return None,
        };
        let (namespace, rest) = match rest {
            // `/api/v1/namespaces` and `/api/v1/namespaces/<name>` are the namespaces themselves.
            ["namespaces", ns, plural, rest @ ..] => {
                (ns.to_string(), [&[*plural][..], rest].concat())
            }
            other => (String::new(), other.to_vec()),
        };
        match rest.as_slice() {
            [plural] => Some(Target {
                collection: plural.to_string(),
                namespace,
                name: None,
            }),
            [plural, name] => Some(Target {
                collection: plural.to_string(),
                namespace,
                name: Some(name.to_string()),
            }),
            _ => None,
        }
    }
}

fn key_of(collection: &str, object: &Value) -> Key {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        collection.to_owned(),
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

fn version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn reply(code: u16, body: Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// A `Status` body as the API server sends with an error.
pub fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "code": code, "reason": reason, "message": reason})
}

/// A body stream fed by `produce`, which gets a `send` that is false once the client is gone.
fn async_stream<F, Fut>(
    produce: F,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static
where
    F: FnOnce(Box<dyn Fn(Value) -> bool + Send + Sync>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let send = Box::new(move |event: Value| {
        let mut line = serde_json::to_vec(&event).unwrap();
        line.push(b'\n');
        tx.send(Bytes::from(line)).is_ok()
    });
    tokio::spawn(produce(send));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok(bytes), rx))
    })
}
