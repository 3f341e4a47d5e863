//! The webhook's metrics and its one log line per request.
//!
//! Each answered AdmissionReview gets exactly one log line ([`record_admission`]) with uid,
//! namespace, pod, mode, decision and duration, and each refused request one line
//! (`record_rejection`); both count in the metrics. Every value taken from the request is
//! clipped (`telemetry::clipped`) and, in text logs, escaped, so one request is one bounded
//! line. Nothing secret is logged or counted: the
//! reply's patch refers to the token Secret by name.
//!
//! The metrics live in the webhook's sub-registry of [`Registry`], under their historical names
//! (`lightstep_tekton_webhook_admissions_total`, ...), which the README and dashboards use.

use std::time::Duration;

use axum::http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Metric;

use crate::admission::decide::{Mode, SkipReason};
use crate::admission::{Outcome, Reply};
use crate::policy::selection::Fallback;
use crate::runtime::metrics::{self, Registry};
use crate::runtime::telemetry::{self, clipped};

/// The target of the per-request lines, whichever module writes them: `RUST_LOG` can then keep
/// or drop the admission lines (`<crate>::admission=warn`) apart from the rest.
pub(super) const ADMISSION_TARGET: &str = concat!(env!("CARGO_CRATE_NAME"), "::admission");

/// The span of one admission, continuing the caller's `traceparent` when there is one (the API
/// server sends one when its own tracing is on).
pub(crate) fn admission_span(mode: Mode, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "admission",
        otel.kind = "server",
        mode = mode.as_str(),
        uid = tracing::field::Empty,
        decision = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, headers);
    span
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeOutcome {
    mode: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeReason {
    mode: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Why a request got no AdmissionReview reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// HTTP 400: not an AdmissionReview v1, malformed JSON, empty body.
    BadRequest,
    /// HTTP 400: the chunked framing of the body is malformed (size, line ending, extension).
    BadFraming,
    /// HTTP 413: over the body limit.
    TooLarge,
    /// HTTP 408: the body did not arrive in time, or the connection broke while sending it.
    BodyTimeout,
    /// HTTP 503 with `Retry-After`: the bodies in flight hold the whole body budget. Not 429,
    /// which says this client sent too many requests: the budget is the server's, shared by all
    /// clients, and is full whoever filled it (RFC 9110 §15.6.4, "temporary overload"). Either
    /// way the API server counts a failed call (`failurePolicy` applies); client-go retries 429
    /// and 5xx replies that carry `Retry-After`.
    Busy,
    /// HTTP 500: deciding panicked (a bug; the server kept serving).
    Internal,
}

impl Rejection {
    fn as_str(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad-request",
            Rejection::BadFraming => "bad-framing",
            Rejection::TooLarge => "too-large",
            Rejection::BodyTimeout => "body-timeout",
            Rejection::Busy => "busy",
            Rejection::Internal => "internal",
        }
    }
}

/// Which reloadable file a reload was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadKind {
    Tls,
    Policy,
}

impl ReloadKind {
    fn as_str(self) -> &'static str {
        match self {
            ReloadKind::Tls => "tls",
            ReloadKind::Policy => "policy",
        }
    }
}

/// Every mode, outcome, rejection and reload label, so that each series exists (at 0) from the
/// first scrape and an alert on `increase(…)` sees the first event (Prometheus's advice for
/// label sets known in advance).
const MODES: [Mode; 2] = [Mode::Inject, Mode::Enforce];
const OUTCOMES: [Outcome; 9] = [
    Outcome::Patched,
    Outcome::Skipped(SkipReason::NotTaskRunPod),
    Outcome::Skipped(SkipReason::OptedOut),
    Outcome::Skipped(SkipReason::AlreadyInjected),
    Outcome::NotPodCreate,
    Outcome::Failed { denied: true },
    Outcome::Failed { denied: false },
    Outcome::Audited,
    Outcome::NoPolicy,
];
const REJECTIONS: [Rejection; 6] = [
    Rejection::BadRequest,
    Rejection::BadFraming,
    Rejection::TooLarge,
    Rejection::BodyTimeout,
    Rejection::Busy,
    Rejection::Internal,
];
const RELOADS: [ReloadKind; 2] = [ReloadKind::Tls, ReloadKind::Policy];
const _: fn(Mode, &Outcome, Rejection, ReloadKind) = |mode, outcome, rejection, reload| {
    match mode {
        Mode::Inject | Mode::Enforce => {}
    }
    match outcome {
        Outcome::Patched
        | Outcome::Skipped(
            SkipReason::NotTaskRunPod | SkipReason::OptedOut | SkipReason::AlreadyInjected,
        )
        | Outcome::NotPodCreate
        | Outcome::Failed {
            denied: true | false,
        }
        | Outcome::Audited
        | Outcome::NoPolicy => {}
    }
    match rejection {
        Rejection::BadRequest
        | Rejection::BadFraming
        | Rejection::TooLarge
        | Rejection::BodyTimeout
        | Rejection::Busy
        | Rejection::Internal => {}
    }
    match reload {
        ReloadKind::Tls | ReloadKind::Policy => {}
    }
};

/// The webhook's Prometheus metrics.
pub struct WebhookMetrics {
    admissions: Family<ModeOutcome, Counter>,
    skips: Family<ModeReason, Counter>,
    warnings: Family<ModeLabel, Counter>,
    patch_bytes: HistogramFamily<ModeLabel>,
    duration: HistogramFamily<ModeLabel>,
    rejections: Family<ReasonLabel, Counter>,
    handshake_failures: Counter,
    connections: Gauge,
    cert_expiry: Gauge,
    reloads: Family<ReloadLabels, Counter>,
}

/// Registers `metric` under `name` and returns the handle to update it with.
pub(super) fn add<M: Metric + Clone>(
    registry: &mut prometheus_client::registry::Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl WebhookMetrics {
    /// Registers every webhook metric in its sub-registry of `registry`.
    pub fn register(registry: &mut Registry) -> WebhookMetrics {
        let r = registry.component(metrics::WEBHOOK);
        let m = WebhookMetrics {
            admissions: add(
                r,
                "admissions",
                "AdmissionReviews answered, by mode (inject, enforce) and outcome (patched, skipped, denied, allowed-on-error, audited, no-policy)",
                Family::default(),
            ),
            skips: add(
                r,
                "admission_skips",
                "Pods left untouched, by reason",
                Family::default(),
            ),
            warnings: add(
                r,
                "admission_warnings",
                "Warnings returned to the users who created pods",
                Family::default(),
            ),
            // 256 B to 512 KiB: a few env vars per step up to a 40-step pod's patch, doubling.
            patch_bytes: add(
                r,
                "admission_patch_bytes",
                "Size of the JSON Patch returned (before base64), patched pods only",
                Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(256.0, 2.0, 12))
                }),
            ),
            // 50 µs to about 0.8 s, doubling: a review takes tens of microseconds; the API server
            // gives up after its webhook timeout (10 s by default, 30 s at most).
            duration: add(
                r,
                "admission_duration_seconds",
                "Time to decide one AdmissionReview, from a complete body to the reply",
                Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.00005, 2.0, 15))
                }),
            ),
            rejections: add(
                r,
                "http_rejections",
                "Requests answered without an AdmissionReview (400, 408, 413, 500, 503), by reason",
                Family::default(),
            ),
            handshake_failures: add(
                r,
                "tls_handshake_failures",
                "TLS handshakes that failed or timed out",
                Counter::default(),
            ),
            connections: add(
                r,
                "open_connections",
                "Client connections open now",
                Gauge::default(),
            ),
            cert_expiry: add(
                r,
                "tls_certificate_expiry_timestamp_seconds",
                "notAfter of the serving certificate in use, in seconds since the Unix epoch",
                Gauge::default(),
            ),
            reloads: add(
                r,
                "reloads",
                "Reloads of the certificate (file=tls) or policy (file=policy) files; result=refused keeps the previous one",
                Family::default(),
            ),
        };
        m.create_known_series();
        m
    }

    /// Creates every series whose labels are known in advance, at 0.
    fn create_known_series(&self) {
        // Creating a series is all that is wanted here; the guards are dropped at once.
        for mode in MODES.map(Mode::as_str) {
            for outcome in &OUTCOMES {
                let _ = self.admissions.get_or_create(&ModeOutcome {
                    mode,
                    outcome: outcome.as_str(),
                });
                if let Some(reason) = outcome.skip_reason() {
                    let _ = self.skips.get_or_create(&ModeReason { mode, reason });
                }
            }
            let _ = self.warnings.get_or_create(&ModeLabel { mode });
            let _ = self.patch_bytes.get_or_create(&ModeLabel { mode });
            let _ = self.duration.get_or_create(&ModeLabel { mode });
        }
        for reason in REJECTIONS.map(Rejection::as_str) {
            let _ = self.rejections.get_or_create(&ReasonLabel { reason });
        }
        for file in RELOADS.map(ReloadKind::as_str) {
            for result in [true, false].map(reload_result) {
                let _ = self.reloads.get_or_create(&ReloadLabels { file, result });
            }
        }
    }

    pub(crate) fn set_certificate_expiry(&self, not_after: i64) {
        self.cert_expiry.set(not_after);
    }

    pub(crate) fn handshake_failed(&self) {
        self.handshake_failures.inc();
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    pub(crate) fn reloaded(&self, kind: ReloadKind, applied: bool) {
        let result = reload_result(applied);
        self.reloads
            .get_or_create(&ReloadLabels {
                file: kind.as_str(),
                result,
            })
            .inc();
    }
}

/// The `result` label of a reload.
fn reload_result(applied: bool) -> &'static str {
    if applied { "applied" } else { "refused" }
}

/// The one log line and the metrics of one answered AdmissionReview.
pub fn record_admission(metrics: &WebhookMetrics, reply: &Reply, elapsed: Duration) {
    let mode = reply.mode.as_str();
    let decision = reply.outcome.as_str();
    metrics
        .admissions
        .get_or_create(&ModeOutcome {
            mode,
            outcome: decision,
        })
        .inc();
    if let Some(reason) = reply.outcome.skip_reason() {
        metrics
            .skips
            .get_or_create(&ModeReason { mode, reason })
            .inc();
    }
    if !reply.warnings.is_empty() {
        metrics
            .warnings
            .get_or_create(&ModeLabel { mode })
            .inc_by(reply.warnings.len() as u64);
    }
    if reply.outcome == Outcome::Patched {
        metrics
            .patch_bytes
            .get_or_create(&ModeLabel { mode })
            .observe(reply.patch_bytes as f64);
    }
    metrics
        .duration
        .get_or_create(&ModeLabel { mode })
        .observe(elapsed.as_secs_f64());

    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    let warnings = (!reply.warnings.is_empty()).then_some(reply.warnings.len());
    macro_rules! admission_line {
        ($level:ident) => {
            tracing::$level!(
                target: ADMISSION_TARGET,
                uid = %clipped(&reply.uid),
                namespace = %clipped(&reply.namespace),
                pod = %clipped(&reply.pod),
                mode = %mode,
                decision = %decision,
                duration_ms,
                policy = (!reply.policy.is_empty()).then(|| clipped(&reply.policy)).map(tracing::field::display),
                policy_fallback = reply.fallback.filter(|f| *f != Fallback::NotWatching).map(Fallback::as_str),
                skip_reason = reply.outcome.skip_reason(),
                warnings,
                patch_bytes = (reply.patch_bytes > 0).then_some(reply.patch_bytes),
                error = reply.error.as_deref().map(clipped).map(tracing::field::display),
                "admission"
            )
        };
    }
    if reply.error.is_some() {
        admission_line!(warn);
    } else {
        admission_line!(info);
    }
}

/// The log line and metric of a request answered without an AdmissionReview; `mode` is the
/// path's (`inject`, `enforce`, `validate`).
pub(crate) fn record_rejection(
    metrics: &WebhookMetrics,
    mode: &'static str,
    rejection: Rejection,
    detail: &str,
) {
    metrics
        .rejections
        .get_or_create(&ReasonLabel {
            reason: rejection.as_str(),
        })
        .inc();
    tracing::warn!(
        target: ADMISSION_TARGET,
        mode = %mode,
        rejected = %rejection.as_str(),
        reason = %clipped(detail),
        "request refused"
    );
}

mod policy;

pub use policy::{PolicyMetrics, record_validation};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_the_prefix() {
        let mut registry = Registry::new();
        let m = WebhookMetrics::register(&mut registry);
        m.reloaded(ReloadKind::Tls, false);
        m.set_certificate_expiry(1_900_000_000);
        let text = registry.encode();
        assert!(
            text.contains(
                "lightstep_tekton_webhook_reloads_total{file=\"tls\",result=\"refused\"} 1"
            )
        );
        assert!(text.contains(
            "lightstep_tekton_webhook_tls_certificate_expiry_timestamp_seconds 1900000000"
        ));
    }
}
