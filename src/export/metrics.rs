//! The exporter's Prometheus metrics (prefix `lightstep_tekton_exporter_`). Every known label
//! set is registered at 0 at start, so a dashboard can tell "nothing yet" from "not reporting".

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cluster::runs::RunKind;
use crate::otlp::Cause;
use crate::spans::tree::RunResult;

const KINDS: [RunKind; 2] = [RunKind::PipelineRun, RunKind::TaskRun];
const RESULTS: [RunResult; 5] = [
    RunResult::Success,
    RunResult::Failure,
    RunResult::Timeout,
    RunResult::Cancellation,
    RunResult::Error,
];

/// Seconds from a run's completion to its export: from a healthy exporter's second or two to
/// the hour a backend outage may last (longer lands in +Inf).
const LAG_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Why a run that was due was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its trace was not sampled: marked, nothing sent.
    Unsampled,
    /// The tree could not be built (a field missing): marked, nothing sent.
    Invalid,
    /// The backend refused its spans for good (`--max-rejections` permanent failures, or the
    /// policy's exporter could not be built): marked `rejected:<trace id>`, given up on.
    Rejected,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Unsampled => "unsampled",
            Skip::Invalid => "invalid",
            Skip::Rejected => "rejected",
        }
    }
}

/// Why a run that was due was never exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Deleted while no finalizer of ours held it (before the exporter saw it, say, or after
    /// someone removed the finalizer by hand).
    Deleted,
    /// `--store-deadline` passed after it finished: given up on and released.
    Deadline,
}

impl Lost {
    pub fn as_str(self) -> &'static str {
        match self {
            Lost::Deleted => "deleted",
            Lost::Deadline => "deadline",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RunLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SkipLabels {
    kind: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

/// Handles on the exporter's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct ExportMetrics {
    runs: Family<RunLabels, Counter>,
    skipped: Family<SkipLabels, Counter>,
    spans: Counter,
    errors: Family<CauseLabel, Counter>,
    mark_errors: Counter,
    lag: Histogram,
    queue_depth: Gauge,
    lost: Family<SkipLabels, Counter>,
    missing_task_runs: Counter,
    rejected_spans: Counter,
}

/// The cause label of an export that failed before it was sent: no client for the policy's
/// exporter (a bad endpoint, an unreadable token file).
pub const CAUSE_CONFIG: &str = "config";

impl ExportMetrics {
    pub fn register(registry: &mut Registry) -> ExportMetrics {
        let metrics = ExportMetrics {
            runs: Family::default(),
            skipped: Family::default(),
            spans: Counter::default(),
            errors: Family::default(),
            mark_errors: Counter::default(),
            lag: Histogram::new(LAG_BUCKETS),
            queue_depth: Gauge::default(),
            lost: Family::default(),
            missing_task_runs: Counter::default(),
            rejected_spans: Counter::default(),
        };
        registry.register(
            "runs_exported",
            "Runs whose spans the backend accepted and that were marked, by kind (pipelinerun, taskrun) and the run's result",
            metrics.runs.clone(),
        );
        registry.register(
            "runs_skipped",
            "Runs marked without being exported, by kind and reason (unsampled, invalid; rejected: refused by the backend for good)",
            metrics.skipped.clone(),
        );
        registry.register(
            "spans_rejected",
            "Spans the backend accepted a request for but dropped (OTLP partial success: rejected_spans)",
            metrics.rejected_spans.clone(),
        );
        registry.register(
            "spans_exported",
            "Spans the backend accepted",
            metrics.spans.clone(),
        );
        registry.register(
            "export_errors",
            "Failed exports (retried with backoff), by cause",
            metrics.errors.clone(),
        );
        registry.register(
            "mark_errors",
            "Failed annotation patches after an accepted export (retried; a crash before one succeeds may send that run twice)",
            metrics.mark_errors.clone(),
        );
        registry.register(
            "export_lag_seconds",
            "Seconds from a run's completion to its export being marked",
            metrics.lag.clone(),
        );
        registry.register(
            "queue_depth",
            "Runs waiting in the export queue (ready and backing off)",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "runs_lost",
            "Runs that completed and were never exported, by kind and reason (deleted: deleted while no finalizer of ours held them; deadline: --store-deadline passed)",
            metrics.lost.clone(),
        );
        registry.register(
            "taskruns_missing",
            "Child TaskRuns not complete in the cache when their PipelineRun was exported after the grace period",
            metrics.missing_task_runs.clone(),
        );
        for kind in KINDS {
            for result in RESULTS {
                metrics.run_counter(kind, result);
            }
            for skip in [Skip::Unsampled, Skip::Invalid, Skip::Rejected] {
                metrics.skip_counter(kind, skip);
            }
            for lost in [Lost::Deleted, Lost::Deadline] {
                metrics.lost_counter(kind, lost);
            }
        }
        for cause in Cause::ALL {
            metrics.error_counter(cause.as_str());
        }
        metrics.error_counter(CAUSE_CONFIG);
        metrics
    }

    pub fn exported(&self, kind: RunKind, result: RunResult, spans: u64, lag: Duration) {
        self.run_counter(kind, result).inc();
        self.spans.inc_by(spans);
        self.lag.observe(lag.as_secs_f64());
    }

    pub fn skipped(&self, kind: RunKind, skip: Skip) {
        self.skip_counter(kind, skip).inc();
    }

    pub fn rejected_spans(&self, spans: u64) {
        self.rejected_spans.inc_by(spans);
    }

    pub fn error(&self, cause: &'static str) {
        self.error_counter(cause).inc();
    }

    pub fn mark_error(&self) {
        self.mark_errors.inc();
    }

    pub fn lost(&self, kind: RunKind, lost: Lost) {
        self.lost_counter(kind, lost).inc();
    }

    pub fn missing_task_runs(&self, count: u64) {
        self.missing_task_runs.inc_by(count);
    }

    pub fn queue_depth(&self, depth: usize) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    fn run_counter(&self, kind: RunKind, result: RunResult) -> Counter {
        let labels = RunLabels {
            kind: kind.as_str(),
            result: result.as_str(),
        };
        self.runs.get_or_create(&labels).clone()
    }

    fn skip_counter(&self, kind: RunKind, skip: Skip) -> Counter {
        let labels = SkipLabels {
            kind: kind.as_str(),
            reason: skip.as_str(),
        };
        self.skipped.get_or_create(&labels).clone()
    }

    fn lost_counter(&self, kind: RunKind, lost: Lost) -> Counter {
        self.lost
            .get_or_create(&SkipLabels {
                kind: kind.as_str(),
                reason: lost.as_str(),
            })
            .clone()
    }

    fn error_counter(&self, cause: &'static str) -> Counter {
        self.errors.get_or_create(&CauseLabel { cause }).clone()
    }
}
