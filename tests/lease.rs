//! Leader election against a stand-in API server that holds one Lease and enforces
//! `resourceVersion` as the real one does (a PUT naming an old version gets 409, a POST of an
//! existing Lease gets 409): exactly one candidate leads, a standby takes over once the leader
//! stops renewing and the Lease expires, a leader that shuts down releases the Lease, and a
//! candidate that loses a race for the Lease (409) does not lead.

mod support {
    pub mod fake_api;
    pub mod poll;
}

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use lightstep_tekton_webhook::cluster::{LeaderElection, LeaseConfig};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use support::fake_api::{self, Request};
use support::poll::eventually;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const NAMESPACE: &str = "tracing";
const LEASE: &str = "webhook";
const COLLECTION: &str = "/apis/coordination.k8s.io/v1/namespaces/tracing/leases";

/// The one Lease the stand-in holds, its version, and the conflicts it answered.
#[derive(Default)]
struct LeaseStore {
    lease: Mutex<Option<Value>>,
    version: AtomicUsize,
    conflicts: AtomicUsize,
}

impl LeaseStore {
    fn handle(&self, request: &Request) -> (u16, Value) {
        let item = format!("{COLLECTION}/{LEASE}");
        let mut lease = self.lease.lock().unwrap();
        match (&request.method, request.path.as_str()) {
            (&Method::GET, p) if p == item => match &*lease {
                Some(l) => (200, l.clone()),
                None => fake_api::status(404, "NotFound"),
            },
            (&Method::POST, COLLECTION) if lease.is_some() => {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
                fake_api::status(409, "AlreadyExists")
            }
            (&Method::POST, COLLECTION) => {
                *lease = Some(self.stored(request.body.clone()));
                (201, lease.clone().unwrap())
            }
            (&Method::PUT, p) if p == item => {
                let current = lease
                    .as_ref()
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                if current != Some(request.body["metadata"]["resourceVersion"].clone()) {
                    self.conflicts.fetch_add(1, Ordering::SeqCst);
                    return fake_api::status(409, "Conflict");
                }
                *lease = Some(self.stored(request.body.clone()));
                (200, lease.clone().unwrap())
            }
            _ => fake_api::status(404, "NotFound"),
        }
    }

    /// The object as written, with a new resourceVersion.
    fn stored(&self, mut object: Value) -> Value {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        object["apiVersion"] = json!("coordination.k8s.io/v1");
        object["kind"] = json!("Lease");
        object
    }

    fn holder(&self) -> Option<String> {
        let lease = self.lease.lock().unwrap();
        lease.as_ref()?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }
}

/// Short timings, in the same proportions as the defaults (the duration is whole seconds).
fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_secs(2),
        renew_interval: Duration::from_millis(300),
        renew_deadline: Duration::from_millis(1300),
        retry_interval: Duration::from_millis(150),
        ..LeaseConfig::new(LEASE, NAMESPACE, identity)
    }
}

/// A running candidate: its leadership, the way to stop it cleanly, and its task.
struct Candidate {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn campaign(client: &kube::Client, identity: &str) -> Candidate {
    let election = LeaderElection::new(client.clone(), config(identity), &mut Registry::default());
    let leading = election.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(election.run(async move {
        let _ = stopped.await;
    }));
    Candidate {
        leading,
        stop: Some(stop),
        task,
    }
}

/// Whether two candidates ever both said they lead, watched from now on. A candidate whose task
/// ended (crashed) leads no more, whatever it last said.
fn watch_for_two_leaders(a: watch::Receiver<bool>, b: watch::Receiver<bool>) -> Arc<AtomicUsize> {
    let overlaps = Arc::new(AtomicUsize::new(0));
    let seen = overlaps.clone();
    tokio::spawn(async move {
        let (mut a, mut b) = (a, b);
        let (mut a_alive, mut b_alive) = (true, true);
        loop {
            if a_alive && b_alive && *a.borrow_and_update() && *b.borrow_and_update() {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            tokio::select! {
                r = a.changed(), if a_alive => a_alive = r.is_ok(),
                r = b.changed(), if b_alive => b_alive = r.is_ok(),
                else => return,
            }
        }
    });
    overlaps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leads_the_other_takes_over_after_expiry_and_a_clean_stop_releases() {
    let store = Arc::new(LeaseStore::default());
    let s = store.clone();
    let (_, client) = fake_api::start(Arc::new(move |r: &Request| s.handle(r))).await;
    let mut a = campaign(&client, "replica-a");
    let mut b = campaign(&client, "replica-b");
    let overlaps = watch_for_two_leaders(a.leading.clone(), b.leading.clone());

    eventually("one leader", async || {
        *a.leading.borrow() || *b.leading.borrow()
    })
    .await;
    // Give the standby a few tries at a Lease that is held: it must stay standby.
    let first_holder = store.holder().unwrap();
    let version = store.version.load(Ordering::SeqCst);
    eventually("the leader renews a few times", async || {
        store.version.load(Ordering::SeqCst) >= version + 3
    })
    .await;
    assert_eq!(store.holder().unwrap(), first_holder);
    let (leader, standby) = match first_holder.as_str() {
        "replica-a" => (&mut a, &mut b),
        _ => (&mut b, &mut a),
    };
    assert!(*leader.leading.borrow());
    assert!(!*standby.leading.borrow(), "two leaders");

    // The leader dies without releasing: the standby takes over once the Lease expires.
    leader.task.abort();
    eventually("the standby takes over", async || *standby.leading.borrow()).await;
    let second_holder = store.holder().unwrap();
    assert_ne!(second_holder, first_holder);
    let lease = store.lease.lock().unwrap().clone().unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2);

    // A clean stop: leadership off first, then the Lease released.
    let _ = standby.stop.take().unwrap().send(());
    (&mut standby.task).await.unwrap();
    assert!(!*standby.leading.borrow());
    assert_eq!(store.holder(), None, "the Lease was not released");
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two leaders at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_loses_a_race_for_the_lease_does_not_lead() {
    let store = Arc::new(LeaseStore::default());
    // A Lease left by a replica long gone: expired, so both candidates may take it.
    *store.lease.lock().unwrap() = Some(store.stored(json!({
        "metadata": {"name": LEASE, "namespace": NAMESPACE},
        "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 2,
                 "renewTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 4},
    })));
    // The first PUT loses a race: just before it lands, the *other* candidate's write does (as
    // if its PUT had arrived a moment earlier), so the first gets 409 on a version it just read.
    let raced = Arc::new(AtomicBool::new(false));
    let s = store.clone();
    let handler = move |r: &Request| {
        if r.method == Method::PUT && !raced.swap(true, Ordering::SeqCst) {
            let other = match r.body["spec"]["holderIdentity"].as_str() {
                Some("replica-a") => "replica-b",
                _ => "replica-a",
            };
            let mut lease = s.lease.lock().unwrap();
            let mut taken = lease.clone().unwrap();
            taken["spec"]["holderIdentity"] = json!(other);
            taken["spec"]["renewTime"] = r.body["spec"]["renewTime"].clone();
            taken["spec"]["leaseTransitions"] = json!(5);
            *lease = Some(s.stored(taken));
        }
        s.handle(r)
    };
    let (_, client) = fake_api::start(Arc::new(handler)).await;
    let a = campaign(&client, "replica-a");
    let b = campaign(&client, "replica-b");
    let overlaps = watch_for_two_leaders(a.leading.clone(), b.leading.clone());

    eventually("a conflict", async || {
        store.conflicts.load(Ordering::SeqCst) >= 1
    })
    .await;
    eventually("one leader", async || {
        *a.leading.borrow() || *b.leading.borrow()
    })
    .await;
    let version = store.version.load(Ordering::SeqCst);
    eventually("the leader renews a few times", async || {
        store.version.load(Ordering::SeqCst) >= version + 3
    })
    .await;
    assert!(*a.leading.borrow() != *b.leading.borrow(), "two leaders");
    let lease = store.lease.lock().unwrap().clone().unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 5, "taken once: {lease}");
    let holder = store.holder().unwrap();
    let leader = if *a.leading.borrow() {
        "replica-a"
    } else {
        "replica-b"
    };
    assert_eq!(
        holder, leader,
        "the candidate that leads is not the one holding the Lease"
    );
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two leaders at once");
    a.task.abort();
    b.task.abort();
}
