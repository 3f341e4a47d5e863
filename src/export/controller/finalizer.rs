//! The exporter's finalizer (`lightstep-tekton.io/export`): held on each PipelineRun and
//! standalone TaskRun it will export from the moment it sees the run, and on each TaskRun of
//! such a PipelineRun (so a foreground cascade cannot take them first), so that a delete (Tekton
//! Results' watcher, a pruner, a user) waits until the spans are in.
//!
//! It is released in the patch that marks the run (see `flight`), for a PipelineRun's TaskRuns
//! once the PipelineRun is marked, when the run leaves scope ([`decide::hold`]), when a run is
//! deleted before it finished, and when `--store-deadline` passed after completion without an
//! export: then the run is marked `deadline` and released in one patch, counted in
//! `runs_lost_total{reason="deadline"}`. So a run sees at most two writes (hold; mark and
//! release), and a run outside scope none.
//!
//! Writes go at most `--concurrency` at a time, each built from the cache when it starts and
//! conditional on what it changes ([`run_patch`]); a refused precondition is left for the next
//! event or rescan to look at again. While a run's finalizer write is pending or its result has
//! not reached the cache yet, its export waits, so the mark's patch sees the finalizer it must
//! remove.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::Controller;
use crate::cluster::runs::{
    CachedRun, MarkError, RunKey, RunKind, RunWrite, holds_finalizer, run_patch,
};
use crate::contract::tekton::PIPELINE_RUN_UID;
use crate::export::decide::{self, EXPORTED_ANNOTATION, Release};
use crate::export::metrics::Lost;
use crate::spans::objects::{Metadata, PipelineRun};

/// The mark of a run given up on at its store deadline.
pub(super) const DEADLINE_MARK: &str = "deadline";

/// How long a finalizer we added may take to show in the cache before the run's export stops
/// waiting for it: the watch is usually a few milliseconds behind the write.
const HELD_GRACE: Duration = Duration::from_secs(10);

/// What a finalizer write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    Hold,
    Release(Release),
    /// The store deadline passed: mark `deadline` and release, in one patch.
    GiveUp,
}

/// Where a run's finalizer write is.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Waiting,
    Writing,
    /// Added at this time; not in the cache yet.
    Held(Instant),
    /// Removed at this time; still in the cache (a second removal would be refused).
    Released(Instant),
}

pub(super) type Writes =
    FuturesUnordered<Pin<Box<dyn Future<Output = (RunKey, Intent, Result<(), MarkError>)> + Send>>>;

/// Runs waiting for a finalizer write, and those being written (each at most once).
#[derive(Debug, Default)]
pub(super) struct Finalizers {
    waiting: VecDeque<RunKey>,
    pending: HashMap<RunKey, Pending>,
}

impl Finalizers {
    /// Whether the run's export should wait for a finalizer write (pending, or not yet seen in
    /// the cache).
    pub(super) fn busy(&mut self, key: &RunKey) -> bool {
        match self.pending.get(key) {
            Some(Pending::Held(at) | Pending::Released(at)) if at.elapsed() >= HELD_GRACE => {
                self.pending.remove(key);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    pub(super) fn forget(&mut self, key: &RunKey) {
        self.pending.remove(key);
    }

    /// Forgets every waiting run (leadership was lost); writes in flight finish.
    pub(super) fn clear(&mut self) {
        self.waiting.clear();
        self.pending.retain(|_, p| !matches!(p, Pending::Waiting));
    }
}

impl Controller {
    /// Whether this replica writes finalizers now.
    fn writes_finalizers(&self) -> bool {
        !self.settings.dry_run && self.marker.is_some()
    }

    /// Looks at the run's finalizer (and, for a PipelineRun when `children`, its TaskRuns'),
    /// queueing a write where one is needed.
    pub(super) fn upkeep(&mut self, key: &RunKey, children: bool) {
        if !self.writes_finalizers() {
            return;
        }
        let Some(run) = self.runs.get(key) else {
            return;
        };
        self.look_at(key, &run);
        if let (true, CachedRun::PipelineRun(pr)) = (children, &run) {
            for child in self.task_run_keys(pr) {
                if let Some(tr) = self.runs.get(&child) {
                    self.look_at(&child, &tr);
                }
            }
        }
    }

    /// A PipelineRun was deleted: its TaskRuns our finalizer holds are released now (a write
    /// that removed its last finalizer, our mark say, deleted it without storing the mark, so
    /// no marked stub will tell them).
    pub(super) fn upkeep_orphans(&mut self, pr: &PipelineRun) {
        if !self.writes_finalizers() {
            return;
        }
        for child in self.task_run_keys(pr) {
            if let Some(tr) = self.runs.get(&child) {
                self.look_at(&child, &tr);
            }
        }
    }

    fn look_at(&mut self, key: &RunKey, run: &CachedRun) {
        let holds = holds_finalizer(metadata(run));
        // Our last write reached the cache (or took too long to: the cache is the truth).
        let settled = match self.finalizers.pending.get(key) {
            Some(Pending::Held(at)) => holds || at.elapsed() >= HELD_GRACE,
            Some(Pending::Released(at)) => !holds || at.elapsed() >= HELD_GRACE,
            _ => false,
        };
        if settled {
            self.finalizers.pending.remove(key);
        }
        if self.finalizers.pending.contains_key(key) || self.intent(key, run).is_none() {
            return;
        }
        self.finalizers
            .pending
            .insert(key.clone(), Pending::Waiting);
        self.finalizers.waiting.push_back(key.clone());
    }

    /// The write the run's finalizer needs now, if any.
    fn intent(&self, key: &RunKey, run: &CachedRun) -> Option<Intent> {
        let metadata = metadata(run);
        let holds = holds_finalizer(metadata);
        let verdict = match run {
            CachedRun::TaskRun(tr) if tr.metadata.label(PIPELINE_RUN_UID).is_some() => {
                match self.runs.parent(tr) {
                    // Its PipelineRun is gone (or not seen yet: then there is nothing to hold).
                    None => Err(Release::OutOfScope),
                    // Held until the PipelineRun's own give-up mark lands, then released.
                    Some(pr) => match self.verdict_of_pipeline_run(&pr) {
                        Err(Release::Deadline) if holds_finalizer(&pr.metadata) => return None,
                        verdict => verdict,
                    },
                }
            }
            CachedRun::TaskRun(tr) => self.verdict(metadata, decide::task_run_finished(tr)),
            CachedRun::PipelineRun(pr) => self.verdict_of_pipeline_run(pr),
        };
        let root =
            !matches!(run, CachedRun::TaskRun(tr) if tr.metadata.label(PIPELINE_RUN_UID).is_some());
        match verdict {
            Ok(())
                if !holds
                    && metadata.deletion_timestamp.is_none()
                    && !self.queue.exporting(key) =>
            {
                Some(Intent::Hold)
            }
            Err(Release::Deadline) if holds && root => {
                (!self.queue.exporting(key)).then_some(Intent::GiveUp)
            }
            Err(release) if holds => Some(Intent::Release(release)),
            _ => None,
        }
    }

    fn verdict_of_pipeline_run(&self, pr: &PipelineRun) -> Result<(), Release> {
        self.verdict(&pr.metadata, decide::pipeline_run_finished(pr))
    }

    fn verdict(
        &self,
        metadata: &Metadata,
        finished: Result<decide::Finished, decide::NotDue>,
    ) -> Result<(), Release> {
        let namespace = metadata.namespace.as_deref().unwrap_or_default();
        let policy = self.policy_for(namespace);
        decide::hold(
            metadata,
            finished,
            policy.as_ref(),
            self.window,
            self.settings.store_deadline,
            Timestamp::now(),
        )
    }

    /// The PipelineRun's TaskRuns in the cache: those its status lists, else (an older Tekton)
    /// those whose label names its uid.
    fn task_run_keys(&self, pr: &PipelineRun) -> Vec<RunKey> {
        let namespace = pr.metadata.namespace.clone().unwrap_or_default();
        let key = |name: String| RunKey {
            kind: RunKind::TaskRun,
            namespace: namespace.clone(),
            name,
        };
        let refs: Vec<String> = pr
            .status
            .iter()
            .flat_map(|s| &s.child_references)
            .filter(|c| c.kind == "TaskRun")
            .map(|c| c.name.clone())
            .collect();
        if !refs.is_empty() {
            return refs.into_iter().map(key).collect();
        }
        match pr.metadata.uid.as_deref() {
            Some(uid) => self
                .runs
                .task_runs_of(&namespace, uid)
                .iter()
                .filter_map(|tr| tr.metadata.name.clone())
                .map(key)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Starts waiting finalizer writes while there is room, each decided again and built from
    /// the cache as it is now.
    pub(super) fn start_writes(&mut self, writes: &mut Writes) {
        let Some(marker) = self.marker.clone() else {
            return;
        };
        while writes.len() < self.settings.concurrency {
            let Some(key) = self.finalizers.waiting.pop_front() else {
                return;
            };
            if !matches!(self.finalizers.pending.get(&key), Some(Pending::Waiting)) {
                continue;
            }
            let run = self.runs.get(&key);
            let intent = run.as_ref().and_then(|run| self.intent(&key, run));
            let write = match intent {
                Some(Intent::Hold) => RunWrite::Hold,
                Some(Intent::Release(_)) => RunWrite::Release,
                Some(Intent::GiveUp) => RunWrite::Mark(vec![(
                    EXPORTED_ANNOTATION.to_owned(),
                    DEADLINE_MARK.to_owned(),
                )]),
                None => {
                    self.finalizers.pending.remove(&key);
                    continue;
                }
            };
            let (Some(run), Some(intent)) = (run, intent) else {
                continue;
            };
            let Some(operations) = run_patch(metadata(&run), &write) else {
                self.finalizers.pending.remove(&key);
                continue;
            };
            if intent == Intent::GiveUp {
                // No more attempts at its export: it is given up on.
                self.queue.done(&key);
            }
            self.finalizers
                .pending
                .insert(key.clone(), Pending::Writing);
            let marker = marker.clone();
            writes.push(Box::pin(async move {
                let result = marker.write(&key, operations).await;
                (key, intent, result)
            }));
        }
    }

    /// Settles a finalizer write.
    pub(super) fn written(&mut self, key: RunKey, intent: Intent, result: Result<(), MarkError>) {
        match result {
            Ok(()) => match intent {
                Intent::Hold => {
                    self.finalizers
                        .pending
                        .insert(key, Pending::Held(Instant::now()));
                }
                Intent::Release(release) => {
                    self.finalizers
                        .pending
                        .insert(key.clone(), Pending::Released(Instant::now()));
                    tracing::debug!(run = %key, reason = ?release, "finalizer released");
                }
                Intent::GiveUp => {
                    self.finalizers
                        .pending
                        .insert(key.clone(), Pending::Released(Instant::now()));
                    let deadline = self.settings.store_deadline.as_secs();
                    tracing::warn!(run = %key, store_deadline_s = deadline, "the run was not exported within --store-deadline of its completion; marked it given up and released it");
                    self.metrics.lost(key.kind, Lost::Deadline);
                }
            },
            // Changed since the cache saw it, or gone: the next event or rescan looks again.
            Err(MarkError::Changed(_) | MarkError::Gone(_)) => {
                self.finalizers.pending.remove(&key);
            }
            Err(error) => {
                self.finalizers.pending.remove(&key);
                tracing::warn!(%error, intent = ?intent, "writing the exporter's finalizer failed; trying again at the next rescan");
            }
        }
    }
}

fn metadata(run: &CachedRun) -> &Metadata {
    match run {
        CachedRun::PipelineRun(r) => &r.metadata,
        CachedRun::TaskRun(r) => &r.metadata,
    }
}
