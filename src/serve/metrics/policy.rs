//! The policy file's state and the validating webhook (`/validate`): their own metrics, in the
//! webhook's sub-registry beside the admission metrics, and the validating review's log line.
//! Reviews answered without any policy are `admissions_total{outcome="no-policy"}`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{ADMISSION_TARGET, add};
use crate::admission::validate::{Subject, Validation, Verdict};
use crate::runtime::metrics::{self, Registry};
use crate::runtime::telemetry::clipped;

const SUBJECTS: [Subject; 3] = [
    Subject::PolicyConfigMap,
    Subject::TracingPolicy,
    Subject::Other,
];
/// The verdicts' labels do not depend on their messages.
fn verdicts() -> [Verdict; 3] {
    [
        Verdict::Valid(String::new()),
        Verdict::Invalid(String::new()),
        Verdict::Ignored,
    ]
}

// These matches stop compiling when a variant is added, so the lists above cannot fall behind.
const _: fn(Subject, &Verdict) = |subject, verdict| {
    match subject {
        Subject::PolicyConfigMap | Subject::TracingPolicy | Subject::Other => {}
    }
    match verdict {
        Verdict::Valid(_) | Verdict::Invalid(_) | Verdict::Ignored => {}
    }
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindVerdict {
    kind: &'static str,
    verdict: &'static str,
}

/// Whether the policy file is in force, and what the validating webhook decided.
pub struct PolicyMetrics {
    valid: Gauge,
    validations: Family<KindVerdict, Counter>,
}

impl PolicyMetrics {
    /// Registers the metrics in the webhook's sub-registry of `registry`.
    pub fn register(registry: &mut Registry) -> PolicyMetrics {
        let r = registry.component(metrics::WEBHOOK);
        let m = PolicyMetrics {
            valid: add(
                r,
                "policy_valid",
                "1 while the policy file's current contents are in force (or there is no file), 0 while they are refused as invalid or unreadable",
                Gauge::default(),
            ),
            validations: add(
                r,
                "validations",
                "Reviews answered on /validate, by kind (policy-configmap, tracingpolicy, other) and verdict (valid, invalid, ignored)",
                Family::default(),
            ),
        };
        // Every kind and verdict at 0 from the first scrape, like the webhook's series.
        for subject in SUBJECTS {
            for verdict in &verdicts() {
                let _ = m.validations.get_or_create(&KindVerdict {
                    kind: subject.as_str(),
                    verdict: verdict.as_str(),
                });
            }
        }
        m
    }

    /// Records whether the policy file's current contents are in force.
    pub(crate) fn set_valid(&self, valid: bool) {
        self.valid.set(i64::from(valid));
    }
}

/// The one log line and the metric of one answered validating review.
pub fn record_validation(metrics: &PolicyMetrics, v: &Validation, elapsed: Duration) {
    metrics
        .validations
        .get_or_create(&KindVerdict {
            kind: v.subject.as_str(),
            verdict: v.verdict.as_str(),
        })
        .inc();
    let (policy, refused) = match &v.verdict {
        Verdict::Valid(marker) => (Some(marker.as_str()), None),
        Verdict::Invalid(message) => (None, Some(message.as_str())),
        Verdict::Ignored => (None, None),
    };
    tracing::info!(
        target: ADMISSION_TARGET,
        uid = %clipped(&v.uid),
        kind = v.subject.as_str(),
        object = %clipped(&v.object),
        verdict = v.verdict.as_str(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        policy = policy.map(clipped).map(tracing::field::display),
        refused = refused.map(clipped).map(tracing::field::display),
        "validation"
    );
}
