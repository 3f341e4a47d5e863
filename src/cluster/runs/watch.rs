//! The watch loop that fills the run caches (and the namespace and TracingPolicy caches), and
//! the exporter's one write: the merge patch of a run's annotations.

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

    /// Applies one event; what the exporter should hear of it.
    fn apply(&mut self, runs: &Runs, event: Event<Watched<L::Status>>) -> Option<RunEvent> {
        let kind = L::Status::KIND;
        match event {
            Event::Init => {
                self.buffer = Some(HashMap::new());
                None
            }
            Event::InitApply(w) => {
                if let Some(run) = L::from_watched(w).compact(runs) {
                    self.buffer
                        .get_or_insert_with(HashMap::new)
                        .insert(map_key(run.metadata()), Stored::new(run));
                }
                None
            }
            Event::InitDone => {
                let listed = self.buffer.take().unwrap_or_default();
                *write(L::map(runs)) = listed;
                L::synced(runs).store(true, Ordering::SeqCst);
                Some(RunEvent::Relisted(kind))
            }
            Event::Apply(w) => {
                let run = L::from_watched(w);
                let key = map_key(run.metadata());
                let Some(run) = run.compact(runs) else {
                    write(L::map(runs)).remove(&key);
                    return None;
                };
                write(L::map(runs)).insert(key.clone(), Stored::new(run));
                Some(RunEvent::Changed(run_key(kind, key)))
            }
            Event::Delete(w) => {
                let run = L::from_watched(w);
                let key = map_key(run.metadata());
                let last = write(L::map(runs)).remove(&key).and_then(|s| s.load());
                let last = last.unwrap_or_else(|| Arc::new(run));
                Some(RunEvent::Deleted(L::cached(last)))
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
    pub fn marker(&self) -> Marker {
        Marker {
            client: self.client.clone(),
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
                        None
                    }
                },
                Some(event) = task_runs.next() => match event {
                    Ok(event) => trs.apply(&runs, event),
                    Err(e) => {
                        metrics.watch_error(WatchedResource::TaskRuns);
                        tracing::warn!(error = %e, "watching TaskRuns failed; retrying with backoff");
                        None
                    }
                },
                else => break,
            };
            if let Some(event) = event
                && events.send(event).await.is_err()
            {
                break;
            }
        }
    }
}

/// Why an annotation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The run is gone.
    #[error("{0}: not found")]
    Gone(RunKey),
    #[error("{key}: patching its annotations failed: {source}")]
    Api { key: RunKey, source: kube::Error },
}

/// Writes annotations on runs: a JSON merge patch of `metadata.annotations`, nothing else.
#[derive(Clone)]
pub struct Marker {
    client: Client,
}

impl Marker {
    /// Sets `annotations` on the run (other annotations untouched).
    pub async fn mark(&self, key: &RunKey, annotations: &[(&str, &str)]) -> Result<(), MarkError> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("tekton.dev", "v1", key.kind.kind()),
            key.kind.plural(),
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &resource);
        let values: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let patch = serde_json::json!({"metadata": {"annotations": values}});
        match api
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(MarkError::Gone(key.clone())),
            Err(source) => Err(MarkError::Api {
                key: key.clone(),
                source,
            }),
        }
    }
}
