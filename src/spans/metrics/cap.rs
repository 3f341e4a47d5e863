//! The cardinality cap: pipeline and task names come from users, so each metric keeps at most
//! `max` of them as series; an observation with a name past that is folded into [`OVERFLOW`].
//!
//! The OpenTelemetry SDKs fold overflowing series into one attribute set,
//! `otel.metric.overflow: true`, dropping every attribute. Here only the user-given names are
//! replaced (by `_other`), and the result, state and namespace stay, so a failure rate or a
//! duration by result is still right over the folded runs.

use std::collections::{BTreeMap, HashSet};

use super::{Metric, RunMetrics};

/// What a folded name becomes.
pub const OVERFLOW: &str = "_other";

/// The names each metric has kept, in this process (a restart starts afresh: the backend then
/// sees at most `max` more names per metric, each run still counted once).
#[derive(Debug)]
pub struct SeriesCap {
    max: usize,
    seen: BTreeMap<Metric, HashSet<String>>,
}

impl SeriesCap {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: BTreeMap::new(),
        }
    }

    /// Folds the observations whose names are new once the metric holds `max`; returns how
    /// many were folded, by metric.
    pub fn fold(&mut self, metrics: &mut RunMetrics) -> Vec<(Metric, u64)> {
        let mut folded: BTreeMap<Metric, u64> = BTreeMap::new();
        for observation in &mut metrics.observations {
            let key: String = observation
                .attributes
                .iter()
                .filter(|(k, _)| is_name(k))
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            let seen = self.seen.entry(observation.metric).or_default();
            if seen.contains(&key) {
                continue;
            }
            if seen.len() < self.max {
                seen.insert(key);
                continue;
            }
            for (k, v) in &mut observation.attributes {
                if is_name(k) {
                    *v = OVERFLOW.to_owned();
                }
            }
            *folded.entry(observation.metric).or_default() += 1;
        }
        folded.into_iter().collect()
    }
}

/// The attributes whose values users choose.
fn is_name(key: &str) -> bool {
    matches!(key, "cicd.pipeline.name" | "cicd.pipeline.task.name")
}
