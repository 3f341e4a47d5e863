//! The watch loop that fills the run caches (and the namespace and TracingPolicy caches), and
//! the exporter's writer: the JSON Patches of [`super::patch`].

use super::*;

/// The write side of one kind's cache: a relist is buffered until it is complete, as a
/// reflector does, so the cache never shows half a list.
pub(super) struct Writer<L> {
    buffer: Option<HashMap<(String, String), Stored<L>>>,
}

impl<L: Lean + Serialize + DeserializeOwned> Writer<L> {
    fn new() -> Self {
        Writer { buffer: None }
    }

    /// Applies one event; what the exporter should hear of it. A PipelineRun that became
    /// marked made stubs of its TaskRuns our finalizer holds: those changed too.
    fn apply(&mut self, runs: &Runs, event: Event<Watched<L::Status>>) -> Vec<RunEvent> {
        let kind = L::Status::KIND;
        match event {
            Event::Init => {
                self.buffer = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(w) => {
                if let Some(run) = L::from_watched(w).compact(runs) {
                    self.buffer
                        .get_or_insert_with(HashMap::new)
                        .insert(map_key(run.metadata()), Stored::new(run));
                }
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.buffer.take().unwrap_or_default();
                *write(L::map(runs)) = listed;
                L::synced(runs).store(true, Ordering::SeqCst);
                vec![RunEvent::Relisted(kind)]
            }
            Event::Apply(w) => {
                let run = L::from_watched(w);
                let key = map_key(run.metadata());
                let children = run.children();
                let Some(run) = run.compact(runs) else {
                    write(L::map(runs)).remove(&key);
                    return Vec::new();
                };
                let is_marked = marked(run.metadata());
                write(L::map(runs)).insert(key.clone(), Stored::new(run));
                let mut events = vec![RunEvent::Changed(run_key(kind, key.clone()))];
                if is_marked {
                    let task_runs = read(&runs.task_runs);
                    events.extend(
                        children
                            .into_iter()
                            .map(|name| (key.0.clone(), name))
                            .filter(|k| task_runs.contains_key(k))
                            .map(|k| RunEvent::Changed(run_key(RunKind::TaskRun, k))),
                    );
                }
                events
            }
            Event::Delete(w) => {
                // The event's object is the run's last state: the write that removed the last
                // finalizer (our mark, say) may have reached the cache only through it.
                let run = L::from_watched(w);
                let key = map_key(run.metadata());
                write(L::map(runs)).remove(&key);
                vec![RunEvent::Deleted(L::cached(Arc::new(run)))]
            }
        }
    }
}

/// The exporter's API connection: its caches (runs, namespaces, and TracingPolicies when asked
/// for) and its one write.
pub struct RunWatch {
    client: Client,
    caches: Caches,
    runs: Arc<Runs>,
    metrics: ClusterMetrics,
    watch_policies: bool,
}

impl RunWatch {
    /// Configures the client from the in-cluster service account, or KUBECONFIG outside a
    /// cluster, and registers `watch_errors_total` in `registry`. Nothing is requested yet.
    pub async fn connect(
        watch_policies: bool,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<RunWatch, ClusterError> {
        let client = Client::try_default()
            .await
            .map_err(ClusterError::ConnectRuns)?;
        let mut resources = vec![
            WatchedResource::PipelineRuns,
            WatchedResource::TaskRuns,
            WatchedResource::Namespaces,
        ];
        if watch_policies {
            resources.push(WatchedResource::TracingPolicies);
        }
        Ok(RunWatch {
            client,
            caches: Caches::new(),
            runs: Arc::new(Runs::default()),
            metrics: ClusterMetrics::register_watches(registry, &resources),
            watch_policies,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Namespaces and TracingPolicies, for selection.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.caches.cluster()
    }

    pub fn runs(&self) -> Arc<Runs> {
        self.runs.clone()
    }

    /// The annotation writer.
    /// The writer on runs, at most `qps` writes a second (0: no limit).
    pub fn marker(&self, qps: f64) -> Marker {
        Marker {
            client: self.client.clone(),
            pace: super::pace::Pace::new(qps),
        }
    }

    /// Watches until the task is dropped (every stream retries forever with backoff), sending
    /// what changed to `events`; waits for the exporter when it is behind (the channel is
    /// bounded), which slows the watch rather than growing memory.
    pub async fn run(self, events: mpsc::Sender<RunEvent>) {
        let RunWatch {
            client,
            mut caches,
            runs,
            metrics,
            watch_policies,
        } = self;
        let config = watcher::Config::default();
        let pipeline_runs = watcher::watcher(
            Api::<Watched<PipelineRunStatus>>::all(client.clone()),
            config.clone(),
        )
        .default_backoff();
        let task_runs = watcher::watcher(
            Api::<Watched<TaskRunStatus>>::all(client.clone()),
            config.clone(),
        )
        .default_backoff();
        let mut pipeline_runs = pin!(pipeline_runs);
        let mut task_runs = pin!(task_runs);
        if !watch_policies {
            // Nothing to list: the file policy applies everywhere, from the start.
            caches.apply_policy_event(Event::Init);
            caches.apply_policy_event(Event::InitDone);
        }
        let others = super::super::watch_caches(client, caches, metrics.clone(), watch_policies);
        let mut others = pin!(others);
        let (mut prs, mut trs) = (Writer::<PipelineRun>::new(), Writer::<TaskRun>::new());
        loop {
            let event = tokio::select! {
                () = &mut others => break,
                Some(event) = pipeline_runs.next() => match event {
                    Ok(event) => prs.apply(&runs, event),
                    Err(e) => {
                        metrics.watch_error(WatchedResource::PipelineRuns);
                        tracing::warn!(error = %e, "watching PipelineRuns failed; retrying with backoff");
                        Vec::new()
                    }
                },
                Some(event) = task_runs.next() => match event {
                    Ok(event) => trs.apply(&runs, event),
                    Err(e) => {
                        metrics.watch_error(WatchedResource::TaskRuns);
                        tracing::warn!(error = %e, "watching TaskRuns failed; retrying with backoff");
                        Vec::new()
                    }
                },
                else => break,
            };
            for event in event {
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Why a write on a run did not land.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The run is gone.
    #[error("{0}: not found")]
    Gone(RunKey),
    /// A precondition failed (the run changed since the cache saw it, or is another run under
    /// the same name): read the cache again and try later.
    #[error("{0}: changed since it was cached")]
    Changed(RunKey),
    /// The API server answered 429: every write pauses, this one is retried later.
    #[error("{0}: the API server asked to slow down (429)")]
    Throttled(RunKey),
    #[error("{key}: patching it failed: {source}")]
    Api { key: RunKey, source: kube::Error },
}

/// Writes on runs: the JSON Patches of [`super::patch`], nothing else.
#[derive(Clone)]
pub struct Marker {
    client: Client,
    pace: super::pace::Pace,
}

impl Marker {
    /// Sends `operations` as one JSON Patch of the run.
    pub async fn write(
        &self,
        key: &RunKey,
        operations: Vec<json_patch::PatchOperation>,
    ) -> Result<(), MarkError> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("tekton.dev", "v1", key.kind.kind()),
            key.kind.plural(),
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &resource);
        let patch: Patch<()> = Patch::Json(json_patch::Patch(operations));
        self.pace.turn().await;
        match api.patch(&key.name, &PatchParams::default(), &patch).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(MarkError::Gone(key.clone())),
            Err(kube::Error::Api(e)) if e.code == 429 => {
                self.pace.throttled();
                Err(MarkError::Throttled(key.clone()))
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => {
                Err(MarkError::Changed(key.clone()))
            }
            Err(source) => Err(MarkError::Api {
                key: key.clone(),
                source,
            }),
        }
    }
}
