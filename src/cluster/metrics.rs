//! The cluster room's Prometheus metrics: watch errors, status writes and leadership.
//!
//! Registered into whatever registry the command hands over (each component gets its own
//! sub-registry, hence its own prefix), so the webhook and the exporter can both count their
//! watches without their names colliding. Every known label set starts at 0, so a dashboard can
//! tell "no errors" from "not reporting", and `rate()` has a first sample.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What a watch was watching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchedResource {
    TracingPolicies,
    Namespaces,
    PipelineRuns,
    TaskRuns,
}

impl WatchedResource {
    /// The `resource` label: the resource's plural name, as in RBAC rules.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchedResource::TracingPolicies => "tracingpolicies",
            WatchedResource::Namespaces => "namespaces",
            WatchedResource::PipelineRuns => "pipelineruns",
            WatchedResource::TaskRuns => "taskruns",
        }
    }
}

/// How a status write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    /// The API server took the new status.
    Written,
    /// Someone changed the object first (HTTP 409); it is re-read and compared again.
    Conflict,
    /// Anything else (unreachable, forbidden, a server error); retried on a timer.
    Error,
}

impl WriteResult {
    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteResult::Written => "written",
            WriteResult::Conflict => "conflict",
            WriteResult::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabel {
    resource: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Handles to the cluster counters; cheap to clone (they share the registered values).
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    watch_errors: Family<ResourceLabel, Counter>,
    status_writes: Family<ResultLabel, Counter>,
}

impl ClusterMetrics {
    /// Registers `watch_errors_total{resource}` and `status_writes_total{result}`.
    pub fn register(registry: &mut Registry) -> ClusterMetrics {
        let metrics = ClusterMetrics::default();
        registry.register(
            "watch_errors",
            "Watch or list requests that failed (retried with backoff; admission decides from the last state seen), by resource",
            metrics.watch_errors.clone(),
        );
        registry.register(
            "status_writes",
            "TracingPolicy status writes, by result (written, conflict, error)",
            metrics.status_writes.clone(),
        );
        for resource in [
            WatchedResource::TracingPolicies,
            WatchedResource::Namespaces,
        ] {
            metrics.watch_error_counter(resource);
        }
        for result in [
            WriteResult::Written,
            WriteResult::Conflict,
            WriteResult::Error,
        ] {
            metrics.status_write_counter(result);
        }
        metrics
    }

    /// Registers `watch_errors_total{resource}` alone, for the `resources` a command watches
    /// (the exporter writes no statuses).
    pub fn register_watches(
        registry: &mut Registry,
        resources: &[WatchedResource],
    ) -> ClusterMetrics {
        let metrics = ClusterMetrics::default();
        registry.register(
            "watch_errors",
            "Watch or list requests that failed (retried with backoff), by resource",
            metrics.watch_errors.clone(),
        );
        for resource in resources {
            metrics.watch_error_counter(*resource);
        }
        metrics
    }

    pub(super) fn watch_error(&self, resource: WatchedResource) {
        self.watch_error_counter(resource).inc();
    }

    pub(super) fn status_write(&self, result: WriteResult) {
        self.status_write_counter(result).inc();
    }

    fn watch_error_counter(&self, resource: WatchedResource) -> Counter {
        let label = ResourceLabel {
            resource: resource.as_str(),
        };
        self.watch_errors.get_or_create(&label).clone()
    }

    fn status_write_counter(&self, result: WriteResult) -> Counter {
        let label = ResultLabel {
            result: result.as_str(),
        };
        self.status_writes.get_or_create(&label).clone()
    }
}

/// Registers the `leader` gauge: 1 while this replica holds its Lease, else 0.
pub(super) fn register_leader(registry: &mut Registry) -> Gauge {
    let gauge = Gauge::default();
    registry.register(
        "leader",
        "1 while this replica holds its Lease and does the single-writer work, 0 on standby",
        gauge.clone(),
    );
    gauge
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn every_known_label_set_starts_at_zero_and_counts() {
        let mut registry = Registry::with_prefix("t");
        let metrics = ClusterMetrics::register(&mut registry);
        let gauge = register_leader(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "t_watch_errors_total{resource=\"tracingpolicies\"} 0",
            "t_watch_errors_total{resource=\"namespaces\"} 0",
            "t_status_writes_total{result=\"written\"} 0",
            "t_status_writes_total{result=\"conflict\"} 0",
            "t_status_writes_total{result=\"error\"} 0",
            "t_leader 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metrics.watch_error(WatchedResource::Namespaces);
        metrics.status_write(WriteResult::Error);
        gauge.set(1);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_watch_errors_total{resource=\"namespaces\"} 1"));
        assert!(text.contains("t_status_writes_total{result=\"error\"} 1"));
        assert!(text.contains("t_leader 1"));
    }
}
